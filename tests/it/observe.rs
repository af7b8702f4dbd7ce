//! Observability and steering: the spans and events of tasks and workers, `Metrics` by
//! outcome with timing summaries, per-worker state, and `resize` under a running map.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use procpool::{AsyncResult, Options, Pool, StartMethod};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::util::{METHODS, builder, rss_kib, shut_down, square, wait_for};

/// A span as the recorder saw it: its fields (as text), parent, and the events in it.
#[derive(Clone, Debug, Default)]
struct SpanRec {
    name: String,
    fields: BTreeMap<String, String>,
    parent: Option<u64>,
    events: Vec<BTreeMap<String, String>>,
}

#[derive(Default)]
struct Store {
    /// Live spans by id (ids are reused once a span closes).
    live: BTreeMap<u64, SpanRec>,
    /// Closed spans, with their parent's fields at the time.
    closed: Vec<(SpanRec, Option<SpanRec>)>,
}

static STORE: Mutex<Option<Store>> = Mutex::new(None);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Records every span and event of this process (installed once, globally: the pool's
/// driver thread emits them).
struct Recorder;

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut rec = SpanRec {
            name: attrs.metadata().name().to_owned(),
            parent: ctx
                .span(id)
                .and_then(|s| s.parent())
                .map(|p| p.id().into_u64()),
            ..SpanRec::default()
        };
        attrs.record(&mut Fields(&mut rec.fields));
        with_store(|s| s.live.insert(id.into_u64(), rec));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        with_store(|s| {
            if let Some(rec) = s.live.get_mut(&id.into_u64()) {
                values.record(&mut Fields(&mut rec.fields));
            }
        });
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        fields.insert("level".into(), event.metadata().level().to_string());
        if let Some(span) = ctx.event_span(event) {
            with_store(|s| {
                if let Some(rec) = s.live.get_mut(&span.id().into_u64()) {
                    rec.events.push(fields);
                }
            });
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        with_store(|s| {
            if let Some(rec) = s.live.remove(&id.into_u64()) {
                let parent = rec.parent.and_then(|p| s.live.get(&p).cloned());
                s.closed.push((rec, parent));
            }
        });
    }
}

fn with_store<R>(f: impl FnOnce(&mut Store) -> R) -> R {
    let mut g = STORE.lock().unwrap_or_else(PoisonError::into_inner);
    f(g.get_or_insert_with(Store::default))
}

fn install_recorder() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(Recorder);
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
}

/// The closed task spans of function `name` run by a pool of `method`, with their pool
/// span.
fn task_spans(name: &str, method: StartMethod) -> Vec<(SpanRec, SpanRec)> {
    with_store(|s| {
        s.closed
            .iter()
            .filter(|(t, _)| t.name == "task" && t.fields["function"].ends_with(name))
            .filter_map(|(t, p)| Some((t.clone(), p.clone()?)))
            .filter(|(_, p)| p.fields["start_method"] == format!("{method:?}"))
            .collect()
    })
}

/// The pool span that `task`'s parent snapshot belongs to, as it closed.
fn pool_of(task_parent: &SpanRec) -> SpanRec {
    with_store(|s| {
        s.closed
            .iter()
            .find(|(p, _)| p.name == "pool" && p.fields["id"] == task_parent.fields["id"])
            .map(|(p, _)| p.clone())
            .expect("the pool's span closed with the pool")
    })
}

fn messages(span: &SpanRec) -> Vec<&str> {
    span.events.iter().map(|e| e["message"].as_str()).collect()
}

fn traced_ok(x: u64) -> u64 {
    x + 1
}

fn traced_panic(x: u64) -> u64 {
    panic!("traced panic {x}")
}

fn traced_sigkill(_x: u64) -> u64 {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    std::thread::sleep(Duration::from_secs(30));
    0
}

/// A task that succeeded, one that panicked and one lost to SIGKILL, under every start
/// method: each task's span names its task id, function, worker and pid, and holds the
/// events of its life with its outcome's kind; the pool's span holds the worker that died
/// with its signal and its replacement. `Metrics` counts the three outcomes, the death and
/// the timings of the two tasks that came back, and serializes.
#[test]
fn spans_and_metrics_tell_a_tasks_life_and_its_outcome() {
    install_recorder();
    for method in METHODS {
        let pool = builder(method).processes(1).build().unwrap();
        assert_eq!(pool.apply(traced_ok, (1,)).unwrap(), 2);
        assert!(pool.apply(traced_panic, (2,)).unwrap_err().is_panic());
        let lost = pool.apply(traced_sigkill, (3,)).unwrap_err();
        assert!(lost.is_worker_lost(), "{method:?}: {lost}");
        let m = pool.metrics();
        shut_down(pool);

        let ok = task_spans("traced_ok", method);
        assert_eq!(ok.len(), 1, "{method:?}: {ok:?}");
        let (task, pool_span) = &ok[0];
        assert_eq!(pool_span.fields["processes"], "1");
        for field in ["task", "worker", "pid", "queue_wait", "run_time"] {
            assert!(
                task.fields.contains_key(field),
                "{method:?}: no {field}: {task:?}"
            );
        }
        assert!(
            task.fields["worker"].starts_with(method.worker_name_prefix()),
            "{task:?}"
        );
        assert_eq!(
            messages(task),
            ["task queued", "task sent", "task started", "task finished"],
            "{method:?}"
        );

        let panicked = task_spans("traced_panic", method);
        assert_eq!(panicked.len(), 1, "{method:?}");
        let (task, _) = &panicked[0];
        let failed = task
            .events
            .iter()
            .find(|e| e["message"] == "task failed")
            .unwrap();
        assert_eq!(failed["kind"], "Panicked", "{failed:?}");
        assert!(failed["error"].contains("traced panic 2"), "{failed:?}");
        assert!(task.fields.contains_key("run_time"), "{task:?}");

        let killed = task_spans("traced_sigkill", method);
        assert_eq!(killed.len(), 1, "{method:?}");
        let (task, parent) = &killed[0];
        let pool_span = &pool_of(parent);
        let pid = &task.fields["pid"];
        let failed = task
            .events
            .iter()
            .find(|e| e["message"] == "task failed")
            .unwrap();
        assert_eq!(failed["kind"], "WorkerLost", "{failed:?}");
        assert!(failed["error"].contains("SIGKILL"), "{failed:?}");
        let died = pool_span
            .events
            .iter()
            .find(|e| e["message"] == "worker died")
            .unwrap_or_else(|| panic!("{method:?}: no worker died in {pool_span:?}"));
        assert_eq!(&died["pid"], pid);
        assert!(died["status"].contains("SIGKILL"), "{died:?}");
        assert!(
            messages(pool_span).contains(&"worker replaced"),
            "{method:?}: {:?}",
            messages(pool_span)
        );

        assert_eq!(m.items.ok, 1, "{method:?}: {m:?}");
        assert_eq!((m.items.panicked, m.items.worker_lost), (1, 1), "{m:?}");
        assert_eq!((m.died, m.workers_started), (1, 2), "{m:?}");
        assert_eq!((m.run_time.count, m.queue_wait.count), (2, 2), "{m:?}");
        assert!(
            m.run_time.max_ns > 0 && m.run_time.sum_ns >= m.run_time.max_ns,
            "{m:?}"
        );
        assert_eq!(m.run_time.buckets.iter().sum::<u64>(), 2);
        let json = serde_json::to_value(m).unwrap();
        assert_eq!(json["items"]["panicked"], 1);
        assert_eq!(json["queue_wait"]["count"], 2);
    }
}

fn traced_chunk(x: u64) -> u64 {
    x * 10
}

/// A map's chunks, traced, each have one task span, told how its chunk ended, as apply's
/// tasks do (the map's one sink serves only chunks nobody traces, and deciding so makes
/// no span of its own).
#[test]
fn a_traced_maps_chunks_have_one_span_each() {
    install_recorder();
    for method in METHODS {
        let pool = builder(method).processes(2).build().unwrap();
        let got = pool
            .map_with(traced_chunk, 0..6u64, Options::new().chunksize(2))
            .unwrap();
        assert_eq!(got, [0, 10, 20, 30, 40, 50]);
        shut_down(pool);
        let spans = task_spans("traced_chunk", method);
        assert_eq!(spans.len(), 3, "{method:?}: {spans:?}");
        for (task, _) in &spans {
            assert_eq!(task.fields["items"], "2", "{method:?}: {task:?}");
            assert!(
                messages(task).contains(&"task finished"),
                "{method:?}: {task:?}"
            );
        }
    }
}

fn sleep_then_echo(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Allocates and touches `mb` MiB, keeps it, and sleeps: its RSS shows.
fn hold_memory(mb: usize) -> usize {
    let v = vec![1u8; mb << 20];
    std::thread::sleep(Duration::from_millis(400));
    v.iter().map(|&b| b as usize).sum::<usize>() >> 20
}

/// `workers()` says, per worker, the tasks it has done, the task it runs and for how
/// long, and its resident memory.
#[test]
fn workers_report_tasks_done_current_task_and_memory() {
    for method in METHODS {
        let pool = builder(method).processes(2).build().unwrap();
        pool.map_with(
            sleep_then_echo,
            [1u64, 1, 1, 1],
            Options::new().chunksize(1),
        )
        .unwrap();
        let done: u64 = pool.workers().iter().map(|w| w.tasks_done()).sum();
        assert_eq!(done, 4, "{method:?}");
        let idle = pool.workers();
        assert!(
            idle.iter()
                .all(|w| w.is_ready() && w.current_task().is_none()),
            "{idle:?}"
        );
        let busy = pool.apply_async(hold_memory, (64,));
        wait_for("a worker running the task", Duration::from_secs(10), || {
            pool.workers().iter().any(|w| {
                w.running_for()
                    .is_some_and(|d| d >= Duration::from_millis(100))
                    && w.rss().is_some_and(|r| r > 64 << 20)
            })
        });
        let w = pool
            .workers()
            .into_iter()
            .find(|w| w.current_task().is_some())
            .unwrap();
        assert!(w.current_task().unwrap() > 4, "{w:?}");
        let other = pool
            .workers()
            .into_iter()
            .find(|x| x.pid() != w.pid())
            .unwrap();
        assert!(
            other.rss().unwrap() < w.rss().unwrap(),
            "{other:?} vs {w:?}"
        );
        assert_eq!(busy.get().unwrap(), 64);
        shut_down(pool);
    }
}

fn item_and_pid(x: u32) -> (u32, u32) {
    std::thread::sleep(Duration::from_micros(50));
    (x, std::process::id())
}

/// A pool grown and shrunk while a map of 10 000 items runs: every item's result comes
/// back exactly once, in order; the new workers take part; the shrink interrupts nothing
/// and retires workers as recycles; the pool ends with the number asked for.
#[test]
fn resize_up_and_down_during_a_map_delivers_every_item_once() {
    for method in METHODS {
        let pool = builder(method).processes(2).build().unwrap();
        let pending = pool.map_async_with(item_and_pid, 0..10_000u32, Options::new().chunksize(10));
        wait_for("the map to begin", Duration::from_secs(10), || {
            pool.metrics().items.ok > 0
        });
        pool.resize(4);
        assert_eq!(pool.processes(), 4);
        wait_for("four workers", Duration::from_secs(10), || {
            pool.workers().iter().filter(|w| w.is_ready()).count() >= 4
        });
        let before_shrink = pool.metrics().items.ok;
        pool.resize(1);
        let results = pending.get().unwrap();
        assert!(
            before_shrink < 10_000,
            "{method:?}: the map ended before the shrink"
        );
        assert_eq!(results.len(), 10_000);
        assert!(
            results
                .iter()
                .enumerate()
                .all(|(i, (x, _))| *x as usize == i)
        );
        let pids: std::collections::BTreeSet<u32> = results.iter().map(|(_, p)| *p).collect();
        assert!(pids.len() >= 3, "{method:?}: only {pids:?} ran the map");
        wait_for("one worker left", Duration::from_secs(10), || {
            pool.workers().len() == 1
        });
        let m = pool.metrics();
        assert_eq!(m.items.ok, 10_000, "{method:?}: {m:?}");
        assert_eq!(
            (m.submitted, m.completed),
            (1000, 1000),
            "{method:?}: {m:?}"
        );
        assert_eq!((m.lost, m.died, m.stopped), (0, 0, 0), "{m:?}");
        assert_eq!(m.recycles.shrink, 3, "{m:?}");
        assert_eq!((m.processes, m.workers), (1, 1), "{m:?}");
        shut_down(pool);
    }
}

fn slow_len(bytes: serde_bytes::ByteBuf) -> usize {
    std::thread::sleep(Duration::from_millis(2));
    bytes.len()
}

/// This process's resident memory, in bytes.
fn vm_rss() -> u64 {
    rss_kib() * 1024
}

/// `max_queued(10)` with a slow pool and a fast producer of 1 MiB tasks: the producer
/// blocks while ten tasks wait, the queue never holds more, and this process's memory stays
/// flat (200 tasks submitted at once would hold 200 MiB of arguments); every task runs.
#[test]
fn max_queued_blocks_a_fast_producer_and_keeps_memory_flat() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const TASKS: usize = 200;
    for method in METHODS {
        let pool = builder(method).processes(1).max_queued(10).build().unwrap();
        pool.apply(slow_len, (serde_bytes::ByteBuf::from(vec![0; 16]),))
            .unwrap();
        let before = vm_rss();
        let submitted = AtomicUsize::new(0);
        let finished = AtomicBool::new(false);
        let (mut peak, mut most_queued, mut seen_blocked) = (before, 0, false);
        std::thread::scope(|s| {
            let producer = s.spawn(|| {
                let mut pending = Vec::with_capacity(TASKS);
                for _ in 0..TASKS {
                    let arg = serde_bytes::ByteBuf::from(vec![7u8; 1 << 20]);
                    pending.push(pool.apply_async(slow_len, (arg,)));
                    submitted.fetch_add(1, Ordering::SeqCst);
                }
                // Bounded: the scope joins this thread even when the watcher below panics.
                let lens: Vec<usize> = pending
                    .into_iter()
                    .map(|r| r.get_timeout(Duration::from_secs(60)).unwrap().unwrap())
                    .collect();
                finished.store(true, Ordering::SeqCst);
                lens
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !finished.load(Ordering::SeqCst) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{method:?}: producer stuck"
                );
                let m = pool.metrics();
                most_queued = most_queued.max(m.queued);
                let n = submitted.load(Ordering::SeqCst);
                // Blocked: the queue is full and the producer has more to submit.
                seen_blocked |= m.queued == 10 && n < TASKS / 2;
                peak = peak.max(vm_rss());
                std::thread::sleep(Duration::from_millis(2));
            }
            let lens = producer.join().unwrap();
            assert!(lens.iter().all(|&l| l == 1 << 20));
        });
        assert!(most_queued <= 10, "{method:?}: {most_queued} queued");
        assert!(
            seen_blocked,
            "{method:?}: the producer never waited on a full queue"
        );
        let grew = peak.saturating_sub(before);
        assert!(
            grew < 64 << 20,
            "{method:?}: memory grew by {} MiB",
            grew >> 20
        );
        shut_down(pool);
    }
}

/// A pool of one worker and a queue of `max_queued`, its worker busy with a 300 ms task
/// (returned; its result is 300).
fn busy_pool(method: StartMethod, max_queued: usize) -> (Pool, AsyncResult<u64>) {
    let pool = builder(method)
        .processes(1)
        .max_queued(max_queued)
        .build()
        .unwrap();
    let running = pool.apply_async(sleep_then_echo, (300,));
    wait_for("the task to run", Duration::from_secs(10), || {
        pool.metrics().running == 1
    });
    (pool, running)
}

/// `try_apply_async` hands the arguments back while the queue is full, and submits once
/// there is room; without `max_queued` it never refuses.
#[test]
fn try_apply_async_returns_the_arguments_when_the_queue_is_full() {
    for method in METHODS {
        let (pool, running) = busy_pool(method, 2);
        let queued: Vec<_> = (1..=2)
            .map(|ms| pool.try_apply_async(sleep_then_echo, (ms,)).unwrap())
            .collect();
        let full = pool.try_apply_async(sleep_then_echo, (3,)).unwrap_err();
        assert_eq!(full.into_inner(), (3,), "{method:?}");
        assert_eq!(running.get().unwrap(), 300);
        let got: Vec<u64> = queued.into_iter().map(|r| r.get().unwrap()).collect();
        assert_eq!(got, [1, 2]);
        assert_eq!(
            pool.try_apply_async(sleep_then_echo, (4,))
                .unwrap()
                .get()
                .unwrap(),
            4
        );
        shut_down(pool);
    }
    let pool = builder(StartMethod::Forkserver)
        .processes(1)
        .build()
        .unwrap();
    let pending: Vec<_> = (0..50)
        .map(|_| pool.try_apply_async(sleep_then_echo, (0,)).unwrap())
        .collect();
    assert!(pending.into_iter().all(|r| r.get().unwrap() == 0));
    shut_down(pool);
}

/// `try_map_async` submits a whole map or none of it: with `max_queued(3)` and a busy
/// worker, a map of three chunks fits, one of two more chunks comes back whole with its
/// items, and once the queue has drained a map of two chunks fits again; every item of the
/// maps that went in is delivered once.
#[test]
fn try_map_async_submits_the_whole_map_or_hands_its_items_back() {
    for method in METHODS {
        let (pool, running) = busy_pool(method, 3);
        let by_one = || Options::new().chunksize(1);
        let first = pool
            .try_map_async_with(sleep_then_echo, [1u64, 2, 3], by_one())
            .unwrap();
        assert_eq!(pool.metrics().queued, 3, "{method:?}");
        let full = pool
            .try_map_async_with(sleep_then_echo, [4u64, 5], by_one())
            .unwrap_err();
        assert_eq!(full.into_inner(), [4, 5], "{method:?}");
        assert_eq!(
            pool.metrics().queued,
            3,
            "nothing of it went in: {method:?}"
        );
        assert_eq!(running.get().unwrap(), 300);
        assert_eq!(first.get().unwrap(), [1, 2, 3]);
        let again = pool
            .try_map_async_with(sleep_then_echo, [4u64, 5], by_one())
            .unwrap();
        assert_eq!(again.get().unwrap(), [4, 5]);
        // More chunks than max_queued never fit; in fewer chunks the same items do.
        assert!(pool.try_map_async_with(square, 0..4u64, by_one()).is_err());
        let squares = pool.try_map_async_with(square, 0..4u64, Options::new().chunksize(2));
        assert_eq!(squares.unwrap().get().unwrap(), [0, 1, 4, 9]);
        assert_eq!(pool.metrics().submitted, 1 + 3 + 2 + 2, "{method:?}");
        shut_down(pool);
    }
    let pool = builder(StartMethod::Forkserver)
        .processes(1)
        .build()
        .unwrap();
    let all = pool.try_map_async(square, 0..100u64).unwrap();
    assert_eq!(all.get().unwrap().len(), 100);
    shut_down(pool);
}

fn slow_add(a: u64, b: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(1));
    a + b
}

/// A `map_async`'s and a `starmap_async`'s progress counts items as their chunks come
/// back: it never goes back, passes through values between 0 and the total, and reaches
/// the total; an `apply_async` is one item.
#[test]
fn progress_of_a_long_map_reaches_the_total() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let items: Vec<(u64, u64)> = (0..200).map(|i| (i, 1)).collect();
        let mapped = pool.map_async_with(
            sleep_then_echo,
            vec![1u64; 200],
            Options::new().chunksize(10),
        );
        let starred = pool.starmap_async_with(slow_add, items, Options::new().chunksize(10));
        for pending in [&mapped, &starred] {
            let (mut last, mut between) = (0, false);
            wait_for("every item", Duration::from_secs(30), || {
                let p = pending.progress();
                assert_eq!(p.total, 200);
                assert!(
                    p.done >= last,
                    "{method:?}: progress went back from {last} to {}",
                    p.done
                );
                between |= p.done > 0 && p.done < 200;
                last = p.done;
                p.is_complete()
            });
            assert!(between, "{method:?}: progress jumped from 0 to the total");
        }
        assert_eq!(mapped.get().unwrap().len(), 200);
        assert_eq!(starred.get().unwrap()[199], 200);
        let one = pool.apply_async(sleep_then_echo, (50,));
        assert_eq!((one.progress().done, one.progress().total), (0, 1));
        one.wait();
        assert!(one.progress().is_complete());
        shut_down(pool);
    }
}
