//! The host shell call of the `apex:task/shell` interface, governed by
//! `shell_allow`.
//!
//! [`rules`] decides whether a call may run and how; [`exec`] runs it. Every
//! call, allowed or denied, is logged and recorded as a decision of the run.

#[cfg(target_os = "linux")]
pub mod cgroup;
pub mod confine;
pub mod exec;
pub mod rules;
pub mod seccomp;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use wasmtime::component::HasData;

use self::bindings::apex::task::shell::{self as wit, Host};
use self::confine::Confinement;
use self::rules::ShellRules;
use crate::decision::{Decision, Decisions};
use crate::net::egress::Egress;
use crate::policy::PathMode;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "apex:task/shell-host",
        imports: { default: async },
    });
}

/// The shell half of a policy, built once at startup and shared by all runs.
pub struct Shell {
    rules: ShellRules,
    confinement: Confinement,
    timeout: Duration,
    output_cap: usize,
    processes: Semaphore,
}

impl Shell {
    /// Creates the shell host from the policy's rules and limits.
    pub fn new(
        rules: ShellRules,
        confinement: Confinement,
        timeout: Duration,
        output_cap: usize,
        max_processes: usize,
    ) -> Shell {
        Shell {
            rules,
            confinement,
            timeout,
            output_cap,
            processes: Semaphore::new(max_processes),
        }
    }

    /// Creates the shell state of one run. `egress` checks the requests of
    /// children whose entry grants network access.
    pub fn for_run(self: &Arc<Self>, plugin: &str, decisions: Decisions, egress: Arc<Egress>) -> ShellCalls {
        ShellCalls {
            shell: self.clone(),
            plugin: plugin.to_owned(),
            decisions,
            egress,
        }
    }
}

/// Adds the `apex:task/shell` interface to a linker whose store data
/// gives access to [`ShellCalls`].
///
/// # Errors
///
/// Fails when the interface is already defined in the linker.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    get: fn(&mut T) -> &mut ShellCalls,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, ShellData>(linker, get)
}

struct ShellData;

impl HasData for ShellData {
    type Data<'a> = &'a mut ShellCalls;
}

/// The shell calls of one run.
pub struct ShellCalls {
    shell: Arc<Shell>,
    plugin: String,
    decisions: Decisions,
    egress: Arc<Egress>,
}

impl ShellCalls {
    fn record(
        &self,
        argv: String,
        allowed: bool,
        reason: String,
        exit_code: Option<i32>,
        duration: Option<Duration>,
    ) {
        self.decisions.push(Decision {
            capability: "shell",
            target: argv,
            allowed,
            reason,
            exit_code,
            duration_ms: duration.map(|d| d.as_millis() as u64),
        });
    }
}

impl Host for ShellCalls {
    async fn run(&mut self, command: String, options: wit::Options) -> Result<wit::Output, wit::Error> {
        let shown = crate::truncate_text(&command, 300);

        // The slot is taken before the check, so a call cannot wait for one
        // between its check and its start while the task changes the files.
        let Ok(_slot) = self.shell.processes.acquire().await else {
            return Err(wit::Error::Failed("the server is shutting down".into()));
        };
        let plan = match self.shell.rules.plan(&command, options.cwd.as_deref()) {
            Ok(plan) => plan,
            Err(reason) => {
                tracing::warn!(plugin = %self.plugin, command = %shown, %reason, "shell call denied");
                self.record(shown, false, reason.clone(), None, None);
                return Err(wit::Error::Denied(reason));
            }
        };
        let argv = shell_words::join(&plan.argv);
        let read_write: Vec<_> = self
            .shell
            .rules
            .paths_allow
            .iter()
            .filter(|p| p.mode == PathMode::Rw)
            .map(|p| p.path.clone())
            .collect();
        let mut read_only: Vec<_> = self
            .shell
            .rules
            .paths_allow
            .iter()
            .filter(|p| p.mode == PathMode::Ro)
            .map(|p| p.path.clone())
            .collect();
        read_only.push(self.shell.rules.home.clone());
        let (confinement, attachments) =
            match self
                .shell
                .confinement
                .prepare(&read_write, &read_only, plan.network)
            {
                Ok(prepared) => prepared,
                Err(reason) => {
                    tracing::error!(plugin = %self.plugin, %argv, %reason, "cannot confine a shell call");
                    self.record(argv, true, reason.clone(), None, None);
                    return Err(wit::Error::Failed(reason));
                }
            };
        let proxy = attachments.proxy.map(|receiver| exec::ProxyContext {
            receiver,
            egress: self.egress.clone(),
            decisions: self.decisions.clone(),
            plugin: self.plugin.clone(),
        });
        let result = exec::run(
            &plan,
            options.stdin,
            self.shell.output_cap,
            self.shell.timeout,
            confinement,
            proxy,
            #[cfg(target_os = "linux")]
            attachments.cgroup,
        )
        .await;

        match result {
            Ok(finished) => {
                tracing::info!(
                    plugin = %self.plugin,
                    %argv,
                    exit_code = finished.exit_code,
                    duration_ms = finished.duration.as_millis() as u64,
                    "shell call finished"
                );
                let reason = format!("ran {} in {}", plan.program.display(), plan.cwd.display());
                self.record(
                    argv,
                    true,
                    reason,
                    Some(finished.exit_code),
                    Some(finished.duration),
                );
                Ok(wit::Output {
                    exit_code: finished.exit_code,
                    stdout: finished.stdout,
                    stderr: finished.stderr,
                    truncated: finished.truncated,
                })
            }
            Err(exec::ExecError::TimedOut(after)) => {
                let message = format!(
                    "killed with its process group after {} s (timeouts.shell_seconds)",
                    after.as_secs()
                );
                tracing::warn!(plugin = %self.plugin, %argv, "shell call timed out");
                self.record(argv, true, message.clone(), None, Some(after));
                Err(wit::Error::TimedOut(message))
            }
            Err(exec::ExecError::Spawn(e)) => {
                let message = format!("cannot start {}: {e}", plan.program.display());
                tracing::warn!(plugin = %self.plugin, %argv, error = %e, "shell call failed to start");
                self.record(argv, true, message.clone(), None, None);
                Err(wit::Error::Failed(message))
            }
        }
    }
}
