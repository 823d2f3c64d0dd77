//! Relay port allocation: which (relay IP, port) pairs are in use, and which shard owns which
//! slice of the port range.
//!
//! The configured range is cut into one contiguous slice per data-plane shard, so each shard's
//! relay sockets come from its own slice and an operator can tell from a port which shard
//! served it. Within a slice a port is picked at a random offset and the slice is scanned from
//! there (RFC 8656 §7.2 recommends randomized port assignment, RFC 6056). Each relay IP family
//! keeps one bit per port (8 KiB per family).

use rand::RngCore;

use crate::ShardId;

/// An address family with a relay IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (REQUESTED-ADDRESS-FAMILY 0x01).
    V4,
    /// IPv6 (REQUESTED-ADDRESS-FAMILY 0x02).
    V6,
}

impl Family {
    pub(crate) fn of(ip: std::net::IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    fn index(self) -> usize {
        match self {
            Self::V4 => 0,
            Self::V6 => 1,
        }
    }
}

/// What kind of port an allocation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortShape {
    /// Any port.
    Any,
    /// An even port (EVEN-PORT with R=0).
    Even,
    /// An even port N with N+1 also free; both are taken (EVEN-PORT with R=1).
    EvenPair,
}

/// The ports in use, per family, and each shard's slice of the range.
#[derive(Debug)]
pub(crate) struct PortAllocator {
    /// Inclusive `(first, last)` per shard.
    slices: Vec<(u16, u16)>,
    /// One bit per port number, per family.
    used: [Vec<u64>; 2],
    in_use: usize,
}

/// A port range that cannot be split between the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("port range {min}-{max} has fewer than 2 ports for each of {shards} shards")]
pub struct PortRangeTooSmall {
    /// First port of the range.
    pub min: u16,
    /// Last port of the range.
    pub max: u16,
    /// Number of shards.
    pub shards: u16,
}

impl PortAllocator {
    pub(crate) fn new(min: u16, max: u16, shards: u16) -> Result<Self, PortRangeTooSmall> {
        let error = PortRangeTooSmall { min, max, shards };
        let shards_count = u32::from(shards.max(1));
        let span = u32::from(max).saturating_sub(u32::from(min)) + 1;
        if max < min || span < 2 * shards_count {
            return Err(error);
        }
        let slices = (0..shards_count)
            .map(|k| {
                let first = u32::from(min) + k * span / shards_count;
                let last = u32::from(min) + (k + 1) * span / shards_count - 1;
                // Both are within [min, max], so they fit in u16.
                (first as u16, last as u16)
            })
            .collect();
        Ok(Self {
            slices,
            used: [vec![0; 1024], vec![0; 1024]],
            in_use: 0,
        })
    }

    /// The inclusive slice of `shard` (shard numbers beyond the count wrap around).
    pub(crate) fn slice(&self, shard: ShardId) -> (u16, u16) {
        self.slices[usize::from(shard.0) % self.slices.len()]
    }

    pub(crate) fn is_used(&self, family: Family, port: u16) -> bool {
        let bits = &self.used[family.index()];
        bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// Marks a port used; false when it already was.
    pub(crate) fn claim(&mut self, family: Family, port: u16) -> bool {
        if self.is_used(family, port) {
            return false;
        }
        self.used[family.index()][usize::from(port) / 64] |= 1 << (port % 64);
        self.in_use += 1;
        true
    }

    pub(crate) fn release(&mut self, family: Family, port: u16) {
        if self.is_used(family, port) {
            self.used[family.index()][usize::from(port) / 64] &= !(1 << (port % 64));
            self.in_use -= 1;
        }
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Takes a free port of `shape` from `shard`'s slice, or `None` when the slice is full.
    /// For [`PortShape::EvenPair`] the returned port N and N+1 are both taken.
    pub(crate) fn allocate<R: RngCore>(
        &mut self,
        rng: &mut R,
        family: Family,
        shard: ShardId,
        shape: PortShape,
    ) -> Option<u16> {
        let (first, last) = self.slice(shard);
        let span = u32::from(last) - u32::from(first) + 1;
        let start = rng.next_u32() % span;
        for step in 0..span {
            let port = (u32::from(first) + (start + step) % span) as u16;
            let fits = match shape {
                PortShape::Any => !self.is_used(family, port),
                PortShape::Even => port % 2 == 0 && !self.is_used(family, port),
                PortShape::EvenPair => {
                    port % 2 == 0
                        && port < last
                        && !self.is_used(family, port)
                        && !self.is_used(family, port + 1)
                }
            };
            if fits {
                self.claim(family, port);
                if shape == PortShape::EvenPair {
                    self.claim(family, port + 1);
                }
                return Some(port);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn the_range_is_split_into_contiguous_slices_that_cover_it_once() {
        let ports = PortAllocator::new(24000, 29999, 4).unwrap();
        let slices: Vec<_> = (0..4).map(|k| ports.slice(ShardId(k))).collect();
        assert_eq!(slices[0].0, 24000);
        assert_eq!(slices[3].1, 29999);
        for pair in slices.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0);
        }
    }

    #[test]
    fn a_shard_only_gets_ports_from_its_own_slice_until_it_is_full() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut ports = PortAllocator::new(50000, 50015, 2).unwrap();
        let mut got = Vec::new();
        while let Some(port) = ports.allocate(&mut rng, Family::V4, ShardId(1), PortShape::Any) {
            got.push(port);
        }
        got.sort_unstable();
        assert_eq!(got, (50008..=50015).collect::<Vec<_>>());
        assert!(
            ports
                .allocate(&mut rng, Family::V6, ShardId(1), PortShape::Any)
                .is_some()
        );
    }

    #[test]
    fn an_even_pair_takes_an_even_port_and_the_next_one() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut ports = PortAllocator::new(50000, 50003, 1).unwrap();
        let port = ports
            .allocate(&mut rng, Family::V4, ShardId(0), PortShape::EvenPair)
            .unwrap();
        assert_eq!(port % 2, 0);
        assert!(ports.is_used(Family::V4, port + 1));
        assert_eq!(ports.in_use(), 2);
        ports.release(Family::V4, port);
        ports.release(Family::V4, port + 1);
        assert_eq!(ports.in_use(), 0);
    }

    #[test]
    fn a_range_too_small_for_the_shards_is_refused() {
        assert!(PortAllocator::new(50000, 50002, 2).is_err());
        assert!(PortAllocator::new(50000, 49999, 1).is_err());
    }
}
