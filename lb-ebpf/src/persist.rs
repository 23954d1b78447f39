//! Source-IP persistence: the client's (masked) address is bound to a backend in the shared
//! LRU table. A hit costs one lookup; last-seen is refreshed by a plain store at most every
//! `PERSIST_REFRESH_NS`; the table is only updated when a binding is made or changed.
//!
//! Only a packet that may start a flow (UDP, a TCP SYN) writes the table, and each CPU makes
//! at most `Globals::new_bindings_per_cpu` new bindings per window: spoofed mid-connection
//! packets and source floods are forwarded by Maglev without evicting real clients. ICMP
//! errors and later fragments only read it.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{
    BindingEvent, PERSIST_REFRESH_NS, PersistKey, PersistValue, RATE_WINDOW_NS, Service,
    TrafficCounters, elapsed_ns, event as events, hash::client_hash, identity_matches,
};

use crate::{
    Verdict, conntrack,
    maps::{TETHER_BACKENDS, TETHER_BINDINGS, TETHER_GLOBALS, TETHER_PERSIST, TETHER_RATE},
    parse::{Addr, Aligned, Flow, Kind, store_addr},
    select::{self, Choice, usable},
    stats::{self, Event},
};

/// Client address masked to the service's prefix (for IPv4 only the last word of the mapped
/// form; the `::ffff` prefix stays).
#[inline(always)]
fn masked_source(svc: &Service, flow: &Flow) -> Addr {
    let mut a = flow.src;
    if flow.is_v6 {
        let m = &svc.v6_mask_be;
        a[0] &= u32::from_ne_bytes([m[0], m[1], m[2], m[3]]);
        a[1] &= u32::from_ne_bytes([m[4], m[5], m[6], m[7]]);
        a[2] &= u32::from_ne_bytes([m[8], m[9], m[10], m[11]]);
        a[3] &= u32::from_ne_bytes([m[12], m[13], m[14], m[15]]);
    } else {
        a[3] &= u32::from_ne_bytes(svc.v4_mask_be);
    }
    a
}

/// Choose the backend for `flow` on `svc`.
#[inline(always)]
pub fn choose(
    svc: &Service,
    flow: &Flow,
    svc_stat: &mut TrafficCounters,
) -> Result<Choice, Verdict> {
    if svc.timeout_ns == 0 {
        // No persistence: each flow is balanced on its own and keeps its backend.
        return conntrack::choose(svc, flow, svc_stat);
    }

    let mut key = Aligned(PersistKey {
        service: svc.index,
        addr_be: [0; 16],
    });
    store_addr(&mut key.0.addr_be, &masked_source(svc, flow));
    let key = &key.0;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut event = Event::New;
    let mut previous_identity = 0;
    if let Some(v) = TETHER_PERSIST.get_ptr_mut(key) {
        // SAFETY: the pointer the lookup returned is valid for this program run; concurrent
        // CPUs only store last_seen_ns (a u64, written whole) or replace the element.
        let (bound, tag, last_seen) =
            unsafe { ((*v).backend, (*v).backend_identity, (*v).last_seen_ns) };
        // A time from another CPU may be slightly ahead of ours: that is age 0.
        let age = elapsed_ns(now, last_seen);
        if age > svc.timeout_ns {
            event = Event::Expired;
        } else {
            // An id outside the array, an unused slot, or a slot now holding another backend
            // (a removed backend's binding the daemon had no time to delete) means a new choice.
            if let Some(be) = TETHER_BACKENDS.get(bound)
                && identity_matches(tag, be)
                && usable(svc, be)
            {
                if age > PERSIST_REFRESH_NS {
                    // SAFETY: as above; a plain store, no map update.
                    unsafe { (*v).last_seen_ns = now };
                }
                return Ok(Choice {
                    id: bound,
                    backend: be,
                    event: Event::PersistHit,
                });
            }
            event = Event::ReassignedDown;
            previous_identity = tag;
        }
    }

    let (id, backend) = select::pick(svc, client_hash(svc.index, &key.addr_be), svc_stat)?;
    if !flow.may_bind() {
        // Forwarded where a new binding would go, with nothing stored. An ICMP error or a
        // later fragment is not a new client; a TCP packet without SYN is counted.
        if flow.kind == Kind::Packet || flow.kind == Kind::FirstFragment {
            stats::count_event(events::NON_SYN_UNBOUND);
        }
        return Ok(Choice {
            id,
            backend,
            event: Event::None,
        });
    }
    // A new key grows the table (and may evict someone once this CPU's share is full);
    // rewriting an expired or re-assigned entry does not.
    if event == Event::New && !take_new_binding(now) {
        stats::count_event(events::BINDING_RATE_LIMITED);
        return Ok(Choice {
            id,
            backend,
            event: Event::None,
        });
    }
    let value = PersistValue {
        backend: id,
        backend_identity: backend.identity,
        last_seen_ns: now,
    };
    if TETHER_PERSIST.insert(key, value, BPF_ANY as u64).is_err() {
        // Not stored (should not happen with an LRU map): the packet still goes to the
        // backend the hash picked, but no binding was made.
        event = Event::None;
    } else {
        if event == Event::New {
            stats::count_event(events::BINDING_CREATED);
        }
        emit_binding(key, backend.identity, previous_identity);
    }
    Ok(Choice { id, backend, event })
}

/// Tell the daemon's mirror about a binding written (best effort: a full ring drops it).
#[inline(always)]
fn emit_binding(key: &PersistKey, identity: u32, previous_identity: u32) {
    let ev = BindingEvent {
        service: key.service,
        backend_identity: identity,
        previous_identity,
        _pad: 0,
        addr_be: key.addr_be,
    };
    // BPF_RB_NO_WAKEUP: the reader polls.
    let _ = TETHER_BINDINGS.output(ev, aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64);
}

/// Whether this CPU may create one more binding in the current window (and count it).
#[inline(always)]
fn take_new_binding(now: u64) -> bool {
    let cap = match TETHER_GLOBALS.get(0) {
        Some(g) => g.new_bindings_per_cpu as u64,
        None => 0,
    };
    if cap == 0 {
        return true;
    }
    let Some(w) = TETHER_RATE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot; no other writer while the program runs on it.
    let w = unsafe { &mut *w };
    // A window that has not begun (a start ahead of this CPU's clock) stays current.
    if now >= w.start_ns.saturating_add(RATE_WINDOW_NS) {
        w.start_ns = now;
        w.count = 0;
    }
    if w.count >= cap {
        return false;
    }
    w.count += 1;
    true
}
