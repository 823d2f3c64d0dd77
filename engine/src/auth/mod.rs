//! Authentication of requests with the long-term credential mechanism (RFC 8489 §9.2).
//!
//! `Authenticator::authenticate` runs the checks of RFC 8489 §9.2.4 in their order and
//! returns either an [`Authenticated`] proof or an `AuthRejection` that says which error
//! response to send and why. Only this module can construct [`Authenticated`], and every engine
//! handler that changes an allocation takes one, so a path that skips the integrity check does
//! not compile.

pub mod credentials;
pub mod nonce;

use std::time::{Duration, Instant};

use uturn_proto::{AttributeType, Message};

use crate::FiveTuple;
use credentials::{IntegrityKey, RestRefusal, RestSecrets, UserKeys, UserTable};
use nonce::{FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY, NonceIssuer};

/// RFC 8489 §18.5: PASSWORD-ALGORITHM value for MD5.
pub const PASSWORD_ALGORITHM_MD5: u16 = 0x0001;
/// RFC 8489 §18.5: PASSWORD-ALGORITHM value for SHA-256.
pub const PASSWORD_ALGORITHM_SHA256: u16 = 0x0002;
/// The PASSWORD-ALGORITHMS value every challenge carries (RFC 8489 §14.11): SHA-256 first
/// (preferred), then MD5, each with empty parameters.
pub const OFFERED_PASSWORD_ALGORITHMS: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];

/// Why a request was not authenticated; each is a static label for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthFailure {
    /// No MESSAGE-INTEGRITY: the ordinary first leg of the handshake, answered with a challenge.
    NoCredentials,
    /// MESSAGE-INTEGRITY present but USERNAME/USERHASH, REALM or NONCE missing or malformed.
    MissingAttributes,
    /// PASSWORD-ALGORITHMS/PASSWORD-ALGORITHM do not match what the nonce offered (bid-down).
    AlgorithmMismatch,
    /// Neither a static user nor a valid TURN REST username.
    UnknownUser,
    /// REALM differs from the server's.
    RealmMismatch,
    /// A TURN REST username whose expiry timestamp has passed.
    ExpiredCredential,
    /// A TURN REST username whose expiry lies further ahead than `auth.rest_expiry_max_secs`.
    ExpiryTooFar,
    /// MESSAGE-INTEGRITY does not verify with the user's key (wrong password).
    BadIntegrity,
    /// PASSWORD-ALGORITHM SHA-256 for a user configured with an MD5 key only.
    AlgorithmUnavailable,
    /// The NONCE is expired, was issued to another client, or is not ours.
    StaleNonce,
}

impl AuthFailure {
    /// A static label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::MissingAttributes => "missing_attributes",
            Self::AlgorithmMismatch => "algorithm_mismatch",
            Self::UnknownUser => "unknown_user",
            Self::RealmMismatch => "realm_mismatch",
            Self::ExpiredCredential => "expired_credential",
            Self::ExpiryTooFar => "expiry_too_far",
            Self::BadIntegrity => "bad_integrity",
            Self::AlgorithmUnavailable => "algorithm_unavailable",
            Self::StaleNonce => "stale_nonce",
        }
    }
}

/// Which integrity attribute protects the request and its responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityKind {
    /// MESSAGE-INTEGRITY (HMAC-SHA1), RFC 8489 §14.5.
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256, RFC 8489 §14.6.
    Sha256,
}

/// Proof that a request passed RFC 8489 §9.2.4: only `Authenticator::authenticate` builds
/// it. It carries what the response needs to be protected with the same key.
#[derive(Debug, Clone)]
pub struct Authenticated {
    user: String,
    key: IntegrityKey,
    integrity: IntegrityKind,
}

impl Authenticated {
    /// The user: the static user name, or the user part of a TURN REST username (quotas count
    /// per user, not per credential).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The key that verified the request; responses are protected with it.
    pub fn key(&self) -> &IntegrityKey {
        &self.key
    }

    /// The integrity attribute the request used; responses use the same.
    pub fn integrity(&self) -> IntegrityKind {
        self.integrity
    }
}

/// A refused request: the error response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthRejection {
    /// 400, 401, 431 or 438.
    pub(crate) code: u16,
    pub(crate) reason: AuthFailure,
    /// Include REALM, a fresh NONCE and PASSWORD-ALGORITHMS (401, 431 and 438).
    pub(crate) challenge: bool,
    /// The user name the client gave, for the event.
    pub(crate) username: Option<String>,
}

/// Runs the long-term credential checks.
#[derive(Debug)]
pub(crate) struct Authenticator {
    realm: String,
    nonces: NonceIssuer,
    users: UserTable,
    rest: RestSecrets,
    integrity_failure_code: u16,
}

impl Authenticator {
    pub(crate) fn new(
        auth: &crate::config::AuthConfig,
        users: UserTable,
        secret: [u8; 32],
        epoch: Instant,
    ) -> Self {
        let rest = RestSecrets::new(auth);
        // Username anonymity (USERHASH) is announced only when every credential is a static
        // user: a RFC 8489 client that sees the bit MUST send USERHASH, which cannot be mapped
        // back to a TURN REST username.
        let mut features = FEATURE_PASSWORD_ALGORITHMS;
        if !rest.is_enabled() {
            features |= FEATURE_USERNAME_ANONYMITY;
        }
        let lifetime = Duration::from_secs(u64::from(auth.nonce_lifetime_secs));
        Self {
            realm: auth.realm.clone(),
            nonces: NonceIssuer::new(secret, features, epoch, lifetime),
            users,
            rest,
            integrity_failure_code: auth.integrity_failure_code,
        }
    }

    pub(crate) fn realm(&self) -> &str {
        &self.realm
    }

    pub(crate) fn issue_nonce(&self, now: Instant, five_tuple: &FiveTuple) -> String {
        self.nonces.issue(now, five_tuple)
    }

    pub(crate) fn replace_users(&mut self, users: UserTable) {
        self.users = users;
    }

    /// Replaces the TURN REST secrets. Refused when it would switch REST credentials on or
    /// off: the nonce cookie announces USERHASH only without them, and nonces already issued
    /// carry that announcement.
    pub(crate) fn replace_secrets(
        &mut self,
        auth: &crate::config::AuthConfig,
    ) -> Result<(), &'static str> {
        let rest = RestSecrets::new(auth);
        if rest.is_enabled() != self.rest.is_enabled() {
            return Err("switching TURN REST secrets on or off needs a restart \
                        (issued nonces announce USERHASH only without them)");
        }
        self.rest = rest;
        Ok(())
    }

    /// RFC 8489 §9.2.4, in order.
    pub(crate) fn authenticate(
        &mut self,
        message: &Message<'_>,
        five_tuple: &FiveTuple,
        now: Instant,
        unix_secs: u64,
    ) -> Result<Authenticated, AuthRejection> {
        let reject = |code, reason, challenge, username: Option<&str>| AuthRejection {
            code,
            reason,
            challenge,
            username: username.map(str::to_owned),
        };
        // 1. "If the message does not contain a MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256
        //    attribute, the server MUST generate an error response with an error code of 401".
        let integrity = if message.has_integrity_sha256() {
            IntegrityKind::Sha256
        } else if message.has_integrity() {
            IntegrityKind::Sha1
        } else {
            return Err(reject(401, AuthFailure::NoCredentials, true, None));
        };
        // 2. "... but is missing either the USERNAME or USERHASH, REALM, or NONCE attribute, the
        //    server MUST generate an error response with an error code of 400".
        let username = message.username().ok().flatten();
        let userhash = message.attribute(AttributeType::USERHASH);
        let realm = message.realm().ok().flatten();
        let nonce = message.attribute(AttributeType::NONCE);
        let (Some(realm), Some(nonce)) = (realm, nonce) else {
            return Err(reject(400, AuthFailure::MissingAttributes, false, username));
        };
        if username.is_none() && userhash.is_none() {
            return Err(reject(400, AuthFailure::MissingAttributes, false, None));
        }
        // 3. Bid-down protection when the nonce cookie announces password algorithms.
        let mut algorithm = PASSWORD_ALGORITHM_MD5;
        let features = nonce::nonce_features(nonce).unwrap_or(0);
        if features & FEATURE_PASSWORD_ALGORITHMS != 0 {
            let offered = message.attribute(AttributeType::PASSWORD_ALGORITHMS);
            let chosen = message.attribute(AttributeType::PASSWORD_ALGORITHM);
            match (offered, chosen) {
                (None, None) => {}
                (Some(offered), Some(chosen)) => {
                    let chosen = match chosen {
                        [hi, lo, 0, 0, ..] => u16::from_be_bytes([*hi, *lo]),
                        _ => 0,
                    };
                    if offered != OFFERED_PASSWORD_ALGORITHMS
                        || !matches!(chosen, PASSWORD_ALGORITHM_MD5 | PASSWORD_ALGORITHM_SHA256)
                    {
                        return Err(reject(400, AuthFailure::AlgorithmMismatch, false, username));
                    }
                    algorithm = chosen;
                }
                _ => return Err(reject(400, AuthFailure::AlgorithmMismatch, false, username)),
            }
        }
        // 4. "If the value of the USERNAME or USERHASH attribute is not valid ... 401". A REALM
        //    other than ours cannot name a valid user of this server either.
        if realm != self.realm {
            return Err(reject(401, AuthFailure::RealmMismatch, true, username));
        }
        let static_name = match (username, userhash) {
            (Some(name), _) => self.users.keys(name).map(|_| name),
            (None, Some(hash)) => self.users.username_by_hash(hash),
            (None, None) => None,
        };
        let (user, candidates): (String, &[UserKeys]) = match static_name {
            Some(name) => match self.users.keys(name) {
                Some(keys) => (name.to_owned(), std::slice::from_ref(keys)),
                None => return Err(reject(401, AuthFailure::UnknownUser, true, username)),
            },
            None => {
                let Some(name) = username else {
                    return Err(reject(401, AuthFailure::UnknownUser, true, None));
                };
                let separator = self.rest.separator();
                match self.rest.keys(name, &self.realm, unix_secs) {
                    Ok(keys) => {
                        let user = uturn_proto::parse_rest_username(name, separator)
                            .ok()
                            .and_then(|parsed| parsed.user)
                            .unwrap_or(name)
                            .to_owned();
                        (user, keys)
                    }
                    Err(RestRefusal::Expired) => {
                        return Err(reject(401, AuthFailure::ExpiredCredential, true, username));
                    }
                    // The draft asks for 401 when the timestamp check fails; this is one more
                    // such check.
                    Err(RestRefusal::TooFar) => {
                        return Err(reject(401, AuthFailure::ExpiryTooFar, true, username));
                    }
                    Err(RestRefusal::NotRest) => {
                        return Err(reject(401, AuthFailure::UnknownUser, true, username));
                    }
                }
            }
        };
        // 5. "If the resulting value does not match ... 401" (or 431 by configuration).
        let mut verified = None;
        let mut unavailable = false;
        for keys in candidates {
            let key = if algorithm == PASSWORD_ALGORITHM_SHA256 {
                match keys.sha256 {
                    Some(key) => key,
                    None => {
                        unavailable = true;
                        continue;
                    }
                }
            } else {
                keys.md5
            };
            let ok = match integrity {
                IntegrityKind::Sha1 => message.verify_integrity(key.as_bytes()).is_ok(),
                IntegrityKind::Sha256 => message.verify_integrity_sha256(key.as_bytes()).is_ok(),
            };
            if ok {
                verified = Some(key);
                break;
            }
        }
        let Some(key) = verified else {
            let reason = if unavailable {
                AuthFailure::AlgorithmUnavailable
            } else {
                AuthFailure::BadIntegrity
            };
            return Err(reject(self.integrity_failure_code, reason, true, username));
        };
        // 6. "If the NONCE is no longer valid, the server MUST generate an error response with
        //    an error code of 438 (Stale Nonce)".
        if !self.nonces.is_valid(nonce, now, five_tuple) {
            return Err(reject(438, AuthFailure::StaleNonce, true, username));
        }
        Ok(Authenticated {
            user,
            key,
            integrity,
        })
    }
}
