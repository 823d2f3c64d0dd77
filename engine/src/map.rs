//! A hash map keyed by allocation (or 5-tuple, token) that gives back the memory of its peak.
//!
//! A hash table keeps the capacity of its peak: after a busy hour's calls end, the engine's
//! tables sized for them would hold that memory for the life of the process, and the relay's
//! resident memory would not follow its load down. [`ShrinkingMap`] shrinks itself on removal
//! once it is under a quarter full, to twice its length; the hysteresis (grow when full, shrink
//! under a quarter, to half full) keeps a table whose length swings around a size from being
//! rebuilt back and forth. Removals happen on requests and expiries, never per packet.

use std::borrow::Borrow;
use std::hash::Hash;

use hashbrown::HashMap;

/// Tables this small are not worth a rebuild.
const CAPACITY_FLOOR: usize = 64;

/// A [`HashMap`] whose removals shrink it when it has become sparse.
#[derive(Debug, Clone)]
pub(crate) struct ShrinkingMap<K, V> {
    map: HashMap<K, V>,
}

impl<K, V> Default for ShrinkingMap<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash, V> ShrinkingMap<K, V> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(key)
    }

    pub(crate) fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.map.get_mut(key)
    }

    pub(crate) fn contains_key<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.map.contains_key(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.map.insert(key, value)
    }

    /// Removes `key`, then shrinks the table if it is under a quarter full.
    pub(crate) fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let removed = self.map.remove(key);
        if removed.is_some()
            && self.map.capacity() > CAPACITY_FLOOR
            && self.map.len().saturating_mul(4) < self.map.capacity()
        {
            self.map.shrink_to(self.map.len().saturating_mul(2));
        }
        removed
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.map.capacity()
    }
}

impl<'a, K, V> IntoIterator for &'a ShrinkingMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = hashbrown::hash_map::Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_map_gives_its_capacity_back() {
        let mut map: ShrinkingMap<u32, [u8; 64]> = ShrinkingMap::new();
        for i in 0..10_000 {
            map.insert(i, [0; 64]);
        }
        let peak = map.capacity();
        for i in 0..10_000 {
            map.remove(&i);
        }
        assert!(
            map.capacity() <= CAPACITY_FLOOR,
            "{} of {peak}",
            map.capacity()
        );
    }

    #[test]
    fn the_entries_left_survive_the_shrinking() {
        let mut map: ShrinkingMap<u32, u32> = ShrinkingMap::new();
        for i in 0..10_000 {
            map.insert(i, i * 2);
        }
        for i in 10..10_000 {
            assert_eq!(map.remove(&i), Some(i * 2));
        }
        assert_eq!(map.len(), 10);
        assert!((0..10).all(|i| map.get(&i) == Some(&(i * 2))));
        assert_eq!(map.remove(&10), None);
    }
}
