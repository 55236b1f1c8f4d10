//! Outgoing network access for tasks: which hosts they may reach
//! ([`rules`]) and the sender that enforces it ([`egress`]).

pub mod egress;
pub mod proxy;
pub mod rules;

pub use egress::{Egress, EgressConfig, EgressError, HttpHooks};

use crate::policy::Policy;

/// Builds the outgoing-HTTP sender for `policy`.
///
/// # Errors
///
/// Fails when `network.ca_file` is unusable.
pub fn egress_for(policy: &Policy) -> Result<Egress, EgressError> {
    Egress::new(EgressConfig {
        rules: policy.network.http_allow.clone(),
        injections: policy.network.inject.clone(),
        allow_private_addresses: policy.network.allow_private_addresses,
        resolve: policy.network.resolve.clone(),
        ca_file: policy.network.ca_file.as_deref(),
        timeout: policy.timeouts.http,
        max_response_bytes: policy.limits.response_bytes as u64,
    })
}
