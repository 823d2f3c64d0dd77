//! Credentials: long-term keys (RFC 8489 §9.2.2, §18.5.1), USERHASH (RFC 8489 §14.4) and the
//! TURN REST scheme (draft-uberti-behave-turn-rest-00).
//!
//! These allocate (PRECIS preparation, base64); call them when a credential is configured or
//! first seen and cache the key, not once per packet.

use std::borrow::Cow;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::Md5;
use precis_profiles::OpaqueString;
use precis_profiles::precis_core::profile::PrecisFastInvocation;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{CredentialError, RestUsernameError};

/// Prepares and enforces `s` with the RFC 8265 §4.2 OpaqueString profile (used for passwords
/// and realms, RFC 8489 §9.2.2). Errors when `s` is empty or holds a disallowed code point.
pub fn opaque_string(s: &str) -> Result<Cow<'_, str>, CredentialError> {
    OpaqueString::enforce(s).map_err(|_| CredentialError::InvalidString)
}

/// The short-term credential key: `OpaqueString(password)` (RFC 8489 §9.1.1).
pub fn short_term_key(password: &str) -> Result<Cow<'_, str>, CredentialError> {
    OpaqueString::enforce(password).map_err(|_| CredentialError::InvalidPassword)
}

/// The long-term key for MESSAGE-INTEGRITY and PASSWORD-ALGORITHM MD5 (RFC 8489 §9.2.2,
/// §18.5.1.1):
///
/// ```text
/// key = MD5(username ":" OpaqueString(realm) ":" OpaqueString(password))
/// ```
pub fn long_term_key_md5(
    username: &str,
    realm: &str,
    password: &str,
) -> Result<[u8; 16], CredentialError> {
    let (realm, password) = prepare(realm, password)?;
    let mut h = Md5::new();
    feed(&mut h, username, &realm, &password);
    Ok(h.finalize().into())
}

/// The long-term key for PASSWORD-ALGORITHM SHA-256 (RFC 8489 §18.5.1.2):
///
/// ```text
/// key = SHA-256(username ":" OpaqueString(realm) ":" OpaqueString(password))
/// ```
pub fn long_term_key_sha256(
    username: &str,
    realm: &str,
    password: &str,
) -> Result<[u8; 32], CredentialError> {
    let (realm, password) = prepare(realm, password)?;
    let mut h = Sha256::new();
    feed(&mut h, username, &realm, &password);
    Ok(h.finalize().into())
}

/// USERHASH (RFC 8489 §14.4): `SHA-256(OpaqueString(username) ":" OpaqueString(realm))`.
///
/// Hashes the strings as given: pass them through [`opaque_string`] first when they may not be
/// in prepared form (plain ASCII, as usual for usernames and realms, already is).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// The TURN REST password for `username` (draft-uberti-behave-turn-rest-00 §2.2):
/// `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    #[allow(clippy::expect_used)]
    // HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A parsed TURN REST username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestUsername<'a> {
    /// When the credential expires, in seconds since the Unix epoch (wall clock).
    pub expiry_unix_secs: u64,
    /// The user part, `None` for a bare `expiry` username.
    pub user: Option<&'a str>,
}

/// Parses a TURN REST username, `expiry<separator>user` (draft-uberti-behave-turn-rest-00
/// §2.2: "the username [...] is a colon-delimited combination of the expiration timestamp and
/// the username parameter"), or a bare `expiry`. The expiry is decimal Unix time; comparing it
/// with the wall clock is the caller's job (this crate has no clock).
pub fn parse_rest_username(
    username: &str,
    separator: char,
) -> Result<RestUsername<'_>, RestUsernameError> {
    let (expiry, user) = match username.split_once(separator) {
        Some((_, "")) => return Err(RestUsernameError::EmptyUser),
        Some((expiry, user)) => (expiry, Some(user)),
        None => (username, None),
    };
    if expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RestUsernameError::InvalidExpiry);
    }
    let expiry_unix_secs = expiry
        .parse()
        .map_err(|_| RestUsernameError::InvalidExpiry)?;
    Ok(RestUsername {
        expiry_unix_secs,
        user,
    })
}

fn prepare<'r, 'p>(
    realm: &'r str,
    password: &'p str,
) -> Result<(Cow<'r, str>, Cow<'p, str>), CredentialError> {
    let realm = OpaqueString::enforce(realm).map_err(|_| CredentialError::InvalidRealm)?;
    let password = OpaqueString::enforce(password).map_err(|_| CredentialError::InvalidPassword)?;
    Ok((realm, password))
}

fn feed<D: Digest>(h: &mut D, username: &str, realm: &str, password: &str) {
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
}

/// The nonce cookie prefix (RFC 8489 §9.2): "a server MUST prepend the NONCE attribute value
/// with the character string composed of "obMatJos2" concatenated with the (4-character) base64
/// encoding of the 24-bit STUN Security Features".
pub const NONCE_COOKIE_PREFIX: &str = "obMatJos2";

/// Length of the nonce cookie: the 9-character prefix and 4 base64 characters.
pub const NONCE_COOKIE_LEN: usize = 13;

/// The STUN Security Features (RFC 8489 §18.1): 24 flag bits, bit 0 the most significant bit
/// of the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SecurityFeatures(pub [u8; 3]);

impl SecurityFeatures {
    /// Bit 0: Password algorithms (PASSWORD-ALGORITHMS, MESSAGE-INTEGRITY-SHA256).
    pub const PASSWORD_ALGORITHMS: Self = Self([0x80, 0, 0]);
    /// Bit 1: Username anonymity (USERHASH).
    pub const USERNAME_ANONYMITY: Self = Self([0x40, 0, 0]);

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Self) -> bool {
        self.0[0] & other.0[0] == other.0[0]
            && self.0[1] & other.0[1] == other.0[1]
            && self.0[2] & other.0[2] == other.0[2]
    }

    /// Both sets' bits.
    pub const fn union(self, other: Self) -> Self {
        Self([
            self.0[0] | other.0[0],
            self.0[1] | other.0[1],
            self.0[2] | other.0[2],
        ])
    }

    /// The 13-character nonce cookie announcing these features, to put in front of a NONCE.
    pub fn nonce_cookie(self) -> NonceCookie {
        let mut out = [0u8; NONCE_COOKIE_LEN];
        let (prefix, b64) = out.split_at_mut(NONCE_COOKIE_PREFIX.len());
        prefix.copy_from_slice(NONCE_COOKIE_PREFIX.as_bytes());
        // 3 bytes always encode to exactly 4 base64 characters.
        let _ = base64::engine::general_purpose::STANDARD.encode_slice(self.0, b64);
        NonceCookie(out)
    }

    /// The features a NONCE's cookie announces, or `None` when it has no valid cookie (a
    /// server that does not support RFC 8489's security features).
    pub fn from_nonce(nonce: &str) -> Option<Self> {
        let b64 = nonce.strip_prefix(NONCE_COOKIE_PREFIX)?.get(..4)?;
        let mut bytes = [0u8; 3];
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(b64, &mut bytes)
            .ok()?;
        (n == 3).then_some(Self(bytes))
    }
}

/// A nonce cookie (RFC 8489 §9.2), e.g. `obMatJos2gAAA` for "password algorithms".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NonceCookie([u8; NONCE_COOKIE_LEN]);

impl NonceCookie {
    /// The cookie text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or(NONCE_COOKIE_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cross-checked with Python: `base64.b64encode(hmac.new(b'north', b'1700000000:alice',
    /// hashlib.sha1).digest())`.
    #[test]
    fn rest_password_is_base64_of_hmac_sha1_of_the_username() {
        assert_eq!(
            rest_password(b"north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
    }

    /// draft-uberti-behave-turn-rest-00 §2.2: "a colon-delimited combination of the
    /// expiration timestamp and the username parameter from the request (if specified)".
    #[test]
    fn rest_usernames_split_into_expiry_and_optional_user() {
        assert_eq!(
            parse_rest_username("1700000000:alice", ':'),
            Ok(RestUsername {
                expiry_unix_secs: 1_700_000_000,
                user: Some("alice")
            })
        );
        assert_eq!(
            parse_rest_username("1700000000", ':'),
            Ok(RestUsername {
                expiry_unix_secs: 1_700_000_000,
                user: None
            })
        );
        assert_eq!(
            parse_rest_username("1700000000-bob:x", '-'),
            Ok(RestUsername {
                expiry_unix_secs: 1_700_000_000,
                user: Some("bob:x")
            })
        );
    }

    #[test]
    fn rest_usernames_without_a_numeric_expiry_are_refused() {
        for bad in [
            "alice:1700000000",
            "",
            ":alice",
            "17e9:alice",
            "-1:alice",
            "99999999999999999999:a",
        ] {
            assert_eq!(
                parse_rest_username(bad, ':'),
                Err(RestUsernameError::InvalidExpiry),
                "{bad}"
            );
        }
        assert_eq!(
            parse_rest_username("1700000000:", ':'),
            Err(RestUsernameError::EmptyUser)
        );
    }

    /// RFC 8265 §4.2: OpaqueString maps non-ASCII spaces to U+0020 and normalises with NFC,
    /// and refuses empty strings.
    #[test]
    fn opaque_string_prepares_passwords_and_refuses_empty_ones() {
        assert_eq!(opaque_string("TheMatrIX").as_deref(), Ok("TheMatrIX"));
        assert_eq!(opaque_string("a\u{00A0}b").as_deref(), Ok("a b"));
        assert_eq!(opaque_string(""), Err(CredentialError::InvalidString));
        assert_eq!(
            long_term_key_md5("u", "r", ""),
            Err(CredentialError::InvalidPassword)
        );
        assert_eq!(
            long_term_key_md5("u", "", "p"),
            Err(CredentialError::InvalidRealm)
        );
    }

    /// RFC 8489 §9.2: the cookie is "obMatJos2" and the base64 of the 24-bit feature set,
    /// "bit 0 as the most significant bit of the first byte". B.1's nonce carries `AAAC`.
    #[test]
    fn nonce_cookies_carry_the_security_feature_bits() {
        let both =
            SecurityFeatures::PASSWORD_ALGORITHMS.union(SecurityFeatures::USERNAME_ANONYMITY);
        assert_eq!(
            SecurityFeatures::PASSWORD_ALGORITHMS
                .nonce_cookie()
                .as_str(),
            "obMatJos2gAAA"
        );
        assert_eq!(both.nonce_cookie().as_str(), "obMatJos2wAAA");
        assert_eq!(
            SecurityFeatures::default().nonce_cookie().as_str(),
            "obMatJos2AAAA"
        );
        let nonce = format!(
            "{}f//499k954d6OL34oL9FSTvy64sA",
            both.nonce_cookie().as_str()
        );
        let parsed = SecurityFeatures::from_nonce(&nonce).unwrap();
        assert!(parsed.contains(SecurityFeatures::USERNAME_ANONYMITY));
        assert_eq!(parsed, both);
        let b1 = SecurityFeatures::from_nonce("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA").unwrap();
        assert_eq!(b1, SecurityFeatures([0, 0, 2]));
        assert!(!b1.contains(SecurityFeatures::PASSWORD_ALGORITHMS));
        assert_eq!(
            SecurityFeatures::from_nonce("f//499k954d6OL34oL9FSTvy64sA"),
            None
        );
        assert_eq!(SecurityFeatures::from_nonce("obMatJos2A"), None);
        assert_eq!(SecurityFeatures::from_nonce("obMatJos2!!!!"), None);
    }

    /// Expressway's default realm: the key is MD5 of "user:TANDBERG:pass" (checked with
    /// `hashlib.md5(b"alice:TANDBERG:secret")`).
    #[test]
    fn the_md5_long_term_key_is_md5_of_user_realm_and_password() {
        let expected: [u8; 16] = Md5::digest(b"alice:TANDBERG:secret").into();
        assert_eq!(
            long_term_key_md5("alice", "TANDBERG", "secret"),
            Ok(expected)
        );
        let expected: [u8; 32] = Sha256::digest(b"alice:TANDBERG:secret").into();
        assert_eq!(
            long_term_key_sha256("alice", "TANDBERG", "secret"),
            Ok(expected)
        );
    }
}
