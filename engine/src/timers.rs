//! Deadlines ordered in a `BTreeMap`, so the earliest is found in O(log n) and a refresh moves
//! one entry. Something is due when its deadline is `<= now`: it exists until the instant
//! before its deadline and is gone at the deadline.

use std::collections::BTreeMap;
use std::time::Instant;

/// The handle of a scheduled deadline; unique because of its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TimerKey {
    deadline: Instant,
    sequence: u64,
}

impl TimerKey {
    pub(crate) fn deadline(self) -> Instant {
        self.deadline
    }
}

/// A set of deadlines, each carrying what expires.
#[derive(Debug)]
pub(crate) struct Timers<T> {
    entries: BTreeMap<TimerKey, T>,
    sequence: u64,
}

impl<T> Timers<T> {
    pub(crate) fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
            sequence: 0,
        }
    }

    pub(crate) fn schedule(&mut self, deadline: Instant, what: T) -> TimerKey {
        self.sequence += 1;
        let key = TimerKey {
            deadline,
            sequence: self.sequence,
        };
        self.entries.insert(key, what);
        key
    }

    pub(crate) fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.entries.remove(&key)
    }

    /// Moves an entry to a new deadline and returns its new key.
    pub(crate) fn reschedule(&mut self, key: TimerKey, deadline: Instant) -> Option<TimerKey> {
        let what = self.entries.remove(&key)?;
        Some(self.schedule(deadline, what))
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.entries.first_key_value().map(|(key, _)| key.deadline)
    }

    /// Removes and returns the earliest entry whose deadline is `<= now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(TimerKey, T)> {
        let (key, _) = self.entries.first_key_value()?;
        if key.deadline <= now {
            self.entries.pop_first()
        } else {
            None
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn contains(&self, key: TimerKey) -> bool {
        self.entries.contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_entry_is_due_at_its_deadline_and_not_one_nanosecond_before() {
        let base = Instant::now();
        let mut timers = Timers::new();
        let deadline = base + Duration::from_secs(5);
        timers.schedule(deadline, "a");
        assert_eq!(timers.next_deadline(), Some(deadline));
        assert!(timers.pop_due(deadline - Duration::from_nanos(1)).is_none());
        assert_eq!(timers.pop_due(deadline).map(|(_, what)| what), Some("a"));
        assert!(timers.pop_due(deadline).is_none());
    }

    #[test]
    fn rescheduling_moves_the_entry_and_cancel_removes_it() {
        let base = Instant::now();
        let mut timers = Timers::new();
        let key = timers.schedule(base + Duration::from_secs(1), 1);
        let other = timers.schedule(base + Duration::from_secs(2), 2);
        let moved = timers
            .reschedule(key, base + Duration::from_secs(3))
            .unwrap();
        assert_eq!(timers.next_deadline(), Some(base + Duration::from_secs(2)));
        assert_eq!(timers.cancel(other), Some(2));
        assert_eq!(timers.next_deadline(), Some(moved.deadline()));
        assert_eq!(timers.len(), 1);
        assert!(timers.contains(moved));
    }
}
