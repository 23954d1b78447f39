//! Writing bindings another instance made (mirroring) and reading the live ones to share:
//! the only writes to the persistence tables from userspace besides flushes.

use std::{collections::HashSet, path::Path, time::Duration};

use aya::maps::{MapData, RingBuf};
use lb_common::{BindingEvent, MAP_BINDINGS, PersistKey, PersistValue, identity_tag16};

use super::{Result, age, get, insert, is_expired, monotonic_ns, walk};

/// A live binding, as another instance takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub service_index: u32,
    /// The stored (masked) client address, IPv4-mapped.
    pub addr_be: [u8; 16],
    /// The backend slot it names.
    pub backend_id: u32,
    /// The identity it was made for: whole for IPv6 clients, its 16-bit tag
    /// (`identity_tag16`) for IPv4 ones.
    pub backend_identity: u32,
    /// The service's persistence timeout.
    pub timeout: Duration,
    /// Since the data path last refreshed it.
    pub age: Duration,
}

/// Every live binding of both tables.
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
                backend_id: v.backend,
                backend_identity: v.backend_identity,
                timeout: Duration::from_nanos(p.timeout_ns),
                age: a,
            });
        }
    })?;
    Ok(out)
}

/// Bind the client `addr_be` (IPv4-mapped for IPv4) of service `service_index` to backend
/// slot `backend_id` (identity `identity`), last seen now, as the data path would have. A
/// binding to the same backend is left as it is. Returns whether the table changed.
pub fn bind(
    pin_dir: &Path,
    service_index: u32,
    addr_be: [u8; 16],
    backend_id: u32,
    identity: u32,
) -> Result<bool> {
    let key = PersistKey {
        service: service_index,
        addr_be,
    };
    if let Some(v) = get(pin_dir, &key)?
        && v.backend == backend_id
        && (v.backend_identity == identity || v.backend_identity == identity_tag16(identity) as u32)
    {
        return Ok(false);
    }
    let value = PersistValue {
        backend: backend_id,
        backend_identity: identity,
        last_seen_ns: monotonic_ns()?,
    };
    insert(pin_dir, &key, &value)?;
    Ok(true)
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
