//! The reference measured beside procpool: CPython's `multiprocessing.Pool`, through the
//! script in `bench/reference/` (built into this program, run with `python3`), and the
//! report script in `bench/` that sets both side by side.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MP_POOL_PY: &str = include_str!("../../bench/reference/mp_pool.py");
const REPORT_PY: &str = include_str!("../../bench/report.py");

/// A private directory holding the embedded scripts; removed on drop.
struct Scripts {
    dir: PathBuf,
}

impl Scripts {
    fn write() -> Result<Scripts, String> {
        let dir = std::env::temp_dir().join(format!("procpool-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let s = Scripts { dir };
        for (name, text) in [("mp_pool.py", MP_POOL_PY), ("report.py", REPORT_PY)] {
            std::fs::write(s.dir.join(name), text)
                .map_err(|e| format!("write {name} in {}: {e}", s.dir.display()))?;
        }
        Ok(s)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs CPython's Pool on `workloads` with each of `methods`; prints and returns its JSON
/// lines. A workload it cannot do comes back as an `"ok": false` line from the script.
pub(crate) fn run_cpython(
    methods: &[crate::Method],
    workloads: &[String],
    runs: usize,
    quick: bool,
) -> Result<Vec<String>, String> {
    let scripts = Scripts::write()?;
    let mut rows = Vec::new();
    for m in methods {
        for w in workloads {
            if w == "echo_1mib_shared" {
                // procpool's own type: the script has no such workload.
                continue;
            }
            let mut cmd = Command::new("python3");
            cmd.arg(scripts.path("mp_pool.py"))
                .args(["--method", m.name(), "--workload", w])
                .args(["--runs", &runs.to_string()]);
            if quick {
                cmd.arg("--quick");
            }
            let out = cmd
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("cannot run python3: {e}"))?;
            for line in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.trim_start().starts_with('{'))
            {
                println!("{line}");
                rows.push(line.to_string());
            }
        }
    }
    Ok(rows)
}

/// Writes `rows` to `DIR/raw.jsonl` and runs the report: `DIR/BENCHMARKS.md`,
/// `DIR/results.json`, `DIR/ratios.svg`, and the tables on stdout.
pub(crate) fn report(dir: &Path, rows: &[String], quick: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let raw = dir.join("raw.jsonl");
    let mut text = rows.join("\n");
    text.push('\n');
    std::fs::write(&raw, text).map_err(|e| format!("write {}: {e}", raw.display()))?;
    let scripts = Scripts::write()?;
    let status = Command::new("python3")
        .arg(scripts.path("report.py"))
        .arg(&raw)
        .arg("--out")
        .arg(dir)
        .args(["--mode", if quick { "quick" } else { "full" }])
        .args(["--command", "procpool bench"])
        .status()
        .map_err(|e| format!("cannot run python3 for the report: {e}"))?;
    if !status.success() {
        return Err(format!("the report script failed ({status})"));
    }
    Ok(())
}
