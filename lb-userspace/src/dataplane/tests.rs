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
