//! Source-IP persistence: the client's (masked) address is bound to a backend in the shared
//! LRU table. A hit costs one lookup; last-seen is refreshed by a plain store at most every
//! `PERSIST_REFRESH_NS`; the table is only updated when a binding is made or changed. A TCP
//! binding is made only by a SYN.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP, Backend, DOWN_POLICY_NEVER, PERSIST_REFRESH_NS,
    PROTO_TCP, PersistKey, PersistValue, Service, TrafficCounters, elapsed_ns, hash::client_hash,
    identity_matches,
};

use crate::{
    Verdict, conntrack,
    maps::{TETHER_BACKENDS, TETHER_BIND_BUDGET, TETHER_PERSIST},
    parse::{Addr, Aligned, Flow, store_addr},
    select,
    stats::Event,
};

/// The backend a packet goes to, and what happened to the client's binding.
pub struct Choice {
    pub id: u32,
    pub backend: &'static Backend,
    pub event: Event,
}

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

/// Whether a client (or flow) bound to `be` keeps going there.
#[inline(always)]
pub fn usable(svc: &Service, be: &Backend) -> bool {
    let st = be.state;
    st == BACKEND_UP
        || st == BACKEND_DRAINING
        || (st != BACKEND_UNUSED && svc.down_policy == DOWN_POLICY_NEVER)
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
        }
    }

    let (id, backend) = select::pick(svc, client_hash(svc.index, &key.addr_be), svc_stat)?;
    // Only a SYN (or UDP) makes a new binding: a spoofed mid-stream TCP packet from an
    // unseen source is forwarded by Maglev (the same choice) and evicts nobody, as in
    // Katran. An existing, stale entry is rewritten in place, which adds nothing.
    // A new key also needs this CPU's budget: past the cap the client is forwarded by Maglev
    // (the same choice) without a binding, and counted.
    if event == Event::New
        && ((flow.proto == PROTO_TCP && !flow.is_tcp_open()) || !take_bind_token(now))
    {
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
    }
    Ok(Choice { id, backend, event })
}

/// Spend one token of this CPU's binding budget (refilled at `rate_per_s`, at most one
/// second's worth); false, counted as refused, when none is left. No cap while the rate is 0.
#[inline(always)]
fn take_bind_token(now: u64) -> bool {
    let Some(b) = TETHER_BIND_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU slot has no other writer during this run (XDP runs with migration
    // disabled); the daemon only rewrites the rate.
    let b = unsafe { &mut *b };
    let rate = b.rate_per_s;
    if rate == 0 {
        return true;
    }
    let elapsed = elapsed_ns(now, b.last_refill_ns).min(1_000_000_000);
    // Whole tokens only; the remainder of the interval is kept by not moving last_refill_ns.
    let add = elapsed * rate / 1_000_000_000;
    if add > 0 {
        b.tokens = (b.tokens + add).min(rate);
        b.last_refill_ns = now;
    }
    if b.tokens > 0 {
        b.tokens -= 1;
        true
    } else {
        b.refused += 1;
        false
    }
}
