//! Known-answer tests: RFC 5769 §2.1-2.4 and RFC 8489 Appendix B.1 with erratum 6268.
//!
//! The hex strings are copied from `shared/reference/stun-test-vectors.md`, which extracted
//! them from the RFC texts by program and verified them independently.

use std::net::SocketAddr;

use uturn_proto::credentials::{long_term_key_md5, long_term_key_sha256, short_term_key, userhash};
use uturn_proto::{
    Attribute, AttributeType, Class, IntegrityError, Message, MessageBuilder, Method, ParseError,
    PasswordAlgorithm, PasswordAlgorithmId, TransactionId,
};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const RFC5769_2_1: &str = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e20746573
7420636c69656e74002400046e0001ff80290008932ff9b151263b3600060009
6576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249
c1b571a280280004e57a3bcf";

const RFC5769_2_2: &str = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563
746f7220002000080001a147e112a643000800142b91f599fd9e90c38c7489f9
2af9ba53f06be7d780280004c07d4c96";

const RFC5769_2_3: &str = "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563
746f7220002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014
a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c";

const RFC5769_2_4: &str = "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383
aae38383e382afe382b900000015001c662f2f3439396b39353464364f4c3334
6f4c394653547679363473410014000b6578616d706c652e6f72670000080014
f67024656dd64a3e02b8e0712e85c9a28ca89666";

const RFC8489_B1_PRINTED: &str = "0001009c2112a44278ad3433c6ad72c029da412e001e00204a3cf38fef6992bd
a952c6780417da0f24819415569e60b205c46e41407f1704001500296f624d61
744a6f733241414143662f2f3439396b39353464364f4c33346f4c3946535476
79363473410000000014000b6578616d706c652e6f726700001c0020e4686c8f
0edeb59013e07090010a93efccbccc544c0a45d9f830aa6d6f735a01";

const RFC8489_B1_ERRATUM_6268: &str =
    "000100902112a44278ad3433c6ad72c029da412e001e00204a3cf38fef6992bd
a952c6780417da0f24819415569e60b205c46e41407f1704001500296f624d61
744a6f733241414143662f2f3439396b39353464364f4c33346f4c3946535476
79363473410000000014000b6578616d706c652e6f726700001d000400020000
001c0020b5c7bf005b6c52a21c51c5e892f81924136296cb927c43149309278c
c6518e65";

const SHORT_TERM_PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";
const TID_5769: [u8; 12] = [
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
];
const TID_LTC: [u8; 12] = [
    0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72, 0xc0, 0x29, 0xda, 0x41, 0x2e,
];
/// "マトリックス"
const LTC_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
const LTC_PASSWORD_RAW: &str = "The\u{00AD}M\u{00AA}tr\u{2168}";
/// The password after SASLprep, as RFC 5769 §2.4 and RFC 8489 B.1 state it.
const LTC_PASSWORD_PREPPED: &str = "TheMatrIX";

/// RFC 5769 §2.1: "This request uses the following parameters: Software name: "STUN test
/// client" [...] Username: "evtj:h6vY" [...] Password: "VOkJxbRl1RmTxUk/WvJxBt"".
#[test]
fn rfc5769_sample_request_parses_verifies_and_reencodes_byte_for_byte() {
    let bytes = hex(RFC5769_2_1);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.class(), Class::Request);
    assert_eq!(msg.method(), Method::BINDING);
    assert_eq!(msg.transaction_id(), TransactionId(TID_5769));
    assert_eq!(msg.software().unwrap(), Some("STUN test client"));
    assert_eq!(msg.username().unwrap(), Some("evtj:h6vY"));
    assert_eq!(
        msg.attribute(AttributeType::PRIORITY),
        Some(&[0x6e, 0x00, 0x01, 0xff][..])
    );
    assert!(msg.has_fingerprint());
    assert!(msg.unknown_comprehension_required().is_empty());
    let key = short_term_key(SHORT_TERM_PASSWORD).unwrap();
    assert_eq!(msg.verify_integrity(key.as_bytes()), Ok(()));
    assert_eq!(
        msg.verify_integrity(b"wrong"),
        Err(IntegrityError::Mismatch)
    );

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId(TID_5769),
    );
    b.padding_byte(0x20);
    b.attribute(&Attribute::Software("STUN test client"))
        .unwrap();
    b.raw_attribute(AttributeType::PRIORITY, &hex("6e0001ff"))
        .unwrap();
    b.raw_attribute(AttributeType::ICE_CONTROLLED, &hex("932ff9b151263b36"))
        .unwrap();
    b.attribute(&Attribute::Username("evtj:h6vY")).unwrap();
    b.message_integrity(key.as_bytes()).unwrap();
    b.fingerprint().unwrap();
    let len = b.finish();
    assert_eq!(&buf[..len], &bytes[..]);
}

/// RFC 5769 §2.2: "Mapped address: 192.0.2.1 port 32853".
#[test]
fn rfc5769_ipv4_response_parses_verifies_and_reencodes_byte_for_byte() {
    let bytes = hex(RFC5769_2_2);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.class(), Class::SuccessResponse);
    assert_eq!(msg.software().unwrap(), Some("test vector"));
    let mapped: SocketAddr = "192.0.2.1:32853".parse().unwrap();
    assert_eq!(msg.xor_mapped_address().unwrap(), Some(mapped));
    assert_eq!(msg.verify_integrity(SHORT_TERM_PASSWORD.as_bytes()), Ok(()));

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::SuccessResponse,
        Method::BINDING,
        TransactionId(TID_5769),
    );
    b.padding_byte(0x20);
    b.attribute(&Attribute::Software("test vector")).unwrap();
    b.attribute(&Attribute::XorMappedAddress(mapped)).unwrap();
    b.message_integrity(SHORT_TERM_PASSWORD.as_bytes()).unwrap();
    b.fingerprint().unwrap();
    let len = b.finish();
    assert_eq!(&buf[..len], &bytes[..]);
}

/// RFC 5769 §2.3: "Mapped address: 2001:db8:1234:5678:11:2233:4455:6677 port 32853".
#[test]
fn rfc5769_ipv6_response_parses_verifies_and_reencodes_byte_for_byte() {
    let bytes = hex(RFC5769_2_3);
    let msg = Message::parse(&bytes).unwrap();
    let mapped: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        .parse()
        .unwrap();
    assert_eq!(msg.xor_mapped_address().unwrap(), Some(mapped));
    assert_eq!(msg.verify_integrity(SHORT_TERM_PASSWORD.as_bytes()), Ok(()));

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::SuccessResponse,
        Method::BINDING,
        TransactionId(TID_5769),
    );
    b.padding_byte(0x20);
    b.attribute(&Attribute::Software("test vector")).unwrap();
    b.attribute(&Attribute::XorMappedAddress(mapped)).unwrap();
    b.message_integrity(SHORT_TERM_PASSWORD.as_bytes()).unwrap();
    b.fingerprint().unwrap();
    let len = b.finish();
    assert_eq!(&buf[..len], &bytes[..]);
}

/// RFC 5769 §2.4: "Password: "The<U+00AD>M<U+00AA>tr<U+2168>" and "TheMatrIX" [...]
/// respectively before and after SASLprep processing [...] Realm: "example.org"".
#[test]
fn rfc5769_long_term_request_verifies_with_the_md5_long_term_key() {
    let bytes = hex(RFC5769_2_4);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.username().unwrap(), Some(LTC_USERNAME));
    assert_eq!(msg.nonce().unwrap(), Some("f//499k954d6OL34oL9FSTvy64sA"));
    assert_eq!(msg.realm().unwrap(), Some("example.org"));
    assert!(!msg.has_fingerprint());
    let key = long_term_key_md5(LTC_USERNAME, "example.org", LTC_PASSWORD_PREPPED).unwrap();
    assert_eq!(key, hex("e8ca7ad59d5eb0518e312911d2dab2a9")[..]);
    assert_eq!(msg.verify_integrity(&key), Ok(()));

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId(TID_LTC),
    );
    b.attribute(&Attribute::Username(LTC_USERNAME)).unwrap();
    b.attribute(&Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"))
        .unwrap();
    b.attribute(&Attribute::Realm("example.org")).unwrap();
    b.message_integrity(&key).unwrap();
    let len = b.finish();
    assert_eq!(&buf[..len], &bytes[..]);
}

/// Negative control for RFC 5769 §2.4: the password before preparation does not give the key.
/// OpaqueString (RFC 8265 §4.2) disallows U+00AD SOFT HYPHEN, so the prepared key cannot even
/// be derived from it; hashing the raw bytes gives a key that fails the check.
#[test]
fn rfc5769_long_term_request_fails_with_the_unprepped_password() {
    let bytes = hex(RFC5769_2_4);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(
        long_term_key_md5(LTC_USERNAME, "example.org", LTC_PASSWORD_RAW),
        Err(uturn_proto::CredentialError::InvalidPassword)
    );
    use md5::Digest as _;
    let raw_key: [u8; 16] =
        md5::Md5::digest(format!("{LTC_USERNAME}:example.org:{LTC_PASSWORD_RAW}")).into();
    assert_eq!(
        msg.verify_integrity(&raw_key),
        Err(IntegrityError::Mismatch)
    );
}

/// RFC 8489 Appendix B.1 with erratum 6268: USERHASH, NONCE, REALM, PASSWORD-ALGORITHM
/// (SHA-256) and MESSAGE-INTEGRITY-SHA256 with key SHA-256(username ":" realm ":" password).
#[test]
fn rfc8489_b1_with_erratum_6268_verifies_with_sha256_integrity_and_userhash() {
    let bytes = hex(RFC8489_B1_ERRATUM_6268);
    let msg = Message::parse(&bytes).unwrap();
    let nonce = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";
    assert_eq!(
        msg.userhash().unwrap(),
        Some(userhash(LTC_USERNAME, "example.org"))
    );
    assert_eq!(msg.nonce().unwrap(), Some(nonce));
    assert_eq!(msg.realm().unwrap(), Some("example.org"));
    let alg = msg.password_algorithm().unwrap().unwrap();
    assert_eq!(alg.algorithm, PasswordAlgorithmId::SHA256);
    assert!(alg.params.is_empty());
    assert!(msg.has_integrity_sha256());
    assert!(!msg.has_integrity());
    let key = long_term_key_sha256(LTC_USERNAME, "example.org", LTC_PASSWORD_PREPPED).unwrap();
    assert_eq!(
        key,
        hex("dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1")[..]
    );
    assert_eq!(msg.verify_integrity_sha256(&key), Ok(()));
    assert_eq!(msg.verify_integrity(&key), Err(IntegrityError::Missing));
    let md5_key = long_term_key_md5(LTC_USERNAME, "example.org", LTC_PASSWORD_PREPPED).unwrap();
    assert_eq!(
        msg.verify_integrity_sha256(&md5_key),
        Err(IntegrityError::Mismatch)
    );

    let mut buf = [0u8; 256];
    let mut b = MessageBuilder::new(
        &mut buf,
        Class::Request,
        Method::BINDING,
        TransactionId(TID_LTC),
    );
    b.attribute(&Attribute::Userhash(userhash(LTC_USERNAME, "example.org")))
        .unwrap();
    b.attribute(&Attribute::Nonce(nonce)).unwrap();
    b.attribute(&Attribute::Realm("example.org")).unwrap();
    b.attribute(&Attribute::PasswordAlgorithm(PasswordAlgorithm::SHA256))
        .unwrap();
    b.message_integrity_sha256(&key).unwrap();
    let len = b.finish();
    assert_eq!(&buf[..len], &bytes[..]);
}

/// RFC 8489 §5: "The message length MUST contain the size of the message in bytes, not
/// including the 20-byte STUN header." B.1 as printed says 0x009c but only 0x0088 follow.
#[test]
fn rfc8489_b1_as_printed_is_rejected_for_its_wrong_length() {
    let bytes = hex(RFC8489_B1_PRINTED);
    assert_eq!(
        Message::parse(&bytes).unwrap_err(),
        ParseError::LengthMismatch {
            header: 0x009c,
            actual: 0x0088
        }
    );
}
