use std::path::PathBuf;

use aya::{EbpfLoader, maps::MapInfo};
use lb_common::{MAP_PERSIST, MAP_PERSIST4, MAP_REASONS, reason};

use super::*;

#[test]
fn default_new_binding_cap_follows_the_per_cpu_share() {
    // 1M entries over 2 CPUs: 512Ki each, a 64th of that per second.
    assert_eq!(new_binding_cap(None, 1 << 20, 2), 8192);
    // Small tables still admit a useful rate.
    assert_eq!(new_binding_cap(None, 1024, 8), 1000);
    // Configured values win, 0 included (no cap).
    assert_eq!(new_binding_cap(Some(0), 1 << 20, 2), 0);
    assert_eq!(new_binding_cap(Some(50), 1 << 20, 2), 50);
}

/// A pin dir holding maps from an "older build": the reasons array with 16 slots, and a
/// persistence table of another size (which must be kept: its size is the operator's).
#[test]
fn pins_of_an_older_layout_are_replaced_and_the_table_size_kept() {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/tether-test-layout-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bpffs (root?)");
    {
        let mut old = EbpfLoader::new();
        old.map_max_entries(MAP_REASONS, 16)
            .map_max_entries(MAP_PERSIST, 2048)
            .map_max_entries(MAP_PERSIST4, 2048);
        for name in ALL_MAPS {
            old.map_pin_path(name, dir.join(name));
        }
        old.load(EBPF_OBJECT).expect("creating the old maps");
    }
    let entries = |name: &str| {
        MapInfo::from_pin(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .max_entries()
    };
    assert_eq!(entries(MAP_REASONS), 16);
    let loaded = Dataplane::load(&dir, 4096)
        .map(drop)
        .map_err(|e| e.to_string());
    let r = std::panic::catch_unwind(|| {
        assert_eq!(loaded, Ok(()), "load over old pins");
        assert_eq!(entries(MAP_REASONS), reason::SLOTS, "reasons map replaced");
        let created = 2048u32.next_multiple_of(possible_cpus());
        assert_eq!(entries(MAP_PERSIST), created, "the table keeps its size");
        assert_eq!(
            entries(MAP_PERSIST4),
            created,
            "the IPv4 table keeps its size"
        );
        assert_eq!(
            persist_table::pinned_layout(&dir).map(|l| (l.shards, l.shard_entries)),
            Some((1, created)),
            "an earlier build's table is one shard"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// An earlier build kept IPv4 clients (as mapped addresses) in `TETHER_PERSIST`: loading
/// moves them to the IPv4 table with their backend and age, and leaves IPv6 clients alone.
#[test]
fn ipv4_bindings_of_the_one_table_layout_move_to_the_ipv4_table() {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/tether-test-move4-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bpffs (root?)");
    let now = persist_table::monotonic_ns().expect("clock");
    let v4 = PersistKey {
        service: 2,
        addr_be: lb_common::v4_mapped([10, 0, 0, 7]),
    };
    let v6 = PersistKey {
        service: 2,
        addr_be: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
    };
    let value = |backend| PersistValue {
        backend,
        backend_identity: 0,
        last_seen_ns: now.wrapping_sub(30_000_000_000),
    };
    {
        let mut old = super::pinned_loader(&dir, 1024)
            .load(EBPF_OBJECT)
            .expect("creating the maps");
        let mut m: HashMap<&mut MapData, PersistKey, PersistValue> =
            HashMap::try_from(old.map_mut(MAP_PERSIST).expect("persist")).expect("type");
        m.insert(v4, value(5), 0).expect("insert v4");
        m.insert(v6, value(6), 0).expect("insert v6");
    }
    let loaded = Dataplane::load(&dir, 1024)
        .map(drop)
        .map_err(|e| e.to_string());
    let r = std::panic::catch_unwind(|| {
        assert_eq!(loaded, Ok(()), "load over the old table");
        let got = persist_table::get(&dir, &v4).expect("read").expect("moved");
        assert_eq!(got.backend, 5, "the client keeps its backend");
        let age = persist_table::age(now, got.last_seen_ns).as_secs();
        assert!(
            (29..=31).contains(&age),
            "the age survives the move: {age} s"
        );
        let left: HashMap<MapData, PersistKey, PersistValue> =
            persist_table::open_pinned(&dir, MAP_PERSIST).expect("persist pin");
        assert!(left.get(&v4, 0).is_err(), "moved, not copied");
        assert_eq!(left.get(&v6, 0).map(|v| v.backend).ok(), Some(6));
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// A table of 3 x 4096 entries is split in three shards; userspace writes land in the shard
/// of their key, and a restart with another configured size keeps the layout and every
/// binding.
#[test]
fn a_split_ipv4_table_keeps_its_layout_and_bindings_across_loads() {
    use lb_common::{MAP_PERSIST4_SHARDS, Persist4Layout, PersistKey4, PersistValue4};
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/tether-test-shards-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bpffs (root?)");
    let now = persist_table::monotonic_ns().expect("clock");
    let keys: Vec<PersistKey> = (0..300u32)
        .map(|i| PersistKey {
            service: 1,
            addr_be: lb_common::v4_mapped((0x0a01_0000 + i).to_be_bytes()),
        })
        .collect();
    let r = std::panic::catch_unwind(|| {
        let dp = Dataplane::load(&dir, 3 * 4096).expect("first load");
        // As the kernel created it: each shard rounded up to the possible CPUs.
        let split = Persist4Layout {
            shards: 3,
            shard_entries: 4096,
        }
        .as_created(possible_cpus());
        assert_eq!(persist_table::pinned_layout(&dir), Some(split));
        for (i, k) in keys.iter().enumerate() {
            let v = PersistValue {
                backend: i as u32 % 7,
                backend_identity: 0,
                last_seen_ns: now,
            };
            persist_table::insert(&dir, k, &v).expect("insert");
        }
        drop(dp);
        // Each binding sits in the shard its key names, and all three shards are used.
        let mut per_shard = [0usize; 3];
        for (s, n) in per_shard.iter_mut().enumerate() {
            let m: HashMap<MapData, PersistKey4, PersistValue4> =
                persist_table::open_pinned(&dir, MAP_PERSIST4_SHARDS[s]).expect("shard pin");
            for r in m.iter() {
                let (k, _) = r.expect("entry");
                assert_eq!(k.shard(3), s as u32, "{k:?} in shard {s}");
                *n += 1;
            }
        }
        assert_eq!(per_shard.iter().sum::<usize>(), keys.len(), "{per_shard:?}");
        assert!(per_shard.iter().all(|&n| n > 50), "spread: {per_shard:?}");
        // A restart asking for another size keeps the pinned layout and the bindings.
        let dp = Dataplane::load(&dir, 1 << 20).expect("second load");
        assert_eq!(persist_table::pinned_layout(&dir), Some(split));
        for (i, k) in keys.iter().enumerate() {
            let got = persist_table::get(&dir, k).expect("read").expect("kept");
            assert_eq!(got.backend, i as u32 % 7, "{k:?}");
        }
        let listed = persist_table::list(&dir, &Default::default()).expect("list");
        assert_eq!(listed.len(), keys.len(), "the walk sees every shard");
        drop(dp);
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn the_layout_is_read_back_from_shard_sizes() {
    use lb_common::Persist4Layout;
    let l = |shards, shard_entries| {
        Some(Persist4Layout {
            shards,
            shard_entries,
        })
    };
    let s = persist_table::layout_from_sizes;
    assert_eq!(s(&[None; 8], 2), None, "no pin: the config decides");
    // An earlier build's single table, with or without unused shard pins.
    assert_eq!(s(&[Some(10 << 20), None, None], 2), l(1, 10 << 20));
    assert_eq!(s(&[Some(4096), Some(2), Some(2)], 2), l(1, 4096));
    assert_eq!(
        s(&[Some(4096), Some(4096), Some(4096), Some(2), Some(2)], 2),
        l(3, 4096)
    );
    // A one-shard table as small as an unused shard is not mistaken for eight.
    assert_eq!(s(&[Some(2); 8], 2), l(1, 2));
}

/// Only `TETHER_PERSIST4` was removed (to resize) and a shard of the old table is still
/// pinned: the load removes the leftover pin and creates the table the config asks for, so
/// the shard count userspace reads back is the one the program was given, and a binding
/// userspace writes sits in the shard the program's `shard_of` names.
#[test]
fn a_stale_shard_pin_without_shard_0_is_replaced_by_the_configured_layout() {
    use lb_common::{MAP_PERSIST4_SHARDS, Persist4Layout, PersistKey4, PersistValue4};
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/tether-test-stale-shard-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bpffs (root?)");
    let r = std::panic::catch_unwind(|| {
        // An old 3 x 8192 table, then its shard 0 removed as the old warning said.
        drop(Dataplane::load(&dir, 3 * 8192).expect("old table"));
        assert_eq!(
            persist_table::pinned_layout(&dir).map(|l| l.shards),
            Some(3),
            "the old table this test is about"
        );
        std::fs::remove_file(dir.join(MAP_PERSIST4)).expect("removing shard 0's pin");
        let entries = 3 * 4096;
        let dp = Dataplane::load(&dir, entries).expect("load with a stale shard pin");
        let cpus = possible_cpus();
        let want = Persist4Layout::for_entries(entries).as_created(cpus);
        assert_eq!(want.shards, 3, "the configured layout this test is about");
        assert_eq!(
            persist_table::pinned_layout(&dir),
            Some(want),
            "userspace reads back the layout the program was given"
        );
        let k = PersistKey {
            service: 4,
            addr_be: lb_common::v4_mapped([10, 9, 8, 7]),
        };
        let v = PersistValue {
            backend: 3,
            backend_identity: 0,
            last_seen_ns: persist_table::monotonic_ns().expect("clock"),
        };
        persist_table::insert(&dir, &k, &v).expect("insert");
        let k4 = k.to_v4().expect("IPv4 key");
        let shard = k4.shard(want.shards) as usize;
        let m: HashMap<MapData, PersistKey4, PersistValue4> =
            persist_table::open_pinned(&dir, MAP_PERSIST4_SHARDS[shard]).expect("shard pin");
        assert_eq!(
            m.get(&k4, 0).map(|v| v.backend).ok(),
            Some(3),
            "the binding is in shard {shard}, where the program looks"
        );
        drop(dp);
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
