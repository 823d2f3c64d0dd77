//! Relay port allocation: which (relay IP, port) pairs are in use.
//!
//! The whole configured range is one pool shared by every data-plane shard. A relay port does
//! not tie its socket to a shard: the shell binds the socket and hands it to the shard that
//! serves the client's 5-tuple in `OpenAllocation`, whatever its number. So one busy shard may
//! use every free port, and an Allocate is answered 508 only when the range itself is full (a
//! range cut into per-shard slices answered 508 on a shard whose slice was full while other
//! shards had ports to spare). A port is picked at a random offset in the whole range and the
//! range is scanned from there (RFC 8656 §7.2 recommends randomized port assignment, RFC 6056),
//! so a port says nothing about the shard and the guess space is the whole range. Each relay IP
//! family keeps one bit per port (8 KiB per family).

use rand::RngCore;

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

/// The ports in use, per family, over the one range all shards share.
#[derive(Debug)]
pub(crate) struct PortAllocator {
    /// Inclusive range.
    first: u16,
    last: u16,
    /// One bit per port number, per family.
    used: [Vec<u64>; 2],
    in_use: usize,
}

/// A port range with no port in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("port range {min}-{max} is empty")]
pub struct PortRangeTooSmall {
    /// First port of the range.
    pub min: u16,
    /// Last port of the range.
    pub max: u16,
}

impl PortAllocator {
    pub(crate) fn new(min: u16, max: u16) -> Result<Self, PortRangeTooSmall> {
        if max < min {
            return Err(PortRangeTooSmall { min, max });
        }
        Ok(Self {
            first: min,
            last: max,
            used: [vec![0; 1024], vec![0; 1024]],
            in_use: 0,
        })
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

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Takes a free port of `shape` from the range, or `None` when none is left. For
    /// [`PortShape::EvenPair`] the returned port N and N+1 are both taken.
    pub(crate) fn allocate<R: RngCore>(
        &mut self,
        rng: &mut R,
        family: Family,
        shape: PortShape,
    ) -> Option<u16> {
        let (first, last) = (self.first, self.last);
        let span = u32::from(last) - u32::from(first) + 1;
        let start = rng.next_u32() % span;
        for step in 0..span {
            // Within [first, last], so it fits in u16.
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
    fn every_port_of_the_range_is_handed_out_once_before_the_range_is_full() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut ports = PortAllocator::new(50000, 50015).unwrap();
        let mut got = Vec::new();
        while let Some(port) = ports.allocate(&mut rng, Family::V4, PortShape::Any) {
            got.push(port);
        }
        got.sort_unstable();
        assert_eq!(got, (50000..=50015).collect::<Vec<_>>());
        assert_eq!(ports.in_use(), 16);
        assert!(
            ports
                .allocate(&mut rng, Family::V6, PortShape::Any)
                .is_some(),
            "each family has its own ports"
        );
    }

    /// RFC 8656 §7.2 recommends randomized port assignment (RFC 6056): the first port of a
    /// fresh range is not predictable from the range.
    #[test]
    fn the_first_port_taken_varies_with_the_random_source() {
        let firsts: std::collections::BTreeSet<u16> = (0..32)
            .map(|seed| {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut ports = PortAllocator::new(49152, 65535).unwrap();
                ports
                    .allocate(&mut rng, Family::V4, PortShape::Any)
                    .unwrap()
            })
            .collect();
        assert!(firsts.len() > 16, "{firsts:?}");
    }

    #[test]
    fn an_even_pair_takes_an_even_port_and_the_next_one() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut ports = PortAllocator::new(50000, 50003).unwrap();
        let port = ports
            .allocate(&mut rng, Family::V4, PortShape::EvenPair)
            .unwrap();
        assert_eq!(port % 2, 0);
        assert!(ports.is_used(Family::V4, port + 1));
        assert_eq!(ports.in_use(), 2);
        ports.release(Family::V4, port);
        ports.release(Family::V4, port + 1);
        assert_eq!(ports.in_use(), 0);
    }

    #[test]
    fn an_empty_range_is_refused_and_a_single_port_is_enough() {
        assert!(PortAllocator::new(50000, 49999).is_err());
        let mut rng = SmallRng::seed_from_u64(3);
        let mut ports = PortAllocator::new(50000, 50000).unwrap();
        assert_eq!(
            ports.allocate(&mut rng, Family::V4, PortShape::Any),
            Some(50000)
        );
        assert_eq!(ports.allocate(&mut rng, Family::V4, PortShape::Any), None);
    }
}
