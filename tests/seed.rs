//! The seed that `init()` makes: a Forkserver pool's server is forked from it, yet its
//! workers see the program as it is when the pool is built (working directory, stdout),
//! not as it was at `init()`; where the program changed what a child inherits otherwise
//! (its umask here), the server is executed as before; the seed, its servers and their
//! workers, each moved to another CPU to start, run where the program may; no seed is
//! made with other threads running or with `PROCPOOL_SEED=0`; a server killed is replaced
//! by another from the seed; a seed that is gone is replaced by executed servers; and the
//! seed ends with its program.
//!
//! `harness = false`: `init()` must run first in `main` for there to be a seed. Each case
//! runs in a child process of its own (this program again, the case named in its
//! environment) and prints what it found. libtest's command line: `no_harness`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use procpool::{Pool, StartMethod};

const NAME: &str = "forkserver_pools_fork_their_server_from_the_seed";
/// The case a child runs; unset in the test itself.
const CASE: &str = "PROCPOOL_TEST_SEED_CASE";
/// How long a child may take.
const WITHIN: Duration = Duration::from_secs(60);

mod no_harness;

fn main() {
    let case = std::env::var(CASE).ok();
    if case.as_deref() == Some("threads") {
        // A thread already running when `init()` comes: no seed.
        std::thread::spawn(|| std::thread::sleep(Duration::from_secs(3600)));
        std::thread::sleep(Duration::from_millis(20));
    }
    procpool::init();
    match case.as_deref() {
        None => no_harness::run(NAME, || {
            test();
            String::new()
        }),
        Some(case) => child(case),
    }
}

/// What a worker sees of its process: its working directory and umask.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct View {
    cwd: String,
    umask: String,
    pid: u32,
}

fn view() -> View {
    View {
        cwd: std::env::current_dir().unwrap().display().to_string(),
        umask: status_field(std::process::id(), "Umask").unwrap_or_default(),
        pid: std::process::id(),
    }
}

/// A worker's pid and the CPUs it may run on, after a moment's work (so that two tasks
/// given at once go to two workers).
fn cpus() -> (u32, String) {
    std::thread::sleep(Duration::from_millis(200));
    let me = std::process::id();
    (me, status_field(me, "Cpus_allowed_list").unwrap())
}

fn say(line: String) {
    println!("{line}");
    std::io::stdout().flush().unwrap();
}

/// A field of `/proc/<pid>/status`.
fn status_field(pid: u32, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim().to_owned())
    })
}

/// `pid`'s parent.
fn parent_of(pid: u32) -> u32 {
    status_field(pid, "PPid").unwrap().parse().unwrap()
}

/// Whether `pid` was executed for its role (its environment names it) rather than forked
/// from the seed (whose environment is the program's own).
fn executed(pid: u32) -> bool {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|&c| c == 0)
        .any(|e| e.starts_with(b"__PROCPOOL_ROLE="))
}

/// This process's seed: its child named `…:seed` (which it names itself a moment after
/// `init()` made it: looked for during up to a second).
fn seed_pid() -> Option<u32> {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(pid) = find_seed() {
            return Some(pid);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn find_seed() -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim_end().ends_with(":seed") && status_field(pid, "PPid")? == me.to_string())
            .then_some(pid)
    })
}

fn pool() -> Pool {
    Pool::builder()
        .processes(1)
        .start_method(StartMethod::Forkserver)
        .build()
        .unwrap()
}

/// Prints `SERVER executed|forked`, then the worker's view as `VIEW …`.
fn report(p: &Pool) {
    let v = p.apply(view, ()).unwrap();
    let server = parent_of(v.pid);
    assert_eq!(
        parent_of(server),
        std::process::id(),
        "the server is our child"
    );
    let how = if executed(server) {
        "executed"
    } else {
        "forked"
    };
    println!("SERVER {how}");
    println!("VIEW cwd={} umask={}", v.cwd, v.umask);
    println!("HERE cwd={}", std::env::current_dir().unwrap().display());
}

fn child(case: &str) {
    println!(
        "SEED {}",
        seed_pid().map_or("none".to_owned(), |p| p.to_string())
    );
    match case {
        "plain" | "threads" | "opted_out" => report(&pool()),
        "changes" => {
            let dir = std::env::temp_dir();
            std::env::set_current_dir(&dir).unwrap();
            let p = pool();
            report(&p);
            // stdout now goes elsewhere: a worker's print follows it there.
            let path = dir.join(format!("procpool-seed-{}.out", std::process::id()));
            let file = std::fs::File::create(&path).unwrap();
            std::io::stdout().flush().unwrap();
            let saved = rustix::io::dup(rustix::stdio::stdout()).unwrap();
            rustix::stdio::dup2_stdout(&file).unwrap();
            let q = pool();
            q.apply(say, ("from a worker".to_owned(),)).unwrap();
            drop((p, q));
            rustix::stdio::dup2_stdout(&saved).unwrap();
            let got = std::fs::read_to_string(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            println!("REDIRECTED {:?}", got.trim_end());
        }
        "affinity" => {
            // The seed, its server and the server's workers (one forked before the seed's
            // verdict, one asked for with it) run where the program may: each was moved to
            // another CPU to start, and put back.
            let p = Pool::builder()
                .processes(2)
                .start_method(StartMethod::Forkserver)
                .build()
                .unwrap();
            let (a, b) = (p.apply_async(cpus, ()), p.apply_async(cpus, ()));
            let workers = [a.get().unwrap(), b.get().unwrap()];
            let server = parent_of(workers[0].0);
            let mine = status_field(std::process::id(), "Cpus_allowed_list").unwrap();
            let mut seen = vec![
                (
                    "seed",
                    seed_pid().and_then(|s| status_field(s, "Cpus_allowed_list")),
                ),
                ("server", status_field(server, "Cpus_allowed_list")),
            ];
            seen.extend(workers.iter().map(|w| ("worker", Some(w.1.clone()))));
            let differ: Vec<_> = seen
                .iter()
                .filter(|(_, c)| c.as_deref() != Some(mine.as_str()))
                .collect();
            println!(
                "SERVER {}",
                if executed(server) {
                    "executed"
                } else {
                    "forked"
                }
            );
            println!("WORKERS {}", usize::from(workers[0].0 != workers[1].0) + 1);
            println!("CPUS {mine} differ={differ:?}");
        }
        "umask" => {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            report(&pool());
            // The server the seed forked before it compared, and refused, is reaped.
            let me = std::process::id();
            let children = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
                .unwrap_or_default();
            let zombies = children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .filter(|&p| status_field(p, "State").is_some_and(|s| s.starts_with('Z')))
                .count();
            println!("ZOMBIES {zombies}");
        }
        "server_killed" => {
            // The pool's server and then its worker killed: the replacement needs a new
            // server, which the seed forks too.
            let p = pool();
            let first = p.apply(view, ()).unwrap().pid;
            let server = parent_of(first);
            for pid in [server, first] {
                let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
                rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
            }
            let until = Instant::now() + WITHIN;
            let next = loop {
                match p.apply(view, ()) {
                    Ok(v) if v.pid != first => break v.pid,
                    // The task sent to the dead worker, or to it again before its death was
                    // seen: fails as lost, and the pool replaces the worker.
                    _ if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                    other => panic!("no new worker: {other:?}"),
                }
            };
            let again = parent_of(next);
            let how = if executed(again) {
                "executed"
            } else {
                "forked"
            };
            println!("NEW_SERVER {how} {}", again != server);
        }
        "concurrent" => {
            // Pools built at once on several threads: each reads its own answer from the
            // seed, and has a server of its own.
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let barrier = std::sync::Arc::clone(&barrier);
                    std::thread::spawn(move || {
                        barrier.wait();
                        let p = pool();
                        let server = parent_of(p.apply(view, ()).unwrap().pid);
                        assert_eq!(parent_of(server), std::process::id());
                        (executed(server), server, p)
                    })
                })
                .collect();
            let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let forked = got.iter().filter(|(executed, _, _)| !executed).count();
            let servers: std::collections::HashSet<u32> = got.iter().map(|g| g.1).collect();
            println!("CONCURRENT forked={forked} servers={}", servers.len());
        }
        "seed_killed" => {
            let seed = seed_pid().expect("a seed");
            let pid = rustix::process::Pid::from_raw(seed as i32).unwrap();
            rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
            // Not reaped by anyone yet: a pool finds it gone.
            std::thread::sleep(Duration::from_millis(20));
            report(&pool());
            let zombie = status_field(seed, "State").is_some_and(|s| s.starts_with('Z'));
            println!(
                "SEED_REAPED {}",
                !zombie && status_field(seed, "PPid").is_none()
            );
            report(&pool());
        }
        _ => panic!("unknown case {case}"),
    }
    std::io::stdout().flush().unwrap();
}

/// Runs `case` in a child process; its output, once it exited successfully.
fn run(case: &str, extra_env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CASE, case)
        .env_remove("PROCPOOL_SEED")
        .stdout(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(all);
    });
    let deadline = Instant::now() + WITHIN;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("case {case}: still running after {WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "case {case}: {status}\n{out}");
    out
}

fn lines<'a>(out: &'a str, tag: &str) -> Vec<&'a str> {
    out.lines()
        .filter_map(|l| l.strip_prefix(tag).map(str::trim))
        .collect()
}

/// Whether `pid` runs (not gone, not a zombie).
fn running(pid: u32) -> bool {
    status_field(pid, "State").is_some_and(|s| !s.starts_with('Z'))
}

fn test() {
    let plain = run("plain", &[]);
    assert_eq!(lines(&plain, "SERVER "), ["forked"], "{plain}");
    let seed: u32 = lines(&plain, "SEED ")[0].parse().expect("a seed");
    // It ends with its program (at end of file on its socket, or by the death signal).
    let until = Instant::now() + Duration::from_secs(10);
    while running(seed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!running(seed), "the seed {seed} outlived its program");

    let changes = run("changes", &[]);
    assert_eq!(lines(&changes, "SERVER "), ["forked"], "{changes}");
    let here = lines(&changes, "HERE cwd=")[0];
    assert!(
        lines(&changes, "VIEW ")[0].starts_with(&format!("cwd={here} umask=")),
        "a worker has the working directory of when its pool was built:\n{changes}"
    );
    assert_eq!(
        lines(&changes, "REDIRECTED "),
        ["\"from a worker\""],
        "a worker prints where stdout went:\n{changes}"
    );

    let affinity = run("affinity", &[]);
    assert_eq!(lines(&affinity, "SERVER "), ["forked"], "{affinity}");
    assert_eq!(lines(&affinity, "WORKERS "), ["2"], "{affinity}");
    assert!(
        lines(&affinity, "CPUS ")[0].ends_with(" differ=[]"),
        "the seed, the server and its workers may run where the program may:\n{affinity}"
    );

    let umask = run("umask", &[]);
    assert_eq!(lines(&umask, "SERVER "), ["executed"], "{umask}");
    assert!(
        lines(&umask, "VIEW ")[0].ends_with("umask=0077"),
        "a worker has the umask of when its pool was built:\n{umask}"
    );
    assert_eq!(lines(&umask, "ZOMBIES "), ["0"], "{umask}");

    let server_killed = run("server_killed", &[]);
    assert_eq!(
        lines(&server_killed, "NEW_SERVER "),
        ["forked true"],
        "{server_killed}"
    );

    let concurrent = run("concurrent", &[]);
    assert_eq!(
        lines(&concurrent, "CONCURRENT "),
        ["forked=4 servers=4"],
        "{concurrent}"
    );

    let killed = run("seed_killed", &[]);
    assert_eq!(
        lines(&killed, "SERVER "),
        ["executed", "executed"],
        "{killed}"
    );
    assert_eq!(lines(&killed, "SEED_REAPED "), ["true"], "{killed}");

    let threads = run("threads", &[]);
    assert_eq!(lines(&threads, "SEED "), ["none"], "{threads}");
    assert_eq!(lines(&threads, "SERVER "), ["executed"], "{threads}");

    let opted_out = run("opted_out", &[("PROCPOOL_SEED", "0")]);
    assert_eq!(lines(&opted_out, "SEED "), ["none"], "{opted_out}");
    assert_eq!(lines(&opted_out, "SERVER "), ["executed"], "{opted_out}");
}
