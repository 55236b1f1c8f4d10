//! The audit log: one JSON object per line in `DATA/audit.log` (mode 0600).
//!
//! Every authentication failure, upload, deletion, run and server start or
//! stop is recorded with the time and the remote address or plugin involved.
//! Secrets are never written.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use serde_json::{Map, Value};

/// File name of the audit log inside the data directory.
pub const AUDIT_FILE: &str = "audit.log";

/// An append-only audit log.
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (or creates) the audit log in `data_dir`.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be opened for appending.
    pub fn open(data_dir: &Path) -> io::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;

        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(data_dir.join(AUDIT_FILE))?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    /// Appends one event of `kind` with `fields`. A failed write is logged,
    /// never returned, so auditing cannot take the API down.
    pub fn record(&self, kind: &str, fields: Value) {
        let mut event = Map::new();
        event.insert("time".into(), Value::from(crate::unix_now()));
        event.insert("kind".into(), Value::from(kind));
        if let Value::Object(fields) = fields {
            event.extend(fields);
        }

        let mut line = Value::Object(event).to_string();
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(error = %e, kind, "cannot write to the audit log");
        }
    }
}
