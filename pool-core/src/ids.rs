//! Maps and sets keyed by task id, with a hash made for them, and the task table.
//!
//! Task ids come from one counter, so the ids alive at once are mostly a run of consecutive
//! numbers, taken and dropped roughly in order. The hash keeps an id's low bits as they
//! are, so consecutive ids land in neighbouring buckets (the oldest tasks, which dispatch
//! and completion touch, share cache lines instead of each costing a miss), and mixes the
//! id into the top bits, which the table compares before the key: ids that share a bucket
//! are told apart without reading their entries. Ids far apart that share their low bits
//! only collide into a short probe; nothing depends on the hash for correctness.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// The hash of one task id (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

/// The bits the table compares before the key.
const TOP: u64 = 0xFE00_0000_0000_0000;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let id = self.0;
        (id & !TOP) | (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) & TOP)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only ids are hashed; any other key still hashes, just not as well.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id;
    }
}

/// A map keyed by task id.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
/// A set of task ids.
pub(crate) type IdSet = HashSet<u64, BuildHasherDefault<IdHasher>>;

/// Slots a window may span beyond four per entry it holds before its oldest entries move
/// to the side map.
const SPAN_SLACK: u64 = 256;

/// A map keyed by task id, for the records of the tasks alive at once: a window of slots,
/// one per id from `base` on, holds the run of recent ids (an entry is found by a
/// subtraction, a new one lands in the slot after the last, and the window's memory is
/// reused in turn as the oldest ids go); a small hash map beside it holds the stragglers.
///
/// Whatever the ids, it behaves as a map. A new id never stretches the window past four
/// slots per entry it holds plus [`SPAN_SLACK`]: when it would, the oldest entries move to
/// the side map first (one long task among millions of brief ones costs one side
/// entry, not millions of empty slots). An id below `base` (one that arrives late, or
/// after the window moved past it) goes to the side map.
#[derive(Debug)]
pub(crate) struct IdTable<V> {
    /// The id of `window[0]`. It never decreases, and every id in `side` is below it.
    base: u64,
    /// One slot per id from `base` on; empty, or its first slot full.
    window: VecDeque<Option<V>>,
    /// Full slots in `window`.
    held: usize,
    side: IdMap<V>,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        IdTable {
            base: 0,
            window: VecDeque::new(),
            held: 0,
            side: IdMap::default(),
        }
    }
}

impl<V> IdTable<V> {
    /// The slot of `id` in the window, if the window spans it.
    fn slot(&self, id: u64) -> Option<usize> {
        let at = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (at < self.window.len()).then_some(at)
    }

    pub(crate) fn get(&self, id: &u64) -> Option<&V> {
        match self.slot(*id) {
            Some(at) => self.window[at].as_ref(),
            None if *id < self.base && !self.side.is_empty() => self.side.get(id),
            None => None,
        }
    }

    pub(crate) fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        match self.slot(*id) {
            Some(at) => self.window[at].as_mut(),
            None if *id < self.base && !self.side.is_empty() => self.side.get_mut(id),
            None => None,
        }
    }

    pub(crate) fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Inserts `value` under `id`, giving back the value it held before.
    pub(crate) fn insert(&mut self, id: u64, value: V) -> Option<V> {
        if id < self.base {
            return self.side.insert(id, value);
        }
        if let Some(at) = self.slot(id) {
            let previous = self.window[at].replace(value);
            if previous.is_none() {
                self.held += 1;
            }
            return previous;
        }
        // Past the window's end: keep the span bounded, then extend it.
        while !self.window.is_empty() && id - self.base >= 4 * self.held as u64 + SPAN_SLACK {
            if let Some(oldest) = self.window.pop_front().flatten() {
                self.side.insert(self.base, oldest);
                self.held -= 1;
            }
            self.base += 1;
            self.trim();
        }
        if self.window.is_empty() {
            self.base = id;
        }
        // Bounded by the loop above (or zero).
        let at = usize::try_from(id - self.base).expect("span bounded");
        if at > self.window.len() {
            self.window.resize_with(at, || None);
        }
        self.window.push_back(Some(value));
        self.held += 1;
        None
    }

    pub(crate) fn remove(&mut self, id: &u64) -> Option<V> {
        match self.slot(*id) {
            Some(at) => {
                // Taken straight into the answer: an entry is large, each move a copy.
                let value = self.window[at].take();
                if value.is_some() {
                    self.held -= 1;
                    if at == 0 {
                        self.trim();
                    }
                }
                value
            }
            None if *id < self.base && !self.side.is_empty() => self.side.remove(id),
            None => None,
        }
    }

    /// Drops the empty slots at the window's front (in place: popped one by one, each
    /// slot, the size of a whole entry, would be copied out first).
    fn trim(&mut self) {
        let empty = self.window.iter().take_while(|s| s.is_none()).count();
        if empty > 0 {
            self.window.drain(..empty);
            self.base += empty as u64;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.held + self.side.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids held, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.base;
        (base..)
            .zip(&self.window)
            .filter_map(|(id, slot)| slot.as_ref().map(|_| id))
            .chain(self.side.keys().copied())
    }

    /// Makes room for `n` more entries of consecutive ids.
    pub(crate) fn reserve(&mut self, n: usize) {
        self.window.reserve(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn consecutive_ids_stay_apart_and_found() {
        let mut m: IdMap<u64> = IdMap::default();
        for id in 0..10_000u64 {
            m.insert(id, id * 2);
        }
        for id in (0..10_000u64).step_by(2) {
            assert_eq!(m.remove(&id), Some(id * 2));
        }
        for id in 0..10_000u64 {
            assert_eq!(m.get(&id).copied(), (id % 2 == 1).then_some(id * 2));
        }
        // Ids a power of two apart share their low bits: still found.
        let mut s = IdSet::default();
        for k in 0..2_000u64 {
            s.insert(k << 20);
        }
        assert!((0..2_000u64).all(|k| s.contains(&(k << 20))));
    }

    /// One long task among a million brief ones: its entry moves aside and the window
    /// stays a few hundred slots, instead of spanning every id since.
    #[test]
    fn one_old_id_keeps_the_table_small() {
        let mut t: IdTable<u64> = IdTable::default();
        t.insert(7, 7);
        for id in 10..1_000_010u64 {
            assert_eq!(t.insert(id, id), None);
            if id % 3 == 0 {
                // A few at a time, as a worker's answers come.
                assert_eq!(t.remove(&(id - 2)), Some(id - 2));
                assert_eq!(t.remove(&id), Some(id));
                assert_eq!(t.remove(&(id - 1)), Some(id - 1));
            }
        }
        assert!(
            t.window.capacity() <= 2 * SPAN_SLACK as usize,
            "window grew to {} slots",
            t.window.capacity()
        );
        assert_eq!(t.side.len(), 1);
        assert_eq!(t.get(&7), Some(&7));
        let mut left: Vec<u64> = t.keys().collect();
        left.sort_unstable();
        assert_eq!(left, [7, 1_000_009]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Inserts the id this far past the highest yet.
        Next(u64),
        /// Inserts an id up to this far below the highest yet (late, or handed back).
        Old(u64),
        /// Removes the live id this far from the oldest (near order).
        RemoveNear(usize),
        /// Removes a live id picked by this index among all of them.
        RemoveAny(usize),
        /// Looks up (and changes) an id this far below the highest yet.
        Get(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1u64..3).prop_map(Op::Next),
            1 => (3u64..2_000).prop_map(Op::Next),
            1 => (0u64..600).prop_map(Op::Old),
            6 => (0usize..3).prop_map(Op::RemoveNear),
            2 => any::<usize>().prop_map(Op::RemoveAny),
            3 => (0u64..600).prop_map(Op::Get),
        ]
    }

    proptest! {
        /// The table answers every insert, remove and lookup as a hash map does, and its
        /// window stays within its bound.
        #[test]
        fn table_acts_as_a_map(start in 0u64..1 << 40, ops in prop::collection::vec(op(), 1..600)) {
            let mut t: IdTable<u64> = IdTable::default();
            let mut model: HashMap<u64, u64> = HashMap::new();
            let mut top = start;
            for (n, op) in ops.into_iter().enumerate() {
                let value = n as u64;
                match op {
                    Op::Next(d) => {
                        top += d;
                        prop_assert_eq!(t.insert(top, value), model.insert(top, value));
                        // Stretched only within its bound.
                        prop_assert!(t.window.len() as u64 <= 4 * t.held as u64 + SPAN_SLACK);
                    }
                    Op::Old(d) => {
                        let id = top.saturating_sub(d);
                        prop_assert_eq!(t.insert(id, value), model.insert(id, value));
                    }
                    Op::RemoveNear(k) | Op::RemoveAny(k) => {
                        let mut live: Vec<u64> = model.keys().copied().collect();
                        live.sort_unstable();
                        if live.is_empty() {
                            prop_assert_eq!(t.remove(&top), None);
                            continue;
                        }
                        let id = if matches!(op, Op::RemoveNear(_)) {
                            live[k.min(live.len() - 1)]
                        } else {
                            live[k % live.len()]
                        };
                        prop_assert_eq!(t.remove(&id), model.remove(&id));
                        prop_assert_eq!(t.remove(&id), None);
                    }
                    Op::Get(d) => {
                        let id = top.saturating_sub(d);
                        prop_assert_eq!(t.get(&id), model.get(&id));
                        prop_assert_eq!(t.contains_key(&id), model.contains_key(&id));
                        if let Some(v) = t.get_mut(&id) {
                            *v += 1_000_000;
                            *model.get_mut(&id).unwrap() += 1_000_000;
                        }
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                prop_assert_eq!(t.is_empty(), model.is_empty());
                prop_assert!(t.window.front().is_none_or(Option::is_some));
                prop_assert!(t.side.keys().all(|&id| id < t.base));
            }
            let mut keys: Vec<u64> = t.keys().collect();
            keys.sort_unstable();
            let mut want: Vec<u64> = model.keys().copied().collect();
            want.sort_unstable();
            prop_assert_eq!(&keys, &want);
            t.reserve(100);
            for id in want {
                prop_assert_eq!(t.remove(&id), model.remove(&id));
            }
            prop_assert!(t.is_empty());
            prop_assert!(t.window.is_empty());
        }
    }
}
