//! Hostile input: a table of malformed messages and frames, each refused with its exact typed
//! error, through the public API only.

use uturn_proto::{AttributeType as T, fuzzing};
use uturn_proto::{
    ChannelData, ChannelDataError, FramingError, Message, ParseError, StreamFramer, frame_len,
};

/// RFC 5769 §2.2: SOFTWARE, XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT (80 bytes).
const RESPONSE: [u8; 80] = [
    0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
    0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
    0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
    0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
];

/// A message with the given raw attributes (type, value) and a correct header length.
fn message(attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    out.extend_from_slice(&[9; 12]);
    for (ty, value) in attrs {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
        out.resize(out.len() + (4 - value.len() % 4) % 4, 0);
    }
    let len = (out.len() - 20) as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn with(mut bytes: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut bytes);
    bytes
}

#[test]
fn every_malformed_stun_message_is_refused_with_its_exact_error() {
    let mi = [0u8; 20];
    let cases: Vec<(&str, Vec<u8>, ParseError)> = vec![
        (
            "empty datagram",
            vec![],
            ParseError::TruncatedHeader { len: 0 },
        ),
        (
            "truncated header",
            RESPONSE[..19].to_vec(),
            ParseError::TruncatedHeader { len: 19 },
        ),
        (
            "top two bits set",
            with(RESPONSE.to_vec(), |b| b[0] |= 0x80),
            ParseError::NotStun,
        ),
        (
            "top bit 0x40 set",
            with(RESPONSE.to_vec(), |b| b[0] = 0x41),
            ParseError::NotStun,
        ),
        (
            "wrong magic cookie",
            with(RESPONSE.to_vec(), |b| b[7] = 0x43),
            ParseError::BadMagicCookie,
        ),
        (
            "length not a multiple of 4",
            with(RESPONSE.to_vec(), |b| {
                b[3] = 0x3d;
                b.push(0);
            }),
            ParseError::LengthNotMultipleOfFour { len: 0x3d },
        ),
        (
            "header length past the end of the datagram (oversize length)",
            with(RESPONSE.to_vec(), |b| {
                b[2..4].copy_from_slice(&[0xff, 0xfc])
            }),
            ParseError::LengthMismatch {
                header: 0xfffc,
                actual: 60,
            },
        ),
        (
            "datagram longer than the header length",
            with(RESPONSE.to_vec(), |b| b.extend_from_slice(&[0; 4])),
            ParseError::LengthMismatch {
                header: 0x3c,
                actual: 64,
            },
        ),
        (
            "truncated datagram",
            RESPONSE[..76].to_vec(),
            ParseError::LengthMismatch {
                header: 0x3c,
                actual: 56,
            },
        ),
        (
            "attribute value past the end",
            with(message(&[(0x8022, b"abcd")]), |b| {
                b[22..24].copy_from_slice(&[0, 100])
            }),
            ParseError::AttributeOverflow { ty: T::SOFTWARE },
        ),
        (
            "attribute padding past the end",
            with(message(&[(0x8022, b"abcd")]), |b| b[23] = 5),
            ParseError::AttributeOverflow { ty: T::SOFTWARE },
        ),
        (
            "attribute after MESSAGE-INTEGRITY",
            message(&[(0x0008, &mi), (0x8022, b"late")]),
            ParseError::AttributeAfterIntegrity { ty: T::SOFTWARE },
        ),
        (
            "USERNAME after MESSAGE-INTEGRITY",
            message(&[(0x0008, &mi), (0x0006, b"mallory")]),
            ParseError::AttributeAfterIntegrity { ty: T::USERNAME },
        ),
        (
            "MESSAGE-INTEGRITY twice",
            message(&[(0x0008, &mi), (0x0008, &mi)]),
            ParseError::AttributeAfterIntegrity {
                ty: T::MESSAGE_INTEGRITY,
            },
        ),
        (
            "MESSAGE-INTEGRITY after MESSAGE-INTEGRITY-SHA256",
            message(&[(0x001c, &[0; 32]), (0x0008, &mi)]),
            ParseError::AttributeAfterIntegrity {
                ty: T::MESSAGE_INTEGRITY,
            },
        ),
        (
            "attribute after MESSAGE-INTEGRITY-SHA256",
            message(&[(0x001c, &[0; 32]), (0x0013, b"data")]),
            ParseError::AttributeAfterIntegrity { ty: T::DATA },
        ),
        (
            "MESSAGE-INTEGRITY of 16 bytes",
            message(&[(0x0008, &[0; 16])]),
            ParseError::InvalidIntegrityLength {
                ty: T::MESSAGE_INTEGRITY,
            },
        ),
        (
            "MESSAGE-INTEGRITY-SHA256 of 12 bytes",
            message(&[(0x001c, &[0; 12])]),
            ParseError::InvalidIntegrityLength {
                ty: T::MESSAGE_INTEGRITY_SHA256,
            },
        ),
        (
            "MESSAGE-INTEGRITY-SHA256 of 18 bytes",
            message(&[(0x001c, &[0; 18])]),
            ParseError::InvalidIntegrityLength {
                ty: T::MESSAGE_INTEGRITY_SHA256,
            },
        ),
        (
            "FINGERPRINT of 8 bytes",
            message(&[(0x8028, &[0; 8])]),
            ParseError::InvalidFingerprintLength,
        ),
        (
            "bad FINGERPRINT value",
            with(RESPONSE.to_vec(), |b| b[79] ^= 1),
            ParseError::FingerprintMismatch,
        ),
        (
            "a byte changed under FINGERPRINT",
            with(RESPONSE.to_vec(), |b| b[24] = b'T'),
            ParseError::FingerprintMismatch,
        ),
    ];
    for (name, bytes, expected) in cases {
        assert_eq!(
            Message::parse(&bytes).unwrap_err(),
            expected,
            "case: {name}"
        );
        // The hostile-input harness must survive it too.
        assert!(!fuzzing::parse_message(&bytes), "case: {name}");
    }
}

#[test]
fn every_malformed_channel_data_frame_is_refused_with_its_exact_error() {
    let cases: Vec<(&str, &[u8], ChannelDataError)> = vec![
        ("empty", &[], ChannelDataError::TooShort),
        (
            "short header",
            &[0x40, 0x00, 0x00],
            ChannelDataError::TooShort,
        ),
        (
            "channel below 0x4000",
            &[0x3f, 0xff, 0, 0],
            ChannelDataError::InvalidChannel(0x3fff),
        ),
        (
            "channel above RFC 5766's 0x7FFF",
            &[0x80, 0x00, 0, 0],
            ChannelDataError::InvalidChannel(0x8000),
        ),
        (
            "STUN bytes",
            &RESPONSE,
            ChannelDataError::InvalidChannel(0x0101),
        ),
        (
            "length past the end",
            &[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4],
            ChannelDataError::Truncated {
                len: 5,
                available: 4,
            },
        ),
        (
            "more than padding after the payload",
            &[0x40, 0x00, 0x00, 0x01, 1, 0, 0, 0, 0],
            ChannelDataError::TrailingBytes { extra: 4 },
        ),
        (
            "padding of a payload that needs none",
            &[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4, 0],
            ChannelDataError::TrailingBytes { extra: 1 },
        ),
        (
            "partial padding",
            &[0x40, 0x00, 0x00, 0x01, 1, 0],
            ChannelDataError::TrailingBytes { extra: 1 },
        ),
    ];
    for (name, bytes, expected) in cases {
        assert_eq!(
            ChannelData::parse(bytes).unwrap_err(),
            expected,
            "case: {name}"
        );
    }
}

#[test]
fn garbage_on_a_stream_is_refused_with_its_exact_error() {
    let cases: Vec<(&str, &[u8], FramingError)> = vec![
        (
            "first byte 0x17 (TLS record)",
            &[0x17, 0x03, 0x03],
            FramingError::Garbage { first_byte: 0x17 },
        ),
        (
            "first byte 0x80",
            &[0x80],
            FramingError::Garbage { first_byte: 0x80 },
        ),
        (
            "first byte 0x3F, between STUN and ChannelData",
            &[0x3F, 0, 0, 0],
            FramingError::Garbage { first_byte: 0x3F },
        ),
        // An HTTP request would not do: ASCII letters are 0x41-0x7A, inside the ChannelData
        // range of RFC 5766 clients (0x40-0x7F), so "GET /" frames as ChannelData 0x4745 and
        // fails later, in ChannelData parsing or the channel lookup.
        (
            "an HTTP status line",
            b"200 OK\r\n",
            FramingError::Garbage { first_byte: b'2' },
        ),
        (
            "TLS ClientHello",
            &[0x16, 0x03, 0x01, 0x02, 0x00],
            FramingError::Garbage { first_byte: 0x16 },
        ),
        (
            "STUN with wrong magic cookie",
            &[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x43],
            FramingError::BadMagicCookie,
        ),
        (
            "STUN length not a multiple of 4",
            &[0x00, 0x01, 0x00, 0x03, 0x21, 0x12, 0xa4, 0x42],
            FramingError::LengthNotMultipleOfFour,
        ),
    ];
    for (name, bytes, expected) in cases {
        assert_eq!(frame_len(bytes), Err(expected), "case: {name}");
        let mut framer = StreamFramer::new(1024);
        framer.push(bytes);
        assert_eq!(framer.pop(), Err(expected), "case: {name}");
        assert_eq!(framer.pop(), Err(expected), "an error is sticky: {name}");
    }
}

#[test]
fn a_frame_longer_than_the_framer_capacity_is_refused_before_it_is_buffered() {
    let mut framer = StreamFramer::new(64);
    // A STUN header announcing 0x0100 bytes of attributes: 276 in all.
    let header = [0x00, 0x01, 0x01, 0x00, 0x21, 0x12, 0xa4, 0x42];
    framer.push(&header);
    assert_eq!(
        framer.pop(),
        Err(FramingError::FrameTooLarge {
            len: 276,
            capacity: 64
        })
    );
    let mut framer = StreamFramer::new(64);
    framer.push(&[0x40, 0x00, 0xff, 0xff]);
    assert_eq!(
        framer.pop(),
        Err(FramingError::FrameTooLarge {
            len: 65540,
            capacity: 64
        })
    );
}
