//! The IPv4 persistence table split into shards (`persist_table_entries` not a power of two):
//! the bindings the XDP program makes for many clients spread over the shards, and the
//! daemon's userspace paths (`persist_table`: walk, lookup, flush, write) find each one in the
//! shard the program uses. BPF_PROG_TEST_RUN on the real object.
//!
//! Needs root (BPF). Run with `cargo test -p tether-tests --test xdp_shards`.

use std::{collections::HashMap, net::Ipv4Addr};

use lb_common::{BACKEND_UP, Globals, PROTO_TCP, Persist4Layout};
use tether::dataplane::persist_table::{self, Filter};
use tether_tests::{fixture::*, packet::TCP_ACK};

/// 3 x 4096: three shards.
const ENTRIES: u32 = 3 * 4096;
const CLIENTS: u32 = 600;

/// Client `i`, each in a /24 of its own (the service binds /24 prefixes).
fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(100, 64 + (i / 256) as u8, (i % 256) as u8, 7)
}

fn sharded_fixture(table: &[u32]) -> Fixture {
    let mut fx = Fixture::with_persist_entries(ENTRIES);
    assert_eq!(
        Persist4Layout::for_entries(ENTRIES).shards,
        3,
        "the layout this test is about"
    );
    assert_eq!(
        fx.table4().shards(),
        3,
        "the fixture's table has three shards"
    );
    fx.add_service(skey4(VIP, HTTP, PROTO_TCP), service(SVC_TCP, 300));
    fx.set_backend(BE_A, backend(BE_A, BACKEND_UP, 0));
    fx.set_backend(BE_B, backend(BE_B, BACKEND_UP, 0));
    fx.fill_table(SVC_TCP, 0, table);
    // No new-binding cap: every SYN binds.
    fx.set_globals(Globals {
        new_bindings_per_cpu: 0,
        emit_bindings: 0,
    });
    fx
}

/// The backend a forwarded frame went to (by its rewritten MACs).
fn forwarded_to(fx: &Fixture, frame: &tether_tests::packet::Frame) -> u32 {
    let (action, out) = fx.run(&frame.bytes);
    assert_eq!(action, XDP_TX, "forwarded");
    [BE_A, BE_B]
        .into_iter()
        .find(|&id| out == to_backend(frame, id))
        .unwrap_or_else(|| panic!("sent to neither backend"))
}

#[test]
fn bindings_xdp_makes_spread_over_the_shards_and_userspace_finds_and_flushes_them_all() {
    let fx = sharded_fixture(&[BE_A, BE_B]);
    let mut sent = HashMap::new();
    for i in 0..CLIENTS {
        let syn = tcp4(client(i), SPORT, VIP, HTTP).build();
        sent.insert(pkey4(SVC_TCP, client(i), 24), forwarded_to(&fx, &syn));
    }
    let per_shard = fx.persist4_per_shard();
    assert_eq!(
        per_shard.iter().sum::<usize>(),
        CLIENTS as usize,
        "one binding per client: {per_shard:?}"
    );
    assert!(
        per_shard.iter().all(|&n| n >= CLIENTS as usize / 6),
        "every shard holds its share of the clients: {per_shard:?}"
    );
    // Each binding, read back by key, names the backend the client was sent to.
    for (key, id) in &sent {
        let got = persist_table::get(&fx.dir, key)
            .expect("lookup")
            .unwrap_or_else(|| panic!("no binding for {key:?}"));
        assert_eq!(got.backend, *id, "{key:?}");
    }
    // The walk (list, census) sees every shard.
    let listed = persist_table::list(&fx.dir, &Filter::default()).expect("list");
    assert_eq!(
        listed.len(),
        CLIENTS as usize,
        "the walk lists every binding"
    );
    for e in &listed {
        let std::net::IpAddr::V4(a) = e.client else {
            panic!("an IPv4 client: {e:?}");
        };
        assert_eq!(
            Some(&e.backend_id),
            sent.get(&pkey4(SVC_TCP, a, 24)),
            "{e:?}"
        );
    }
    let census = persist_table::census(&fx.dir).expect("census");
    assert_eq!(census.entries, CLIENTS as u64);
    // A flush by backend removes exactly that backend's clients, from every shard.
    let on_a = sent.values().filter(|&&id| id == BE_A).count();
    let f = Filter {
        backend_id: Some(BE_A),
        ..Filter::default()
    };
    assert_eq!(persist_table::flush(&fx.dir, &f).expect("flush A"), on_a);
    assert_eq!(
        fx.persist4_per_shard().iter().sum::<usize>(),
        CLIENTS as usize - on_a
    );
    let all = persist_table::flush(&fx.dir, &Filter::default()).expect("flush");
    assert_eq!(all, CLIENTS as usize - on_a);
    assert_eq!(
        fx.persist4_per_shard(),
        vec![0, 0, 0],
        "every shard emptied"
    );
}

#[test]
fn a_binding_userspace_writes_is_the_one_xdp_forwards_to() {
    // Maglev sends everyone to A; userspace binds each client to B (as a mirror or
    // `tether persist bind` does), so only a binding found in the right shard sends to B.
    let fx = sharded_fixture(&[BE_A]);
    let now = coarse_now_ns();
    for i in 0..CLIENTS / 4 {
        persist_table::insert(&fx.dir, &pkey4(SVC_TCP, client(i), 24), &pval(BE_B, now))
            .expect("write binding");
    }
    let per_shard = fx.persist4_per_shard();
    assert!(
        per_shard.iter().filter(|&&n| n > 0).count() > 1,
        "written into more than one shard: {per_shard:?}"
    );
    for i in 0..CLIENTS / 4 {
        // Not a SYN: a miss would be forwarded by Maglev (to A) and bind nothing.
        let ack = tcp4(client(i), SPORT, VIP, HTTP)
            .tcp_flags(TCP_ACK, 1, 1)
            .build();
        assert_eq!(forwarded_to(&fx, &ack), BE_B, "client {}", client(i));
    }
    let s = fx.svc_stat(SVC_TCP);
    assert_eq!(s.persist_hits, (CLIENTS / 4) as u64, "every packet a hit");
}
