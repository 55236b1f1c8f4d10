//! Sizing wasmtime's pooling allocator.
//!
//! The pool reserves slots for instances, memories, tables and stacks up
//! front, so instantiating a run takes no `mmap`. Its defaults (1,000 core
//! instances and memories in total) fit only a few dozen runs of a large
//! component, so Apex sizes it from the number of runs allowed at once and a
//! fixed budget per run. A component that needs more than one run's budget
//! is rejected when it is compiled, at upload.
//!
//! A slot must be reset before its next run. By default wasmtime does that
//! with `madvise`, so the next run takes a page fault on every page it
//! touches, and on a busy server each `madvise` also interrupts the other
//! cores to flush their TLBs.
//!
//! Where Linux reports which pages a run wrote (`PAGEMAP_SCAN`, Linux 6.7
//! and later), the pool instead copies the original contents back over those
//! pages, and they stay mapped for the next run. wasmtime does this for up to
//! [`MEMORY_KEEP_RESIDENT`] bytes of written pages per memory and
//! [`TABLE_KEEP_RESIDENT`] per table, in at most 32 separate ranges, and
//! resets the rest with `madvise`.
//!
//! wasmtime 48's scan looks only at pages mapped at that moment. A written
//! page that is swapped out, or that the kernel is moving (compaction), is
//! neither restored nor reset, and the next run in the slot could read it.
//! Apex therefore resets in place only when the operator asks for it
//! (`apex serve --reset-slots-in-place`), and not while a swap area is active
//! at startup. The default is `madvise`, except that the first
//! [`TABLE_CLEARED_IN_PLACE`] bytes of each table are cleared whole with
//! `memset`, which leaves nothing behind.

use wasmtime::{Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Core instances one run may create. A Rust component has a handful; a
/// componentize-py component a few dozen.
pub const CORE_INSTANCES_PER_RUN: u32 = 64;

/// Linear memories one run may create.
pub const MEMORIES_PER_RUN: u32 = 16;

/// Tables one run may create.
pub const TABLES_PER_RUN: u32 = 64;

/// Elements of one table; CPython's function table needs tens of thousands.
const TABLE_ELEMENTS: usize = 65_536;

/// Bytes of each linear memory reset in place and kept mapped after a run.
pub const MEMORY_KEEP_RESIDENT: usize = 2 << 20;

/// Bytes of each table reset in place and kept mapped after a run.
pub const TABLE_KEEP_RESIDENT: usize = 256 << 10;

/// Bytes at the start of each table cleared with `memset` after a run when
/// slots are reset with `madvise`. Clearing them all is safe and cheaper than
/// a `madvise` for the small tables most components have.
pub const TABLE_CLEARED_IN_PLACE: usize = 16 << 10;

/// Method of resetting pool slots between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotReset {
    /// `madvise`, the default.
    Madvise,
    /// Written pages are restored in place and stay mapped.
    InPlace,
    /// `madvise`, because the kernel lacks `PAGEMAP_SCAN`.
    NoPagemapScan,
    /// `madvise`, because a swap area is active.
    SwapActive,
}

impl SlotReset {
    /// Returns the method for this host, in place only when `requested`.
    pub fn detect(requested: bool) -> SlotReset {
        if !requested {
            SlotReset::Madvise
        } else if !pagemap_scan_supported() {
            SlotReset::NoPagemapScan
        } else if swap_active() {
            SlotReset::SwapActive
        } else {
            SlotReset::InPlace
        }
    }
}

/// Returns the allocation strategy for `runs` concurrent runs whose linear
/// memories may each reach `memory_bytes`.
pub fn strategy(runs: u32, memory_bytes: usize, reset: SlotReset) -> InstanceAllocationStrategy {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(runs)
        .total_core_instances(runs.saturating_mul(CORE_INSTANCES_PER_RUN))
        .total_memories(runs.saturating_mul(MEMORIES_PER_RUN))
        .total_tables(runs.saturating_mul(TABLES_PER_RUN))
        // One fiber stack per run executing wasm.
        .total_stacks(runs)
        .max_core_instances_per_component(CORE_INSTANCES_PER_RUN)
        .max_memories_per_component(MEMORIES_PER_RUN)
        .max_tables_per_component(TABLES_PER_RUN)
        .max_memories_per_module(2)
        .max_tables_per_module(8)
        .table_elements(TABLE_ELEMENTS)
        .max_memory_size(memory_bytes);
    if reset == SlotReset::InPlace {
        // Required rather than automatic: where the probe fails, as under a
        // seccomp filter, creating the engine fails and the caller falls
        // back to `madvise`, instead of clearing the whole ranges kept resident.
        pool.pagemap_scan(Enabled::Yes)
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT);
    } else {
        // Without `PAGEMAP_SCAN`, wasmtime clears the whole range kept
        // resident, touched or not. That pays off for the first part of
        // tables, not for linear memories, whose touched pages are spread out.
        // The scan stays off explicitly, so a later default cannot turn it on.
        pool.pagemap_scan(Enabled::No)
            .table_keep_resident(TABLE_CLEARED_IN_PLACE);
    }
    InstanceAllocationStrategy::Pooling(pool)
}

/// Returns whether the kernel has the `PAGEMAP_SCAN` ioctl (Linux 6.7 and later).
fn pagemap_scan_supported() -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    kernel_at_least(&release, (6, 7))
}

/// Returns whether `/proc/swaps` lists an active swap area. An unreadable
/// file counts as active.
fn swap_active() -> bool {
    match std::fs::read_to_string("/proc/swaps") {
        Ok(swaps) => swaps_listed(&swaps),
        Err(_) => true,
    }
}

/// Returns whether the text of `/proc/swaps` lists a swap area below its
/// header line.
fn swaps_listed(swaps: &str) -> bool {
    swaps.lines().skip(1).any(|line| !line.trim().is_empty())
}

/// Returns whether a kernel release such as `6.8.0-45-generic` is at least `minimum`.
fn kernel_at_least(release: &str, minimum: (u32, u32)) -> bool {
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= minimum,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{kernel_at_least, swaps_listed};

    #[test]
    fn reads_swap_areas() {
        let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        assert!(!swaps_listed(header));
        assert!(!swaps_listed(""));
        assert!(swaps_listed(&format!(
            "{header}/dev/zram0                              partition\t4194300\t\t0\t\t100\n"
        )));
    }

    #[test]
    fn reads_kernel_releases() {
        assert!(kernel_at_least("6.7.0\n", (6, 7)));
        assert!(kernel_at_least("6.18.44-fc-v1252", (6, 7)));
        assert!(kernel_at_least("7.0.1", (6, 7)));
        assert!(!kernel_at_least("6.6.87.2-microsoft-standard-WSL2", (6, 7)));
        assert!(!kernel_at_least("5.15.0-119-generic", (6, 7)));
        assert!(!kernel_at_least("", (6, 7)));
        assert!(!kernel_at_least("garbage", (6, 7)));
    }
}
