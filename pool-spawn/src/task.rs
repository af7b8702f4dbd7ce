//! Task functions across the process boundary: [`TaskFn`], [`FnRef`] and their trampolines.
//!
//! A task is a plain `fn` item or a closure that captures nothing. Such a value is
//! zero-sized: its *type* names the function, so it carries no data. [`batch_ref`] turns it
//! into an [`FnRef`], the address of a trampoline monomorphized for that function type (as an
//! offset from an anchor function of this crate, so it survives address-space layout
//! randomization). The worker, after checking that it runs the same executable image
//! ([`ImageId`](crate::protocol::ImageId)), calls the trampoline, which decodes the
//! arguments, runs the function on each of them under `catch_unwind` and encodes the
//! results.
//!
//! # Examples
//!
//! ```
//! use pool_spawn::task::{self, TaskFn};
//!
//! fn add(a: i32, b: i32) -> i32 {
//!     a + b
//! }
//!
//! assert_eq!(add.call((2, 3)), 5);
//! let f = task::batch_ref(add);
//! let g = task::batch_ref(|x: u8| x as u32 * 2);
//! assert_ne!(f, g);
//! ```
//!
//! A closure that captures something is refused at compile time:
//!
//! ```compile_fail
//! let n = 3;
//! let f = pool_spawn::task::batch_ref(move |x: i32| x + n);
//! ```

use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Chain;

mod trampoline;

#[cfg(test)]
pub(crate) use trampoline::run_local;
pub(crate) use trampoline::{call_batch, call_init, link_offset};

/// A plain `fn` item or a closure that captures nothing, taking `Args` (a tuple).
///
/// Implemented for every `Fn(A, B, …) -> R + Copy + Send + Sync + 'static` of up to eight
/// arguments, with `Args = (A, B, …)`; `()` for no argument, `(A,)` for one.
/// [`batch_ref`] and [`init_ref`] additionally require the type to be zero-sized, which
/// holds exactly for fn items and non-capturing closures.
pub trait TaskFn<Args>: Copy + Send + Sync + 'static {
    /// What the function returns.
    type Output;
    /// Calls the function with the unpacked `args`.
    fn call(&self, args: Args) -> Self::Output;
}

macro_rules! impl_task_fn {
    ($($a:ident : $A:ident),*) => {
        impl<Func, Ret, $($A),*> TaskFn<($($A,)*)> for Func
        where
            Func: Fn($($A),*) -> Ret + Copy + Send + Sync + 'static,
        {
            type Output = Ret;
            #[inline]
            #[allow(clippy::unused_unit)]
            fn call(&self, ($($a,)*): ($($A,)*)) -> Ret {
                self($($a),*)
            }
        }
    };
}

impl_task_fn!();
impl_task_fn!(a: A);
impl_task_fn!(a: A, b: B);
impl_task_fn!(a: A, b: B, c: C);
impl_task_fn!(a: A, b: B, c: C, d: D);
impl_task_fn!(a: A, b: B, c: C, d: D, e: E);
impl_task_fn!(a: A, b: B, c: C, d: D, e: E, f: F);
impl_task_fn!(a: A, b: B, c: C, d: D, e: E, f: F, g: G);
impl_task_fn!(a: A, b: B, c: C, d: D, e: E, f: F, g: G, h: H);

/// Which kind of trampoline an [`FnRef`] points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum FnKind {
    /// Made by [`batch_ref`]: runs a batch of items.
    Batch,
    /// Made by [`init_ref`]: runs an initializer once.
    Init,
}

/// An opaque, serializable reference to a monomorphized trampoline.
///
/// Valid only inside the same executable image: the worker checks the parent's
/// [`ImageId`](crate::protocol::ImageId) before it resolves any `FnRef`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FnRef {
    offset: i64,
    kind: FnKind,
}

impl fmt::Debug for FnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FnRef({:?} {:+#x})", self.kind, self.offset)
    }
}

/// The batch trampoline for `F`.
///
/// Given a postcard `Vec<Args>`, the trampoline calls `f` on each item under
/// `catch_unwind` and returns a postcard `Vec<Result<R, ItemError>>`: a panic becomes
/// [`ItemErrorKind::Panicked`] with the message and location, a result that fails to encode
/// becomes [`ItemErrorKind::Encode`]. If the arguments do not decode, the whole batch fails
/// with [`ItemErrorKind::Decode`].
///
/// # Examples
///
/// ```
/// let f = pool_spawn::task::batch_ref(|s: String| s.len());
/// # let _ = f;
/// ```
///
/// # Panics
///
/// Never at run time. A function type that is not zero-sized (a closure that captures
/// something, a function pointer) fails to compile. The error is reported when the code is
/// built (`cargo build`, `cargo test`), not by `cargo check`: it is checked after
/// monomorphization.
pub fn batch_ref<F, Args, R>(f: F) -> FnRef
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    const {
        assert!(
            size_of::<F>() == 0,
            "a procpool task must be a fn item or a closure that captures nothing"
        )
    };
    FnRef {
        offset: trampoline::batch_offset::<F, Args, R>(f),
        kind: FnKind::Batch,
    }
}

/// The initializer trampoline for `F`: decodes `Args`, calls `f` once.
///
/// A panic, or an `Err` output (see [`InitOutput`]), is the failure message the worker
/// reports as `SetupFailed`.
///
/// # Panics
///
/// Never at run time; a function type that is not zero-sized fails to compile (at build
/// time, as for [`batch_ref`]).
pub fn init_ref<F, Args>(f: F) -> FnRef
where
    F: TaskFn<Args>,
    F::Output: InitOutput,
    Args: DeserializeOwned + 'static,
{
    const {
        assert!(
            size_of::<F>() == 0,
            "a procpool initializer must be a fn item or a closure that captures nothing"
        )
    };
    FnRef {
        offset: trampoline::init_offset::<F, Args>(f),
        kind: FnKind::Init,
    }
}

/// What an initializer may return: `()` or `Result<(), E>` with a displayable `E`.
pub trait InitOutput {
    /// `Err(message)` if the initializer failed.
    ///
    /// # Errors
    /// The displayed error of a `Result` output.
    fn into_result(self) -> Result<(), String>;
}

impl InitOutput for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: fmt::Display> InitOutput for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// Why one item of a batch produced no result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ItemError {
    /// What kind of failure.
    pub kind: ItemErrorKind,
    /// A human-readable description: the panic message and location, or the codec error.
    pub message: String,
}

impl ItemError {
    /// An item error of `kind` with `message`.
    pub fn new(kind: ItemErrorKind, message: impl Into<String>) -> Self {
        ItemError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ItemErrorKind::Panicked => "the task panicked",
            ItemErrorKind::Encode => "the task's result could not be encoded",
            ItemErrorKind::Decode => "the task's arguments could not be decoded",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl std::error::Error for ItemError {}

/// The kind of an [`ItemError`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum ItemErrorKind {
    /// The function panicked (the worker caught it and lives on).
    Panicked,
    /// The result could not be encoded.
    Encode,
    /// The arguments could not be decoded.
    Decode,
}

thread_local! {
    /// Set while task code runs: the panic hook records instead of printing.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// The last panic recorded by the hook: message, location, maybe a backtrace.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether `LAST_PANIC` may hold a message: a plain flag, cheap to test on every item.
    static PANIC_KEPT: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    static DECODE_NOTE: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether `DECODE_NOTE` may hold a note (as `PANIC_KEPT`).
    static NOTE_KEPT: Cell<bool> = const { Cell::new(false) };
}

/// Takes the note [`note_decode_failure`] left, if any.
#[inline]
fn take_note() -> Option<String> {
    if !NOTE_KEPT.with(|k| k.replace(false)) {
        return None;
    }
    DECODE_NOTE.with(|n| n.borrow_mut().take())
}

/// Takes the note a failing `Deserialize` left with [`note_decode_failure`] on this thread,
/// if any: for a process decoding values itself (the pool's, decoding results) to say why
/// one did not decode. Take it once before decoding too, to drop a stale note.
pub fn take_decode_note() -> Option<String> {
    take_note()
}

/// Takes the panic message the hook recorded, if any.
#[inline]
fn take_panic() -> Option<String> {
    if !PANIC_KEPT.with(|k| k.replace(false)) {
        return None;
    }
    LAST_PANIC.with(|s| s.borrow_mut().take())
}

/// Records why a `Deserialize` impl is failing, for the worker's decode error.
///
/// postcard keeps only the kind of a custom deserialization error, not its text. A type
/// whose decoding can fail for a reason the user should see (a shared resource that is
/// gone, say) calls this before returning its error; a task's [`ItemErrorKind::Decode`]
/// error then carries the note instead of postcard's generic message.
pub fn note_decode_failure(why: impl Into<String>) {
    DECODE_NOTE.with(|n| *n.borrow_mut() = Some(why.into()));
    NOTE_KEPT.with(|k| k.set(true));
}

/// [`note_decode_failure`] of `why`, and the deserializer's error saying it: what a
/// `Deserialize` that fails for a reason the user should see returns.
pub fn noted_decode_error<E: serde::de::Error>(why: String) -> E {
    note_decode_failure(why.clone());
    E::custom(why)
}

/// Installs the worker's panic hook: inside task code it records the message and location
/// for the [`ItemError`] instead of printing; elsewhere it defers to the previous hook.
pub(crate) fn install_panic_hook() {
    // Once per process: a worker forked by a fork server inherits the server's.
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(install_panic_hook_now);
}

fn install_panic_hook_now() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if IN_TASK.with(Cell::get) {
            let payload = payload_str(info.payload());
            let mut msg = match info.location() {
                Some(l) => format!(
                    "panicked at {}:{}:{}: {payload}",
                    l.file(),
                    l.line(),
                    l.column()
                ),
                None => format!("panicked: {payload}"),
            };
            let bt = std::backtrace::Backtrace::capture();
            if bt.status() == std::backtrace::BacktraceStatus::Captured {
                msg.push_str(&format!("\nstack backtrace:\n{bt}"));
            }
            LAST_PANIC.with(|s| *s.borrow_mut() = Some(msg));
            PANIC_KEPT.with(|k| k.set(true));
        } else {
            previous(info);
        }
    }));
}

fn payload_str(p: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = p.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = p.downcast_ref::<String>() {
        s
    } else {
        "Box<dyn Any>"
    }
}

/// Runs task code under `catch_unwind`; a panic becomes its message (from the hook when
/// installed, else from the payload).
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = IN_TASK.with(|c| c.replace(true));
    take_panic();
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    IN_TASK.with(|c| c.set(was));
    r.map_err(|payload| {
        let recorded = take_panic();
        let msg = recorded.unwrap_or_else(|| format!("panicked: {}", payload_str(&*payload)));
        // Dropping a payload may itself panic; never let that escape.
        let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
        msg
    })
}

/// Where a batch's per-item results go, one at a time, as each item ends: the worker keeps
/// them where they survive it (its result area), so that when it dies mid-batch the pool
/// still has the results of the items that finished.
pub(crate) trait ItemSink {
    /// An item is about to run.
    fn begin(&mut self);
    /// An empty buffer to encode the item's result into.
    fn scratch(&mut self) -> &mut Vec<u8>;
    /// The item's result (a postcard `Result<R, ItemError>`) is in the scratch buffer.
    fn commit(&mut self);
    /// The item's result is the scratch buffer's bytes followed by `tail` (a large byte
    /// string, encoded where it lies instead of copied into the scratch buffer first).
    fn commit_with(&mut self, tail: &[u8]);
    /// Where the next items' results can be kept without a call through this trait for
    /// each (see [`Direct`]); `None` when each must go through [`begin`](Self::begin)
    /// and [`commit`](Self::commit).
    fn direct(&mut self) -> Option<Direct<'_>> {
        None
    }
}

/// A sink's result area, written straight by a run of items: each item's result is
/// encoded into `scratch` and then kept by [`Direct::keep`] exactly as
/// [`ItemSink::commit`] keeps it (the bytes, then the words that make them part of the
/// area), so that an item counts as finished, with its result, the moment it ends, as
/// before; what is saved is three calls through the trait and a `catch_unwind` set up per
/// item (a run of items shares one). A result that the area cannot take as it is
/// (no room left, or it passes descriptors) stays in `scratch` for
/// [`ItemSink::commit`].
pub(crate) struct Direct<'a> {
    pub(crate) scratch: &'a mut Vec<u8>,
    pub(crate) seg: &'a pool_ipc::shm::Segment,
    /// Where the area starts in `seg`, and its length.
    pub(crate) offset: usize,
    pub(crate) len: usize,
    /// Bytes and items of results in the area.
    pub(crate) used: &'a mut usize,
    pub(crate) items: &'a mut u64,
    /// The words that publish them (bytes, then items).
    pub(crate) words: (
        &'a std::sync::atomic::AtomicU64,
        &'a std::sync::atomic::AtomicU64,
    ),
}

impl Direct<'_> {
    /// Keeps the result in `scratch` in the area: `false` (nothing kept) if it does not
    /// fit or passed descriptors.
    #[inline]
    fn keep(&mut self) -> bool {
        let b = std::mem::take(self.scratch);
        let kept = self.keep_bytes(&b);
        *self.scratch = b;
        kept
    }

    /// [`keep`](Direct::keep) of `b` rather than the scratch buffer's bytes.
    #[inline]
    fn keep_bytes(&mut self, b: &[u8]) -> bool {
        use std::sync::atomic::Ordering;
        let n = b.len();
        if crate::protocol::collected_any() || *self.used + n > self.len {
            return false;
        }
        self.seg.write_at(self.offset + *self.used, b);
        *self.used += n;
        *self.items += 1;
        // Bytes first, then the count that makes them part of the area.
        self.words.0.store(*self.used as u64, Ordering::Release);
        self.words.1.store(*self.items, Ordering::Release);
        true
    }
}

/// Collects results in memory (for tests).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct VecSink {
    /// The results, one after the other.
    pub(crate) out: Vec<u8>,
    /// How many.
    pub(crate) items: u64,
    scratch: Vec<u8>,
}

#[cfg(test)]
impl ItemSink for VecSink {
    fn begin(&mut self) {}
    fn scratch(&mut self) -> &mut Vec<u8> {
        self.scratch.clear();
        &mut self.scratch
    }
    fn commit(&mut self) {
        self.commit_with(&[]);
    }
    fn commit_with(&mut self, tail: &[u8]) {
        self.out.extend_from_slice(&self.scratch);
        self.out.extend_from_slice(tail);
        self.items += 1;
    }
}

thread_local! {
    /// The tail of the arguments of the task about to run (see [`with_arg_tail`]).
    static ARG_TAIL: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Registers the destructors of the worker loop's thread-locals that have one (their
/// first use does so, through the C library: a lookup under its loader lock, and code
/// pages a worker would fault in for it alone), for a fork server: its workers inherit
/// them registered.
pub(crate) fn register_thread_locals() {
    ARG_TAIL.with(|_| ());
    LAST_PANIC.with(|_| ());
    DECODE_NOTE.with(|_| ());
}

/// Runs `run` (which calls a batch trampoline) with `tail` as the rest of the batch's
/// payload, after the bytes the trampoline is given ([`ToWorker::RunTail`]): a task of one
/// byte-string argument takes `tail` as that argument, without copying it.
///
/// [`ToWorker::RunTail`]: crate::protocol::ToWorker::RunTail
pub(crate) fn with_arg_tail<T>(tail: Vec<u8>, run: impl FnOnce() -> T) -> T {
    ARG_TAIL.with(|t| *t.borrow_mut() = Some(tail));
    let out = run();
    ARG_TAIL.with(|t| t.borrow_mut().take());
    out
}

/// The arguments `(B,)` for a byte string `B` ([`ByteBuf`](serde_bytes::ByteBuf) or
/// `Vec<u8>`) made of `v` without copying, if `Args` is such a tuple; `v` back otherwise.
fn byte_string_args<Args: 'static>(v: Vec<u8>) -> Result<Args, Vec<u8>> {
    use std::any::{Any, TypeId};
    let t = TypeId::of::<Args>();
    let args: Box<dyn Any> = if t == TypeId::of::<(serde_bytes::ByteBuf,)>() {
        Box::new((serde_bytes::ByteBuf::from(v),))
    } else if t == TypeId::of::<(Vec<u8>,)>() {
        Box::new((v,))
    } else {
        return Err(v);
    };
    Ok(*args
        .downcast::<Args>()
        .expect("Args is the type just checked"))
}

/// Decodes a batch, runs `f` on each item, hands each encoded result to `sink`.
///
/// Items are decoded one at a time, each just before it runs (no vector of the batch's
/// arguments): an item that does not decode fails, those before it ran, and those after it
/// (whose bytes can no longer be located) fail with an error that says so. A count the
/// bytes cannot hold is handled as before, by decoding the whole batch first.
fn run_batch<F, Args, R>(f: F, input: &[u8], sink: &mut dyn ItemSink) -> Result<(), ItemError>
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    take_note();
    if let Some(tail) = ARG_TAIL.with(|t| t.borrow_mut().take()) {
        // One byte string in a frame of its own: `input` is the item count (1) and its
        // length; the tail, its bytes, becomes the argument as it is.
        let mut head = [0u8; 11];
        let mut n = 1;
        head[0] = 1;
        let mut len = tail.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            head[n] = if len == 0 { b } else { b | 0x80 };
            n += 1;
            if len == 0 {
                break;
            }
        }
        if input == &head[..n] {
            match byte_string_args::<Args>(tail) {
                Ok(args) => {
                    sink.begin();
                    return run_item(&f, Ok(args), sink);
                }
                Err(tail) => return run_joined(f, input, &tail, sink),
            }
        }
        return run_joined(f, input, &tail, sink);
    }
    // Items take at least a byte each, except zero-sized ones (and such), which take the
    // whole-batch path below.
    if let Ok((n, mut rest)) = postcard::take_from_bytes::<usize>(input)
        && n <= rest.len()
    {
        let mut i = 0;
        while i < n {
            if let Some(d) = sink.direct() {
                let (kept, end) = if crate::plain::is_plain::<Args>() {
                    run_direct_plain(&f, &mut rest, n - i, d)
                } else {
                    run_direct(&f, &mut rest, n - i, d)
                };
                i += kept;
                match end {
                    RunEnd::Done => continue,
                    RunEnd::Commit => {
                        sink.commit();
                        i += 1;
                        continue;
                    }
                    RunEnd::Large(v) => {
                        commit_large(&v, sink);
                        i += 1;
                        continue;
                    }
                    RunEnd::Failed(e, after) => {
                        run_item(&f, Err(e), sink)?;
                        match after {
                            Some(after) => {
                                rest = after;
                                i += 1;
                                continue;
                            }
                            None => {
                                let after = not_run_after(i);
                                for _ in i + 1..n {
                                    sink.begin();
                                    let e = ItemError::new(ItemErrorKind::Decode, after.clone());
                                    run_item(&f, Err(e), sink)?;
                                }
                                break;
                            }
                        }
                    }
                }
            }
            sink.begin();
            let after = run_next(&f, rest, sink)?;
            i += 1;
            match after {
                Some(after) => rest = after,
                None => {
                    let after = not_run_after(i - 1);
                    for _ in i..n {
                        sink.begin();
                        let e = ItemError::new(ItemErrorKind::Decode, after.clone());
                        run_item(&f, Err(e), sink)?;
                    }
                    break;
                }
            }
        }
        return Ok(());
    }
    let whole = catch(|| postcard::from_bytes::<Vec<Args>>(input));
    match whole {
        Ok(Ok(items)) => {
            for args in items {
                sink.begin();
                run_item(&f, Ok(args), sink)?;
            }
        }
        // Some item does not decode: find which, and run the ones before it.
        Ok(Err(_)) | Err(_) => {
            for item in decode_each::<Args>(input)? {
                sink.begin();
                run_item(&f, item, sink)?;
            }
        }
    }
    Ok(())
}

/// [`run_batch`] of the payload `head` then `tail`, joined.
fn run_joined<F, Args, R>(
    f: F,
    head: &[u8],
    tail: &[u8],
    sink: &mut dyn ItemSink,
) -> Result<(), ItemError>
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    let mut joined = Vec::with_capacity(head.len() + tail.len());
    joined.extend_from_slice(head);
    joined.extend_from_slice(tail);
    run_batch(f, &joined, sink)
}

/// How a run of items in [`run_direct`] ended.
enum RunEnd<'b, R> {
    /// Every item it was given ran, its result kept.
    Done,
    /// An item ended with its result in the scratch buffer, not kept: for
    /// [`ItemSink::commit`].
    Commit,
    /// An item ended with a large byte string: for [`commit_large`].
    Large(R),
    /// An item failed (with the bytes after it, if it decoded).
    Failed(ItemError, Option<&'b [u8]>),
}

/// Runs up to `left` items from the front of `rest` (advanced past each item that
/// decodes), all under one `catch`, keeping each result in the area of `d` as the item
/// ends: how many results were kept, and how the run ended. It does per item what
/// [`run_next`] does, without a call through [`ItemSink`] for each.
fn run_direct<'b, F, Args, R>(
    f: &F,
    rest: &mut &'b [u8],
    left: usize,
    mut d: Direct<'_>,
) -> (usize, RunEnd<'b, R>)
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned,
    R: Serialize + 'static,
{
    let stage = Cell::new(Stage::Decode);
    let kept = Cell::new(0usize);
    // One deserializer for the run, where the item after the last one decoded starts.
    let mut de = postcard::Deserializer::from_bytes(rest);
    let ran = catch(|| -> Result<RunEnd<'b, R>, String> {
        while kept.get() < left {
            stage.set(Stage::Decode);
            take_note();
            let args = match Args::deserialize(&mut de) {
                Ok(args) => args,
                Err(e) => return Err(decode_failure(&e)),
            };
            if let Some(end) = call_and_keep(f, args, &stage, &kept, &mut d)? {
                return Ok(end);
            }
        }
        Ok(RunEnd::Done)
    });
    // (A deserializer of a slice always ends with the rest of it.)
    *rest = de.finalize().unwrap_or_default();
    run_ended(ran, stage.get(), kept.get(), rest, d)
}

/// An item of [`run_direct`] or [`run_direct_plain`] once its arguments decoded: calls
/// `f` and keeps the result (see [`keep_ok`]). `Ok(None)` to go on with the next item;
/// otherwise how the run ends here.
#[inline(always)]
fn call_and_keep<'b, F, Args, R>(
    f: &F,
    args: Args,
    stage: &Cell<Stage>,
    kept: &Cell<usize>,
    d: &mut Direct<'_>,
) -> Result<Option<RunEnd<'b, R>>, String>
where
    F: TaskFn<Args, Output = R>,
    R: Serialize + 'static,
{
    stage.set(Stage::Call);
    let v = f.call(args);
    if large_byte_string(&v).is_some() {
        return Ok(Some(RunEnd::Large(v)));
    }
    stage.set(Stage::Encode);
    if !keep_ok(v, d)? {
        return Ok(Some(RunEnd::Commit));
    }
    kept.set(kept.get() + 1);
    Ok(None)
}

/// Encodes `Ok(v)`, an item's result, and keeps it in the area of `d`: `Ok(false)` if the
/// area has no room for it (it is then in the scratch buffer, for a commit). A plain number
/// is written by hand (see `crate::plain`) and straight into the area.
#[inline(always)]
fn keep_ok<R: Serialize + 'static>(v: R, d: &mut Direct<'_>) -> Result<bool, String> {
    // postcard's `Ok(v)`: the variant index 0, then the value.
    let mut ok = [0u8; 1 + crate::plain::MAX_LEN];
    let (tag, room) = ok.split_first_mut().expect("not empty");
    *tag = 0;
    match crate::plain::write(&v, room.try_into().expect("MAX_LEN bytes")) {
        Some(n) if d.keep_bytes(&ok[..1 + n]) => Ok(true),
        Some(n) => {
            d.scratch.clear();
            d.scratch.extend_from_slice(&ok[..1 + n]);
            Ok(false)
        }
        None => {
            encode_ok(v, d.scratch)?;
            Ok(d.keep())
        }
    }
}

/// How a run of [`run_direct`] or [`run_direct_plain`] ended, from what its loop returned
/// (`ran`), the stage it was at, the results it kept and the bytes after the last item
/// that decoded (`rest`).
fn run_ended<'b, R>(
    ran: Result<Result<RunEnd<'b, R>, String>, String>,
    stage: Stage,
    kept: usize,
    rest: &'b [u8],
    d: Direct<'_>,
) -> (usize, RunEnd<'b, R>) {
    // Where the item after a failed one starts, if that one decoded.
    let after = match stage {
        Stage::Decode => None,
        Stage::Call | Stage::Encode => Some(rest),
    };
    let failure = match ran {
        Ok(Ok(end)) => return (kept, end),
        Ok(Err(why)) => item_failure(Ok(why), stage),
        Err(m) => item_failure(Err(m), stage),
    };
    d.scratch.clear();
    (kept, RunEnd::Failed(failure, after))
}

/// Encodes `Ok(v)`, an item's result, into `scratch` (emptied first), with postcard.
fn encode_ok<R: Serialize>(v: R, scratch: &mut Vec<u8>) -> Result<(), String> {
    scratch.clear();
    let result: Result<R, ItemError> = Ok(v);
    pool_ipc::encode_append(scratch, &result)
        .map_err(|e| format!("the task's result does not encode: {}", Chain(&e)))
}

/// [`run_direct`] of items of a plain number type (see `crate::plain`): each read by a
/// loop made for them instead of postcard's deserializer. An item it does not take (cut
/// short, or out of its type's range) is left to postcard, whose error it gets as before.
fn run_direct_plain<'b, F, Args, R>(
    f: &F,
    rest: &mut &'b [u8],
    left: usize,
    mut d: Direct<'_>,
) -> (usize, RunEnd<'b, R>)
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    let stage = Cell::new(Stage::Decode);
    let kept = Cell::new(0usize);
    // Where the next item starts.
    let at = Cell::new(*rest);
    let ran = catch(|| -> Result<RunEnd<'b, R>, String> {
        while kept.get() < left {
            stage.set(Stage::Decode);
            let bytes = at.get();
            let args = match crate::plain::read::<Args>(bytes) {
                Some((args, n)) => {
                    at.set(&bytes[n..]);
                    args
                }
                None => {
                    take_note();
                    match postcard::take_from_bytes::<Args>(bytes) {
                        Ok((args, after)) => {
                            at.set(after);
                            args
                        }
                        Err(e) => return Err(decode_failure(&e)),
                    }
                }
            };
            if let Some(end) = call_and_keep(f, args, &stage, &kept, &mut d)? {
                return Ok(end);
            }
        }
        Ok(RunEnd::Done)
    });
    *rest = at.get();
    run_ended(ran, stage.get(), kept.get(), rest, d)
}

/// Commits an item's large byte-string result `v` from where it lies: postcard's
/// `Ok(bytes)`, the variant index 0 and the length in the scratch buffer, the bytes as the
/// tail.
fn commit_large<R: 'static>(v: &R, sink: &mut dyn ItemSink) {
    let bytes = large_byte_string(v).expect("a large byte string");
    let out = sink.scratch();
    out.push(0);
    pool_ipc::encode_seq_len(out, bytes.len());
    sink.commit_with(bytes);
}

/// What [`run_next`] was doing when it stopped short.
#[derive(Clone, Copy)]
enum Stage {
    Decode,
    Call,
    Encode,
}

/// The error of an item that did not come through, at `stage`: `failed` is the error a step
/// returned (`Ok`) or the message of a panic (`Err`).
fn item_failure(failed: Result<String, String>, stage: Stage) -> ItemError {
    match (failed, stage) {
        (Ok(why) | Err(why), Stage::Decode) => ItemError::new(ItemErrorKind::Decode, why),
        (Err(m), Stage::Call) => ItemError::new(ItemErrorKind::Panicked, m),
        (Ok(why), _) => ItemError::new(ItemErrorKind::Encode, why),
        (Err(m), Stage::Encode) => ItemError::new(
            ItemErrorKind::Encode,
            format!("encoding the task's result {m}"),
        ),
    }
}

/// Decodes the item at the front of `bytes`, runs `f` on it and commits its encoded result
/// to `sink`, all under one `catch` (the stage tells which step a panic came from): the
/// bytes after the item, or `None` if it did not decode (its error is the result then). A
/// large byte-string result is committed from where it lies (see [`large_byte_string`]).
///
/// # Errors
///
/// As for [`run_item`]: only when not even an item error can be encoded.
fn run_next<'b, F, Args, R>(
    f: &F,
    bytes: &'b [u8],
    sink: &mut dyn ItemSink,
) -> Result<Option<&'b [u8]>, ItemError>
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned,
    R: Serialize + 'static,
{
    // A Cell: read after an unwind, which the compiler's liveness lint does not see.
    let stage = Cell::new(Stage::Decode);
    let mut after = None;
    let mut large: Option<R> = None;
    let out = sink.scratch();
    let mark = out.len();
    let ran = catch(|| -> Result<(), String> {
        take_note();
        let (args, rest) = match postcard::take_from_bytes::<Args>(bytes) {
            Ok(decoded) => decoded,
            Err(e) => return Err(decode_failure(&e)),
        };
        after = Some(rest);
        stage.set(Stage::Call);
        let v = f.call(args);
        if large_byte_string(&v).is_some() {
            large = Some(v);
            return Ok(());
        }
        stage.set(Stage::Encode);
        let result: Result<R, ItemError> = Ok(v);
        pool_ipc::encode_append(out, &result)
            .map_err(|e| format!("the task's result does not encode: {}", Chain(&e)))
    });
    let failure = match (ran, stage.get()) {
        (Ok(Ok(())), _) => {
            match large.as_ref().and_then(large_byte_string) {
                Some(bytes) => {
                    // postcard's `Ok(bytes)`: the variant index 0, the length, then the
                    // bytes, which the sink takes from where they are.
                    let out = sink.scratch();
                    out.push(0);
                    pool_ipc::encode_seq_len(out, bytes.len());
                    sink.commit_with(bytes);
                }
                None => sink.commit(),
            }
            return Ok(after);
        }
        (Ok(Err(why)), stage) => item_failure(Ok(why), stage),
        (Err(m), stage) => item_failure(Err(m), stage),
    };
    sink.scratch().truncate(mark);
    run_item(f, Err(failure), sink)?;
    Ok(after)
}

/// Why an item's arguments did not decode: the note its `Deserialize` left (see
/// [`note_decode_failure`]), else postcard's error.
fn decode_failure(e: &postcard::Error) -> String {
    match take_note() {
        Some(note) => format!("the task's arguments cannot be decoded: {note}"),
        None => format!(
            "the task's arguments cannot be decoded: they do not decode as the function's \
             types: {e}"
        ),
    }
}

/// Decodes one item's arguments from the front of `bytes`: the arguments and the bytes
/// after them, or why they do not decode (a `Deserialize` that panics included).
fn decode_one<Args: DeserializeOwned>(bytes: &[u8]) -> Result<(Args, &[u8]), String> {
    take_note();
    match catch(|| postcard::take_from_bytes::<Args>(bytes)) {
        Ok(Ok(decoded)) => Ok(decoded),
        Ok(Err(e)) => Err(decode_failure(&e)),
        Err(m) => Err(m),
    }
}

/// The error of the items after item `i` of a batch, which could not be decoded.
fn not_run_after(i: usize) -> String {
    format!(
        "not run: an earlier item of its chunk (number {i} in the chunk, counting from 0) \
         could not be decoded, so where this one's bytes start is unknown"
    )
}

/// Byte strings at least this long are handed to the sink where they lie
/// ([`ItemSink::commit_with`]) rather than encoded into its scratch buffer first.
const SPLIT_MIN: usize = 16 * 1024;

/// The bytes of `v` if it is a byte string ([`ByteBuf`](serde_bytes::ByteBuf) or
/// `Vec<u8>`, which postcard lays out alike: the length as a varint, then the bytes) of at
/// least [`SPLIT_MIN`] bytes.
fn large_byte_string<R: 'static>(v: &R) -> Option<&[u8]> {
    let any: &dyn std::any::Any = v;
    let bytes: &[u8] = if let Some(b) = any.downcast_ref::<serde_bytes::ByteBuf>() {
        b
    } else {
        any.downcast_ref::<Vec<u8>>()?
    };
    (bytes.len() >= SPLIT_MIN).then_some(bytes)
}

/// Runs one item (or passes on its decoding error) and commits its encoded result to
/// `sink`.
fn run_item<F, Args, R>(
    f: &F,
    args: Result<Args, ItemError>,
    sink: &mut dyn ItemSink,
) -> Result<(), ItemError>
where
    F: TaskFn<Args, Output = R>,
    R: Serialize + 'static,
{
    let result: Result<R, ItemError> = args.and_then(|args| {
        catch(|| f.call(args)).map_err(|m| ItemError::new(ItemErrorKind::Panicked, m))
    });
    if let Ok(v) = &result
        && let Some(bytes) = large_byte_string(v)
    {
        // postcard's `Ok(bytes)`: the variant index 0, the length, then the bytes, which
        // the sink takes from where they are.
        let out = sink.scratch();
        out.push(0);
        pool_ipc::encode_seq_len(out, bytes.len());
        sink.commit_with(bytes);
        return Ok(());
    }
    encode_result(result, sink.scratch())?;
    sink.commit();
    Ok(())
}

/// Appends the encoding of `result` to `out` (an item error if it cannot be encoded).
fn encode_result<R: Serialize>(
    result: Result<R, ItemError>,
    out: &mut Vec<u8>,
) -> Result<(), ItemError> {
    let mark = out.len();
    let failure = match catch(|| pool_ipc::encode_append(out, &result)) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("the task's result does not encode: {}", Chain(&e)),
        Err(m) => format!("encoding the task's result {m}"),
    };
    out.truncate(mark);
    // `Err(e)` encodes the same whatever the `Ok` type is.
    let err: Result<(), ItemError> = Err(ItemError::new(ItemErrorKind::Encode, failure));
    pool_ipc::encode_append(out, &err).map_err(|e| {
        ItemError::new(
            ItemErrorKind::Encode,
            format!("internal: an item error: {}", Chain(&e)),
        )
    })
}

/// Decodes a postcard `Vec<Args>` one element at a time: the elements before the first
/// that does not decode are returned as they are, that one with its error, and the ones
/// after it (whose bytes can no longer be located) with an error that says so.
///
/// # Errors
///
/// When not even the sequence's length can be read, or it is absurd for the input.
fn decode_each<Args: DeserializeOwned>(
    input: &[u8],
) -> Result<Vec<Result<Args, ItemError>>, ItemError> {
    let whole_chunk = |why: String| {
        ItemError::new(
            ItemErrorKind::Decode,
            format!("the task's arguments cannot be decoded: {why}"),
        )
    };
    let (n, mut rest) = postcard::take_from_bytes::<usize>(input)
        .map_err(|e| whole_chunk(format!("no item count: {e}")))?;
    // Items take at least a byte each, except zero-sized ones, which never fail to decode.
    if n > input.len() {
        return Err(whole_chunk(format!(
            "{n} items announced in {} bytes",
            input.len()
        )));
    }
    let mut items = Vec::with_capacity(n);
    while items.len() < n {
        let i = items.len();
        match decode_one::<Args>(rest) {
            Ok((args, after)) => {
                items.push(Ok(args));
                rest = after;
                continue;
            }
            Err(why) => items.push(Err(ItemError::new(ItemErrorKind::Decode, why))),
        }
        let after = not_run_after(i);
        while items.len() < n {
            items.push(Err(ItemError::new(ItemErrorKind::Decode, after.clone())));
        }
    }
    Ok(items)
}

/// Runs an initializer on its decoded arguments.
fn run_init<F, Args>(f: F, input: &[u8]) -> Result<(), String>
where
    F: TaskFn<Args>,
    F::Output: InitOutput,
    Args: DeserializeOwned,
{
    take_note();
    let args: Args = match catch(|| postcard::from_bytes::<Args>(input)) {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let why = take_note().unwrap_or_else(|| e.to_string());
            return Err(format!(
                "the initializer's arguments cannot be decoded: {why}"
            ));
        }
        Err(m) => return Err(format!("decoding the initializer's arguments {m}")),
    };
    match catch(|| f.call(args).into_result()) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(m)) => Err(format!("the initializer returned an error: {m}")),
        Err(m) => Err(format!("the initializer {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halve(x: u32) -> u32 {
        assert!(x.is_multiple_of(2), "odd");
        x / 2
    }

    fn bytes_of(n: u32) -> serde_bytes::ByteBuf {
        serde_bytes::ByteBuf::from(vec![n as u8; n as usize])
    }

    fn vec_of(n: u32) -> Vec<u8> {
        vec![n as u8; n as usize]
    }

    #[test]
    fn large_byte_string_results_are_encoded_as_postcard_encodes_them() {
        let sizes = [0u32, 10, SPLIT_MIN as u32, 100_000];
        let input = postcard::to_allocvec(&sizes.map(|n| (n,)).to_vec()).unwrap();
        let mut expected = Vec::new();
        for &n in &sizes {
            pool_ipc::encode_append(&mut expected, &Ok::<_, ItemError>(vec_of(n))).unwrap();
        }
        let mut sink = VecSink::default();
        run_local(bytes_of, &input, &mut sink).unwrap();
        assert_eq!((sink.items, &sink.out), (4, &expected));
        let mut sink = VecSink::default();
        run_local(vec_of, &input, &mut sink).unwrap();
        assert_eq!((sink.items, &sink.out), (4, &expected));
    }

    #[test]
    fn a_batch_hands_each_result_to_the_sink_as_its_item_ends() {
        let input = postcard::to_allocvec(&vec![(4u32,), (3,), (8,)]).unwrap();
        let mut sink = VecSink::default();
        run_local(halve, &input, &mut sink).unwrap();
        let mut got: Vec<Result<u32, ItemError>> = Vec::new();
        crate::protocol::decode_results(sink.items, &sink.out, &mut got).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Ok(2));
        assert_eq!(got[1].as_ref().unwrap_err().kind, ItemErrorKind::Panicked);
        assert_eq!(got[2], Ok(4));
        // A count that the bytes do not hold is an error, not a short vector.
        let mut short: Vec<Result<u32, ItemError>> = Vec::new();
        assert!(crate::protocol::decode_results(4, &sink.out, &mut short).is_err());
    }

    fn where_and_len(b: serde_bytes::ByteBuf) -> (u64, usize) {
        (b.as_ptr() as u64, b.len())
    }

    fn text_len(s: String) -> usize {
        s.len()
    }

    #[test]
    fn a_byte_string_argument_in_a_tail_is_the_tail_buffer_itself() {
        let tail = vec![5u8; 300_000];
        let at = tail.as_ptr() as u64;
        let mut head = vec![1u8];
        pool_ipc::encode_seq_len(&mut head, tail.len());
        let mut sink = VecSink::default();
        with_arg_tail(tail, || run_local(where_and_len, &head, &mut sink)).unwrap();
        let mut got: Vec<Result<(u64, usize), ItemError>> = Vec::new();
        crate::protocol::decode_results(sink.items, &sink.out, &mut got).unwrap();
        assert_eq!(got, vec![Ok((at, 300_000))]);
        // Any other argument type, or a head that does not describe the tail, is decoded
        // from the two joined, like any payload (errors included).
        let mut sink = VecSink::default();
        with_arg_tail(b"hey".to_vec(), || run_local(text_len, &[1, 3], &mut sink)).unwrap();
        let mut got: Vec<Result<usize, ItemError>> = Vec::new();
        crate::protocol::decode_results(sink.items, &sink.out, &mut got).unwrap();
        assert_eq!(got, vec![Ok(3)]);
        let mut sink = VecSink::default();
        with_arg_tail(vec![1, 2], || run_local(where_and_len, &[1, 5], &mut sink)).unwrap();
        let mut got: Vec<Result<(u64, usize), ItemError>> = Vec::new();
        crate::protocol::decode_results(sink.items, &sink.out, &mut got).unwrap();
        assert_eq!(got[0].as_ref().unwrap_err().kind, ItemErrorKind::Decode);
        // No tail left behind for the next task.
        assert!(ARG_TAIL.with(|t| t.borrow().is_none()));
    }

    fn flip(b: bool) -> bool {
        !b
    }

    /// A result whose encoding fails.
    struct Unencodable;

    impl Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }

    fn unencodable(_: u8) -> Unencodable {
        Unencodable
    }

    #[test]
    fn an_item_that_does_not_decode_fails_with_the_ones_after_it_and_the_ones_before_ran() {
        // 5 is no bool: the second item does not decode.
        let input = postcard::to_allocvec(&vec![(1u8,), (5,), (0,)]).unwrap();
        let mut sink = VecSink::default();
        run_local(flip, &input, &mut sink).unwrap();
        let mut got: Vec<Result<bool, ItemError>> = Vec::new();
        crate::protocol::decode_results(sink.items, &sink.out, &mut got).unwrap();
        assert_eq!(got[0], Ok(false));
        let e = got[1].as_ref().unwrap_err();
        assert_eq!(e.kind, ItemErrorKind::Decode);
        assert!(e.message.contains("cannot be decoded"), "{e}");
        let e = got[2].as_ref().unwrap_err();
        assert_eq!(e.kind, ItemErrorKind::Decode);
        assert!(e.message.contains("number 1 in the chunk"), "{e}");
        // A result that does not encode fails its item only.
        let input = postcard::to_allocvec(&vec![(1u8,), (2,)]).unwrap();
        let mut sink = VecSink::default();
        run_local(unencodable, &input, &mut sink).unwrap();
        let mut got: Vec<Result<(), ItemError>> = Vec::new();
        crate::protocol::decode_results(sink.items, &sink.out, &mut got).unwrap();
        assert_eq!(got.len(), 2);
        for r in got {
            let e = r.unwrap_err();
            assert_eq!(e.kind, ItemErrorKind::Encode);
            assert!(e.message.contains("does not encode"), "{e}");
        }
    }
}
