//! TURN REST credentials (draft-uberti-behave-turn-rest-00) and the RFC 5769 / RFC 8489 B.1
//! test-vector user, end to end through the engine.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use hmac::{Hmac, Mac};
use uturn_engine::{AuthFailure, Event, Output};
use uturn_proto::Method;

fn rest_config(secrets: &[&str]) -> uturn_engine::EngineConfig {
    let mut config = config();
    config.auth.secrets = secrets.iter().map(|s| (*s).to_owned()).collect();
    config
}

/// draft-uberti-behave-turn-rest-00 §2.2: "password = base64(HMAC-SHA1(secret-key,
/// username))", computed here independently of uturn-proto.
fn rest_client(addr: &str, secret: &str, expiry: u64) -> Client {
    let username = format!("{expiry}:carol");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut client = Client::new(addr);
    client.username = username;
    client.password = password;
    client
}

fn failure(h: &mut Harness, client: &Client) -> (AuthFailure, u16) {
    let outputs = h.send(client.tuple, &client.request(Method::ALLOCATE, 2, &[udp()]));
    match outputs.first() {
        Some(Output::Event(Event::AuthFailed { reason, code, .. })) => (*reason, *code),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rest_credential_that_has_not_expired_is_accepted() {
    let mut h = Harness::new(rest_config(&["s3cret"]));
    let mut client = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 3600);
    let (_, _, response) = h.allocate(&mut client, 2, &[]);
    response.message().verify_integrity(&client.key()).unwrap();
}

/// draft-uberti-behave-turn-rest-00 §2.2: the username carries "the timestamp of when this
/// credential will expire"; the wall clock decides, not the monotonic clock.
#[test]
fn a_rest_credential_past_its_expiry_is_refused_as_expired() {
    let mut h = Harness::new(rest_config(&["s3cret"]));
    let mut client = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 10);
    h.challenge(&mut client);
    h.wall += Duration::from_secs(10);
    assert_eq!(
        failure(&mut h, &client),
        (AuthFailure::ExpiredCredential, 401)
    );
}

/// draft-uberti-behave-turn-rest-00 §2.2 recommends a TTL of "one day (86400 seconds)": by
/// default a credential that expires at most that far ahead is accepted, and one that
/// expires later (a wrong TTL, or a credential minted to keep) is refused with 401 and its
/// own reason.
#[test]
fn a_rest_credential_expiring_more_than_a_day_ahead_is_refused_as_too_far() {
    let mut h = Harness::new(rest_config(&["s3cret"]));
    let mut day = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 86_400);
    h.allocate(&mut day, 2, &[]);
    let mut longer = rest_client("198.51.100.1:5001", "s3cret", WALL_UNIX_SECS + 86_401);
    h.challenge(&mut longer);
    assert_eq!(failure(&mut h, &longer), (AuthFailure::ExpiryTooFar, 401));
    let mut years = rest_client("198.51.100.1:5002", "s3cret", WALL_UNIX_SECS * 3);
    h.challenge(&mut years);
    assert_eq!(failure(&mut h, &years), (AuthFailure::ExpiryTooFar, 401));
    h.engine.check_invariants(h.now);
}

/// `auth.rest_expiry_max_secs` sets the bound; the wall clock (not the monotonic one) is what
/// the expiry is measured from, so the same credential becomes acceptable as time passes.
#[test]
fn the_rest_expiry_maximum_is_configurable_and_measured_from_the_wall_clock() {
    let mut config = rest_config(&["s3cret"]);
    config.auth.rest_expiry_max_secs = 600;
    let mut h = Harness::new(config);
    let mut client = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 900);
    h.challenge(&mut client);
    assert_eq!(failure(&mut h, &client), (AuthFailure::ExpiryTooFar, 401));
    h.wall += Duration::from_secs(300);
    let mut client = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 900);
    h.allocate(&mut client, 2, &[]);
}

/// The bound is reloadable with the secrets (SIGHUP, `POST /api/v1/reload`).
#[test]
fn a_reloaded_rest_expiry_maximum_applies_to_new_requests() {
    let mut h = Harness::new(rest_config(&["s3cret"]));
    let mut before = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 7200);
    h.allocate(&mut before, 2, &[]);
    let mut auth = rest_config(&["s3cret"]).auth;
    auth.rest_expiry_max_secs = 3600;
    h.engine.reload_secrets(&auth).unwrap();
    let mut after = rest_client("198.51.100.1:5001", "s3cret", WALL_UNIX_SECS + 7200);
    h.challenge(&mut after);
    assert_eq!(failure(&mut h, &after), (AuthFailure::ExpiryTooFar, 401));
}

#[test]
fn a_rest_expiry_maximum_of_zero_is_the_one_day_default() {
    let mut config = rest_config(&["s3cret"]);
    config.auth.rest_expiry_max_secs = 0;
    let mut h = Harness::new(config);
    let mut day = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 86_400);
    h.allocate(&mut day, 2, &[]);
    let mut longer = rest_client("198.51.100.1:5001", "s3cret", WALL_UNIX_SECS + 86_401);
    h.challenge(&mut longer);
    assert_eq!(failure(&mut h, &longer), (AuthFailure::ExpiryTooFar, 401));
}

#[test]
fn a_rest_credential_made_with_another_secret_fails_integrity() {
    let mut h = Harness::new(rest_config(&["s3cret"]));
    let mut client = rest_client("198.51.100.1:5000", "wrong", WALL_UNIX_SECS + 3600);
    h.challenge(&mut client);
    assert_eq!(failure(&mut h, &client), (AuthFailure::BadIntegrity, 401));
}

/// Rotation: while two secrets are configured, credentials from either are accepted.
#[test]
fn during_rotation_credentials_from_either_secret_are_accepted() {
    let mut h = Harness::new(rest_config(&["new", "old"]));
    let mut from_old = rest_client("198.51.100.1:5000", "old", WALL_UNIX_SECS + 3600);
    h.allocate(&mut from_old, 2, &[]);
    let mut from_new = rest_client("198.51.100.1:5001", "new", WALL_UNIX_SECS + 3600);
    h.allocate(&mut from_new, 2, &[]);
    let mut neither = rest_client("198.51.100.1:5002", "older", WALL_UNIX_SECS + 3600);
    h.challenge(&mut neither);
    assert_eq!(failure(&mut h, &neither), (AuthFailure::BadIntegrity, 401));
}

#[test]
fn with_rest_secrets_the_nonce_does_not_announce_username_anonymity() {
    let mut h = Harness::new(rest_config(&["s3cret"]));
    let mut client = Client::new("198.51.100.1:5000");
    let challenge = h.challenge(&mut client);
    assert!(challenge.nonce().starts_with("obMatJos2gAAA"));
}

#[test]
fn a_configurable_rest_separator_is_honoured() {
    let mut config = rest_config(&["s3cret"]);
    config.auth.rest_separator = '-';
    let mut h = Harness::new(config);
    let mut client = rest_client("198.51.100.1:5000", "s3cret", WALL_UNIX_SECS + 3600);
    client.username = client.username.replace(':', "-");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"s3cret").unwrap();
    mac.update(client.username.as_bytes());
    client.password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    h.allocate(&mut client, 2, &[]);
}

const VECTOR_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
/// The vector's password after SASLprep/OpaqueString. The raw "The<U+00AD>M<U+00AA>tr<U+2168>"
/// is not OpaqueString-valid (RFC 8265 disallows U+00AD SOFT HYPHEN; see
/// shared/reference/stun-test-vectors.md), so the prepared form is configured.
const VECTOR_PASSWORD: &str = "TheMatrIX";

fn vector_config() -> uturn_engine::EngineConfig {
    let mut config = config();
    config.auth.realm = "example.org".into();
    config.auth.users = vec![uturn_engine::config::UserConfig {
        username: VECTOR_USER.into(),
        password: Some(VECTOR_PASSWORD.into()),
        key: None,
    }];
    config
}

/// RFC 5769 §2.4 / RFC 8489 B.1: user "マトリックス" (U+30DE U+30C8 U+30EA U+30C3 U+30AF
/// U+30B9), password "TheMatrIX" after preparation, realm "example.org". The nonce is the
/// engine's own, so the requests are built with it.
#[test]
fn the_rfc_5769_test_vector_user_allocates_with_classic_sha256_and_userhash_requests() {
    let mut h = Harness::new(vector_config());
    for (port, mode, userhash) in [
        (5000, Mode::Classic, false),
        (5001, Mode::Sha256, false),
        (5002, Mode::Sha256, true),
    ] {
        let mut client = Client::new(&format!("198.51.100.1:{port}"));
        client.username = VECTOR_USER.into();
        client.password = VECTOR_PASSWORD.into();
        client.realm = "example.org".into();
        client.mode = mode;
        client.userhash = userhash;
        client.fingerprint = true;
        let (_, _, response) = h.allocate(&mut client, 2, &[]);
        match mode {
            Mode::Classic => response.message().verify_integrity(&client.key()).unwrap(),
            Mode::Sha256 => response
                .message()
                .verify_integrity_sha256(&client.key())
                .unwrap(),
        }
    }
}

/// The literal RFC 5769 §2.4 request: its MESSAGE-INTEGRITY verifies with the configured
/// user's key, so the engine gets past the user and integrity checks and stops at the last
/// one, the nonce (not one it issued): 438 with a fresh nonce (RFC 8489 §9.2.4 order).
#[test]
fn the_literal_rfc_5769_request_passes_integrity_and_is_refused_only_for_its_foreign_nonce() {
    let vector: [u8; 116] = [
        0x00, 0x01, 0x00, 0x60, 0x21, 0x12, 0xa4, 0x42, 0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72,
        0xc0, 0x29, 0xda, 0x41, 0x2e, 0x00, 0x06, 0x00, 0x12, 0xe3, 0x83, 0x9e, 0xe3, 0x83, 0x88,
        0xe3, 0x83, 0xaa, 0xe3, 0x83, 0x83, 0xe3, 0x82, 0xaf, 0xe3, 0x82, 0xb9, 0x00, 0x00, 0x00,
        0x15, 0x00, 0x1c, 0x66, 0x2f, 0x2f, 0x34, 0x39, 0x39, 0x6b, 0x39, 0x35, 0x34, 0x64, 0x36,
        0x4f, 0x4c, 0x33, 0x34, 0x6f, 0x4c, 0x39, 0x46, 0x53, 0x54, 0x76, 0x79, 0x36, 0x34, 0x73,
        0x41, 0x00, 0x14, 0x00, 0x0b, 0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c, 0x65, 0x2e, 0x6f, 0x72,
        0x67, 0x00, 0x00, 0x08, 0x00, 0x14, 0xf6, 0x70, 0x24, 0x65, 0x6d, 0xd6, 0x4a, 0x3e, 0x02,
        0xb8, 0xe0, 0x71, 0x2e, 0x85, 0xc9, 0xa2, 0x8c, 0xa8, 0x96, 0x66,
    ];
    let mut config = vector_config();
    config.auth.binding_requires_auth = true;
    let mut h = Harness::new(config);
    let client = tuple("198.51.100.1:5000");
    let outputs = h.send(client, &vector);
    match outputs.first() {
        Some(Output::Event(Event::AuthFailed {
            reason,
            code,
            username,
            ..
        })) => {
            assert_eq!((*reason, *code), (AuthFailure::StaleNonce, 438));
            assert_eq!(username.as_deref(), Some(VECTOR_USER));
        }
        other => panic!("{other:?}"),
    }
    let response = single_response(outputs);
    assert_eq!(response.code(), Some(438));
    assert_ne!(response.nonce(), "f//499k954d6OL34oL9FSTvy64sA");
    // Negative control: with another password the same bytes fail integrity.
    let mut config = vector_config();
    config.auth.binding_requires_auth = true;
    config.auth.users[0].password = Some("The\u{00AA}Matrix".into());
    let mut h = Harness::new(config);
    let outputs = h.send(client, &vector);
    assert!(matches!(
        outputs.first(),
        Some(Output::Event(Event::AuthFailed {
            reason: AuthFailure::BadIntegrity,
            ..
        }))
    ));
}
