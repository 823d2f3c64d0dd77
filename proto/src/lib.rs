//! # uturn-proto: the STUN/TURN wire codec of uturn
//!
//! This crate turns bytes into STUN (RFC 8489), TURN (RFC 8656, RFC 6062) and ChannelData
//! messages and back. It is the only place in uturn that knows the wire format; the engine
//! (`uturn-control`) and the shards (`uturn-dataplane`) code against the types below.
//!
//! ## How data flows through it
//!
//! ```text
//! datagram ─► classify() ─┬─ Stun ────────► Message::parse ─► typed getters, verify_integrity
//!                         │                 (or parse_send_indication on the fast path)
//!                         └─ ChannelData ─► ChannelData::parse ─► channel(), payload()
//! TCP/TLS bytes ─► StreamFramer::push ─► pop() whole frames ─► as above
//! answers ─► MessageBuilder (into a caller buffer) ─► message_integrity ─► fingerprint
//! peer datagram ─► write_channel_data_header / write_data_indication_header (headroom)
//! ```
//!
//! ## What it refuses to do
//!
//! - **No I/O and no clock.** It never touches a socket or reads the time; REST credential
//!   expiry is returned as a number for the caller to compare with its wall clock.
//! - **No allocation per message.** [`Message`] borrows the datagram; [`MessageBuilder`] and the
//!   headroom writers write into caller buffers and return [`BufferTooSmall`] (writing nothing)
//!   when it is short; [`StreamFramer`] allocates its fixed buffer once. Only the
//!   [`credentials`] functions allocate, and those run once per credential.
//! - **No panics on input.** Every read goes through a bounds-checked cursor; malformed bytes
//!   become small `Copy` errors ([`ParseError`], [`AttributeError`], [`ChannelDataError`],
//!   [`FramingError`]) that name the fault, with static labels for drop counters.
//! - **No unsafe code.**
//!
//! ## Main types
//!
//! - [`classify`] / [`PacketKind`]: demultiplex on the first byte.
//! - [`Message`]: zero-copy, strictly validated STUN message; [`Attribute`] for typed values.
//! - [`MessageBuilder`]: encode, with MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT.
//! - [`ChannelData`], [`write_channel_data_header`], [`write_data_indication_header`],
//!   [`parse_send_indication`]: the relay fast path.
//! - [`frame_len`], [`StreamFramer`]: TCP/TLS framing.
//! - [`credentials`]: long-term keys, USERHASH, TURN REST passwords.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod attribute;
mod builder;
mod channel_data;
pub mod credentials;
mod cursor;
mod demux;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod message;
mod relay;
mod types;

pub use attribute::{
    AddressErrorCode, AddressFamily, Attribute, ChannelNumber, ConnectionId, ErrorCode,
    ErrorCodeAttribute, EvenPort, Icmp, PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms,
    PasswordAlgorithmsIter, Protocol, RawAttribute, ReservationToken, TEXT_LEN_MAX,
    USERNAME_LEN_MAX, UnknownAttributeList, UnknownAttributeListIter,
};
pub use builder::MessageBuilder;
pub use channel_data::{
    CHANNEL_DATA_HEADER_LEN, ChannelData, stream_padding, write_channel_data,
    write_channel_data_header,
};
pub use credentials::{
    RestUsername, long_term_key_md5, long_term_key_sha256, parse_rest_username, rest_password,
    userhash,
};
pub use demux::{
    CHANNEL_DATA_FRAME_LEN_MAX, PacketKind, STREAM_FRAME_LEN_MAX, StreamFramer, classify, frame_len,
};
pub use error::{
    AttributeError, BufferTooSmall, ChannelDataError, CredentialError, FramingError,
    IntegrityError, ParseError, RestUsernameError,
};
pub use message::{
    Attributes, FINGERPRINT_XOR, Message, UNKNOWN_ATTRIBUTES_CAPACITY, UnknownAttributes,
    XorAddresses,
};
pub use relay::{
    DATA_INDICATION_HEADER_LEN_MAX, SendIndication, SendIndicationError, parse_send_indication,
    stun_padding, write_data_indication_header,
};
pub use types::{
    AttributeType, Class, MAGIC_COOKIE, Method, STUN_BODY_LEN_MAX, STUN_HEADER_LEN,
    STUN_MESSAGE_LEN_MAX, TransactionId, message_type, split_message_type,
};
