//! Per-CPU counters: one verdict reason per packet, and traffic per service and backend.

use core::mem::{offset_of, size_of};

use lb_common::TrafficCounters;

use crate::maps::{TETHER_BE_STAT, TETHER_EVENTS, TETHER_REASONS, TETHER_SVC_STAT};

/// What happened to the client's persistence binding. Each discriminant is the index of the
/// `u64` counting it in `TrafficCounters`, so accounting is one indexed add, not a branch per
/// variant (checked below).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Event {
    /// No persistence on the service (or the binding could not be stored). Index 0 is
    /// `packets`, which an event never counts.
    None = 0,
    PersistHit = 2,
    New = 3,
    Expired = 4,
    ReassignedDown = 5,
    /// A flow of a service without persistence followed its connection-table entry.
    FlowHit = 7,
}

const fn word(offset: usize) -> u32 {
    (offset / size_of::<u64>()) as u32
}
const _: () = assert!(word(offset_of!(TrafficCounters, packets)) == Event::None as u32);
const _: () = assert!(word(offset_of!(TrafficCounters, persist_hits)) == Event::PersistHit as u32);
const _: () = assert!(word(offset_of!(TrafficCounters, new_assignments)) == Event::New as u32);
const _: () = assert!(word(offset_of!(TrafficCounters, expired)) == Event::Expired as u32);
const _: () =
    assert!(word(offset_of!(TrafficCounters, reassigned_down)) == Event::ReassignedDown as u32);
const _: () = assert!(word(offset_of!(TrafficCounters, flow_hits)) == Event::FlowHit as u32);
/// The mask that keeps an index inside the counters (for the verifier).
const WORDS: usize = size_of::<TrafficCounters>() / size_of::<u64>();
const _: () = assert!(WORDS.is_power_of_two());

/// Count one packet under `reason`.
#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(c) = TETHER_REASONS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot has no other writer during this run.
        unsafe { *c += 1 };
    }
}

/// Count one event (`lb_common::event`).
#[inline(always)]
pub fn count_event(event: u32) {
    if let Some(c) = TETHER_EVENTS.get_ptr_mut(event) {
        // SAFETY: a per-CPU slot has no other writer during this run.
        unsafe { *c += 1 };
    }
}

/// This CPU's counters of a service (`None` only for an index outside the array).
///
/// # Safety
/// At most one reference to a slot may be live: call once per slot and program run.
#[inline(always)]
pub unsafe fn service(index: u32) -> Option<&'static mut TrafficCounters> {
    // SAFETY: a per-CPU slot has no other writer during this run (XDP runs with migration
    // disabled); the caller holds the only reference.
    TETHER_SVC_STAT
        .get_ptr_mut(index)
        .map(|p| unsafe { &mut *p })
}

/// This CPU's counters of a backend (`None` only for an id outside the array).
///
/// # Safety
/// As for [`service`].
#[inline(always)]
pub unsafe fn backend(id: u32) -> Option<&'static mut TrafficCounters> {
    // SAFETY: as in `service`.
    TETHER_BE_STAT.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn add(c: &mut TrafficCounters, event: Event, bytes: u64, forwarded: bool) {
    let i = event as usize;
    if i != Event::None as usize {
        let words = (c as *mut TrafficCounters).cast::<u64>();
        // SAFETY: `i & (WORDS - 1)` indexes one of the struct's u64 fields (a repr(C) struct of
        // WORDS u64s); the assertions above tie each event to its field.
        unsafe { *words.add(i & (WORDS - 1)) += 1 };
    }
    if forwarded {
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// Account a balanced packet on its service and backend: the binding event always, packets
/// and bytes only when the frame was forwarded.
#[inline(always)]
pub fn account(
    svc: &mut TrafficCounters,
    be: &mut TrafficCounters,
    event: Event,
    bytes: u64,
    forwarded: bool,
) {
    add(svc, event, bytes, forwarded);
    add(be, event, bytes, forwarded);
}
