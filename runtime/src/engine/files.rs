//! Recording the file operations the host denies.
//!
//! wasmtime-wasi has no hook for filesystem decisions, so the host wraps
//! `open-at` of `wasi:filesystem/types` and calls the stock implementation.
//! When the task tried to leave its preopened directories (through `..`, an
//! absolute path or a symlink pointing out) or to write where it may only
//! read, the wrapper records a denial.

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};

use super::RunState;
use crate::decision::Decision;

/// The interface whose `open-at` is wrapped; the WASI version the linker
/// provides.
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Replaces `[method]descriptor.open-at` with a version that records denials.
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
                    Ok(descriptor) => Ok((Ok(descriptor),)),
                    Err(error) => {
                        let code = error.downcast()?;
                        if let Some(reason) = denial_reason(code, &path, flags) {
                            let recorded = state.decisions.push(Decision {
                                capability: "file",
                                target: crate::truncate_text(&path, 300),
                                allowed: false,
                                reason: reason.clone(),
                                exit_code: None,
                                duration_ms: None,
                            });
                            if recorded {
                                tracing::info!(path = %path, %reason, "file access denied");
                            }
                        }
                        Ok((Err(code),))
                    }
                }
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Returns why an `open-at` that failed with `code` counts as a denial, or
/// `None` for an ordinary failure such as a missing file.
fn denial_reason(code: ErrorCode, path: &str, flags: DescriptorFlags) -> Option<String> {
    match code {
        ErrorCode::NotPermitted | ErrorCode::Access => {
            let why = if path.starts_with('/') {
                "an absolute path, outside every preopened directory"
            } else if path.split('/').any(|part| part == "..") {
                "`..` leads outside the preopened directory"
            } else if flags.contains(DescriptorFlags::WRITE)
                || flags.contains(DescriptorFlags::MUTATE_DIRECTORY)
            {
                "writing where the policy allows only reading, or a symlink pointing outside"
            } else {
                "a symlink pointing outside the preopened directory"
            };
            Some(why.to_string())
        }
        _ => None,
    }
}
