//! Capability decisions the host makes during a run: outgoing requests and
//! shell calls, allowed or denied, with the reason. They are returned in the
//! run result, and denials are audited.

use std::sync::{Arc, Mutex};

/// One capability decision the host made during a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    /// The capability: `http`, `shell`, `file`, or `inject` for a secret
    /// header held back from a request.
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

/// Most decisions recorded per run. A task, or a shell child through its
/// proxy, can make requests in a loop. Past this many, decisions are only
/// counted, so the run result, the audit log and the server log stay bounded.
pub const MAX_DECISIONS: usize = 1000;

/// The decisions of one run, shared with the hooks that make them.
#[derive(Debug, Clone, Default)]
pub struct Decisions(Arc<Mutex<Recorded>>);

#[derive(Debug, Default)]
struct Recorded {
    recorded: Vec<Decision>,
    dropped: u64,
}

impl Decisions {
    /// Records one decision. Returns false when the run already has
    /// [`MAX_DECISIONS`] and the decision was only counted; callers then
    /// skip their log line too.
    pub fn push(&self, decision: Decision) -> bool {
        let mut recorded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if recorded.recorded.len() < MAX_DECISIONS {
            recorded.recorded.push(decision);
            true
        } else {
            recorded.dropped += 1;
            false
        }
    }

    /// Returns the decisions made so far, ending with a note of how many
    /// were not kept, if any.
    pub fn snapshot(&self) -> Vec<Decision> {
        let recorded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut decisions = recorded.recorded.clone();
        if recorded.dropped > 0 {
            decisions.push(Decision {
                capability: "decisions",
                target: String::new(),
                allowed: false,
                reason: format!(
                    "{} more decisions were made but not recorded: a run keeps at most {MAX_DECISIONS}",
                    recorded.dropped
                ),
                exit_code: None,
                duration_ms: None,
            });
        }
        decisions
    }
}
