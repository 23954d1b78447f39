//! Backend selection: a hash picks an entry of the service's live Maglev table; a bound
//! backend is kept while it is usable. Shared by `persist` and `conntrack`.

use lb_common::{
    BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP, Backend, DOWN_POLICY_NEVER, MAGLEV_SLOTS,
    NO_BACKEND, Service, TrafficCounters, maglev_index, reason,
};

use crate::{
    Verdict,
    maps::{TETHER_BACKENDS, TETHER_MAGLEV},
    stats::Event,
    verdict,
};

/// The backend a packet goes to, and what happened to the client's binding.
pub struct Choice {
    pub id: u32,
    pub backend: &'static Backend,
    pub event: Event,
}

/// Whether a client (or flow) bound to `be` keeps going there.
#[inline(always)]
pub fn usable(svc: &Service, be: &Backend) -> bool {
    let st = be.state;
    st == BACKEND_UP
        || st == BACKEND_DRAINING
        || (st != BACKEND_UNUSED && svc.down_policy == DOWN_POLICY_NEVER)
}

/// Backend id and its slot for `hash` in the live table of `svc`. An empty pool drops the
/// packet (and counts `no_backend` on the service); a table entry naming a slot outside the
/// backend array, or a service index outside the tables, is inconsistent state: aborted.
#[inline(always)]
pub fn pick(
    svc: &Service,
    hash: u32,
    svc_stat: &mut TrafficCounters,
) -> Result<(u32, &'static Backend), Verdict> {
    let slot = svc.maglev_slot & (MAGLEV_SLOTS - 1);
    let idx = maglev_index(svc.index, slot, hash);
    let id = *TETHER_MAGLEV.get(idx).ok_or(verdict::ABORTED)?;
    if id == NO_BACKEND {
        svc_stat.no_backend += 1;
        return Err(verdict::drop(reason::DROP_NO_BACKEND));
    }
    let be = TETHER_BACKENDS.get(id).ok_or(verdict::ABORTED)?;
    Ok((id, be))
}
