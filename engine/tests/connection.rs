//! Stream transports: an allocation made over TCP or TLS ends when its connection closes.

mod common;

use common::*;
use uturn_engine::{Event, Output, ShardId, TableChange, Transport};

/// RFC 8656 §3.1: over TCP or TLS the 5-tuple is the connection, and the allocation is deleted
/// when the connection closes.
#[test]
fn closing_the_connection_removes_its_allocation() {
    for transport in [Transport::Tcp, Transport::Tls] {
        let mut h = Harness::new(config());
        let mut client = Client::new("198.51.100.1:5000");
        client.tuple.transport = transport;
        let (alloc, _, _) = h.allocate(&mut client, 2, &[]);
        assert_eq!(h.engine.allocation_count(), 1);
        h.engine.handle_connection_closed(h.now, client.tuple);
        assert_eq!(
            h.drain(),
            [
                Output::Table {
                    shard: ShardId(0),
                    change: TableChange::RemoveAllocation { alloc }
                },
                Output::Event(Event::AllocationDeleted { alloc }),
            ]
        );
        assert_eq!(h.engine.allocation_count(), 0);
        assert_eq!(h.engine.poll_timeout(), None);
        h.engine.check_invariants(h.now);
    }
}

/// A closed connection that never allocated, or another connection's close, changes nothing.
#[test]
fn closing_an_unrelated_connection_changes_nothing() {
    let mut h = Harness::new(config());
    let mut client = Client::new("198.51.100.1:5000");
    client.tuple.transport = Transport::Tcp;
    h.allocate(&mut client, 2, &[]);
    let mut other = client.tuple;
    other.client = "198.51.100.1:5001".parse().unwrap();
    h.engine.handle_connection_closed(h.now, other);
    // The same addresses over UDP are another 5-tuple, and UDP has no connection.
    let mut udp = client.tuple;
    udp.transport = Transport::Udp;
    h.engine.handle_connection_closed(h.now, udp);
    assert_eq!(h.drain(), []);
    assert_eq!(h.engine.allocation_count(), 1);
}
