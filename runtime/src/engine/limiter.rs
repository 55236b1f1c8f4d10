//! Per-run resource limits, enforced by wasmtime's `ResourceLimiter`.

use wasmtime::ResourceLimiter;

/// Maximum elements of one table; generous for any language runtime.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Limits the linear memories and tables of one run, and remembers the
/// memory request that broke the limit so the run can report it.
#[derive(Debug)]
pub struct RunLimiter {
    memory_bytes: usize,
    exceeded: Option<usize>,
}

impl RunLimiter {
    /// Creates a limiter allowing each linear memory up to `memory_bytes`.
    pub fn new(memory_bytes: usize) -> RunLimiter {
        RunLimiter {
            memory_bytes,
            exceeded: None,
        }
    }

    /// Returns the size in bytes a linear memory asked for when it broke the limit.
    pub fn exceeded(&self) -> Option<usize> {
        self.exceeded
    }

    /// Returns the limit per linear memory, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }
}

impl ResourceLimiter for RunLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.exceeded = Some(desired);
            // Trapping at once, instead of letting `memory.grow` return -1,
            // stops the task where the limit was hit; most language runtimes
            // would abort anyway, with a less helpful message.
            return Err(wasmtime::format_err!(
                "memory limit exceeded: a linear memory requested {desired} bytes, the limit is {} bytes",
                self.memory_bytes
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
