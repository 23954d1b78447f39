//! Shared between the XDP program (`lb-ebpf`, `no_std`, BPF target) and the daemon.
//!
//! Everything that crosses the kernel/userspace boundary is defined here exactly once:
//! map names, `#[repr(C)]` key and value layouts, counter indexes and the hash and Maglev
//! code, so both sides compute the same backend for the same client.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod hash;
#[cfg(feature = "user")]
pub mod maglev;
pub mod maps;
pub mod persist4;
pub mod stats;

pub use maps::*;
pub use persist4::*;
pub use stats::*;
