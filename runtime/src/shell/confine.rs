//! Kernel confinement of shell children: user and network namespaces,
//! Landlock for files, TCP, signals and abstract sockets, seccomp for Unix
//! sockets by path, and resource limits.
//!
//! The allowlist decides which program starts; this bounds what it does
//! then. Between `fork` and `exec` the child joins its call's pids cgroup,
//! if there is one. It moves into a new user namespace, with its own user
//! and group ids mapped to themselves, a new IPC namespace, which hides the
//! host's System V shared memory, semaphores and message queues, and a new
//! network namespace, which has only a loopback interface that is down. So no socket of any protocol
//! reaches the host's networks, and the capabilities of a child of a root
//! server reach only the namespaces it owns. It marks every descriptor but
//! stdin, stdout and stderr close-on-exec, and sets limits on CPU time,
//! address space, file size, processes and open files. Then it restricts
//! itself with a Landlock ruleset the server prepared: read-write access to
//! the read-write entries of `paths_allow`, read access to the read-only
//! ones, and read and execute access to the system directories a program
//! needs. The ruleset allows no TCP `connect` or `bind` at all, and no signal
//! to a process or connection to an abstract Unix socket outside the child's
//! domain. Last, it installs the seccomp filter of [`super::seccomp`], which
//! denies Unix sockets that could reach a path, which Landlock does not
//! cover, vsock and io_uring.

use std::path::PathBuf;

/// System directories children may read and execute from, unless the
/// policy sets `shell_system_paths`.
pub const DEFAULT_SYSTEM_PATHS: [&str; 8] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc", "/opt",
];

/// Open files of each child (`RLIMIT_NOFILE`), the usual default soft limit.
#[cfg(unix)]
const CHILD_OPEN_FILES: u64 = 1024;

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
    /// `cgroup.procs` of the call's pids cgroup, which the child joins.
    #[cfg(target_os = "linux")]
    cgroup_procs: Option<std::ffi::CString>,
    limits: ChildLimits,
    required: bool,
}

/// The parts of a prepared restriction that the server keeps while the
/// child runs.
#[derive(Default)]
pub struct Attachments {
    /// Receives the child's proxy listener, for a child with network access.
    pub proxy: Option<ProxyReceiver>,
    /// The call's pids cgroup; dropping it kills what is left in it.
    #[cfg(target_os = "linux")]
    pub cgroup: Option<super::cgroup::CallCgroup>,
}

/// The settings for a child's own network namespace, decided in the parent.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct NetworkNamespace {
    /// The contents of `uid_map` and `gid_map` of the user namespace created
    /// with the network namespace.
    id_maps: Option<(Vec<u8>, Vec<u8>)>,
    /// For a child with network access: its end of the socket pair that
    /// carries its proxy listener to the server.
    proxy_channel: Option<std::os::fd::OwnedFd>,
}

#[cfg(target_os = "linux")]
impl NetworkNamespace {
    /// Decides how to create the namespace. With `network`, also returns the
    /// server's end of the socket pair that receives the proxy listener.
    fn for_this_process(network: bool) -> std::io::Result<(NetworkNamespace, Option<std::os::fd::OwnedFd>)> {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        // Each id maps to itself, so files the child creates keep the
        // server's owner. A child of a root server gets a user namespace
        // too: its capabilities then reach only namespaces it owns, not the
        // host's network, hostname, kernel log or devices.
        let id_maps = Some((
            format!("{uid} {uid} 1\n").into_bytes(),
            format!("{gid} {gid} 1\n").into_bytes(),
        ));
        let (proxy_channel, server_end) = if network {
            let (child_end, server_end) = handoff::socket_pair()?;
            (Some(child_end), Some(server_end))
        } else {
            (None, None)
        };
        let namespace = NetworkNamespace {
            id_maps,
            proxy_channel,
        };
        Ok((namespace, server_end))
    }

    /// Moves the calling process into new network and IPC namespaces and, for a
    /// child with network access, opens its proxy listener there. Runs
    /// between `fork` and `exec`, so it makes only system calls.
    fn enter(&self) -> nix::Result<()> {
        use nix::sched::{CloneFlags, unshare};

        match &self.id_maps {
            None => unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC)?,
            Some((uid_map, gid_map)) => {
                unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC)?;

                // The server is not dumpable, which makes its `/proc/self`
                // files, and those of this fork, owned by root. The child is
                // dumpable for the three writes only: a Landlock-confined
                // sibling cannot trace it, and `exec` replaces the server's
                // memory right after.
                nix::sys::prctl::set_dumpable(true)?;
                // The kernel requires `setgroups` to be denied before an
                // unprivileged process writes its `gid_map`.
                let written = write_proc_file(c"/proc/self/setgroups", b"deny")
                    .and_then(|()| write_proc_file(c"/proc/self/uid_map", uid_map))
                    .and_then(|()| write_proc_file(c"/proc/self/gid_map", gid_map));
                nix::sys::prctl::set_dumpable(false)?;
                written?;
            }
        }

        if let Some(channel) = &self.proxy_channel {
            handoff::send_proxy_listener(channel)?;
        }
        Ok(())
    }
}

/// Writes `contents` to a file of `/proc` or a cgroup in one `write`,
/// without allocating.
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
    /// `read_write` and `read_only`. With `network`, the child may reach
    /// the outside through the proxy, and the returned attachments carry the
    /// receiver of the proxy listener the child opens in its namespace (see
    /// [`ProxyReceiver::receive`]). They also carry the call's pids cgroup.
    ///
    /// # Errors
    ///
    /// Fails when the ruleset cannot be built and confinement is required,
    /// or when `network` is requested where network namespaces cannot be made.
    pub fn prepare(
        &self,
        read_write: &[PathBuf],
        read_only: &[PathBuf],
        network: bool,
    ) -> Result<(Prepared, Attachments), String> {
        #[cfg(target_os = "linux")]
        {
            let (namespace, server_end) = NetworkNamespace::for_this_process(network)
                .map_err(|e| format!("cannot create the socket pair for the shell proxy: {e}"))?;
            let proxy_port = network.then_some(crate::net::proxy::PROXY_PORT);
            let ruleset = match self.ruleset(read_write, read_only, proxy_port) {
                Ok(ruleset) => Some(ruleset),
                Err(e) if self.required => return Err(format!("cannot prepare the Landlock ruleset: {e}")),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prepare the Landlock ruleset; the child runs without it");
                    None
                }
            };
            let cgroup = match super::cgroup::parent() {
                Ok(parent) => match parent.create(self.limits.processes) {
                    Ok(cgroup) => Some(cgroup),
                    Err(e) if self.required => return Err(format!("cannot create the pids cgroup: {e}")),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the pids cgroup; the child runs without it");
                        None
                    }
                },
                // Without the privilege to create cgroups, RLIMIT_NPROC still
                // limits a server that is not root.
                Err(_) => None,
            };
            let prepared = Prepared {
                required: self.required,
                ruleset,
                namespace,
                cgroup_procs: cgroup.as_ref().map(|c| c.procs_path().to_owned()),
                limits: self.limits,
            };
            let attachments = Attachments {
                proxy: server_end.map(|channel| ProxyReceiver { channel }),
                cgroup,
            };
            Ok((prepared, attachments))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (read_write, read_only);
            if network {
                return Err("network access for shell children needs Linux network namespaces".into());
            }
            if self.required {
                return Err("Landlock confinement is only available on Linux".into());
            }
            Ok((
                Prepared {
                    limits: self.limits,
                    required: false,
                },
                Attachments::default(),
            ))
        }
    }

    #[cfg(target_os = "linux")]
    fn ruleset(
        &self,
        read_write: &[PathBuf],
        read_only: &[PathBuf],
        proxy_port: Option<u16>,
    ) -> Result<landlock::RulesetCreated, landlock::RulesetError> {
        use landlock::{
            ABI, Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope,
            path_beneath_rules,
        };

        // The newest ABI these rules are written for; older kernels enforce
        // what they support (best effort), and `required` checks the result.
        let abi = ABI::V6;
        let existing = |paths: &[PathBuf]| paths.iter().filter(|p| p.exists()).cloned().collect::<Vec<_>>();
        let devices = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"].map(PathBuf::from);

        // Device nodes are never needed in an allowed directory.
        let read_write_access = AccessFs::from_all(abi) & !(AccessFs::MakeChar | AccessFs::MakeBlock);

        Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            // No signals to processes outside the child's own domain (the
            // server among them), and no abstract Unix sockets of the host.
            .scope(Scope::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(existing(read_write), read_write_access))?
            .add_rules(path_beneath_rules(existing(read_only), AccessFs::from_read(abi)))?
            .add_rules(path_beneath_rules(
                existing(&self.system_paths),
                AccessFs::from_read(abi),
            ))?
            .add_rules(path_beneath_rules(existing(&devices), AccessFs::from_file(abi)))?
            // The proxy port is the only one a child may connect to, and only
            // inside its own namespace, where loopback is the only address.
            .add_rules(
                proxy_port
                    .map(|port| Ok::<_, landlock::RulesetError>(NetPort::new(port, AccessNet::ConnectTcp))),
            )
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
        // Joining the cgroup needs write access to `cgroup.procs`, which
        // Landlock takes away below.
        #[cfg(target_os = "linux")]
        if let Some(procs) = &self.cgroup_procs {
            write_proc_file(procs, b"0").map_err(std::io::Error::from)?;
        }

        // A child with network access must not run outside its namespace,
        // where its proxy port would be the host's.
        #[cfg(target_os = "linux")]
        if let Err(errno) = self.namespace.enter()
            && (self.required || self.namespace.proxy_channel.is_some())
        {
            return Err(std::io::Error::from(errno));
        }

        // Descriptors the server inherited or opened without `O_CLOEXEC`
        // must not reach the program; stdin, stdout and stderr stay.
        #[cfg(target_os = "linux")]
        {
            // SAFETY: `close_range` with CLOSE_RANGE_CLOEXEC only sets a
            // flag on descriptors; it takes no pointers.
            #[allow(unsafe_code)]
            let result = unsafe {
                nix::libc::syscall(
                    nix::libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    nix::libc::CLOSE_RANGE_CLOEXEC,
                )
            };
            if result != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }

        #[cfg(unix)]
        {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let limits = [
                (Resource::RLIMIT_CPU, self.limits.cpu_seconds),
                (Resource::RLIMIT_AS, self.limits.memory_bytes),
                (Resource::RLIMIT_FSIZE, self.limits.file_bytes),
                (Resource::RLIMIT_NPROC, self.limits.processes),
            ];
            for (resource, value) in limits {
                setrlimit(resource, value, value).map_err(std::io::Error::from)?;
            }
            // The server raises its own open-file limit for clients; a child
            // gets the usual 1024, or less if the hard limit is lower.
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
            let open_files = hard.min(CHILD_OPEN_FILES);
            setrlimit(Resource::RLIMIT_NOFILE, open_files, open_files).map_err(std::io::Error::from)?;
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

        // Last, so the steps above run without the filter.
        #[cfg(all(
            target_os = "linux",
            target_endian = "little",
            any(target_arch = "x86_64", target_arch = "aarch64")
        ))]
        if let Err(e) = super::seccomp::install()
            && self.required
        {
            return Err(e);
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
        // With network access, so the probe also covers the namespace and
        // the handoff of the proxy listener.
        let (prepared, attachments) = strict.prepare(&[], &[], true)?;
        let receiver = attachments.proxy;
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
        let mut child = command
            .spawn()
            .map_err(|e| format!("a confined test process could not start: {e}"))?;
        let handoff = receiver.map(ProxyReceiver::receive);
        match child.wait().await {
            Ok(status) if status.success() => {}
            Ok(status) => return Err(format!("a confined test process failed ({status})")),
            Err(e) => return Err(format!("a confined test process could not be waited for: {e}")),
        }
        match handoff {
            Some(Ok(_listener)) => {}
            Some(Err(e)) => {
                return Err(format!(
                    "the proxy listener did not arrive from the test process: {e}"
                ));
            }
            None => return Err("no socket pair for the proxy listener".into()),
        }
        #[cfg(target_os = "linux")]
        let processes = match super::cgroup::parent() {
            Ok(_) => "a pids cgroup per call",
            Err(_) => "no pids cgroup (RLIMIT_NPROC only, which root is exempt from)",
        };
        #[cfg(not(target_os = "linux"))]
        let processes = "";
        let seccomp = if super::seccomp::AVAILABLE {
            "a seccomp filter (no Unix sockets that reach a path, vsock or io_uring)"
        } else {
            "no seccomp filter on this architecture"
        };
        Ok(format!(
            "network and IPC namespaces, Landlock (files and TCP), {seccomp}, resource limits and {processes}"
        ))
    }
}

impl Confinement {
    /// Returns why no process limit applies to children, if none does: the
    /// server runs as root, which `RLIMIT_NPROC` exempts, and cannot create
    /// a pids cgroup.
    pub fn process_limit_gap(&self) -> Option<String> {
        #[cfg(target_os = "linux")]
        {
            if !nix::unistd::geteuid().is_root() {
                return None;
            }
            super::cgroup::parent().err().map(|reason| {
                format!("the server runs as root, which RLIMIT_NPROC exempts, and {reason}, so shell children have no process limit")
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }
}

/// The server's end of the socket pair that receives a child's proxy
/// listener.
pub struct ProxyReceiver {
    #[cfg(target_os = "linux")]
    channel: std::os::fd::OwnedFd,
}

impl ProxyReceiver {
    /// Takes the listener the child sent before `exec`. Call it after the
    /// child was spawned: spawning returns only once `exec` succeeded, so
    /// the listener is waiting in the socket by then.
    ///
    /// # Errors
    ///
    /// Fails when no listener arrived.
    pub fn receive(self) -> std::io::Result<std::net::TcpListener> {
        #[cfg(target_os = "linux")]
        {
            handoff::receive_listener(&self.channel)
        }
        #[cfg(not(target_os = "linux"))]
        Err(std::io::Error::other("no network namespaces on this platform"))
    }
}

/// Passing the proxy listener from the child to the server over a Unix
/// socket pair, with raw system calls the child may make after `fork`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod handoff {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::libc;

    use crate::net::proxy::PROXY_PORT;

    /// Room for one file descriptor in a control message, aligned for `cmsghdr`.
    type ControlBuffer = [u64; 4];

    /// Creates a Unix stream socket pair; both ends close on `exec`.
    pub(super) fn socket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors the call writes.
        let result = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the call succeeded, so both descriptors are open and ours.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    fn check(result: libc::c_int) -> nix::Result<libc::c_int> {
        if result < 0 {
            Err(nix::errno::Errno::last())
        } else {
            Ok(result)
        }
    }

    /// Brings loopback up in the child's new namespace, listens on
    /// 127.0.0.1:PROXY_PORT and sends the listening socket over `channel`.
    /// Runs between `fork` and `exec`: system calls on stack memory only.
    pub(super) fn send_proxy_listener(channel: &OwnedFd) -> nix::Result<()> {
        // SAFETY: every pointer passed below is to a local of the right type
        // and size, and every descriptor is one this function opened.
        unsafe {
            let control_socket = check(libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
            ))?;
            let mut request: libc::ifreq = std::mem::zeroed();
            request.ifr_name[0] = b'l' as libc::c_char;
            request.ifr_name[1] = b'o' as libc::c_char;
            request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            let raised = check(libc::ioctl(control_socket, libc::SIOCSIFFLAGS as _, &request));
            libc::close(control_socket);
            raised?;

            let listener = check(libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            ))?;
            let mut address: libc::sockaddr_in = std::mem::zeroed();
            address.sin_family = libc::AF_INET as libc::sa_family_t;
            address.sin_port = PROXY_PORT.to_be();
            address.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
            let opened = check(libc::bind(
                listener,
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ))
            .and_then(|_| check(libc::listen(listener, 128)))
            .and_then(|_| send_fd(channel.as_raw_fd(), listener));
            libc::close(listener);
            opened.map(drop)
        }
    }

    /// Returns an `iovec` over `byte`, the data every handoff message carries.
    fn one_byte(byte: &mut [u8; 1]) -> libc::iovec {
        libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        }
    }

    /// Returns a message header over `data` and the first `control_len`
    /// bytes of `control`. Both must outlive every use of the header.
    fn message_header(
        data: &mut libc::iovec,
        control: &mut ControlBuffer,
        control_len: usize,
    ) -> libc::msghdr {
        // SAFETY: `msghdr` is plain data, for which all zeroes is valid.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = data;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = control_len as _;
        message
    }

    /// Sends `fd` as an `SCM_RIGHTS` message with one byte of data.
    unsafe fn send_fd(channel: libc::c_int, fd: libc::c_int) -> nix::Result<libc::c_int> {
        // SAFETY: the message points to locals that live through the call,
        // and the control buffer has room for one header and one descriptor.
        unsafe {
            let mut byte = [0u8; 1];
            let mut data = one_byte(&mut byte);
            let mut control: ControlBuffer = [0; 4];
            let control_len = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
            let message = message_header(&mut data, &mut control, control_len);
            let header = libc::CMSG_FIRSTHDR(&raw const message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>(), fd);
            check(libc::sendmsg(channel, &raw const message, 0) as libc::c_int)
        }
    }

    /// Receives the listening socket the child sent.
    pub(super) fn receive_listener(channel: &OwnedFd) -> std::io::Result<std::net::TcpListener> {
        // SAFETY: as in `send_fd`; the received descriptor is new and ours.
        unsafe {
            let mut byte = [0u8; 1];
            let mut data = one_byte(&mut byte);
            let mut control: ControlBuffer = [0; 4];
            let mut message = message_header(&mut data, &mut control, std::mem::size_of::<ControlBuffer>());
            let received = libc::recvmsg(
                channel.as_raw_fd(),
                &raw mut message,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            );
            if received < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let header = libc::CMSG_FIRSTHDR(&raw const message);
            if received == 0
                || header.is_null()
                || (*header).cmsg_level != libc::SOL_SOCKET
                || (*header).cmsg_type != libc::SCM_RIGHTS
            {
                return Err(std::io::Error::other("the child sent no proxy listener"));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>());
            Ok(std::net::TcpListener::from(OwnedFd::from_raw_fd(fd)))
        }
    }
}

/// Environment variable that makes the server act as if Landlock were
/// missing, so the refusal to start can be tested on a kernel that has it.
pub const DISABLE_FOR_TESTS: &str = "APEX_TEST_NO_LANDLOCK";
