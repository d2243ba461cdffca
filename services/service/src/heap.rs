//! The heap this process uses, counted as it is allocated and freed: the global allocator of
//! every binary that links this crate is the system's, wrapped by `cap` (an atomic add per
//! allocation and per free). `/metrics` reports it as `heap_bytes`; the durable bench divides it
//! by the uploads in flight.

use std::alloc::System;

use cap::Cap;

#[global_allocator]
static HEAP: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes allocated and not yet freed.
pub fn in_use() -> usize {
    HEAP.allocated()
}
