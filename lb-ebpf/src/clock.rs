//! The coarse clock (CLOCK_MONOTONIC at tick granularity), read once per packet and, within a
//! tick, without a helper call: `bpf_ktime_get_coarse_ns` only changes when the tick advances
//! `jiffies`, and the verifier turns `bpf_jiffies64` into a plain load, so each CPU keeps the
//! time it read during the current tick (`TETHER_CLOCK`) and calls the helper once per tick.
//! A profile of the live-frames hit path put the helper call (with its return) at a sixth of
//! the program's cost.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::TETHER_CLOCK;

/// `bpf_ktime_get_coarse_ns()`, or this CPU's copy of it read during the same tick. When the
/// tick has advanced jiffies but not yet the clock, the copy is one tick behind until the
/// next tick: persistence ages are counted in seconds.
#[inline(always)]
pub fn coarse_ns() -> u64 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = TETHER_CLOCK.get_ptr_mut(0) else {
        // SAFETY: helper without arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; the program has no other writer on this CPU except a run that
    // interrupts this one, which the order of the accesses below allows for (volatile keeps
    // LLVM from reordering them; one CPU sees its own accesses in program order).
    let (cached_jiffies, cached_ns) = unsafe {
        let j = core::ptr::read_volatile(&raw const (*c).jiffies);
        (j, core::ptr::read_volatile(&raw const (*c).coarse_ns))
    };
    if cached_jiffies == jiffies && cached_ns != 0 {
        return cached_ns;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The time before the tick it belongs to: a run that interrupts this one between the two
    // stores sees the old jiffies and reads the clock itself.
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&raw mut (*c).coarse_ns, now);
        core::ptr::write_volatile(&raw mut (*c).jiffies, jiffies);
    }
    now
}
