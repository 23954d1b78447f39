//! The UDP proxy on loopback: backends are UDP sockets on 127.0.0.2 and 127.0.0.3 that
//! answer every datagram with their name and the datagram; the engine is a real one with a
//! `sip-header` profile.

use std::{
    collections::{HashMap, HashSet},
    time::SystemTime,
};

use arc_swap::ArcSwap;

use super::*;
use crate::{
    balancer::{Previous, assign_ids},
    config::Config,
    state::{BackendState, SharedSnapshot, Snapshot},
};

const WAIT: Duration = Duration::from_secs(3);

fn config(backends: &[SocketAddr]) -> Arc<Config> {
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                r#"{{"name":"b{i}","address":"{}","port":{}}}"#,
                b.ip(),
                b.port()
            )
        })
        .collect();
    Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"sip","vip":"127.0.0.1","port":5060,"protocol":"udp","mode":"l7","pool":"p","persistence":"calls"}}],
            "pools":[{{"name":"p","backends":[{}]}}],
            "persistence_profiles":[{{"name":"calls","type":"sip-header","timeout_s":60}}]}}"#,
            list.join(",")
        ))
        .expect("valid test config"),
    )
}

fn shared(cfg: &Arc<Config>) -> SharedSnapshot {
    let ids = assign_ids(cfg, &Previous::default()).unwrap();
    let n = cfg.pools[0].backends.len();
    let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
    s.service_index = ids.services;
    s.backend_ids = ids.backends;
    s.backend_state = vec![vec![BackendState::Up; n]];
    s.health = vec![vec![None; n]];
    Arc::new(ArcSwap::from_pointee(s))
}

/// A backend answering `<name>|<datagram>` to whoever sent it; returns what it received.
async fn backend(name: &'static str, ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let s = UdpSocket::bind((ip.parse::<std::net::IpAddr>().unwrap(), 0))
        .await
        .expect("bind a backend");
    let addr = s.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut reply = format!("{name}|").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, from).await;
        }
    });
    (addr, task)
}

struct Proxy {
    vip: SocketAddr,
    stats: Arc<UdpStats>,
    engine: Arc<Engine>,
    stop: watch::Sender<bool>,
}

async fn proxy(backends: &[SocketAddr], config: UdpConfig) -> Proxy {
    let cfg = self::config(backends);
    let snap = shared(&cfg);
    let engine = Arc::new(Engine::new(&cfg, &cfg.services[0], snap).unwrap());
    let sock = reuseport_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let vip = sock.local_addr().unwrap();
    let stats = Arc::new(UdpStats::default());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(sock, config, engine.clone(), stopped, stats.clone()));
    Proxy {
        vip,
        stats,
        engine,
        stop,
    }
}

const DEFAULT: UdpConfig = UdpConfig {
    max_flows: 100,
    idle_timeout: Duration::from_secs(30),
};

fn invite(call_id: &str, compact: bool, cseq: u32) -> Vec<u8> {
    let name = if compact { "i" } else { "Call-ID" };
    format!(
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK{cseq}\r\n{name}: {call_id}\r\nCSeq: {cseq} INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// Send `d` from `client` to the VIP and read the reply: (backend name, echoed datagram,
/// the reply's source).
async fn exchange(client: &UdpSocket, vip: SocketAddr, d: &[u8]) -> (String, Vec<u8>, SocketAddr) {
    client.send_to(d, vip).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
        .await
        .expect("a reply within the wait")
        .unwrap();
    let r = &buf[..n];
    let bar = r.iter().position(|&b| b == b'|').expect("name|datagram");
    (
        String::from_utf8_lossy(&r[..bar]).into_owned(),
        r[bar + 1..].to_vec(),
        from,
    )
}

#[tokio::test]
async fn every_message_of_a_call_reaches_one_backend_and_replies_come_from_the_vip() {
    let (b1, _t1) = backend("b1", "127.0.0.2").await;
    let (b2, _t2) = backend("b2", "127.0.0.3").await;
    let p = proxy(&[b1, b2], DEFAULT).await;
    let mut by_call: HashMap<String, HashSet<String>> = HashMap::new();
    let clients = [
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ];
    for call in 0..40 {
        let id = format!("call-{call}@10.0.0.9");
        for cseq in 1..=3 {
            // The same call from either client, full or compact header name.
            let c = &clients[(call + cseq as usize) % 2];
            let d = invite(&id, cseq % 2 == 0, cseq);
            let (name, echoed, from) = exchange(c, p.vip, &d).await;
            assert_eq!(echoed, d, "the datagram reaches the backend unchanged");
            assert_eq!(from, p.vip, "the reply comes from the VIP address and port");
            by_call.entry(id.clone()).or_default().insert(name);
        }
    }
    assert!(
        by_call.values().all(|b| b.len() == 1),
        "every call on one backend: {by_call:?}"
    );
    let used: HashSet<&String> = by_call.values().flatten().collect();
    assert_eq!(used.len(), 2, "calls spread over both backends");
    assert_eq!(p.stats.forwarded.load(Ordering::Relaxed), 120);
    assert_eq!(p.stats.replies.load(Ordering::Relaxed), 120);
    assert_eq!(active(&p.stats), 2, "one flow per client");
    assert!(p.engine.stats.persist_hits.load(Ordering::Relaxed) >= 80);
    let _ = p.stop.send(true);
}

#[tokio::test]
async fn non_sip_datagrams_are_dropped_and_counted_and_a_message_without_the_header_goes_by_source()
{
    let (b1, _t1) = backend("b1", "127.0.0.2").await;
    let (b2, _t2) = backend("b2", "127.0.0.3").await;
    let p = proxy(&[b1, b2], DEFAULT).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        &b"hello"[..],
        b"",
        b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nno colon here\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nCall-ID: a\0b\r\n\r\n",
    ] {
        c.send_to(junk, p.vip).await.unwrap();
    }
    // Without a Call-ID: by source address, the same backend every time.
    let bare = b"OPTIONS sip:x SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n";
    let first = exchange(&c, p.vip, bare).await.0;
    for _ in 0..10 {
        assert_eq!(exchange(&c, p.vip, bare).await.0, first);
    }
    assert_eq!(p.stats.dropped_malformed.load(Ordering::Relaxed), 6);
    assert_eq!(p.stats.forwarded.load(Ordering::Relaxed), 11);
    assert_eq!(p.stats.received.load(Ordering::Relaxed), 17);
    let _ = p.stop.send(true);
}

#[tokio::test]
async fn idle_flows_close_and_the_flow_limit_drops_new_clients() {
    let (b1, _t1) = backend("b1", "127.0.0.2").await;
    let p = proxy(
        &[b1],
        UdpConfig {
            max_flows: 1,
            idle_timeout: Duration::from_millis(200),
        },
    )
    .await;
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    exchange(&a, p.vip, &invite("x", false, 1)).await;
    // A second client while the first's flow is open: over the limit.
    b.send_to(&invite("y", false, 1), p.vip).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while p.stats.dropped_flow_limit.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.stats.dropped_flow_limit.load(Ordering::Relaxed), 1);
    // Once the first flow is idle past the timeout it closes, and the second gets through.
    while active(&p.stats) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active(&p.stats), 0, "the idle flow closed");
    assert_eq!(exchange(&b, p.vip, &invite("y", false, 2)).await.0, "b1");
    let _ = p.stop.send(true);
}

#[tokio::test]
async fn a_datagram_from_an_address_the_flow_never_sent_to_is_dropped() {
    // A backend driven by the test, to learn the flow's upstream address.
    let be = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let p = proxy(&[be.local_addr().unwrap()], DEFAULT).await;
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let d = invite("x", false, 1);
    c.send_to(&d, p.vip).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, flow) = tokio::time::timeout(WAIT, be.recv_from(&mut buf))
        .await
        .expect("the backend gets the datagram")
        .unwrap();
    assert_eq!(&buf[..n], &d[..]);
    // A stranger writes to the flow's socket: dropped, counted, never reaches the client.
    let stranger = UdpSocket::bind("127.0.0.5:0").await.unwrap();
    stranger
        .send_to(b"SIP/2.0 200 OK\r\n\r\n", flow)
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while p.stats.dropped_foreign.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.stats.dropped_foreign.load(Ordering::Relaxed), 1);
    // The backend's own answer does reach the client.
    be.send_to(b"SIP/2.0 100 Trying\r\n\r\n", flow)
        .await
        .unwrap();
    let (n, from) = tokio::time::timeout(WAIT, c.recv_from(&mut buf))
        .await
        .expect("the reply")
        .unwrap();
    assert_eq!(
        &buf[..n],
        b"SIP/2.0 100 Trying\r\n\r\n",
        "not the stranger's"
    );
    assert_eq!(from, p.vip);
    let _ = p.stop.send(true);
}

/// Binds every key to `backend`; the first lookup answers only once `hold` is released.
struct Mirrored {
    backend: u32,
    hold: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    asked: AtomicU64,
}

impl crate::engine::mirrored::Remote for Mirrored {
    fn lookup(
        &self,
        _: &str,
        _: &[(String, u128)],
    ) -> Option<futures_util::future::BoxFuture<'static, crate::engine::mirrored::Found>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        let hold = self.hold.lock().unwrap().take();
        let found = Some((0, self.backend));
        Some(Box::pin(async move {
            if let Some(h) = hold {
                let _ = h.await;
            }
            found
        }))
    }
}

#[tokio::test]
async fn a_call_bound_nowhere_here_goes_where_the_mirror_says_without_holding_other_clients() {
    let (b1, _t1) = backend("b1", "127.0.0.2").await;
    let (b2, _t2) = backend("b2", "127.0.0.3").await;
    let p = proxy(&[b1, b2], DEFAULT).await;
    let (release, hold) = tokio::sync::oneshot::channel();
    // The second backend is `b1` in the config (`b0`, `b1`).
    let remote = Arc::new(Mirrored {
        backend: lb_common::backend_identity("p", "b1"),
        hold: std::sync::Mutex::new(Some(hold)),
        asked: AtomicU64::new(0),
    });
    p.engine.set_remote(Some(remote.clone()));
    let held = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    held.send_to(&invite("held@10.0.0.9", false, 1), p.vip)
        .await
        .unwrap();
    // Other calls are answered while the first one's lookup is pending; the new calls
    // would spread over both backends without the mirror.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for call in 0..8 {
        let (name, _, _) = exchange(&other, p.vip, &invite(&format!("c{call}@x"), false, 1)).await;
        assert_eq!(name, "b2", "call {call}: where the mirror binds it");
    }
    let _ = release.send(());
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(WAIT, held.recv_from(&mut buf))
        .await
        .expect("the held call is answered once its lookup is")
        .unwrap();
    assert!(buf[..n].starts_with(b"b2|"), "the held call, on b2");
    assert_eq!(remote.asked.load(Ordering::Relaxed), 9);
    // Known here now: the next message of a call asks nothing.
    let (name, _, _) = exchange(&other, p.vip, &invite("c0@x", false, 2)).await;
    assert_eq!(name, "b2");
    assert_eq!(remote.asked.load(Ordering::Relaxed), 9);
    assert_eq!(p.engine.stats.new_assignments.load(Ordering::Relaxed), 0);
    let _ = p.stop.send(true);
}

/// A lookup task that panics still gives its place among the `MAX_ASKING` back.
#[tokio::test]
async fn a_panicking_lookup_task_frees_its_asking_place() {
    let count = Arc::new(AtomicU64::new(0));
    let asking = Asking::new(&count);
    assert_eq!(count.load(Ordering::Relaxed), 1, "counted while waiting");
    let task = tokio::spawn(async move {
        let _asking = asking;
        panic!("lookup task panics on purpose");
    });
    assert!(task.await.is_err(), "the task panicked");
    assert_eq!(
        count.load(Ordering::Relaxed),
        0,
        "the panicked task's place is given back"
    );
}
