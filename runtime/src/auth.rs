//! Request signing: HMAC-SHA256 over a timestamp and the request.
//!
//! The string to sign is five lines joined by `\n`, with no trailing newline:
//!
//! ```text
//! X-TS value
//! METHOD (upper case)
//! path and query exactly as sent in the request target
//! X-Nonce value, or the empty string
//! lowercase hex SHA-256 of the raw body
//! ```
//!
//! `X-SIG` is the lowercase hex HMAC-SHA256 of that string, keyed with the
//! UTF-8 bytes of the shared key. The server accepts a timestamp within
//! [`TOLERANCE_SECONDS`] of its clock and each signature only once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::keys::{Key, KeyRing};

type HmacSha256 = Hmac<Sha256>;

/// How far a request's timestamp may be from the server clock, either way.
pub const TOLERANCE_SECONDS: u64 = 300;

/// Minimum length of a shared key, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Maximum length of an `X-Nonce` value, in bytes.
pub const MAX_NONCE_BYTES: usize = 128;

/// Header carrying the Unix time of the request, in whole seconds.
pub const HEADER_TS: &str = "x-ts";
/// Header carrying the signature.
pub const HEADER_SIG: &str = "x-sig";
/// Header carrying the optional nonce.
pub const HEADER_NONCE: &str = "x-nonce";
/// Header naming the key that signed the request; absent means `default`.
pub const HEADER_KEY_ID: &str = "x-key-id";

/// Returns the lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Builds the string to sign for one request.
pub fn string_to_sign(ts: &str, method: &str, target: &str, nonce: &str, body: &[u8]) -> String {
    format!(
        "{ts}\n{}\n{target}\n{nonce}\n{}",
        method.to_ascii_uppercase(),
        sha256_hex(body)
    )
}

/// Signs `string_to_sign` with `key`, returning lowercase hex.
pub fn sign(key: &[u8], string_to_sign: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(string_to_sign.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Generates a random key of 32 bytes, encoded as 64 hex characters, so it
/// fits an environment variable. The text is the key: the server uses its
/// UTF-8 bytes and never decodes it.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    hex::encode(bytes)
}

/// Generates a random nonce for one request.
pub fn generate_nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    hex::encode(bytes)
}

/// Failed authentication check.
///
/// The [`code`](AuthError::code) is stable for clients; the message never
/// contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header appears more than once.
    #[error("header {0} appears more than once; send it once")]
    RepeatedHeader(&'static str),
    /// `X-TS` is not Unix time in whole seconds.
    #[error("invalid X-TS: expected Unix time in whole seconds (ASCII digits only)")]
    InvalidTimestamp,
    /// `X-TS` is too far from the server clock.
    #[error(
        "stale X-TS: {skew} s {} the server clock, more than the {TOLERANCE_SECONDS} s allowed; {}",
        if *.ahead { "ahead of" } else { "behind" },
        stale_hint(*.skew, *.ahead)
    )]
    StaleTimestamp {
        /// Difference from the server clock, in seconds.
        skew: u64,
        /// Whether `X-TS` is later than the server clock.
        ahead: bool,
    },
    /// `X-Nonce` is too long or not printable ASCII.
    #[error("invalid X-Nonce: use at most {MAX_NONCE_BYTES} printable ASCII characters")]
    InvalidNonce,
    /// `X-SIG` is not 64 lowercase hex characters.
    #[error("invalid X-SIG: expected the HMAC-SHA256 as 64 lowercase hex characters")]
    InvalidSignature,
    /// `X-SIG` does not match the request.
    #[error(
        "bad signature: X-SIG does not match the request (timestamp, method, target, nonce and body are signed)"
    )]
    BadSignature,
    /// The signature was already used.
    #[error("replayed request: this signature was already accepted; sign each request afresh")]
    Replay,
    /// The key is disabled in the keys file.
    #[error("the key is disabled; ask an operator for a valid key")]
    KeyDisabled,
    /// The key's `not_after` time has passed.
    #[error("the key has expired; ask an operator for a new key")]
    KeyExpired,
    /// `X-Key-Id` is not a valid key id.
    #[error("invalid X-Key-Id: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`")]
    InvalidKeyId,
    /// The replay cache is full and this timestamp is older than what it
    /// still remembers.
    #[error("too many recent requests to rule out a replay of this one; sign it again with the current time")]
    ReplayCacheFull,
    /// `X-TS` is earlier than the server's start, when its replay cache began.
    #[error(
        "X-TS is {behind} s earlier than the server's last start, before which it cannot rule out replays; \
         sign the request again with the current time, and if this repeats, check that the client clock is not behind"
    )]
    BeforeStart {
        /// Seconds from `X-TS` to the server's start.
        behind: u64,
    },
}

impl AuthError {
    /// Returns a short machine-readable code for API responses and the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingHeader(_) => "missing_header",
            AuthError::RepeatedHeader(_) => "repeated_header",
            AuthError::InvalidTimestamp => "invalid_timestamp",
            AuthError::StaleTimestamp { .. } => "stale_timestamp",
            AuthError::InvalidNonce => "invalid_nonce",
            AuthError::InvalidSignature => "invalid_signature",
            AuthError::BadSignature => "bad_signature",
            AuthError::Replay => "replay",
            AuthError::BeforeStart { .. } => "timestamp_before_start",
            AuthError::ReplayCacheFull => "replay_cache_full",
            AuthError::KeyDisabled => "key_disabled",
            AuthError::KeyExpired => "key_expired",
            AuthError::InvalidKeyId => "invalid_key_id",
        }
    }
}

/// The parts of a request that are signed.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// `X-TS` header value.
    pub ts: &'a str,
    /// `X-SIG` header value.
    pub signature: &'a str,
    /// `X-Nonce` header value, or empty.
    pub nonce: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Path and query as sent in the request line.
    pub target: &'a str,
    /// Raw body.
    pub body: &'a [u8],
    /// `X-Key-Id` value, or `default`.
    pub key_id: &'a str,
}

/// Parses an `X-TS` value: ASCII digits only, no sign, space or fraction.
pub fn parse_timestamp(value: &str) -> Result<u64, AuthError> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthError::InvalidTimestamp);
    }
    value.parse().map_err(|_| AuthError::InvalidTimestamp)
}

/// Verifies signed requests with one key and remembers accepted signatures
/// until their timestamps leave the window.
///
/// The memory of accepted signatures starts empty, so a verifier also
/// rejects timestamps earlier than its `not_before` time: a request signed
/// before a restart cannot be replayed after it.
pub struct Verifier {
    ring: RwLock<Arc<KeyRing>>,
    not_before: u64,
    seen: Mutex<ReplayCache>,
}

impl Verifier {
    /// Creates a verifier for one key `default`, the UTF-8 bytes of the
    /// shared key, that accepts timestamps from Unix time `not_before` on.
    pub fn new(key: Vec<u8>, not_before: u64) -> Verifier {
        Verifier::with_ring(KeyRing::single(key), not_before)
    }

    /// Creates a verifier for the keys of `ring`.
    pub fn with_ring(ring: KeyRing, not_before: u64) -> Verifier {
        Verifier {
            ring: RwLock::new(Arc::new(ring)),
            not_before,
            seen: Mutex::new(ReplayCache::new(REPLAY_CAPACITY)),
        }
    }

    /// Replaces the key ring; the next request is checked against the new one.
    pub fn replace_ring(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
    }

    /// Returns the current key ring.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks the format of `X-TS` and that it is inside the window around
    /// `now`, before the body is read.
    ///
    /// # Errors
    ///
    /// [`AuthError::InvalidTimestamp`], [`AuthError::StaleTimestamp`] or
    /// [`AuthError::BeforeStart`].
    pub fn check_timestamp(&self, ts: &str, now: u64) -> Result<u64, AuthError> {
        let ts = parse_timestamp(ts)?;
        let skew = ts.abs_diff(now);
        if skew > TOLERANCE_SECONDS {
            return Err(AuthError::StaleTimestamp {
                skew,
                ahead: ts > now,
            });
        }
        if ts < self.not_before {
            return Err(AuthError::BeforeStart {
                behind: self.not_before - ts,
            });
        }
        Ok(ts)
    }

    /// Checks one request against the clock `now` (Unix seconds).
    ///
    /// # Errors
    ///
    /// Returns the first check that failed. Signature comparison runs in
    /// constant time; a replay is detected only after the signature verifies,
    /// so unauthenticated traffic never fills the replay cache.
    pub fn verify(&self, request: &SignedRequest<'_>, now: u64) -> Result<Arc<Key>, AuthError> {
        let ts = self.check_timestamp(request.ts, now)?;
        if request.nonce.len() > MAX_NONCE_BYTES || !request.nonce.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::InvalidNonce);
        }

        let signature = decode_signature(request.signature)?;
        let text = string_to_sign(
            request.ts,
            request.method,
            request.target,
            request.nonce,
            request.body,
        );
        // An unknown key id fails like a wrong signature, so ids cannot be probed.
        let key = self.ring().get(request.key_id).cloned();
        let secret = key.as_ref().map_or(&[][..], |k| k.secret.as_slice());
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(text.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature)?;
        let key = key.ok_or(AuthError::BadSignature)?;

        // Only a holder of the secret learns that the key is switched off.
        if key.disabled {
            return Err(AuthError::KeyDisabled);
        }
        if key.not_after.is_some_and(|end| now > end) {
            return Err(AuthError::KeyExpired);
        }
        self.remember(signature, ts + TOLERANCE_SECONDS, now)?;
        Ok(key)
    }

    /// Records a verified signature, rejecting one already seen.
    fn remember(&self, signature: [u8; 32], expires: u64, now: u64) -> Result<(), AuthError> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remember(signature, expires, now)
    }
}

/// Most signatures remembered at once: about 8 MiB.
const REPLAY_CAPACITY: usize = 100_000;

/// Signatures accepted and still inside their window, bounded in size.
///
/// When full, the entry that expires first is forgotten and its expiry
/// becomes a floor: a request that expires no later is rejected, since its
/// signature might be one that was forgotten. So the cache never accepts a
/// replay, whatever the traffic.
struct ReplayCache {
    expiry_of: HashMap<[u8; 32], u64>,
    by_expiry: std::collections::BTreeSet<(u64, [u8; 32])>,
    floor: u64,
    capacity: usize,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            expiry_of: HashMap::new(),
            by_expiry: std::collections::BTreeSet::new(),
            floor: 0,
            capacity,
        }
    }

    fn remember(&mut self, signature: [u8; 32], expires: u64, now: u64) -> Result<(), AuthError> {
        while let Some(&(until, old)) = self.by_expiry.first() {
            if until >= now {
                break;
            }
            self.by_expiry.remove(&(until, old));
            self.expiry_of.remove(&old);
        }

        if self.expiry_of.contains_key(&signature) {
            return Err(AuthError::Replay);
        }
        if expires <= self.floor {
            return Err(AuthError::ReplayCacheFull);
        }
        if self.expiry_of.len() >= self.capacity
            && let Some((until, old)) = self.by_expiry.pop_first()
        {
            self.expiry_of.remove(&old);
            self.floor = self.floor.max(until);
            if expires <= self.floor {
                return Err(AuthError::ReplayCacheFull);
            }
        }
        self.expiry_of.insert(signature, expires);
        self.by_expiry.insert((expires, signature));
        Ok(())
    }
}

/// Decodes a signature of exactly 64 lowercase hex characters.
fn decode_signature(value: &str) -> Result<[u8; 32], AuthError> {
    if value.len() != 64 || !value.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(AuthError::InvalidSignature);
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).map_err(|_| AuthError::InvalidSignature)?;
    Ok(out)
}

/// Returns what to check for a timestamp `skew` seconds off the server
/// clock: a timestamp in milliseconds is about a thousand times now.
fn stale_hint(skew: u64, ahead: bool) -> &'static str {
    // Unix time in milliseconds has been over 10^12 since 2001.
    if ahead && skew > 1_000_000_000_000 / 2 {
        "X-TS is in whole seconds, not milliseconds"
    } else {
        "check the client clock"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk";

    fn signed(ts: &str, nonce: &str) -> (String, String) {
        let text = string_to_sign(ts, "GET", "/v1/plugins", nonce, b"");
        (sign(KEY, &text), text)
    }

    fn request<'a>(ts: &'a str, signature: &'a str, nonce: &'a str) -> SignedRequest<'a> {
        SignedRequest {
            ts,
            signature,
            nonce,
            method: "GET",
            target: "/v1/plugins",
            body: b"",
            key_id: "default",
        }
    }

    #[test]
    fn timestamp_accepts_digits_only() {
        assert_eq!(parse_timestamp("1764806400"), Ok(1764806400));
        for bad in [
            "",
            "+1764806400",
            "-1",
            " 1764806400",
            "1764806400.5",
            "1e9",
            "１２",
            "99999999999999999999",
        ] {
            assert_eq!(parse_timestamp(bad), Err(AuthError::InvalidTimestamp), "{bad:?}");
        }
    }

    #[test]
    fn window_is_tolerance_both_ways() {
        let verifier = Verifier::new(KEY.to_vec(), 0);
        let now = 1_800_000_000;

        let early = (now - TOLERANCE_SECONDS).to_string();
        let (sig, _) = signed(&early, "a");
        assert!(verifier.verify(&request(&early, &sig, "a"), now).is_ok());

        let late = (now + TOLERANCE_SECONDS).to_string();
        let (sig, _) = signed(&late, "b");
        assert!(verifier.verify(&request(&late, &sig, "b"), now).is_ok());

        let too_early = (now - TOLERANCE_SECONDS - 1).to_string();
        let (sig, _) = signed(&too_early, "c");
        assert!(matches!(
            verifier.verify(&request(&too_early, &sig, "c"), now),
            Err(AuthError::StaleTimestamp { .. })
        ));

        let too_late = (now + TOLERANCE_SECONDS + 1).to_string();
        let (sig, _) = signed(&too_late, "d");
        assert!(matches!(
            verifier.verify(&request(&too_late, &sig, "d"), now),
            Err(AuthError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn replay_rejected_until_timestamp_expires() {
        let verifier = Verifier::new(KEY.to_vec(), 0);
        let ts = 1_800_000_000u64;
        let ts_text = ts.to_string();
        let (sig, _) = signed(&ts_text, "n");

        assert_eq!(
            verifier
                .verify(&request(&ts_text, &sig, "n"), ts + 10)
                .map(|_| ()),
            Ok(())
        );
        assert_eq!(
            verifier.verify(&request(&ts_text, &sig, "n"), ts + 200),
            Err(AuthError::Replay)
        );
        assert_eq!(
            verifier.verify(&request(&ts_text, &sig, "n"), ts + TOLERANCE_SECONDS),
            Err(AuthError::Replay)
        );
        // One second later the timestamp itself is stale, so the replay cache may forget it.
        assert!(matches!(
            verifier.verify(&request(&ts_text, &sig, "n"), ts + TOLERANCE_SECONDS + 1),
            Err(AuthError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn full_replay_cache_never_accepts_replay() {
        let mut cache = ReplayCache::new(2);
        let now = 1_000;
        assert_eq!(cache.remember([1; 32], now + 100, now), Ok(()));
        assert_eq!(cache.remember([2; 32], now + 200, now), Ok(()));
        // Full: the entry expiring first is forgotten and becomes the floor.
        assert_eq!(cache.remember([3; 32], now + 300, now), Ok(()));
        assert_eq!(
            cache.remember([1; 32], now + 100, now),
            Err(AuthError::ReplayCacheFull),
            "a forgotten one is refused"
        );
        assert_eq!(
            cache.remember([4; 32], now + 50, now),
            Err(AuthError::ReplayCacheFull),
            "so is anything older"
        );
        assert_eq!(cache.remember([2; 32], now + 200, now), Err(AuthError::Replay));
        assert_eq!(cache.remember([3; 32], now + 300, now), Err(AuthError::Replay));
        assert_eq!(cache.expiry_of.len(), 2, "the size stays bounded");

        // Expired entries leave room without raising the floor.
        assert_eq!(cache.remember([5; 32], now + 400, now + 250), Ok(()));
        assert_eq!(cache.expiry_of.len(), 2);
    }

    #[test]
    fn signature_must_be_lowercase_hex() {
        let verifier = Verifier::new(KEY.to_vec(), 0);
        let ts = "1800000000";
        let (sig, _) = signed(ts, "");
        let upper = sig.to_ascii_uppercase();
        assert_eq!(
            verifier.verify(&request(ts, &upper, ""), 1_800_000_000),
            Err(AuthError::InvalidSignature)
        );
        assert_eq!(
            verifier.verify(&request(ts, &sig[..63], ""), 1_800_000_000),
            Err(AuthError::InvalidSignature)
        );
        assert_eq!(
            verifier.verify(&request(ts, &sig, ""), 1_800_000_000).map(|_| ()),
            Ok(())
        );
    }

    #[test]
    fn nonce_rejects_control_characters() {
        let verifier = Verifier::new(KEY.to_vec(), 0);
        let ts = "1800000000";
        let (sig, _) = signed(ts, "a b");
        assert_eq!(
            verifier.verify(&request(ts, &sig, "a b"), 1_800_000_000),
            Err(AuthError::InvalidNonce)
        );
        let long = "n".repeat(MAX_NONCE_BYTES + 1);
        assert_eq!(
            verifier.verify(&request(ts, &sig, &long), 1_800_000_000),
            Err(AuthError::InvalidNonce)
        );
    }
}
