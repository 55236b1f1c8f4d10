//! Sizing wasmtime's pooling allocator.
//!
//! The pool reserves slots for instances, memories, tables and stacks up
//! front, so instantiating a run takes no `mmap`. Its defaults (1,000 core
//! instances and memories in total) fit only a few dozen runs of a large
//! component, so Apex sizes it from the number of runs allowed at once and a
//! fixed budget per run. A component that needs more than one run's budget
//! is rejected when it is compiled, at upload.

use wasmtime::{InstanceAllocationStrategy, PoolingAllocationConfig};

/// Core instances one run may create. A Rust component has a handful; a
/// componentize-py component a few dozen.
pub const CORE_INSTANCES_PER_RUN: u32 = 64;

/// Linear memories one run may create.
pub const MEMORIES_PER_RUN: u32 = 16;

/// Tables one run may create.
pub const TABLES_PER_RUN: u32 = 64;

/// Elements of one table; CPython's function table needs tens of thousands.
const TABLE_ELEMENTS: usize = 65_536;

/// Returns the allocation strategy for `runs` concurrent runs whose linear
/// memories may each reach `memory_bytes`.
pub fn strategy(runs: u32, memory_bytes: usize) -> InstanceAllocationStrategy {
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
    InstanceAllocationStrategy::Pooling(pool)
}
