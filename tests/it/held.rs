//! Answers held back: a worker that finishes a task while more requests wait may keep its
//! answer (on its progress page) to write it with the next ones. A worker that dies holding
//! answers loses none of them: the tasks they answer are delivered, not failed, and not
//! run again.

use std::io::Write;

use procpool::{Options, TaskErrorKind};

use crate::util::{METHODS, builder, shut_down, square};

/// Records its run in the file at `path` (one `O_APPEND` write), then aborts its worker if
/// `x` is `die_at`; returns `x`.
fn record_or_abort((path, x, die_at): (String, u64, u64)) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open the runs file");
    f.write_all(format!("{x}\n").as_bytes())
        .expect("record the run");
    if x == die_at {
        std::process::abort();
    }
    x
}

#[test]
fn answers_held_when_a_worker_dies_are_delivered_once() {
    for method in METHODS {
        let path =
            std::env::temp_dir().join(format!("procpool-held-{}-{method:?}", std::process::id()));
        std::fs::File::create(&path).expect("create the runs file");
        let p = path.to_string_lossy().into_owned();
        // One worker, many tiny tasks: it holds several at once, and answers some late.
        let pool = builder(method).processes(1).build().unwrap();
        pool.map(square, 0..1000u64).unwrap();
        let n = 2000u64;
        let die_at = 1500u64;
        let items: Vec<_> = (0..n).map(|x| (p.clone(), x, die_at)).collect();
        let got: Vec<_> = pool
            .imap_with(record_or_abort, items, Options::new().chunksize(1))
            .collect();
        assert_eq!(got.len() as u64, n);
        for (x, r) in (0..n).zip(&got) {
            if x == die_at {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
            } else {
                assert_eq!(r.as_ref().ok(), Some(&x), "{method:?}: item {x}: {r:?}");
            }
        }
        // Every task ran exactly once (the one that killed its worker too).
        let runs = std::fs::read_to_string(&path).expect("read the runs file");
        let mut count = vec![0u32; n as usize];
        for line in runs.lines() {
            count[line.parse::<usize>().expect("a run's line")] += 1;
        }
        let _ = std::fs::remove_file(&path);
        for (x, c) in count.iter().enumerate() {
            assert_eq!(*c, 1, "{method:?}: item {x} ran {c} times");
        }
        shut_down(pool);
    }
}
