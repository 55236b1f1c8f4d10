//! The write budget of a run: how many bytes a task may write to files.
//!
//! wasmtime-wasi has no quota, so without one a task could fill the disk
//! under its read-write directories until its deadline. So the host wraps
//! the descriptor calls that write: `write`, `write-via-stream` and
//! `append-via-stream`, whose streams count each write as it happens. It
//! also charges [`BLOCK`] bytes for each file, directory or link a task
//! creates. Once the budget is spent, the run records one `file` denial, and
//! writes fail as on a full disk: calls with `insufficient-space`, streams
//! with an I/O error whose code is `insufficient-space` (wasi-libc reports
//! it as `EIO`).
//!
//! A write that starts past the end of a file also pays for the hole it
//! leaves, and so does growing a file with `set-size`. A hole takes no disk
//! space, but each byte later written into it can take a whole block, so a
//! hole is charged as if its bytes were written. Writing the same range
//! twice costs twice.
//!
//! NOTE: the budget counts bytes, and the disk allocates blocks. A byte
//! appended to an existing file whose last block is full takes a new block
//! for the price of one byte, so a run can use up to a block per file that
//! was already there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::filesystem::types::{Descriptor, ErrorCode, Filesize, HostDescriptor};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, Pollable, StreamError, StreamResult};

use super::RunState;
use super::files::FILESYSTEM_TYPES;

/// Bytes charged for creating a file, directory or link: one block of a
/// typical file system.
pub const BLOCK: u64 = 4096;

/// Most descriptors whose paths a run keeps for naming files in decisions.
const MAX_OPENED_PATHS: usize = 4096;

/// The paths a task opened files at, by descriptor, so a write past the
/// budget names its file. Descriptors beyond [`MAX_OPENED_PATHS`], and those
/// the run started with, are named "a file".
#[derive(Debug, Default)]
pub struct OpenedPaths(std::collections::HashMap<u32, String>);

impl OpenedPaths {
    /// Records that descriptor `rep` was opened at `path`. A descriptor
    /// number in use again replaces the earlier path.
    pub fn insert(&mut self, rep: u32, path: &str) {
        if self.0.len() < MAX_OPENED_PATHS || self.0.contains_key(&rep) {
            self.0.insert(rep, crate::truncate_text(path, 300));
        }
    }

    /// Returns the name of descriptor `rep` for a decision.
    fn name(&self, rep: u32) -> String {
        self.0.get(&rep).cloned().unwrap_or_else(|| "a file".into())
    }
}

/// Bytes a run may still write, shared by its descriptors and streams.
#[derive(Debug)]
pub struct WriteBudget {
    remaining: AtomicU64,
    limit: u64,
    /// Whether the denial was recorded, so a task that keeps writing adds
    /// one decision, not one per call.
    reported: AtomicBool,
}

impl WriteBudget {
    /// Creates a budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<WriteBudget> {
        Arc::new(WriteBudget {
            remaining: AtomicU64::new(limit),
            limit,
            reported: AtomicBool::new(false),
        })
    }

    /// Takes `bytes` from the budget; returns false, taking nothing, when
    /// fewer are left.
    pub fn take(&self, bytes: u64) -> bool {
        self.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(bytes)
            })
            .is_ok()
    }

    /// Returns `bytes` taken earlier for a call that did not use them.
    pub fn give_back(&self, bytes: u64) {
        self.remaining.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Relaxed)
    }

    /// Returns true the first time it is called: the caller then records
    /// the denial.
    fn first_rejection(&self) -> bool {
        !self.reported.swap(true, Ordering::Relaxed)
    }

    /// Returns the reason recorded with the denial.
    fn reason(&self) -> String {
        format!(
            "the run used up its write budget of {} MiB (limits.write_mib)",
            self.limit >> 20
        )
    }
}

/// Returns the error a write past the budget fails with: `insufficient-space`.
fn no_space() -> std::io::Error {
    #[cfg(unix)]
    {
        std::io::Error::from_raw_os_error(nix::libc::ENOSPC)
    }
    #[cfg(not(unix))]
    {
        std::io::Error::from(std::io::ErrorKind::StorageFull)
    }
}

/// Records the denial of a write past the budget, once per run.
pub fn record_rejection(state: &RunState, target: &str) {
    if state.writes.first_rejection() {
        super::files::record_denial_reason(&state.decisions, target, state.writes.reason());
    }
}

/// Charges `bytes` for a write or a creation at `target`; on rejection,
/// records it and returns the error code for the task.
pub fn charge(state: &RunState, bytes: u64, target: &str) -> Result<(), ErrorCode> {
    if state.writes.take(bytes) {
        return Ok(());
    }
    record_rejection(state, target);
    Err(ErrorCode::InsufficientSpace)
}

/// An output stream to a file that charges the run's budget for every byte.
struct BudgetedStream {
    inner: DynOutputStream,
    budget: Arc<WriteBudget>,
    /// The file's path, for the denial.
    target: String,
    /// The run's decisions, for the one denial.
    decisions: crate::decision::Decisions,
}

impl BudgetedStream {
    fn charge(&mut self, bytes: usize) -> StreamResult<()> {
        if self.budget.take(bytes as u64) {
            return Ok(());
        }
        self.reject()
    }

    fn reject(&mut self) -> StreamResult<()> {
        if self.budget.first_rejection() {
            super::files::record_denial_reason(&self.decisions, &self.target, self.budget.reason());
        }
        Err(StreamError::LastOperationFailed(no_space().into()))
    }
}

#[async_trait::async_trait]
impl Pollable for BudgetedStream {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[async_trait::async_trait]
impl OutputStream for BudgetedStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.write(bytes)
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // With nothing left, the permit is 1 rather than 0, because 0 would
        // make the task wait for readiness forever. A task that only checks
        // readiness, as after its last write, is then not rejected. Its next
        // write is.
        let left = self.budget.remaining().max(1);
        let permitted = self.inner.check_write()?;
        Ok(permitted.min(usize::try_from(left).unwrap_or(usize::MAX)))
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}

/// Replaces the descriptor calls that write file contents with versions that
/// charge the run's write budget.
///
/// # Errors
///
/// Fails when the interface is missing from the linker.
pub fn wrap_writes(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut instance = linker.instance(FILESYSTEM_TYPES)?;

    instance.func_wrap_async(
        "[method]descriptor.write",
        |mut store, (fd, buffer, offset): (Resource<Descriptor>, Vec<u8>, Filesize)| {
            Box::new(async move {
                let state = store.data_mut();
                let buffer_length = buffer.len() as u64;
                let length = buffer_length + hole_before(state, &fd, offset).await;
                let target = state.opened.name(fd.rep());
                if let Err(code) = charge(state, length, &target) {
                    return Ok((Err(code),));
                }
                let result = HostDescriptor::write(&mut state.filesystem(), fd, buffer, offset).await;
                match result {
                    Ok(written) => {
                        // Bytes the call did not write go back to the budget;
                        // the hole stays paid for.
                        state.writes.give_back(buffer_length.saturating_sub(written));
                        Ok((Ok(written),))
                    }
                    Err(error) => {
                        state.writes.give_back(length);
                        Ok((Err(error.downcast()?),))
                    }
                }
            })
        },
    )?;

    instance.func_wrap_async(
        "[method]descriptor.write-via-stream",
        |mut store, (fd, offset): (Resource<Descriptor>, Filesize)| {
            Box::new(async move {
                let state = store.data_mut();
                // The stream's first write leaves the hole; it is paid now.
                let hole = hole_before(state, &fd, offset).await;
                let target = state.opened.name(fd.rep());
                if let Err(code) = charge(state, hole, &target) {
                    return Ok((Err(code),));
                }
                let stream = HostDescriptor::write_via_stream(&mut state.filesystem(), fd, offset);
                budgeted(state, stream, target)
            })
        },
    )?;
    instance.func_wrap_async(
        "[method]descriptor.set-size",
        |mut store, (fd, size): (Resource<Descriptor>, Filesize)| {
            Box::new(async move {
                let state = store.data_mut();
                let growth = hole_before(state, &fd, size).await;
                let target = state.opened.name(fd.rep());
                if let Err(code) = charge(state, growth, &target) {
                    return Ok((Err(code),));
                }
                let result = HostDescriptor::set_size(&mut state.filesystem(), fd, size).await;
                match result {
                    Ok(()) => Ok((Ok(()),)),
                    Err(error) => {
                        state.writes.give_back(growth);
                        Ok((Err(error.downcast()?),))
                    }
                }
            })
        },
    )?;
    instance.func_wrap(
        "[method]descriptor.append-via-stream",
        |mut store, (fd,): (Resource<Descriptor>,)| {
            let state = store.data_mut();
            let target = state.opened.name(fd.rep());
            let stream = HostDescriptor::append_via_stream(&mut state.filesystem(), fd);
            budgeted(state, stream, target)
        },
    )?;

    linker.allow_shadowing(false);
    Ok(())
}

/// Returns the bytes between the end of the file `fd` and `offset`: the hole
/// that writing at `offset`, or growing the file to it, would leave. A
/// descriptor whose size cannot be read costs nothing here; the call itself
/// then fails or writes as usual.
async fn hole_before(state: &mut RunState, fd: &Resource<Descriptor>, offset: Filesize) -> u64 {
    let borrowed = Resource::new_borrow(fd.rep());
    match HostDescriptor::stat(&mut state.filesystem(), borrowed).await {
        Ok(stat) => offset.saturating_sub(stat.size),
        Err(_) => 0,
    }
}

/// Puts a stream the stock implementation opened behind the run's budget.
fn budgeted(
    state: &mut RunState,
    opened: wasmtime_wasi::p2::FsResult<Resource<DynOutputStream>>,
    target: String,
) -> wasmtime::Result<(Result<Resource<DynOutputStream>, ErrorCode>,)> {
    let stream = match opened {
        Ok(stream) => stream,
        Err(error) => return Ok((Err(error.downcast()?),)),
    };
    let inner = state.table.delete(stream)?;
    let wrapped: DynOutputStream = Box::new(BudgetedStream {
        inner,
        budget: state.writes.clone(),
        target,
        decisions: state.decisions.clone(),
    });
    Ok((Ok(state.table.push(wrapped)?),))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
    use wasmtime_wasi::p2::{OutputStream, StreamError};

    use super::{BudgetedStream, WriteBudget};

    fn stream(limit: u64) -> (BudgetedStream, MemoryOutputPipe) {
        let pipe = MemoryOutputPipe::new(1 << 20);
        let stream = BudgetedStream {
            inner: Box::new(pipe.clone()),
            budget: WriteBudget::new(limit),
            target: "out.txt".into(),
            decisions: Default::default(),
        };
        (stream, pipe)
    }

    #[test]
    fn stream_permits_no_more_than_budget() {
        let (mut stream, pipe) = stream(10);
        assert_eq!(stream.check_write().unwrap(), 10);
        stream.write(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(stream.check_write().unwrap(), 4);
        let rejected = stream.write(Bytes::from_static(b"12345"));
        assert!(matches!(rejected, Err(StreamError::LastOperationFailed(_))));
        assert_eq!(
            pipe.contents().as_ref(),
            b"123456",
            "the rejected bytes were not written"
        );
    }

    #[test]
    fn spent_stream_rejects_next_write() {
        let (mut stream, _pipe) = stream(3);
        stream.write(Bytes::from_static(b"abc")).unwrap();
        // A permit of 0 would leave the task polling forever.
        assert_eq!(stream.check_write().unwrap(), 1);
        assert!(stream.decisions.snapshot().is_empty(), "checking is not writing");
        let rejected = stream.write(Bytes::from_static(b"d"));
        assert!(matches!(rejected, Err(StreamError::LastOperationFailed(_))));
        let decisions = stream.decisions.snapshot();
        assert_eq!(decisions.len(), 1);
        assert!(decisions[0].reason.contains("limits.write_mib"), "{decisions:?}");
    }

    #[test]
    fn budget_takes_whole_amounts_only() {
        let budget = WriteBudget::new(10);
        assert!(budget.take(6));
        assert!(!budget.take(5), "only 4 are left");
        assert_eq!(budget.remaining(), 4);
        assert!(budget.take(4));
        assert!(!budget.take(1));
    }

    #[test]
    fn rejection_reported_once() {
        let budget = WriteBudget::new(0);
        assert!(budget.first_rejection());
        assert!(!budget.first_rejection());
    }
}
