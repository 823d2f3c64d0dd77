//! Checks of the host's kernel settings that an operator should hear about at start-up.

use std::ops::RangeInclusive;

/// The part of the relay port range that the kernel may also hand out as ephemeral ports
/// (`net.ipv4.ip_local_port_range` minus `net.ipv4.ip_local_reserved_ports`), as the lowest and
/// highest such port, or `None` when they do not meet.
///
/// Why it matters: every outgoing connection or unbound UDP socket of any program on the host
/// takes an ephemeral port; inside the relay range each one is a port uturn cannot bind, and
/// enough of them in a row make Allocate fail with 508.
pub(crate) fn relay_ports_in_ephemeral_range(
    relay: RangeInclusive<u16>,
    ephemeral: RangeInclusive<u16>,
    reserved: &[RangeInclusive<u16>],
) -> Option<(u16, u16)> {
    let low = (*relay.start()).max(*ephemeral.start());
    let high = (*relay.end()).min(*ephemeral.end());
    let exposed = (low..=high).filter(|port| !reserved.iter().any(|r| r.contains(port)));
    let mut bounds: Option<(u16, u16)> = None;
    for port in exposed {
        bounds = Some(bounds.map_or((port, port), |(first, _)| (first, port)));
    }
    bounds
}

/// `net.ipv4.ip_local_port_range`: two numbers, e.g. "32768\t60999".
pub(crate) fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(low..=high),
        _ => None,
    }
}

/// `net.ipv4.ip_local_reserved_ports`: a comma-separated list of ports and ranges, e.g.
/// "8080,49152-65535", or empty. Unreadable items are skipped: this only feeds a warning.
pub(crate) fn parse_reserved_ports(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            match item.split_once('-') {
                Some((low, high)) => Some(low.parse().ok()?..=high.parse().ok()?),
                None => item.parse().ok().map(|p: u16| p..=p),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_relay_range_overlaps_linux_default_ephemeral_ports() {
        assert_eq!(
            relay_ports_in_ephemeral_range(49152..=65535, 32768..=60999, &[]),
            Some((49152, 60999))
        );
    }

    #[test]
    fn reserved_ports_or_a_disjoint_range_remove_the_overlap() {
        assert_eq!(
            relay_ports_in_ephemeral_range(49152..=65535, 32768..=60999, &[49152..=65535]),
            None
        );
        assert_eq!(
            relay_ports_in_ephemeral_range(24000..=29999, 32768..=60999, &[]),
            None
        );
        assert_eq!(
            relay_ports_in_ephemeral_range(49152..=65535, 32768..=60999, &[49152..=50000]),
            Some((50001, 60999))
        );
    }

    #[test]
    fn kernel_files_parse_and_garbage_is_skipped() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range(""), None);
        assert_eq!(parse_reserved_ports("\n"), vec![]);
        assert_eq!(
            parse_reserved_ports("8080,49152-65535,x\n"),
            vec![8080..=8080, 49152..=65535]
        );
    }
}
