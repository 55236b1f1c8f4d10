//! The compile worker: an uploaded component is compiled by `apex
//! compile-worker`, a child process running this same executable, under a
//! limit on its address space (`limits.compile_mib`) and on its CPU time.
//!
//! Compiling is the one step that runs untrusted input through a large
//! optimizing compiler before any policy applies. A component can be built
//! to make that take gigabytes of memory or minutes of time. In the server,
//! running out of memory would end the whole process. In a worker, it ends
//! the worker, and the upload fails with the limit it hit.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::CompileError;

/// The hidden subcommand that runs a worker.
pub const SUBCOMMAND: &str = "compile-worker";

/// Maximum time a worker may run, in wall-clock time and in CPU time.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(300);

/// Exit code of a worker that reports a component it cannot compile, with
/// the reason on stderr.
pub const EXIT_INVALID: i32 = 2;

/// Most bytes of a worker's stderr kept for an error message.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Compiles `bytes` in a worker with `memory_bytes` of address space, and
/// returns the serialized code.
///
/// # Errors
///
/// [`CompileError::Invalid`] for a component that does not compile,
/// [`CompileError::Limit`] when the worker ran out of memory or time, and
/// [`CompileError::Worker`] when it could not run.
pub async fn compile(bytes: &[u8], memory_bytes: u64) -> Result<Vec<u8>, CompileError> {
    let executable = executable()?;
    let mut command = tokio::process::Command::new(&executable);
    command
        .arg(SUBCOMMAND)
        .env_clear()
        // One malloc arena: by default glibc reserves 64 MiB of address
        // space per arena for busy threads, which would make the limit
        // depend on how the compiler's threads happen to meet.
        .env("MALLOC_ARENA_MAX", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    {
        let cpu_seconds = COMPILE_TIMEOUT.as_secs();
        // SAFETY: the closure runs between `fork` and `exec` and only makes
        // system calls, which allocate nothing.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                use nix::sys::resource::{Resource, setrlimit};
                setrlimit(Resource::RLIMIT_AS, memory_bytes, memory_bytes)?;
                setrlimit(Resource::RLIMIT_CPU, cpu_seconds, cpu_seconds)?;
                Ok(())
            });
        }
    }
    let mut child = command.spawn().map_err(|e| {
        CompileError::Worker(format!(
            "cannot start the compile worker {}: {e}",
            executable.display()
        ))
    })?;

    // Written while the output is read, so neither pipe can fill up and
    // stall the other side. A worker that dies early closes its stdin.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = bytes.to_vec();
    let writing = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    // Dropping the future at the timeout kills the worker (`kill_on_drop`).
    let finished = tokio::time::timeout(COMPILE_TIMEOUT, child.wait_with_output()).await;
    writing.abort();
    let output = match finished {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            return Err(CompileError::Worker(format!(
                "cannot wait for the compile worker: {e}"
            )));
        }
        Err(_) => {
            return Err(CompileError::Limit(format!(
                "compiling the component took longer than {} s",
                COMPILE_TIMEOUT.as_secs()
            )));
        }
    };
    if output.status.success() {
        return Ok(output.stdout);
    }

    let end = output.stderr.len().min(MAX_MESSAGE_BYTES);
    let message = String::from_utf8_lossy(&output.stderr[..end]).trim().to_string();
    if output.status.code() == Some(EXIT_INVALID) {
        return Err(CompileError::Rejected(message));
    }
    Err(failure(&output.status, &message, memory_bytes))
}

/// Returns the executable to start the worker from. On Linux that is the
/// server's own file even after an upgrade renamed another over its path.
fn executable() -> Result<std::path::PathBuf, CompileError> {
    #[cfg(target_os = "linux")]
    {
        Ok(std::path::PathBuf::from("/proc/self/exe"))
    }
    #[cfg(not(target_os = "linux"))]
    {
        std::env::current_exe().map_err(|e| {
            CompileError::Worker(format!("cannot find the apex executable to compile with: {e}"))
        })
    }
}

/// Returns the error for a worker that ended without a result.
///
/// Out of CPU time, the worker gets `SIGXCPU` from the kernel. Out of
/// address space, Rust aborts after it reports the failed allocation, or a
/// thread cannot start and the worker panics. So a worker that crashed under
/// its limit most likely hit it, and the error names that limit.
///
/// NOTE: a panic from a bug in the compiler is reported as the memory limit
/// too, since the exit status alone cannot tell the two apart.
fn failure(status: &std::process::ExitStatus, message: &str, memory_bytes: u64) -> CompileError {
    const PANICKED: i32 = 101;
    let memory = || {
        CompileError::Limit(format!(
            "compiling the component needed more than {} MiB of memory (limits.compile_mib)",
            memory_bytes >> 20
        ))
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        match status.signal() {
            Some(nix::libc::SIGXCPU) => {
                return CompileError::Limit(format!(
                    "compiling the component used more than {} s of CPU time",
                    COMPILE_TIMEOUT.as_secs()
                ));
            }
            Some(nix::libc::SIGABRT | nix::libc::SIGSEGV | nix::libc::SIGBUS) => return memory(),
            Some(nix::libc::SIGKILL) => {
                return CompileError::Worker(
                    "the compile worker was killed, by the kernel's out-of-memory killer or by an operator"
                        .into(),
                );
            }
            _ => {}
        }
    }
    if status.code() == Some(PANICKED) || message.contains("memory allocation") {
        return memory();
    }
    CompileError::Worker(format!("the compile worker failed ({status}): {message}"))
}
