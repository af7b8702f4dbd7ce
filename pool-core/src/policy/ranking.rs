//! The workers that may be handed a task, ranked by the choice rule: fewest tasks in hand,
//! ready before starting, the lowest id among equals.
//!
//! A worker's key moves by one task at a time, twice for every task (handed out, then
//! answered). A few workers (the usual pool) are kept in a short sorted vector, where a
//! key that moves by one moves a place or two at most (none, usually); many, in a B-tree,
//! whose cost grows slowly with their number. A B-tree alone removed and inserted an entry
//! each time: a tenth of the driver's time per task in a map of tiny tasks on two workers.

use std::collections::BTreeSet;

use super::WorkerId;

/// A worker's place in the ranking: `(tasks in hand, not ready, id)`, least first.
pub(super) type Key = (usize, bool, WorkerId);

/// Up to this many workers are ranked in the sorted vector; past it, in the B-tree (and
/// back in the vector once they are half as many).
const SMALL: usize = 8;

/// See the module's documentation.
#[derive(Debug, Default)]
pub(super) struct Ranking {
    /// Sorted; in use while `large` is empty.
    small: Vec<Key>,
    large: BTreeSet<Key>,
}

impl Ranking {
    /// The worker ranked first, if any.
    pub(super) fn first(&self) -> Option<&Key> {
        if self.large.is_empty() {
            self.small.first()
        } else {
            self.large.first()
        }
    }

    /// Moves worker `wid` from `old` (`(tasks in hand, not ready)`, or not ranked: `None`)
    /// to `new` (or takes it out: `None`).
    pub(super) fn set(
        &mut self,
        wid: WorkerId,
        old: Option<(usize, bool)>,
        new: Option<(usize, bool)>,
    ) {
        let old = old.map(|(n, s)| (n, s, wid));
        let new = new.map(|(n, s)| (n, s, wid));
        if !self.large.is_empty() {
            if let Some(k) = old {
                self.large.remove(&k);
            }
            if let Some(k) = new {
                self.large.insert(k);
            }
            if self.large.len() <= SMALL / 2 {
                self.small.extend(std::mem::take(&mut self.large));
            }
            return;
        }
        let at = old.and_then(|k| self.small.iter().position(|&e| e == k));
        match (at, new) {
            (Some(i), Some(k)) => {
                self.small[i] = k;
                self.place(i);
            }
            (Some(i), None) => {
                self.small.remove(i);
            }
            (None, Some(k)) if self.small.len() < SMALL => {
                self.small.push(k);
                self.place(self.small.len() - 1);
            }
            (None, Some(k)) => {
                self.large.extend(self.small.drain(..));
                self.large.insert(k);
            }
            (None, None) => {}
        }
    }

    /// Every ranked key, in order (checks).
    #[cfg(debug_assertions)]
    pub(super) fn keys(&self) -> impl Iterator<Item = &Key> {
        self.small.iter().chain(&self.large)
    }

    /// Moves the entry at `i` of the sorted vector, changed, to its place.
    fn place(&mut self, mut i: usize) {
        let v = &mut self.small;
        while i > 0 && v[i] < v[i - 1] {
            v.swap(i, i - 1);
            i -= 1;
        }
        while i + 1 < v.len() && v[i] > v[i + 1] {
            v.swap(i, i + 1);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ids::IdMap;

    use super::*;

    /// Random changes of the keys of a few workers or many (across the switch between the
    /// vector and the B-tree): the ranking holds exactly a sorted set's keys, in order.
    #[test]
    fn ranks_as_a_sorted_set() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        for workers in [1u64, 2, 3, 7, 8, 9, 12, 64] {
            let mut r = Ranking::default();
            let mut set = BTreeSet::new();
            let mut keys: IdMap<(usize, bool)> = IdMap::default();
            for _ in 0..5000 {
                let wid = next(workers);
                let new = match next(5) {
                    0 => None,
                    1 => Some((next(5) as usize, next(2) == 0)),
                    _ => {
                        // A step of one, as tasks are handed out and answered.
                        let (n, s) = keys.get(&wid).copied().unwrap_or((2, false));
                        Some(if next(2) == 0 {
                            (n + 1, s)
                        } else {
                            (n.saturating_sub(1), s)
                        })
                    }
                };
                let old = keys.remove(&wid);
                if let Some((n, s)) = old {
                    set.remove(&(n, s, wid));
                }
                if let Some((n, s)) = new {
                    keys.insert(wid, (n, s));
                    set.insert((n, s, wid));
                }
                r.set(wid, old, new);
                assert_eq!(r.first(), set.first());
                assert!(r.keys().eq(set.iter()));
            }
        }
    }
}
