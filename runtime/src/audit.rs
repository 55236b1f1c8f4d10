//! The audit log: who did what, and what was denied, kept in the history
//! database (`GET /v1/audit`).
//!
//! Every authentication failure, policy denial, upload (accepted or
//! rejected), deletion, policy load and server start or stop is recorded with the time and the remote
//! address or plugin involved. Secrets are never written.

use std::sync::Arc;

use serde_json::Value;

use crate::history::History;

/// Every kind of audit event, for `GET /v1/audit?kind=` to check against.
pub const AUDIT_KINDS: [&str; 14] = [
    "auth_failure",
    "auth_throttled",
    "ip_denial",
    "scope_denial",
    "policy_denial",
    "policy_load",
    "keys_load",
    "keys_load_failed",
    "plugin_upload",
    "plugin_upload_rejected",
    "plugin_delete",
    "run_cancel",
    "server_start",
    "server_stop",
];

/// Records audit events.
#[derive(Clone)]
pub struct AuditLog {
    history: Arc<History>,
}

impl AuditLog {
    /// Creates an audit log that writes to `history`.
    pub fn new(history: Arc<History>) -> AuditLog {
        AuditLog { history }
    }

    /// Appends one event of `kind` with `fields`, a JSON object. A failed
    /// write is logged by the history writer, never returned, so auditing
    /// cannot take the API down.
    pub fn record(&self, kind: &'static str, fields: Value) {
        debug_assert!(
            AUDIT_KINDS.contains(&kind),
            "audit kind {kind} is not in AUDIT_KINDS"
        );
        self.history.audit(kind, fields);
    }
}
