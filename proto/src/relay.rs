//! Fast-path helpers for relayed data: the Data indication header written into headroom, and a
//! cheap Send indication reader.

use core::net::SocketAddr;

use crate::attribute::Attribute;
use crate::cursor::{pad4, put};
use crate::error::{AttributeError, BufferTooSmall, ParseError};
use crate::message::Message;
use crate::types::{
    AttributeType, Class, MAGIC_COOKIE, Method, STUN_BODY_LEN_MAX, STUN_HEADER_LEN, TransactionId,
    message_type,
};

/// Upper bound on [`write_data_indication_header`]'s output: 20 (header) + 24 (IPv6
/// XOR-PEER-ADDRESS) + 4 (DATA attribute header) = 48. With an IPv4 peer it writes 36 bytes.
pub const DATA_INDICATION_HEADER_LEN_MAX: usize = 48;

/// Padding bytes after a STUN attribute value of `len` bytes (RFC 8489 §14: "each STUN
/// attribute MUST end on a 32-bit boundary").
#[inline]
pub const fn stun_padding(len: usize) -> usize {
    pad4(len)
}

/// Writes everything of a Data indication (RFC 8656 §11.4) that comes before the payload:
/// the STUN header, XOR-PEER-ADDRESS and the DATA attribute header. Returns its length (36
/// for an IPv4 peer, 48 for IPv6).
///
/// The message length in the header counts the payload and its padding, so the caller sends,
/// in order: `out[..n]`, the payload, then [`stun_padding`]`(payload_len)` zero bytes (e.g. as
/// one `sendmsg` with three iovecs, or by writing the header into headroom):
///
/// ```text
/// buf: [ 48 - n .. 48 ) header written here | [ 48 .. 48 + len ) peer datagram, received in
///                                           | place | padding
/// ```
///
/// Fails with [`BufferTooSmall`] when `out` is shorter than the header; when the payload is
/// too long for a STUN message (over 65,504 bytes with an IPv6 peer, 65,516 with IPv4) `needed` is `usize::MAX`.
/// No FINGERPRINT: RFC 8656 §11.4 does not ask for one.
#[inline]
pub fn write_data_indication_header(
    out: &mut [u8],
    tid: TransactionId,
    peer: SocketAddr,
    payload_len: usize,
) -> Result<usize, BufferTooSmall> {
    let peer_attr = Attribute::XorPeerAddress(peer);
    let peer_len = peer_attr.value_len();
    let header_len = STUN_HEADER_LEN + 4 + peer_len + 4;
    let body_len = 4 + peer_len + 4 + payload_len + pad4(payload_len);
    let (Ok(body_len16), Ok(payload_len16)) = (u16::try_from(body_len), u16::try_from(payload_len))
    else {
        return Err(BufferTooSmall { needed: usize::MAX });
    };
    if body_len > STUN_BODY_LEN_MAX {
        return Err(BufferTooSmall { needed: usize::MAX });
    }
    let Some(out) = out.get_mut(..header_len) else {
        return Err(BufferTooSmall { needed: header_len });
    };
    let ty = message_type(Class::Indication, Method::DATA);
    put(out, 0, &ty.to_be_bytes());
    put(out, 2, &body_len16.to_be_bytes());
    put(out, 4, &MAGIC_COOKIE.to_be_bytes());
    put(out, 8, &tid.0);
    put(out, 20, &AttributeType::XOR_PEER_ADDRESS.0.to_be_bytes());
    put(out, 22, &u16::try_from(peer_len).unwrap_or(0).to_be_bytes());
    if let Some(value) = out.get_mut(24..24 + peer_len) {
        peer_attr.write_value(value, &tid);
    }
    put(out, 24 + peer_len, &AttributeType::DATA.0.to_be_bytes());
    put(out, 26 + peer_len, &payload_len16.to_be_bytes());
    Ok(header_len)
}

/// The parts of a Send indication (RFC 8656 §11.2) the fast path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendIndication<'a> {
    /// The transaction ID.
    pub transaction_id: TransactionId,
    /// The first XOR-PEER-ADDRESS: where to send.
    pub peer: SocketAddr,
    /// The DATA attribute's value: what to send.
    pub data: &'a [u8],
    /// Whether DONT-FRAGMENT is present.
    pub dont_fragment: bool,
}

/// Why [`parse_send_indication`] dropped a datagram. RFC 8656 §11.2: a Send indication that
/// cannot be processed is silently discarded; count it by [`as_str`](Self::as_str).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendIndicationError {
    /// Not a STUN message.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A STUN message, but not a Send indication.
    #[error("not a Send indication")]
    NotSendIndication,
    /// No XOR-PEER-ADDRESS or no DATA (RFC 8656 §11.2).
    #[error("Send indication without XOR-PEER-ADDRESS or DATA")]
    MissingAttribute,
    /// An attribute is malformed.
    #[error(transparent)]
    Attribute(#[from] AttributeError),
    /// It carries a comprehension-required attribute this crate does not know (RFC 8489
    /// §6.3.2: such an indication is discarded).
    #[error("Send indication with an unknown comprehension-required attribute")]
    UnknownAttribute,
}

impl SendIndicationError {
    /// A static label for counting drops.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Parse(e) => e.as_str(),
            Self::NotSendIndication => "not_send_indication",
            Self::MissingAttribute => "send_missing_attribute",
            Self::Attribute(_) => "send_bad_attribute",
            Self::UnknownAttribute => "send_unknown_attribute",
        }
    }
}

/// Reads a Send indication for the fast path: [`Message::parse`], then the first
/// XOR-PEER-ADDRESS, DATA and DONT-FRAGMENT, in one pass over the attributes. Allocates
/// nothing.
pub fn parse_send_indication(bytes: &[u8]) -> Result<SendIndication<'_>, SendIndicationError> {
    let msg = Message::parse(bytes)?;
    if msg.class() != Class::Indication || msg.method() != Method::SEND {
        return Err(SendIndicationError::NotSendIndication);
    }
    let tid = msg.transaction_id();
    let (mut peer, mut data, mut dont_fragment) = (None, None, false);
    for a in msg.attributes() {
        match a.ty {
            AttributeType::XOR_PEER_ADDRESS if peer.is_none() => {
                peer = Some(crate::attribute::decode_address(a.ty, a.value, Some(&tid))?);
            }
            AttributeType::DATA if data.is_none() => data = Some(a.value),
            AttributeType::DONT_FRAGMENT => dont_fragment = true,
            ty if ty.is_comprehension_required() && !ty.is_known() => {
                return Err(SendIndicationError::UnknownAttribute);
            }
            _ => {}
        }
    }
    let (Some(peer), Some(data)) = (peer, data) else {
        return Err(SendIndicationError::MissingAttribute);
    };
    Ok(SendIndication {
        transaction_id: tid,
        peer,
        data,
        dont_fragment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::MessageBuilder;

    fn data_indication(peer: SocketAddr, payload: &[u8]) -> (usize, Vec<u8>) {
        let tid = TransactionId([3; 12]);
        let mut header = [0u8; DATA_INDICATION_HEADER_LEN_MAX];
        let n = write_data_indication_header(&mut header, tid, peer, payload.len()).unwrap();
        let mut wire = header[..n].to_vec();
        wire.extend_from_slice(payload);
        wire.resize(wire.len() + stun_padding(payload.len()), 0);
        (n, wire)
    }

    /// RFC 8656 §11.4: the Data indication carries XOR-PEER-ADDRESS and DATA.
    #[test]
    fn a_data_indication_header_plus_payload_plus_padding_is_a_valid_message() {
        for (peer, header_len) in [("192.0.2.7:4000", 36), ("[2001:db8::7]:4000", 48)] {
            let peer: SocketAddr = peer.parse().unwrap();
            for payload in [&b""[..], b"x", b"hello", b"four"] {
                let (n, wire) = data_indication(peer, payload);
                assert_eq!(n, header_len);
                let msg = Message::parse(&wire).unwrap();
                assert_eq!(
                    (msg.class(), msg.method()),
                    (Class::Indication, Method::DATA)
                );
                assert_eq!(msg.xor_peer_addresses().next(), Some(Ok(peer)));
                assert_eq!(msg.data(), Ok(Some(payload)));
            }
        }
    }

    #[test]
    fn the_data_indication_header_matches_what_the_builder_encodes() {
        let peer: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        let (_, wire) = data_indication(peer, b"abcdefg");
        let mut buf = [0u8; 128];
        let mut b = MessageBuilder::new(
            &mut buf,
            Class::Indication,
            Method::DATA,
            TransactionId([3; 12]),
        );
        b.attribute(&Attribute::XorPeerAddress(peer)).unwrap();
        b.attribute(&Attribute::Data(b"abcdefg")).unwrap();
        let len = b.finish();
        assert_eq!(&buf[..len], &wire[..]);
    }

    #[test]
    fn a_data_indication_header_refuses_small_buffers_and_oversize_payloads() {
        let peer: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        let tid = TransactionId([0; 12]);
        let mut small = [9u8; 47];
        assert_eq!(
            write_data_indication_header(&mut small, tid, peer, 10),
            Err(BufferTooSmall { needed: 48 })
        );
        assert_eq!(small, [9; 47]);
        let mut out = [0u8; DATA_INDICATION_HEADER_LEN_MAX];
        assert!(write_data_indication_header(&mut out, tid, peer, 65_504).is_ok());
        assert_eq!(
            write_data_indication_header(&mut out, tid, peer, 65_505),
            Err(BufferTooSmall { needed: usize::MAX })
        );
    }

    /// RFC 8656 §11.2: "the server [...] MUST discard the indication if it does not contain
    /// both an XOR-PEER-ADDRESS attribute and a DATA attribute".
    #[test]
    fn a_send_indication_yields_its_peer_and_data_and_incomplete_ones_are_refused() {
        let peer: SocketAddr = "198.51.100.9:3478".parse().unwrap();
        let tid = TransactionId([5; 12]);
        let mut buf = [0u8; 128];
        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::SEND, tid);
        b.attribute(&Attribute::XorPeerAddress(peer)).unwrap();
        b.attribute(&Attribute::DontFragment).unwrap();
        b.attribute(&Attribute::Data(b"media")).unwrap();
        let len = b.finish();
        assert_eq!(
            parse_send_indication(&buf[..len]),
            Ok(SendIndication {
                transaction_id: tid,
                peer,
                data: b"media",
                dont_fragment: true
            })
        );

        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::SEND, tid);
        b.attribute(&Attribute::Data(b"media")).unwrap();
        let len = b.finish();
        assert_eq!(
            parse_send_indication(&buf[..len]),
            Err(SendIndicationError::MissingAttribute)
        );

        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::SEND, tid);
        b.attribute(&Attribute::Data(b"media")).unwrap();
        let len = b.finish();
        assert_eq!(
            parse_send_indication(&buf[..len]),
            Err(SendIndicationError::NotSendIndication)
        );

        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::SEND, tid);
        b.attribute(&Attribute::XorPeerAddress(peer)).unwrap();
        b.attribute(&Attribute::Data(b"media")).unwrap();
        b.raw_attribute(AttributeType(0x7777), b"?").unwrap();
        let len = b.finish();
        assert_eq!(
            parse_send_indication(&buf[..len]),
            Err(SendIndicationError::UnknownAttribute)
        );
        assert_eq!(
            parse_send_indication(&buf[..10]),
            Err(SendIndicationError::Parse(ParseError::TruncatedHeader {
                len: 10
            }))
        );
    }
}
