//! The references measured beside procpool: CPython's `multiprocessing.Pool`, through the
//! script in `bench/reference/` (built into this program, run with `python3`), and the
//! procspawn comparison program (`bench/procspawn`, built apart) if it is given; and the
//! report script in `bench/` that sets them side by side.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const MP_POOL_PY: &str = include_str!("../../bench/reference/mp_pool.py");
const REPORT_PY: &str = include_str!("../../bench/report.py");

/// How this program (the one spawn and forkserver re-execute, so the one whose loading
/// the `startup` figures include) is linked: the shared libraries it has loaded, read from
/// `/proc/self/maps`.
fn build_description() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<&str> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let name = path.rsplit('/').next().unwrap_or(path);
        if name.contains(".so") && !libs.contains(&name) {
            libs.push(name);
        }
    }
    if libs.is_empty() {
        "statically linked".to_owned()
    } else {
        format!("dynamically linked, loading {}", libs.join(", "))
    }
}

/// The report's row saying how this program is linked (`{"build": ...}`).
pub(crate) fn build_row() -> String {
    format!("{{\"build\":{:?}}}", build_description())
}

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

/// The references a run of the bench sets beside procpool: CPython's Pool (through the
/// embedded script), and the procspawn comparison program if one was given. Each runs once
/// per call, so that the bench can measure them run by run in the same minutes as procpool
/// (this machine's speed changes from one minute to the next).
pub(crate) struct References {
    scripts: Option<Scripts>,
    procspawn: Option<PathBuf>,
}

impl References {
    /// CPython's Pool if `cpython` (its script written to a private directory now), and the
    /// procspawn comparison program at `procspawn`.
    pub(crate) fn new(cpython: bool, procspawn: Option<PathBuf>) -> Result<References, String> {
        let scripts = if cpython {
            Some(Scripts::write()?)
        } else {
            None
        };
        Ok(References { scripts, procspawn })
    }

    /// One run of each reference on `workload` (CPython's with each of `methods`): their
    /// JSON lines, printed too. A workload a reference cannot do comes back as its
    /// `"ok": false` line, or none for one it does not know; a run past [`REF_LIMIT`] is
    /// killed, with its process group, and comes back as an `"ok": false` line saying so.
    pub(crate) fn run(
        &self,
        methods: &[crate::Method],
        workload: &str,
        quick: bool,
    ) -> Vec<String> {
        let json_lines =
            |cmd: &mut Command, system: &str| json_lines(cmd, quick, system, workload, REF_LIMIT);
        let mut rows = Vec::new();
        // procpool's own type: the script has no such workload.
        if let Some(scripts) = self
            .scripts
            .as_ref()
            .filter(|_| workload != "echo_1mib_shared")
        {
            for m in methods {
                let mut cmd = Command::new("python3");
                cmd.arg(scripts.path("mp_pool.py"))
                    .args(["--method", m.name(), "--workload", workload, "--runs", "1"])
                    .stderr(Stdio::inherit());
                rows.extend(json_lines(&mut cmd, &format!("cpython-{}", m.name())));
            }
        }
        if let Some(exe) = &self.procspawn {
            let mut cmd = Command::new(exe);
            cmd.args(["--workload", workload, "--runs", "1"])
                // It prints its usage for a workload it does not know: no line then.
                .stderr(Stdio::null());
            rows.extend(json_lines(&mut cmd, "procspawn"));
        }
        rows
    }
}

/// How long one run of a reference may take (the bench stays within its time on a day
/// when CPython's forkserver pool crawls: one run of `imap_memory` took it 95 s, where its
/// fork and spawn pools took 5 s).
const REF_LIMIT: Duration = Duration::from_secs(60);

/// Runs `cmd` (with `--quick` if `quick`), the reference `system`, in a process group of its
/// own, and returns the JSON lines it prints, printed here too; a program that cannot start
/// is said on stderr. Past `limit` the group is killed and the one line returned says that
/// `system` timed out on `workload`.
fn json_lines(
    cmd: &mut Command,
    quick: bool,
    system: &str,
    workload: &str,
    limit: Duration,
) -> Vec<String> {
    if quick {
        cmd.arg("--quick");
    }
    let (status, text) = match crate::bench::run_bounded(cmd.stdin(Stdio::null()), limit, true) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("procpool bench: cannot run {system}: {e}");
            return Vec::new();
        }
    };
    if status.is_none() {
        let line =
            crate::bench::failed_line(system, workload, &format!("timed out after {limit:?}"));
        println!("{line}");
        return vec![line];
    }
    let rows: Vec<String> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(str::to_string)
        .collect();
    for line in &rows {
        println!("{line}");
    }
    rows
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A reference run gives its JSON lines; one past its time limit is killed with what
    /// it started (its process group) and comes back as one line saying it timed out,
    /// rather than holding up the bench.
    #[test]
    fn a_reference_run_past_its_limit_is_killed_and_said_to_have_timed_out() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo '{\"ok\":true}'; echo not json"]);
        let rows = json_lines(&mut ok, false, "sh", "w", Duration::from_secs(30));
        assert_eq!(rows, vec!["{\"ok\":true}".to_owned()]);

        // The shell's child outlives it, holding its output, unless the group is killed.
        let mut slow = Command::new("sh");
        slow.args(["-c", "sleep 30 & sleep 30"]);
        let t = Instant::now();
        let rows = json_lines(
            &mut slow,
            false,
            "slow-ref",
            "w",
            Duration::from_millis(300),
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(rows.len(), 1, "{rows:?}");
        let v: serde_json::Value = serde_json::from_str(&rows[0]).unwrap();
        assert_eq!(v["system"], "slow-ref");
        assert_eq!(v["workload"], "w");
        assert_eq!(v["ok"], false);
        assert_eq!(v["reason"], "timed out after 300ms");

        // A run that ends but leaves a process holding its output: its lines, at once.
        let mut lingering = Command::new("sh");
        lingering.args(["-c", "echo '{\"ok\":1}'; sleep 30 &"]);
        let t = Instant::now();
        let rows = json_lines(&mut lingering, false, "sh", "w", Duration::from_secs(20));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(rows, vec!["{\"ok\":1}".to_owned()]);
    }

    /// The program links its unwinder in (`build.rs`) rather than loading `libgcc_s` at
    /// each start, and the report says how it is linked. (This test binary is linked as
    /// the program is.)
    #[test]
    fn the_program_loads_no_libgcc_s_and_says_how_it_is_linked() {
        let build = build_description();
        let gnu = cfg!(all(target_os = "linux", target_env = "gnu"));
        if gnu && !cfg!(target_feature = "crt-static") {
            assert!(build.starts_with("dynamically linked, loading "), "{build}");
            assert!(build.contains("libc.so"), "{build}");
            assert!(!build.contains("libgcc_s"), "{build}");
        } else if cfg!(target_feature = "crt-static") {
            assert_eq!(build, "statically linked");
        }
        assert_eq!(build_row(), format!("{{\"build\":\"{build}\"}}"));
    }
}
