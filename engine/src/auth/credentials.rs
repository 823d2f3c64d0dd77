//! Long-term credentials (RFC 8489 §9.2): static users and TURN REST shared secrets.
//!
//! Keys are derived once: a static user's MD5 key (and SHA-256 key, when the password is known)
//! are computed when the [`UserTable`] is built, so no request pays for MD5 or PRECIS. A TURN
//! REST user's keys (draft-uberti-behave-turn-rest-00 §2.2: username `expiry:user`, password
//! `base64(HMAC-SHA1(secret, username))`) are derived on first use, once per active secret,
//! and cached in a bounded map keyed by username.
//!
//! Users file format (`auth.users_file`), one user per line:
//!
//! ```text
//! # comment lines start with '#'; blank lines are ignored
//! alice:correct horse battery staple
//! bob:key=0123456789abcdef0123456789abcdef
//! ```
//!
//! The user name is everything before the first `:`. After it comes the password, or `key=`
//! and the 16-byte MD5 long-term key (RFC 8489 §9.2.2) as 32 hex digits. Such a key-only user
//! authenticates only with PASSWORD-ALGORITHM MD5 (or none).

use hashbrown::HashMap;

use crate::config::{AuthConfig, ConfigError, UserConfig};

/// An HMAC key for MESSAGE-INTEGRITY(-SHA256): 16 bytes (MD5) or 32 bytes (SHA-256).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IntegrityKey {
    bytes: [u8; 32],
    len: u8,
}

impl IntegrityKey {
    pub(crate) fn from_md5(key: [u8; 16]) -> Self {
        let mut bytes = [0; 32];
        bytes[..16].copy_from_slice(&key);
        Self { bytes, len: 16 }
    }

    pub(crate) fn from_sha256(key: [u8; 32]) -> Self {
        Self {
            bytes: key,
            len: 32,
        }
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IntegrityKey({} bytes, redacted)", self.len)
    }
}

/// The keys of one credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserKeys {
    /// RFC 8489 §9.2.2: MD5(username ":" realm ":" OpaqueString(password)).
    pub(crate) md5: IntegrityKey,
    /// RFC 8489 §9.2.2 with SHA-256; absent for users configured with an MD5 key only.
    pub(crate) sha256: Option<IntegrityKey>,
}

/// A users-file line that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("users file line {line}: {reason}")]
pub struct UsersFileError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
}

/// The static users with their derived keys, for one realm. Build it with
/// [`UserTable::from_users`] (`uturn-control` adds the users file it reads);
/// swap it at runtime with `Engine::reload_users`.
#[derive(Debug, Clone, Default)]
pub struct UserTable {
    realm: String,
    users: HashMap<String, UserKeys>,
    /// RFC 8489 §14.4: USERHASH = SHA-256(OpaqueString(username) ":" realm) → username.
    by_userhash: HashMap<[u8; 32], String>,
}

impl UserTable {
    /// Derives the keys of `users` for `realm`. Later entries replace earlier ones of the same
    /// name.
    pub fn from_users(realm: &str, users: &[UserConfig]) -> Result<Self, ConfigError> {
        let invalid = |username: &str, reason: &str| ConfigError::Invalid {
            field: "auth.users",
            reason: format!("user {username:?}: {reason}"),
        };
        let mut table = Self {
            realm: realm.to_owned(),
            ..Self::default()
        };
        for user in users {
            let keys = match (&user.password, &user.key) {
                (Some(password), None) => {
                    let md5 = uturn_proto::long_term_key_md5(&user.username, realm, password)
                        .map_err(|_| {
                            invalid(&user.username, "name or password not PRECIS-valid")
                        })?;
                    let sha256 = uturn_proto::long_term_key_sha256(&user.username, realm, password)
                        .map_err(|_| invalid(&user.username, "not PRECIS-valid"))?;
                    UserKeys {
                        md5: IntegrityKey::from_md5(md5),
                        sha256: Some(IntegrityKey::from_sha256(sha256)),
                    }
                }
                (None, Some(hex)) => {
                    let md5 = parse_hex_key(hex)
                        .ok_or_else(|| invalid(&user.username, "key must be 32 hex digits"))?;
                    UserKeys {
                        md5: IntegrityKey::from_md5(md5),
                        sha256: None,
                    }
                }
                _ => {
                    return Err(invalid(
                        &user.username,
                        "give exactly one of password or key",
                    ));
                }
            };
            let hash = uturn_proto::userhash(&user.username, realm);
            table.by_userhash.insert(hash, user.username.clone());
            table.users.insert(user.username.clone(), keys);
        }
        Ok(table)
    }

    /// The realm the keys were derived for.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub(crate) fn keys(&self, username: &str) -> Option<&UserKeys> {
        self.users.get(username)
    }

    pub(crate) fn username_by_hash(&self, hash: &[u8]) -> Option<&str> {
        let hash: [u8; 32] = hash.try_into().ok()?;
        self.by_userhash.get(&hash).map(String::as_str)
    }
}

/// Parses the text of a users file (format in the module docs).
pub fn parse_users_file(text: &str) -> Result<Vec<UserConfig>, UsersFileError> {
    let mut users = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let error = |reason| UsersFileError {
            line: index + 1,
            reason,
        };
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (username, secret) = trimmed.split_once(':').ok_or_else(|| error("no ':'"))?;
        if username.is_empty() {
            return Err(error("empty user name"));
        }
        let user = match secret.strip_prefix("key=") {
            Some(hex) => {
                if parse_hex_key(hex).is_none() {
                    return Err(error("key= needs 32 hex digits"));
                }
                UserConfig {
                    username: username.to_owned(),
                    password: None,
                    key: Some(hex.into()),
                }
            }
            None => UserConfig {
                username: username.to_owned(),
                password: Some(secret.to_owned()),
                key: None,
            },
        };
        users.push(user);
    }
    Ok(users)
}

/// Parses 32 hex digits into a 16-byte key.
pub(crate) fn parse_hex_key(hex: &str) -> Option<[u8; 16]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut key = [0u8; 16];
    for (byte, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(key)
}

/// Why a TURN REST username is not accepted before its keys are even tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestRefusal {
    /// Not `expiry<sep>user`, or no secret is configured.
    NotRest,
    /// The expiry timestamp is in the past (draft-uberti-behave-turn-rest-00 §2.2).
    Expired,
    /// The expiry timestamp lies further ahead than `auth.rest_expiry_max_secs`.
    TooFar,
}

/// TURN REST secrets and the bounded cache of keys derived from them.
#[derive(Debug, Clone)]
pub(crate) struct RestSecrets {
    secrets: Vec<String>,
    separator: char,
    cache: HashMap<String, Vec<UserKeys>>,
    cache_entries_max: usize,
    expiry_max_secs: u64,
}

impl RestSecrets {
    pub(crate) fn new(auth: &AuthConfig) -> Self {
        Self {
            secrets: auth.secrets.clone(),
            separator: auth.rest_separator,
            cache: HashMap::new(),
            cache_entries_max: (auth.rest_key_cache_entries as usize).max(1),
            expiry_max_secs: auth.rest_expiry_max(),
        }
    }

    pub(crate) fn separator(&self) -> char {
        self.separator
    }

    pub(crate) fn is_enabled(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// The candidate keys of a REST username, one per secret (rotation), if it has not expired
    /// at `unix_secs` and does not expire further ahead than the configured maximum.
    pub(crate) fn keys(
        &mut self,
        username: &str,
        realm: &str,
        unix_secs: u64,
    ) -> Result<&[UserKeys], RestRefusal> {
        if self.secrets.is_empty() {
            return Err(RestRefusal::NotRest);
        }
        let parsed = uturn_proto::parse_rest_username(username, self.separator)
            .map_err(|_| RestRefusal::NotRest)?;
        // draft-uberti-behave-turn-rest-00 §2.2: the username carries "the timestamp of when
        // this credential will expire"; at or after it the credential is refused.
        if parsed.expiry_unix_secs <= unix_secs {
            return Err(RestRefusal::Expired);
        }
        // The draft recommends a one-day TTL and has no revocation (§5.1): an expiry further
        // ahead than the operator allows is a web app with a wrong TTL, or a credential minted
        // to be kept, and either would stay usable for as long as it claims.
        if parsed.expiry_unix_secs > unix_secs.saturating_add(self.expiry_max_secs) {
            return Err(RestRefusal::TooFar);
        }
        if !self.cache.contains_key(username) {
            if self.cache.len() >= self.cache_entries_max {
                // Bounded: start over rather than track recency; a miss costs one derivation.
                self.cache.clear();
            }
            let mut keys = Vec::with_capacity(self.secrets.len());
            for secret in &self.secrets {
                let password = uturn_proto::rest_password(secret.as_bytes(), username);
                let md5 = uturn_proto::long_term_key_md5(username, realm, &password);
                let sha256 = uturn_proto::long_term_key_sha256(username, realm, &password);
                if let (Ok(md5), Ok(sha256)) = (md5, sha256) {
                    keys.push(UserKeys {
                        md5: IntegrityKey::from_md5(md5),
                        sha256: Some(IntegrityKey::from_sha256(sha256)),
                    });
                }
            }
            self.cache.insert(username.to_owned(), keys);
        }
        Ok(self
            .cache
            .get(username)
            .map(Vec::as_slice)
            .unwrap_or_default())
    }

    #[cfg(test)]
    pub(crate) fn cached(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_file_accepts_passwords_keys_comments_and_blank_lines() {
        let text = "# users\n\nalice:pass:word\nbob:key=0123456789ABCDEF0123456789abcdef\n";
        let users = parse_users_file(text).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].username, "alice");
        assert_eq!(users[0].password.as_deref(), Some("pass:word"));
        assert_eq!(
            users[1].key.as_deref(),
            Some("0123456789ABCDEF0123456789abcdef")
        );
    }

    #[test]
    fn a_users_file_line_without_a_colon_or_with_a_short_key_is_refused_with_its_number() {
        assert_eq!(parse_users_file("ok:1\nbroken\n").unwrap_err().line, 2);
        assert_eq!(parse_users_file("bob:key=00\n").unwrap_err().line, 1);
    }

    #[test]
    fn a_password_user_gets_both_keys_and_a_key_user_only_md5() {
        let users =
            parse_users_file("alice:secret\nbob:key=000102030405060708090a0b0c0d0e0f").unwrap();
        let table = UserTable::from_users("example.org", &users).unwrap();
        let alice = table.keys("alice").unwrap();
        assert_eq!(
            alice.md5.as_bytes(),
            uturn_proto::long_term_key_md5("alice", "example.org", "secret").unwrap()
        );
        assert!(alice.sha256.is_some());
        let bob = table.keys("bob").unwrap();
        assert_eq!(bob.md5.as_bytes(), (0u8..16).collect::<Vec<_>>());
        assert!(bob.sha256.is_none());
        let hash = uturn_proto::userhash("alice", "example.org");
        assert_eq!(table.username_by_hash(&hash), Some("alice"));
    }

    #[test]
    fn rest_keys_are_derived_once_per_username_and_the_cache_stays_bounded() {
        let auth = AuthConfig {
            secrets: vec!["one".into(), "two".into()],
            rest_key_cache_entries: 2,
            ..AuthConfig::default()
        };
        let mut rest = RestSecrets::new(&auth);
        assert_eq!(rest.keys("2000:alice", "uturn", 1000).unwrap().len(), 2);
        assert_eq!(rest.keys("2000:bob", "uturn", 1000).unwrap().len(), 2);
        assert_eq!(rest.cached(), 2);
        assert_eq!(rest.keys("2000:carol", "uturn", 1000).unwrap().len(), 2);
        assert!(rest.cached() <= 2);
        assert_eq!(
            rest.keys("1000:carol", "uturn", 1000),
            Err(RestRefusal::Expired)
        );
        assert_eq!(rest.keys("alice", "uturn", 1000), Err(RestRefusal::NotRest));
    }

    #[test]
    fn a_rest_expiry_up_to_the_maximum_ahead_is_accepted_and_one_second_more_is_refused() {
        let auth = AuthConfig {
            secrets: vec!["s".into()],
            rest_expiry_max_secs: 600,
            ..AuthConfig::default()
        };
        let mut rest = RestSecrets::new(&auth);
        assert!(rest.keys("1600:alice", "uturn", 1000).is_ok());
        assert_eq!(
            rest.keys("1601:alice", "uturn", 1000),
            Err(RestRefusal::TooFar)
        );
        // A wall clock near the end of time does not overflow the bound.
        let far = format!("{}:alice", u64::MAX);
        assert!(rest.keys(&far, "uturn", u64::MAX - 1).is_ok());
    }

    #[test]
    fn a_rest_expiry_maximum_of_zero_means_one_day() {
        let auth = AuthConfig {
            secrets: vec!["s".into()],
            rest_expiry_max_secs: 0,
            ..AuthConfig::default()
        };
        let mut rest = RestSecrets::new(&auth);
        assert!(rest.keys("87400:alice", "uturn", 1000).is_ok());
        assert_eq!(
            rest.keys("87401:alice", "uturn", 1000),
            Err(RestRefusal::TooFar)
        );
    }
}
