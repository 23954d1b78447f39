//! Loading, pinning and attaching the XDP program, and writing its maps.
//!
//! Maps are pinned by name under the configured directory and reused by the next load, so
//! a restart keeps the persistence table and counters. Maglev tables are double-buffered:
//! the slot the program is not reading is written in full before the service entry flips
//! to it.

pub mod batch;
pub mod bpffs;
pub mod net;
pub mod persist_table;
pub mod veth;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, MapError},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    ALL_MAPS, BACKEND_UP, BINDINGS_RING_BYTES, Backend, ClockCache, FLOW_DEFAULT_ENTRIES,
    FRAG_ENTRIES, FlowKey, FlowValue, FragKey, FragValue, GLOBAL_PERSIST4_SHARDS, Globals,
    MAGLEV_ENTRIES, MAGLEV_SLOTS, MAGLEV_TABLE_SIZE, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_BINDINGS,
    MAP_CLOCK, MAP_EVENTS, MAP_FLOWS, MAP_FRAGS, MAP_GLOBALS, MAP_MAGLEV, MAP_PERSIST,
    MAP_PERSIST4, MAP_PERSIST4_SHARDS, MAP_RATE, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES,
    MAP_SERVICES4, MAP_SVC_CACHE, MAP_SVC_GEN, MAP_TX_PORTS, MAX_BACKENDS, MAX_SERVICES,
    MAX_TX_PORTS, PERSIST4_MAX_SHARDS, PROG_XDP, Persist4Layout, PersistKey, PersistKey4,
    PersistValue, PersistValue4, RateWindow, SVC_CACHE_SLOTS, Service, ServiceCache4, ServiceKey,
    ServiceKey4, TrafficCounters, event, maglev_index, reason,
};

use crate::{balancer::Plan, config};

/// The XDP object built from lb-ebpf by build.rs (aligned for the ELF parser).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tether"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("preparing pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("XDP link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("map TETHER_TX_PORTS: {0}")]
    TxPort(aya::maps::xdp::XdpMapError),
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error(transparent)]
    Persist(#[from] persist_table::PersistError),
    #[error("attaching XDP to {iface}: {reason}")]
    Mode { iface: String, reason: String },
    #[error(
        "the IPv4 persistence table's pins in {} ({}, TETHER_PERS4_*) describe the layout {found:?} but the XDP program was given {given:?}: remove all of them (or run `tether stop --detach`) and start again",
        pin_dir.display(),
        lb_common::MAP_PERSIST4
    )]
    ShardLayout {
        pin_dir: PathBuf,
        given: Persist4Layout,
        found: Option<Persist4Layout>,
    },
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

pub use crate::balancer::{new_binding_cap, possible_cpus};

/// The layout of IPv4 persistence shard `i` (every shard has the same key and value).
const fn persist4_shard(i: usize) -> (&'static str, usize, usize, Option<u32>) {
    (
        MAP_PERSIST4_SHARDS[i],
        size_of::<PersistKey4>(),
        size_of::<PersistValue4>(),
        None,
    )
}

/// (name, key size, value size, max entries) of every map, as this build's XDP object
/// defines it; `None` max entries: set at load (the persistence tables).
pub const MAP_LAYOUTS: [(&str, usize, usize, Option<u32>); 26] = {
    use core::mem::size_of;
    [
        (
            MAP_SERVICES,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            Some(MAX_SERVICES),
        ),
        (
            MAP_SERVICES4,
            size_of::<ServiceKey4>(),
            size_of::<Service>(),
            Some(MAX_SERVICES),
        ),
        (
            MAP_SVC_CACHE,
            4,
            size_of::<ServiceCache4>(),
            Some(SVC_CACHE_SLOTS),
        ),
        (MAP_SVC_GEN, 4, 8, Some(1)),
        (MAP_BACKENDS, 4, size_of::<Backend>(), Some(MAX_BACKENDS)),
        (MAP_MAGLEV, 4, 4, Some(MAGLEV_ENTRIES)),
        (
            MAP_PERSIST,
            size_of::<PersistKey>(),
            size_of::<PersistValue>(),
            None,
        ),
        persist4_shard(0),
        persist4_shard(1),
        persist4_shard(2),
        persist4_shard(3),
        persist4_shard(4),
        persist4_shard(5),
        persist4_shard(6),
        persist4_shard(7),
        // Devmap values are struct bpf_devmap_val (ifindex + program fd/id).
        (MAP_TX_PORTS, 4, 8, Some(MAX_TX_PORTS)),
        (
            MAP_SERVICE_STATS,
            4,
            size_of::<TrafficCounters>(),
            Some(MAX_SERVICES),
        ),
        (
            MAP_BACKEND_STATS,
            4,
            size_of::<TrafficCounters>(),
            Some(MAX_BACKENDS),
        ),
        (MAP_REASONS, 4, 8, Some(reason::SLOTS)),
        (MAP_EVENTS, 4, 8, Some(event::SLOTS)),
        (MAP_GLOBALS, 4, size_of::<Globals>(), Some(1)),
        (MAP_RATE, 4, size_of::<RateWindow>(), Some(1)),
        (
            MAP_FRAGS,
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            Some(FRAG_ENTRIES),
        ),
        (
            MAP_FLOWS,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            Some(FLOW_DEFAULT_ENTRIES),
        ),
        // A ring buffer has no key or value size; its size in bytes is its max entries.
        (MAP_BINDINGS, 0, 0, Some(BINDINGS_RING_BYTES)),
        (MAP_CLOCK, 4, size_of::<ClockCache>(), Some(1)),
    ]
};

/// Remove pins of maps whose layout differs from this build's (a pin left by an older
/// tether): the loader would reuse them and the program would not verify, or would index
/// past their end. Their contents are lost; a persistence table of the old layout could not
/// be read by the new program anyway.
fn drop_incompatible_pins(pin_dir: &Path) {
    for (name, key, value, max) in MAP_LAYOUTS {
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if (found.0, found.1) != (key, value) || max.is_some_and(|m| m != found.2) {
            match std::fs::remove_file(&path) {
                Ok(()) => log::warn!(
                    "pinned map {name} has key/value/entries {found:?}, this build needs ({key}, {value}, {}): replaced it (its contents are lost)",
                    max.map_or("any".into(), |m| m.to_string())
                ),
                Err(e) => log::warn!("pinned map {name} has an old layout; removing it: {e}"),
            }
        }
    }
}

/// Remove the pins of IPv4 shards 1.. when shard 0 (`MAP_PERSIST4`) is not pinned: the
/// table is then created anew from the config, and the loader would reuse a leftover shard
/// whatever its size (an operator removed only `MAP_PERSIST4` to resize, or a first load died
/// after pinning some shards), so userspace would read another layout back than the program
/// was given. A table without its shard 0 has lost that shard's bindings anyway.
fn remove_stale_shard_pins(pin_dir: &Path) {
    for name in &MAP_PERSIST4_SHARDS[1..] {
        let path = pin_dir.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => log::warn!(
                "{MAP_PERSIST4} is not pinned but {name} is: removed {} (its bindings are lost) so the IPv4 table is created whole from the config",
                path.display()
            ),
            Err(e) => log::warn!("removing the stale pin {}: {e}", path.display()),
        }
    }
}

/// Add `n` to the count of bindings the daemon deleted (`event::USER_DELETED`, CPU 0's slot),
/// from which `tether status` estimates LRU evictions. Best effort: a failure only skews that
/// estimate.
pub fn note_deleted(pin_dir: &Path, n: u64) {
    if n == 0 {
        return;
    }
    let r = (|| -> std::result::Result<(), MapError> {
        let md = MapData::from_pin(pin_dir.join(MAP_EVENTS))?;
        let mut m: aya::maps::PerCpuArray<MapData, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::from_map_data(md)?)?;
        let mut v: Vec<u64> = m.get(&event::USER_DELETED, 0)?.to_vec();
        if let Some(first) = v.first_mut() {
            *first += n;
        }
        let v = aya::maps::PerCpuValues::try_from(v).map_err(MapError::from)?;
        m.set(event::USER_DELETED, v, 0)
    })();
    if let Err(e) = r {
        log::debug!("counting {n} deleted bindings: {e}");
    }
}

/// The mode an attach ended up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
}

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// The table each service's live slot holds, as this process wrote it: unchanged
    /// tables are not rewritten (65537 map updates each).
    live_tables: std::collections::HashMap<ServiceKey, (u32, Vec<u32>)>,
}

/// What the kernel maps held when the daemon (re)started: lets ids and states carry over.
#[derive(Debug, Clone, Default)]
pub struct KernelState {
    pub previous: crate::balancer::Previous,
    /// (identity, kernel state) of every used backend slot.
    pub backend_states: Vec<(u32, u32)>,
}

/// A loader that pins every map by name under `pin_dir`: an existing pin is opened and
/// reused (the table and counters survive a restart), a missing one is created and pinned.
/// The IPv6 table gets `persist_entries` entries when it is created; the IPv4 table is split
/// as its pinned shards are, or else as `Persist4Layout::for_entries(persist_entries)` says
/// (`persist_table::load_layout`), and the program is told the shard count.
pub fn pinned_loader(pin_dir: &Path, persist_entries: u32) -> EbpfLoader<'static> {
    let layout = persist_table::load_layout(pin_dir, persist_entries);
    loader_with_layout(pin_dir, persist_entries, layout)
}

/// [`pinned_loader`] with the IPv4 table's layout chosen by the caller.
fn loader_with_layout(
    pin_dir: &Path,
    persist_entries: u32,
    layout: Persist4Layout,
) -> EbpfLoader<'static> {
    /// `override_global` borrows its value for the loader's lifetime.
    static SHARD_COUNTS: [u32; PERSIST4_MAX_SHARDS as usize + 1] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(MAP_PERSIST, persist_entries);
    for (i, name) in MAP_PERSIST4_SHARDS.into_iter().enumerate() {
        let used = (i as u32) < layout.shards;
        loader.map_max_entries(name, if used { layout.shard_entries } else { 1 });
    }
    loader.override_global(
        GLOBAL_PERSIST4_SHARDS,
        &SHARD_COUNTS[layout.shards as usize],
        true,
    );
    for name in ALL_MAPS {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    loader
}

/// Pin of the XDP link of `iface`: while it exists the program stays attached, also with no
/// daemon running, and a new daemon replaces the program on it atomically.
pub fn link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("link_{iface}"))
}

/// The XDP mode the kernel reports for `iface` (`ip -d -j link`: 1 driver, 2 generic).
pub fn attached_mode(iface: &str) -> Option<Attached> {
    let out = std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", iface])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    match v.get(0)?.get("xdp")?.get("mode")?.as_u64()? {
        1 => Some(Attached::Native),
        2 => Some(Attached::Generic),
        _ => None,
    }
}

/// Remove everything tether left in the kernel under `pin_dir`: link pins (which detaches
/// XDP from its interfaces), the program pin and every map (the persistence table included).
/// Returns the names removed. A pin directory that fails the checks of
/// [`bpffs::prepare_pin_dir`] (a symbolic link, say) is left alone.
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    if std::fs::symlink_metadata(pin_dir).is_err() {
        return Ok(removed);
    }
    bpffs::prepare_pin_dir(pin_dir).map_err(std::io::Error::other)?;
    let entries = std::fs::read_dir(pin_dir)?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Links first: traffic stops being balanced before the tables it reads disappear.
    names.sort_by_key(|n| (!n.starts_with("link_"), n.clone()));
    for n in names {
        std::fs::remove_file(pin_dir.join(&n))?;
        removed.push(n);
    }
    std::fs::remove_dir(pin_dir)?;
    Ok(removed)
}

impl Dataplane {
    /// Load the object, reusing maps already pinned under `pin_dir` (persistence survives
    /// restarts) and pinning the ones it creates.
    pub fn load(pin_dir: &Path, persist_entries: u32) -> Result<Self> {
        bpffs::prepare_pin_dir(pin_dir)?;
        drop_incompatible_pins(pin_dir);
        let cpus = possible_cpus();
        let persist_pin = pin_dir.join(MAP_PERSIST);
        // The kernel rounds a per-CPU LRU's size up to a multiple of the possible CPUs.
        if let Ok(info) = aya::maps::MapInfo::from_pin(&persist_pin)
            && Some(info.max_entries()) != persist_entries.max(1).checked_next_multiple_of(cpus)
        {
            log::warn!(
                "{MAP_PERSIST} keeps its {} entries (config asks {persist_entries}): the pinned table is reused so no client loses its backend; remove {} to resize",
                info.max_entries(),
                persist_pin.display()
            );
        }
        if std::fs::symlink_metadata(pin_dir.join(MAP_PERSIST4)).is_err() {
            remove_stale_shard_pins(pin_dir);
        }
        let configured = Persist4Layout::for_entries(persist_entries);
        if let Some(pinned) = persist_table::pinned_layout(pin_dir)
            && pinned != configured.as_created(cpus)
        {
            log::warn!(
                "{MAP_PERSIST4} keeps its layout of {} shard(s) of {} entries (config asks {persist_entries}: {} of {}): the pinned shards are reused so no client loses its backend; to resize, run `tether stop --detach` or remove all the IPv4 table's pins ({MAP_PERSIST4} and every TETHER_PERS4_*) in {}",
                pinned.shards,
                pinned.shard_entries,
                configured.shards,
                configured.shard_entries,
                pin_dir.display(),
            );
        }
        let given = persist_table::load_layout(pin_dir, persist_entries);
        let ebpf = loader_with_layout(pin_dir, persist_entries, given).load(EBPF_OBJECT)?;
        // The program chooses shards by the count it was given, userspace by the one the
        // pins describe: they must agree or bindings are written where XDP never looks.
        let found = persist_table::pinned_layout(pin_dir);
        if found != Some(given.as_created(cpus)) {
            return Err(DataplaneError::ShardLayout {
                pin_dir: pin_dir.to_owned(),
                given: given.as_created(cpus),
                found,
            });
        }
        let mut dp = Dataplane {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            live_tables: Default::default(),
        };
        if let Some(layout) = found {
            let per_cpu = layout.capacity() / cpus as u64;
            log::info!(
                "IPv4 persistence table: {} shard(s) of {} entries ({} in all), {per_cpu} per CPU over {cpus} possible CPUs (each CPU evicts from its own share of each shard); IPv6 table: {persist_entries} entries",
                layout.shards,
                layout.shard_entries,
                layout.capacity(),
            );
            if per_cpu < 1024 {
                log::warn!(
                    "each CPU's share of the persistence table is only {per_cpu} entries: raise persist_table_entries"
                );
            }
        }
        let moved = persist_table::monotonic_ns()
            .map_err(|e| e.to_string())
            .and_then(|now| dp.move_v4_bindings(now).map_err(|e| e.to_string()));
        match moved {
            Ok(0) => {}
            Ok(n) => log::info!(
                "moved {n} IPv4 bindings from {MAP_PERSIST} (an earlier build's layout) to {MAP_PERSIST4}"
            ),
            Err(e) => log::warn!("moving IPv4 bindings to {MAP_PERSIST4}: {e}"),
        }
        // Pins of a build without the IPv4 service map (or a daemon that died between the
        // two writes): IPv4 packets must find every IPv4 service from the first one on.
        let synced = dp.sync_services4()?;
        if synced > 0 {
            log::info!("{MAP_SERVICES4}: wrote {synced} IPv4 services from {MAP_SERVICES}");
        }
        // Copies cached under a generation an earlier run (or map) gave out are not used.
        dp.raise_services_generation()?;
        let prog = dp.xdp()?;
        prog.load().map_err(|source| DataplaneError::Program {
            name: PROG_XDP,
            source,
        })?;
        Ok(dp)
    }

    /// Make `TETHER_SVC4` hold exactly the IPv4 entries of `TETHER_SERVICES` (the list
    /// the daemon reads back): write the missing or different ones, remove the others.
    /// Returns how many entries were written or removed.
    fn sync_services4(&mut self) -> Result<usize> {
        let wanted: std::collections::HashMap<ServiceKey4, Service> = {
            let services: HashMap<&MapData, ServiceKey, Service> = self.typed(MAP_SERVICES)?;
            services
                .iter()
                .filter_map(|r| r.ok())
                .filter_map(|(k, v)| Some((k.to_v4()?, v)))
                .collect()
        };
        let mut services4: HashMap<&mut MapData, ServiceKey4, Service> =
            self.typed_mut(MAP_SERVICES4)?;
        let present: Vec<(ServiceKey4, Service)> =
            services4.iter().filter_map(|r| r.ok()).collect();
        let mut n = 0;
        for (k, v) in &wanted {
            if !present.contains(&(*k, *v)) {
                services4.insert(k, v, 0).map_err(map_err(MAP_SERVICES4))?;
                n += 1;
            }
        }
        for (k, _) in present.iter().filter(|(k, _)| !wanted.contains_key(k)) {
            services4.remove(k).map_err(map_err(MAP_SERVICES4))?;
            n += 1;
        }
        Ok(n)
    }

    /// Raise `TETHER_SVC_GEN` after the service maps changed: the XDP program stops using
    /// its per-CPU copies of services (`TETHER_SVCCACHE`) and looks them up again. The new
    /// value is above the old one and above CLOCK_MONOTONIC now, so it is one no copy has
    /// been tagged with, even when the generation map was created anew (an older build's
    /// pins, a changed layout) while the cache map was kept.
    pub fn raise_services_generation(&mut self) -> Result<u64> {
        let now = persist_table::monotonic_ns().unwrap_or(0);
        let mut generation: Array<&mut MapData, u64> = self.typed_mut(MAP_SVC_GEN)?;
        let old = generation.get(&0, 0).map_err(map_err(MAP_SVC_GEN))?;
        let new = old.saturating_add(1).max(now).max(1);
        generation.set(0, new, 0).map_err(map_err(MAP_SVC_GEN))?;
        Ok(new)
    }

    /// Builds before the IPv4 table kept IPv4 clients (as mapped addresses) in
    /// `TETHER_PERSIST`: move them, so an upgrade keeps every client on its backend. Entries
    /// already in the IPv4 table win. Returns how many moved.
    fn move_v4_bindings(&mut self, now: u64) -> Result<usize> {
        let mut old: HashMap<&mut MapData, PersistKey, PersistValue> =
            self.typed_mut(MAP_PERSIST)?;
        let found: Vec<(PersistKey, PersistValue)> = old
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.to_v4().is_some())
            .collect();
        for (k, _) in &found {
            let _ = old.remove(k);
        }
        let mut table4 = persist_table::Table4::open(&self.pin_dir)?;
        let mut moved = 0;
        for (k, v) in &found {
            let (Some(k4), Some(v4)) = (k.to_v4(), PersistValue4::from_value(v, now)) else {
                continue;
            };
            // BPF_NOEXIST: a binding the new layout already holds is newer.
            if table4.insert(&k4, &v4, 1).is_ok() {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// A map of the object as aya's typed wrapper (`Array`, `HashMap`, ...).
    fn typed_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        T::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(DataplaneError::MissingMap(name))?,
        )
        .map_err(map_err(name))
    }

    fn typed<'a, T>(&'a self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        T::try_from(
            self.ebpf
                .map(name)
                .ok_or(DataplaneError::MissingMap(name))?,
        )
        .map_err(map_err(name))
    }

    fn xdp(&mut self) -> Result<&mut Xdp> {
        let p = self
            .ebpf
            .program_mut(PROG_XDP)
            .ok_or(DataplaneError::Program {
                name: PROG_XDP,
                source: ProgramError::UnexpectedProgramType,
            })?;
        p.try_into().map_err(|source| DataplaneError::Program {
            name: PROG_XDP,
            source,
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Pin the loaded program as `<pin_dir>/tether_xdp` (replacing an older pin) so bpftool
    /// and operators can find it.
    pub fn pin_program(&mut self) -> Result<()> {
        let path = self.pin_dir.join(PROG_XDP);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| DataplaneError::PinDir {
                path: path.clone(),
                source,
            })?;
        }
        self.xdp()?.pin(&path).map_err(|e| DataplaneError::PinDir {
            path,
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Attach to `iface` through a pinned link. When a link pin from an earlier run exists,
    /// the new program replaces the old one on it atomically (every packet sees one program
    /// or the other, and the mode stays what it was); otherwise a new link is created in the
    /// mode [`veth::decide`] picks and pinned.
    pub fn attach(&mut self, iface: &str, mode: config::XdpMode) -> Result<Attached> {
        let pin = link_pin(&self.pin_dir, iface);
        if pin.exists() {
            match self.replace_on(&pin) {
                Ok(()) => {
                    let m = attached_mode(iface).unwrap_or(Attached::Native);
                    log::info!(
                        "replaced the program on the pinned XDP link of {iface} ({m:?} mode) without detaching"
                    );
                    return Ok(m);
                }
                Err(e) => {
                    log::warn!(
                        "pinned link {} is unusable ({e}); attaching anew",
                        pin.display()
                    );
                    std::fs::remove_file(&pin).map_err(|source| DataplaneError::PinDir {
                        path: pin.clone(),
                        source,
                    })?;
                }
            }
        }
        let try_mode = |dp: &mut Self, m: XdpMode, name: &'static str| {
            dp.xdp()?
                .attach(iface, m)
                .map_err(|source| DataplaneError::Attach {
                    iface: iface.into(),
                    mode: name,
                    source,
                })
        };
        let (id, attached) = match veth::decide(mode, iface, &veth::inspect(iface)) {
            veth::Decision::Refuse(reason) => {
                return Err(DataplaneError::Mode {
                    iface: iface.into(),
                    reason,
                });
            }
            veth::Decision::Native => {
                (try_mode(self, XdpMode::Driver, "native")?, Attached::Native)
            }
            veth::Decision::Generic { why } => {
                if let Some(why) = why {
                    log::info!("{why}");
                }
                (try_mode(self, XdpMode::Skb, "generic")?, Attached::Generic)
            }
            veth::Decision::NativeElseGeneric => match try_mode(self, XdpMode::Driver, "native") {
                Ok(l) => (l, Attached::Native),
                Err(e) => {
                    log::warn!("{e:#}; falling back to generic (skb) mode, which is slower");
                    (try_mode(self, XdpMode::Skb, "generic")?, Attached::Generic)
                }
            },
        };
        let link_err = |reason: String| DataplaneError::Link {
            path: pin.clone(),
            reason,
        };
        let link = self
            .xdp()?
            .take_link(id)
            .map_err(|source| DataplaneError::Program {
                name: PROG_XDP,
                source,
            })?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| link_err(e.to_string()))?;
        // Dropping the PinnedLink closes our fd; the pin keeps the attachment.
        fd.pin(&pin).map_err(|e| link_err(e.to_string()))?;
        Ok(attached)
    }

    fn replace_on(&mut self, pin: &Path) -> Result<()> {
        let err = |reason: String| DataplaneError::Link {
            path: pin.to_owned(),
            reason,
        };
        let pinned = PinnedLink::from_pin(pin).map_err(|e| err(e.to_string()))?;
        let link: XdpLink = FdLink::from(pinned)
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
        self.xdp()?
            .attach_to_link(link)
            .map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Read what an earlier run left in the pinned maps.
    pub fn kernel_state(&self) -> Result<KernelState> {
        let services: HashMap<&MapData, ServiceKey, Service> = self.typed(MAP_SERVICES)?;
        let mut st = KernelState::default();
        st.previous.services = services
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k, v.index))
            .collect();
        let backends: Array<&MapData, Backend> = self.typed(MAP_BACKENDS)?;
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(map_err(MAP_BACKENDS))?;
            if b.state != lb_common::BACKEND_UNUSED && b.identity != 0 {
                st.previous.backends.push((id, b.identity));
                st.backend_states.push((b.identity, b.state));
            }
        }
        Ok(st)
    }

    /// Forget which Maglev tables this process wrote, so the next [`Dataplane::apply`]
    /// rewrites every one (another process wrote the maps meanwhile: a failed handoff).
    pub fn forget_written_tables(&mut self) {
        self.live_tables.clear();
    }

    /// Make the kernel maps hold exactly `plan`: backends first (a table never names a
    /// backend whose entry is not written yet), then each service's table into its idle
    /// slot, then the service entry that flips to it; finally stale services and backends
    /// (from an earlier config in the pinned maps) are removed.
    pub fn apply(&mut self, plan: &Plan) -> Result<Removed> {
        let applied = self.write_plan(plan);
        // Also after a failure part-way: the XDP program's per-CPU copies of services must
        // not keep what the service maps no longer hold.
        let raised = self.raise_services_generation();
        let removed = applied?;
        raised?;
        Ok(removed)
    }

    fn write_plan(&mut self, plan: &Plan) -> Result<Removed> {
        let mut removed = Removed::default();
        // Backends that take new clients are written before the tables that name them;
        // backends that stop taking them (down, draining, disabled) after the tables that no
        // longer do, so no new client is ever sent to a backend marked out of service.
        let (taking, leaving): (Vec<_>, Vec<_>) = plan
            .backends
            .iter()
            .partition(|(_, b)| b.state == BACKEND_UP);
        {
            let mut backends: Array<&mut MapData, Backend> = self.typed_mut(MAP_BACKENDS)?;
            for (id, b) in &taking {
                backends.set(*id, b, 0).map_err(map_err(MAP_BACKENDS))?;
            }
        }
        let current: Vec<(ServiceKey, Service)> = {
            let services: HashMap<&MapData, ServiceKey, Service> = self.typed(MAP_SERVICES)?;
            services.iter().filter_map(|r| r.ok()).collect()
        };
        for sp in &plan.services {
            // Write the slot the program is not reading (if this VIP is live with the same
            // index), then flip to it with one element update.
            let live = current
                .iter()
                .find(|(k, v)| *k == sp.key && v.index == sp.value.index);
            // Same table already live and the same service value: nothing to write.
            if let Some((_, v)) = live
                && self
                    .live_tables
                    .get(&sp.key)
                    .is_some_and(|(i, t)| *i == sp.value.index && *t == sp.table)
                && (Service {
                    maglev_slot: v.maglev_slot,
                    ..sp.value
                }) == *v
            {
                continue;
            }
            let slot = live.map_or(0, |(_, v)| (v.maglev_slot + 1) % MAGLEV_SLOTS);
            {
                let maglev = self
                    .ebpf
                    .map(MAP_MAGLEV)
                    .ok_or(DataplaneError::MissingMap(MAP_MAGLEV))?;
                let aya::maps::Map::Array(data) = maglev else {
                    return Err(DataplaneError::MissingMap(MAP_MAGLEV));
                };
                let base = maglev_index(sp.value.index, slot, 0);
                let keys: Vec<u32> = (base..base + sp.table.len() as u32).collect();
                use std::os::fd::AsFd;
                batch::update_u32(data.fd().as_fd(), &keys, &sp.table).map_err(|e| {
                    DataplaneError::Map {
                        name: MAP_MAGLEV,
                        source: MapError::from(e),
                    }
                })?;
            }
            let value = Service {
                maglev_slot: slot,
                ..sp.value
            };
            {
                let mut services: HashMap<&mut MapData, ServiceKey, Service> =
                    self.typed_mut(MAP_SERVICES)?;
                services
                    .insert(sp.key, value, 0)
                    .map_err(map_err(MAP_SERVICES))?;
            }
            // IPv4 packets look the service up here (an 8-byte key).
            if let Some(k4) = sp.key.to_v4() {
                let mut services4: HashMap<&mut MapData, ServiceKey4, Service> =
                    self.typed_mut(MAP_SERVICES4)?;
                services4
                    .insert(k4, value, 0)
                    .map_err(map_err(MAP_SERVICES4))?;
            }
            self.live_tables
                .insert(sp.key, (sp.value.index, sp.table.clone()));
            log::debug!(
                "service {} -> index {} slot {slot}",
                sp.name,
                sp.value.index
            );
        }
        // Each CPU's copies of the services must show the new tables before a backend they
        // no longer name is marked out of service, and be gone before a removed service's
        // backends are cleared: raised at both points (and again in `apply`).
        self.raise_services_generation()?;
        {
            let mut backends: Array<&mut MapData, Backend> = self.typed_mut(MAP_BACKENDS)?;
            for (id, b) in &leaving {
                backends.set(*id, b, 0).map_err(map_err(MAP_BACKENDS))?;
            }
        }
        {
            let keep: HashSet<ServiceKey> = plan.services.iter().map(|s| s.key).collect();
            // The IPv4 map first, where IPv4 packets find a service; then the list the
            // daemon reads back. Walked on its own, so an entry left by a daemon that died
            // between the two removals goes too.
            let keep4: HashSet<ServiceKey4> = keep.iter().filter_map(|k| k.to_v4()).collect();
            {
                let mut services4: HashMap<&mut MapData, ServiceKey4, Service> =
                    self.typed_mut(MAP_SERVICES4)?;
                let stale4: Vec<ServiceKey4> = services4
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter(|k| !keep4.contains(k))
                    .collect();
                for k in &stale4 {
                    services4.remove(k).map_err(map_err(MAP_SERVICES4))?;
                }
            }
            let mut services: HashMap<&mut MapData, ServiceKey, Service> =
                self.typed_mut(MAP_SERVICES)?;
            for (k, v) in current.iter().filter(|(k, _)| !keep.contains(k)) {
                services.remove(k).map_err(map_err(MAP_SERVICES))?;
                log::info!("removed stale virtual service entry {k:?}");
                removed.services.push(v.index);
            }
            self.live_tables.retain(|k, _| keep.contains(k));
        }
        self.raise_services_generation()?;
        {
            let mut globals: Array<&mut MapData, Globals> = self.typed_mut(MAP_GLOBALS)?;
            globals
                .set(0, plan.globals, 0)
                .map_err(map_err(MAP_GLOBALS))?;
        }
        {
            let mut ports: DevMapHash<&mut MapData> = self.typed_mut(MAP_TX_PORTS)?;
            let stale: Vec<u32> = ports
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !plan.tx_ports.contains(k))
                .collect();
            for ifindex in &plan.tx_ports {
                ports
                    .insert(*ifindex, *ifindex, None, 0)
                    .map_err(DataplaneError::TxPort)?;
            }
            for k in stale {
                ports.remove(k).map_err(map_err(MAP_TX_PORTS))?;
            }
        }
        {
            let used: HashSet<u32> = plan.backends.iter().map(|(id, _)| *id).collect();
            let mut backends: Array<&mut MapData, Backend> = self.typed_mut(MAP_BACKENDS)?;
            for id in 0..MAX_BACKENDS {
                if used.contains(&id) {
                    continue;
                }
                let b = backends.get(&id, 0).map_err(map_err(MAP_BACKENDS))?;
                if b != Backend::default() {
                    backends
                        .set(id, Backend::default(), 0)
                        .map_err(map_err(MAP_BACKENDS))?;
                    removed.backends.push(id);
                }
            }
        }
        debug_assert_eq!(
            MAGLEV_TABLE_SIZE as usize,
            plan.services
                .first()
                .map_or(MAGLEV_TABLE_SIZE as usize, |s| s.table.len())
        );
        Ok(removed)
    }

    /// Delete persistence entries of removed services and backends in one walk of the table,
    /// so a slot reused later never inherits another server's clients. Returns the count.
    pub fn forget(&mut self, removed: &Removed) -> Result<usize> {
        if removed.services.is_empty() && removed.backends.is_empty() {
            return Ok(0);
        }
        let gone = |service: u32, backend: u32| {
            removed.services.contains(&service) || removed.backends.contains(&backend)
        };
        let mut n = 0;
        let mut table: HashMap<&mut MapData, PersistKey, PersistValue> =
            self.typed_mut(MAP_PERSIST)?;
        let doomed: Vec<PersistKey> = table
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| gone(k.service, v.backend))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            // An entry the LRU evicted meanwhile is already gone: not an error.
            if table.remove(k).is_ok() {
                n += 1;
            }
        }
        let mut table4 = persist_table::Table4::open(&self.pin_dir)?;
        let mut doomed: Vec<(usize, PersistKey4)> = Vec::new();
        table4.for_each(|shard, k, v| {
            if gone(k.service, v.backend as u32) {
                doomed.push((shard, *k));
            }
        })?;
        for (shard, k) in &doomed {
            // From the shard the walk found it in; evicted meanwhile: already gone.
            if matches!(table4.remove_in(*shard, k), Ok(true)) {
                n += 1;
            }
        }
        note_deleted(&self.pin_dir, n as u64);
        Ok(n)
    }
}

/// Service indexes and backend ids an `apply` took out of the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    pub services: Vec<u32>,
    pub backends: Vec<u32>,
}

#[cfg(test)]
mod tests;
