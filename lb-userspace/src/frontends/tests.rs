//! Reloads of L7 frontends: all or nothing, sockets kept, certificates renewed in place.

use std::{
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::*;
use crate::proxy::tests::pem;
use crate::state::Snapshot;

/// A scratch directory with a certificate and key, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Dir {
    fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-frontends-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }

    /// Writes a new self-signed certificate and key in place; returns the certificate.
    fn renew(&self) -> CertificateDer<'static> {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(self.cert(), pem("CERTIFICATE", c.cert.der())).unwrap();
        std::fs::write(
            self.key(),
            pem("PRIVATE KEY", &c.signing_key.serialize_der()),
        )
        .unwrap();
        c.cert.der().clone()
    }
}

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One L7 service `web` on 127.0.0.1:`port` over one backend, with `extra` fields.
fn config(port: u16, extra: &str) -> Arc<Config> {
    let text = format!(
        r#"{{"interface":"lo",
            "virtual_services":[{{"name":"web","vip":"127.0.0.1","port":{port},"protocol":"tcp",
                                 "mode":"l7","pool":"web"{extra}}}],
            "pools":[{{"name":"web","backends":[{{"name":"b1","address":"127.0.0.1","port":1}}]}}]}}"#
    );
    Arc::new(Config::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

fn tls_fields(dir: &Dir) -> String {
    format!(
        r#","tls":{{"cert_file":"{}","key_file":"{}"}}"#,
        dir.cert().display(),
        dir.key().display()
    )
}

fn shared(cfg: &Arc<Config>) -> SharedSnapshot {
    Arc::new(ArcSwap::from_pointee(Snapshot::empty(
        cfg.clone(),
        SystemTime::now(),
    )))
}

fn reload(f: &mut Frontends, cfg: &Arc<Config>) -> Result<(), FrontendError> {
    let prepared = f.prepare(cfg, &shared(cfg), &mut Inherited::default())?;
    f.commit(prepared);
    Ok(())
}

/// The inode of the socket behind a frontend's listening socket.
fn socket_inode(f: &Frontends) -> u64 {
    let (_, fd) = f.sockets()[0];
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .ino()
}

/// The certificate a new TLS connection to `port` is shown (trusting exactly `expected`).
async fn served_cert(port: u16, expected: &CertificateDer<'static>) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(expected.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap_or_else(|e| panic!("TLS handshake trusting the expected certificate: {e}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn assert_refused_at(e: FrontendError, field: &str, file: &Path) {
    match e {
        FrontendError::Tls(c) => {
            assert_eq!(c.path, field, "{c}");
            assert!(c.reason.contains(&file.display().to_string()), "{c}");
        }
        other => panic!("expected a TLS field error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificate_is_served_after_reload_on_the_same_socket() {
    let dir = Dir::new();
    let first = dir.renew();
    let port = free_port();
    let cfg = config(port, &tls_fields(&dir));
    let mut f = Frontends::default();
    reload(&mut f, &cfg).unwrap();
    assert_eq!(served_cert(port, &first).await, first);
    let inode = socket_inode(&f);

    // Renewed in place: same paths, same config text.
    let second = dir.renew();
    reload(&mut f, &cfg).unwrap();
    assert_eq!(
        served_cert(port, &second).await,
        second,
        "a new connection sees the renewed certificate"
    );
    assert_eq!(socket_inode(&f), inode, "the listening socket is kept");
    assert!(f.is_serving("web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_on_reload_is_refused_and_the_old_one_serves() {
    let dir = Dir::new();
    let good = dir.renew();
    let port = free_port();
    let cfg = config(port, &tls_fields(&dir));
    let mut f = Frontends::default();
    reload(&mut f, &cfg).unwrap();
    let before = f.tls_config("web").unwrap();

    // A truncated certificate: the file exists (config validation passes), it does not load.
    std::fs::write(dir.cert(), "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let e = f
        .prepare(&cfg, &shared(&cfg), &mut Inherited::default())
        .err()
        .expect("a bad certificate is refused");
    assert_refused_at(e, "virtual_services[0].tls.cert_file", &dir.cert());
    assert!(Arc::ptr_eq(&f.tls_config("web").unwrap(), &before));
    assert!(f.is_serving("web"));
    assert_eq!(
        served_cert(port, &good).await,
        good,
        "the old certificate serves"
    );

    // A key that does not belong: refused at the key file when it is not a key at all.
    dir.renew();
    std::fs::write(dir.key(), "not a key\n").unwrap();
    let e = f
        .prepare(&cfg, &shared(&cfg), &mut Inherited::default())
        .err()
        .expect("a bad key is refused");
    assert_refused_at(e, "virtual_services[0].tls.key_file", &dir.key());
    assert!(Arc::ptr_eq(&f.tls_config("web").unwrap(), &before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reload_changes_nothing_and_binds_nothing() {
    let dir = Dir::new();
    dir.renew();
    let port = free_port();
    let cfg = config(port, "");
    let mut f = Frontends::default();
    reload(&mut f, &cfg).unwrap();
    let inode = socket_inode(&f);
    // The reload adds TLS whose certificate does not load, and changes a limit.
    std::fs::write(dir.cert(), "garbage").unwrap();
    let bad = config(
        port,
        &format!(r#"{},"limits":{{"max_connections":5}}"#, tls_fields(&dir)),
    );
    let e = f
        .prepare(&bad, &shared(&bad), &mut Inherited::default())
        .err();
    assert!(matches!(e, Some(FrontendError::Tls(_))), "{e:?}");
    assert!(f.tls_config("web").is_none(), "still cleartext");
    assert_eq!(socket_inode(&f), inode);
    // The cleartext listener still accepts.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_settings_change_restarts_the_task_on_the_same_socket() {
    let port = free_port();
    let mut f = Frontends::default();
    reload(&mut f, &config(port, "")).unwrap();
    let inode = socket_inode(&f);
    reload(&mut f, &config(port, r#","limits":{"max_connections":5}"#)).unwrap();
    assert_eq!(socket_inode(&f), inode, "same socket, new serve task");
    assert!(f.is_serving("web"));
    // A new address is a new socket; the old one closes once its task drained.
    let other = free_port();
    reload(&mut f, &config(other, "")).unwrap();
    assert_ne!(socket_inode(&f), inode);
    assert_eq!(f.sockets()[0].0.port(), other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inherited_sockets_are_used_and_stopped_frontends_resume() {
    let port = free_port();
    let cfg = config(port, "");
    let inherited_socket =
        crate::workers::listen_group(SocketAddr::from(([127, 0, 0, 1], port)), vec![], 1, 128)
            .unwrap()
            .remove(0);
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", inherited_socket.as_raw_fd()))
        .unwrap()
        .ino();
    let mut inherited = Inherited {
        listeners: HashMap::from([(
            SocketAddr::from(([127, 0, 0, 1], port)),
            vec![inherited_socket],
        )]),
        ..Inherited::default()
    };
    let mut f = Frontends::default();
    let prepared = f.prepare(&cfg, &shared(&cfg), &mut inherited).unwrap();
    assert!(
        inherited.listeners.is_empty(),
        "the frontend took the inherited socket"
    );
    assert_eq!(
        prepared.routers().map(|(n, _)| n).collect::<Vec<_>>(),
        ["web"]
    );
    f.commit(prepared);
    assert_eq!(socket_inode(&f), ino);
    f.stop_accepting("test");
    assert!(!f.is_serving("web"));
    // Stopped, the socket still queues connections.
    let _queued = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("not refused while stopped");
    f.resume(&cfg);
    assert!(f.is_serving("web"));
    assert_eq!(socket_inode(&f), ino);
}

/// The inodes of every listening socket of the frontends.
fn socket_inodes(f: &Frontends) -> Vec<u64> {
    f.sockets()
        .iter()
        .map(|(_, fd)| {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_gets_a_socket_and_a_successor_takes_them_all() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = config(port, "");
    let mut f = Frontends::new(Workers::start(2).unwrap());
    reload(&mut f, &cfg).unwrap();
    let first = socket_inodes(&f);
    assert_eq!(first.len(), 2, "one SO_REUSEPORT socket per worker");
    assert!(f.sockets().iter().all(|(a, _)| *a == addr));
    // A reload that keeps the address keeps every socket.
    reload(&mut f, &config(port, r#","limits":{"max_connections":10}"#)).unwrap();
    assert_eq!(socket_inodes(&f), first, "a reload keeps the sockets");

    // A successor with three workers (a restart) takes both and binds a third.
    let handed: Vec<std::net::TcpListener> = f
        .sockets()
        .iter()
        .map(|(_, fd)| fd.try_clone_to_owned().unwrap().into())
        .collect();
    let mut inherited = Inherited {
        listeners: HashMap::from([(addr, handed)]),
        ..Inherited::default()
    };
    let mut g = Frontends::new(Workers::start(3).unwrap());
    let prepared = g.prepare(&cfg, &shared(&cfg), &mut inherited).unwrap();
    assert!(
        inherited.listeners.is_empty(),
        "the successor took the sockets"
    );
    g.commit(prepared);
    let next = socket_inodes(&g);
    assert_eq!(
        next.len(),
        3,
        "the missing worker's socket joined the group"
    );
    assert_eq!(
        &next[..2],
        &first[..],
        "the handed sockets come first, kept"
    );
    f.stop_accepting("handed over");
    g.stop_accepting("test over");
}

/// A successor with more workers than the sockets it was handed (a restart) binds the extra
/// socket but listens on it only once it commits: the connections made while it prepares
/// all wait on the handed sockets, which the old process still serves, so a handoff that
/// aborts loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successors_extra_socket_takes_no_connection_before_it_commits() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = config(port, "");
    let mut f = Frontends::new(Workers::start(2).unwrap());
    reload(&mut f, &cfg).unwrap();
    // Prepares `g` on the sockets `f` listens on, as a restart's successor does.
    let prepare = |g: &mut Frontends, f: &Frontends| {
        let listeners = f
            .sockets()
            .iter()
            .map(|(_, fd)| fd.try_clone_to_owned().unwrap().into())
            .collect();
        g.prepare(
            &cfg,
            &shared(&cfg),
            &mut Inherited {
                listeners: HashMap::from([(addr, listeners)]),
                ..Inherited::default()
            },
        )
        .unwrap()
    };
    let mut g = Frontends::new(Workers::start(3).unwrap());
    let prepared = prepare(&mut g, &f);
    // The kernel spreads new connections over every listening socket of the group: with a
    // third one listening, about a third of these would wait on it.
    let mut conns = Vec::new();
    for _ in 0..64 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        conns.push(c);
    }
    drop(prepared); // The handoff aborted.
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut head))
            .await
            .unwrap_or_else(|_| panic!("connection {i}: no answer"))
            .unwrap_or_else(|e| panic!("connection {i} lost with the successor's socket: {e}"));
        assert_eq!(
            &head, b"HTTP/1.1 ",
            "connection {i} answered by the old frontend"
        );
    }
    // A successor that commits listens on its extra socket too.
    let prepared = prepare(&mut g, &f);
    f.stop_accepting("handed over");
    g.commit(prepared);
    assert_eq!(socket_inodes(&g).len(), 3, "three listening sockets");
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut head))
        .await
        .expect("the successor answers")
        .unwrap();
    g.stop_accepting("test over");
}

/// A SIP service `sip` on 127.0.0.1:`port` over one backend, every backend up.
fn sip_config(port: u16, backend: SocketAddr) -> (Arc<Config>, SharedSnapshot) {
    let text = format!(
        r#"{{"interface":"lo",
            "virtual_services":[{{"name":"sip","vip":"127.0.0.1","port":{port},"protocol":"udp",
                                 "mode":"l7","pool":"p","persistence":"calls"}}],
            "pools":[{{"name":"p","backends":[{{"name":"b1","address":"127.0.0.1","port":{}}}]}}],
            "persistence_profiles":[{{"name":"calls","type":"sip-header","timeout_s":60}}]}}"#,
        backend.port()
    );
    let cfg = Arc::new(Config::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}")));
    let ids = crate::balancer::assign_ids(&cfg, &Default::default()).unwrap();
    let mut s = Snapshot::empty(cfg.clone(), SystemTime::now());
    s.service_index = ids.services;
    s.backend_ids = ids.backends;
    s.backend_state = vec![vec![crate::state::BackendState::Up]];
    s.health = vec![vec![None]];
    (cfg, Arc::new(ArcSwap::from_pointee(s)))
}

/// The control runtime (this test's only thread) blocked in a system call does not hold a
/// SIP service's datagrams back: the UDP proxy runs on a worker runtime.
#[tokio::test(flavor = "current_thread")]
async fn a_sip_exchange_completes_while_the_control_runtime_is_blocked() {
    // A backend on a plain thread, answering `b1|<datagram>` (no runtime involved).
    let backend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    backend
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (n, from) = backend.recv_from(&mut buf).expect("the proxied datagram");
        let mut reply = b"b1|".to_vec();
        reply.extend_from_slice(&buf[..n]);
        backend.send_to(&reply, from).unwrap();
    });
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cfg, snap) = sip_config(port, backend_addr);
    let mut f = Frontends::new(Workers::start(1).unwrap());
    f.commit(f.prepare(&cfg, &snap, &mut Inherited::default()).unwrap());

    // From here on this runtime's thread blocks: nothing on the control runtime runs.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let invite = b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK1\r\nCall-ID: blocked-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    client.send_to(invite, ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = client
        .recv_from(&mut buf)
        .expect("the backend's answer while the control runtime is blocked");
    assert_eq!(from.port(), port, "the answer comes from the VIP");
    assert_eq!(&buf[..3], b"b1|");
    assert_eq!(&buf[3..n], invite, "the datagram went through unchanged");
    echo.join().unwrap();

    // Shutting down waits for the UDP task on its worker, as for the TCP ones.
    f.drain(Duration::from_secs(5)).await;
    assert!(f.tasks.is_empty(), "the UDP serve task ended on its worker");
}

/// A reload that changes a SIP service's limits starts its new task (on the same socket) on
/// a worker and stops the old one; a reload without the service stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sip_service_reloaded_or_removed_moves_or_stops_its_worker_task() {
    let backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf).await {
            let _ = backend.send_to(&buf[..n], from).await;
        }
    });
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cfg, snap) = sip_config(port, backend_addr);
    let mut f = Frontends::new(Workers::start(2).unwrap());
    f.commit(f.prepare(&cfg, &snap, &mut Inherited::default()).unwrap());
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Sent again when unanswered, as SIP over UDP does: the answer to a datagram the old task
    // forwarded just before it stopped is lost with its flow.
    let exchange = async |call: &str| {
        let msg = format!(
            "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK{call}\r\nCall-ID: {call}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        );
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            client
                .send_to(msg.as_bytes(), ("127.0.0.1", port))
                .await
                .unwrap();
            let wait = Duration::from_millis(500);
            if let Ok(r) = tokio::time::timeout(wait, client.recv_from(&mut buf)).await {
                let (n, _) = r.unwrap();
                assert_eq!(&buf[..n], msg.as_bytes());
                return;
            }
        }
        panic!("no answer to {call} in 10 tries");
    };
    exchange("first").await;
    let first = f.udp["sip"].router.clone();

    // New limits: a new serve task on the same socket, the same engine (its Call-IDs kept).
    let mut changed = (*cfg).clone();
    let crate::config::ServiceMode::L7(o) = &mut changed.services[0].mode else {
        panic!("an l7 service");
    };
    o.limits.max_connections = 7;
    let changed = Arc::new(changed);
    f.commit(
        f.prepare(&changed, &snap, &mut Inherited::default())
            .unwrap(),
    );
    assert!(
        Arc::ptr_eq(&f.udp["sip"].router, &first),
        "the engine is kept"
    );
    exchange("second").await;

    // Removed: its task stops; back again: served again.
    let mut without = (*cfg).clone();
    without.services.clear();
    f.commit(
        f.prepare(&Arc::new(without), &snap, &mut Inherited::default())
            .unwrap(),
    );
    assert!(f.udp.is_empty());
    f.commit(f.prepare(&cfg, &snap, &mut Inherited::default()).unwrap());
    exchange("third").await;
    f.drain(Duration::from_secs(5)).await;
    assert!(f.tasks.is_empty(), "every UDP serve task ended");
}

/// A backend on the test runtime that sends every datagram back unchanged.
async fn echo_backend() -> SocketAddr {
    let backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf).await {
            let _ = backend.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Holds worker 0 of `workers` in a blocking call until the returned sender is dropped:
/// the serve tasks on it read nothing meanwhile, and datagrams queue in their socket.
fn block_worker(workers: &Workers) -> std::sync::mpsc::Sender<()> {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    workers.handle(0).spawn(async move {
        started_tx.send(()).unwrap();
        let _ = released.recv();
    });
    started
        .recv_timeout(Duration::from_secs(10))
        .expect("the worker runs the blocking task");
    release
}

/// One OPTIONS request from each of `n` clients (each its own source port, so the kernel
/// would spread them over every socket of a `SO_REUSEPORT` group) to 127.0.0.1:`port`.
async fn send_calls(port: u16, n: usize, tag: &str) -> Vec<(tokio::net::UdpSocket, String)> {
    let mut calls = Vec::new();
    for i in 0..n {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let msg = format!(
            "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK{tag}{i}\r\nCall-ID: {tag}-{i}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        );
        client
            .send_to(msg.as_bytes(), ("127.0.0.1", port))
            .await
            .unwrap();
        calls.push((client, msg));
    }
    calls
}

/// Every call of `send_calls` is answered (sent once, never again: a datagram lost on a
/// closed or abandoned socket stays unanswered).
async fn expect_answers(calls: Vec<(tokio::net::UdpSocket, String)>) {
    let mut buf = [0u8; 2048];
    for (client, msg) in calls {
        let call = msg.lines().nth(2).unwrap_or_default().to_string();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{call}: no answer (the datagram was lost)"))
            .unwrap();
        assert_eq!(&buf[..n], msg.as_bytes(), "{call}: its own answer");
    }
}

fn udp_received(f: &Frontends) -> u64 {
    f.udp["sip"].udp.received.load(Ordering::Relaxed)
}

/// A reload that changes a SIP service's idle timeout keeps its socket: the datagrams
/// queued in it while the serve tasks swap are all read by the new task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sip_reload_keeps_the_socket_and_loses_no_queued_datagram() {
    let backend = echo_backend().await;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cfg, snap) = sip_config(port, backend);
    let mut f = Frontends::new(Workers::start(1).unwrap());
    f.commit(f.prepare(&cfg, &snap, &mut Inherited::default()).unwrap());
    let before = f.udp_sockets()[0].1.try_clone_to_owned().unwrap();

    let release = block_worker(&f.workers);
    let calls = send_calls(port, 32, "reload").await;
    let mut changed = (*cfg).clone();
    let crate::config::ServiceMode::L7(o) = &mut changed.services[0].mode else {
        panic!("an l7 service");
    };
    o.limits.idle_timeout = Duration::from_secs(7);
    let changed = Arc::new(changed);
    f.commit(
        f.prepare(&changed, &snap, &mut Inherited::default())
            .unwrap(),
    );
    assert_eq!(
        f.udp["sip"].config.idle_timeout,
        Duration::from_secs(7),
        "the new settings serve"
    );
    drop(release);
    expect_answers(calls).await;
    let inode = |fd: std::os::fd::BorrowedFd<'_>| {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    };
    use std::os::fd::AsFd as _;
    assert_eq!(
        inode(f.udp_sockets()[0].1),
        inode(before.as_fd()),
        "the same socket"
    );
    f.drain(Duration::from_secs(5)).await;
}

/// A restart's successor reads the UDP socket it was handed from commit on and binds none
/// of its own: datagrams sent while it prepares and then aborts are all answered by the
/// old daemon (also when it had stopped), and those queued while the old one stopped are
/// all answered by the new one once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_sip_socket_loses_no_datagram_on_abort_or_commit() {
    let backend = echo_backend().await;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (cfg, snap) = sip_config(port, backend);
    let mut f = Frontends::new(Workers::start(1).unwrap());
    f.commit(f.prepare(&cfg, &snap, &mut Inherited::default()).unwrap());
    let handed = |f: &Frontends| Inherited {
        udp: f
            .udp_sockets()
            .iter()
            .map(|(a, fd)| (*a, fd.try_clone_to_owned().unwrap().into()))
            .collect(),
        ..Inherited::default()
    };
    assert_eq!(handed(&f).udp.keys().collect::<Vec<_>>(), [&addr]);

    // Prepared, then aborted: the old daemon answers everything.
    let g = Frontends::new(Workers::start(1).unwrap());
    let mut inherited = handed(&f);
    let prepared = g.prepare(&cfg, &snap, &mut inherited).unwrap();
    assert!(inherited.udp.is_empty(), "the successor took the socket");
    expect_answers(send_calls(port, 32, "aborted").await).await;
    drop(prepared);
    assert_eq!(udp_received(&f), 32, "the old daemon read every datagram");
    // Aborted after the old daemon stopped: it reads again, what queued meanwhile included.
    let prepared = g.prepare(&cfg, &snap, &mut handed(&f)).unwrap();
    f.stop_accepting("handing over");
    let calls = send_calls(port, 32, "resumed").await;
    drop(prepared);
    f.resume(&cfg);
    expect_answers(calls).await;
    assert_eq!(
        udp_received(&f),
        64,
        "the old daemon read them on its socket"
    );

    // Committed: the old one stops reading while datagrams wait in the socket; the new one
    // reads them all once it commits.
    let mut g = Frontends::new(Workers::start(1).unwrap());
    let prepared = g.prepare(&cfg, &snap, &mut handed(&f)).unwrap();
    let release = block_worker(&f.workers);
    let calls = send_calls(port, 32, "committed").await;
    f.stop_accepting("handed over");
    drop(release);
    g.commit(prepared);
    expect_answers(calls).await;
    assert_eq!(udp_received(&f), 64, "the old daemon read nothing more");
    assert_eq!(udp_received(&g), 32, "the new daemon read every datagram");
    f.drain(Duration::from_secs(5)).await;
    g.drain(Duration::from_secs(5)).await;
}
