//! Capability decisions the host makes during a run: outgoing requests and
//! shell calls, allowed or denied, with the reason. They are returned in the
//! run result, and denials are audited.

use std::sync::{Arc, Mutex};

/// One capability decision the host made during a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    /// The capability: `http` or `shell`.
    pub capability: &'static str,
    /// Target the task requested: `https://api.github.com:443`, or a command line.
    pub target: String,
    /// Whether it was allowed.
    pub allowed: bool,
    /// Why; for an allowed request, the address connected to.
    pub reason: String,
    /// Exit code of a shell call that ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Duration of a shell call, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The decisions of one run, shared with the hooks that make them.
#[derive(Debug, Clone, Default)]
pub struct Decisions(Arc<Mutex<Vec<Decision>>>);

impl Decisions {
    /// Records one decision.
    pub fn push(&self, decision: Decision) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(decision);
    }

    /// Returns the decisions made so far.
    pub fn snapshot(&self) -> Vec<Decision> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
