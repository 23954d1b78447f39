//! The XDP source-IP table in the mirror: new bindings come from the data path's ring
//! buffer (`MAP_BINDINGS`), drained in batches by a thread of their own; other instances'
//! bindings are written into the pinned table through `dataplane::persist_table`.
//!
//! Instances agree on services and backends by name (backend identity), not by kernel slot:
//! each instance maps them to its own service index and backend id.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::{BINDING_PREVIOUS_TAG16, backend_identity, identity_tag16};
use tokio::sync::mpsc;

use super::{Event, MirrorStats, XdpBinding, XdpTarget, codec, offer};
use crate::{
    config::ServiceMode,
    dataplane::persist_table::{self, Binder, BindingEvents},
    state::{SharedSnapshot, Snapshot},
};

/// How often the ring buffer is drained, and how much at most per round.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
const DRAIN_BATCH: usize = 4096;

pub struct XdpMirror {
    pin_dir: PathBuf,
    shared: SharedSnapshot,
    /// Writes to the kernel tables one at a time, through tables opened once.
    writing: Mutex<Binder>,
    stop: Arc<AtomicBool>,
}

impl XdpMirror {
    pub fn new(pin_dir: PathBuf, shared: SharedSnapshot) -> Arc<XdpMirror> {
        Arc::new(XdpMirror {
            writing: Mutex::new(Binder::new(&pin_dir)),
            pin_dir,
            shared,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Start the ring buffer's reader: bindings the data path writes are queued to `tx`.
    pub fn start_reader(&self, tx: mpsc::Sender<Event>, stats: Arc<MirrorStats>) {
        let (pin_dir, shared, stop) =
            (self.pin_dir.clone(), self.shared.clone(), self.stop.clone());
        let spawned = std::thread::Builder::new()
            .name("mirror-xdp".into())
            .spawn(move || {
                let mut ring: Option<BindingEvents> = None;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(DRAIN_EVERY);
                    let r = match &mut ring {
                        Some(r) => r,
                        None => match BindingEvents::open(&pin_dir) {
                            Ok(r) => ring.insert(r),
                            Err(e) => {
                                log::debug!("mirroring: XDP binding events: {e}");
                                continue;
                            }
                        },
                    };
                    loop {
                        let batch = r.drain(DRAIN_BATCH);
                        if batch.is_empty() {
                            break;
                        }
                        let snap = shared.load();
                        stats
                            .xdp_events
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        for ev in batch {
                            if let Some((service, ttl_ms)) = l4_service(&snap, ev.service) {
                                // IPv4 bindings keep 16 bits of the identity they replace.
                                let previous = match ev.previous_identity {
                                    0 => None,
                                    p if ev.flags & BINDING_PREVIOUS_TAG16 != 0 => {
                                        identity_of_tag(&snap, ev.service, p)
                                    }
                                    p => Some(p),
                                };
                                offer(
                                    &tx,
                                    &stats,
                                    Event {
                                        service: service.into(),
                                        table: codec::XDP_TABLE.into(),
                                        key: u128::from_be_bytes(ev.addr_be),
                                        backend: ev.backend_identity,
                                        previous,
                                        ttl_ms,
                                        at: Instant::now(),
                                    },
                                );
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("mirroring: starting the XDP event reader: {e}");
        }
    }
}

impl Drop for XdpMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The name and persistence timeout (ms) of the L4 service with kernel index `index`.
fn l4_service(snap: &Snapshot, index: u32) -> Option<(&str, u64)> {
    let i = snap.service_index.iter().position(|&x| x == index)?;
    let svc = &snap.config.services[i];
    if !matches!(svc.mode, ServiceMode::L4Dsr) {
        return None;
    }
    let timeout_s = snap.config.profile(svc)?.timeout_s;
    Some((&svc.name, u64::from(timeout_s) * 1000))
}

/// The identity of the backend in kernel slot `id`.
fn identity_of_slot(snap: &Snapshot, id: u32) -> Option<u32> {
    for (p, ids) in snap.backend_ids.iter().enumerate() {
        if let Some(b) = ids.iter().position(|&x| x == id) {
            let pool = &snap.config.pools[p];
            return Some(backend_identity(&pool.name, &pool.backends[b].name));
        }
    }
    None
}

/// The identity whose 16-bit tag is `tag` among the backends of the L4 service with kernel
/// index `index`.
fn identity_of_tag(snap: &Snapshot, index: u32, tag: u32) -> Option<u32> {
    let i = snap.service_index.iter().position(|&x| x == index)?;
    let pool = &snap.config.pools[snap.config.services[i].pool];
    pool.backends
        .iter()
        .map(|b| backend_identity(&pool.name, &b.name))
        .find(|&id| u32::from(identity_tag16(id)) == tag)
}

impl XdpTarget for XdpMirror {
    fn apply(&self, service: &str, key: u128, identity: u32) -> bool {
        let snap = self.shared.load();
        let cfg = &snap.config;
        let Some(i) = cfg
            .services
            .iter()
            .position(|s| s.name == service && matches!(s.mode, ServiceMode::L4Dsr))
        else {
            return false;
        };
        let svc = &cfg.services[i];
        let pool = &cfg.pools[svc.pool];
        let Some(b) = pool
            .backends
            .iter()
            .position(|b| backend_identity(&pool.name, &b.name) == identity)
        else {
            return false;
        };
        let (Some(&index), Some(&id)) = (
            snap.service_index.get(i),
            snap.backend_ids.get(svc.pool).and_then(|ids| ids.get(b)),
        ) else {
            return false;
        };
        let mut binder = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        match binder.bind(index, key.to_be_bytes(), id, identity) {
            Ok(changed) => changed,
            Err(e) => {
                log::warn!("mirroring: writing an XDP binding: {e}");
                false
            }
        }
    }

    fn live(&self) -> Vec<XdpBinding> {
        let snap = self.shared.load();
        match persist_table::live_bindings(&self.pin_dir) {
            Ok(v) => v
                .into_iter()
                .filter_map(|b| {
                    let (name, _) = l4_service(&snap, b.service_index)?;
                    // The slot's backend, if it is the one the binding was made for (IPv4
                    // bindings keep 16 bits of its identity).
                    let identity = identity_of_slot(&snap, b.backend_id)?;
                    if b.backend_identity != identity
                        && b.backend_identity != u32::from(identity_tag16(identity))
                    {
                        return None;
                    }
                    Some(XdpBinding {
                        service: name.to_string(),
                        key: u128::from_be_bytes(b.addr_be),
                        backend: identity,
                        ttl_ms: b.timeout.as_millis() as u64,
                        age: b.age,
                    })
                })
                .collect(),
            Err(e) => {
                log::warn!("mirroring: reading the persistence table: {e}");
                Vec::new()
            }
        }
    }
}
