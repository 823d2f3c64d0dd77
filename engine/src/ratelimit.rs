//! Token buckets in a fixed-size table, for per-source and per-user rate limits.
//!
//! A spoofed-source flood must not grow memory, and must not reset the budget of the address
//! it reflects at: the table has a fixed number of slots, allocated once, and a key that
//! hashes to a busy slot owned by another key *shares* that slot's bucket instead of evicting
//! it. A slot changes owner only once its bucket is full again (its owner went quiet for
//! `burst / rate` seconds). So the victim of a reflection attack keeps its bucket however many
//! other sources the attacker spoofs, and an innocent source sharing a slot with a flooding
//! one is at worst limited with it, never the other way round. The hash is keyed with a
//! secret from the engine's RNG, so an attacker cannot aim at a slot.
//!
//! Time is the engine's explicit `now`; nothing here reads the clock.

use std::net::IpAddr;
use std::time::Instant;

/// Budget units per token: the bucket counts in thousandths so rates below one per second
/// refill smoothly.
const MILLI: u64 = 1000;

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    /// Tokens × [`MILLI`].
    tokens: u64,
    last: Instant,
}

/// A fixed table of token buckets keyed by a 64-bit key (see the module doc).
#[derive(Debug)]
pub(crate) struct RateTable {
    slots: Box<[Option<Slot>]>,
    secret: u64,
    /// Tokens per second × [`MILLI`]; 0 disables the limit.
    rate: u64,
    /// Bucket capacity × [`MILLI`].
    burst: u64,
}

impl RateTable {
    /// `rate_per_sec` tokens per second (0: unlimited), `burst` tokens at most, `slots`
    /// buckets (rounded up to a power of two).
    pub(crate) fn new(rate_per_sec: u32, burst: u32, slots: usize, secret: u64) -> Self {
        let slots = if rate_per_sec == 0 {
            0
        } else {
            slots.max(1).next_power_of_two()
        };
        Self {
            slots: vec![None; slots].into_boxed_slice(),
            secret,
            rate: u64::from(rate_per_sec) * MILLI,
            burst: u64::from(burst.max(1)) * MILLI,
        }
    }

    /// Whether the table limits anything.
    pub(crate) fn enabled(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Takes one token for `key`; false when its bucket is empty (the caller drops).
    pub(crate) fn take(&mut self, key: u64, now: Instant) -> bool {
        self.with_slot(key, now, |tokens| {
            if *tokens >= MILLI {
                *tokens -= MILLI;
                true
            } else {
                false
            }
        })
    }

    /// Whether `key` has a token left, without taking it.
    pub(crate) fn has_token(&mut self, key: u64, now: Instant) -> bool {
        self.with_slot(key, now, |tokens| *tokens >= MILLI)
    }

    fn with_slot(&mut self, key: u64, now: Instant, f: impl FnOnce(&mut u64) -> bool) -> bool {
        if !self.enabled() {
            return true;
        }
        let hashed = mix(key ^ self.secret);
        // The mask keeps the index below the table length, a power of two.
        let index = usize::try_from(hashed).unwrap_or(usize::MAX) & (self.slots.len() - 1);
        let (rate, burst) = (self.rate, self.burst);
        let slot = self.slots[index].get_or_insert(Slot {
            key,
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(slot.last);
        let refill = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_mul(rate)
            / 1_000_000;
        if refill > 0 {
            slot.tokens = slot.tokens.saturating_add(refill).min(burst);
            slot.last = now;
        }
        if slot.key != key && slot.tokens >= burst {
            // The owner is idle (full bucket): the slot changes hands.
            slot.key = key;
        }
        f(&mut slot.tokens)
    }
}

/// The key of a source address: the IPv4 address, or an IPv6 /64 (one host owns a /64, so
/// counting per /128 would let one attacker take 2^64 budgets).
pub(crate) fn source_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(v4.to_bits()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u64::from(v4.to_bits()),
            None => ((v6.to_bits() >> 64) as u64) ^ (1 << 63),
        },
    }
}

/// The key of a user name (FNV-1a; the table's secret keys the slot choice).
pub(crate) fn user_key(user: &[u8]) -> u64 {
    user.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let now = Instant::now();
        let mut table = RateTable::new(10, 5, 16, 7);
        let allowed = (0..100).filter(|_| table.take(1, now)).count();
        assert_eq!(allowed, 5);
        let later = now + Duration::from_millis(500);
        let allowed = (0..100).filter(|_| table.take(1, later)).count();
        assert_eq!(allowed, 5, "half a second at 10/s refills 5");
    }

    #[test]
    fn a_flood_of_other_keys_never_resets_a_busy_bucket() {
        let now = Instant::now();
        let mut table = RateTable::new(1, 3, 8, 99);
        let victim = source_key("198.51.100.7".parse().unwrap());
        assert_eq!((0..10).filter(|_| table.take(victim, now)).count(), 3);
        // A million spoofed sources over a table of 8 slots.
        for i in 0..1_000_000u64 {
            let _ = table.take(i << 8, now);
        }
        assert!(
            !table.take(victim, now),
            "the victim's bucket is still empty"
        );
        assert_eq!(table.slots.len(), 8, "memory did not grow");
    }

    #[test]
    fn a_zero_rate_disables_the_table_and_allocates_nothing() {
        let mut table = RateTable::new(0, 10, 4096, 1);
        assert!(!table.enabled());
        assert!((0..1000).all(|_| table.take(1, Instant::now())));
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let a = source_key("2001:db8:1:2::1".parse().unwrap());
        let b = source_key("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = source_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            source_key("::ffff:198.51.100.7".parse().unwrap()),
            source_key("198.51.100.7".parse().unwrap())
        );
    }
}
