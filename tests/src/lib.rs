//! Harness for tether's integration tests, the `cargo xtask run` demo and the benchmarks:
//! packet builders for BPF_PROG_TEST_RUN fixtures and network-namespace topologies.

pub mod bench;
pub mod daemon;
pub mod fixture;
pub mod http;
pub mod l4lab;
pub mod l7lab;
pub mod multilab;
pub mod netns;
pub mod packet;
pub mod pinned;
pub mod redisha;
pub mod tlslab;
