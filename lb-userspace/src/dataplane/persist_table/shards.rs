//! The IPv4 table as pinned shards (`MAP_PERSIST4_SHARDS`): how many are in use, and the map
//! each key lives in (`PersistKey4::shard`, the function the XDP program uses).
//!
//! The layout of a running install is read back from its pins: shard 0 is `MAP_PERSIST4`;
//! the shards in use after it have its size, unused ones the kernel's smallest (one entry
//! rounded up to the possible CPUs by `BPF_F_NO_COMMON_LRU`).

use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData, MapError, MapInfo};
use lb_common::{MAP_PERSIST4_SHARDS, Persist4Layout, PersistKey4, PersistValue4};

use super::{PersistError, Result, open_pinned};

pub type PersistMap4 = BpfHashMap<MapData, PersistKey4, PersistValue4>;

/// The layout that pinned shard sizes (`max_entries`, `None`: no pin) describe: `None` when
/// shard 0 is not pinned. `unused` is the size the kernel gives a shard created with one
/// entry; a table whose shard 0 is no larger is one table.
pub fn layout_from_sizes(sizes: &[Option<u32>], unused: u32) -> Option<Persist4Layout> {
    let s0 = (*sizes.first()?)?;
    let mut shards = 1;
    if s0 > unused {
        shards += sizes[1..].iter().take_while(|s| **s == Some(s0)).count() as u32;
    }
    Some(Persist4Layout {
        shards,
        shard_entries: s0,
    })
}

/// The size the kernel gives a per-CPU-LRU hash created with one entry.
fn unused_shard_entries() -> u32 {
    crate::dataplane::possible_cpus().max(1)
}

/// The layout of the shards pinned in `pin_dir`, if `MAP_PERSIST4` is pinned (an earlier
/// build's single table is one shard of its size). Sizes are as the kernel created them
/// (`Persist4Layout::as_created`). Probes stop at the first shard that is not in use.
pub fn pinned_layout(pin_dir: &Path) -> Option<Persist4Layout> {
    let size = |i: usize| {
        MapInfo::from_pin(pin_dir.join(MAP_PERSIST4_SHARDS[i]))
            .ok()
            .map(|m| m.max_entries())
    };
    let s0 = size(0)?;
    let mut sizes = vec![Some(s0)];
    if s0 > unused_shard_entries() {
        for i in 1..MAP_PERSIST4_SHARDS.len() {
            let s = size(i);
            sizes.push(s);
            if s != Some(s0) {
                break;
            }
        }
    }
    layout_from_sizes(&sizes, unused_shard_entries())
}

/// The layout a load uses: the pinned one (a table keeps its size across restarts, so no
/// client moves shard), else the one for the configured `entries`.
pub fn load_layout(pin_dir: &Path, entries: u32) -> Persist4Layout {
    pinned_layout(pin_dir).unwrap_or(Persist4Layout::for_entries(entries))
}

/// The pinned shards in use, opened. Open it once where bindings are written repeatedly:
/// opening reads the layout back from the pins (a few syscalls per shard).
pub struct Table4 {
    shards: Vec<PersistMap4>,
}

fn err(i: usize) -> impl Fn(MapError) -> PersistError {
    move |source| PersistError::Map {
        name: MAP_PERSIST4_SHARDS[i],
        source,
    }
}

impl Table4 {
    pub fn open(pin_dir: &Path) -> Result<Table4> {
        let n = pinned_layout(pin_dir).map_or(1, |l| l.shards) as usize;
        let shards = MAP_PERSIST4_SHARDS[..n]
            .iter()
            .map(|name| open_pinned(pin_dir, name))
            .collect::<Result<_>>()?;
        Ok(Table4 { shards })
    }

    /// Delete `key` from shard `shard` (where a walk found it); `Ok(false)` if it is not
    /// there (evicted or deleted since).
    pub fn remove_in(
        &mut self,
        shard: usize,
        key: &PersistKey4,
    ) -> std::result::Result<bool, (&'static str, MapError)> {
        let Some(map) = self.shards.get_mut(shard) else {
            return Ok(false);
        };
        match map.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if super::is_not_found(&e) => Ok(false),
            Err(e) => Err((MAP_PERSIST4_SHARDS[shard], e)),
        }
    }

    /// Shards in use.
    pub fn shards(&self) -> u32 {
        self.shards.len() as u32
    }

    /// Index of the shard of `key`.
    pub fn shard_of(&self, key: &PersistKey4) -> usize {
        key.shard(self.shards()) as usize
    }

    /// The binding under `key` (`MapError::KeyNotFound` if none), with the shard's name.
    pub fn get(
        &self,
        key: &PersistKey4,
    ) -> std::result::Result<PersistValue4, (&'static str, MapError)> {
        let i = self.shard_of(key);
        self.shards[i]
            .get(key, 0)
            .map_err(|e| (MAP_PERSIST4_SHARDS[i], e))
    }

    /// Write `key` into its shard (`flags`: `BPF_ANY` 0, `BPF_NOEXIST` 1).
    pub fn insert(
        &mut self,
        key: &PersistKey4,
        value: &PersistValue4,
        flags: u64,
    ) -> std::result::Result<(), (&'static str, MapError)> {
        let i = self.shard_of(key);
        self.shards[i]
            .insert(key, value, flags)
            .map_err(|e| (MAP_PERSIST4_SHARDS[i], e))
    }

    /// Delete `key` from its shard.
    pub fn remove(
        &mut self,
        key: &PersistKey4,
    ) -> std::result::Result<(), (&'static str, MapError)> {
        let i = self.shard_of(key);
        self.shards[i]
            .remove(key)
            .map_err(|e| (MAP_PERSIST4_SHARDS[i], e))
    }

    /// Visit every entry of every shard with its shard's index, each walk bounded by its
    /// shard's capacity (see the module note of `persist_table` on walks under churn).
    pub fn for_each(
        &self,
        mut visit: impl FnMut(usize, &PersistKey4, &PersistValue4),
    ) -> Result<()> {
        for (i, map) in self.shards.iter().enumerate() {
            let err = err(i);
            let capacity = map.map().info().map_err(&err)?.max_entries() as usize;
            for key in map.keys().take(capacity.max(1)) {
                let key = key.map_err(&err)?;
                match map.get(&key, 0) {
                    Ok(v) => visit(i, &key, &v),
                    // Evicted or flushed since get_next_key returned it.
                    Err(e) if super::is_not_found(&e) => continue,
                    Err(e) => return Err(err(e)),
                }
            }
        }
        Ok(())
    }
}
