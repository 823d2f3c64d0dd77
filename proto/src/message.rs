//! The zero-copy [`Message`] view: strict parsing, attribute iteration, typed getters and
//! integrity checks.

use core::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use crate::attribute::{
    AddressErrorCode, AddressFamily, Attribute, ChannelNumber, ConnectionId, ErrorCodeAttribute,
    EvenPort, Icmp, PasswordAlgorithm, PasswordAlgorithms, Protocol, RawAttribute,
    ReservationToken, UnknownAttributeList, decode_address, valid_sha256_mac_len,
};
use crate::cursor::{Reader, pad4, read_u16, read_u32};
use crate::error::{AttributeError, IntegrityError, ParseError};
use crate::types::{
    AttributeType, Class, MAGIC_COOKIE, Method, STUN_HEADER_LEN, TransactionId, split_message_type,
};

/// FINGERPRINT is CRC-32 of the message XORed with this (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Length of a MESSAGE-INTEGRITY attribute, header included (RFC 8489 §14.5).
pub(crate) const INTEGRITY_ATTR_LEN: usize = 4 + 20;
/// Length of a FINGERPRINT attribute, header included (RFC 8489 §14.7).
pub(crate) const FINGERPRINT_ATTR_LEN: usize = 4 + 4;

/// A parsed STUN message: a validated view over the bytes it came from.
///
/// [`Message::parse`] checks the framing completely (header, every attribute's bounds, the
/// position of the integrity attributes and FINGERPRINT, and FINGERPRINT's CRC), so the
/// accessors afterwards cannot fail on framing; typed getters still validate each attribute's
/// value, because a server only needs some of them. Nothing here allocates.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    bytes: &'a [u8],
    class: Class,
    method: Method,
    tid: TransactionId,
    /// End of the attributes that count: after FINGERPRINT when present (later bytes are
    /// ignored, RFC 8489 §14.7), else the end of the message.
    attrs_end: usize,
    /// Offset of the MESSAGE-INTEGRITY attribute header.
    integrity: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header.
    integrity_sha256: Option<usize>,
    /// Offset of the FINGERPRINT attribute header.
    fingerprint: Option<usize>,
}

impl<'a> Message<'a> {
    /// Parses and validates a whole STUN message, e.g. one UDP datagram.
    ///
    /// Checks, in order: at least 20 bytes; top two bits zero and magic cookie
    /// (RFC 8489 §5); a length field that is a multiple of 4 and equals the bytes after the
    /// header; every attribute within bounds; after MESSAGE-INTEGRITY only
    /// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, after MESSAGE-INTEGRITY-SHA256 only
    /// FINGERPRINT (RFC 8489 §14.5, §14.6); the lengths of those attributes; and, when present,
    /// the FINGERPRINT CRC (RFC 8489 §14.7).
    ///
    /// Design decision: RFC 8489 §14.5 tells receivers to *ignore* attributes that follow
    /// MESSAGE-INTEGRITY (other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT). This parser
    /// *rejects* such a message with [`ParseError::AttributeAfterIntegrity`] instead: no
    /// conforming client sends one, and an attribute outside the HMAC's coverage is exactly
    /// what an attacker would append, so refusing it removes a class of mistakes where a
    /// handler reads an unauthenticated attribute. Bytes after FINGERPRINT are ignored (not
    /// iterated, not rejected), as RFC 8489 says.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(bytes);
        let (Some(ty), Some(len), Some(cookie), Some(tid)) =
            (r.u16(), r.u16(), r.u32(), r.array::<12>())
        else {
            return Err(ParseError::TruncatedHeader { len: bytes.len() });
        };
        // RFC 8489 §5: "The most significant 2 bits of every STUN message MUST be zeroes."
        if ty & 0xC000 != 0 {
            return Err(ParseError::NotStun);
        }
        // RFC 8489 §5: "The Magic Cookie field MUST contain the fixed value 0x2112A442".
        if cookie != MAGIC_COOKIE {
            return Err(ParseError::BadMagicCookie);
        }
        if len % 4 != 0 {
            return Err(ParseError::LengthNotMultipleOfFour { len });
        }
        let body = r.rest();
        if usize::from(len) != body.len() {
            return Err(ParseError::LengthMismatch {
                header: len,
                actual: body.len(),
            });
        }
        let (class, method) = split_message_type(ty);

        let mut msg = Self {
            bytes,
            class,
            method,
            tid: TransactionId(tid),
            attrs_end: bytes.len(),
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
        };
        let mut offset = STUN_HEADER_LEN;
        while !r.is_empty() {
            let (Some(ty), Some(len)) = (r.u16(), r.u16()) else {
                return Err(ParseError::TruncatedAttributeHeader);
            };
            let ty = AttributeType(ty);
            let len = usize::from(len);
            let padded = len + pad4(len);
            if r.take(padded).is_none() {
                return Err(ParseError::AttributeOverflow { ty });
            }
            match ty {
                AttributeType::FINGERPRINT => {
                    if len != 4 {
                        return Err(ParseError::InvalidFingerprintLength);
                    }
                    msg.check_fingerprint(offset)?;
                    msg.fingerprint = Some(offset);
                    msg.attrs_end = offset + FINGERPRINT_ATTR_LEN;
                    // RFC 8489 §14.7: FINGERPRINT is last; anything after it is ignored.
                    break;
                }
                _ if msg.integrity_sha256.is_some() => {
                    return Err(ParseError::AttributeAfterIntegrity { ty });
                }
                AttributeType::MESSAGE_INTEGRITY_SHA256 => {
                    if !valid_sha256_mac_len(len) {
                        return Err(ParseError::InvalidIntegrityLength { ty });
                    }
                    msg.integrity_sha256 = Some(offset);
                }
                _ if msg.integrity.is_some() => {
                    return Err(ParseError::AttributeAfterIntegrity { ty });
                }
                AttributeType::MESSAGE_INTEGRITY => {
                    if len != 20 {
                        return Err(ParseError::InvalidIntegrityLength { ty });
                    }
                    msg.integrity = Some(offset);
                }
                _ => {}
            }
            offset += 4 + padded;
        }
        Ok(msg)
    }

    fn check_fingerprint(&self, offset: usize) -> Result<(), ParseError> {
        let covered = self
            .bytes
            .get(..offset)
            .ok_or(ParseError::FingerprintMismatch)?;
        let stored = read_u32(self.bytes, offset + 4).ok_or(ParseError::FingerprintMismatch)?;
        if crc32fast::hash(covered) ^ FINGERPRINT_XOR == stored {
            Ok(())
        } else {
            Err(ParseError::FingerprintMismatch)
        }
    }

    /// The message class.
    pub const fn class(&self) -> Class {
        self.class
    }

    /// The method.
    pub const fn method(&self) -> Method {
        self.method
    }

    /// The transaction ID.
    pub const fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// The whole message as received.
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The attributes in order, up to and including FINGERPRINT (bytes after it are
    /// ignored).
    pub fn attributes(&self) -> Attributes<'a> {
        let body = self
            .bytes
            .get(STUN_HEADER_LEN..self.attrs_end)
            .unwrap_or(&[]);
        Attributes {
            r: Reader::new(body),
        }
    }

    /// The value of the first attribute of type `ty`, padding excluded.
    pub fn attribute(&self, ty: AttributeType) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.ty == ty).map(|a| a.value)
    }

    /// Decodes the first attribute of type `ty`.
    pub fn decode_attribute(
        &self,
        ty: AttributeType,
    ) -> Result<Option<Attribute<'a>>, AttributeError> {
        match self.attributes().find(|a| a.ty == ty) {
            Some(raw) => Attribute::decode(raw, &self.tid).map(Some),
            None => Ok(None),
        }
    }

    /// The comprehension-required attributes (type < 0x8000) this crate does not know, each
    /// listed once, for a 420 response's UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1.1). Fixed
    /// capacity, no heap.
    pub fn unknown_comprehension_required(&self) -> UnknownAttributes {
        let mut unknown = UnknownAttributes::new();
        for a in self.attributes() {
            if a.ty.is_comprehension_required() && !a.ty.is_known() {
                unknown.push(a.ty);
            }
        }
        unknown
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub const fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// Whether MESSAGE-INTEGRITY-SHA256 is present.
    pub const fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Whether FINGERPRINT is present (it was verified by [`Message::parse`]).
    pub const fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) with `key`: the short-term
    /// password, or the long-term key from
    /// [`long_term_key_md5`](crate::credentials::long_term_key_md5). Constant-time compare.
    ///
    /// RFC 8489 §14.5: "The text used as input to HMAC is the STUN message, up to and
    /// including the attribute preceding the MESSAGE-INTEGRITY attribute. The Length field of
    /// the STUN message header is adjusted to point to the end of the MESSAGE-INTEGRITY
    /// attribute."
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), IntegrityError> {
        let offset = self.integrity.ok_or(IntegrityError::Missing)?;
        let mac = self
            .bytes
            .get(offset + 4..offset + INTEGRITY_ATTR_LEN)
            .ok_or(IntegrityError::Missing)?;
        let mut hmac =
            <Hmac<Sha1> as Mac>::new_from_slice(key).map_err(|_| IntegrityError::Mismatch)?;
        self.feed_covered(&mut hmac, offset, INTEGRITY_ATTR_LEN);
        hmac.verify_slice(mac).map_err(|_| IntegrityError::Mismatch)
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, RFC 8489 §14.6) with `key`, accepting a
    /// MAC truncated to 16-28 bytes as §14.6 allows. Constant-time compare.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> Result<(), IntegrityError> {
        let offset = self.integrity_sha256.ok_or(IntegrityError::Missing)?;
        let len = read_u16(self.bytes, offset + 2).ok_or(IntegrityError::Missing)?;
        let len = usize::from(len);
        let mac = self
            .bytes
            .get(offset + 4..offset + 4 + len)
            .ok_or(IntegrityError::Missing)?;
        let mut hmac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| IntegrityError::Mismatch)?;
        self.feed_covered(&mut hmac, offset, 4 + len);
        hmac.verify_truncated_left(mac)
            .map_err(|_| IntegrityError::Mismatch)
    }

    /// Feeds the message up to `offset` into `mac`, with the header length rewritten to end
    /// after an attribute of `attr_len` bytes at `offset`.
    fn feed_covered<M: Mac>(&self, mac: &mut M, offset: usize, attr_len: usize) {
        let adjusted = u16::try_from(offset + attr_len - STUN_HEADER_LEN).unwrap_or(u16::MAX);
        mac.update(self.bytes.get(..2).unwrap_or(&[]));
        mac.update(&adjusted.to_be_bytes());
        mac.update(self.bytes.get(4..offset).unwrap_or(&[]));
    }

    fn first<T>(
        &self,
        ty: AttributeType,
        pick: impl FnOnce(Attribute<'a>) -> Option<T>,
    ) -> Result<Option<T>, AttributeError> {
        match self.decode_attribute(ty)? {
            Some(attr) => pick(attr)
                .map(Some)
                .ok_or(AttributeError::InvalidValue { ty }),
            None => Ok(None),
        }
    }
}

macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident: $ty:ident => $variant:ident($out:ty);)*) => {
        impl<'a> Message<'a> {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> Result<Option<$out>, AttributeError> {
                    self.first(AttributeType::$ty, |a| match a {
                        Attribute::$variant(v) => Some(v),
                        _ => None,
                    })
                }
            )*
        }
    };
}

getters! {
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    mapped_address: MAPPED_ADDRESS => MappedAddress(SocketAddr);
    /// XOR-MAPPED-ADDRESS, de-XORed (RFC 8489 §14.2).
    xor_mapped_address: XOR_MAPPED_ADDRESS => XorMappedAddress(SocketAddr);
    /// USERNAME (RFC 8489 §14.3), UTF-8, fewer than 509 bytes.
    username: USERNAME => Username(&'a str);
    /// USERHASH (RFC 8489 §14.4).
    userhash: USERHASH => Userhash([u8; 32]);
    /// ERROR-CODE (RFC 8489 §14.8).
    error_code: ERROR_CODE => ErrorCode(ErrorCodeAttribute<'a>);
    /// REALM (RFC 8489 §14.9).
    realm: REALM => Realm(&'a str);
    /// NONCE (RFC 8489 §14.10).
    nonce: NONCE => Nonce(&'a str);
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
    password_algorithms: PASSWORD_ALGORITHMS => PasswordAlgorithms(PasswordAlgorithms<'a>);
    /// PASSWORD-ALGORITHM (RFC 8489 §14.12).
    password_algorithm: PASSWORD_ALGORITHM => PasswordAlgorithm(PasswordAlgorithm<'a>);
    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13).
    unknown_attributes: UNKNOWN_ATTRIBUTES => UnknownAttributes(UnknownAttributeList<'a>);
    /// SOFTWARE (RFC 8489 §14.14).
    software: SOFTWARE => Software(&'a str);
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    alternate_server: ALTERNATE_SERVER => AlternateServer(SocketAddr);
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    alternate_domain: ALTERNATE_DOMAIN => AlternateDomain(&'a str);
    /// CHANNEL-NUMBER (RFC 8656 §18.1); a number outside 0x4000-0x7FFF is
    /// [`AttributeError::InvalidChannelNumber`] (answer 400, RFC 8656 §11.2). Numbers
    /// 0x5000-0x7FFF (RFC 5766 only) decode; check [`ChannelNumber::is_rfc8656`].
    channel_number: CHANNEL_NUMBER => ChannelNumber(ChannelNumber);
    /// LIFETIME in seconds (RFC 8656 §18.2).
    lifetime: LIFETIME => Lifetime(u32);
    /// DATA (RFC 8656 §18.4).
    data: DATA => Data(&'a [u8]);
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6); an unknown family is
    /// [`AttributeError::UnsupportedAddressFamily`] (answer 440, RFC 8656 §7.2).
    requested_address_family: REQUESTED_ADDRESS_FAMILY => RequestedAddressFamily(AddressFamily);
    /// EVEN-PORT (RFC 8656 §18.7).
    even_port: EVEN_PORT => EvenPort(EvenPort);
    /// REQUESTED-TRANSPORT (RFC 8656 §18.8).
    requested_transport: REQUESTED_TRANSPORT => RequestedTransport(Protocol);
    /// RESERVATION-TOKEN (RFC 8656 §18.10).
    reservation_token: RESERVATION_TOKEN => ReservationToken(ReservationToken);
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
    additional_address_family: ADDITIONAL_ADDRESS_FAMILY => AdditionalAddressFamily(AddressFamily);
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    address_error_code: ADDRESS_ERROR_CODE => AddressErrorCode(AddressErrorCode<'a>);
    /// ICMP (RFC 8656 §18.13).
    icmp: ICMP => Icmp(Icmp);
    /// CONNECTION-ID (RFC 6062 §6.2.1).
    connection_id: CONNECTION_ID => ConnectionId(ConnectionId);
}

impl<'a> Message<'a> {
    /// DONT-FRAGMENT (RFC 8656 §18.9): `Some(())` when present (it has no value).
    pub fn dont_fragment(&self) -> Result<Option<()>, AttributeError> {
        self.first(AttributeType::DONT_FRAGMENT, |a| {
            matches!(a, Attribute::DontFragment).then_some(())
        })
    }

    /// Every XOR-PEER-ADDRESS, de-XORed, in order (RFC 8656 §18.3; a CreatePermission may
    /// carry several).
    pub fn xor_peer_addresses(&self) -> XorAddresses<'a> {
        XorAddresses {
            attrs: self.attributes(),
            ty: AttributeType::XOR_PEER_ADDRESS,
            tid: self.tid,
        }
    }

    /// Every XOR-RELAYED-ADDRESS, de-XORed, in order (RFC 8656 §18.5; two for a dual-stack
    /// allocation).
    pub fn xor_relayed_addresses(&self) -> XorAddresses<'a> {
        XorAddresses {
            attrs: self.attributes(),
            ty: AttributeType::XOR_RELAYED_ADDRESS,
            tid: self.tid,
        }
    }
}

/// Iterator over a message's attributes; see [`Message::attributes`].
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    r: Reader<'a>,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let ty = AttributeType(self.r.u16()?);
        let len = usize::from(self.r.u16()?);
        let value = self.r.take(len)?;
        // Parse checked that the padding is there; a missing one ends the iteration.
        self.r.take(pad4(len))?;
        Some(RawAttribute { ty, value })
    }
}

/// Iterator over every XOR address attribute of one type; see
/// [`Message::xor_peer_addresses`].
#[derive(Debug, Clone)]
pub struct XorAddresses<'a> {
    attrs: Attributes<'a>,
    ty: AttributeType,
    tid: TransactionId,
}

impl Iterator for XorAddresses<'_> {
    type Item = Result<SocketAddr, AttributeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let ty = self.ty;
        let raw = self.attrs.find(|a| a.ty == ty)?;
        Some(decode_address(ty, raw.value, Some(&self.tid)))
    }
}

/// How many unknown comprehension-required attributes [`UnknownAttributes`] holds. A message
/// with more still gets a 420; the response lists the first ones.
pub const UNKNOWN_ATTRIBUTES_CAPACITY: usize = 16;

/// A fixed-capacity set of unknown attribute types; see
/// [`Message::unknown_comprehension_required`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownAttributes {
    types: [AttributeType; UNKNOWN_ATTRIBUTES_CAPACITY],
    len: usize,
    overflowed: bool,
}

impl UnknownAttributes {
    const fn new() -> Self {
        Self {
            types: [AttributeType(0); UNKNOWN_ATTRIBUTES_CAPACITY],
            len: 0,
            overflowed: false,
        }
    }

    fn push(&mut self, ty: AttributeType) {
        if self.as_slice().contains(&ty) {
            return;
        }
        match self.types.get_mut(self.len) {
            Some(slot) => {
                *slot = ty;
                self.len += 1;
            }
            None => self.overflowed = true,
        }
    }

    /// The types, each once, in order of first appearance.
    pub fn as_slice(&self) -> &[AttributeType] {
        self.types.get(..self.len).unwrap_or(&[])
    }

    /// Whether there are none (the message can be processed).
    pub const fn is_empty(&self) -> bool {
        self.len == 0 && !self.overflowed
    }

    /// How many are listed.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether more distinct unknown types were present than fit.
    pub const fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The list, ready for `Attribute::UnknownAttributes` in a 420 response.
    pub fn as_list(&self) -> UnknownAttributeList<'_> {
        UnknownAttributeList::new(self.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::MessageBuilder;

    const TID: TransactionId = TransactionId([0x11; 12]);

    /// A request with the given raw attributes.
    fn request(attrs: &[(AttributeType, &[u8])]) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::ALLOCATE, TID);
        for (ty, value) in attrs {
            b.raw_attribute(*ty, value).unwrap();
        }
        let len = b.finish();
        buf.truncate(len);
        buf
    }

    /// RFC 8489 §14.7: "the FINGERPRINT attribute MUST be the last attribute in the message";
    /// a receiver ignores anything after it.
    #[test]
    fn attributes_after_fingerprint_are_ignored() {
        let mut bytes = request(&[(AttributeType::USERNAME, b"alice")]);
        let fp_offset = bytes.len();
        // FINGERPRINT, then SOFTWARE; the header length counts both, and so does the CRC.
        bytes.extend_from_slice(&[0x80, 0x28, 0, 4, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0x80, 0x22, 0, 4, b'l', b'a', b't', b'e']);
        let body = u16::try_from(bytes.len() - 20).unwrap();
        bytes[2..4].copy_from_slice(&body.to_be_bytes());
        let crc = crc32fast::hash(&bytes[..fp_offset]) ^ FINGERPRINT_XOR;
        bytes[fp_offset + 4..fp_offset + 8].copy_from_slice(&crc.to_be_bytes());

        let msg = Message::parse(&bytes).unwrap();
        assert!(msg.has_fingerprint());
        assert_eq!(msg.software(), Ok(None));
        let types: Vec<_> = msg.attributes().map(|a| a.ty).collect();
        assert_eq!(types, [AttributeType::USERNAME, AttributeType::FINGERPRINT]);
    }

    /// RFC 8489 §6.3.1.1: "If the request contains one or more unknown comprehension-required
    /// attributes, the server replies with an error response with an error code of 420 [...]
    /// and includes an UNKNOWN-ATTRIBUTES attribute".
    #[test]
    fn unknown_comprehension_required_attributes_are_listed_once_each() {
        let bytes = request(&[
            (AttributeType(0x7000), b"a"),
            (AttributeType::USERNAME, b"u"),
            (AttributeType(0xC000), b"optional"),
            (AttributeType(0x7000), b"again"),
            (AttributeType(0x0031), b""),
            (AttributeType::PRIORITY, &[0; 4]),
        ]);
        let msg = Message::parse(&bytes).unwrap();
        let unknown = msg.unknown_comprehension_required();
        assert_eq!(
            unknown.as_slice(),
            [AttributeType(0x7000), AttributeType(0x0031)]
        );
        assert_eq!(unknown.len(), 2);
        assert!(!unknown.is_empty());
        assert!(!unknown.overflowed());
        assert_eq!(
            unknown.as_list().iter().collect::<Vec<_>>(),
            [AttributeType(0x7000), AttributeType(0x0031)]
        );
    }

    #[test]
    fn more_unknown_attributes_than_fit_are_flagged_as_overflowed() {
        let types: Vec<AttributeType> = (0x7000..0x7000 + 20).map(AttributeType).collect();
        let attrs: Vec<(AttributeType, &[u8])> = types.iter().map(|t| (*t, &b""[..])).collect();
        let msg_bytes = request(&attrs);
        let unknown = Message::parse(&msg_bytes)
            .unwrap()
            .unknown_comprehension_required();
        assert_eq!(unknown.len(), UNKNOWN_ATTRIBUTES_CAPACITY);
        assert!(unknown.overflowed());
        assert!(!unknown.is_empty());
    }

    #[test]
    fn absent_attributes_read_as_none() {
        let bytes = request(&[]);
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(msg.username(), Ok(None));
        assert_eq!(msg.lifetime(), Ok(None));
        assert_eq!(msg.dont_fragment(), Ok(None));
        assert_eq!(msg.xor_peer_addresses().next(), None);
        assert_eq!(msg.attribute(AttributeType::DATA), None);
        assert_eq!(msg.verify_integrity(b"k"), Err(IntegrityError::Missing));
        assert_eq!(
            msg.verify_integrity_sha256(b"k"),
            Err(IntegrityError::Missing)
        );
        assert!(!msg.has_integrity() && !msg.has_integrity_sha256() && !msg.has_fingerprint());
        assert_eq!(msg.as_bytes(), &bytes[..]);
    }

    #[test]
    fn malformed_attribute_values_are_typed_errors_from_their_getters() {
        let long_name = [b'a'; 509];
        let bytes = request(&[
            (AttributeType::XOR_PEER_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4]),
            (AttributeType::CHANNEL_NUMBER, &[0x30, 0x00, 0, 0]),
            (AttributeType::USERNAME, &long_name),
            (AttributeType::REALM, &[0xff, 0xfe]),
            (AttributeType::LIFETIME, &[0, 0, 1]),
            (AttributeType::REQUESTED_ADDRESS_FAMILY, &[0x03, 0, 0, 0]),
            (AttributeType::DONT_FRAGMENT, &[1]),
            (AttributeType::ERROR_CODE, &[0, 0, 7, 0]),
            (AttributeType::XOR_RELAYED_ADDRESS, &[0, 1, 0, 0, 1, 2, 3]),
            (AttributeType::PASSWORD_ALGORITHMS, &[0, 1, 0, 8, 0, 0]),
        ]);
        let msg = Message::parse(&bytes).unwrap();
        let ty = AttributeType::XOR_PEER_ADDRESS;
        assert_eq!(
            msg.xor_peer_addresses().next(),
            Some(Err(AttributeError::UnsupportedAddressFamily {
                ty,
                family: 3
            }))
        );
        assert_eq!(
            msg.channel_number(),
            Err(AttributeError::InvalidChannelNumber(0x3000))
        );
        assert_eq!(
            msg.username(),
            Err(AttributeError::InvalidLength {
                ty: AttributeType::USERNAME,
                len: 509
            })
        );
        assert_eq!(
            msg.realm(),
            Err(AttributeError::InvalidUtf8 {
                ty: AttributeType::REALM
            })
        );
        assert_eq!(
            msg.lifetime(),
            Err(AttributeError::InvalidLength {
                ty: AttributeType::LIFETIME,
                len: 3
            })
        );
        assert_eq!(
            msg.requested_address_family(),
            Err(AttributeError::UnsupportedAddressFamily {
                ty: AttributeType::REQUESTED_ADDRESS_FAMILY,
                family: 3
            })
        );
        assert_eq!(
            msg.dont_fragment(),
            Err(AttributeError::InvalidLength {
                ty: AttributeType::DONT_FRAGMENT,
                len: 1
            })
        );
        assert_eq!(
            msg.error_code(),
            Err(AttributeError::InvalidErrorCode {
                class: 7,
                number: 0
            })
        );
        assert_eq!(
            msg.xor_relayed_addresses().next(),
            Some(Err(AttributeError::InvalidLength {
                ty: AttributeType::XOR_RELAYED_ADDRESS,
                len: 7
            }))
        );
        assert!(matches!(
            msg.password_algorithms(),
            Err(AttributeError::InvalidLength { .. })
        ));
    }

    /// RFC 8656 §10.1: a CreatePermission "MAY contain multiple XOR-PEER-ADDRESS attributes".
    #[test]
    fn every_xor_peer_address_is_returned_in_order() {
        let peers: [SocketAddr; 3] = [
            "192.0.2.1:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
            "192.0.2.3:3".parse().unwrap(),
        ];
        let mut buf = [0u8; 256];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::CREATE_PERMISSION, TID);
        for p in peers {
            b.attribute(&Attribute::XorPeerAddress(p)).unwrap();
        }
        let len = b.finish();
        let msg = Message::parse(&buf[..len]).unwrap();
        let got: Vec<_> = msg.xor_peer_addresses().map(Result::unwrap).collect();
        assert_eq!(got, peers);
    }

    /// RFC 8489 §14.6: the MAC "MUST be at least 16 bytes and MUST be a multiple of 4 bytes";
    /// a truncated MAC is checked over the bytes it has.
    #[test]
    fn a_truncated_message_integrity_sha256_verifies_on_its_prefix() {
        let mut bytes = request(&[(AttributeType::USERNAME, b"alice")]);
        let offset = bytes.len();
        let body = u16::try_from(offset - 20 + 4 + 16).unwrap();
        bytes[2..4].copy_from_slice(&body.to_be_bytes());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"key").unwrap();
        mac.update(&bytes);
        let full = mac.finalize().into_bytes();
        bytes.extend_from_slice(&[0x00, 0x1c, 0x00, 0x10]);
        bytes.extend_from_slice(&full[..16]);
        let msg = Message::parse(&bytes).unwrap();
        assert_eq!(msg.verify_integrity_sha256(b"key"), Ok(()));
        assert_eq!(
            msg.verify_integrity_sha256(b"other"),
            Err(IntegrityError::Mismatch)
        );
    }

    #[test]
    fn an_altered_byte_under_message_integrity_fails_the_check() {
        let mut buf = [0u8; 128];
        let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::REFRESH, TID);
        b.attribute(&Attribute::Lifetime(600)).unwrap();
        b.message_integrity(b"key").unwrap();
        let len = b.finish();
        assert_eq!(
            Message::parse(&buf[..len])
                .unwrap()
                .verify_integrity(b"key"),
            Ok(())
        );
        buf[27] = 0; // LIFETIME 600 -> 512
        let msg = Message::parse(&buf[..len]).unwrap();
        assert_eq!(msg.lifetime(), Ok(Some(512)));
        assert_eq!(msg.verify_integrity(b"key"), Err(IntegrityError::Mismatch));
    }

    #[test]
    fn every_parse_error_has_a_distinct_static_label() {
        let ty = AttributeType::DATA;
        let all = [
            ParseError::TruncatedHeader { len: 0 },
            ParseError::NotStun,
            ParseError::BadMagicCookie,
            ParseError::LengthNotMultipleOfFour { len: 1 },
            ParseError::LengthMismatch {
                header: 0,
                actual: 1,
            },
            ParseError::TruncatedAttributeHeader,
            ParseError::AttributeOverflow { ty },
            ParseError::AttributeAfterIntegrity { ty },
            ParseError::InvalidIntegrityLength { ty },
            ParseError::InvalidFingerprintLength,
            ParseError::FingerprintMismatch,
        ];
        let mut labels: Vec<_> = all.iter().map(ParseError::as_str).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
    }
}
