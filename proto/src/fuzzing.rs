//! Harness logic shared by the cargo-fuzz targets in `proto/fuzz/` and the corpus test in
//! `proto/tests/fuzz_corpus.rs`, so CI runs the seed corpus on the stable toolchain.

use crate::{ChannelData, Message, StreamFramer, frame_len, parse_send_indication};

/// Pushes `data` through every decoder that reads a datagram: `Message::parse` and all its
/// getters and integrity checks, `ChannelData::parse`, `parse_send_indication`, `frame_len`.
/// Returns whether it parsed as a STUN message. Must never panic.
pub fn parse_message(data: &[u8]) -> bool {
    let _ = ChannelData::parse(data);
    let _ = parse_send_indication(data);
    let _ = frame_len(data);
    let Ok(msg) = Message::parse(data) else {
        return false;
    };
    let tid = msg.transaction_id();
    for raw in msg.attributes() {
        let _ = crate::Attribute::decode(raw, &tid);
    }
    let _ = msg.unknown_comprehension_required();
    let _ = (
        msg.username(),
        msg.realm(),
        msg.nonce(),
        msg.userhash(),
        msg.software(),
    );
    let _ = (
        msg.lifetime(),
        msg.requested_transport(),
        msg.channel_number(),
        msg.data(),
    );
    let _ = (
        msg.xor_mapped_address(),
        msg.mapped_address(),
        msg.error_code(),
        msg.even_port(),
    );
    let _ = (msg.reservation_token(), msg.requested_address_family());
    let _ = (
        msg.additional_address_family(),
        msg.dont_fragment(),
        msg.connection_id(),
    );
    let _ = (
        msg.address_error_code(),
        msg.icmp(),
        msg.alternate_server(),
        msg.alternate_domain(),
    );
    if let Ok(Some(algs)) = msg.password_algorithms() {
        algs.iter().for_each(drop);
    }
    let _ = msg.password_algorithm();
    if let Ok(Some(list)) = msg.unknown_attributes() {
        list.iter().for_each(drop);
    }
    msg.xor_peer_addresses().for_each(drop);
    msg.xor_relayed_addresses().for_each(drop);
    let _ = msg.verify_integrity(b"key");
    let _ = msg.verify_integrity_sha256(b"key");
    true
}

/// Feeds `data` to a [`StreamFramer`] in chunks whose sizes come from the data itself, parses
/// each frame, and checks that the frames are exactly what [`frame_len`] cuts from the whole
/// input. Returns the number of frames. Must never panic.
pub fn stream_framer(data: &[u8]) -> usize {
    let Some((&seed, stream)) = data.split_first() else {
        return 0;
    };
    let chunk = usize::from(seed % 17) + 1;
    let mut framer = StreamFramer::new(4096);
    let mut frames = 0;
    let mut offset = 0;
    'outer: for piece in stream.chunks(chunk) {
        let mut piece = piece;
        while !piece.is_empty() {
            let taken = framer.push(piece);
            piece = piece.get(taken..).unwrap_or(&[]);
            loop {
                match framer.pop() {
                    Ok(Some(frame)) => {
                        frames += 1;
                        let expected = frame_len(stream.get(offset..).unwrap_or(&[]));
                        assert_eq!(
                            expected,
                            Ok(Some(frame.len())),
                            "framer and frame_len disagree"
                        );
                        assert_eq!(stream.get(offset..offset + frame.len()), Some(frame));
                        offset += frame.len();
                        let _ = parse_message(frame);
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
            if taken == 0 {
                break 'outer;
            }
        }
    }
    frames
}
