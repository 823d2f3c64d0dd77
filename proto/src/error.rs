//! Error types of the codec: small, `Copy`, one enum per layer.
//!
//! Every variant names what was wrong with the bytes, so a caller can count drops by reason
//! (`ParseError::as_str`) without formatting anything on the packet path.

use crate::types::AttributeType;

/// Why [`Message::parse`](crate::Message::parse) refused a datagram.
///
/// Each variant is a fault of the sender; none is a bug of ours.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than the 20 bytes of a STUN header (RFC 8489 §5).
    #[error("truncated STUN header: {len} bytes, 20 needed")]
    TruncatedHeader {
        /// How many bytes there were.
        len: usize,
    },
    /// The two most significant bits of the message type are not zero (RFC 8489 §5).
    #[error("the two most significant bits of a STUN message must be zero")]
    NotStun,
    /// The magic cookie is not 0x2112A442 (RFC 8489 §5).
    #[error("wrong magic cookie")]
    BadMagicCookie,
    /// The header's message length is not a multiple of 4 (RFC 8489 §5: "the message length
    /// MUST contain the size of the message in bytes, not including the 20-byte STUN header.
    /// Since all STUN attributes are padded to a multiple of 4 bytes, the last 2 bits of this
    /// field are always zero").
    #[error("message length {len} is not a multiple of 4")]
    LengthNotMultipleOfFour {
        /// The header's length field.
        len: u16,
    },
    /// The header's message length disagrees with the number of bytes after the header.
    #[error("header says {header} bytes follow the header, but {actual} do")]
    LengthMismatch {
        /// The header's length field.
        header: u16,
        /// Bytes actually after the 20-byte header.
        actual: usize,
    },
    /// Fewer than 4 bytes left where an attribute header should start.
    #[error("truncated attribute header")]
    TruncatedAttributeHeader,
    /// An attribute's value (plus padding) runs past the end of the message.
    #[error("attribute {ty} runs past the end of the message")]
    AttributeOverflow {
        /// The attribute's type.
        ty: AttributeType,
    },
    /// An attribute other than MESSAGE-INTEGRITY-SHA256 or FINGERPRINT follows
    /// MESSAGE-INTEGRITY, or one other than FINGERPRINT follows MESSAGE-INTEGRITY-SHA256
    /// (RFC 8489 §14.5, §14.6).
    #[error("attribute {ty} follows a message integrity attribute")]
    AttributeAfterIntegrity {
        /// The offending attribute's type.
        ty: AttributeType,
    },
    /// MESSAGE-INTEGRITY is not 20 bytes, or MESSAGE-INTEGRITY-SHA256 is not 16 to 32 bytes in
    /// steps of 4 (RFC 8489 §14.5, §14.6).
    #[error("integrity attribute {ty} has an invalid length")]
    InvalidIntegrityLength {
        /// Which integrity attribute.
        ty: AttributeType,
    },
    /// FINGERPRINT is not 4 bytes long (RFC 8489 §14.7).
    #[error("FINGERPRINT attribute has an invalid length")]
    InvalidFingerprintLength,
    /// FINGERPRINT does not match CRC-32 of the message XOR 0x5354554E (RFC 8489 §14.7).
    #[error("FINGERPRINT does not match")]
    FingerprintMismatch,
}

impl ParseError {
    /// A static label for counting drops, e.g. in a metric.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::TruncatedHeader { .. } => "truncated_header",
            Self::NotStun => "not_stun",
            Self::BadMagicCookie => "bad_magic_cookie",
            Self::LengthNotMultipleOfFour { .. } => "length_not_multiple_of_four",
            Self::LengthMismatch { .. } => "length_mismatch",
            Self::TruncatedAttributeHeader => "truncated_attribute_header",
            Self::AttributeOverflow { .. } => "attribute_overflow",
            Self::AttributeAfterIntegrity { .. } => "attribute_after_integrity",
            Self::InvalidIntegrityLength { .. } => "invalid_integrity_length",
            Self::InvalidFingerprintLength => "invalid_fingerprint_length",
            Self::FingerprintMismatch => "fingerprint_mismatch",
        }
    }
}

/// Why a typed getter could not decode an attribute that is present.
///
/// The message as a whole parsed; only this attribute's value is malformed. A server answers
/// such a request with 400 (Bad Request), or 440 for
/// [`AttributeError::UnsupportedAddressFamily`] in REQUESTED-ADDRESS-FAMILY (RFC 8656 §7.2).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttributeError {
    /// The value has a length the attribute's definition does not allow.
    #[error("attribute {ty} has an invalid length {len}")]
    InvalidLength {
        /// The attribute's type.
        ty: AttributeType,
        /// The value's length.
        len: usize,
    },
    /// A text attribute is not UTF-8.
    #[error("attribute {ty} is not valid UTF-8")]
    InvalidUtf8 {
        /// The attribute's type.
        ty: AttributeType,
    },
    /// An address family other than 0x01 (IPv4) and 0x02 (IPv6) (RFC 8489 §14.1).
    #[error("attribute {ty} has unsupported address family {family:#04x}")]
    UnsupportedAddressFamily {
        /// The attribute's type.
        ty: AttributeType,
        /// The family byte.
        family: u8,
    },
    /// A CHANNEL-NUMBER outside 0x4000-0x4FFF (RFC 8656 §12).
    #[error("channel number {0:#06x} is outside 0x4000-0x7FFF")]
    InvalidChannelNumber(u16),
    /// An ERROR-CODE whose class is not 3-6 or whose number is not 0-99 (RFC 8489 §14.8).
    #[error("invalid error code class {class} number {number}")]
    InvalidErrorCode {
        /// The class (hundreds digit).
        class: u8,
        /// The number (last two digits).
        number: u8,
    },
    /// A field the attribute's definition constrains holds a value it does not allow.
    #[error("attribute {ty} has an invalid value")]
    InvalidValue {
        /// The attribute's type.
        ty: AttributeType,
    },
}

/// Why a MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 check failed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The message carries no such attribute.
    #[error("the message has no integrity attribute of that kind")]
    Missing,
    /// The HMAC does not match: wrong key or altered message (a server answers 401, or 431
    /// where the deployment expects it).
    #[error("message integrity check failed")]
    Mismatch,
}

/// The output buffer is too small; nothing was written.
///
/// `needed` is the total buffer length the operation requires. When the value would exceed
/// what STUN can encode at all (a message over 65,555 bytes), `needed` is `usize::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer too small: {needed} bytes needed")]
pub struct BufferTooSmall {
    /// The buffer length the operation needs.
    pub needed: usize,
}

/// Why [`ChannelData::parse`](crate::ChannelData::parse) refused a frame.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelDataError {
    /// Fewer than the 4 bytes of a ChannelData header (RFC 8656 §12.4).
    #[error("ChannelData shorter than its 4-byte header")]
    TooShort,
    /// The channel number is outside 0x4000-0x4FFF (RFC 8656 §12).
    #[error("channel number {0:#06x} is outside 0x4000-0x7FFF")]
    InvalidChannel(u16),
    /// The length field says more payload than the frame holds.
    #[error("ChannelData length {len} exceeds the {available} bytes present")]
    Truncated {
        /// The length field.
        len: u16,
        /// Bytes present after the header.
        available: usize,
    },
    /// More bytes follow the payload than padding to a multiple of 4 allows (RFC 8656 §12.5).
    #[error("ChannelData has {extra} bytes after its payload")]
    TrailingBytes {
        /// Bytes after the payload.
        extra: usize,
    },
}

/// Why a byte stream cannot be framed. The stream is beyond repair: close the connection.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The first byte of a frame is neither STUN (0-3) nor ChannelData (64-79) (RFC 8656 §12).
    #[error("garbage in stream: first byte {first_byte:#04x} is neither STUN nor ChannelData")]
    Garbage {
        /// The offending byte.
        first_byte: u8,
    },
    /// A STUN frame has the wrong magic cookie.
    #[error("STUN frame in stream has a wrong magic cookie")]
    BadMagicCookie,
    /// A STUN frame's length is not a multiple of 4 (RFC 8489 §5).
    #[error("STUN frame in stream has a length that is not a multiple of 4")]
    LengthNotMultipleOfFour,
    /// The next frame is longer than the framer's buffer.
    #[error("frame of {len} bytes exceeds the framer capacity of {capacity}")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The framer's capacity.
        capacity: usize,
    },
}

/// Why a credential could not be derived.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The password is not a valid RFC 8265 OpaqueString (e.g. empty, or holds a disallowed
    /// code point such as U+00AD SOFT HYPHEN).
    #[error("password is not a valid OpaqueString (RFC 8265)")]
    InvalidPassword,
    /// The realm is not a valid RFC 8265 OpaqueString.
    #[error("realm is not a valid OpaqueString (RFC 8265)")]
    InvalidRealm,
    /// A string is not a valid RFC 8265 OpaqueString.
    #[error("string is not a valid OpaqueString (RFC 8265)")]
    InvalidString,
}

/// Why a TURN REST username (`expiry<sep>user`) could not be parsed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RestUsernameError {
    /// The expiry part is missing, not all decimal digits, or overflows `u64`.
    #[error("TURN REST username has no valid unix-time expiry")]
    InvalidExpiry,
    /// The separator is present but the user part after it is empty.
    #[error("TURN REST username has an empty user part")]
    EmptyUser,
}
