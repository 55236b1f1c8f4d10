//! Kernel confinement of shell children: a network namespace, Landlock for
//! files and TCP, and resource limits.
//!
//! The allowlist decides which program starts; this bounds what it does
//! then. Between `fork` and `exec` the child first moves into a new network
//! namespace of its own, which has only a loopback interface that is down,
//! so no socket of any protocol reaches the host's networks. A child of a
//! server that is not root also gets a user namespace, which is what lets it
//! create the network namespace, with its own user and group ids mapped to
//! themselves. Then it restricts itself with a Landlock ruleset the server
//! prepared. The ruleset grants read-write access to the read-write entries
//! of `paths_allow`, read access to the read-only ones, and read and execute
//! access to the system directories a program needs. It allows no TCP
//! `connect` or `bind` at all. Last, the child sets limits on CPU time,
//! address space, file size and processes.

use std::path::PathBuf;

/// System directories children may read and execute from, unless the
/// policy sets `shell_system_paths`.
pub const DEFAULT_SYSTEM_PATHS: [&str; 8] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc", "/opt",
];

/// Resource limits of each child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChildLimits {
    /// CPU seconds (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// Address space in bytes (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// Largest file it may write, in bytes (`RLIMIT_FSIZE`).
    pub file_bytes: u64,
    /// Processes of its user (`RLIMIT_NPROC`); root is exempt in the kernel.
    pub processes: u64,
}

/// Confinement settings of shell children.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Directories children may read and execute from.
    pub system_paths: Vec<PathBuf>,
    /// Resource limits.
    pub limits: ChildLimits,
    /// Whether a child that cannot be fully confined must not start.
    pub required: bool,
}

/// A prepared restriction, moved into the child before `exec`.
#[cfg_attr(not(unix), allow(dead_code))]
pub struct Prepared {
    #[cfg(target_os = "linux")]
    ruleset: Option<landlock::RulesetCreated>,
    #[cfg(target_os = "linux")]
    namespace: NetworkNamespace,
    limits: ChildLimits,
    required: bool,
}

/// How a child gets its own network namespace, decided in the parent.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone)]
struct NetworkNamespace {
    /// For a server that is not root: the contents of `uid_map` and
    /// `gid_map` of the user namespace created with the network namespace.
    id_maps: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(target_os = "linux")]
impl NetworkNamespace {
    fn for_this_process() -> NetworkNamespace {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        if uid.is_root() {
            return NetworkNamespace { id_maps: None };
        }
        // Each id maps to itself, so files the child creates keep the
        // server's owner.
        let maps = (
            format!("{uid} {uid} 1\n").into_bytes(),
            format!("{gid} {gid} 1\n").into_bytes(),
        );
        NetworkNamespace { id_maps: Some(maps) }
    }

    /// Moves the calling process into a new network namespace. Runs between
    /// `fork` and `exec`, so it makes only system calls.
    fn enter(&self) -> nix::Result<()> {
        use nix::sched::{CloneFlags, unshare};

        let Some((uid_map, gid_map)) = &self.id_maps else {
            return unshare(CloneFlags::CLONE_NEWNET);
        };
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET)?;

        // The server is not dumpable, which makes its `/proc/self` files,
        // and those of this fork, owned by root. The child is dumpable for
        // the three writes only: a Landlock-confined sibling cannot trace
        // it, and `exec` replaces the server's memory right after.
        nix::sys::prctl::set_dumpable(true)?;
        // The kernel requires `setgroups` to be denied before an
        // unprivileged process writes its `gid_map`.
        let written = write_proc_file(c"/proc/self/setgroups", b"deny")
            .and_then(|()| write_proc_file(c"/proc/self/uid_map", uid_map))
            .and_then(|()| write_proc_file(c"/proc/self/gid_map", gid_map));
        nix::sys::prctl::set_dumpable(false)?;
        written
    }
}

/// Writes `contents` to a file of `/proc` in one `write`, without allocating.
#[cfg(target_os = "linux")]
fn write_proc_file(path: &std::ffi::CStr, contents: &[u8]) -> nix::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;

    let file = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let written = nix::unistd::write(&file, contents)?;
    if written == contents.len() {
        Ok(())
    } else {
        Err(nix::errno::Errno::EIO)
    }
}

impl Confinement {
    /// Prepares the restriction of one child whose allowed directories are
    /// `read_write` and `read_only`.
    ///
    /// # Errors
    ///
    /// Fails when the ruleset cannot be built and confinement is required.
    pub fn prepare(&self, read_write: &[PathBuf], read_only: &[PathBuf]) -> Result<Prepared, String> {
        #[cfg(target_os = "linux")]
        {
            match self.ruleset(read_write, read_only) {
                Ok(ruleset) => Ok(Prepared {
                    ruleset: Some(ruleset),
                    namespace: NetworkNamespace::for_this_process(),
                    limits: self.limits,
                    required: self.required,
                }),
                Err(e) if self.required => Err(format!("cannot prepare the Landlock ruleset: {e}")),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prepare the Landlock ruleset; the child runs without it");
                    Ok(Prepared {
                        ruleset: None,
                        namespace: NetworkNamespace::for_this_process(),
                        limits: self.limits,
                        required: false,
                    })
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (read_write, read_only);
            if self.required {
                return Err("Landlock confinement is only available on Linux".into());
            }
            Ok(Prepared {
                limits: self.limits,
                required: false,
            })
        }
    }

    #[cfg(target_os = "linux")]
    fn ruleset(
        &self,
        read_write: &[PathBuf],
        read_only: &[PathBuf],
    ) -> Result<landlock::RulesetCreated, landlock::RulesetError> {
        use landlock::{
            ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, path_beneath_rules,
        };

        // The newest ABI these rules are written for; older kernels enforce
        // what they support (best effort), and `required` checks the result.
        let abi = ABI::V5;
        let existing = |paths: &[PathBuf]| paths.iter().filter(|p| p.exists()).cloned().collect::<Vec<_>>();
        let devices = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"].map(PathBuf::from);

        Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(existing(read_write), AccessFs::from_all(abi)))?
            .add_rules(path_beneath_rules(existing(read_only), AccessFs::from_read(abi)))?
            .add_rules(path_beneath_rules(
                existing(&self.system_paths),
                AccessFs::from_read(abi),
            ))?
            .add_rules(path_beneath_rules(existing(&devices), AccessFs::from_file(abi)))
    }
}

impl Prepared {
    /// Restricts the calling process. Runs in the child between `fork` and
    /// `exec`, where allocating or locking is unsound, so the ruleset and the
    /// limits were prepared in the parent. It allocates only to report an error.
    ///
    /// # Errors
    ///
    /// Fails when a limit cannot be set, or when confinement is required and
    /// the kernel did not enforce it fully.
    pub fn apply(&mut self) -> std::io::Result<()> {
        // The namespace comes first: creating a user namespace needs a
        // process that Landlock does not restrict yet.
        #[cfg(target_os = "linux")]
        if let Err(errno) = self.namespace.enter()
            && self.required
        {
            return Err(std::io::Error::from(errno));
        }

        #[cfg(unix)]
        {
            use nix::sys::resource::{Resource, setrlimit};
            let limits = [
                (Resource::RLIMIT_CPU, self.limits.cpu_seconds),
                (Resource::RLIMIT_AS, self.limits.memory_bytes),
                (Resource::RLIMIT_FSIZE, self.limits.file_bytes),
                (Resource::RLIMIT_NPROC, self.limits.processes),
            ];
            for (resource, value) in limits {
                setrlimit(resource, value, value).map_err(std::io::Error::from)?;
            }
        }

        #[cfg(target_os = "linux")]
        if let Some(ruleset) = self.ruleset.take() {
            let status = ruleset
                .restrict_self()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if self.required && status.ruleset != landlock::RulesetStatus::FullyEnforced {
                return Err(std::io::Error::other("Landlock is not fully enforced"));
            }
        }
        Ok(())
    }
}

impl Confinement {
    /// Checks that this host can confine a child: starts `true` under a
    /// required ruleset. Returns a description for the startup log and
    /// `apex policy check`.
    ///
    /// # Errors
    ///
    /// Returns why children cannot be confined here.
    pub async fn probe(&self) -> Result<String, String> {
        if std::env::var_os(DISABLE_FOR_TESTS).is_some() {
            return Err(format!("Landlock disabled by {DISABLE_FOR_TESTS}"));
        }
        let strict = Confinement {
            required: true,
            ..self.clone()
        };
        let prepared = strict.prepare(&[], &[])?;
        let mut command = tokio::process::Command::new("true");
        command.env_clear().env("PATH", "/usr/bin:/bin");
        #[cfg(unix)]
        {
            let mut prepared = Some(prepared);
            // SAFETY: see `super::exec::run`: the closure only makes system calls.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || prepared.as_mut().map_or(Ok(()), Prepared::apply));
            }
        }
        #[cfg(not(unix))]
        let _ = prepared;
        match command.status().await {
            Ok(status) if status.success() => {
                Ok("a network namespace, Landlock (files and TCP) and resource limits".into())
            }
            Ok(status) => Err(format!("a confined test process failed ({status})")),
            Err(e) => Err(format!("a confined test process could not start: {e}")),
        }
    }
}

/// Environment variable that makes the server act as if Landlock were
/// missing, so the refusal to start can be tested on a kernel that has it.
pub const DISABLE_FOR_TESTS: &str = "APEX_TEST_NO_LANDLOCK";
