//! Writing bindings another instance made (mirroring) and reading the live ones to share:
//! the only writes to the persistence table from userspace besides flushes.

use std::{collections::HashSet, path::Path, time::Duration};

use aya::maps::{MapData, MapError, RingBuf};
use lb_common::{BindingEvent, MAP_BINDINGS, MAP_PERSIST, PersistKey, PersistValue};

use super::{PersistError, PersistMap, Result, age, is_expired, monotonic_ns, open_persist, walk};

/// A live binding, as another instance takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub service_index: u32,
    /// The stored (masked) client address, IPv4-mapped.
    pub addr_be: [u8; 16],
    pub backend_identity: u32,
    /// The service's persistence timeout.
    pub timeout: Duration,
    /// Since the data path last refreshed it.
    pub age: Duration,
}

/// Every live (non-expired) binding.
pub fn live_bindings(pin_dir: &Path) -> Result<Vec<Binding>> {
    let now = monotonic_ns()?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    walk(pin_dir, |k, v, p| {
        let a = age(now, v.last_seen_ns);
        if !is_expired(a, p) && seen.insert(*k) {
            out.push(Binding {
                service_index: k.service,
                addr_be: k.addr_be,
                backend_identity: v.backend_identity,
                timeout: Duration::from_nanos(p.timeout_ns),
                age: a,
            });
        }
    })?;
    Ok(out)
}

/// Writes bindings into the pinned table, keeping it open.
pub struct Writer {
    map: PersistMap,
}

impl Writer {
    pub fn open(pin_dir: &Path) -> Result<Writer> {
        Ok(Writer {
            map: open_persist(pin_dir)?,
        })
    }

    /// Bind the client `addr_be` of service `service_index` to backend slot `backend_id`
    /// (identity `identity`), last seen now, as the data path would have. A binding to the
    /// same identity is left as it is. Returns whether the table changed.
    pub fn bind(
        &mut self,
        service_index: u32,
        addr_be: [u8; 16],
        backend_id: u32,
        identity: u32,
    ) -> Result<bool> {
        let key = PersistKey {
            service: service_index,
            addr_be,
        };
        let err = |source| PersistError::Map {
            name: MAP_PERSIST,
            source,
        };
        match self.map.get(&key, 0) {
            Ok(v) if v.backend_identity == identity && v.backend == backend_id => {
                return Ok(false);
            }
            Ok(_) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
        let value = PersistValue {
            backend: backend_id,
            backend_identity: identity,
            last_seen_ns: monotonic_ns()?,
        };
        self.map.insert(key, value, 0).map_err(err)?;
        Ok(true)
    }
}

/// The ring buffer of bindings the data path wrote (`MAP_BINDINGS`).
pub struct BindingEvents {
    ring: RingBuf<MapData>,
}

impl BindingEvents {
    pub fn open(pin_dir: &Path) -> Result<BindingEvents> {
        Ok(BindingEvents {
            ring: super::open_pinned(pin_dir, MAP_BINDINGS)?,
        })
    }

    /// Up to `max` events, oldest first.
    pub fn drain(&mut self, max: usize) -> Vec<BindingEvent> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.ring.next() else { break };
            if item.len() >= size_of::<BindingEvent>() {
                // SAFETY: the kernel wrote a whole BindingEvent (repr(C), any bit pattern is
                // valid); the read is unaligned-safe.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<BindingEvent>()) });
            }
        }
        out
    }
}
