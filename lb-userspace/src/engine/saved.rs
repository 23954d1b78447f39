//! The L7 tables outside the process: exported from an engine and imported into its
//! successor, across a reload (in memory) and a restart or crash (a snapshot file in
//! `state_dir`, written atomically every second and at shutdown).
//!
//! A table is carried over when the successor has a table with the same id: the method and
//! its key source (`client-ip`, `app-cookie:JSESSIONID`, `header:x-user`, `fallback`, ...).
//! Any other change of the profile (timeout, prefixes, policy, fallback settings, the pool's
//! algorithm) keeps the bindings. Entries keep their absolute last use (wall clock), so ages
//! survive a restart; entries of backends no longer in the pool are dropped on import.
//! A `kill -9` loses the bindings made or refreshed since the last write: about one second.

use std::{
    collections::HashSet,
    fs,
    io::Write,
    net::Ipv6Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::backend_identity;
use serde::{Deserialize, Serialize};

use super::{Engine, methods::TableRef, table::Table};
use crate::{balancer::masked_addr, config::Config, engine::methods::masks};

/// File name of the snapshot in `state_dir`.
pub const STATE_FILE: &str = "l7-tables.json";
/// What a daemon that handed over learned while it drained, for its successor to merge.
pub const DRAINED_FILE: &str = "l7-tables.drained.json";
const VERSION: u32 = 1;

/// The L7 tables of every service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub services: Vec<SavedEngine>,
}

/// The tables of one service's engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEngine {
    pub service: String,
    pub tables: Vec<SavedTable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTable {
    /// Which table: the method and its key source, or `fallback`.
    pub id: String,
    /// (key, backend identity, last use in Unix milliseconds), least recently used first.
    /// The key is a client address (16 bytes, IPv4-mapped) or a key digest, as a u128.
    pub entries: Vec<(u128, u32, u64)>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Engine {
    /// The engine's bindings with their wall-clock last use.
    pub fn export(&self) -> SavedEngine {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let last_use = |idle: Duration| unix_ms(wall.checked_sub(idle).unwrap_or(UNIX_EPOCH));
        let tables = self
            .tables()
            .into_iter()
            .map(|(_, id, t)| {
                let mut entries: Vec<(u128, u32, u64)> = match t {
                    TableRef::Clients { table, .. } => table
                        .entries(now)
                        .into_iter()
                        .map(|(k, b, idle, _, _)| (u128::from_be_bytes(k), b, last_use(idle)))
                        .collect(),
                    TableRef::Keys(table) => table
                        .entries(now)
                        .into_iter()
                        .map(|(k, b, idle, _, _)| (k, b, last_use(idle)))
                        .collect(),
                };
                entries.sort_by_key(|e| e.2);
                SavedTable { id, entries }
            })
            .collect();
        SavedEngine {
            service: self.service.clone(),
            tables,
        }
    }

    /// Take the bindings of `saved` into the tables with the same id, for backends still
    /// in the service's pool in `cfg`; entries idle past their table's timeout are left out.
    /// Returns how many were taken.
    pub fn import(&self, cfg: &Config, saved: &SavedEngine) -> usize {
        self.import_with(cfg, saved, false)
    }

    /// Like [`Engine::import`], but a key this engine already binds keeps its binding:
    /// what a predecessor learned while it drained only fills the gaps.
    pub fn merge(&self, cfg: &Config, saved: &SavedEngine) -> usize {
        self.import_with(cfg, saved, true)
    }

    fn import_with(&self, cfg: &Config, saved: &SavedEngine, only_absent: bool) -> usize {
        let Some(svc) = cfg.services.iter().find(|s| s.name == self.service) else {
            return 0;
        };
        let pool = &cfg.pools[svc.pool];
        let live: HashSet<u32> = pool
            .backends
            .iter()
            .map(|b| backend_identity(&pool.name, &b.name))
            .collect();
        let (now, wall) = (Instant::now(), unix_ms(SystemTime::now()));
        let mut taken = 0;
        for (_, id, t) in self.tables() {
            let Some(st) = saved.tables.iter().find(|s| s.id == id) else {
                continue;
            };
            for &(key, backend, last) in &st.entries {
                if !live.contains(&backend) {
                    continue;
                }
                let idle = Duration::from_millis(wall.saturating_sub(last));
                let Some(at) = now.checked_sub(idle) else {
                    continue;
                };
                let kept = match &t {
                    TableRef::Clients {
                        table,
                        ipv4_prefix,
                        ipv6_prefix,
                    } => {
                        // Masked again: the prefixes may have changed.
                        let (v4, v6) = masks(*ipv4_prefix, *ipv6_prefix);
                        let ip = Ipv6Addr::from(key.to_be_bytes()).to_canonical();
                        idle <= table.timeout()
                            && put(table, masked_addr(ip, &v4, &v6), backend, at, only_absent)
                    }
                    TableRef::Keys(table) => {
                        idle <= table.timeout() && put(table, key, backend, at, only_absent)
                    }
                };
                taken += usize::from(kept);
            }
        }
        taken
    }
}

/// Binds `k` in `table`, or with `only_absent` only when it has no binding; whether it did.
fn put<K: std::hash::Hash + Eq + Clone>(
    table: &Table<K>,
    k: K,
    backend: u32,
    at: Instant,
    only_absent: bool,
) -> bool {
    if only_absent {
        table.insert_absent(k, backend, at)
    } else {
        table.insert(k, backend, at);
        true
    }
}

/// Write `state` to `dir/STATE_FILE` atomically: a temporary file, synced, renamed over the
/// old one, and the directory synced (a crash leaves the old snapshot or the new one).
pub fn write(dir: &Path, state: &SavedState) -> std::io::Result<()> {
    write_file(dir, STATE_FILE, state)
}

/// [`write`] to `dir/name`.
pub fn write_file(dir: &Path, name: &str, state: &SavedState) -> std::io::Result<()> {
    crate::cookie::keyfile::ensure_dir(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let body = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()
}

/// The snapshot in `dir`, if there is a readable one of this version.
pub fn read(dir: &Path) -> Result<Option<SavedState>, String> {
    read_file(dir, STATE_FILE)
}

/// [`read`] from `dir/name`.
pub fn read_file(dir: &Path, name: &str) -> Result<Option<SavedState>, String> {
    let path: PathBuf = dir.join(name);
    let body = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let state: SavedState = serde_json::from_slice(&body)
        .map_err(|e| format!("{}: not an L7 tables snapshot: {e}", path.display()))?;
    if state.version != VERSION {
        return Err(format!(
            "{}: version {}, this tether reads {VERSION}",
            path.display(),
            state.version
        ));
    }
    Ok(Some(state))
}

/// The snapshot of `engines`.
pub fn collect<'a>(engines: impl IntoIterator<Item = &'a Engine>) -> SavedState {
    SavedState {
        version: VERSION,
        services: engines.into_iter().map(Engine::export).collect(),
    }
}
