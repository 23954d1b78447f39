//! Per-CPU counters: one verdict reason per packet, and traffic per service and backend.

use lb_common::TrafficCounters;

use crate::maps::{TETHER_BE_STAT, TETHER_EVENTS, TETHER_REASONS, TETHER_SVC_STAT};

/// What happened to the client's persistence binding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// No persistence on the service (or the binding could not be stored).
    None,
    PersistHit,
    New,
    Expired,
    ReassignedDown,
    /// A flow of a service without persistence followed its connection-table entry.
    FlowHit,
}

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
    match event {
        Event::None => {}
        Event::PersistHit => c.persist_hits += 1,
        Event::New => c.new_assignments += 1,
        Event::Expired => c.expired += 1,
        Event::ReassignedDown => c.reassigned_down += 1,
        Event::FlowHit => c.flow_hits += 1,
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
