//! Apex: a task runtime where every task is a WebAssembly component.
//!
//! - [`policy`] loads the YAML policy that decides what tasks may touch.
//! - [`auth`] signs and verifies API requests (HMAC-SHA256).
//! - [`keys`] contains the keys that may sign and their scopes.
//! - [`engine`] compiles components and runs them under the policy.
//! - [`net`] decides and sends the outgoing HTTP requests of tasks.
//! - [`shell`] runs the commands `shell_allow` permits; [`decision`] records
//!   what the host allowed and denied.
//! - [`store`] and [`registry`] keep uploaded plugins on disk and in memory.
//! - [`history`] keeps runs and the audit log in SQLite.
//! - [`api`] serves the HTTP API; [`server`] starts it.
//! - [`client`] is the signing HTTP client behind the `apex` subcommands.

pub mod api;
pub mod audit;
pub mod auth;
pub mod client;
pub mod decision;
pub mod engine;
pub mod grants;
pub mod history;
pub mod keys;
pub mod net;
pub mod policy;
pub mod registry;
pub mod server;
pub mod shell;
pub mod store;

/// Returns the current Unix time in whole seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}
