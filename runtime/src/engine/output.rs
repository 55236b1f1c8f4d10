//! Captured stdout and stderr of a run, kept up to a cap.
//!
//! The stock in-memory pipe of wasmtime-wasi traps the guest once its buffer is
//! full. A task that prints too much should finish its work instead, so this
//! stream accepts every write, keeps the first `cap` bytes, counts the rest and
//! flags the truncation.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Largest write a guest is offered at once.
const WRITE_BUDGET: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Buffer {
    kept: BytesMut,
    total: u64,
}

/// A capped capture of one output stream; clones share the buffer.
#[derive(Debug, Clone)]
pub struct CappedOutput {
    cap: usize,
    buffer: Arc<Mutex<Buffer>>,
}

/// Bytes a [`CappedOutput`] captured, and whether it dropped any.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// The first bytes written, at most the cap.
    pub bytes: Bytes,
    /// Every byte written, kept or not.
    pub total: u64,
    /// Whether bytes were discarded.
    pub truncated: bool,
}

impl CappedOutput {
    /// Creates a capture that keeps at most `cap` bytes.
    pub fn new(cap: usize) -> CappedOutput {
        CappedOutput {
            cap,
            buffer: Arc::new(Mutex::new(Buffer::default())),
        }
    }

    fn append(&self, data: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.cap.saturating_sub(buffer.kept.len());
        let kept = data.len().min(room);
        buffer.kept.extend_from_slice(&data[..kept]);
        buffer.total += data.len() as u64;
    }

    /// Returns what was captured so far.
    pub fn captured(&self) -> Captured {
        let buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        Captured {
            bytes: buffer.kept.clone().freeze(),
            total: buffer.total,
            truncated: buffer.total > buffer.kept.len() as u64,
        }
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_BUDGET)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_cap_and_flags_rest() {
        let mut output = CappedOutput::new(5);
        output.write(Bytes::from_static(b"abc")).unwrap();
        output.write(Bytes::from_static(b"defgh")).unwrap();

        let captured = output.captured();
        assert_eq!(&captured.bytes[..], b"abcde");
        assert_eq!(captured.total, 8);
        assert!(captured.truncated);
    }

    #[test]
    fn exact_cap_is_not_truncated() {
        let mut output = CappedOutput::new(3);
        output.write(Bytes::from_static(b"abc")).unwrap();
        assert!(!output.captured().truncated);
    }
}
