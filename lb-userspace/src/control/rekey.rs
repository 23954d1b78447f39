//! Which L4 services' kernel persistence entries a change of config invalidates: those whose
//! key changes (their prefixes, or persistence turned off). Their entries no longer mean what
//! they meant, and would pin again were the old key restored.

use std::path::Path;

use crate::{
    balancer::Ids,
    config::{Config, ServiceMode, VirtualService},
    dataplane::persist_table,
};

/// What keys an L4 service's kernel persistence entries: `None` without persistence, else
/// the prefixes client addresses are masked to.
fn l4_persist_key(cfg: &Config, svc: &VirtualService) -> Option<(u8, u8)> {
    if !matches!(svc.mode, ServiceMode::L4Dsr) {
        return None;
    }
    cfg.profile(svc)
        .filter(|p| p.timeout_s > 0)
        .map(|p| (p.ipv4_prefix, p.ipv6_prefix))
}

/// Kernel indexes of the L4 services that stay (same index) but whose persistence key
/// changes from one that stored entries: persistence turned off, or other prefixes. A
/// timeout or policy change keeps the entries (they are read with the new values).
pub(super) fn rekeyed_l4(old: &Config, old_ids: &Ids, new: &Config, new_ids: &Ids) -> Vec<u32> {
    new.services
        .iter()
        .zip(&new_ids.services)
        .filter_map(|(svc, &index)| {
            let was = old_ids.services.iter().position(|&i| i == index)?;
            let before = l4_persist_key(old, &old.services[was])?;
            (l4_persist_key(new, svc) != Some(before)).then_some(index)
        })
        .collect()
}

/// Delete the kernel entries of the services at these indexes. A failure is logged: what runs
/// is already right, stale entries only waste room until they expire.
pub(super) fn flush(pin_dir: &Path, services: &[u32]) {
    for &index in services {
        let f = persist_table::Filter {
            service_index: Some(index),
            client: None,
            backend_id: None,
        };
        match tokio::task::block_in_place(|| persist_table::flush(pin_dir, &f)) {
            Ok(n) => {
                log::info!("service index {index}: persistence key changed, {n} entries flushed")
            }
            Err(e) => log::warn!("flushing the entries of service index {index}: {e}"),
        }
    }
}
