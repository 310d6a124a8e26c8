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

/// Bytes allocated and not yet freed by the whole process (heap only). `stats_alloc` counts
/// a reallocation's growth in `bytes_allocated` and its shrinking in `bytes_deallocated`
/// already (`bytes_reallocated` repeats their net sum): adding it again would count every
/// grown `Vec` or `String` twice.
pub fn live_bytes() -> i64 {
    let s = GLOBAL.stats();
    let alloc = i64::try_from(s.bytes_allocated).unwrap_or(i64::MAX);
    let freed = i64::try_from(s.bytes_deallocated).unwrap_or(i64::MAX);
    alloc - freed
}

/// Bytes the whole process has asked the allocator for so far: every allocation and the
/// growth of every reallocation, whether freed since or not. The allocation volume of a piece
/// of work is the difference of two readings.
pub fn allocated_bytes() -> i64 {
    i64::try_from(GLOBAL.stats().bytes_allocated).unwrap_or(i64::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    // The counts are of the whole process: other test threads may allocate meanwhile, so the
    // check is repeated until one quiet reading (the bug doubled the figure every time).
    #[test]
    fn a_grown_vector_is_counted_once() {
        let mut last = 0;
        for _ in 0..50 {
            let before = live_bytes();
            let mut v: Vec<u64> = Vec::with_capacity(1);
            for i in 0..10_000u64 {
                v.push(i);
            }
            let held = i64::try_from(v.capacity() * 8).unwrap_or(i64::MAX);
            last = live_bytes() - before;
            if last == held {
                return;
            }
        }
        panic!("a vector holding 80 KB counted as {last} B");
    }
}
