//! Giving back the memory of hash tables that emptied.
//!
//! A hash table keeps the capacity of its peak: after a busy hour's calls end, the tables
//! sized for them would hold that memory for the life of the process, and a relay's resident
//! memory would not follow its load down (the soak, `scripts/soak.sh`, measures exactly
//! that). So the tables keyed by allocation, the shards' here and the control thread's in
//! `uturn-control`, shrink once they are under a quarter full. They run on commands and
//! allocation ends, never per packet. The
//! hysteresis (grow when full, shrink under a quarter, to half full) keeps a table whose
//! length swings around a size from being rebuilt back and forth.

use std::hash::{BuildHasher, Hash};

use hashbrown::{HashMap, HashSet};

/// Tables this small are not worth a rebuild.
const CAPACITY_FLOOR: usize = 64;

/// Whether a table of `len` entries in `capacity` slots should shrink.
fn is_sparse(len: usize, capacity: usize) -> bool {
    capacity > CAPACITY_FLOOR && len.saturating_mul(4) < capacity
}

/// Shrinks `map` to twice its length when it is under a quarter full.
pub fn shrink_map<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if is_sparse(map.len(), map.capacity()) {
        map.shrink_to(map.len().saturating_mul(2));
    }
}

/// Shrinks `set` to twice its length when it is under a quarter full.
pub fn shrink_set<T: Eq + Hash, S: BuildHasher>(set: &mut HashSet<T, S>) {
    if is_sparse(set.len(), set.capacity()) {
        set.shrink_to(set.len().saturating_mul(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_table_gives_its_capacity_back() {
        let mut map: HashMap<u32, [u8; 64]> = HashMap::new();
        for i in 0..10_000 {
            map.insert(i, [0; 64]);
        }
        let peak = map.capacity();
        for i in 0..10_000 {
            map.remove(&i);
            shrink_map(&mut map);
        }
        assert!(
            map.capacity() <= CAPACITY_FLOOR,
            "{} of {peak}",
            map.capacity()
        );
    }

    #[test]
    fn a_table_under_a_quarter_full_shrinks_to_about_half_full() {
        let mut set: HashSet<u32> = HashSet::new();
        for i in 0..4_000 {
            set.insert(i);
        }
        let peak = set.capacity();
        set.retain(|i| *i < 500);
        shrink_set(&mut set);
        assert!(set.capacity() < peak / 2, "{} of {peak}", set.capacity());
        assert!(
            set.capacity() >= 1_000,
            "room left for growth: {}",
            set.capacity()
        );
        assert!((0..500).all(|i| set.contains(&i)));
    }

    #[test]
    fn a_table_over_a_quarter_full_keeps_its_capacity() {
        let mut map: HashMap<u32, ()> = HashMap::new();
        for i in 0..1_000 {
            map.insert(i, ());
        }
        let peak = map.capacity();
        let quarter = u32::try_from(peak / 4).unwrap_or(u32::MAX);
        map.retain(|i, ()| *i <= quarter);
        // (Removals leave tombstones, which `capacity` does not count: compare before/after.)
        let before = map.capacity();
        shrink_map(&mut map);
        assert_eq!(map.capacity(), before, "peak {peak}");
    }
}
