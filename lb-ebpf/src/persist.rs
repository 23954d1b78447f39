//! Source-IP persistence: the client's (masked) address is bound to a backend in the shared
//! LRU table of its family (IPv4: `TETHER_PERSIST4` and its shards, 8-byte key and value;
//! IPv6: `TETHER_PERSIST`). A hit costs one lookup; last-seen is refreshed by a plain store at most every
//! `PERSIST_REFRESH_NS`; the table is only updated when a binding is made or changed.
//!
//! Only a packet that may start a flow (UDP, a TCP SYN) writes the table, and each CPU makes
//! at most `Globals::new_bindings_per_cpu` new bindings per window: spoofed mid-connection
//! packets and source floods are forwarded by Maglev without evicting real clients. ICMP
//! errors and later fragments only read it.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    BINDING_PREVIOUS_TAG16, Backend, BindingEvent, PERSIST_REFRESH_NS, PERSIST_REFRESH_S,
    PersistKey, PersistKey4, PersistValue, PersistValue4, RATE_WINDOW_NS, Service, TrafficCounters,
    elapsed_ns, elapsed_s, event as events,
    hash::{FLOW_SEED, client_hash, hash_words},
    identity_matches, identity_matches16, identity_tag16, mono_seconds, shard_of,
};

use crate::{
    Verdict, clock, conntrack,
    maps::{
        Persist4Shard, TETHER_BACKENDS, TETHER_BINDINGS, TETHER_GLOBALS, TETHER_P4_SHARDS,
        TETHER_PERS4_1, TETHER_PERS4_2, TETHER_PERS4_3, TETHER_PERS4_4, TETHER_PERS4_5,
        TETHER_PERS4_6, TETHER_PERS4_7, TETHER_PERSIST, TETHER_PERSIST4, TETHER_RATE,
    },
    parse::{Addr, Aligned, Flow, Kind, V4_MAPPED_WORD2, store_addr},
    select::{self, Choice, usable},
    stats::{self, Event},
};

/// IPv6 client address masked to the service's prefix.
#[inline(always)]
fn masked_v6(svc: &Service, flow: &Flow) -> Addr {
    let mut a = flow.src;
    let m = &svc.v6_mask_be;
    a[0] &= u32::from_ne_bytes([m[0], m[1], m[2], m[3]]);
    a[1] &= u32::from_ne_bytes([m[4], m[5], m[6], m[7]]);
    a[2] &= u32::from_ne_bytes([m[8], m[9], m[10], m[11]]);
    a[3] &= u32::from_ne_bytes([m[12], m[13], m[14], m[15]]);
    a
}

/// The IPv4 table's key for a (masked) client address word and a service, built as one
/// 64-bit value (field by field, LLVM assembles the address byte by byte), and that value
/// (`PersistKey4::word`, which chooses the shard).
#[inline(always)]
fn key4(addr: u32, service: u32) -> (PersistKey4, u64) {
    // bpfel: the low word's bytes come first, as `addr_be` comes before `service`.
    const _: () = assert!(cfg!(target_endian = "little"));
    const _: () = assert!(core::mem::offset_of!(PersistKey4, service) == 4);
    let word = addr as u64 | (service as u64) << 32;
    // SAFETY: PersistKey4 is repr(C), 8 bytes, every bit pattern valid (checked in lb-common).
    (
        unsafe { core::mem::transmute::<u64, PersistKey4>(word) },
        word,
    )
}

/// The shard (index and map) of the IPv4 table that holds the key `word`
/// (`lb_common::shard_of`, as the daemon computes it). The shard count is read-only data:
/// with one shard the verifier keeps only the first branch.
#[inline(always)]
fn shard4(word: u64) -> (u32, &'static Persist4Shard) {
    // SAFETY: a plain read of a u32 global; volatile so LLVM does not fold the value the
    // object was built with (the loader replaces it).
    let shards = unsafe { core::ptr::read_volatile(&TETHER_P4_SHARDS) };
    if shards <= 1 {
        return (0, &TETHER_PERSIST4);
    }
    let i = shard_of(word, shards);
    let map = match i {
        1 => &TETHER_PERS4_1,
        2 => &TETHER_PERS4_2,
        3 => &TETHER_PERS4_3,
        4 => &TETHER_PERS4_4,
        5 => &TETHER_PERS4_5,
        6 => &TETHER_PERS4_6,
        7 => &TETHER_PERS4_7,
        _ => &TETHER_PERSIST4,
    };
    (i, map)
}

/// Look `key` up in shard `i`, each shard at a call site of its own: the verifier inlines a
/// hash lookup only where a single map reaches the call, and LLVM merges calls that differ
/// only in the map. Shard 0 (the whole table when it is not split) is inline; the others
/// are subprograms.
#[inline(always)]
fn lookup4(i: u32, key: &PersistKey4) -> Option<*mut PersistValue4> {
    match i {
        1 => lookup4_1(key),
        2 => lookup4_2(key),
        3 => lookup4_3(key),
        4 => lookup4_4(key),
        5 => lookup4_5(key),
        6 => lookup4_6(key),
        7 => lookup4_7(key),
        _ => TETHER_PERSIST4.get_ptr_mut(key),
    }
}

macro_rules! shard_lookup {
    ($($name:ident => $map:ident),*) => {$(
        /// [`lookup4`] of one shard.
        #[inline(never)]
        fn $name(key: &PersistKey4) -> Option<*mut PersistValue4> {
            $map.get_ptr_mut(key)
        }
    )*};
}
shard_lookup!(
    lookup4_1 => TETHER_PERS4_1,
    lookup4_2 => TETHER_PERS4_2,
    lookup4_3 => TETHER_PERS4_3,
    lookup4_4 => TETHER_PERS4_4,
    lookup4_5 => TETHER_PERS4_5,
    lookup4_6 => TETHER_PERS4_6,
    lookup4_7 => TETHER_PERS4_7
);

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
    if flow.is_v6 {
        choose_v6(svc, flow, svc_stat)
    } else {
        choose_v4(svc, flow, svc_stat)
    }
}

/// IPv4 clients: the compact table, ages in whole seconds.
#[inline(always)]
fn choose_v4(
    svc: &Service,
    flow: &Flow,
    svc_stat: &mut TrafficCounters,
) -> Result<Choice, Verdict> {
    let addr = flow.src[3] & u32::from_ne_bytes(svc.v4_mask_be);
    let (key, word) = key4(addr, svc.index);
    let (shard, table) = shard4(word);
    let now_ns = clock::coarse_ns();
    let now = mono_seconds(now_ns);
    let mut event = Event::New;
    let mut previous = (0, 0);
    if let Some(v) = lookup4(shard, &key) {
        // SAFETY: the pointer the lookup returned is valid for this program run; concurrent
        // CPUs only store last_seen_s (a u32, written whole) or replace the element.
        let (bound, tag, last_seen) =
            unsafe { ((*v).backend as u32, (*v).identity_tag, (*v).last_seen_s) };
        let age = elapsed_s(now, last_seen);
        if age as u64 * 1_000_000_000 > svc.timeout_ns {
            event = Event::Expired;
        } else {
            if let Some(be) = TETHER_BACKENDS.get(bound)
                && identity_matches16(tag, be)
                && usable(svc, be)
            {
                if age > PERSIST_REFRESH_S {
                    // SAFETY: as above; a plain store, no map update.
                    unsafe { (*v).last_seen_s = now };
                }
                return Ok(Choice {
                    id: bound,
                    backend: be,
                    event: Event::PersistHit,
                });
            }
            event = Event::ReassignedDown;
            previous = (tag as u32, BINDING_PREVIOUS_TAG16);
        }
    }
    // The hash of the IPv4-mapped form, as for every other client key.
    let hash = hash_words(&[svc.index, 0, 0, V4_MAPPED_WORD2, addr], FLOW_SEED);
    let bound = Bound {
        service: svc.index,
        addr: [0, 0, V4_MAPPED_WORD2, addr],
        previous,
    };
    rebind(svc, flow, hash, event, now_ns, svc_stat, bound, |id, be| {
        let value = PersistValue4 {
            backend: id as u16,
            identity_tag: identity_tag16(be.identity),
            last_seen_s: now,
        };
        table.insert(key, value, BPF_ANY as u64).is_ok()
    })
}

/// IPv6 clients.
#[inline(always)]
fn choose_v6(
    svc: &Service,
    flow: &Flow,
    svc_stat: &mut TrafficCounters,
) -> Result<Choice, Verdict> {
    let addr = masked_v6(svc, flow);
    let mut key = Aligned(PersistKey {
        service: svc.index,
        addr_be: [0; 16],
    });
    store_addr(&mut key.0.addr_be, &addr);
    let key = &key.0;
    let now = clock::coarse_ns();
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
    let hash = client_hash(svc.index, &key.addr_be);
    let bound = Bound {
        service: svc.index,
        addr,
        previous: (previous_identity, 0),
    };
    rebind(svc, flow, hash, event, now, svc_stat, bound, |id, be| {
        let value = PersistValue {
            backend: id,
            backend_identity: be.identity,
            last_seen_ns: now,
        };
        TETHER_PERSIST.insert(key, value, BPF_ANY as u64).is_ok()
    })
}

/// The client a binding is for, as the mirror's ring buffer reports it.
struct Bound {
    service: u32,
    /// IPv4-mapped for IPv4 clients; words, so the event's address is four stores.
    addr: Addr,
    /// (identity or tag it replaces, `BindingEvent::flags`).
    previous: (u32, u32),
}

/// A client without a usable binding (`event` says why): the Maglev choice for `hash`,
/// stored with `store` when the packet may start a binding and the rate cap allows it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rebind(
    svc: &Service,
    flow: &Flow,
    hash: u32,
    mut event: Event,
    now_ns: u64,
    svc_stat: &mut TrafficCounters,
    bound: Bound,
    store: impl FnOnce(u32, &Backend) -> bool,
) -> Result<Choice, Verdict> {
    let (id, backend) = select::pick(svc, hash, svc_stat)?;
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
    if event == Event::New && !take_new_binding(now_ns) {
        stats::count_event(events::BINDING_RATE_LIMITED);
        return Ok(Choice {
            id,
            backend,
            event: Event::None,
        });
    }
    if !store(id, backend) {
        // Not stored (should not happen with an LRU map): the packet still goes to the
        // backend the hash picked, but no binding was made.
        event = Event::None;
    } else {
        if event == Event::New {
            stats::count_event(events::BINDING_CREATED);
        }
        emit_binding(&bound, backend.identity);
    }
    Ok(Choice { id, backend, event })
}

/// Tell the daemon's mirror about a binding written, when it mirrors (best effort: a full
/// ring drops the event, counted).
#[inline(always)]
fn emit_binding(bound: &Bound, identity: u32) {
    if TETHER_GLOBALS.get(0).is_none_or(|g| g.emit_bindings == 0) {
        return;
    }
    let mut ev = Aligned(BindingEvent {
        service: bound.service,
        backend_identity: identity,
        previous_identity: bound.previous.0,
        flags: bound.previous.1,
        addr_be: [0; 16],
    });
    store_addr(&mut ev.0.addr_be, &bound.addr);
    // By reference: a moved copy would lose the alignment that makes the stores above cheap.
    let ev = &ev.0;
    // BPF_RB_NO_WAKEUP: the reader polls.
    if TETHER_BINDINGS
        .output(ev, aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        stats::count_event(events::BINDING_EVENT_DROPPED);
    }
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
