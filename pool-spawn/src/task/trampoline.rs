//! Trampolines: the only code that turns an [`FnRef`] back into a callable function.
//!
//! # Safety
//!
//! Two unsafe operations live here, and nowhere else in the task machinery:
//!
//! 1. **Conjuring a task function value.** A trampoline is monomorphized for one function
//!    type `F` and needs a value of `F` to call it. `F` is zero-sized (a `const` assertion in
//!    [`batch_offset`]/[`init_offset`] rejects anything else at compile time), `Copy` and
//!    `'static`, and those functions take a value of `F` as proof that one can be made.
//!    Such a type has exactly one value, which carries no bytes; creating it again is the
//!    same as copying the value the caller passed. (On stable Rust only fn items and
//!    closures implement `Fn`, so `F` is one of those; a closure capturing only zero-sized
//!    `Copy` values is covered by the same argument.)
//! 2. **Resolving an [`FnRef`] to a function pointer.** An `FnRef` is the distance from
//!    [`anchor`] to a trampoline, measured by [`batch_offset`]/[`init_offset`] in the
//!    parent. Adding it to the worker's own `anchor` gives the same trampoline only when
//!    both processes run the same executable image, so resolution demands a
//!    [`SameImage`] token, which only [`ImageId::verify`](crate::protocol::ImageId) hands
//!    out after comparing the parent's image identity with the worker's. The kind tag is
//!    checked so that a batch trampoline is never called with the initializer's signature
//!    or the reverse. The channel itself is trusted: it is a private socketpair between the
//!    parent and a child it started; a peer that forges offsets is outside the threat model.

#![allow(unsafe_code)]

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{FnKind, FnRef, InitOutput, ItemError, ItemErrorKind, ItemSink, TaskFn};
use crate::protocol::SameImage;

/// The signature of every batch trampoline.
type BatchFn = fn(&[u8], &mut dyn ItemSink) -> Result<(), ItemError>;
/// The signature of every initializer trampoline.
type InitFn = fn(&[u8]) -> Result<(), String>;

/// The fixed point offsets are measured from. Never inlined, so it has one address.
#[inline(never)]
fn anchor() -> u64 {
    std::hint::black_box(0x7072_6f63_706f_6f6c)
}

/// A second function, for the link-time part of the image identity.
#[inline(never)]
fn landmark() -> u64 {
    std::hint::black_box(anchor()).rotate_left(17)
}

fn anchor_addr() -> usize {
    anchor as fn() -> u64 as usize
}

/// The distance between two functions of this crate: equal in two processes only if their
/// executables were linked identically.
pub(crate) fn link_offset() -> i64 {
    (landmark as fn() -> u64 as usize).wrapping_sub(anchor_addr()) as i64
}

/// Produces the (only) value of the zero-sized function type `F`.
///
/// # Safety
///
/// A value of `F` must have existed in this program (the trampolines are only instantiated
/// by [`batch_offset`]/[`init_offset`], which receive one).
unsafe fn conjure<F: Copy + 'static>() -> F {
    const { assert!(size_of::<F>() == 0, "task functions must be zero-sized") };
    // `F` is zero-sized (asserted above): no bytes are read, no invariant of its (absent)
    // data can be broken.
    // SAFETY: the caller guarantees `F` values exist and `F` is `Copy`: this is a copy.
    unsafe { std::mem::zeroed::<F>() }
}

fn batch_trampoline<F, Args, R>(input: &[u8], sink: &mut dyn ItemSink) -> Result<(), ItemError>
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    // SAFETY: this function is only instantiated in `batch_offset::<F, ..>`, which was given
    // a value of `F` by `batch_ref`.
    let f = unsafe { conjure::<F>() };
    super::run_batch(f, input, sink)
}

/// Runs a batch of `f` in this process, without a trampoline (for tests).
#[cfg(test)]
pub(crate) fn run_local<F, Args, R>(
    f: F,
    input: &[u8],
    sink: &mut dyn ItemSink,
) -> Result<(), ItemError>
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    super::run_batch(f, input, sink)
}

fn init_trampoline<F, Args>(input: &[u8]) -> Result<(), String>
where
    F: TaskFn<Args>,
    F::Output: InitOutput,
    Args: DeserializeOwned,
{
    // SAFETY: this function is only instantiated in `init_offset::<F, ..>`, which was given a
    // value of `F` by `init_ref`.
    let f = unsafe { conjure::<F>() };
    super::run_init(f, input)
}

/// The offset of the batch trampoline for `F`; `proof` shows a value of `F` exists.
pub(super) fn batch_offset<F, Args, R>(proof: F) -> i64
where
    F: TaskFn<Args, Output = R>,
    Args: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    const { assert!(size_of::<F>() == 0, "task functions must be zero-sized") };
    let _ = proof;
    let t: BatchFn = batch_trampoline::<F, Args, R>;
    (t as usize).wrapping_sub(anchor_addr()) as i64
}

/// The offset of the initializer trampoline for `F`; `proof` shows a value of `F` exists.
pub(super) fn init_offset<F, Args>(proof: F) -> i64
where
    F: TaskFn<Args>,
    F::Output: InitOutput,
    Args: DeserializeOwned + 'static,
{
    const { assert!(size_of::<F>() == 0, "task functions must be zero-sized") };
    let _ = proof;
    let t: InitFn = init_trampoline::<F, Args>;
    (t as usize).wrapping_sub(anchor_addr()) as i64
}

fn address(r: FnRef) -> usize {
    anchor_addr().wrapping_add(r.offset as usize)
}

/// Runs the batch trampoline `r` refers to on `input` (a postcard `Vec<Args>`).
///
/// # Errors
///
/// The trampoline's own batch-level error, or [`ItemErrorKind::Decode`] if `r` refers to
/// an initializer.
pub(crate) fn call_batch(
    _same: &SameImage,
    r: FnRef,
    input: &[u8],
    sink: &mut dyn ItemSink,
) -> Result<(), ItemError> {
    if r.kind != FnKind::Batch {
        return Err(ItemError::new(
            ItemErrorKind::Decode,
            "the function reference names an initializer, not a task",
        ));
    }
    // `_same` proves the parent that made `r` runs this executable image, where `r` was
    // measured from `anchor` to a `batch_trampoline` instance (kind checked above).
    // SAFETY: so the same distance from our `anchor` is that function, a `BatchFn`.
    let f = unsafe { std::mem::transmute::<usize, BatchFn>(address(r)) };
    match super::catch(|| f(input, sink)) {
        Ok(r) => r,
        Err(m) => Err(ItemError::new(ItemErrorKind::Panicked, m)),
    }
}

/// Runs the initializer trampoline `r` refers to on `input` (postcard `Args`).
///
/// # Errors
///
/// The failure message: the initializer panicked or returned an error, its arguments did
/// not decode, or `r` refers to a task function.
pub(crate) fn call_init(_same: &SameImage, r: FnRef, input: &[u8]) -> Result<(), String> {
    if r.kind != FnKind::Init {
        return Err("the initializer reference names a task function".to_owned());
    }
    // SAFETY: as in `call_batch`: same image (token), kind checked, so the address is an
    // `init_trampoline` instance with the `InitFn` signature.
    let f = unsafe { std::mem::transmute::<usize, InitFn>(address(r)) };
    match super::catch(|| f(input)) {
        Ok(r) => r,
        Err(m) => Err(format!("the initializer {m}")),
    }
}
