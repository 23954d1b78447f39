//! The admin server's access rules over real sockets: the CLI over the Unix socket with no
//! credential, TCP refused without the token or with a foreign Host or Origin.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_open_to_its_owner_and_tcp_needs_the_token() {
    let pins = setup_pins();
    let shared: SharedSnapshot = Arc::new(ArcSwap::from_pointee(snapshot(pins.dir.clone())));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let dir = std::env::temp_dir().join(format!("tether-admin-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sock = dir.join("admin.sock");
    let unix = access::bind_unix(&sock).expect("bind unix");
    unix.set_nonblocking(true).expect("nonblocking");
    let unix = UnixListener::from_std(unix).expect("tokio unix listener");
    let meta = std::fs::metadata(&sock).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(
        Listeners {
            tcp: Some((listener, Access::new(addr, TOKEN.into()))),
            unix: Some(unix),
        },
        Arc::clone(&shared),
        None,
        stop_rx,
    ));

    // No credential: every route that reveals clients or changes state is 401, and the flush
    // deletes nothing.
    let host = addr.to_string();
    for (m, p) in [
        ("GET", "/status"),
        ("GET", "/persist"),
        ("POST", "/persist/flush"),
    ] {
        let r = send_with(addr, m, p, &[("host", &host)]).await;
        assert_eq!(r.status, 401, "{m} {p}: {}", r.body);
        assert!(
            r.headers[hyper::header::WWW_AUTHENTICATE]
                .to_str()
                .expect("ascii")
                .starts_with("Bearer"),
            "{m} {p}"
        );
    }
    let wrong = format!("Bearer {TOKEN}0");
    let r = send_with(
        addr,
        "POST",
        "/persist/flush",
        &[("host", &host), ("authorization", &wrong)],
    )
    .await;
    assert_eq!(r.status, 401, "wrong token: {}", r.body);
    let all: api::PersistList = parse(&send(addr, "GET", "/persist").await);
    assert_eq!(
        all.entries.len(),
        5,
        "nothing was flushed without the token"
    );

    // DNS rebinding and cross-site requests: 403 even with the token.
    let auth = format!("Bearer {TOKEN}");
    let rebound = format!("tether.evil.example:{}", addr.port());
    let r = send_with(
        addr,
        "GET",
        "/persist",
        &[("host", &rebound), ("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 403, "foreign Host: {}", r.body);
    let r = send_with(
        addr,
        "POST",
        "/persist/flush",
        &[
            ("host", &host),
            ("origin", "http://evil.example"),
            ("authorization", &auth),
        ],
    )
    .await;
    assert_eq!(r.status, 403, "cross-origin: {}", r.body);
    let r = send_with(addr, "GET", "/metrics", &[("host", &rebound)]).await;
    assert_eq!(r.status, 403, "/metrics under a foreign Host: {}", r.body);

    // /metrics stays open on loopback.
    let r = send_with(addr, "GET", "/metrics", &[("host", &host)]).await;
    assert_eq!(r.status, 200, "loopback /metrics: {}", r.body);

    // The CLI over the socket needs nothing, and can flush.
    let ep = cli::Endpoint::Unix(sock.clone());
    let (status, flushed) = tokio::task::spawn_blocking(move || {
        (
            cli::status(&ep).expect("cli status over the socket"),
            cli::persist_flush(&ep, None, Some("10.0.1.9".parse().expect("ip")), None)
                .expect("cli flush over the socket"),
        )
    })
    .await
    .expect("cli thread");
    assert!(status.contains("service web"), "{status}");
    assert_eq!(flushed, "flushed 1 persistence entry\n");

    stop_tx.send(true).expect("server listening");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns on shutdown")
        .expect("serve task");
    let _ = std::fs::remove_dir_all(&dir);
    drop(pins);
}
