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
        assert_eq!(entries(MAP_PERSIST), 2048, "the table keeps its size");
        assert_eq!(entries(MAP_PERSIST4), 2048, "the IPv4 table keeps its size");
        assert_eq!(
            persist_table::pinned_layout(&dir).map(|l| (l.shards, l.shard_entries)),
            Some((1, 2048)),
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
        let split = Persist4Layout {
            shards: 3,
            shard_entries: 4096,
        };
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
