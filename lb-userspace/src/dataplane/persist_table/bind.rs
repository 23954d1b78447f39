//! Writing bindings another instance made (mirroring) and reading the live ones to share:
//! the only writes to the persistence tables from userspace besides flushes.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use lb_common::{
    BindingEvent, MAP_BINDINGS, MAP_PERSIST, PersistKey, PersistValue, PersistValue4,
    identity_tag16,
};

use super::{
    PersistError, PersistMap, Result, Table4, age, is_expired, is_not_found, monotonic_ns,
    open_pinned, walk,
};

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
    walk(pin_dir, |k, v, p, _| {
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

/// Writes bindings another instance made, keeping the tables open between writes (opening
/// the IPv4 table reads its layout back from the pins); reopens them after an error.
pub struct Binder {
    pin_dir: PathBuf,
    table4: Option<Table4>,
    table6: Option<PersistMap>,
}

impl Binder {
    pub fn new(pin_dir: &Path) -> Binder {
        Binder {
            pin_dir: pin_dir.to_owned(),
            table4: None,
            table6: None,
        }
    }

    /// Bind the client `addr_be` (IPv4-mapped for IPv4) of service `service_index` to
    /// backend slot `backend_id` (identity `identity`), last seen now, as the data path
    /// would have. A binding to the same backend is left as it is. Returns whether the
    /// table changed. After an error the tables are reopened and the write tried once more
    /// (a pin replaced under a running daemon).
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
        match self.try_bind(&key, backend_id, identity) {
            Ok(changed) => Ok(changed),
            Err(_) => {
                (self.table4, self.table6) = (None, None);
                let r = self.try_bind(&key, backend_id, identity);
                if r.is_err() {
                    (self.table4, self.table6) = (None, None);
                }
                r
            }
        }
    }

    fn try_bind(&mut self, key: &PersistKey, backend_id: u32, identity: u32) -> Result<bool> {
        let now = monotonic_ns()?;
        let same = |v: &PersistValue| {
            v.backend == backend_id
                && (v.backend_identity == identity
                    || v.backend_identity == identity_tag16(identity) as u32)
        };
        let value = PersistValue {
            backend: backend_id,
            backend_identity: identity,
            last_seen_ns: now,
        };
        let to_err = |(name, source)| PersistError::Map { name, source };
        match key.to_v4() {
            Some(k4) => {
                let table = match &mut self.table4 {
                    Some(t) => t,
                    None => self.table4.insert(Table4::open(&self.pin_dir)?),
                };
                match table.get(&k4) {
                    Ok(v) if same(&v.to_value(now)) => return Ok(false),
                    Ok(_) => {}
                    Err((_, e)) if is_not_found(&e) => {}
                    Err(e) => return Err(to_err(e)),
                }
                let v4 = PersistValue4::from_value(&value, now)
                    .ok_or(PersistError::BackendId(backend_id))?;
                table.insert(&k4, &v4, 0).map_err(to_err)?;
            }
            None => {
                let map = match &mut self.table6 {
                    Some(m) => m,
                    None => self.table6.insert(open_pinned(&self.pin_dir, MAP_PERSIST)?),
                };
                match map.get(key, 0) {
                    Ok(v) if same(&v) => return Ok(false),
                    Ok(_) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(to_err((MAP_PERSIST, e))),
                }
                map.insert(key, value, 0)
                    .map_err(|e| to_err((MAP_PERSIST, e)))?;
            }
        }
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
