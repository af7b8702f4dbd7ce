//! One task's per-item results on their way from the decoder to whoever waits for them.

use crate::error::TaskError;

/// One task's per-item results, in item order: the values alone when every item succeeded
/// (the usual case: no `Result` per item, half the memory for small values, and nothing to
/// look at item by item on the way), or a result per item when some failed.
#[derive(Debug)]
pub(crate) enum Items<R> {
    /// Every item succeeded.
    Ok(Vec<R>),
    /// Some item failed (or the results came in pieces).
    Mixed(Vec<Result<R, TaskError>>),
}

impl<R> Items<R> {
    /// How many items.
    pub(crate) fn len(&self) -> usize {
        match self {
            Items::Ok(v) => v.len(),
            Items::Mixed(v) => v.len(),
        }
    }

    /// The last item's result (of a task of one item, its only one).
    pub(crate) fn into_last(self) -> Option<Result<R, TaskError>> {
        match self {
            Items::Ok(mut v) => v.pop().map(Ok),
            Items::Mixed(mut v) => v.pop(),
        }
    }

    /// A result per item.
    pub(crate) fn into_results(self) -> Vec<Result<R, TaskError>> {
        match self {
            Items::Ok(v) => v.into_iter().map(Ok).collect(),
            Items::Mixed(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TaskErrorKind;

    #[test]
    fn both_forms_give_a_result_per_item_in_order() {
        let ok: Items<u32> = Items::Ok(vec![1, 2]);
        assert_eq!(ok.len(), 2);
        assert_eq!(Items::Ok(vec![1u32, 2]).into_last(), Some(Ok(2)));
        assert_eq!(ok.into_results(), vec![Ok(1), Ok(2)]);
        let e = TaskError::new(TaskErrorKind::Panicked, "boom");
        let mixed: Items<u32> = Items::Mixed(vec![Ok(1), Err(e.clone())]);
        assert_eq!(mixed.len(), 2);
        assert_eq!(mixed.into_results(), vec![Ok(1), Err(e.clone())]);
        assert_eq!(
            Items::<u32>::Mixed(vec![Err(e.clone())]).into_last(),
            Some(Err(e))
        );
        assert_eq!(Items::<u32>::Ok(Vec::new()).into_last(), None);
    }
}
