use std::net::{IpAddr, Ipv4Addr};

use super::{testpins::TestPins, *};

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s} is not an address"))
}

fn params(v4: u8, v6: u8, timeout_s: u64) -> ServiceParams {
    ServiceParams {
        v4_mask: lb_common::prefix_mask::<4>(v4),
        v6_mask: lb_common::prefix_mask::<16>(v6),
        timeout_ns: timeout_s * 1_000_000_000,
    }
}

fn key(service: u32, addr: &str) -> PersistKey {
    PersistKey {
        service,
        addr_be: crate::balancer::addr_bytes(ip(addr)),
    }
}

fn value(backend: u32, last_seen_ns: u64) -> PersistValue {
    PersistValue {
        backend,
        backend_identity: 0,
        last_seen_ns,
    }
}

#[test]
fn masking_follows_the_data_path() {
    let p = params(24, 48, 60);
    assert_eq!(
        masked_key_addr(ip("10.0.0.7"), &p),
        crate::balancer::addr_bytes(ip("10.0.0.0")),
        "IPv4: mapped form, mask on the last word only"
    );
    assert_eq!(
        masked_key_addr(ip("2001:db8:1:2:3::9"), &p),
        crate::balancer::addr_bytes(ip("2001:db8:1::")),
        "IPv6: /48"
    );
    assert_eq!(
        masked_key_addr(ip("::ffff:10.0.0.7"), &p),
        masked_key_addr(ip("10.0.0.7"), &p),
        "an IPv4-mapped filter address is treated as IPv4"
    );
    assert_eq!(
        masked_key_addr(ip("10.1.2.3"), &params(0, 0, 1))[..12],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
    );
}

#[test]
fn display_and_prefix() {
    let p = params(20, 64, 60);
    let a = entry_addr(crate::balancer::addr_bytes(ip("10.0.16.0")));
    assert_eq!(
        a,
        IpAddr::V4(Ipv4Addr::new(10, 0, 16, 0)),
        "mapped shows as IPv4"
    );
    assert_eq!(prefix_len(a, &p), 20);
    let b = entry_addr(crate::balancer::addr_bytes(ip("2001:db8::")));
    assert!(b.is_ipv6());
    assert_eq!(prefix_len(b, &p), 64);
    assert_eq!(mask_len(&[0xff, 0xff, 0xf0, 0]), 20);
    assert_eq!(mask_len(&[0; 4]), 0);
    assert_eq!(mask_len(&[0xff; 16]), 128);
}

#[test]
fn age_and_expiry() {
    assert_eq!(age(10_000, 4_000), Duration::from_nanos(6_000));
    assert_eq!(
        age(10_000, 12_000),
        Duration::ZERO,
        "last-seen ahead of now is age 0"
    );
    let p = params(32, 128, 60);
    assert!(
        !is_expired(Duration::from_secs(60), &p),
        "expiry is age > timeout"
    );
    assert!(is_expired(
        Duration::from_secs(60) + Duration::from_nanos(1),
        &p
    ));
    assert!(
        is_expired(Duration::ZERO, &params(32, 128, 0)),
        "entries of a service without persistence are dead"
    );
    let e = to_entry(
        &key(3, "10.0.0.0"),
        &value(7, 1_000),
        &params(24, 64, 60),
        2_000_001_000,
    );
    assert_eq!(
        e,
        Entry {
            service_index: 3,
            client: ip("10.0.0.0"),
            prefix_len: 24,
            backend_id: 7,
            age: Duration::from_secs(2),
            expired: false,
        }
    );
}

#[test]
fn filters() {
    let p = params(24, 48, 60);
    let (k, v) = (key(1, "10.0.0.0"), value(5, 0));
    let all = Filter::default();
    assert!(matches(&all, &k, &v, &p));
    let f = |s: Option<u32>, c: Option<&str>, b: Option<u32>| Filter {
        service_index: s,
        client: c.map(ip),
        backend_id: b,
    };
    assert!(matches(&f(Some(1), None, None), &k, &v, &p));
    assert!(!matches(&f(Some(2), None, None), &k, &v, &p));
    assert!(matches(&f(None, None, Some(5)), &k, &v, &p));
    assert!(!matches(&f(None, None, Some(6)), &k, &v, &p));
    assert!(
        matches(&f(None, Some("10.0.0.7"), None), &k, &v, &p),
        "a client address finds its /24 entry"
    );
    assert!(!matches(&f(None, Some("10.0.1.7"), None), &k, &v, &p));
    assert!(!matches(&f(None, Some("2001:db8::1"), None), &k, &v, &p));
    assert!(matches(
        &f(Some(1), Some("10.0.0.255"), Some(5)),
        &k,
        &v,
        &p
    ));
    assert!(!matches(
        &f(Some(1), Some("10.0.0.255"), Some(4)),
        &k,
        &v,
        &p
    ));
    // The same client under a /32 service only matches exactly.
    assert!(!matches(
        &f(None, Some("10.0.0.7"), None),
        &k,
        &v,
        &params(32, 128, 60)
    ));
}

#[test]
fn census_by_backend_sums_services() {
    let mut c = Census::default();
    c.live.insert((0, 1), 3);
    c.live.insert((1, 1), 2);
    c.live.insert((1, 2), 1);
    let b = c.by_backend();
    assert_eq!(b.get(&1), Some(&5));
    assert_eq!(b.get(&2), Some(&1));
}

/// list, filters, census and flush against a real LRU hash pinned in bpffs.
#[test]
fn real_pinned_table() {
    let mut pins = TestPins::new("persist");
    pins.add_service(ip("192.0.2.10"), 80, 0, 24, 48, 60);
    pins.add_service(ip("192.0.2.11"), 80, 1, 32, 128, 60);
    pins.bind(0, ip("10.0.0.0"), 1, 5);
    pins.bind(0, ip("10.0.1.0"), 2, 120); // expired
    pins.bind(0, ip("2001:db8:1::"), 2, 1);
    pins.bind(1, ip("10.0.0.7"), 1, 0);
    pins.bind(9, ip("10.9.9.9"), 1, 0); // service gone
    let dir = pins.dir().to_owned();

    let all = list(&dir, &Filter::default()).expect("list");
    assert_eq!(all.len(), 5, "{all:?}");
    let first = &all[0];
    assert_eq!(
        (
            first.service_index,
            first.client,
            first.prefix_len,
            first.backend_id,
            first.expired
        ),
        (0, ip("10.0.0.0"), 24, 1, false),
        "sorted by service then client: {all:?}"
    );
    assert!((5..7).contains(&first.age.as_secs()), "age {:?}", first.age);
    let v6 = all.iter().find(|e| e.client.is_ipv6()).expect("v6 entry");
    assert_eq!((v6.client, v6.prefix_len), (ip("2001:db8:1::"), 48));
    assert!(
        all.iter()
            .find(|e| e.client == ip("10.0.1.0"))
            .expect("old")
            .expired
    );
    assert!(
        all.iter()
            .find(|e| e.service_index == 9)
            .expect("stale")
            .expired
    );

    let by_client = list(
        &dir,
        &Filter {
            client: Some(ip("10.0.0.7")),
            ..Filter::default()
        },
    )
    .expect("list by client");
    let got: Vec<(u32, IpAddr)> = by_client
        .iter()
        .map(|e| (e.service_index, e.client))
        .collect();
    assert_eq!(
        got,
        vec![(0, ip("10.0.0.0")), (1, ip("10.0.0.7"))],
        "10.0.0.7 is in service 0's /24 and service 1's /32"
    );

    let (capped, truncated) = list_capped(&dir, &Filter::default(), 2).expect("capped");
    assert_eq!((capped.len(), truncated), (2, true));

    let c = census(&dir).expect("census");
    assert_eq!(c.entries, 5);
    assert_eq!(c.live.get(&(0, 1)), Some(&1));
    assert_eq!(c.live.get(&(0, 2)), Some(&1), "the expired /24 is not live");
    assert_eq!(c.live.get(&(1, 1)), Some(&1));
    assert_eq!(
        c.live.get(&(9, 1)),
        None,
        "stale service entries are not live"
    );
    let b = bound_clients(&dir).expect("bound");
    assert_eq!((b.get(&1), b.get(&2)), (Some(&2), Some(&1)));

    let n = flush(
        &dir,
        &Filter {
            backend_id: Some(2),
            ..Filter::default()
        },
    )
    .expect("flush backend 2");
    assert_eq!(n, 2);
    assert_eq!(list(&dir, &Filter::default()).expect("list").len(), 3);
    let n = flush(
        &dir,
        &Filter {
            service_index: Some(0),
            client: Some(ip("10.0.0.200")),
            backend_id: None,
        },
    )
    .expect("flush by client");
    assert_eq!(n, 1);
    assert_eq!(flush(&dir, &Filter::default()).expect("flush all"), 2);
    assert!(list(&dir, &Filter::default()).expect("list").is_empty());
    assert_eq!(census(&dir).expect("census"), Census::default());
}

#[test]
fn missing_pins_name_the_path() {
    let e = list(
        Path::new("/sys/fs/bpf/tether-test-does-not-exist"),
        &Filter::default(),
    )
    .expect_err("no pins");
    assert!(
        e.to_string()
            .contains("tether-test-does-not-exist/TETHER_SERVICES"),
        "{e}"
    );
}

#[test]
fn open_pinned_reads_a_map_as_its_type_and_names_a_wrong_one() {
    let mut pins = TestPins::new("open");
    pins.add_service(ip("192.0.2.1"), 80, 3, 32, 128, 60);
    let services: BpfHashMap<MapData, ServiceKey, Service> =
        open_pinned(pins.dir(), MAP_SERVICES).expect("the services map");
    let indexes: Vec<u32> = services.iter().map(|r| r.expect("entry").1.index).collect();
    assert_eq!(indexes, vec![3]);
    // The services map is a hash map: read as an array it is refused, by name.
    let Err(e) = open_pinned::<aya::maps::Array<MapData, u32>>(pins.dir(), MAP_SERVICES) else {
        panic!("the services map read as an array");
    };
    assert!(
        matches!(e, PersistError::Map { name, .. } if name == MAP_SERVICES),
        "{e}"
    );
}

/// A binding the LRU evicted (or a flush deleted) between a walk and the delete is not an
/// error: aya reports a delete's miss as ENOENT, not `KeyNotFound`.
#[test]
fn removing_a_binding_that_is_gone_is_not_an_error() {
    let mut pins = TestPins::new("gone");
    pins.add_service(ip("192.0.2.10"), 80, 0, 32, 128, 60);
    pins.bind(0, ip("10.0.0.1"), 1, 0);
    pins.bind(0, ip("2001:db8::1"), 1, 0);
    let dir = pins.dir().to_owned();
    for addr in ["10.0.0.1", "2001:db8::1"] {
        let k = key(0, addr);
        assert!(remove(&dir, &k).expect("remove"), "{addr} was bound");
        assert!(
            !remove(&dir, &k).expect("removing a missing key"),
            "{addr} is gone"
        );
    }
    let k4 = key(0, "10.0.0.2").to_v4().expect("IPv4 key");
    let mut t = Table4::open(&dir).expect("IPv4 table");
    let shard = t.shard_of(&k4);
    assert!(
        matches!(t.remove_in(shard, &k4), Ok(false)),
        "a key a walk found but the LRU evicted since"
    );
    // A flush that finds nothing left to delete succeeds.
    assert_eq!(flush(&dir, &Filter::default()).expect("flush"), 0);
}

/// The mirror's writer keeps the tables open: repeated writes land in both tables, a
/// binding to the same backend is left alone, another backend replaces it.
#[test]
fn a_binder_reports_new_unchanged_and_moved_bindings_and_writes_them() {
    let pins = TestPins::new("binder");
    let dir = pins.dir().to_owned();
    let mut b = Binder::new(&dir);
    for addr in ["10.0.0.1", "10.0.0.2", "2001:db8::1"] {
        let k = key(3, addr);
        assert!(
            b.bind(3, k.addr_be, 4, 0x1234_5678).expect("bind"),
            "{addr} new"
        );
        assert!(
            !b.bind(3, k.addr_be, 4, 0x1234_5678).expect("bind"),
            "{addr} unchanged"
        );
        assert!(b.bind(3, k.addr_be, 5, 9).expect("bind"), "{addr} moved");
        let got = get(&dir, &k).expect("get").expect("bound");
        assert_eq!(got.backend, 5, "{addr}");
    }
}
