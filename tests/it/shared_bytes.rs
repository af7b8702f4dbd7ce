//! `SharedBytes`: payloads that cross to workers and back as shared memory, not copies.

use std::time::Duration;

use procpool::{Options, SharedBytes, TaskErrorKind};

use crate::util::{METHODS, builder, shut_down};

/// Bytes `len` long that differ from one `seed` to the next.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Whether `b`'s bytes lie in a mapping of the pool's shared memory in this process (not
/// in a copy), from `/proc/self/maps`. Empty bytes have no memory: true.
fn mapped_here(b: &SharedBytes) -> bool {
    if b.is_empty() {
        return true;
    }
    let at = b.as_ptr() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap_or("");
        let Some((lo, hi)) = range.split_once('-') else {
            return false;
        };
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap_or(0),
            usize::from_str_radix(hi, 16).unwrap_or(0),
        );
        (lo..hi).contains(&at) && l.contains("memfd:procpool-bytes")
    })
}

/// In the worker: the argument's length, sum, and whether it is mapped, not copied.
fn inspect(b: SharedBytes) -> (usize, u64, bool) {
    let sum = b.iter().map(|&x| u64::from(x)).sum();
    (b.len(), sum, mapped_here(&b))
}

/// Hands the argument back as it came.
fn echo(b: SharedBytes) -> SharedBytes {
    b
}

/// Makes new shared bytes in the worker.
fn make(seed: u8, len: usize) -> SharedBytes {
    SharedBytes::with_len(len, |buf| buf.copy_from_slice(&pattern(seed, len))).unwrap()
}

/// Shared bytes for odd `i`, none for even: results with and without descriptors mixed in
/// one chunk.
fn every_other(i: u8) -> Option<SharedBytes> {
    (i % 2 == 1).then(|| make(i, 100_000 + usize::from(i)))
}

#[test]
fn shared_bytes_cross_to_workers_and_back_unchanged_under_every_method() {
    let sizes = [0usize, 1, 4096, 300_000, 1 << 20];
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        for (i, &len) in sizes.iter().enumerate() {
            let data = pattern(i as u8, len);
            let b = SharedBytes::copy_from_slice(&data).unwrap();
            assert!(b.as_slice() == data.as_slice() && mapped_here(&b));
            // Mapped in the worker, not copied.
            let sum = data.iter().map(|&x| u64::from(x)).sum();
            assert_eq!(
                pool.apply(inspect, (b.clone(),)).unwrap(),
                (len, sum, true),
                "{method:?}, {len} bytes"
            );
            // Back from the worker: the same bytes, mapped here.
            let back = pool.apply(echo, (b,)).unwrap();
            assert!(
                back.as_slice() == data.as_slice(),
                "{method:?}, {len} bytes"
            );
            assert!(mapped_here(&back));
            // Made in the worker.
            let made = pool.apply(make, (i as u8, len)).unwrap();
            assert!(made.as_slice() == data.as_slice() && mapped_here(&made));
        }
        // Many at once, several to a chunk, each way; results with descriptors between
        // results without, in order.
        let inputs: Vec<SharedBytes> = (0..20u8)
            .map(|i| SharedBytes::copy_from_slice(&pattern(i, 50_000 + usize::from(i))).unwrap())
            .collect();
        for chunk in [1, 3, 20] {
            let got = pool
                .map_with(echo, inputs.clone(), Options::new().chunksize(chunk))
                .unwrap();
            assert!(got == inputs, "{method:?}: chunks of {chunk}");
            let got = pool
                .map_with(every_other, 0..20u8, Options::new().chunksize(chunk))
                .unwrap();
            for (i, r) in got.iter().enumerate() {
                match r {
                    Some(b) => assert!(b.as_slice() == pattern(i as u8, 100_000 + i)),
                    None => assert_eq!(i % 2, 0),
                }
            }
        }
        // The memory lives as long as a handle does: the caller's dropped right after
        // submitting, the pool's until the task is done.
        let b = SharedBytes::copy_from_slice(&pattern(9, 200_000)).unwrap();
        let r = pool.apply_async(inspect, (b,));
        let (len, _, mapped) = r.get_timeout(Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!((len, mapped), (200_000, true));
        shut_down(pool);
    }
}

fn abort_holding(_b: SharedBytes) -> u32 {
    std::process::abort()
}

#[test]
fn a_worker_that_dies_holding_shared_bytes_takes_nothing_from_the_parent() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let data = pattern(3, 1 << 20);
        let b = SharedBytes::copy_from_slice(&data).unwrap();
        let e = pool.apply(abort_holding, (b.clone(),)).unwrap_err();
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}");
        // Still whole here, and usable with the replacement worker.
        assert!(b.as_slice() == data.as_slice());
        let (len, _, mapped) = pool.apply(inspect, (b,)).unwrap();
        assert_eq!((len, mapped), (1 << 20, true));
        shut_down(pool);
    }
}

/// Files in `/dev/shm`.
fn dev_shm() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Run in a fresh process (re-exec) so that other tests' threads cannot disturb the count.
#[test]
#[ignore = "helper: run via re-exec"]
fn helper_shared_bytes_fd_balance() {
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let (fds_before, shm_before) = (fds(), dev_shm());
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let inputs: Vec<SharedBytes> = (0..8u8)
            .map(|i| SharedBytes::copy_from_slice(&pattern(i, 300_000)).unwrap())
            .collect();
        let got = pool
            .map_with(echo, inputs.clone(), Options::new().chunksize(3))
            .unwrap();
        assert!(got == inputs);
        let made = pool.apply(make, (1, 1 << 20)).unwrap();
        assert_eq!(made.len(), 1 << 20);
        drop((inputs, got, made));
        shut_down(pool);
    }
    assert_eq!(fds(), fds_before, "descriptors left behind");
    assert_eq!(dev_shm(), shm_before, "files left in /dev/shm");
    println!("BALANCED");
}

#[test]
fn shared_bytes_leave_no_descriptor_or_shm_file_behind() {
    let out = crate::util::helper_passed(
        "shared_bytes::helper_shared_bytes_fd_balance",
        Duration::from_secs(120),
        "the shared bytes helper",
    );
    assert!(out.contains("BALANCED"), "{out}");
}

/// The child half of the non-dumpable test: run only when the parent half re-executes this
/// binary with `PROCPOOL_TEST_NOT_DUMPABLE` set; this process makes itself non-dumpable (so
/// its `/proc/<pid>/fd` opens for nobody else), then prints `RESULT ok` if shared bytes
/// reach a worker and come back: only passed descriptors can carry them.
#[test]
#[ignore = "run by shared_bytes_reach_workers_of_a_non_dumpable_process_and_come_back"]
fn not_dumpable_shared_bytes_child() {
    if !crate::util::as_not_dumpable_child() {
        return;
    }
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        let data = pattern(5, 300_000);
        let b = SharedBytes::copy_from_slice(&data).unwrap();
        let sum = data.iter().map(|&x| u64::from(x)).sum();
        let got = pool.apply(inspect, (b.clone(),));
        assert!(
            got.as_ref().is_ok_and(|g| *g == (data.len(), sum, true)),
            "{method:?}: {got:?}"
        );
        let back = pool.apply(echo, (b,)).unwrap();
        assert!(back.as_slice() == data.as_slice(), "{method:?}");
        let made = pool.apply(make, (5, 300_000)).unwrap();
        assert!(made.as_slice() == data.as_slice(), "{method:?}");
        shut_down(pool);
    }
    println!("RESULT ok");
}

/// Without `/proc/<pid>/fd` to fall back on, shared bytes go both ways as descriptors
/// passed with the messages.
#[test]
fn shared_bytes_reach_workers_of_a_non_dumpable_process_and_come_back() {
    crate::util::not_dumpable_child_ok("shared_bytes::not_dumpable_shared_bytes_child");
}
