//! A seccomp filter for shell children: no Unix sockets, no io_uring.
//!
//! Landlock does not cover connecting to a Unix socket by its path, and the
//! socket of a container engine or a system service can hand its clients
//! control of the host. So a child may not create a Unix socket at all. It
//! may still make socket pairs, which have no path, and keeps the
//! descriptors it was given. io_uring can create and connect sockets without
//! the `socket` system call, so it is refused too. It fails with `ENOSYS`, as
//! on a kernel without it, which liburing's users expect.
//!
//! Only the native system call convention passes: a call through the 32-bit
//! convention (`int 0x80` on x86-64) kills the child, and an x32 call fails.

/// Whether this build has a filter for its architecture.
pub const AVAILABLE: bool = cfg!(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
));

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod filter {
    use nix::libc::{
        AF_UNIX, BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, EACCES, ENOSYS,
        SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, sock_filter,
    };

    /// `AUDIT_ARCH_*` of the native system call convention.
    #[cfg(target_arch = "x86_64")]
    const NATIVE_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const NATIVE_ARCH: u32 = 0xC000_00B7;

    /// System call numbers at or above this one are x32 calls on x86-64,
    /// which share the native `AUDIT_ARCH`. No aarch64 call reaches it.
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;

    /// Offsets into `struct seccomp_data`: the call number, its
    /// architecture, and the low half of its first argument (little-endian).
    const OFFSET_NR: u32 = 0;
    const OFFSET_ARCH: u32 = 4;
    const OFFSET_ARG0_LOW: u32 = 16;

    const fn load(offset: u32) -> sock_filter {
        sock_filter {
            code: (BPF_LD | BPF_W | BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: offset,
        }
    }

    /// Compares the loaded word with `k`; `jt` and `jf` count the
    /// instructions skipped after this one.
    const fn jump(op: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter {
            code: (BPF_JMP | op | BPF_K) as u16,
            jt,
            jf,
            k,
        }
    }

    const fn ret(action: u32) -> sock_filter {
        sock_filter {
            code: (BPF_RET | BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: action,
        }
    }

    /// The program. Jump offsets are relative to the next instruction, so
    /// each is checked by the unit tests below against the labels it means.
    pub static PROGRAM: [sock_filter; 14] = [
        /* 0 */ load(OFFSET_ARCH),
        /* 1 */ jump(BPF_JEQ, NATIVE_ARCH, 1, 0),
        /* 2 */ ret(SECCOMP_RET_KILL_PROCESS),
        /* 3 */ load(OFFSET_NR),
        /* 4 */ jump(BPF_JGE, X32_SYSCALL_BIT, 8, 0), // to 13
        /* 5 */ jump(BPF_JEQ, nix::libc::SYS_socket as u32, 0, 2), // on to 6, else 8
        /* 6 */ load(OFFSET_ARG0_LOW),
        /* 7 */ jump(BPF_JEQ, AF_UNIX as u32, 4, 3), // to 12, else 11
        /* 8 */ jump(BPF_JEQ, nix::libc::SYS_io_uring_setup as u32, 4, 0), // to 13
        /* 9 */ jump(BPF_JEQ, nix::libc::SYS_io_uring_enter as u32, 3, 0), // to 13
        /* 10 */ jump(BPF_JEQ, nix::libc::SYS_io_uring_register as u32, 2, 0), // to 13
        /* 11 */ ret(SECCOMP_RET_ALLOW),
        /* 12 */ ret(SECCOMP_RET_ERRNO | EACCES as u32),
        /* 13 */ ret(SECCOMP_RET_ERRNO | ENOSYS as u32),
    ];

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Runs the program over one call the way the kernel would, and
        /// returns the action.
        fn verdict(arch: u32, nr: u32, arg0: u32) -> u32 {
            let mut pc = 0;
            let mut accumulator = 0;
            loop {
                let instruction = PROGRAM[pc];
                let code = u32::from(instruction.code);
                if code == BPF_LD | BPF_W | BPF_ABS {
                    accumulator = match instruction.k {
                        OFFSET_NR => nr,
                        OFFSET_ARCH => arch,
                        OFFSET_ARG0_LOW => arg0,
                        other => panic!("load from offset {other}"),
                    };
                    pc += 1;
                } else if code == BPF_RET | BPF_K {
                    return instruction.k;
                } else {
                    let jumps = match code & 0xf0 {
                        op if op == BPF_JEQ => accumulator == instruction.k,
                        op if op == BPF_JGE => accumulator >= instruction.k,
                        op => panic!("jump {op:#x}"),
                    };
                    let skip = if jumps { instruction.jt } else { instruction.jf };
                    pc += 1 + usize::from(skip);
                }
            }
        }

        const EACCES_ACTION: u32 = SECCOMP_RET_ERRNO | EACCES as u32;
        const ENOSYS_ACTION: u32 = SECCOMP_RET_ERRNO | ENOSYS as u32;

        #[test]
        fn unix_sockets_refused_others_allowed() {
            let socket = nix::libc::SYS_socket as u32;
            assert_eq!(verdict(NATIVE_ARCH, socket, AF_UNIX as u32), EACCES_ACTION);
            assert_eq!(
                verdict(NATIVE_ARCH, socket, nix::libc::AF_INET as u32),
                SECCOMP_RET_ALLOW
            );
            assert_eq!(
                verdict(NATIVE_ARCH, socket, nix::libc::AF_INET6 as u32),
                SECCOMP_RET_ALLOW
            );
            // A socket pair has no path to connect to.
            let pair = nix::libc::SYS_socketpair as u32;
            assert_eq!(verdict(NATIVE_ARCH, pair, AF_UNIX as u32), SECCOMP_RET_ALLOW);
        }

        #[test]
        fn io_uring_refused() {
            for call in [
                nix::libc::SYS_io_uring_setup,
                nix::libc::SYS_io_uring_enter,
                nix::libc::SYS_io_uring_register,
            ] {
                assert_eq!(verdict(NATIVE_ARCH, call as u32, 0), ENOSYS_ACTION);
            }
        }

        #[test]
        fn other_conventions_refused() {
            // The x86 (i386) convention: its `socketcall` hides the domain.
            assert_eq!(verdict(0x4000_0003, 102, 1), SECCOMP_RET_KILL_PROCESS);
            assert_eq!(
                verdict(
                    NATIVE_ARCH,
                    X32_SYSCALL_BIT | nix::libc::SYS_socket as u32,
                    AF_UNIX as u32
                ),
                ENOSYS_ACTION
            );
        }

        #[test]
        fn ordinary_calls_allowed() {
            for call in [
                nix::libc::SYS_read,
                nix::libc::SYS_write,
                nix::libc::SYS_openat,
                nix::libc::SYS_execve,
            ] {
                assert_eq!(verdict(NATIVE_ARCH, call as u32, 0), SECCOMP_RET_ALLOW);
            }
        }
    }
}

/// Installs the filter on the calling process, for good. Runs in the child
/// between `fork` and `exec`: it allocates nothing.
///
/// # Errors
///
/// Fails when the kernel refuses the filter, as without seccomp support.
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn install() -> std::io::Result<()> {
    let program = nix::libc::sock_fprog {
        len: filter::PROGRAM.len() as u16,
        // The kernel only reads the program.
        filter: filter::PROGRAM.as_ptr().cast_mut(),
    };
    // A filter needs no_new_privs, which Landlock also sets.
    // SAFETY: `prctl` with these arguments takes no pointers.
    #[allow(unsafe_code)]
    if unsafe { nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `seccomp` reads `program` and the instructions it points to,
    // which outlive the call.
    #[allow(unsafe_code)]
    let result = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_seccomp,
            nix::libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const program,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
