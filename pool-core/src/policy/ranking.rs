//! The workers that may be handed a task, ranked by the choice rule: fewest tasks in hand,
//! ready before starting, the lowest id among equals.
//!
//! A worker's key moves by one task at a time, twice for every task (handed out, then
//! answered). A few workers (the usual pool) are kept in a short sorted vector, where a
//! key that moves by one moves a place or two at most (none, usually). Many are kept in
//! [`Levels`]: one bit set per `(tasks in hand, not ready)`, over the workers' places in
//! id order, so that a move clears one bit and sets another whatever the number of
//! workers. (A B-tree removed and inserted an entry for every move: a tenth of the
//! driver's time per task in a map of tiny tasks on two workers, and half the policy's
//! time per task with 256.)

use super::WorkerId;

/// A worker's place in the ranking: `(tasks in hand, not ready, id)`, least first.
pub(super) type Key = (usize, bool, WorkerId);

/// Up to this many workers are ranked in the sorted vector; past it, in [`Levels`] (and
/// back in the vector once they are half as many).
const SMALL: usize = 8;

/// See the module's documentation.
#[derive(Debug, Default)]
pub(super) struct Ranking {
    /// Sorted; in use while `large` is empty.
    small: Vec<Key>,
    large: Levels,
}

impl Ranking {
    /// The worker ranked first, if any.
    pub(super) fn first(&self) -> Option<Key> {
        if self.large.is_empty() {
            self.small.first().copied()
        } else {
            self.large.first()
        }
    }

    /// Moves worker `wid` from `old` (`(tasks in hand, not ready)`, or not ranked: `None`)
    /// to `new` (or takes it out: `None`). `place` is where the worker was found last time
    /// (a hint kept with the worker, any value at first), updated here.
    pub(super) fn set(
        &mut self,
        wid: WorkerId,
        place: &mut usize,
        old: Option<(usize, bool)>,
        new: Option<(usize, bool)>,
    ) {
        let old = old.map(|(n, s)| (n, s, wid));
        let new = new.map(|(n, s)| (n, s, wid));
        if !self.large.is_empty() {
            let (old, new) = (old.map(|(n, s, _)| (n, s)), new.map(|(n, s, _)| (n, s)));
            *place = self.large.set(wid, *place, old, new);
            if self.large.len() <= SMALL / 2 {
                self.small = self.large.keys();
                self.large = Levels::default();
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
                for (n, s, w) in self.small.drain(..) {
                    self.large.set(w, usize::MAX, None, Some((n, s)));
                }
                *place = self.large.set(wid, usize::MAX, None, Some((k.0, k.1)));
            }
            (None, None) => {}
        }
    }

    /// Every ranked key, in order (checks).
    #[cfg(any(test, debug_assertions))]
    pub(super) fn keys(&self) -> Vec<Key> {
        if self.large.is_empty() {
            self.small.clone()
        } else {
            self.large.keys()
        }
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

/// Many workers' keys: each worker has a place, and the places are in id order; each level
/// (`2 * tasks in hand + not ready`) has a bit set over the places. The first key is the
/// lowest place in the lowest level that has any.
///
/// A worker's place is kept after it leaves the ranking (a tombstone), so that the places
/// stay in id order when it comes back; new workers have the highest ids so far and take a
/// place at the end. When tombstones outnumber the ranked workers, or a worker older than
/// the last comes back after its tombstone went, the places are rebuilt.
#[derive(Debug, Default)]
struct Levels {
    /// The worker at each place, ascending.
    ids: Vec<WorkerId>,
    /// Each place's level, or `None` for a tombstone.
    level: Vec<Option<usize>>,
    /// Per level: the places in it (bit `p % 64` of word `p / 64`) and how many they are.
    sets: Vec<(Vec<u64>, usize)>,
    /// Workers ranked.
    len: usize,
}

impl Levels {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn first(&self) -> Option<Key> {
        let (lv, (words, _)) = self.sets.iter().enumerate().find(|(_, (_, n))| *n > 0)?;
        let (w, word) = words.iter().enumerate().find(|(_, w)| **w != 0)?;
        let place = w * 64 + word.trailing_zeros() as usize;
        Some((lv / 2, lv % 2 == 1, self.ids[place]))
    }

    /// Every key, in order.
    fn keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = (self.ids.iter().zip(&self.level))
            .filter_map(|(&w, lv)| lv.map(|lv| (lv / 2, lv % 2 == 1, w)))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Moves worker `wid` from `old` to `new` (`(tasks in hand, not ready)`; `None`: not
    /// ranked) and returns its place; `hint` is where it was last time (a place moves only
    /// when the places are rebuilt, so the search is rare).
    fn set(
        &mut self,
        wid: WorkerId,
        hint: usize,
        old: Option<(usize, bool)>,
        new: Option<(usize, bool)>,
    ) -> usize {
        let level = |(n, s): (usize, bool)| 2 * n + usize::from(s);
        let found = match self.ids.get(hint) {
            Some(&w) if w == wid => Ok(hint),
            _ => self.ids.binary_search(&wid),
        };
        let place = match found {
            Ok(p) => p,
            Err(_) if new.is_none() => return usize::MAX,
            Err(p) if p == self.ids.len() => {
                self.ids.push(wid);
                self.level.push(None);
                p
            }
            Err(p) => {
                // An older worker back after its tombstone went: rebuild with it in place.
                self.ids.insert(p, wid);
                self.level.insert(p, None);
                self.rebuild();
                p
            }
        };
        debug_assert_eq!(
            self.level[place],
            old.map(level),
            "worker {wid} ranked elsewhere"
        );
        if let Some(lv) = self.level[place].take() {
            self.flip(lv, place, false);
            self.len -= 1;
        }
        if let Some(lv) = new.map(level) {
            self.flip(lv, place, true);
            self.level[place] = Some(lv);
            self.len += 1;
        } else if self.ids.len() > 2 * self.len + 64 {
            self.compact();
        }
        place
    }

    /// Sets or clears `place`'s bit in level `lv`.
    fn flip(&mut self, lv: usize, place: usize, on: bool) {
        if self.sets.len() <= lv {
            self.sets.resize_with(lv + 1, Default::default);
        }
        let (words, n) = &mut self.sets[lv];
        let (w, bit) = (place / 64, 1u64 << (place % 64));
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        debug_assert_eq!(words[w] & bit != 0, !on);
        if on {
            words[w] |= bit;
            *n += 1;
        } else {
            words[w] &= !bit;
            *n -= 1;
        }
    }

    /// Drops the tombstones and rebuilds the sets.
    fn compact(&mut self) {
        let mut keep = self.level.iter().map(Option::is_some);
        self.ids
            .retain(|_| keep.next().expect("as many levels as ids"));
        self.level.retain(Option::is_some);
        self.rebuild();
    }

    /// Rebuilds the sets from `level`.
    fn rebuild(&mut self) {
        self.sets.iter_mut().for_each(|(words, n)| {
            words.clear();
            *n = 0;
        });
        for place in 0..self.level.len() {
            if let Some(lv) = self.level[place] {
                self.flip(lv, place, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::ids::IdMap;

    use super::*;

    /// Random changes of the keys of a few workers or many (across the switch between the
    /// vector and the B-tree): the ranking holds exactly a sorted set's keys, in order.
    #[test]
    fn ranks_as_a_sorted_set() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |m: u64| crate::rng::xorshift(&mut rng) % m;
        for workers in [1u64, 2, 3, 7, 8, 9, 12, 64, 300] {
            let mut r = Ranking::default();
            let mut set = BTreeSet::new();
            let mut keys: IdMap<(usize, bool)> = IdMap::default();
            let mut places: IdMap<usize> = IdMap::default();
            for _ in 0..(if workers > 64 { 20_000 } else { 5000 }) {
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
                r.set(wid, places.entry(wid).or_default(), old, new);
                assert_eq!(r.first(), set.first().copied());
                assert!(r.keys().iter().eq(set.iter()));
            }
        }
    }

    /// Workers replaced one by one, as with `max_tasks_per_child`, among 20 ranked: the
    /// order stays a sorted set's, and the places of the workers gone are dropped (the
    /// places stay within twice the ranked workers, plus 64) without reordering the rest;
    /// a worker that left long ago can still come back in its place.
    #[test]
    fn replaced_workers_leave_no_places_behind() {
        let mut r = Ranking::default();
        let mut set = BTreeSet::new();
        let mut live: std::collections::VecDeque<(WorkerId, (usize, bool))> =
            (0..20).map(|w| (w, (w as usize % 3, w % 2 == 0))).collect();
        for &(w, k) in &live {
            r.set(w, &mut 0, None, Some(k));
            set.insert((k.0, k.1, w));
        }
        for next in 20..5000u64 {
            let (old, k) = live.pop_front().expect("20 live");
            r.set(old, &mut 0, Some(k), None);
            set.remove(&(k.0, k.1, old));
            let k = (next as usize % 4, next % 3 == 0);
            r.set(next, &mut 0, None, Some(k));
            set.insert((k.0, k.1, next));
            live.push_back((next, k));
            if next % 1000 == 0 {
                // Worker 5, long gone, comes back and leaves again.
                r.set(5, &mut 0, None, Some((0, false)));
                assert_eq!(r.first(), Some((0, false, 5)));
                r.set(5, &mut 0, Some((0, false)), None);
            }
            assert_eq!(r.first(), set.first().copied());
            assert!(r.keys().iter().eq(set.iter()));
            assert!(
                r.large.ids.len() <= 2 * 20 + 64 + 1,
                "{} places",
                r.large.ids.len()
            );
        }
    }
}
