//! Per-run resource limits, enforced by wasmtime's `ResourceLimiter`.

use wasmtime::ResourceLimiter;

/// Maximum table elements of one run, all tables together; generous for any
/// language runtime (each element is a pointer on the host).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Maximum core instances, linear memories and tables of one run. A
/// componentize-py component has a few dozen core instances.
const MAX_INSTANCES: usize = 1000;
const MAX_MEMORIES: usize = 100;
const MAX_TABLES: usize = 1000;

/// Limits the linear memories and tables of one run, all of them together,
/// and remembers the request that broke the memory limit so the run can
/// report it.
#[derive(Debug)]
pub struct RunLimiter {
    memory_bytes: usize,
    memory_total: usize,
    table_elements: usize,
    exceeded: Option<usize>,
}

impl RunLimiter {
    /// Creates a limiter allowing the run's linear memories up to
    /// `memory_bytes` in total.
    pub fn new(memory_bytes: usize) -> RunLimiter {
        RunLimiter {
            memory_bytes,
            memory_total: 0,
            table_elements: 0,
            exceeded: None,
        }
    }

    /// Returns the total size in bytes the run's memories would have reached
    /// when the limit stopped them.
    pub fn exceeded(&self) -> Option<usize> {
        self.exceeded
    }

    /// Returns the limit for all linear memories of a run, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }
}

impl ResourceLimiter for RunLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_total - current.min(self.memory_total) + desired;
        if total > self.memory_bytes {
            self.exceeded = Some(total);
            // Trap at once instead of letting `memory.grow` return -1, so the
            // task stops where the limit was hit. Language runtimes usually
            // abort on a failed grow anyway, with a less helpful message.
            return Err(wasmtime::format_err!(
                "memory limit exceeded: the run's linear memories would need {total} bytes, the limit is {} bytes",
                self.memory_bytes
            ));
        }
        self.memory_total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.table_elements - current.min(self.table_elements) + desired;
        if total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memories_share_one_limit() {
        let mut limiter = RunLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(
            limiter.memory_growing(0, 40, None).unwrap(),
            "a second memory fits the rest"
        );
        assert!(
            limiter.memory_growing(0, 1, None).is_err(),
            "a third one does not"
        );
        assert_eq!(limiter.exceeded(), Some(101));
    }

    #[test]
    fn growth_counts_only_the_difference() {
        let mut limiter = RunLimiter::new(100);
        assert!(limiter.memory_growing(0, 50, None).unwrap());
        assert!(limiter.memory_growing(50, 100, None).unwrap());
        assert!(limiter.memory_growing(100, 101, None).is_err());
    }

    #[test]
    fn tables_share_one_limit() {
        let mut limiter = RunLimiter::new(100);
        assert!(limiter.table_growing(0, MAX_TABLE_ELEMENTS, None).unwrap());
        assert!(!limiter.table_growing(0, 1, None).unwrap());
    }
}
