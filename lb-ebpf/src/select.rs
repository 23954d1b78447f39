//! Backend selection: a hash picks an entry of the service's live Maglev table.

use lb_common::{
    Backend, MAGLEV_SLOTS, NO_BACKEND, Service, TrafficCounters, maglev_index, reason,
};

use crate::{
    Verdict,
    maps::{TETHER_BACKENDS, TETHER_MAGLEV},
    verdict,
};

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
