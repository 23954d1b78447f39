use std::{fs, os::unix::fs::PermissionsExt as _};

use hyper::header::HeaderValue;

use super::*;

const T: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).expect("header value"));
    }
    h
}

fn tcp(s: &str) -> Peer {
    Peer::Tcp(s.parse().expect("peer"))
}

fn kind(r: Result<(), Denied>) -> &'static str {
    match r {
        Ok(()) => "ok",
        Err(Denied::Unauthorized(_)) => "401",
        Err(Denied::Forbidden(_)) => "403",
    }
}

#[test]
fn host_must_name_the_listen_address() {
    let auth = format!("Bearer {T}");
    let cases: &[(&str, &str, &str)] = &[
        ("127.0.0.1:9180", "127.0.0.1:9180", "ok"),
        ("127.0.0.1:9180", "localhost:9180", "ok"),
        ("127.0.0.1:9180", "LOCALHOST:9180", "ok"),
        ("127.0.0.1:9180", "[::1]:9180", "ok"),
        ("127.0.0.1:9180", "127.0.0.1:9181", "403"),
        ("127.0.0.1:9180", "127.0.0.1", "403"),
        ("127.0.0.1:9180", "evil.example:9180", "403"),
        ("127.0.0.1:9180", "localhost.evil.example:9180", "403"),
        ("127.0.0.1:9180", "user@127.0.0.1:9180", "403"),
        ("127.0.0.1:9180", "", "403"),
        ("0.0.0.0:9180", "10.1.2.3:9180", "ok"),
        ("0.0.0.0:9180", "localhost:9180", "ok"),
        ("0.0.0.0:9180", "admin.example:9180", "403"),
        ("10.0.0.5:9180", "10.0.0.5:9180", "ok"),
        ("10.0.0.5:9180", "localhost:9180", "403"),
        ("10.0.0.5:9180", "10.0.0.6:9180", "403"),
        ("[::1]:80", "[::1]", "ok"),
        ("[::1]:80", "localhost", "ok"),
    ];
    for (listen, host, want) in cases {
        let a = Access::new(listen.parse().expect("listen"), T.into());
        let h = headers(&[("host", host), ("authorization", &auth)]);
        assert_eq!(
            kind(a.check(tcp("127.0.0.1:5000"), "/status", &h)),
            *want,
            "listen {listen}, Host {host:?}"
        );
    }
    let a = Access::new("127.0.0.1:9180".parse().expect("listen"), T.into());
    let h = headers(&[("authorization", &auth)]);
    assert_eq!(
        kind(a.check(tcp("127.0.0.1:5000"), "/status", &h)),
        "403",
        "no Host"
    );
}

#[test]
fn cross_origin_requests_are_refused() {
    let a = Access::new("127.0.0.1:9180".parse().expect("listen"), T.into());
    let auth = format!("Bearer {T}");
    for (origin, want) in [
        ("http://127.0.0.1:9180", "ok"),
        ("http://evil.example", "403"),
        ("https://127.0.0.1:9180", "403"),
        ("null", "403"),
        ("http://127.0.0.1:9180.evil.example", "403"),
    ] {
        let h = headers(&[
            ("host", "127.0.0.1:9180"),
            ("origin", origin),
            ("authorization", &auth),
        ]);
        assert_eq!(
            kind(a.check(tcp("127.0.0.1:5000"), "/persist/flush", &h)),
            want,
            "Origin {origin}"
        );
        // Not even the open /metrics answers a cross-site page.
        let h = headers(&[("host", "127.0.0.1:9180"), ("origin", origin)]);
        if want == "403" {
            assert_eq!(
                kind(a.check(tcp("127.0.0.1:5000"), "/metrics", &h)),
                "403",
                "/metrics, Origin {origin}"
            );
        }
    }
}

#[test]
fn token_is_required_except_loopback_metrics_and_the_socket() {
    let a = Access::new("0.0.0.0:9180".parse().expect("listen"), T.into());
    let host = ("host", "127.0.0.1:9180");
    let none = headers(&[host]);
    let good = headers(&[host, ("authorization", &format!("bearer {T}"))]);
    let wrong = headers(&[host, ("authorization", &format!("Bearer {T}x"))]);
    let basic = headers(&[host, ("authorization", &format!("Basic {T}"))]);
    for path in ["/status", "/persist", "/persist/flush", "/nope"] {
        assert_eq!(
            kind(a.check(tcp("127.0.0.1:1"), path, &none)),
            "401",
            "{path}"
        );
        assert_eq!(
            kind(a.check(tcp("127.0.0.1:1"), path, &wrong)),
            "401",
            "{path}"
        );
        assert_eq!(
            kind(a.check(tcp("127.0.0.1:1"), path, &basic)),
            "401",
            "{path}"
        );
        assert_eq!(
            kind(a.check(tcp("127.0.0.1:1"), path, &good)),
            "ok",
            "{path}"
        );
        assert_eq!(
            kind(a.check(Peer::Unix, path, &HeaderMap::new())),
            "ok",
            "{path}"
        );
    }
    assert_eq!(kind(a.check(tcp("127.0.0.1:1"), "/metrics", &none)), "ok");
    assert_eq!(kind(a.check(tcp("[::1]:1"), "/metrics", &none)), "ok");
    assert_eq!(
        kind(a.check(tcp("[::ffff:127.0.0.1]:1"), "/metrics", &none)),
        "ok"
    );
    assert_eq!(
        kind(a.check(tcp("10.0.0.9:1"), "/metrics", &none)),
        "401",
        "/metrics off loopback needs the token"
    );
    assert_eq!(kind(a.check(tcp("10.0.0.9:1"), "/metrics", &good)), "ok");
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tether-access-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

#[test]
fn token_file_is_created_private_and_reused() {
    let dir = scratch("token");
    let path = dir.join("state").join("admin.token");
    let t = load_or_create_token(&path).expect("created");
    assert_eq!(t.len(), TOKEN_HEX, "{t}");
    assert!(t.bytes().all(|b| b.is_ascii_hexdigit()), "{t}");
    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "token file mode");
    assert_eq!(mode(path.parent().expect("dir")), 0o700, "state dir mode");
    assert_eq!(load_or_create_token(&path).expect("reread"), t, "reused");
    assert_eq!(
        fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .count(),
        1,
        "no temporary file left"
    );

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = load_or_create_token(&path).expect_err("world-readable");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");

    let link = dir.join("link.token");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let e = load_or_create_token(&link).expect_err("symlink");
    assert!(e.to_string().contains("symlinks are refused"), "{e}");

    fs::write(&path, "short\n").expect("write");
    let e = load_or_create_token(&path).expect_err("short token");
    assert!(e.to_string().contains("at least 32"), "{e}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn unix_socket_is_0600_and_replaces_a_stale_one() {
    let dir = scratch("sock");
    let path = dir.join("run").join("t.sock");
    let l = bind_unix(&path).expect("bind");
    let meta = fs::symlink_metadata(&path).expect("socket exists");
    assert!(
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
        "{meta:?}"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), unsafe { libc::geteuid() }, "owned by us");
    drop(l);
    // A stale socket (its daemon gone) is replaced; the guard removes only its own.
    let l2 = bind_unix(&path).expect("rebind over a stale socket");
    let guard = SocketFile::new(path.clone());
    std::os::unix::net::UnixStream::connect(&path).expect("connects");
    drop(guard);
    assert!(!path.exists(), "removed on drop");
    drop(l2);
    assert_eq!(
        socket_path(Path::new("/sys/fs/bpf/tether-a")),
        Path::new("/run/tether/tether-a.sock")
    );
    let _ = fs::remove_dir_all(&dir);
}
