//! The pass-through proxy in-process: a rustls client through it to a rustls server.

use std::{sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::{
    balancer::{Previous, assign_ids},
    config::Config,
    state::{BackendState, SharedSnapshot, Snapshot},
    tlswire::tests as tls,
};

const IO: Duration = Duration::from_secs(5);

/// A pass-through service whose b1 refuses connections (`dead` port) and b2 is `live`.
fn engine(dead: u16, live: u16) -> Arc<Engine> {
    let cfg = Arc::new(
        Config::parse(&format!(
            r#"{{"interface":"lo",
            "virtual_services":[{{"name":"tls","vip":"127.0.0.1","port":443,"protocol":"tcp","mode":"l7","pool":"web",
               "tls_passthrough":true,"persistence":"sess"}}],
            "pools":[{{"name":"web","backends":[{{"name":"b1","address":"127.0.0.1","port":{dead}}},
                                                {{"name":"b2","address":"127.0.0.2","port":{live}}}]}}],
            "persistence_profiles":[{{"name":"sess","type":"ssl-session-id"}}]}}"#
        ))
        .expect("valid test config"),
    );
    let ids = assign_ids(&cfg, &Previous::default()).unwrap();
    let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
    s.service_index = ids.services;
    s.backend_ids = ids.backends;
    s.backend_state = vec![vec![BackendState::Up; 2]];
    s.health = vec![vec![None; 2]];
    let snap: SharedSnapshot = Arc::new(ArcSwap::from_pointee(s));
    Arc::new(Engine::new(&cfg, &cfg.services[0], snap).expect("engine"))
}

fn limits() -> Limits {
    Limits {
        max_header_bytes: 4096,
        request_header_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// Serves pass-through on an ephemeral port; returns its address and the stop sender.
async fn start(engine: Arc<Engine>, stats: Arc<ProxyStats>) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let cfg = ProxyConfig {
        listen: addr,
        tls: None,
        proxy_protocol: None,
        trusted_forwarders: crate::cidr::Cidrs::default(),
        limits: limits(),
    };
    tokio::spawn(serve(listener, cfg, engine, stopped, stats));
    (addr, stop)
}

#[tokio::test]
async fn tls_reaches_the_live_backend_intact_and_the_refusing_one_is_retried() {
    // b2: a rustls TLS 1.2 server answering "pong:" + what it read.
    let (server, client) = tls::configs(&[&rustls::version::TLS12], false);
    let live = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let live_port = live.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = live.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&[b"pong:".as_slice(), &buf].concat()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    // b1: a port that refuses.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);

    let stats = Arc::new(ProxyStats::default());
    let e = engine(dead_port, live_port);
    let (addr, _stop) = start(e.clone(), stats.clone()).await;
    let connector = tokio_rustls::TlsConnector::from(client);
    for round in 0..3 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("backend.test").unwrap();
        let mut s = tokio::time::timeout(IO, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .unwrap_or_else(|e| panic!("round {round}: handshake through pass-through: {e}"));
        s.write_all(b"ping").await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(IO, s.read_to_end(&mut got))
            .await
            .expect("reply in time")
            .ok();
        assert_eq!(got, b"pong:ping", "round {round}");
    }
    let snap = stats.snapshot();
    assert!(snap.upstream_connect_errors >= 1, "b1 refused: {snap:?}");
    assert_eq!(snap.retries, snap.upstream_connect_errors, "{snap:?}");
    assert_eq!(snap.tls_hello_errors, 0);
    // Session IDs were learned from b2's ServerHellos; the resumptions (rounds 1, 2) were
    // sent there by them.
    let learned = e.stats.tls_sessions_learned.load(Ordering::Relaxed);
    assert_eq!(learned, 3, "one ServerHello per round");
    assert!(e.stats.persist_hits.load(Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn oversized_malformed_and_silent_clients_are_closed_and_counted() {
    let stats = Arc::new(ProxyStats::default());
    let (addr, _stop) = start(engine(1, 2), stats.clone()).await;
    let closed = |mut s: tokio::net::TcpStream| async move {
        let mut b = [0u8; 8];
        tokio::time::timeout(IO, s.read(&mut b))
            .await
            .expect("closed by the proxy in time")
            .unwrap_or(0)
    };
    // A ClientHello announcing 64 KiB (limit 4 KiB).
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[22, 3, 1, 0x40, 0, 1, 0, 0xff, 0xff])
        .await
        .unwrap();
    assert_eq!(closed(s).await, 0);
    // Not TLS.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"SSH-2.0-x\r\n").await.unwrap();
    assert_eq!(closed(s).await, 0);
    // Nothing at all: closed after the header timeout.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(closed(s).await, 0);
    let snap = stats.snapshot();
    assert_eq!(
        (snap.tls_hello_errors, snap.handshake_errors),
        (2, 1),
        "{snap:?}"
    );
    assert_eq!(snap.upstream_connect_errors, 0, "no backend was tried");
}

/// Takes every key's binding to `backend` (mirroring's Redis, as the engine sees it).
struct BindsAllTo(u32, std::sync::atomic::AtomicU64);

impl crate::engine::mirrored::Remote for BindsAllTo {
    fn lookup(
        &self,
        _: &str,
        _: &[(String, u128)],
    ) -> Option<futures_util::future::BoxFuture<'static, crate::engine::mirrored::Found>> {
        self.1.fetch_add(1, Ordering::Relaxed);
        let found = Some((0, self.0));
        Some(Box::pin(async move { found }))
    }
}

/// A listener that answers every connection with `name` once it has read something.
async fn named_backend(ip: &str, name: &'static [u8]) -> u16 {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                if tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {
                    let _ = tcp.write_all(name).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_session_bound_nowhere_here_asks_the_mirror_and_goes_where_it_says() {
    let b1 = named_backend("127.0.0.1", b"b1").await;
    let b2 = named_backend("127.0.0.2", b"b2").await;
    let e = engine(b1, b2);
    let remote = Arc::new(BindsAllTo(
        lb_common::backend_identity("web", "b2"),
        Default::default(),
    ));
    e.set_remote(Some(remote.clone()));
    let (addr, _stop) = start(e.clone(), Arc::new(ProxyStats::default())).await;
    // New session IDs each time: round robin alone would reach b1 too.
    for n in 0..4u8 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&tls::client_hello_record(&[n + 1; 32]))
            .await
            .unwrap();
        let mut got = [0u8; 2];
        tokio::time::timeout(IO, s.read_exact(&mut got))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(&got, b"b2", "connection {n}");
    }
    assert_eq!(
        remote.1.load(Ordering::Relaxed),
        4,
        "one lookup per session"
    );
    assert_eq!(e.stats.persist_hits.load(Ordering::Relaxed), 4);
    assert_eq!(e.stats.new_assignments.load(Ordering::Relaxed), 0);
}
