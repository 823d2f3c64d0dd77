//! Header-level wire types: message class and method, transaction ID, attribute types.

use core::fmt;

/// The magic cookie, fixed at 0x2112A442 in network byte order (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Length of the STUN message header (RFC 8489 §5).
pub const STUN_HEADER_LEN: usize = 20;

/// Largest value of the header's message length field: 16 bits, a multiple of 4 (RFC 8489 §5).
pub const STUN_BODY_LEN_MAX: usize = 0xFFFC;

/// Largest STUN message, header included.
pub const STUN_MESSAGE_LEN_MAX: usize = STUN_HEADER_LEN + STUN_BODY_LEN_MAX;

/// The 96-bit transaction ID (RFC 8489 §5): "uniformly and randomly chosen from the interval
/// 0 .. 2**96-1, and MUST be cryptographically random".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// The raw 12 bytes.
    pub const fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransactionId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The message class, two bits spread over the message type (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// 0b00: a request, which expects a response.
    Request,
    /// 0b01: an indication, which gets no response.
    Indication,
    /// 0b10: a success response.
    SuccessResponse,
    /// 0b11: an error response.
    ErrorResponse,
}

impl Class {
    /// The two class bits C1 C0 as a number 0-3.
    pub const fn bits(self) -> u16 {
        match self {
            Self::Request => 0b00,
            Self::Indication => 0b01,
            Self::SuccessResponse => 0b10,
            Self::ErrorResponse => 0b11,
        }
    }

    /// The class from its two bits (only the low two bits of `bits` are read).
    pub const fn from_bits(bits: u16) -> Self {
        match bits & 0b11 {
            0b00 => Self::Request,
            0b01 => Self::Indication,
            0b10 => Self::SuccessResponse,
            _ => Self::ErrorResponse,
        }
    }
}

/// A 12-bit STUN method (RFC 8489 §5, §18.2; RFC 8656 §17; RFC 6062 §6.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489 §18.2).
    pub const BINDING: Self = Self(0x001);
    /// Allocate, request/response only (RFC 8656 §17).
    pub const ALLOCATE: Self = Self(0x003);
    /// Refresh, request/response only (RFC 8656 §17).
    pub const REFRESH: Self = Self(0x004);
    /// Send, indication only (RFC 8656 §17).
    pub const SEND: Self = Self(0x006);
    /// Data, indication only (RFC 8656 §17).
    pub const DATA: Self = Self(0x007);
    /// CreatePermission, request/response only (RFC 8656 §17).
    pub const CREATE_PERMISSION: Self = Self(0x008);
    /// ChannelBind, request/response only (RFC 8656 §17).
    pub const CHANNEL_BIND: Self = Self(0x009);
    /// Connect (RFC 6062 §6.1).
    pub const CONNECT: Self = Self(0x00A);
    /// ConnectionBind (RFC 6062 §6.1).
    pub const CONNECTION_BIND: Self = Self(0x00B);
    /// ConnectionAttempt (RFC 6062 §6.1).
    pub const CONNECTION_ATTEMPT: Self = Self(0x00C);

    /// The method's name, or `None` for a method this crate does not know.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::BINDING => "Binding",
            Self::ALLOCATE => "Allocate",
            Self::REFRESH => "Refresh",
            Self::SEND => "Send",
            Self::DATA => "Data",
            Self::CREATE_PERMISSION => "CreatePermission",
            Self::CHANNEL_BIND => "ChannelBind",
            Self::CONNECT => "Connect",
            Self::CONNECTION_BIND => "ConnectionBind",
            Self::CONNECTION_ATTEMPT => "ConnectionAttempt",
            _ => return None,
        })
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "Method({name})"),
            None => write!(f, "Method({:#05x})", self.0),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{:#05x}", self.0),
        }
    }
}

/// Combines class and method into the 14-bit message type (RFC 8489 §5, Figure 3):
/// `M11..M7 C1 M6..M4 C0 M3..M0`.
pub const fn message_type(class: Class, method: Method) -> u16 {
    let m = method.0 & 0x0FFF;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7)
}

/// Splits a message type into class and method (inverse of [`message_type`]).
pub const fn split_message_type(ty: u16) -> (Class, Method) {
    let method = (ty & 0x000F) | ((ty >> 1) & 0x0070) | ((ty >> 2) & 0x0F80);
    let class = ((ty >> 4) & 0b01) | ((ty >> 7) & 0b10);
    (Class::from_bits(class), Method(method))
}

/// A 16-bit attribute type (RFC 8489 §14, §18.3; RFC 8656 §18; RFC 6062 §6.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttributeType(pub u16);

impl AttributeType {
    // Comprehension-required range 0x0000-0x7FFF (RFC 8489 §18.3.1).
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    pub const MAPPED_ADDRESS: Self = Self(0x0001);
    /// USERNAME (RFC 8489 §14.3).
    pub const USERNAME: Self = Self(0x0006);
    /// MESSAGE-INTEGRITY (RFC 8489 §14.5).
    pub const MESSAGE_INTEGRITY: Self = Self(0x0008);
    /// ERROR-CODE (RFC 8489 §14.8).
    pub const ERROR_CODE: Self = Self(0x0009);
    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13).
    pub const UNKNOWN_ATTRIBUTES: Self = Self(0x000A);
    /// CHANNEL-NUMBER (RFC 8656 §18.1).
    pub const CHANNEL_NUMBER: Self = Self(0x000C);
    /// LIFETIME (RFC 8656 §18.2).
    pub const LIFETIME: Self = Self(0x000D);
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    pub const XOR_PEER_ADDRESS: Self = Self(0x0012);
    /// DATA (RFC 8656 §18.4).
    pub const DATA: Self = Self(0x0013);
    /// REALM (RFC 8489 §14.9).
    pub const REALM: Self = Self(0x0014);
    /// NONCE (RFC 8489 §14.10).
    pub const NONCE: Self = Self(0x0015);
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    pub const XOR_RELAYED_ADDRESS: Self = Self(0x0016);
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
    pub const REQUESTED_ADDRESS_FAMILY: Self = Self(0x0017);
    /// EVEN-PORT (RFC 8656 §18.7).
    pub const EVEN_PORT: Self = Self(0x0018);
    /// REQUESTED-TRANSPORT (RFC 8656 §18.8).
    pub const REQUESTED_TRANSPORT: Self = Self(0x0019);
    /// DONT-FRAGMENT (RFC 8656 §18.9).
    pub const DONT_FRAGMENT: Self = Self(0x001A);
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6).
    pub const MESSAGE_INTEGRITY_SHA256: Self = Self(0x001C);
    /// PASSWORD-ALGORITHM (RFC 8489 §14.12).
    pub const PASSWORD_ALGORITHM: Self = Self(0x001D);
    /// USERHASH (RFC 8489 §14.4).
    pub const USERHASH: Self = Self(0x001E);
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    pub const XOR_MAPPED_ADDRESS: Self = Self(0x0020);
    /// RESERVATION-TOKEN (RFC 8656 §18.10).
    pub const RESERVATION_TOKEN: Self = Self(0x0022);
    /// PRIORITY (RFC 8445 §16.1), an ICE attribute seen in RFC 5769 §2.1.
    pub const PRIORITY: Self = Self(0x0024);
    /// USE-CANDIDATE (RFC 8445 §16.1).
    pub const USE_CANDIDATE: Self = Self(0x0025);
    /// CONNECTION-ID (RFC 6062 §6.2.1).
    pub const CONNECTION_ID: Self = Self(0x002A);

    // Comprehension-optional range 0x8000-0xFFFF (RFC 8489 §18.3.2).
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
    pub const ADDITIONAL_ADDRESS_FAMILY: Self = Self(0x8000);
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    pub const ADDRESS_ERROR_CODE: Self = Self(0x8001);
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
    pub const PASSWORD_ALGORITHMS: Self = Self(0x8002);
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    pub const ALTERNATE_DOMAIN: Self = Self(0x8003);
    /// ICMP (RFC 8656 §18.13).
    pub const ICMP: Self = Self(0x8004);
    /// SOFTWARE (RFC 8489 §14.14).
    pub const SOFTWARE: Self = Self(0x8022);
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    pub const ALTERNATE_SERVER: Self = Self(0x8023);
    /// FINGERPRINT (RFC 8489 §14.7).
    pub const FINGERPRINT: Self = Self(0x8028);
    /// ICE-CONTROLLED (RFC 8445 §16.1), seen in RFC 5769 §2.1.
    pub const ICE_CONTROLLED: Self = Self(0x8029);
    /// ICE-CONTROLLING (RFC 8445 §16.1).
    pub const ICE_CONTROLLING: Self = Self(0x802A);

    /// RFC 8489 §14: "Attributes with type values between 0x0000 and 0x7FFF are
    /// comprehension-required attributes, which means that the STUN agent cannot successfully
    /// process the message unless it understands the attribute."
    pub const fn is_comprehension_required(self) -> bool {
        self.0 < 0x8000
    }

    /// Whether this crate knows the attribute: every attribute of RFC 8489, RFC 8656 and
    /// RFC 6062 CONNECTION-ID, plus the ICE attributes PRIORITY and USE-CANDIDATE (which a
    /// relay has no use for but must not answer with 420: browsers send them in connectivity
    /// checks, and RFC 5769 §2.1 carries one).
    pub const fn is_known(self) -> bool {
        self.name().is_some()
    }

    /// The attribute's registered name, or `None` when unknown to this crate.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::MAPPED_ADDRESS => "MAPPED-ADDRESS",
            Self::USERNAME => "USERNAME",
            Self::MESSAGE_INTEGRITY => "MESSAGE-INTEGRITY",
            Self::ERROR_CODE => "ERROR-CODE",
            Self::UNKNOWN_ATTRIBUTES => "UNKNOWN-ATTRIBUTES",
            Self::CHANNEL_NUMBER => "CHANNEL-NUMBER",
            Self::LIFETIME => "LIFETIME",
            Self::XOR_PEER_ADDRESS => "XOR-PEER-ADDRESS",
            Self::DATA => "DATA",
            Self::REALM => "REALM",
            Self::NONCE => "NONCE",
            Self::XOR_RELAYED_ADDRESS => "XOR-RELAYED-ADDRESS",
            Self::REQUESTED_ADDRESS_FAMILY => "REQUESTED-ADDRESS-FAMILY",
            Self::EVEN_PORT => "EVEN-PORT",
            Self::REQUESTED_TRANSPORT => "REQUESTED-TRANSPORT",
            Self::DONT_FRAGMENT => "DONT-FRAGMENT",
            Self::MESSAGE_INTEGRITY_SHA256 => "MESSAGE-INTEGRITY-SHA256",
            Self::PASSWORD_ALGORITHM => "PASSWORD-ALGORITHM",
            Self::USERHASH => "USERHASH",
            Self::XOR_MAPPED_ADDRESS => "XOR-MAPPED-ADDRESS",
            Self::RESERVATION_TOKEN => "RESERVATION-TOKEN",
            Self::PRIORITY => "PRIORITY",
            Self::USE_CANDIDATE => "USE-CANDIDATE",
            Self::CONNECTION_ID => "CONNECTION-ID",
            Self::ADDITIONAL_ADDRESS_FAMILY => "ADDITIONAL-ADDRESS-FAMILY",
            Self::ADDRESS_ERROR_CODE => "ADDRESS-ERROR-CODE",
            Self::PASSWORD_ALGORITHMS => "PASSWORD-ALGORITHMS",
            Self::ALTERNATE_DOMAIN => "ALTERNATE-DOMAIN",
            Self::ICMP => "ICMP",
            Self::SOFTWARE => "SOFTWARE",
            Self::ALTERNATE_SERVER => "ALTERNATE-SERVER",
            Self::FINGERPRINT => "FINGERPRINT",
            Self::ICE_CONTROLLED => "ICE-CONTROLLED",
            Self::ICE_CONTROLLING => "ICE-CONTROLLING",
            _ => return None,
        })
    }
}

impl fmt::Debug for AttributeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AttributeType({self})")
    }
}

impl fmt::Display for AttributeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{:#06x} {name}", self.0),
            None => write!(f, "{:#06x}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8489 §5: a Binding request has type 0x0001 and a Binding success response 0x0101.
    #[test]
    fn binding_request_and_success_response_have_the_rfc_message_types() {
        assert_eq!(message_type(Class::Request, Method::BINDING), 0x0001);
        assert_eq!(
            message_type(Class::SuccessResponse, Method::BINDING),
            0x0101
        );
        assert_eq!(message_type(Class::ErrorResponse, Method::BINDING), 0x0111);
        assert_eq!(message_type(Class::Indication, Method::SEND), 0x0016);
        assert_eq!(message_type(Class::Indication, Method::DATA), 0x0017);
    }

    #[test]
    fn every_class_and_12_bit_method_survives_a_round_trip_through_the_message_type() {
        for m in 0..0x1000u16 {
            for c in 0..4u16 {
                let class = Class::from_bits(c);
                let ty = message_type(class, Method(m));
                assert_eq!(ty & 0xC000, 0, "top two bits stay zero");
                assert_eq!(split_message_type(ty), (class, Method(m)));
            }
        }
    }

    #[test]
    fn only_types_below_0x8000_are_comprehension_required() {
        assert!(AttributeType::USERNAME.is_comprehension_required());
        assert!(AttributeType(0x7FFF).is_comprehension_required());
        assert!(!AttributeType::SOFTWARE.is_comprehension_required());
        assert!(!AttributeType(0x8000).is_comprehension_required());
    }
}
