//! Running an approved shell call: a child in its own process group, with
//! captured output, a deadline, and the whole group killed at the end.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::confine::{Prepared, ProxyReceiver};
use super::rules::Plan;
use crate::decision::Decisions;
use crate::net::egress::Egress;
use crate::net::proxy::{self, PROXY_PORT};

/// The proxy of a child with network access: the receiving end of its
/// listener, and the rules and decisions the proxy checks and records with.
pub struct ProxyContext {
    /// Receives the listener the child opens in its namespace.
    pub receiver: ProxyReceiver,
    /// The policy's outgoing-HTTP rules.
    pub egress: std::sync::Arc<Egress>,
    /// The run's decisions.
    pub decisions: Decisions,
    /// The plugin, for logs.
    pub plugin: String,
}

/// Time output is still read after the child exited and its group was killed.
/// A stream that another process keeps open must not block the call.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Result of a finished call.
#[derive(Debug)]
pub struct Finished {
    /// Exit code, or -1 when a signal ended the child.
    pub exit_code: i32,
    /// Standard output, at most the cap.
    pub stdout: Vec<u8>,
    /// Standard error, at most the cap.
    pub stderr: Vec<u8>,
    /// Whether either stream was cut.
    pub truncated: bool,
    /// Wall time.
    pub duration: Duration,
}

/// Reason a call did not finish.
#[derive(Debug)]
pub enum ExecError {
    /// The program could not be started.
    Spawn(std::io::Error),
    /// The deadline passed; the group was killed.
    TimedOut(Duration),
}

/// Kills a process group when dropped, so a call abandoned mid-way (the run
/// timed out or was cancelled) leaves no grandchildren behind. tokio's
/// `kill_on_drop` reaches only the direct child.
struct GroupGuard {
    #[cfg_attr(not(unix), allow(dead_code))]
    pgid: Option<i32>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pgid) = self.pgid {
            use nix::sys::signal::{Signal, killpg};
            use nix::unistd::Pid;
            // ESRCH means the group is already gone, which is the goal.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Runs `plan` with `stdin`, keeping at most `cap` bytes of each output
/// stream, and kills its process group after `timeout` or when it exits.
/// With `proxy`, serves the child's proxy while it runs.
pub async fn run(
    plan: &Plan,
    stdin: Option<Vec<u8>>,
    cap: usize,
    timeout: Duration,
    confinement: Prepared,
    proxy: Option<ProxyContext>,
    #[cfg(target_os = "linux")] cgroup: Option<super::cgroup::CallCgroup>,
) -> Result<Finished, ExecError> {
    // Declared first, so it is dropped last: after the process group is
    // killed, it kills whatever left the group, such as a `setsid` child.
    #[cfg(target_os = "linux")]
    let mut cgroup = CgroupGuard(cgroup);
    let started = Instant::now();
    let mut command = command_for(plan);
    command
        .current_dir(&plan.cwd)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if proxy.is_some() {
        let url = format!("http://127.0.0.1:{PROXY_PORT}");
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            command.env(name, &url);
        }
    }
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    command.process_group(0);
    #[cfg(unix)]
    {
        let mut confinement = Some(confinement);
        // SAFETY: the closure runs in the child between `fork` and `exec`,
        // where only async-signal-safe work is sound. It makes `setrlimit`,
        // `prctl` and `landlock_restrict_self` system calls on a ruleset and
        // limits prepared in the parent, and allocates only to report an error.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || confinement.as_mut().map_or(Ok(()), Prepared::apply));
        }
    }
    #[cfg(not(unix))]
    let _ = confinement;

    let mut child = command.spawn().map_err(ExecError::Spawn)?;
    // With process_group(0) the group id is the child's process id.
    let _guard = GroupGuard {
        pgid: child.id().and_then(|id| i32::try_from(id).ok()),
    };
    // Dropping the handle's guard ends the proxy and its connections.
    let _proxy = match proxy {
        Some(context) => Some(start_proxy(context).map_err(ExecError::Spawn)?),
        None => None,
    };

    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            // A child that exits without reading its input is not an error.
            let _ = pipe.write_all(&bytes).await;
        });
    }
    let stdout = tokio::spawn(read_capped(child.stdout.take(), cap));
    let stderr = tokio::spawn(read_capped(child.stderr.take(), cap));

    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.map_err(ExecError::Spawn)?,
        Err(_) => return Err(ExecError::TimedOut(timeout)),
    };

    // Background processes the command left behind go with its group, and
    // those that left the group with the cgroup.
    drop(_guard);
    #[cfg(target_os = "linux")]
    cgroup.kill_and_remove().await;
    let (stdout, stdout_cut) = drain(stdout).await;
    let (stderr, stderr_cut) = drain(stderr).await;

    Ok(Finished {
        exit_code: status.code().unwrap_or(-1),
        stdout,
        stderr,
        truncated: stdout_cut || stderr_cut,
        duration: started.elapsed(),
    })
}

/// Removes the call's cgroup, killing what is left in it, off the async
/// worker threads.
#[cfg(target_os = "linux")]
struct CgroupGuard(Option<super::cgroup::CallCgroup>);

#[cfg(target_os = "linux")]
impl CgroupGuard {
    async fn kill_and_remove(&mut self) {
        if let Some(cgroup) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || drop(cgroup)).await;
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // After an early return (deadline, cancelled run), the cleanup runs
        // in the background.
        if let Some(cgroup) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(cgroup))),
                Err(_) => drop(cgroup),
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start_proxy(context: ProxyContext) -> std::io::Result<AbortOnDrop> {
    let listener = context.receiver.receive()?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let serving = proxy::serve(listener, context.egress, context.decisions, context.plugin);
    Ok(AbortOnDrop(tokio::spawn(serving)))
}

async fn drain(task: tokio::task::JoinHandle<(Vec<u8>, bool)>) -> (Vec<u8>, bool) {
    match tokio::time::timeout(DRAIN_TIMEOUT, task).await {
        Ok(Ok(read)) => read,
        _ => (Vec::new(), true),
    }
}

/// Reads a stream to its end, keeping the first `cap` bytes.
async fn read_capped(stream: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut stream) = stream else {
        return (Vec::new(), false);
    };
    let mut captured = Vec::new();
    let mut truncated = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return (captured, truncated),
            Ok(n) => {
                let room = cap.saturating_sub(captured.len());
                captured.extend_from_slice(&chunk[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}

#[cfg(not(windows))]
fn command_for(plan: &Plan) -> Command {
    let mut command = Command::new(&plan.program);
    command.args(&plan.argv[1..]);
    command
}

/// Windows built-ins from the operators' original list; they exist only
/// inside `cmd.exe`.
#[cfg(windows)]
pub(super) const CMD_BUILTINS: &[&str] = &["dir", "type", "copy", "move", "mkdir", "rmdir"];

#[cfg(windows)]
fn command_for(plan: &Plan) -> Command {
    let name = plan.argv[0].to_ascii_lowercase();
    if CMD_BUILTINS.contains(&name.as_str()) {
        // cmd /C takes one command line; quote each argument so none of
        // them is read as cmd syntax.
        let mut command = Command::new("cmd");
        command.arg("/C").arg(&name);
        for argument in &plan.argv[1..] {
            let quoted = format!("\"{}\"", argument.replace('"', "\"\""));
            command.raw_arg(quoted);
        }
        return command;
    }
    let mut command = Command::new(&plan.program);
    command.args(&plan.argv[1..]);
    command
}
