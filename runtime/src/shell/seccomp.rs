//! A seccomp filter for shell children: no Unix sockets that can reach a
//! path, no vsock, no io_uring.
//!
//! Landlock does not cover connecting to a Unix socket by its path, and the
//! socket of a container engine or a system service can hand its clients
//! control of the host. So a child may not create a Unix socket with
//! `socket`. It may still make stream and seqpacket socket pairs, which are
//! connected to each other and cannot connect anywhere else. Datagram pairs
//! are denied: either end can send to any datagram socket by its path, as
//! `/dev/log`. vsock sockets are denied too, since a network namespace does
//! not separate them from the virtual machine's host. io_uring can create
//! and connect sockets without these calls, so it is denied as well. It
//! fails with `ENOSYS`, as on a kernel built without io_uring.
//!
//! Only the native system call convention passes: a call through the 32-bit
//! convention (`int 0x80` on x86-64) kills the child, and an x32 call fails.

/// Whether this build has a filter for its architecture.
pub const AVAILABLE: bool = cfg!(all(
    target_os = "linux",
    target_endian = "little",
    any(target_arch = "x86_64", target_arch = "aarch64")
));

#[cfg(all(
    target_os = "linux",
    target_endian = "little",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod filter {
    use nix::libc::{
        AF_UNIX, BPF_ABS, BPF_ALU, BPF_AND, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, EACCES,
        ENOSYS, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, SOCK_SEQPACKET, SOCK_STREAM,
        sock_filter,
    };

    /// `AUDIT_ARCH_*` of the native system call convention.
    #[cfg(target_arch = "x86_64")]
    const NATIVE_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const NATIVE_ARCH: u32 = 0xC000_00B7;

    /// System call numbers at or above this one are x32 calls on x86-64,
    /// which share the native `AUDIT_ARCH`. No aarch64 call reaches it.
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;

    /// The vsock address family, which not every libc names.
    const AF_VSOCK: u32 = 40;

    /// The bits of a socket type that name it; the rest are flags such as
    /// `SOCK_CLOEXEC`.
    const SOCK_TYPE_MASK: u32 = 0xf;

    /// Offsets into `struct seccomp_data`: the call number, its
    /// architecture, and the low halves of its first two arguments
    /// (little-endian).
    const OFFSET_NR: u32 = 0;
    const OFFSET_ARCH: u32 = 4;
    const OFFSET_ARG0_LOW: u32 = 16;
    const OFFSET_ARG1_LOW: u32 = 24;

    const fn load(offset: u32) -> sock_filter {
        sock_filter {
            code: (BPF_LD | BPF_W | BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: offset,
        }
    }

    const fn and(mask: u32) -> sock_filter {
        sock_filter {
            code: (BPF_ALU | BPF_AND | BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: mask,
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

    const ALLOW: u32 = SECCOMP_RET_ALLOW;
    const DENY: u32 = SECCOMP_RET_ERRNO | EACCES as u32;
    const MISSING: u32 = SECCOMP_RET_ERRNO | ENOSYS as u32;

    /// The program. Jump offsets are relative to the next instruction. The
    /// comment after each jump names the instructions it goes to. The unit
    /// tests below run every path.
    pub static PROGRAM: [sock_filter; 22] = [
        /* 0 */ load(OFFSET_ARCH),
        /* 1 */ jump(BPF_JEQ, NATIVE_ARCH, 1, 0), // 3, else 2
        /* 2 */ ret(SECCOMP_RET_KILL_PROCESS),
        /* 3 */ load(OFFSET_NR),
        /* 4 */ jump(BPF_JGE, X32_SYSCALL_BIT, 16, 0), // 21, else 5
        /* 5 */ jump(BPF_JEQ, nix::libc::SYS_socket as u32, 0, 3), // 6, else 9
        /* 6 */ load(OFFSET_ARG0_LOW),
        /* 7 */ jump(BPF_JEQ, AF_UNIX as u32, 12, 0), // 20, else 8
        /* 8 */ jump(BPF_JEQ, AF_VSOCK, 11, 10), // 20, else 19
        /* 9 */ jump(BPF_JEQ, nix::libc::SYS_socketpair as u32, 0, 6), // 10, else 16
        /* 10 */ load(OFFSET_ARG0_LOW),
        /* 11 */ jump(BPF_JEQ, AF_UNIX as u32, 0, 7), // 12, else 19
        /* 12 */ load(OFFSET_ARG1_LOW),
        /* 13 */ and(SOCK_TYPE_MASK),
        /* 14 */ jump(BPF_JEQ, SOCK_STREAM as u32, 4, 0), // 19, else 15
        /* 15 */ jump(BPF_JEQ, SOCK_SEQPACKET as u32, 3, 4), // 19, else 20
        /* 16 */ jump(BPF_JEQ, nix::libc::SYS_io_uring_setup as u32, 4, 0), // 21, else 17
        /* 17 */ jump(BPF_JEQ, nix::libc::SYS_io_uring_enter as u32, 3, 0), // 21, else 18
        /* 18 */ jump(BPF_JEQ, nix::libc::SYS_io_uring_register as u32, 2, 0), // 21, else 19
        /* 19 */ ret(ALLOW),
        /* 20 */ ret(DENY),
        /* 21 */ ret(MISSING),
    ];

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Runs the program over one call the way the kernel would, and
        /// returns the action.
        fn verdict(arch: u32, nr: u32, arg0: u32, arg1: u32) -> u32 {
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
                        OFFSET_ARG1_LOW => arg1,
                        other => panic!("load from offset {other}"),
                    };
                    pc += 1;
                } else if code == BPF_ALU | BPF_AND | BPF_K {
                    accumulator &= instruction.k;
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

        fn native(nr: i64, arg0: i32, arg1: i32) -> u32 {
            verdict(NATIVE_ARCH, nr as u32, arg0 as u32, arg1 as u32)
        }

        #[test]
        fn every_jump_lands_inside() {
            for (pc, instruction) in PROGRAM.iter().enumerate() {
                if u32::from(instruction.code) & 0x07 == BPF_JMP {
                    for skip in [instruction.jt, instruction.jf] {
                        assert!(pc + 1 + usize::from(skip) < PROGRAM.len(), "jump at {pc}");
                    }
                }
            }
        }

        #[test]
        fn unix_and_vsock_sockets_denied() {
            use nix::libc::{AF_INET, AF_INET6, AF_NETLINK, SOCK_CLOEXEC, SOCK_DGRAM, SYS_socket};
            assert_eq!(native(SYS_socket, AF_UNIX, SOCK_STREAM), DENY);
            assert_eq!(native(SYS_socket, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC), DENY);
            assert_eq!(native(SYS_socket, AF_VSOCK as i32, SOCK_STREAM), DENY);
            // These reach only the child's own network namespace.
            assert_eq!(native(SYS_socket, AF_INET, SOCK_STREAM), ALLOW);
            assert_eq!(native(SYS_socket, AF_INET6, SOCK_DGRAM), ALLOW);
            assert_eq!(native(SYS_socket, AF_NETLINK, SOCK_DGRAM), ALLOW);
        }

        #[test]
        fn only_connected_socket_pairs_allowed() {
            use nix::libc::{SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_RAW, SYS_socketpair};
            assert_eq!(native(SYS_socketpair, AF_UNIX, SOCK_STREAM), ALLOW);
            assert_eq!(native(SYS_socketpair, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC), ALLOW);
            assert_eq!(
                native(SYS_socketpair, AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK),
                ALLOW
            );
            // Either end of these can send to a datagram socket by its path;
            // the kernel makes a raw Unix socket a datagram one.
            assert_eq!(native(SYS_socketpair, AF_UNIX, SOCK_DGRAM), DENY);
            assert_eq!(native(SYS_socketpair, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC), DENY);
            assert_eq!(native(SYS_socketpair, AF_UNIX, SOCK_RAW), DENY);
            // The kernel has socket pairs of Unix sockets only, and rejects
            // the rest itself.
            assert_eq!(native(SYS_socketpair, nix::libc::AF_INET, SOCK_DGRAM), ALLOW);
        }

        #[test]
        fn io_uring_denied() {
            use nix::libc::{SYS_io_uring_enter, SYS_io_uring_register, SYS_io_uring_setup};
            for call in [SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register] {
                assert_eq!(native(call, 0, 0), MISSING);
            }
        }

        #[test]
        fn other_conventions_denied() {
            // The x86 (i386) convention: its `socketcall` hides the domain.
            assert_eq!(verdict(0x4000_0003, 102, 1, 1), SECCOMP_RET_KILL_PROCESS);
            let x32_socket = X32_SYSCALL_BIT | nix::libc::SYS_socket as u32;
            assert_eq!(verdict(NATIVE_ARCH, x32_socket, AF_UNIX as u32, 1), MISSING);
        }

        #[test]
        fn ordinary_calls_allowed() {
            use nix::libc::{SYS_execve, SYS_openat, SYS_read, SYS_write};
            for call in [SYS_read, SYS_write, SYS_openat, SYS_execve] {
                assert_eq!(native(call, 0, 0), ALLOW);
            }
        }
    }
}

/// Installs the filter on the calling process, for good. Runs in the child
/// between `fork` and `exec`: it allocates nothing.
///
/// # Errors
///
/// Fails when the kernel rejects the filter, as without seccomp support.
#[cfg(all(
    target_os = "linux",
    target_endian = "little",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
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
