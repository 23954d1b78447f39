//! Connection table for services without persistence: a flow keeps the backend it started
//! on while the Maglev table changes under it, as Katran's LRU connection table does. A TCP
//! entry is created only by a SYN; a mid-stream packet without one (its flow started before
//! this table existed, or the entry was evicted) goes by Maglev and creates nothing, so a
//! flood of spoofed non-SYN packets cannot evict real connections. UDP has no handshake: its
//! first packet creates the entry. ICMP errors and later fragments of a flow only read it.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    FlowKey, FlowValue, PROTO_UDP, Service, TrafficCounters, hash::flow_hash, identity_matches,
};

use crate::{
    Verdict,
    maps::{TETHER_BACKENDS, TETHER_FLOWS},
    parse::{Aligned, Flow, addr_bytes, store_addr},
    select::{self, Choice, usable},
    stats::Event,
};

#[inline(always)]
pub fn choose(
    svc: &Service,
    flow: &Flow,
    svc_stat: &mut TrafficCounters,
) -> Result<Choice, Verdict> {
    let mut key = Aligned(FlowKey {
        service: svc.index,
        addr_be: [0; 16],
        sport_be: flow.sport_be,
        _pad: 0,
    });
    store_addr(&mut key.0.addr_be, &flow.src);
    let key = &key.0;
    let opens = flow.is_tcp_open();
    let mut known = false;
    // A SYN starts a new connection (possibly reusing the ports of an old one): it is balanced
    // afresh, so a draining backend gets no new connection.
    if !opens && let Some(v) = TETHER_FLOWS.get_ptr(key) {
        known = true;
        // SAFETY: valid for this run; entries are replaced whole by updates.
        let (bound, tag) = unsafe { ((*v).backend, (*v).backend_identity) };
        if let Some(be) = TETHER_BACKENDS.get(bound)
            && identity_matches(tag, be)
            && usable(svc, be)
        {
            return Ok(Choice {
                id: bound,
                backend: be,
                event: Event::FlowHit,
            });
        }
    }
    let h = flow_hash(
        svc.index,
        &addr_bytes(&flow.src),
        flow.sport_be,
        flow.dport_be,
    );
    let (id, backend) = select::pick(svc, h, svc_stat)?;
    // ICMP errors and later fragments follow the table but never write it.
    if flow.is_own_packet() && (opens || known || flow.proto == PROTO_UDP) {
        let value = FlowValue {
            backend: id,
            backend_identity: backend.identity,
        };
        // A failed insert only means this flow is not tracked: it still goes by Maglev.
        let _ = TETHER_FLOWS.insert(key, value, BPF_ANY as u64);
    }
    Ok(Choice {
        id,
        backend,
        event: Event::None,
    })
}
