//! Capabilities of runs, built once from the policy at startup: the policy
//! itself, the outgoing-HTTP sender and the shell host.

use std::sync::Arc;

use crate::net::{Egress, EgressError};
use crate::policy::Policy;
use crate::shell::Shell;
use crate::shell::rules::ShellRules;

/// The capabilities the policy grants, ready for runs to use.
pub struct Grants {
    /// The validated policy.
    pub policy: Policy,
    /// Sends outgoing HTTP requests under `network`.
    pub egress: Arc<Egress>,
    /// Runs shell calls under `shell_allow`.
    pub shell: Arc<Shell>,
    /// Values for `wasi:config/store`.
    pub config: Vec<(String, String)>,
}

impl Grants {
    /// Builds the grants `plugin` runs under: the global policy narrowed by
    /// the plugin's section, with its configuration values and injections.
    ///
    /// # Errors
    ///
    /// As [`Grants::new`].
    pub fn for_plugin(
        global: &Policy,
        plugin: &str,
        shell_home: std::path::PathBuf,
    ) -> Result<Grants, EgressError> {
        let mut grants = Grants::new(global.for_plugin(plugin), shell_home)?;
        if let Some(section) = global.plugins.get(plugin) {
            grants.config = section
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        Ok(grants)
    }

    /// Builds the grants of `policy`; shell children get `shell_home`, an
    /// empty directory tasks cannot write, as their home.
    ///
    /// # Errors
    ///
    /// Fails when the `network` section cannot be turned into a sender, for
    /// example an unreadable `network.ca_file`.
    pub fn new(policy: Policy, shell_home: std::path::PathBuf) -> Result<Grants, EgressError> {
        let egress = Arc::new(crate::net::egress_for(&policy)?);
        let rules = ShellRules {
            entries: policy.shell.entries.clone(),
            search_path: policy.shell.search_path.clone(),
            env: policy.shell.env.clone(),
            paths_allow: policy.paths_allow.clone(),
            home: shell_home,
        };
        let shell = Arc::new(Shell::new(
            rules,
            policy.shell.confinement.clone(),
            policy.timeouts.shell,
            policy.limits.shell_output_bytes,
            policy.limits.max_shell_processes,
        ));
        Ok(Grants {
            policy,
            egress,
            shell,
            config: Vec::new(),
        })
    }
}
