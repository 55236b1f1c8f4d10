//! Plugins on disk, under the data directory.
//!
//! Layout:
//!
//! ```text
//! DATA/plugins/blobs/SHA256.wasm            the uploaded bytes, named by digest
//! DATA/plugins/blobs/SHA256.ENGINE.cwasm    compiled native code for one engine
//! DATA/plugins/NAME.json                    the record: digests, size, kind, upload time
//! ```
//!
//! Every file is written to a temporary name and renamed into place, and the
//! record is renamed last, so a crash leaves either the old plugin or the new
//! one, never a mix. Blobs no record points to are removed when the store
//! opens. All access goes through a `cap_std` directory handle, so a name can
//! never reach outside the data directory.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Mutex;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::{Deserialize, Serialize};

use crate::engine::{PluginKind, SourceFormat};

const PLUGINS_DIR: &str = "plugins";
const BLOBS_DIR: &str = "blobs";

/// The stored record of one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// Plugin name.
    pub name: String,
    /// SHA-256 of the uploaded bytes, lowercase hex.
    pub sha256: String,
    /// Size of the uploaded bytes.
    pub size: u64,
    /// The component's entry point.
    pub kind: PluginKind,
    /// Format of the uploaded bytes: a component, or a preview-1 module that
    /// the runtime wrapped. Records written before the field existed are
    /// components.
    #[serde(default)]
    pub format: SourceFormat,
    /// Upload time, Unix seconds.
    pub uploaded_at: u64,
    /// The compiled native code stored beside the component, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRecord>,
}

/// Compiled native code of a component, as stored.
///
/// Loading native code runs it, so its digest is kept here, in the data
/// directory that tasks cannot reach, and checked before every load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The engine's compatibility key the code was compiled for.
    pub engine: String,
    /// SHA-256 of the artifact file, lowercase hex.
    pub sha256: String,
}

/// Returns whether `name` is a valid plugin name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && matches!(bytes[0], b'a'..=b'z' | b'0'..=b'9')
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// The plugin directory of a data directory.
pub struct PluginStore {
    plugins: Dir,
    blobs: Dir,
    /// Serialises changes, so a cleanup never removes a blob whose record
    /// another upload is about to write.
    changes: Mutex<()>,
}

impl PluginStore {
    /// Opens the store under `data_dir`, creating the directories (mode 0700)
    /// if needed, and removes blobs no record points to.
    ///
    /// # Errors
    ///
    /// Fails when the directories cannot be created or opened.
    pub fn open(data_dir: &Path) -> io::Result<PluginStore> {
        create_private_dir(data_dir)?;
        create_private_dir(&data_dir.join(PLUGINS_DIR))?;
        create_private_dir(&data_dir.join(PLUGINS_DIR).join(BLOBS_DIR))?;

        let plugins = Dir::open_ambient_dir(data_dir.join(PLUGINS_DIR), ambient_authority())?;
        let blobs = plugins.open_dir(BLOBS_DIR)?;
        let store = PluginStore {
            plugins,
            blobs,
            changes: Mutex::new(()),
        };
        store.remove_unreferenced_blobs()?;
        Ok(store)
    }

    /// Lists the stored records, sorted by name. Unreadable records are
    /// skipped with a warning, so one damaged file cannot stop the server.
    ///
    /// # Errors
    ///
    /// Fails when the directory cannot be listed.
    pub fn list(&self) -> io::Result<Vec<PluginRecord>> {
        Ok(self.scan()?.0)
    }

    /// Reads every record; returns the readable ones, sorted by name, and
    /// whether any record could not be read.
    fn scan(&self) -> io::Result<(Vec<PluginRecord>, bool)> {
        let mut records = Vec::new();
        let mut damaged = false;
        for entry in self.plugins.entries()? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !is_valid_name(name) {
                continue;
            }
            match self.read_record(name) {
                Ok(record) => records.push(record),
                Err(e) => {
                    damaged = true;
                    tracing::warn!(plugin = name, error = %e, "skipping unreadable plugin record");
                }
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((records, damaged))
    }

    fn read_record(&self, name: &str) -> io::Result<PluginRecord> {
        let text = self.plugins.read(format!("{name}.json"))?;
        let record: PluginRecord = serde_json::from_slice(&text).map_err(io::Error::other)?;
        if record.name != name {
            return Err(io::Error::other(format!("record names plugin {:?}", record.name)));
        }
        Ok(record)
    }

    /// Reads the component of `record` and checks its digest.
    ///
    /// # Errors
    ///
    /// Fails when the blob is missing or its digest does not match the record.
    pub fn read_wasm(&self, record: &PluginRecord) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.blobs
            .open(blob_name(&record.sha256))?
            .read_to_end(&mut bytes)?;
        let digest = crate::auth::sha256_hex(&bytes);
        if digest != record.sha256 {
            return Err(io::Error::other(format!(
                "component digest is {digest}, but the record has {}; the file was altered",
                record.sha256
            )));
        }
        Ok(bytes)
    }

    /// Reads the compiled artifact of `record` for the engine `engine`, if
    /// one is stored and its digest matches the record.
    ///
    /// Returns `None`, with the reason logged, for a missing, stale or altered
    /// artifact; the caller then compiles again.
    pub fn read_artifact(&self, record: &PluginRecord, engine: &str) -> Option<Vec<u8>> {
        let artifact = record.artifact.as_ref()?;
        if artifact.engine != engine {
            tracing::info!(plugin = %record.name, "stored compiled code is for another engine version; compiling again");
            return None;
        }
        let mut bytes = Vec::new();
        let read = self
            .blobs
            .open(artifact_name(&record.sha256, engine))
            .and_then(|mut file| file.read_to_end(&mut bytes));
        if let Err(e) = read {
            tracing::warn!(plugin = %record.name, error = %e, "cannot read stored compiled code; compiling again");
            return None;
        }
        let digest = crate::auth::sha256_hex(&bytes);
        if digest != artifact.sha256 {
            tracing::warn!(
                plugin = %record.name,
                expected = %artifact.sha256,
                found = %digest,
                "stored compiled code was altered; compiling again"
            );
            return None;
        }
        Some(bytes)
    }

    /// Stores a component, its compiled artifact and its record, replacing
    /// any plugin of the same name. The record is written last.
    ///
    /// # Errors
    ///
    /// Fails when a file cannot be written; the previous plugin then stays.
    pub fn save(&self, record: &PluginRecord, wasm: &[u8], artifact: Option<&[u8]>) -> io::Result<()> {
        let _guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        write_atomic(&self.blobs, &blob_name(&record.sha256), wasm)?;
        self.write_artifact_and_record(record, artifact)?;
        self.remove_unreferenced_blobs()
    }

    /// Stores a freshly compiled artifact for an existing plugin.
    ///
    /// # Errors
    ///
    /// Fails when a file cannot be written.
    pub fn save_artifact(&self, record: &PluginRecord, artifact: &[u8]) -> io::Result<()> {
        let _guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        self.write_artifact_and_record(record, Some(artifact))?;
        self.remove_unreferenced_blobs()
    }

    fn write_artifact_and_record(&self, record: &PluginRecord, artifact: Option<&[u8]>) -> io::Result<()> {
        if let (Some(bytes), Some(meta)) = (artifact, &record.artifact) {
            write_atomic(&self.blobs, &artifact_name(&record.sha256, &meta.engine), bytes)?;
        }
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.plugins, &format!("{}.json", record.name), &json)
    }

    /// Removes a plugin. Returns whether it existed.
    ///
    /// # Errors
    ///
    /// Fails when the record cannot be removed.
    pub fn delete(&self, name: &str) -> io::Result<bool> {
        let _guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        match self.plugins.remove_file(format!("{name}.json")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        self.remove_unreferenced_blobs()?;
        Ok(true)
    }

    fn remove_unreferenced_blobs(&self) -> io::Result<()> {
        let (records, damaged) = self.scan()?;
        if damaged {
            // The damaged record may point at a blob; keep every blob until
            // an operator has repaired or removed it.
            tracing::warn!("not removing unreferenced plugin blobs while a plugin record is unreadable");
            return Ok(());
        }
        let mut referenced: Vec<String> = Vec::new();
        for record in records {
            if let Some(artifact) = &record.artifact {
                referenced.push(artifact_name(&record.sha256, &artifact.engine));
            }
            referenced.push(blob_name(&record.sha256));
        }
        for entry in self.blobs.entries()? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !referenced.iter().any(|r| r == name)
                && let Err(e) = self.blobs.remove_file(name)
            {
                tracing::warn!(file = name, error = %e, "cannot remove unreferenced plugin blob");
            }
        }
        Ok(())
    }
}

fn blob_name(sha256: &str) -> String {
    format!("{sha256}.wasm")
}

fn artifact_name(sha256: &str, engine: &str) -> String {
    format!("{sha256}.{engine}.cwasm")
}

/// Writes `data` to `name` in `dir` through a temporary file and a rename,
/// syncing the file first so the rename never exposes a partial write.
fn write_atomic(dir: &Dir, name: &str, data: &[u8]) -> io::Result<()> {
    let temp = format!(".{name}.{}.tmp", crate::auth::generate_nonce());
    let result = (|| {
        let mut file = dir.create(&temp)?;
        file.write_all(data)?;
        file.sync_all()?;
        dir.rename(&temp, dir, name)
    })();
    if result.is_err() {
        let _ = dir.remove_file(&temp);
    }
    result
}

/// Creates a directory readable only by its owner, or tightens an existing one.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);

    match builder.create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
                if mode != 0o700 {
                    tracing::info!(path = %path.display(), mode = format!("{mode:o}"), "restricting directory to its owner (mode 700)");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(io::Error::new(
            e.kind(),
            format!("{} exists and is not a directory", path.display()),
        )),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot create {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, wasm: &[u8]) -> PluginRecord {
        PluginRecord {
            name: name.to_string(),
            sha256: crate::auth::sha256_hex(wasm),
            size: wasm.len() as u64,
            kind: PluginKind::Task,
            format: SourceFormat::Component,
            uploaded_at: 1,
            artifact: None,
        }
    }

    #[test]
    fn names_follow_the_pattern() {
        for good in ["a", "0", "hello", "git-sync", "a_b", &"a".repeat(63)] {
            assert!(is_valid_name(good), "{good:?}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "A",
            "a/b",
            "a.b",
            "..",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn save_replace_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::open(dir.path()).unwrap();

        store.save(&record("p", b"one"), b"one", None).unwrap();
        store.save(&record("p", b"two"), b"two", None).unwrap();
        let records = store.list().unwrap();
        assert_eq!(records, vec![record("p", b"two")]);
        assert_eq!(store.read_wasm(&records[0]).unwrap(), b"two");

        let blobs = std::fs::read_dir(dir.path().join("plugins/blobs"))
            .unwrap()
            .count();
        assert_eq!(blobs, 1, "the replaced blob is removed");

        assert!(store.delete("p").unwrap());
        assert!(!store.delete("p").unwrap());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn damaged_record_keeps_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::open(dir.path()).unwrap();
        store.save(&record("p", b"one"), b"one", None).unwrap();
        std::fs::write(dir.path().join("plugins/p.json"), b"{ not json").unwrap();

        drop(store);
        let store = PluginStore::open(dir.path()).unwrap();
        assert!(store.list().unwrap().is_empty());
        let blobs = std::fs::read_dir(dir.path().join("plugins/blobs"))
            .unwrap()
            .count();
        assert_eq!(blobs, 1, "the blob of the damaged record stays");
    }

    #[test]
    fn artifact_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::open(dir.path()).unwrap();
        let mut rec = record("p", b"one");
        rec.artifact = Some(ArtifactRecord {
            engine: "e1".into(),
            sha256: crate::auth::sha256_hex(b"code"),
        });
        store.save(&rec, b"one", Some(b"code")).unwrap();

        assert_eq!(store.read_artifact(&rec, "e1").as_deref(), Some(&b"code"[..]));
        assert_eq!(
            store.read_artifact(&rec, "e2"),
            None,
            "another engine's code is not used"
        );

        let path = dir
            .path()
            .join("plugins/blobs")
            .join(artifact_name(&rec.sha256, "e1"));
        std::fs::write(&path, b"evil").unwrap();
        assert_eq!(store.read_artifact(&rec, "e1"), None, "altered code is not used");

        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            store.read_artifact(&rec, "e1"),
            None,
            "missing code is compiled again"
        );
    }

    #[test]
    fn altered_blob_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::open(dir.path()).unwrap();
        let rec = record("p", b"one");
        store.save(&rec, b"one", None).unwrap();

        std::fs::write(
            dir.path().join("plugins/blobs").join(blob_name(&rec.sha256)),
            b"evil",
        )
        .unwrap();
        let error = store.read_wasm(&rec).unwrap_err();
        assert!(error.to_string().contains("altered"), "{error}");
    }
}
