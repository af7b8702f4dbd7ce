//! [`Task`]: what the submission methods accept, in one bound.

use pool_spawn::protocol::{self, RunItems};
use pool_spawn::task::{self, FnRef, TaskFn};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A function the pool can run on `Args`: a [`TaskFn`] (a plain `fn` item or a closure
/// that captures nothing) whose arguments and result are serde types.
///
/// Implemented for every `F: TaskFn<Args>` with `Args: Serialize + DeserializeOwned +
/// 'static` and `F::Output: Serialize + DeserializeOwned + Send + 'static`; it cannot be
/// implemented otherwise. `Args` is a tuple: `(A,)` for the items of
/// [`map`](crate::Pool::map), the whole argument list for [`apply`](crate::Pool::apply) and
/// [`starmap`](crate::Pool::starmap).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot run as a pool task taking `{Args}`",
    note = "a task is a fn item or a closure that captures nothing; its arguments must be \
            `Serialize + DeserializeOwned + 'static` and its result also `Send`"
)]
pub trait Task<Args>: sealed::Sealed<Args> {
    /// What the function returns: the task's result.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

impl<F, Args> Task<Args> for F
where
    F: TaskFn<Args>,
    Args: Serialize + DeserializeOwned + 'static,
    F::Output: Serialize + DeserializeOwned + Send + 'static,
{
    type Output = F::Output;
}

mod sealed {
    use super::*;

    /// What the pool does with a task's type, where the bounds on `Args` are known.
    pub trait Sealed<Args> {
        /// The batch trampoline the worker calls.
        fn batch_ref(self) -> FnRef;
        /// `items` as the Run message of batch `id`, calling `func`; `timed` if each item
        /// has a time limit.
        fn encode_run(id: u64, func: FnRef, timed: bool, items: &[Args]) -> RunItems;
        /// See `chunk::take_tail`.
        fn take_tail(items: &mut Vec<Args>) -> Option<Vec<u8>>;
        /// See `chunk::may_have_tail`.
        fn may_have_tail() -> bool;
        /// The function's Rust path, for errors.
        fn name() -> &'static str;
    }

    impl<F, Args> Sealed<Args> for F
    where
        F: TaskFn<Args>,
        Args: Serialize + DeserializeOwned + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
    {
        fn batch_ref(self) -> FnRef {
            task::batch_ref::<F, Args, F::Output>(self)
        }

        fn encode_run(id: u64, func: FnRef, timed: bool, items: &[Args]) -> RunItems {
            protocol::encode_run_items(id, func, timed, items)
        }

        fn take_tail(items: &mut Vec<Args>) -> Option<Vec<u8>> {
            crate::chunk::take_tail(items)
        }

        fn may_have_tail() -> bool {
            crate::chunk::may_have_tail::<Args>()
        }

        fn name() -> &'static str {
            std::any::type_name::<F>()
        }
    }
}
