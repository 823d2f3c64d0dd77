//! Stateless NONCEs (RFC 8489 §9.2): the server keeps nothing for a client before it
//! authenticates.
//!
//! A nonce is `cookie ‖ base64url(time ‖ tag)`, 32 printable ASCII characters, so the NONCE
//! attribute needs no padding:
//!
//! - `cookie`: RFC 8489 §9.2 "nonce cookie", `"obMatJos2"` followed by the base64 of the 24-bit
//!   STUN Security Features (§18.1: bit 0 "Password algorithms", bit 1 "Username anonymity").
//!   An RFC 8489 client reads it to know that the server offers SHA-256 passwords, and the
//!   echo of PASSWORD-ALGORITHMS is checked against it (bid-down protection), so it stays.
//! - `time`: milliseconds since the engine started (monotonic), 40 bits big-endian: 34 years
//!   of uptime before it saturates (every nonce then reads stale, never valid for longer).
//! - `tag`: HMAC-SHA256 over cookie, time and the client's 5-tuple (transport, client address,
//!   server address), keyed with a random per-process secret, truncated to 72 bits.
//!
//! Why 72 bits are enough: the key never leaves the process and the tag can only be checked by
//! asking the server, so a forger is limited to online guesses, each one an authenticated
//! request that the per-source and per-user failure budgets throttle; 2^71 guesses on average
//! is out of reach at any rate a network carries. A forged nonce would not authenticate
//! anyone either: MESSAGE-INTEGRITY still needs the password; the tag only keeps a nonce bound
//! to the 5-tuple and the time it was issued. Each byte saved here is a byte less in every 401
//! and 438 a spoofed source can reflect (SECURITY.md, amplification).
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

/// 40 bits of milliseconds.
const TIME_BYTES: usize = 5;
const TIME_MAX: u64 = (1 << (8 * TIME_BYTES)) - 1;
/// 72 bits of HMAC-SHA256 (module doc: why that is enough).
const TAG_BYTES: usize = 9;
const SEALED_BYTES: usize = TIME_BYTES + TAG_BYTES;
/// base64url of the 14 sealed bytes, unpadded.
const SEALED_LEN: usize = (SEALED_BYTES * 8).div_ceil(6);
/// Total length of a nonce this module issues: 32, a multiple of 4, so no attribute padding.
pub const NONCE_LEN: usize = NONCE_COOKIE_LEN + SEALED_LEN;

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
        let elapsed = now.saturating_duration_since(self.epoch).as_millis();
        let millis = u64::try_from(elapsed).unwrap_or(u64::MAX).min(TIME_MAX);
        let mut sealed = [0u8; SEALED_BYTES];
        sealed[..TIME_BYTES].copy_from_slice(&millis.to_be_bytes()[8 - TIME_BYTES..]);
        sealed[TIME_BYTES..].copy_from_slice(&self.tag(&self.cookie, millis, five_tuple));
        let mut out = String::with_capacity(NONCE_LEN);
        // The cookie is ASCII by construction.
        out.push_str(std::str::from_utf8(&self.cookie).unwrap_or(NONCE_COOKIE_PREFIX));
        URL_SAFE_NO_PAD.encode_string(sealed, &mut out);
        out
    }

    /// True when `nonce` was issued by this issuer to `five_tuple` less than the nonce lifetime
    /// before `now`.
    pub(crate) fn is_valid(&self, nonce: &[u8], now: Instant, five_tuple: &FiveTuple) -> bool {
        if nonce.len() != NONCE_LEN {
            return false;
        }
        let (cookie, encoded) = nonce.split_at(NONCE_COOKIE_LEN);
        // One spare byte: decode_slice refuses an output shorter than its rounded-up estimate.
        let mut sealed = [0u8; SEALED_BYTES + 1];
        match URL_SAFE_NO_PAD.decode_slice(encoded, &mut sealed) {
            Ok(SEALED_BYTES) => {}
            _ => return false,
        }
        let mut time = [0u8; 8];
        time[8 - TIME_BYTES..].copy_from_slice(&sealed[..TIME_BYTES]);
        let millis = u64::from_be_bytes(time);
        let expected = self.tag(cookie, millis, five_tuple);
        if !constant_time_eq(&expected, &sealed[TIME_BYTES..SEALED_BYTES]) {
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
