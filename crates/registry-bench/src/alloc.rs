//! Allocated-bytes accounting for the memory measurements.
//!
//! The binary's global allocator is `stats_alloc`'s instrumented system allocator, which
//! counts every byte allocated and freed. A hand-written counting allocator would need an
//! `unsafe impl GlobalAlloc`, and the workspace forbids `unsafe_code` with `forbid`, which a
//! module cannot relax; the unsafe code lives in that small, well-known crate instead.

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use std::alloc::System;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed by the whole process (heap only).
pub fn live_bytes() -> i64 {
    let s = GLOBAL.stats();
    let alloc = i64::try_from(s.bytes_allocated).unwrap_or(i64::MAX);
    let freed = i64::try_from(s.bytes_deallocated).unwrap_or(i64::MAX);
    let realloc = i64::try_from(s.bytes_reallocated).unwrap_or(0);
    alloc - freed + realloc
}

/// Bytes the whole process has asked the allocator for so far: every allocation, plus the
/// net growth of reallocations, whether freed since or not. The allocation volume of a piece
/// of work is the difference of two readings.
pub fn allocated_bytes() -> i64 {
    let s = GLOBAL.stats();
    i64::try_from(s.bytes_allocated)
        .unwrap_or(i64::MAX)
        .saturating_add(i64::try_from(s.bytes_reallocated).unwrap_or(0))
}

/// CPU time of every thread of the process so far, in nanoseconds, from
/// `/proc/self/task/*/schedstat` (threads that have exited are not counted; the tokio
/// workers live for the whole run).
pub fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
