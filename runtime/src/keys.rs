//! The key ring: which keys may sign requests, and what each may do.
//!
//! `APEX_SHARED_KEY` is the key `default` with every scope. A keys file
//! (`apex serve --keys PATH`) adds keys by id, each with its scopes, an
//! optional list of plugins its `run` scope is limited to, an expiry and a
//! `disabled` switch. The file is reloaded on SIGHUP and through
//! `POST /v1/keys/reload`; a file that fails to load leaves the old ring.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::MIN_KEY_BYTES;

/// Id of the key given in `APEX_SHARED_KEY`.
pub const DEFAULT_KEY_ID: &str = "default";

/// Permission a key may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Upload and delete plugins, reload keys.
    Admin,
    /// Run plugins and cancel runs.
    Run,
    /// List and inspect plugins, runs and the audit log.
    Read,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Admin => "admin",
            Scope::Run => "run",
            Scope::Read => "read",
        })
    }
}

/// One key of the ring. Its `Debug` form leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// Key id, sent as `X-Key-Id`.
    pub id: String,
    /// The secret: the UTF-8 bytes of the key text.
    pub secret: Vec<u8>,
    /// Permissions of the key.
    pub scopes: Vec<Scope>,
    /// Plugins the `run` scope is limited to; `None` means all.
    pub plugins: Option<Vec<String>>,
    /// Unix time after which the key is rejected.
    pub not_after: Option<u64>,
    /// Whether the key is switched off.
    pub disabled: bool,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("scopes", &self.scopes)
            .field("plugins", &self.plugins)
            .field("not_after", &self.not_after)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Returns whether the key has `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Returns whether the key may run `plugin`.
    pub fn may_run(&self, plugin: &str) -> bool {
        self.allows(Scope::Run)
            && self
                .plugins
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == plugin))
    }
}

/// The keys requests may be signed with.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: HashMap<String, Arc<Key>>,
    /// SHA-256 of the keys file as loaded, for the audit log.
    pub file_sha256: Option<String>,
}

/// Failure to load the keys; each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key at all.
    #[error(
        "no key: set APEX_SHARED_KEY (generate one with `apex keygen` and export it) or give a keys file with --keys"
    )]
    NoKey,
    /// A key is too short.
    #[error(
        "{0} is {1} bytes long, and at least {MIN_KEY_BYTES} are required; generate a key with `apex keygen`"
    )]
    TooShort(String, usize),
    /// A secret file is readable by others.
    #[error("{0}")]
    Permissions(String),
    /// The keys file is unusable.
    #[error("invalid keys file {path}: {message}")]
    File {
        /// The keys file.
        path: PathBuf,
        /// The problem and the fix.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeysFile {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    secret_env: Option<String>,
    secret_file: Option<String>,
    scopes: Vec<Scope>,
    plugins: Option<Vec<String>>,
    not_after: Option<String>,
    #[serde(default)]
    disabled: bool,
}

/// Sources of keys: the shared key and the keys file, with the variables of
/// `.env` as a fallback for the process environment.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    /// Value of `APEX_SHARED_KEY`, if set.
    pub shared: Option<String>,
    /// The keys file, if any.
    pub file: Option<PathBuf>,
    /// Variables from `.env`; the process environment wins over them.
    pub dotenv: BTreeMap<String, String>,
}

impl KeySource {
    fn variable(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .or_else(|| self.dotenv.get(name).cloned())
    }

    /// Loads the ring.
    ///
    /// # Errors
    ///
    /// Fails when there is no key, a key is too short, a secret file is
    /// readable by group or others, or the keys file is invalid.
    pub fn load(&self) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::default();
        if let Some(shared) = self.shared.as_deref().filter(|s| !s.is_empty()) {
            check_length("APEX_SHARED_KEY", shared)?;
            ring.insert(Key {
                id: DEFAULT_KEY_ID.into(),
                secret: shared.as_bytes().to_vec(),
                scopes: vec![Scope::Admin, Scope::Run, Scope::Read],
                plugins: None,
                not_after: None,
                disabled: false,
            });
        }
        if let Some(path) = &self.file {
            self.load_file(path, &mut ring)?;
        }
        if ring.keys.is_empty() {
            return Err(KeyError::NoKey);
        }
        Ok(ring)
    }

    fn load_file(&self, path: &Path, ring: &mut KeyRing) -> Result<(), KeyError> {
        let file_error = |message: String| KeyError::File {
            path: path.to_path_buf(),
            message,
        };
        check_private(path, "the keys file")?;
        let text = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
        ring.file_sha256 = Some(crate::auth::sha256_hex(&text));
        let raw: RawKeysFile = serde_yaml_ng::from_slice(&text).map_err(|e| file_error(e.to_string()))?;

        for (index, key) in raw.keys.into_iter().enumerate() {
            let at = |message: String| file_error(format!("keys[{index}] ({:?}): {message}", key.id));
            if !is_valid_key_id(&key.id) {
                return Err(at(
                    "an id is 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`".into()
                ));
            }
            if ring.keys.contains_key(&key.id) {
                return Err(at("the id is used twice (`default` is APEX_SHARED_KEY's)".into()));
            }
            if key.scopes.is_empty() {
                return Err(at("scopes is empty; list admin, run or read".into()));
            }

            let secret = match (&key.secret_env, &key.secret_file) {
                (Some(name), None) => self
                    .variable(name)
                    .ok_or_else(|| at(format!("the environment variable {name} is not set")))?,
                (None, Some(file)) => {
                    let file = resolve(path, file);
                    check_private(&file, "a key file")?;
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| at(format!("cannot read {}: {e}", file.display())))?;
                    text.trim_end_matches(['\n', '\r']).to_string()
                }
                _ => return Err(at("give exactly one of secret_env and secret_file".into())),
            };
            check_length(&format!("key {:?}", key.id), &secret)?;

            let not_after = match &key.not_after {
                None => None,
                Some(text) => Some(parse_time(text).ok_or_else(|| {
                    at(format!(
                        "not_after {text:?} is not an RFC 3339 time such as 2027-06-30T00:00:00Z"
                    ))
                })?),
            };
            ring.insert(Key {
                id: key.id.clone(),
                secret: secret.into_bytes(),
                scopes: key.scopes,
                plugins: key.plugins,
                not_after,
                disabled: key.disabled,
            });
        }
        Ok(())
    }
}

impl KeyRing {
    fn insert(&mut self, key: Key) {
        self.keys.insert(key.id.clone(), Arc::new(key));
    }

    /// Returns a ring with one key `default` that has every scope.
    pub fn single(secret: Vec<u8>) -> KeyRing {
        let mut ring = KeyRing::default();
        ring.insert(Key {
            id: DEFAULT_KEY_ID.into(),
            secret,
            scopes: vec![Scope::Admin, Scope::Run, Scope::Read],
            plugins: None,
            not_after: None,
            disabled: false,
        });
        ring
    }

    /// Returns the key with `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Key>> {
        self.keys.get(id)
    }

    /// Returns the key ids, sorted.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort();
        ids
    }
}

/// Returns whether `id` is a valid key id.
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_length(what: &str, key: &str) -> Result<(), KeyError> {
    if key.len() < MIN_KEY_BYTES {
        return Err(KeyError::TooShort(what.to_owned(), key.len()));
    }
    Ok(())
}

fn resolve(keys_file: &Path, written: &str) -> PathBuf {
    let written = Path::new(written);
    if written.is_absolute() {
        return written.to_path_buf();
    }
    keys_file.parent().unwrap_or(Path::new(".")).join(written)
}

/// Rejects a file that group or others may read: keys must stay private.
///
/// # Errors
///
/// Returns the message with the `chmod 600` fix.
pub fn check_private(path: &Path, what: &str) -> Result<(), KeyError> {
    let metadata = std::fs::metadata(path)
        .map_err(|e| KeyError::Permissions(format!("cannot read {what} {}: {e}", path.display())))?;
    // NOTE: only Unix permission bits are checked; Windows ACLs are not.
    #[cfg(not(unix))]
    let mode = {
        let _ = metadata;
        0o600
    };
    #[cfg(unix)]
    let mode = std::os::unix::fs::PermissionsExt::mode(&metadata.permissions());
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions(format!(
            "{what} {} is readable by group or others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

/// Parses an RFC 3339 time into Unix seconds.
fn parse_time(text: &str) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_scope_limited_to_plugins() {
        let key = Key {
            id: "ci".into(),
            secret: Vec::new(),
            scopes: vec![Scope::Run],
            plugins: Some(vec!["hello".into()]),
            not_after: None,
            disabled: false,
        };
        assert!(key.may_run("hello"));
        assert!(!key.may_run("probe"));
        assert!(!key.allows(Scope::Admin));
    }

    #[test]
    fn times_parse_as_rfc3339() {
        assert_eq!(parse_time("1970-01-01T00:01:00Z"), Some(60));
        assert_eq!(parse_time("2027-06-30T00:00:00Z"), Some(1_814_313_600));
        assert_eq!(parse_time("next tuesday"), None);
    }

    #[test]
    fn key_ids_are_plain() {
        assert!(is_valid_key_id("ci-runner_2"));
        for bad in ["", "a b", "a/b", "é", &"k".repeat(65)] {
            assert!(!is_valid_key_id(bad), "{bad:?}");
        }
    }
}
