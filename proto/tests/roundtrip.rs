//! Property tests: whatever the builder makes parses back to the same values, and the stream
//! framer cuts the same frames out of a byte stream however it is chunked.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use uturn_proto::{
    AddressErrorCode, AddressFamily, Attribute, AttributeType, ChannelData, ChannelNumber, Class,
    ConnectionId, ErrorCode, ErrorCodeAttribute, EvenPort, Icmp, Message, MessageBuilder, Method,
    PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms, Protocol, RawAttribute,
    ReservationToken, StreamFramer, TransactionId, UnknownAttributeList, write_channel_data,
};

/// An owned description of one attribute, turned into an `Attribute<'_>` for building.
#[derive(Debug, Clone)]
enum Spec {
    Address(u8, SocketAddr),
    Text(u8, String),
    Userhash([u8; 32]),
    ErrorCode(u16, String),
    AddressError(bool, u16, String),
    Lifetime(u32),
    Channel(u16),
    Data(Vec<u8>),
    Family(bool, bool),
    EvenPort(bool),
    Transport(u8),
    DontFragment,
    Token([u8; 8]),
    Icmp(u8, u8, u32),
    ConnectionId(u32),
    Algorithm(u16, Vec<u8>),
    Algorithms(Vec<(u16, Vec<u8>)>),
    Unknown(Vec<u16>),
    Other(u16, Vec<u8>),
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<bool>(), any::<u32>(), any::<u128>(), any::<u16>()).prop_map(|(v6, a4, a6, port)| {
        let ip = if v6 {
            IpAddr::from(a6.to_be_bytes())
        } else {
            IpAddr::from(a4.to_be_bytes())
        };
        SocketAddr::new(ip, port)
    })
}

fn spec() -> impl Strategy<Value = Spec> {
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    prop_oneof![
        (0u8..5, socket_addr()).prop_map(|(k, a)| Spec::Address(k, a)),
        (0u8..5, "\\PC{0,60}").prop_map(|(k, s)| Spec::Text(k, s)),
        any::<[u8; 32]>().prop_map(Spec::Userhash),
        (300u16..700, "\\PC{0,30}").prop_map(|(c, s)| Spec::ErrorCode(c, s)),
        (any::<bool>(), 300u16..700, "[a-z ]{0,20}")
            .prop_map(|(f, c, s)| Spec::AddressError(f, c, s)),
        any::<u32>().prop_map(Spec::Lifetime),
        (0x4000u16..=0x4fff).prop_map(Spec::Channel),
        bytes(300).prop_map(Spec::Data),
        (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Spec::Family(a, b)),
        any::<bool>().prop_map(Spec::EvenPort),
        any::<u8>().prop_map(Spec::Transport),
        Just(Spec::DontFragment),
        any::<[u8; 8]>().prop_map(Spec::Token),
        (any::<u8>(), any::<u8>(), any::<u32>()).prop_map(|(t, c, d)| Spec::Icmp(t, c, d)),
        any::<u32>().prop_map(Spec::ConnectionId),
        (any::<u16>(), bytes(9)).prop_map(|(a, p)| Spec::Algorithm(a, p)),
        proptest::collection::vec((any::<u16>(), bytes(9)), 0..4).prop_map(Spec::Algorithms),
        proptest::collection::vec(any::<u16>(), 0..6).prop_map(Spec::Unknown),
        (0xc000u16.., bytes(40)).prop_map(|(t, v)| Spec::Other(t, v)),
    ]
}

/// Builds the attribute; `algs` holds the borrowed password-algorithm lists.
fn attribute<'a>(
    s: &'a Spec,
    algs: &'a [PasswordAlgorithm<'a>],
    unknown: &'a [AttributeType],
) -> Attribute<'a> {
    match s {
        Spec::Address(0, a) => Attribute::MappedAddress(*a),
        Spec::Address(1, a) => Attribute::XorMappedAddress(*a),
        Spec::Address(2, a) => Attribute::XorPeerAddress(*a),
        Spec::Address(3, a) => Attribute::XorRelayedAddress(*a),
        Spec::Address(_, a) => Attribute::AlternateServer(*a),
        Spec::Text(0, t) => Attribute::Username(t),
        Spec::Text(1, t) => Attribute::Realm(t),
        Spec::Text(2, t) => Attribute::Nonce(t),
        Spec::Text(3, t) => Attribute::Software(t),
        Spec::Text(_, t) => Attribute::AlternateDomain(t),
        Spec::Userhash(h) => Attribute::Userhash(*h),
        Spec::ErrorCode(c, r) => Attribute::ErrorCode(ErrorCodeAttribute {
            code: ErrorCode(*c),
            reason: r,
        }),
        Spec::AddressError(v6, c, r) => Attribute::AddressErrorCode(AddressErrorCode {
            family: if *v6 {
                AddressFamily::V6
            } else {
                AddressFamily::V4
            },
            code: ErrorCode(*c),
            reason: r,
        }),
        Spec::Lifetime(l) => Attribute::Lifetime(*l),
        Spec::Channel(c) => Attribute::ChannelNumber(ChannelNumber::new(*c).unwrap()),
        Spec::Data(d) => Attribute::Data(d),
        Spec::Family(requested, v6) => {
            let f = if *v6 {
                AddressFamily::V6
            } else {
                AddressFamily::V4
            };
            if *requested {
                Attribute::RequestedAddressFamily(f)
            } else {
                Attribute::AdditionalAddressFamily(f)
            }
        }
        Spec::EvenPort(r) => Attribute::EvenPort(EvenPort { reserve_next: *r }),
        Spec::Transport(p) => Attribute::RequestedTransport(Protocol(*p)),
        Spec::DontFragment => Attribute::DontFragment,
        Spec::Token(t) => Attribute::ReservationToken(ReservationToken(*t)),
        Spec::Icmp(t, c, d) => Attribute::Icmp(Icmp {
            ty: *t,
            code: *c,
            data: *d,
        }),
        Spec::ConnectionId(c) => Attribute::ConnectionId(ConnectionId(*c)),
        Spec::Algorithm(a, p) => Attribute::PasswordAlgorithm(PasswordAlgorithm {
            algorithm: PasswordAlgorithmId(*a),
            params: p,
        }),
        Spec::Algorithms(_) => Attribute::PasswordAlgorithms(PasswordAlgorithms::new(algs)),
        Spec::Unknown(_) => Attribute::UnknownAttributes(UnknownAttributeList::new(unknown)),
        Spec::Other(t, v) => Attribute::Other(RawAttribute {
            ty: AttributeType(*t),
            value: v,
        }),
    }
}

fn is_known_by_ty(ty: u16) -> bool {
    AttributeType(ty).is_known()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any message the builder makes parses back to the same class, method, transaction ID
    /// and attribute values, and its integrity and fingerprint verify.
    #[test]
    fn any_message_the_builder_makes_parses_back_to_the_same_values(
        class in 0u16..4,
        method in 0u16..0x1000,
        tid in any::<[u8; 12]>(),
        specs in proptest::collection::vec(spec(), 0..10),
        padding in any::<u8>(),
        key in proptest::collection::vec(any::<u8>(), 0..80),
        integrity in any::<bool>(),
        integrity_sha256 in any::<bool>(),
        fingerprint in any::<bool>(),
    ) {
        // Keep `Other` to types this crate does not know, so they decode as `Other` again.
        let specs: Vec<Spec> = specs
            .into_iter()
            .filter(|s| !matches!(s, Spec::Other(t, _) if is_known_by_ty(*t)))
            .collect();
        let owned_algs: Vec<Vec<PasswordAlgorithm<'_>>> = specs
            .iter()
            .map(|s| match s {
                Spec::Algorithms(list) => list
                    .iter()
                    .map(|(a, p)| PasswordAlgorithm { algorithm: PasswordAlgorithmId(*a), params: p })
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        let owned_unknown: Vec<Vec<AttributeType>> = specs
            .iter()
            .map(|s| match s {
                Spec::Unknown(list) => list.iter().copied().map(AttributeType).collect(),
                _ => Vec::new(),
            })
            .collect();
        let attrs: Vec<Attribute<'_>> = specs
            .iter()
            .zip(&owned_algs)
            .zip(&owned_unknown)
            .map(|((s, a), u)| attribute(s, a, u))
            .collect();

        let class = Class::from_bits(class);
        let method = Method(method);
        let tid = TransactionId(tid);
        let mut buf = vec![0u8; 8192];
        let mut b = MessageBuilder::new(&mut buf, class, method, tid);
        b.padding_byte(padding);
        for a in &attrs {
            b.attribute(a).unwrap();
        }
        if integrity {
            b.message_integrity(&key).unwrap();
        }
        if integrity_sha256 {
            b.message_integrity_sha256(&key).unwrap();
        }
        if fingerprint {
            b.fingerprint().unwrap();
        }
        let len = b.finish();

        let msg = Message::parse(&buf[..len]).unwrap();
        prop_assert_eq!(msg.class(), class);
        prop_assert_eq!(msg.method(), method);
        prop_assert_eq!(msg.transaction_id(), tid);
        prop_assert_eq!(msg.has_integrity(), integrity);
        prop_assert_eq!(msg.has_integrity_sha256(), integrity_sha256);
        prop_assert_eq!(msg.has_fingerprint(), fingerprint);
        if integrity {
            prop_assert_eq!(msg.verify_integrity(&key), Ok(()));
        }
        if integrity_sha256 {
            prop_assert_eq!(msg.verify_integrity_sha256(&key), Ok(()));
        }
        let decoded: Vec<Attribute<'_>> = msg
            .attributes()
            .map(|raw| Attribute::decode(raw, &tid).unwrap())
            .take(attrs.len())
            .collect();
        prop_assert_eq!(&decoded, &attrs);
        // The typed getters agree with the first occurrence.
        let first_peer = attrs.iter().find_map(|a| match a {
            Attribute::XorPeerAddress(p) => Some(*p),
            _ => None,
        });
        prop_assert_eq!(msg.xor_peer_addresses().next().transpose().unwrap(), first_peer);
        let peers = attrs.iter().filter(|a| matches!(a, Attribute::XorPeerAddress(_))).count();
        prop_assert_eq!(msg.xor_peer_addresses().count(), peers);
    }

    /// RFC 8656 §12.5 / RFC 8489 §7.2.2: over TCP/TLS messages follow each other with no other
    /// framing. The framer must cut the same frames whatever chunks the stream arrives in.
    #[test]
    fn the_stream_framer_yields_the_same_frames_whatever_the_chunking(
        frames in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300), any::<[u8; 12]>()),
            1..12,
        ),
        chunk_sizes in proptest::collection::vec(1usize..200, 1..40),
        capacity in prop_oneof![Just(400usize), Just(uturn_proto::STREAM_FRAME_LEN_MAX)],
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (stun, payload, tid) in &frames {
            let mut buf = vec![0u8; 1024];
            let len = if *stun {
                let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::SEND, TransactionId(*tid));
                b.attribute(&Attribute::Data(payload)).unwrap();
                b.fingerprint().unwrap();
                b.finish()
            } else {
                write_channel_data(&mut buf, ChannelNumber::MIN, payload, true).unwrap()
            };
            expected.push(buf[..len].to_vec());
            stream.extend_from_slice(&buf[..len]);
        }

        let mut framer = StreamFramer::new(capacity);
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut sizes = chunk_sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).min(rest.len());
            let taken = framer.push(&rest[..n]);
            rest = &rest[taken..];
            while let Some(frame) = framer.pop().unwrap() {
                got.push(frame.to_vec());
            }
        }
        prop_assert_eq!(framer.buffered(), 0);
        prop_assert_eq!(&got, &expected);
        for frame in &got {
            match uturn_proto::classify(frame) {
                uturn_proto::PacketKind::Stun => prop_assert!(Message::parse(frame).is_ok()),
                _ => prop_assert!(ChannelData::parse(frame).is_ok()),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Hostile input: arbitrary bytes never panic any decoder.
    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let stun = uturn_proto::fuzzing::parse_message(&bytes);
        prop_assert_eq!(stun, Message::parse(&bytes).is_ok());
        uturn_proto::fuzzing::stream_framer(&bytes);
    }

    /// Hostile input: a valid message with some bytes overwritten (cookie and length kept
    /// plausible) never panics, and is either refused or still self-consistent.
    #[test]
    fn corrupted_valid_messages_never_panic_any_decoder(
        edits in proptest::collection::vec((20usize..200, any::<u8>()), 1..6),
    ) {
        let mut buf = [0u8; 256];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::ALLOCATE, TransactionId([1; 12]));
        b.attribute(&Attribute::XorPeerAddress("[2001:db8::1]:9".parse().unwrap())).unwrap();
        b.attribute(&Attribute::Username("someone")).unwrap();
        b.attribute(&Attribute::PasswordAlgorithms(PasswordAlgorithms::new(&[PasswordAlgorithm::SHA256]))).unwrap();
        b.attribute(&Attribute::ErrorCode(ErrorCodeAttribute::new(ErrorCode::FORBIDDEN))).unwrap();
        b.message_integrity(b"k").unwrap();
        let len = b.finish();
        let mut bytes = buf[..len].to_vec();
        for (at, v) in edits {
            if let Some(byte) = bytes.get_mut(at) {
                *byte = v;
            }
        }
        if uturn_proto::fuzzing::parse_message(&bytes) {
            let msg = Message::parse(&bytes).unwrap();
            prop_assert_eq!(msg.as_bytes().len(), len);
        }
    }
}
