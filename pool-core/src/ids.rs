//! Maps and sets keyed by task id, with a hash made for them.
//!
//! Task ids come from one counter, so the ids alive at once are mostly a run of consecutive
//! numbers, taken and dropped roughly in order. The hash keeps an id's low bits as they
//! are, so consecutive ids land in neighbouring buckets (the oldest tasks, which dispatch
//! and completion touch, share cache lines instead of each costing a miss), and mixes the
//! id into the top bits, which the table compares before the key: ids that share a bucket
//! are told apart without reading their entries. Ids far apart that share their low bits
//! only collide into a short probe; nothing depends on the hash for correctness.

use std::collections::{HashMap, HashSet};
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
