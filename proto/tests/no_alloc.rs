//! The packet path allocates nothing: a counting global allocator watches the fast-path calls.
//!
//! The counter is per thread, so other tests running in parallel do not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;

use uturn_proto::{
    Attribute, ChannelData, ChannelNumber, Class, DATA_INDICATION_HEADER_LEN_MAX, Message,
    MessageBuilder, Method, Protocol, StreamFramer, TransactionId, classify, parse_send_indication,
    write_channel_data_header, write_data_indication_header,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn the_fast_path_parses_and_writes_without_allocating() {
    let peer: SocketAddr = "[2001:db8::9]:40000".parse().unwrap();
    let tid = TransactionId([4; 12]);
    let mut send = [0u8; 256];
    let mut request = [0u8; 256];
    let mut framer = StreamFramer::new(1024);

    let count = allocations_during(|| {
        // Send indication in, as the shard sees it.
        let mut b = MessageBuilder::new(&mut send, Class::Indication, Method::SEND, tid);
        b.attribute(&Attribute::XorPeerAddress(peer)).unwrap();
        b.attribute(&Attribute::Data(b"rtp")).unwrap();
        let len = b.finish();
        let s = parse_send_indication(&send[..len]).unwrap();
        assert_eq!((s.peer, s.data), (peer, &b"rtp"[..]));
        let msg = Message::parse(&send[..len]).unwrap();
        assert_eq!(msg.xor_peer_addresses().next(), Some(Ok(peer)));
        assert_eq!(msg.data(), Ok(Some(&b"rtp"[..])));

        // Peer data out, as ChannelData and as a Data indication.
        let mut frame = [0u8; 8];
        frame[4..7].copy_from_slice(b"rtp");
        write_channel_data_header(&mut frame, ChannelNumber::MIN, 3).unwrap();
        assert!(ChannelData::parse(&frame[..7]).is_ok());
        assert_eq!(classify(&frame), uturn_proto::PacketKind::ChannelData);
        let mut header = [0u8; DATA_INDICATION_HEADER_LEN_MAX];
        write_data_indication_header(&mut header, tid, peer, 3).unwrap();

        // An authenticated request, built and checked.
        let key = [7u8; 16];
        let mut b = MessageBuilder::new(&mut request, Class::Request, Method::ALLOCATE, tid);
        b.attribute(&Attribute::RequestedTransport(Protocol::UDP))
            .unwrap();
        b.attribute(&Attribute::Username("alice")).unwrap();
        b.message_integrity(&key).unwrap();
        b.fingerprint().unwrap();
        let len = b.finish();
        let msg = Message::parse(&request[..len]).unwrap();
        assert!(msg.verify_integrity(&key).is_ok());
        assert!(msg.unknown_comprehension_required().is_empty());
        assert_eq!(msg.username(), Ok(Some("alice")));

        // Stream framing after construction.
        framer.push(&request[..len]);
        assert_eq!(framer.pop().unwrap().map(<[u8]>::len), Some(len));
    });
    assert_eq!(count, 0, "the packet path allocated {count} times");
    // The counter does see allocations on this thread.
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(vec![1u8; 8]))),
        1
    );
}
