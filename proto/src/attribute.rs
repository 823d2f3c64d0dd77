//! Typed attributes: the [`Attribute`] enum with its value types, and their wire encodings.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::cursor::{Reader, pad4};
use crate::error::AttributeError;
use crate::types::{AttributeType, MAGIC_COOKIE, TransactionId};

/// A raw attribute as found in a message: its type and its value without padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// The attribute type.
    pub ty: AttributeType,
    /// The value, padding excluded.
    pub value: &'a [u8],
}

/// Address family byte of the address attributes (RFC 8489 §14.1) and of
/// REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.6, §18.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    /// 0x01: IPv4.
    V4,
    /// 0x02: IPv6.
    V6,
}

impl AddressFamily {
    /// The family byte on the wire.
    pub const fn wire(self) -> u8 {
        match self {
            Self::V4 => 0x01,
            Self::V6 => 0x02,
        }
    }

    /// The family from its wire byte, `None` for any other value.
    pub const fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            0x01 => Some(Self::V4),
            0x02 => Some(Self::V6),
            _ => None,
        }
    }

    /// The family of an IP address.
    pub const fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// A TURN channel number.
///
/// RFC 8656 §12: "The channel number is in the range 0x4000 through 0x4FFF (inclusive)."
/// RFC 5766 §11, which it replaced, allowed 0x4000 through 0x7FFF, and clients written for it
/// still pick numbers up there (coturn's `turnutils_uclient` picks them at random). This type
/// holds either range; [`new`](Self::new) admits only RFC 8656's, [`new_rfc5766`](Self::new_rfc5766)
/// the old one, and [`is_rfc8656`](Self::is_rfc8656) tells a server which kind it got, so the
/// choice to bind a legacy number is the server's, not the codec's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// The lowest channel number (RFC 8656 §12).
    pub const MIN: Self = Self(0x4000);
    /// The highest channel number (RFC 8656 §12).
    pub const MAX: Self = Self(0x4FFF);
    /// The highest channel number of RFC 5766 §11.
    pub const MAX_RFC5766: Self = Self(0x7FFF);

    /// The channel number, or `None` outside RFC 8656's 0x4000-0x4FFF.
    pub const fn new(n: u16) -> Option<Self> {
        if n >= Self::MIN.0 && n <= Self::MAX.0 {
            Some(Self(n))
        } else {
            None
        }
    }

    /// The channel number, or `None` outside RFC 5766's 0x4000-0x7FFF.
    pub const fn new_rfc5766(n: u16) -> Option<Self> {
        if n >= Self::MIN.0 && n <= Self::MAX_RFC5766.0 {
            Some(Self(n))
        } else {
            None
        }
    }

    /// Whether the number is in RFC 8656's range (0x4000-0x4FFF).
    pub const fn is_rfc8656(self) -> bool {
        self.0 <= Self::MAX.0
    }

    /// The number as on the wire.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for ChannelNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06x}", self.0)
    }
}

/// A STUN error code 300-699 (RFC 8489 §14.8), with the registered codes as constants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// 300 Try Alternate (RFC 8489 §14.8).
    pub const TRY_ALTERNATE: Self = Self(300);
    /// 400 Bad Request (RFC 8489 §14.8).
    pub const BAD_REQUEST: Self = Self(400);
    /// 401 Unauthenticated (RFC 8489 §14.8; RFC 5389 called it "Unauthorized").
    pub const UNAUTHENTICATED: Self = Self(401);
    /// 403 Forbidden (RFC 8656 §19).
    pub const FORBIDDEN: Self = Self(403);
    /// 405 Mobility Forbidden (RFC 8656 §19).
    pub const MOBILITY_FORBIDDEN: Self = Self(405);
    /// 420 Unknown Attribute (RFC 8489 §14.8).
    pub const UNKNOWN_ATTRIBUTE: Self = Self(420);
    /// 431 Integrity Check Failure (RFC 3489 §11.2.9; dropped from the registry by RFC 5389,
    /// but Cisco Expressway still answers it when MESSAGE-INTEGRITY does not verify).
    pub const INTEGRITY_CHECK_FAILURE: Self = Self(431);
    /// 437 Allocation Mismatch (RFC 8656 §19).
    pub const ALLOCATION_MISMATCH: Self = Self(437);
    /// 438 Stale Nonce (RFC 8489 §14.8).
    pub const STALE_NONCE: Self = Self(438);
    /// 440 Address Family not Supported (RFC 8656 §19).
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: Self = Self(440);
    /// 441 Wrong Credentials (RFC 8656 §19).
    pub const WRONG_CREDENTIALS: Self = Self(441);
    /// 442 Unsupported Transport Protocol (RFC 8656 §19).
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: Self = Self(442);
    /// 443 Peer Address Family Mismatch (RFC 8656 §19).
    pub const PEER_ADDRESS_FAMILY_MISMATCH: Self = Self(443);
    /// 446 Connection Already Exists (RFC 6062 §6.3).
    pub const CONNECTION_ALREADY_EXISTS: Self = Self(446);
    /// 447 Connection Timeout or Failure (RFC 6062 §6.3).
    pub const CONNECTION_TIMEOUT_OR_FAILURE: Self = Self(447);
    /// 486 Allocation Quota Reached (RFC 8656 §19).
    pub const ALLOCATION_QUOTA_REACHED: Self = Self(486);
    /// 487 Role Conflict (RFC 8445 §16.2).
    pub const ROLE_CONFLICT: Self = Self(487);
    /// 500 Server Error (RFC 8489 §14.8).
    pub const SERVER_ERROR: Self = Self(500);
    /// 508 Insufficient Capacity (RFC 8656 §19).
    pub const INSUFFICIENT_CAPACITY: Self = Self(508);

    /// The recommended reason phrase, or "Unknown Error" for an unregistered code.
    pub const fn reason_phrase(self) -> &'static str {
        match self.0 {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthenticated",
            403 => "Forbidden",
            405 => "Mobility Forbidden",
            420 => "Unknown Attribute",
            431 => "Integrity Check Failure",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            446 => "Connection Already Exists",
            447 => "Connection Timeout or Failure",
            486 => "Allocation Quota Reached",
            487 => "Role Conflict",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "Unknown Error",
        }
    }

    /// The hundreds digit (RFC 8489 §14.8 "Class").
    pub const fn class(self) -> u8 {
        (self.0 / 100) as u8
    }

    /// The code modulo 100 (RFC 8489 §14.8 "Number").
    pub const fn number(self) -> u8 {
        (self.0 % 100) as u8
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorCode({} {})", self.0, self.reason_phrase())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.reason_phrase())
    }
}

/// The value of ERROR-CODE (RFC 8489 §14.8): a code and a reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCodeAttribute<'a> {
    /// The error code.
    pub code: ErrorCode,
    /// The reason phrase (UTF-8, at most 763 bytes).
    pub reason: &'a str,
}

impl ErrorCodeAttribute<'static> {
    /// The code with its recommended reason phrase.
    pub const fn new(code: ErrorCode) -> Self {
        Self {
            code,
            reason: code.reason_phrase(),
        }
    }
}

/// The value of ADDRESS-ERROR-CODE (RFC 8656 §18.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressErrorCode<'a> {
    /// The family the error is about.
    pub family: AddressFamily,
    /// 440 or 508.
    pub code: ErrorCode,
    /// The reason phrase.
    pub reason: &'a str,
}

/// An IP protocol number, as in REQUESTED-TRANSPORT (RFC 8656 §18.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protocol(pub u8);

impl Protocol {
    /// TCP, 6 (RFC 6062 §6.1 allocations).
    pub const TCP: Self = Self(6);
    /// UDP, 17: RFC 8656 §18.8 "this specification only allows the use of codepoint 17 (User
    /// Datagram Protocol)".
    pub const UDP: Self = Self(17);
}

/// The value of EVEN-PORT (RFC 8656 §18.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EvenPort {
    /// The R bit: "the server is requested to reserve the next-higher port number".
    pub reserve_next: bool,
}

/// RESERVATION-TOKEN (RFC 8656 §18.10): 8 bytes the server hands out with a reserved port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationToken(pub [u8; 8]);

/// CONNECTION-ID (RFC 6062 §6.2.1): "a 32-bit unsigned integral value".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u32);

/// The value of ICMP (RFC 8656 §18.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Icmp {
    /// ICMP type.
    pub ty: u8,
    /// ICMP code.
    pub code: u8,
    /// Error data (the next-hop MTU for "packet too big" / "fragmentation needed").
    pub data: u32,
}

/// A password algorithm number (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasswordAlgorithmId(pub u16);

impl PasswordAlgorithmId {
    /// MD5, 0x0001 (RFC 8489 §18.5.1.1).
    pub const MD5: Self = Self(0x0001);
    /// SHA-256, 0x0002 (RFC 8489 §18.5.1.2).
    pub const SHA256: Self = Self(0x0002);
}

/// One password algorithm with its parameters (RFC 8489 §14.11, §14.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordAlgorithm<'a> {
    /// The algorithm.
    pub algorithm: PasswordAlgorithmId,
    /// Its parameters, padding excluded (empty for MD5 and SHA-256).
    pub params: &'a [u8],
}

impl PasswordAlgorithm<'static> {
    /// MD5 without parameters.
    pub const MD5: Self = Self {
        algorithm: PasswordAlgorithmId::MD5,
        params: &[],
    };
    /// SHA-256 without parameters.
    pub const SHA256: Self = Self {
        algorithm: PasswordAlgorithmId::SHA256,
        params: &[],
    };
}

impl PasswordAlgorithm<'_> {
    fn encoded_len(&self) -> usize {
        4 + self.params.len() + pad4(self.params.len())
    }
}

/// The list in PASSWORD-ALGORITHMS (RFC 8489 §14.11), either as received or as given.
#[derive(Clone, Copy)]
pub struct PasswordAlgorithms<'a>(AlgorithmsRepr<'a>);

#[derive(Clone, Copy)]
enum AlgorithmsRepr<'a> {
    Wire(&'a [u8]),
    List(&'a [PasswordAlgorithm<'a>]),
}

impl<'a> PasswordAlgorithms<'a> {
    /// A list to encode.
    pub const fn new(list: &'a [PasswordAlgorithm<'a>]) -> Self {
        Self(AlgorithmsRepr::List(list))
    }

    /// Validates a received value.
    fn from_wire(value: &'a [u8]) -> Result<Self, AttributeError> {
        let mut r = Reader::new(value);
        while !r.is_empty() {
            read_algorithm(&mut r, AttributeType::PASSWORD_ALGORITHMS, true)?;
        }
        Ok(Self(AlgorithmsRepr::Wire(value)))
    }

    /// The algorithms, in order of preference.
    pub fn iter(&self) -> PasswordAlgorithmsIter<'a> {
        match self.0 {
            AlgorithmsRepr::Wire(w) => PasswordAlgorithmsIter(IterRepr::Wire(Reader::new(w))),
            AlgorithmsRepr::List(l) => PasswordAlgorithmsIter(IterRepr::List(l.iter())),
        }
    }

    fn encoded_len(&self) -> usize {
        match self.0 {
            AlgorithmsRepr::Wire(w) => w.len(),
            AlgorithmsRepr::List(l) => l.iter().map(PasswordAlgorithm::encoded_len).sum(),
        }
    }
}

impl PartialEq for PasswordAlgorithms<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for PasswordAlgorithms<'_> {}

impl fmt::Debug for PasswordAlgorithms<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over [`PasswordAlgorithms`].
#[derive(Debug, Clone)]
pub struct PasswordAlgorithmsIter<'a>(IterRepr<'a, PasswordAlgorithm<'a>>);

#[derive(Debug, Clone)]
enum IterRepr<'a, T> {
    Wire(Reader<'a>),
    List(core::slice::Iter<'a, T>),
}

impl<'a> Iterator for PasswordAlgorithmsIter<'a> {
    type Item = PasswordAlgorithm<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            IterRepr::Wire(r) => read_algorithm(r, AttributeType::PASSWORD_ALGORITHMS, true).ok(),
            IterRepr::List(l) => l.next().copied(),
        }
    }
}

/// The list in UNKNOWN-ATTRIBUTES (RFC 8489 §14.13), either as received or as given.
#[derive(Clone, Copy)]
pub struct UnknownAttributeList<'a>(UnknownRepr<'a>);

#[derive(Clone, Copy)]
enum UnknownRepr<'a> {
    Wire(&'a [u8]),
    List(&'a [AttributeType]),
}

impl<'a> UnknownAttributeList<'a> {
    /// A list to encode.
    pub const fn new(list: &'a [AttributeType]) -> Self {
        Self(UnknownRepr::List(list))
    }

    /// The attribute types.
    pub fn iter(&self) -> UnknownAttributeListIter<'a> {
        match self.0 {
            UnknownRepr::Wire(w) => UnknownAttributeListIter(IterRepr::Wire(Reader::new(w))),
            UnknownRepr::List(l) => UnknownAttributeListIter(IterRepr::List(l.iter())),
        }
    }

    fn encoded_len(&self) -> usize {
        match self.0 {
            UnknownRepr::Wire(w) => w.len(),
            UnknownRepr::List(l) => l.len() * 2,
        }
    }
}

impl PartialEq for UnknownAttributeList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for UnknownAttributeList<'_> {}

impl fmt::Debug for UnknownAttributeList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over [`UnknownAttributeList`].
#[derive(Debug, Clone)]
pub struct UnknownAttributeListIter<'a>(IterRepr<'a, AttributeType>);

impl Iterator for UnknownAttributeListIter<'_> {
    type Item = AttributeType;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            IterRepr::Wire(r) => r.u16().map(AttributeType),
            IterRepr::List(l) => l.next().copied(),
        }
    }
}

/// A typed attribute of RFC 8489, RFC 8656 or RFC 6062, or any other as raw bytes.
///
/// Decode one with [`Attribute::decode`]; encode one with
/// [`MessageBuilder::attribute`](crate::MessageBuilder::attribute). The XOR address variants
/// hold the plain address; the codec applies the XOR with the message's transaction ID.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute<'a> {
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    XorMappedAddress(SocketAddr),
    /// USERNAME (RFC 8489 §14.3): UTF-8, fewer than 509 bytes.
    Username(&'a str),
    /// USERHASH (RFC 8489 §14.4): SHA-256 of username and realm.
    Userhash([u8; 32]),
    /// MESSAGE-INTEGRITY (RFC 8489 §14.5): HMAC-SHA1. Normally appended with
    /// [`MessageBuilder::message_integrity`](crate::MessageBuilder::message_integrity).
    MessageIntegrity([u8; 20]),
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6): HMAC-SHA256, 16 to 32 bytes.
    MessageIntegritySha256(&'a [u8]),
    /// FINGERPRINT (RFC 8489 §14.7): CRC-32 XOR 0x5354554E. Normally appended with
    /// [`MessageBuilder::fingerprint`](crate::MessageBuilder::fingerprint).
    Fingerprint(u32),
    /// ERROR-CODE (RFC 8489 §14.8).
    ErrorCode(ErrorCodeAttribute<'a>),
    /// REALM (RFC 8489 §14.9).
    Realm(&'a str),
    /// NONCE (RFC 8489 §14.10).
    Nonce(&'a str),
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
    PasswordAlgorithms(PasswordAlgorithms<'a>),
    /// PASSWORD-ALGORITHM (RFC 8489 §14.12).
    PasswordAlgorithm(PasswordAlgorithm<'a>),
    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13).
    UnknownAttributes(UnknownAttributeList<'a>),
    /// SOFTWARE (RFC 8489 §14.14).
    Software(&'a str),
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    AlternateServer(SocketAddr),
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    AlternateDomain(&'a str),
    /// CHANNEL-NUMBER (RFC 8656 §18.1).
    ChannelNumber(ChannelNumber),
    /// LIFETIME in seconds (RFC 8656 §18.2).
    Lifetime(u32),
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    XorPeerAddress(SocketAddr),
    /// DATA (RFC 8656 §18.4).
    Data(&'a [u8]),
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    XorRelayedAddress(SocketAddr),
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
    RequestedAddressFamily(AddressFamily),
    /// EVEN-PORT (RFC 8656 §18.7).
    EvenPort(EvenPort),
    /// REQUESTED-TRANSPORT (RFC 8656 §18.8).
    RequestedTransport(Protocol),
    /// DONT-FRAGMENT (RFC 8656 §18.9).
    DontFragment,
    /// RESERVATION-TOKEN (RFC 8656 §18.10).
    ReservationToken(ReservationToken),
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
    AdditionalAddressFamily(AddressFamily),
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    AddressErrorCode(AddressErrorCode<'a>),
    /// ICMP (RFC 8656 §18.13).
    Icmp(Icmp),
    /// CONNECTION-ID (RFC 6062 §6.2.1).
    ConnectionId(ConnectionId),
    /// Any other attribute, value without padding.
    Other(RawAttribute<'a>),
}

/// Longest USERNAME: RFC 8489 §14.3 "fewer than 509 bytes".
pub const USERNAME_LEN_MAX: usize = 508;
/// Longest REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN and reason phrase when decoding:
/// RFC 8489 §14.8-14.10, §14.14 "can be as long as 763 bytes when decoding them".
pub const TEXT_LEN_MAX: usize = 763;

impl<'a> Attribute<'a> {
    /// Decodes a raw attribute. `tid` is the message's transaction ID, needed for XOR
    /// addresses. Unknown types become [`Attribute::Other`].
    pub fn decode(raw: RawAttribute<'a>, tid: &TransactionId) -> Result<Self, AttributeError> {
        let RawAttribute { ty, value } = raw;
        Ok(match ty {
            AttributeType::MAPPED_ADDRESS => Self::MappedAddress(decode_address(ty, value, None)?),
            AttributeType::XOR_MAPPED_ADDRESS => {
                Self::XorMappedAddress(decode_address(ty, value, Some(tid))?)
            }
            AttributeType::USERNAME => Self::Username(decode_text(ty, value, USERNAME_LEN_MAX)?),
            AttributeType::USERHASH => Self::Userhash(decode_array(ty, value)?),
            AttributeType::MESSAGE_INTEGRITY => Self::MessageIntegrity(decode_array(ty, value)?),
            AttributeType::MESSAGE_INTEGRITY_SHA256 => {
                if !valid_sha256_mac_len(value.len()) {
                    return Err(invalid_len(ty, value));
                }
                Self::MessageIntegritySha256(value)
            }
            AttributeType::FINGERPRINT => {
                Self::Fingerprint(u32::from_be_bytes(decode_array(ty, value)?))
            }
            AttributeType::ERROR_CODE => Self::ErrorCode(decode_error_code(value)?),
            AttributeType::REALM => Self::Realm(decode_text(ty, value, TEXT_LEN_MAX)?),
            AttributeType::NONCE => Self::Nonce(decode_text(ty, value, TEXT_LEN_MAX)?),
            AttributeType::PASSWORD_ALGORITHMS => {
                Self::PasswordAlgorithms(PasswordAlgorithms::from_wire(value)?)
            }
            AttributeType::PASSWORD_ALGORITHM => {
                let mut r = Reader::new(value);
                let alg = read_algorithm(&mut r, ty, false)?;
                if !r.is_empty() {
                    return Err(invalid_len(ty, value));
                }
                Self::PasswordAlgorithm(alg)
            }
            AttributeType::UNKNOWN_ATTRIBUTES => {
                if value.len() % 2 != 0 {
                    return Err(invalid_len(ty, value));
                }
                Self::UnknownAttributes(UnknownAttributeList(UnknownRepr::Wire(value)))
            }
            AttributeType::SOFTWARE => Self::Software(decode_text(ty, value, TEXT_LEN_MAX)?),
            AttributeType::ALTERNATE_SERVER => {
                Self::AlternateServer(decode_address(ty, value, None)?)
            }
            AttributeType::ALTERNATE_DOMAIN => {
                Self::AlternateDomain(decode_text(ty, value, TEXT_LEN_MAX)?)
            }
            AttributeType::CHANNEL_NUMBER => {
                // RFC 8656 §18.1: channel number (16 bits) then RFFU (16 bits).
                let [hi, lo, _, _] = decode_array::<4>(ty, value)?;
                let n = u16::from_be_bytes([hi, lo]);
                // The codec admits RFC 5766's wider range; whether to bind such a number is the
                // server's decision (ChannelNumber::is_rfc8656).
                Self::ChannelNumber(
                    ChannelNumber::new_rfc5766(n).ok_or(AttributeError::InvalidChannelNumber(n))?,
                )
            }
            AttributeType::LIFETIME => Self::Lifetime(u32::from_be_bytes(decode_array(ty, value)?)),
            AttributeType::XOR_PEER_ADDRESS => {
                Self::XorPeerAddress(decode_address(ty, value, Some(tid))?)
            }
            AttributeType::DATA => Self::Data(value),
            AttributeType::XOR_RELAYED_ADDRESS => {
                Self::XorRelayedAddress(decode_address(ty, value, Some(tid))?)
            }
            AttributeType::REQUESTED_ADDRESS_FAMILY => {
                Self::RequestedAddressFamily(decode_family_attribute(ty, value)?)
            }
            AttributeType::ADDITIONAL_ADDRESS_FAMILY => {
                Self::AdditionalAddressFamily(decode_family_attribute(ty, value)?)
            }
            AttributeType::EVEN_PORT => {
                // RFC 8656 §18.7: one byte, R bit first, then 7 RFFU bits.
                let [flags] = decode_array::<1>(ty, value)?;
                Self::EvenPort(EvenPort {
                    reserve_next: flags & 0x80 != 0,
                })
            }
            AttributeType::REQUESTED_TRANSPORT => {
                // RFC 8656 §18.8: protocol (8 bits) then RFFU (24 bits).
                let [proto, _, _, _] = decode_array::<4>(ty, value)?;
                Self::RequestedTransport(Protocol(proto))
            }
            AttributeType::DONT_FRAGMENT => {
                // RFC 8656 §18.9: "This attribute has no value part".
                if !value.is_empty() {
                    return Err(invalid_len(ty, value));
                }
                Self::DontFragment
            }
            AttributeType::RESERVATION_TOKEN => {
                Self::ReservationToken(ReservationToken(decode_array(ty, value)?))
            }
            AttributeType::ADDRESS_ERROR_CODE => {
                Self::AddressErrorCode(decode_address_error(value)?)
            }
            AttributeType::ICMP => {
                let [_, _, ty_, code, d0, d1, d2, d3] = decode_array::<8>(ty, value)?;
                Self::Icmp(Icmp {
                    ty: ty_,
                    code,
                    data: u32::from_be_bytes([d0, d1, d2, d3]),
                })
            }
            AttributeType::CONNECTION_ID => {
                Self::ConnectionId(ConnectionId(u32::from_be_bytes(decode_array(ty, value)?)))
            }
            _ => Self::Other(raw),
        })
    }

    /// The attribute's type.
    pub const fn ty(&self) -> AttributeType {
        match self {
            Self::MappedAddress(_) => AttributeType::MAPPED_ADDRESS,
            Self::XorMappedAddress(_) => AttributeType::XOR_MAPPED_ADDRESS,
            Self::Username(_) => AttributeType::USERNAME,
            Self::Userhash(_) => AttributeType::USERHASH,
            Self::MessageIntegrity(_) => AttributeType::MESSAGE_INTEGRITY,
            Self::MessageIntegritySha256(_) => AttributeType::MESSAGE_INTEGRITY_SHA256,
            Self::Fingerprint(_) => AttributeType::FINGERPRINT,
            Self::ErrorCode(_) => AttributeType::ERROR_CODE,
            Self::Realm(_) => AttributeType::REALM,
            Self::Nonce(_) => AttributeType::NONCE,
            Self::PasswordAlgorithms(_) => AttributeType::PASSWORD_ALGORITHMS,
            Self::PasswordAlgorithm(_) => AttributeType::PASSWORD_ALGORITHM,
            Self::UnknownAttributes(_) => AttributeType::UNKNOWN_ATTRIBUTES,
            Self::Software(_) => AttributeType::SOFTWARE,
            Self::AlternateServer(_) => AttributeType::ALTERNATE_SERVER,
            Self::AlternateDomain(_) => AttributeType::ALTERNATE_DOMAIN,
            Self::ChannelNumber(_) => AttributeType::CHANNEL_NUMBER,
            Self::Lifetime(_) => AttributeType::LIFETIME,
            Self::XorPeerAddress(_) => AttributeType::XOR_PEER_ADDRESS,
            Self::Data(_) => AttributeType::DATA,
            Self::XorRelayedAddress(_) => AttributeType::XOR_RELAYED_ADDRESS,
            Self::RequestedAddressFamily(_) => AttributeType::REQUESTED_ADDRESS_FAMILY,
            Self::EvenPort(_) => AttributeType::EVEN_PORT,
            Self::RequestedTransport(_) => AttributeType::REQUESTED_TRANSPORT,
            Self::DontFragment => AttributeType::DONT_FRAGMENT,
            Self::ReservationToken(_) => AttributeType::RESERVATION_TOKEN,
            Self::AdditionalAddressFamily(_) => AttributeType::ADDITIONAL_ADDRESS_FAMILY,
            Self::AddressErrorCode(_) => AttributeType::ADDRESS_ERROR_CODE,
            Self::Icmp(_) => AttributeType::ICMP,
            Self::ConnectionId(_) => AttributeType::CONNECTION_ID,
            Self::Other(raw) => raw.ty,
        }
    }

    /// Length of the encoded value, padding excluded.
    pub fn value_len(&self) -> usize {
        match self {
            Self::MappedAddress(a)
            | Self::XorMappedAddress(a)
            | Self::AlternateServer(a)
            | Self::XorPeerAddress(a)
            | Self::XorRelayedAddress(a) => address_len(a),
            Self::Username(s)
            | Self::Realm(s)
            | Self::Nonce(s)
            | Self::Software(s)
            | Self::AlternateDomain(s) => s.len(),
            Self::Userhash(_) => 32,
            Self::MessageIntegrity(_) => 20,
            Self::MessageIntegritySha256(v) | Self::Data(v) => v.len(),
            Self::Fingerprint(_)
            | Self::ChannelNumber(_)
            | Self::Lifetime(_)
            | Self::RequestedAddressFamily(_)
            | Self::AdditionalAddressFamily(_)
            | Self::RequestedTransport(_)
            | Self::ConnectionId(_) => 4,
            Self::ErrorCode(e) => 4 + e.reason.len(),
            Self::AddressErrorCode(e) => 4 + e.reason.len(),
            Self::PasswordAlgorithms(p) => p.encoded_len(),
            Self::PasswordAlgorithm(p) => 4 + p.params.len(),
            Self::UnknownAttributes(u) => u.encoded_len(),
            Self::EvenPort(_) => 1,
            Self::DontFragment => 0,
            Self::ReservationToken(_) | Self::Icmp(_) => 8,
            Self::Other(raw) => raw.value.len(),
        }
    }

    /// Writes the value into `out`, which must be exactly [`value_len`](Self::value_len)
    /// bytes; `tid` is the message's transaction ID (for the XOR addresses).
    pub(crate) fn write_value(&self, out: &mut [u8], tid: &TransactionId) {
        let mut w = Writer { buf: out, pos: 0 };
        match self {
            Self::MappedAddress(a) | Self::AlternateServer(a) => write_address(&mut w, a, None),
            Self::XorMappedAddress(a) | Self::XorPeerAddress(a) | Self::XorRelayedAddress(a) => {
                write_address(&mut w, a, Some(tid));
            }
            Self::Username(s)
            | Self::Realm(s)
            | Self::Nonce(s)
            | Self::Software(s)
            | Self::AlternateDomain(s) => w.bytes(s.as_bytes()),
            Self::Userhash(h) => w.bytes(h),
            Self::MessageIntegrity(m) => w.bytes(m),
            Self::MessageIntegritySha256(v) | Self::Data(v) => w.bytes(v),
            Self::Fingerprint(v) | Self::Lifetime(v) => w.bytes(&v.to_be_bytes()),
            Self::ConnectionId(c) => w.bytes(&c.0.to_be_bytes()),
            Self::ErrorCode(e) => {
                w.bytes(&[0, 0, e.code.class() & 0x07, e.code.number()]);
                w.bytes(e.reason.as_bytes());
            }
            Self::AddressErrorCode(e) => {
                w.bytes(&[e.family.wire(), 0, e.code.class() & 0x07, e.code.number()]);
                w.bytes(e.reason.as_bytes());
            }
            Self::PasswordAlgorithms(p) => match p.0 {
                AlgorithmsRepr::Wire(wire) => w.bytes(wire),
                AlgorithmsRepr::List(list) => {
                    for alg in list {
                        write_algorithm(&mut w, alg, true);
                    }
                }
            },
            Self::PasswordAlgorithm(p) => write_algorithm(&mut w, p, false),
            Self::UnknownAttributes(u) => {
                for ty in u.iter() {
                    w.bytes(&ty.0.to_be_bytes());
                }
            }
            Self::ChannelNumber(c) => {
                w.bytes(&c.get().to_be_bytes());
                w.bytes(&[0, 0]);
            }
            Self::RequestedAddressFamily(f) | Self::AdditionalAddressFamily(f) => {
                w.bytes(&[f.wire(), 0, 0, 0]);
            }
            Self::EvenPort(e) => w.bytes(&[if e.reserve_next { 0x80 } else { 0 }]),
            Self::RequestedTransport(p) => w.bytes(&[p.0, 0, 0, 0]),
            Self::DontFragment => {}
            Self::ReservationToken(t) => w.bytes(&t.0),
            Self::Icmp(i) => {
                w.bytes(&[0, 0, i.ty, i.code]);
                w.bytes(&i.data.to_be_bytes());
            }
            Self::Other(raw) => w.bytes(raw.value),
        }
        debug_assert_eq!(w.pos, w.buf.len(), "value_len and write_value disagree");
    }
}

/// A writer over a slice sized exactly by `value_len`; overflowing writes are dropped (and
/// caught by the debug assertion in `write_value`).
struct Writer<'w> {
    buf: &'w mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        if crate::cursor::put(self.buf, self.pos, b) {
            self.pos += b.len();
        }
    }
}

/// RFC 8489 §14.6: the MAC "MUST be at least 16 bytes and MUST be a multiple of 4 bytes", at
/// most 32.
pub(crate) const fn valid_sha256_mac_len(len: usize) -> bool {
    len >= 16 && len <= 32 && len % 4 == 0
}

const fn address_len(a: &SocketAddr) -> usize {
    match a {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

fn invalid_len(ty: AttributeType, value: &[u8]) -> AttributeError {
    AttributeError::InvalidLength {
        ty,
        len: value.len(),
    }
}

fn decode_array<const N: usize>(
    ty: AttributeType,
    value: &[u8],
) -> Result<[u8; N], AttributeError> {
    value.try_into().map_err(|_| invalid_len(ty, value))
}

fn decode_text(ty: AttributeType, value: &[u8], max: usize) -> Result<&str, AttributeError> {
    if value.len() > max {
        return Err(invalid_len(ty, value));
    }
    core::str::from_utf8(value).map_err(|_| AttributeError::InvalidUtf8 { ty })
}

/// RFC 8489 §14.1 / §14.2: reserved byte, family, port, address; XORed with the magic cookie
/// (and the transaction ID for IPv6) when `xor` is given.
pub(crate) fn decode_address(
    ty: AttributeType,
    value: &[u8],
    xor: Option<&TransactionId>,
) -> Result<SocketAddr, AttributeError> {
    let mut r = Reader::new(value);
    let (Some(_reserved), Some(family), Some(port)) = (r.u8(), r.u8(), r.u16()) else {
        return Err(invalid_len(ty, value));
    };
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = if xor.is_some() { port ^ 0x2112 } else { port };
    match AddressFamily::from_wire(family) {
        Some(AddressFamily::V4) => {
            let Some(mut ip) = r.array::<4>().filter(|_| r.is_empty()) else {
                return Err(invalid_len(ty, value));
            };
            if xor.is_some() {
                for (b, k) in ip.iter_mut().zip(cookie) {
                    *b ^= k;
                }
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        Some(AddressFamily::V6) => {
            let Some(mut ip) = r.array::<16>().filter(|_| r.is_empty()) else {
                return Err(invalid_len(ty, value));
            };
            if let Some(tid) = xor {
                let key = cookie.iter().chain(tid.0.iter());
                for (b, k) in ip.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        None => Err(AttributeError::UnsupportedAddressFamily { ty, family }),
    }
}

fn write_address(w: &mut Writer<'_>, a: &SocketAddr, xor: Option<&TransactionId>) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = if xor.is_some() {
        a.port() ^ 0x2112
    } else {
        a.port()
    };
    let family = AddressFamily::of(&a.ip());
    w.bytes(&[0, family.wire()]);
    w.bytes(&port.to_be_bytes());
    match a.ip() {
        IpAddr::V4(ip) => {
            let mut o = ip.octets();
            if xor.is_some() {
                for (b, k) in o.iter_mut().zip(cookie) {
                    *b ^= k;
                }
            }
            w.bytes(&o);
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            if let Some(tid) = xor {
                for (b, k) in o.iter_mut().zip(cookie.iter().chain(tid.0.iter())) {
                    *b ^= k;
                }
            }
            w.bytes(&o);
        }
    }
}

/// RFC 8489 §14.8: 21 reserved bits, class (3 bits, 3-6), number (8 bits, 0-99), reason.
fn decode_error_code(value: &[u8]) -> Result<ErrorCodeAttribute<'_>, AttributeError> {
    let ty = AttributeType::ERROR_CODE;
    let mut r = Reader::new(value);
    let Some([_, _, class, number]) = r.array::<4>() else {
        return Err(invalid_len(ty, value));
    };
    let code = decode_code(class, number)?;
    let reason = decode_text(ty, r.rest(), TEXT_LEN_MAX)?;
    Ok(ErrorCodeAttribute { code, reason })
}

fn decode_code(class: u8, number: u8) -> Result<ErrorCode, AttributeError> {
    let class = class & 0x07;
    if !(3..=6).contains(&class) || number > 99 {
        return Err(AttributeError::InvalidErrorCode { class, number });
    }
    Ok(ErrorCode(u16::from(class) * 100 + u16::from(number)))
}

/// RFC 8656 §18.12: family, 13 reserved bits, class, number, reason.
fn decode_address_error(value: &[u8]) -> Result<AddressErrorCode<'_>, AttributeError> {
    let ty = AttributeType::ADDRESS_ERROR_CODE;
    let mut r = Reader::new(value);
    let Some([family, _, class, number]) = r.array::<4>() else {
        return Err(invalid_len(ty, value));
    };
    let family = AddressFamily::from_wire(family)
        .ok_or(AttributeError::UnsupportedAddressFamily { ty, family })?;
    let code = decode_code(class, number)?;
    let reason = decode_text(ty, r.rest(), TEXT_LEN_MAX)?;
    Ok(AddressErrorCode {
        family,
        code,
        reason,
    })
}

/// RFC 8656 §18.6 / §18.11: family (8 bits), then 24 reserved bits.
fn decode_family_attribute(
    ty: AttributeType,
    value: &[u8],
) -> Result<AddressFamily, AttributeError> {
    let [family, _, _, _] = decode_array::<4>(ty, value)?;
    AddressFamily::from_wire(family).ok_or(AttributeError::UnsupportedAddressFamily { ty, family })
}

/// RFC 8489 §14.11 / §14.12: algorithm (16 bits), parameters length (16 bits), parameters.
/// Inside PASSWORD-ALGORITHMS each entry's parameters are padded to 4 bytes (`padded`).
fn read_algorithm<'a>(
    r: &mut Reader<'a>,
    ty: AttributeType,
    padded: bool,
) -> Result<PasswordAlgorithm<'a>, AttributeError> {
    let bad = AttributeError::InvalidLength {
        ty,
        len: r.rest().len(),
    };
    let (Some(algorithm), Some(len)) = (r.u16(), r.u16()) else {
        return Err(bad);
    };
    let len = usize::from(len);
    let params = r.take(len).ok_or(bad)?;
    if padded {
        r.take(pad4(len)).ok_or(bad)?;
    }
    Ok(PasswordAlgorithm {
        algorithm: PasswordAlgorithmId(algorithm),
        params,
    })
}

fn write_algorithm(w: &mut Writer<'_>, alg: &PasswordAlgorithm<'_>, padded: bool) {
    w.bytes(&alg.algorithm.0.to_be_bytes());
    let len = u16::try_from(alg.params.len()).unwrap_or(u16::MAX);
    w.bytes(&len.to_be_bytes());
    w.bytes(alg.params);
    if padded {
        w.bytes([0u8; 3].get(..pad4(alg.params.len())).unwrap_or(&[]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8656 §12: "The channel number is in the range 0x4000 through 0x4FFF (inclusive)."
    #[test]
    fn channel_numbers_exist_only_from_0x4000_to_0x4fff() {
        assert_eq!(ChannelNumber::new(0x3FFF), None);
        assert_eq!(ChannelNumber::new(0x4000), Some(ChannelNumber::MIN));
        assert_eq!(ChannelNumber::new(0x4FFF), Some(ChannelNumber::MAX));
        assert_eq!(ChannelNumber::new(0x5000), None);
        let legacy = ChannelNumber::new_rfc5766(0x7FFF).unwrap();
        assert!(!legacy.is_rfc8656());
        assert!(ChannelNumber::MAX.is_rfc8656());
        assert_eq!(ChannelNumber::new_rfc5766(0x8000), None);
        assert_eq!(ChannelNumber::new_rfc5766(0x3FFF), None);
        assert_eq!(ChannelNumber::MIN.to_string(), "0x4000");
    }

    #[test]
    fn error_codes_carry_their_registered_reason_phrases() {
        let table = [
            (ErrorCode::BAD_REQUEST, 400, "Bad Request"),
            (ErrorCode::UNAUTHENTICATED, 401, "Unauthenticated"),
            (ErrorCode::FORBIDDEN, 403, "Forbidden"),
            (ErrorCode::UNKNOWN_ATTRIBUTE, 420, "Unknown Attribute"),
            (
                ErrorCode::INTEGRITY_CHECK_FAILURE,
                431,
                "Integrity Check Failure",
            ),
            (ErrorCode::ALLOCATION_MISMATCH, 437, "Allocation Mismatch"),
            (ErrorCode::STALE_NONCE, 438, "Stale Nonce"),
            (
                ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
                440,
                "Address Family not Supported",
            ),
            (ErrorCode::WRONG_CREDENTIALS, 441, "Wrong Credentials"),
            (
                ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL,
                442,
                "Unsupported Transport Protocol",
            ),
            (
                ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
                443,
                "Peer Address Family Mismatch",
            ),
            (
                ErrorCode::CONNECTION_ALREADY_EXISTS,
                446,
                "Connection Already Exists",
            ),
            (
                ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE,
                447,
                "Connection Timeout or Failure",
            ),
            (
                ErrorCode::ALLOCATION_QUOTA_REACHED,
                486,
                "Allocation Quota Reached",
            ),
            (ErrorCode::SERVER_ERROR, 500, "Server Error"),
            (
                ErrorCode::INSUFFICIENT_CAPACITY,
                508,
                "Insufficient Capacity",
            ),
        ];
        for (code, n, phrase) in table {
            assert_eq!(code.0, n);
            assert_eq!(code.reason_phrase(), phrase);
            assert_eq!(u16::from(code.class()) * 100 + u16::from(code.number()), n);
        }
        assert_eq!(ErrorCode(499).reason_phrase(), "Unknown Error");
    }

    /// RFC 8489 §14.8: "The Class represents the hundreds digit of the error code. The value
    /// MUST be between 3 and 6. The Number represents the binary encoding of the error code
    /// modulo 100, and its value MUST be between 0 and 99."
    #[test]
    fn error_codes_outside_class_3_to_6_or_number_0_to_99_are_refused() {
        let tid = TransactionId([0; 12]);
        let raw = |value| RawAttribute {
            ty: AttributeType::ERROR_CODE,
            value,
        };
        for (value, class, number) in [
            (&[0, 0, 2, 0][..], 2, 0),
            (&[0, 0, 7, 0], 7, 0),
            (&[0, 0, 4, 100], 4, 100),
        ] {
            assert_eq!(
                Attribute::decode(raw(value), &tid),
                Err(AttributeError::InvalidErrorCode { class, number })
            );
        }
        assert_eq!(
            Attribute::decode(raw(&[0, 0, 3]), &tid),
            Err(AttributeError::InvalidLength {
                ty: AttributeType::ERROR_CODE,
                len: 3
            })
        );
        assert_eq!(
            Attribute::decode(raw(b"\0\0\x06\x63ok"), &tid),
            Ok(Attribute::ErrorCode(ErrorCodeAttribute {
                code: ErrorCode(699),
                reason: "ok"
            }))
        );
    }

    /// RFC 8489 §14.2: "X-Port is computed by XOR'ing the mapped port with the most
    /// significant 16 bits of the magic cookie."
    #[test]
    fn xor_addresses_hide_the_port_and_ip_behind_the_cookie_and_transaction_id() {
        let tid = TransactionId([0xAB; 12]);
        let a: SocketAddr = "[::1]:8".parse().unwrap();
        let attr = Attribute::XorPeerAddress(a);
        let mut value = [0u8; 20];
        attr.write_value(&mut value, &tid);
        assert_eq!(value[..4], [0, 2, 0x21, 0x1a]);
        assert_eq!(value[4..8], MAGIC_COOKIE.to_be_bytes());
        assert_eq!(value[19], 0xAB ^ 1);
        let raw = RawAttribute {
            ty: AttributeType::XOR_PEER_ADDRESS,
            value: &value,
        };
        assert_eq!(Attribute::decode(raw, &tid), Ok(attr));
    }
}
