//! Stateless NONCEs (RFC 8489 §9.2): the server keeps nothing for a client before it
//! authenticates.
//!
//! A nonce is `cookie ‖ time ‖ tag`, all printable ASCII (46 characters):
//!
//! - `cookie`: RFC 8489 §9.2 "nonce cookie", `"obMatJos2"` followed by the base64 of the 24-bit
//!   STUN Security Features (§18.1: bit 0 "Password algorithms", bit 1 "Username anonymity").
//! - `time`: milliseconds since the engine started (monotonic), 8 bytes big-endian, base64url.
//! - `tag`: HMAC-SHA256 over cookie, time and the client's 5-tuple (transport, client address,
//!   server address), keyed with a random per-process secret, truncated to 128 bits, base64url.
//!
//! A nonce is valid for the 5-tuple it was issued to, for `nonce_lifetime_secs`: another client
//! cannot replay it and the server cannot be made to accept a nonce it did not issue. Restarting
//! the process changes the secret, which turns every outstanding nonce stale (clients retry on
//! the 438 with the fresh nonce).

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{FiveTuple, Transport};

/// RFC 8489 §9.2: the nonce cookie prefix.
pub const NONCE_COOKIE_PREFIX: &str = "obMatJos2";
/// Length of the cookie: the prefix and 4 base64 characters of the feature bits.
pub const NONCE_COOKIE_LEN: usize = 13;
/// RFC 8489 §18.1: "Password algorithms" is bit 0 (the most significant bit).
pub const FEATURE_PASSWORD_ALGORITHMS: u32 = 1 << 23;
/// RFC 8489 §18.1: "Username anonymity" is bit 1.
pub const FEATURE_USERNAME_ANONYMITY: u32 = 1 << 22;

const TIME_LEN: usize = 11; // base64url of 8 bytes, unpadded
const TAG_BYTES: usize = 16;
const TAG_LEN: usize = 22; // base64url of 16 bytes, unpadded
/// Total length of a nonce this module issues.
pub const NONCE_LEN: usize = NONCE_COOKIE_LEN + TIME_LEN + TAG_LEN;

/// Issues and checks nonces.
#[derive(Clone)]
pub(crate) struct NonceIssuer {
    mac: Hmac<Sha256>,
    cookie: [u8; NONCE_COOKIE_LEN],
    epoch: Instant,
    lifetime: Duration,
}

impl std::fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl NonceIssuer {
    pub(crate) fn new(secret: [u8; 32], features: u32, epoch: Instant, lifetime: Duration) -> Self {
        let mut cookie = [0u8; NONCE_COOKIE_LEN];
        cookie[..9].copy_from_slice(NONCE_COOKIE_PREFIX.as_bytes());
        let bits = features.to_be_bytes();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&bits[1..4]);
        cookie[9..].copy_from_slice(encoded.as_bytes());
        let Ok(mac) = Hmac::<Sha256>::new_from_slice(&secret) else {
            // HMAC accepts keys of every length; this branch cannot be taken.
            unreachable!("HMAC takes keys of any length")
        };
        Self {
            mac,
            cookie,
            epoch,
            lifetime,
        }
    }

    pub(crate) fn issue(&self, now: Instant, five_tuple: &FiveTuple) -> String {
        let millis = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let mut out = String::with_capacity(NONCE_LEN);
        // The cookie is ASCII by construction.
        out.push_str(std::str::from_utf8(&self.cookie).unwrap_or(NONCE_COOKIE_PREFIX));
        URL_SAFE_NO_PAD.encode_string(millis.to_be_bytes(), &mut out);
        let tag = self.tag(&self.cookie, millis, five_tuple);
        URL_SAFE_NO_PAD.encode_string(tag, &mut out);
        out
    }

    /// True when `nonce` was issued by this issuer to `five_tuple` less than the nonce lifetime
    /// before `now`.
    pub(crate) fn is_valid(&self, nonce: &[u8], now: Instant, five_tuple: &FiveTuple) -> bool {
        if nonce.len() != NONCE_LEN {
            return false;
        }
        let (cookie, rest) = nonce.split_at(NONCE_COOKIE_LEN);
        let (time, tag) = rest.split_at(TIME_LEN);
        let mut millis = [0u8; 8];
        match URL_SAFE_NO_PAD.decode_slice(time, &mut millis) {
            Ok(8) => {}
            _ => return false,
        }
        let millis = u64::from_be_bytes(millis);
        let mut given = [0u8; TAG_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(tag, &mut given) {
            Ok(TAG_BYTES) => {}
            _ => return false,
        }
        let expected = self.tag(cookie, millis, five_tuple);
        if !constant_time_eq(&expected, &given) {
            return false;
        }
        let issued = self.epoch + Duration::from_millis(millis);
        // RFC 8489 §9.2.4 "If the NONCE is no longer valid": valid from issue until the
        // instant before issued + lifetime.
        now < issued + self.lifetime && issued <= now
    }

    fn tag(&self, cookie: &[u8], millis: u64, five_tuple: &FiveTuple) -> [u8; TAG_BYTES] {
        let mut mac = self.mac.clone();
        mac.update(cookie);
        mac.update(&millis.to_be_bytes());
        mac.update(&[match five_tuple.transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        }]);
        for addr in [five_tuple.client, five_tuple.server] {
            let ip = match addr.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v6) => v6.octets(),
            };
            mac.update(&ip);
            mac.update(&addr.port().to_be_bytes());
        }
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&full[..TAG_BYTES]);
        tag
    }
}

/// Reads the STUN Security Features from a nonce that starts with the cookie; `None` when it
/// does not.
pub(crate) fn nonce_features(nonce: &[u8]) -> Option<u32> {
    let cookie = nonce.get(..NONCE_COOKIE_LEN)?;
    if !cookie.starts_with(NONCE_COOKIE_PREFIX.as_bytes()) {
        return None;
    }
    let mut bits = [0u8; 3];
    match base64::engine::general_purpose::STANDARD.decode_slice(&cookie[9..], &mut bits) {
        Ok(3) => Some(u32::from_be_bytes([0, bits[0], bits[1], bits[2]])),
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(client: &str) -> FiveTuple {
        FiveTuple {
            transport: Transport::Udp,
            client: client.parse().unwrap(),
            server: "192.0.2.1:3478".parse().unwrap(),
        }
    }

    fn issuer(epoch: Instant) -> NonceIssuer {
        NonceIssuer::new(
            [7; 32],
            FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
            epoch,
            Duration::from_secs(600),
        )
    }

    /// RFC 8489 §9.2: the nonce starts with "obMatJos2" and the base64 of the feature bits.
    #[test]
    fn a_nonce_starts_with_the_cookie_announcing_password_algorithms_and_anonymity() {
        let epoch = Instant::now();
        let nonce = issuer(epoch).issue(epoch, &tuple("198.51.100.1:5000"));
        assert!(nonce.starts_with("obMatJos2wAAA"), "{nonce}");
        assert_eq!(nonce.len(), NONCE_LEN);
        assert!(nonce.bytes().all(|b| b.is_ascii_graphic()));
        assert_eq!(
            nonce_features(nonce.as_bytes()),
            Some(FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY)
        );
    }

    #[test]
    fn a_nonce_is_valid_until_the_instant_before_its_lifetime_ends() {
        let epoch = Instant::now();
        let issuer = issuer(epoch);
        let client = tuple("198.51.100.1:5000");
        let issued = epoch + Duration::from_secs(10);
        let nonce = issuer.issue(issued, &client);
        let end = issued + Duration::from_secs(600);
        assert!(issuer.is_valid(nonce.as_bytes(), issued, &client));
        assert!(issuer.is_valid(nonce.as_bytes(), end - Duration::from_millis(1), &client));
        assert!(!issuer.is_valid(nonce.as_bytes(), end, &client));
    }

    /// RFC 8489 §9.2.4: "The server MUST NOT choose the same NONCE for two requests unless they
    /// have the same source IP address and port."
    #[test]
    fn a_nonce_issued_to_one_client_is_invalid_for_another() {
        let epoch = Instant::now();
        let issuer = issuer(epoch);
        let nonce = issuer.issue(epoch, &tuple("198.51.100.1:5000"));
        assert!(!issuer.is_valid(nonce.as_bytes(), epoch, &tuple("198.51.100.1:5001")));
        assert_ne!(nonce, issuer.issue(epoch, &tuple("198.51.100.2:5000")));
    }

    #[test]
    fn a_tampered_or_foreign_nonce_is_invalid() {
        let epoch = Instant::now();
        let client = tuple("198.51.100.1:5000");
        let nonce = issuer(epoch).issue(epoch, &client);
        let mut tampered = nonce.clone().into_bytes();
        tampered[20] ^= 1;
        assert!(!issuer(epoch).is_valid(&tampered, epoch, &client));
        let other = NonceIssuer::new([8; 32], 0, epoch, Duration::from_secs(600));
        assert!(!other.is_valid(nonce.as_bytes(), epoch, &client));
        assert!(!issuer(epoch).is_valid(b"short", epoch, &client));
    }
}
