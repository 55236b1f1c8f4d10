//! Recording the file operations the host denies.
//!
//! wasmtime-wasi has no hook for filesystem decisions, so the host wraps the
//! path operations of `wasi:filesystem/types` (`open-at`, `stat-at`,
//! `readlink-at`, `create-directory-at`, `remove-directory-at`,
//! `unlink-file-at`, `rename-at`, `symlink-at` and `link-at`) and calls the
//! stock implementation. When the task tried to leave its preopened
//! directories (through `..`, an absolute path or a symlink pointing out) or
//! to write where it may only read, the wrapper records a denial.
//!
//! `open-at` also refuses FIFOs, sockets and devices. Opening a FIFO waits
//! for its other end, on a thread of the runtime's blocking pool that the
//! run's deadline cannot free, so a task could exhaust that pool.

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, DescriptorStat, DescriptorType, ErrorCode, HostDescriptor, OpenFlags,
    PathFlags,
};

use super::{RunState, writes};
use crate::decision::Decision;

/// The interface whose `open-at` is wrapped; the WASI version the linker
/// provides.
pub(super) const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Wraps one path operation of a descriptor: calls the stock implementation
/// and records a denial when it fails with one. `$path` names the argument
/// that is recorded, and `$writes` whether the operation changes the tree.
macro_rules! wrap_path_operation {
    ($instance:ident, $name:literal, $method:ident, ($($arg:ident: $ty:ty),*), $result:ty, $path:ident, $writes:expr) => {
        wrap_path_operation!($instance, $name, $method, ($($arg: $ty),*), $result, $path, $writes, false)
    };
    ($instance:ident, $name:literal, $method:ident, ($($arg:ident: $ty:ty),*), $result:ty, $path:ident, $writes:expr, $creates:expr) => {
        $instance.func_wrap_async($name, |mut store, ($($arg,)*): ($($ty,)*)| {
            Box::new(async move {
                let state = store.data_mut();
                let path = $path.clone();
                // A creation costs a block of the write budget, given back
                // when it fails.
                if $creates && let Err(code) = writes::charge(state, writes::BLOCK, &path) {
                    return Ok((Err(code),));
                }
                let result: Result<$result, _> = HostDescriptor::$method(&mut state.filesystem(), $($arg),*).await;
                match result {
                    Ok(value) => Ok((Ok(value),)),
                    Err(error) => {
                        if $creates {
                            state.writes.give_back(writes::BLOCK);
                        }
                        let code = error.downcast()?;
                        record_denial(state, code, &path, $writes);
                        Ok((Err(code),))
                    }
                }
            })
        })?;
    };
}

/// Replaces `[method]descriptor.open-at` and the other path operations with
/// versions that record denials.
///
/// # Errors
///
/// Fails when the interface is missing from the linker.
pub fn wrap_open_at(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut instance = linker.instance(FILESYSTEM_TYPES)?;
    instance.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                // Checked before the open, which would already wait. The type
                // of a path that does not exist yet is left to the open.
                // NOTE: a FIFO that reaches the path between this check and
                // the open still blocks it: renamed there by another run, or
                // made there by a shell child. Closing that gap needs an open
                // that does not wait, which wasmtime-wasi does not offer.
                let target = HostDescriptor::stat_at(
                    &mut state.filesystem(),
                    Resource::new_borrow(fd.rep()),
                    path_flags,
                    path.clone(),
                )
                .await;
                if let Ok(stat) = target
                    && let Some(kind) = special_file(stat.type_)
                {
                    record(
                        state,
                        &path,
                        format!("{kind}: only regular files and directories may be opened"),
                    );
                    return Ok((Err(ErrorCode::Access),));
                }
                // Creating a file costs a block of the write budget, given
                // back when the open fails. Opening an existing file with
                // `create` costs the same, since the task asked to create.
                let creates = open_flags.contains(OpenFlags::CREATE);
                if creates && let Err(code) = writes::charge(state, writes::BLOCK, &path) {
                    return Ok((Err(code),));
                }
                let result = HostDescriptor::open_at(
                    &mut state.filesystem(),
                    fd,
                    path_flags,
                    path.clone(),
                    open_flags,
                    flags,
                )
                .await;
                match result {
                    Ok(descriptor) => {
                        state.opened.insert(descriptor.rep(), &path);
                        Ok((Ok(descriptor),))
                    }
                    Err(error) => {
                        if creates {
                            state.writes.give_back(writes::BLOCK);
                        }
                        let code = error.downcast()?;
                        let writes = flags.contains(DescriptorFlags::WRITE)
                            || flags.contains(DescriptorFlags::MUTATE_DIRECTORY);
                        record_denial(state, code, &path, writes);
                        Ok((Err(code),))
                    }
                }
            })
        },
    )?;

    type Fd = Resource<Descriptor>;
    wrap_path_operation!(instance, "[method]descriptor.stat-at", stat_at,
        (fd: Fd, flags: PathFlags, path: String), DescriptorStat, path, false);
    wrap_path_operation!(instance, "[method]descriptor.readlink-at", readlink_at,
        (fd: Fd, path: String), String, path, false);
    wrap_path_operation!(instance, "[method]descriptor.create-directory-at", create_directory_at,
        (fd: Fd, path: String), (), path, true, true);
    wrap_path_operation!(instance, "[method]descriptor.remove-directory-at", remove_directory_at,
        (fd: Fd, path: String), (), path, true);
    wrap_path_operation!(instance, "[method]descriptor.unlink-file-at", unlink_file_at,
        (fd: Fd, path: String), (), path, true);
    wrap_path_operation!(instance, "[method]descriptor.rename-at", rename_at,
        (fd: Fd, old_path: String, new_fd: Fd, new_path: String), (), new_path, true);
    wrap_path_operation!(instance, "[method]descriptor.symlink-at", symlink_at,
        (fd: Fd, target: String, path: String), (), path, true, true);
    wrap_path_operation!(instance, "[method]descriptor.link-at", link_at,
        (fd: Fd, flags: PathFlags, old_path: String, new_fd: Fd, new_path: String), (), new_path, true, true);

    linker.allow_shadowing(false);
    Ok(())
}

/// Returns what a file of type `kind` is when a task may not open it.
fn special_file(kind: DescriptorType) -> Option<&'static str> {
    match kind {
        // wasmtime-wasi reports FIFOs and sockets on Unix as `Unknown`.
        DescriptorType::Fifo | DescriptorType::Socket | DescriptorType::Unknown => Some("a FIFO or socket"),
        DescriptorType::CharacterDevice | DescriptorType::BlockDevice => Some("a device"),
        DescriptorType::Directory | DescriptorType::RegularFile | DescriptorType::SymbolicLink => None,
    }
}

/// Records a denial in the run when `code` is one, and logs the recorded ones.
fn record_denial(state: &mut RunState, code: ErrorCode, path: &str, writes: bool) {
    if let Some(reason) = denial_reason(code, path, writes) {
        record(state, path, reason);
    }
}

/// Records a file denial in the run, and logs it once.
fn record(state: &mut RunState, path: &str, reason: String) {
    record_denial_reason(&state.decisions, path, reason);
}

/// Records a file denial in `decisions`, and logs it unless the run already
/// has too many decisions.
pub(super) fn record_denial_reason(decisions: &crate::decision::Decisions, path: &str, reason: String) {
    let recorded = decisions.push(Decision {
        capability: "file",
        target: crate::truncate_text(path, 300),
        allowed: false,
        reason: reason.clone(),
        exit_code: None,
        duration_ms: None,
    });
    if recorded {
        tracing::info!(path = %path, %reason, "file access denied");
    }
}

/// Returns why a path operation that failed with `code` counts as a denial,
/// or `None` for an ordinary failure such as a missing file.
fn denial_reason(code: ErrorCode, path: &str, writes: bool) -> Option<String> {
    match code {
        ErrorCode::NotPermitted | ErrorCode::Access => {
            let why = if path.starts_with('/') {
                "an absolute path, outside every preopened directory"
            } else if path.split('/').any(|part| part == "..") {
                "`..` leads outside the preopened directory"
            } else if writes {
                "writing where the policy allows only reading, or a symlink pointing outside"
            } else {
                "a symlink pointing outside the preopened directory, or an absolute one"
            };
            Some(why.to_string())
        }
        _ => None,
    }
}
