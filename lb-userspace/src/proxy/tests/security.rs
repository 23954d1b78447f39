//! Hostile clients: PROXY headers from untrusted peers, spoofed forwarding headers, one source
//! opening many connections, many HTTP/2 streams, slow bodies, and the per-backend cap.

use super::*;
use crate::cidr::Cidrs;

async fn start_cfg(
    router: Arc<TestRouter>,
    tls: Option<TlsFiles>,
    proxy_protocol: Option<Cidrs>,
    trusted_forwarders: Cidrs,
    limits: Limits,
) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ProxyConfig {
        listen: addr,
        tls: tls.map(|f| TlsHandle::load(&f).unwrap()),
        proxy_protocol,
        trusted_forwarders,
        limits,
    };
    let stats = Arc::new(ProxyStats::default());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(serve_with_stats(listener, cfg, router, rx, stats.clone()));
    Proxy {
        addr,
        stats,
        stop,
        task: Some(task),
    }
}

fn cidrs(items: &[&str]) -> Cidrs {
    Cidrs::parse(items).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peer_cannot_send_a_proxy_header() {
    bounded(async {
        let b = Backend::echo("pp", Behaviour::default()).await;
        let router = TestRouter::new(vec![b.addr]);
        // Only 10.0.0.0/8 may send headers; the test client is 127.0.0.1.
        let proxy = start_cfg(
            router.clone(),
            None,
            Some(cidrs(&["10.0.0.0/8"])),
            Cidrs::default(),
            test_limits(),
        )
        .await;
        let req = b"GET /x HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n";

        let mut v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n".to_vec();
        v1.extend_from_slice(req);
        assert_eq!(raw(proxy.addr, &v1).await, "", "v1 from an untrusted peer");
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        v2.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1, 0x1f, 0x90, 0x01, 0xbb]);
        v2.extend_from_slice(req);
        assert_eq!(raw(proxy.addr, &v2).await, "", "v2 from an untrusted peer");
        assert_eq!(proxy.stats().proxy_header_refused, 2);
        assert!(router.calls().is_empty(), "nothing was routed");

        // The same peer without a header is an ordinary client, seen as itself.
        let out = raw(proxy.addr, req).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let (conn, _) = router.calls().pop().unwrap();
        assert_eq!(
            conn.client.ip(),
            "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            seen(
                &doc(&Bytes::from(raw_body(&out).to_string())),
                "x-forwarded-for"
            ),
            ["127.0.0.1"]
        );
        assert_eq!(proxy.stats().proxy_header_refused, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_headers_are_replaced_unless_trusted() {
    bounded(async {
        let b = Backend::echo("fw", Behaviour::default()).await;
        let spoof = b"GET /f HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 198.51.100.1\r\n\
            X-Real-IP: 198.51.100.2\r\nForwarded: for=198.51.100.3\r\nConnection: close\r\n\r\n";
        for (trusted, xff, real_ip, forwarded) in [
            (Cidrs::default(), "127.0.0.1", "127.0.0.1", None),
            (
                cidrs(&["127.0.0.0/8"]),
                "198.51.100.1, 127.0.0.1",
                "198.51.100.2",
                Some("for=198.51.100.3"),
            ),
        ] {
            let proxy = start_cfg(
                TestRouter::new(vec![b.addr]),
                None,
                None,
                trusted.clone(),
                test_limits(),
            )
            .await;
            let out = raw(proxy.addr, spoof).await;
            let d = doc(&Bytes::from(raw_body(&out).to_string()));
            assert_eq!(seen(&d, "x-forwarded-for"), [xff], "trusted {trusted:?}");
            assert_eq!(seen(&d, "x-real-ip"), [real_ip], "trusted {trusted:?}");
            assert_eq!(
                seen(&d, "forwarded").first().map(String::as_str),
                forwarded,
                "trusted {trusted:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_connection() {
    bounded(async {
        let b = Backend::echo("src", Behaviour::default()).await;
        let limits = Limits {
            max_connections_per_source: 2,
            ..test_limits()
        };
        let proxy = start_cfg(
            TestRouter::new(vec![b.addr]),
            None,
            None,
            Cidrs::default(),
            limits,
        )
        .await;
        // Two keep-alive connections, each proven open by a round trip.
        let mut c1 = h1(proxy.addr).await;
        let mut c2 = h1(proxy.addr).await;
        for c in [&mut c1, &mut c2] {
            let (st, _, _) = send(c, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::OK);
        }
        // The third from the same address is closed unanswered.
        let req = b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n";
        assert_eq!(raw(proxy.addr, req).await, "", "third connection closed");
        assert_eq!(proxy.stats().source_rejected, 1);
        // Closing one frees its slot.
        drop(c1);
        let mut ok = String::new();
        eventually("a slot to come back", || {
            proxy.stats().connections_closed >= 2
        })
        .await;
        for _ in 0..50 {
            ok = raw(proxy.addr, req).await;
            if ok.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        drop(c2);
    })
    .await;
}

/// A backend that records how many requests it holds at once.
async fn concurrency_backend(hold: Duration) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let peak_out = peak.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (now, peak) = (now.clone(), peak.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (now, peak) = (now.clone(), peak.clone());
                    async move {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        tokio::time::sleep(hold).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, peak_out, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_are_capped_per_connection() {
    bounded(async {
        let certs = certs();
        let (backend, peak, task) = concurrency_backend(Duration::from_millis(300)).await;
        let limits = Limits {
            h2_max_concurrent_streams: 2,
            ..test_limits()
        };
        let proxy = start_cfg(
            TestRouter::new(vec![backend]),
            Some(certs.files.clone()),
            None,
            Cidrs::default(),
            limits,
        )
        .await;
        let tls = tls_connect(proxy.addr, &certs, &[b"h2"]).await;
        let (tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut pending = Vec::new();
        for i in 0..6 {
            let mut tx = tx.clone();
            pending.push(tokio::spawn(async move {
                let req = Request::get(format!("https://localhost/{i}"))
                    .body(empty())
                    .unwrap();
                tx.ready().await.unwrap();
                tx.send_request(req).await.map(|r| r.status())
            }));
        }
        for p in pending {
            let st = p.await.unwrap();
            assert!(
                matches!(st, Ok(StatusCode::OK)) || st.is_err(),
                "a stream over the limit is refused, never mis-served: {st:?}"
            );
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&peak),
            "at most 2 streams of one connection in flight at the backend, saw {peak}"
        );
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_capped() {
    bounded(async {
        let (backend, peak, task) = concurrency_backend(Duration::from_millis(200)).await;
        // Three clients at once, one backend connection allowed: they take turns on it.
        let limits = Limits {
            max_connections_per_backend: 1,
            upstream_connect_timeout: Duration::from_secs(5),
            ..test_limits()
        };
        let proxy = start_cfg(
            TestRouter::new(vec![backend]),
            None,
            None,
            Cidrs::default(),
            limits,
        )
        .await;
        let mut pending = Vec::new();
        for _ in 0..3 {
            let addr = proxy.addr;
            pending.push(tokio::spawn(async move {
                let mut c = h1(addr).await;
                send(&mut c, get("/").body(empty()).unwrap()).await.0
            }));
        }
        for p in pending {
            assert_eq!(p.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            1,
            "one backend connection at a time"
        );
        assert_eq!(proxy.stats().backend_saturated, 0);
        task.abort();

        // A slot that stays busy past the connect timeout: 503, counted, nothing retried.
        let (backend, _peak, task) = concurrency_backend(Duration::from_secs(2)).await;
        let limits = Limits {
            max_connections_per_backend: 1,
            upstream_connect_timeout: Duration::from_millis(100),
            ..test_limits()
        };
        let router = TestRouter::new(vec![backend]);
        let proxy = start_cfg(router.clone(), None, None, Cidrs::default(), limits).await;
        let addr = proxy.addr;
        let first = tokio::spawn(async move {
            let mut c = h1(addr).await;
            send(&mut c, get("/").body(empty()).unwrap()).await.0
        });
        eventually("the first request to reach the backend", || {
            !router.calls().is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = h1(addr).await;
        let (st, _, _) = send(&mut c, get("/").body(empty()).unwrap()).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(proxy.stats().backend_saturated, 1);
        assert_eq!(proxy.stats().retries, 0);
        assert_eq!(first.await.unwrap(), StatusCode::OK);
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_body_gets_408() {
    bounded(async {
        let b = Backend::echo("slow", Behaviour::default()).await;
        // 1000 bytes/s after 300 ms of grace; the client sends one byte every 100 ms.
        let limits = Limits {
            min_body_rate: 1000,
            request_header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(5),
            ..test_limits()
        };
        let proxy = start_cfg(
            TestRouter::new(vec![b.addr]),
            None,
            None,
            Cidrs::default(),
            limits,
        )
        .await;
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(
            b"POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: 1000\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        // Never more than 100 bytes: well under the body's length, so only the rate check
        // can end it.
        for _ in 0..100 {
            if tcp.write_all(b"x").await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "answer: {answer:?}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert_eq!(proxy.stats().slow_bodies, 1);
        assert_eq!(proxy.stats().upstream_errors, 0, "not the backend's fault");

        // A body sent at once is unaffected.
        let mut c = h1(proxy.addr).await;
        let req = Request::post("/ok")
            .header(header::HOST, "app.example")
            .body(Full::new(Bytes::from(vec![b'y'; 5000])))
            .unwrap();
        let (st, _, body) = send(&mut c, req).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(doc(&body)["body"].as_str().map(str::len), Some(5000));
    })
    .await;
}

/// Runs `body` in a fresh process running only this test (descriptor limits are per process,
/// and the other tests run in threads of this one).
fn in_child_process(test: &str, body: impl FnOnce()) {
    const CHILD: &str = "TETHER_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("running the child test process");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "child test failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets the soft descriptor limit; returns the previous one.
fn set_nofile(soft: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let before = lim.rlim_cur;
        lim.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        before
    }
}

/// Out of descriptors when connecting upstream (EMFILE): a 503 on the spot, counted as a
/// local error, and the request is not moved to another backend.
#[test]
fn local_connect_error_is_503_without_retry() {
    in_child_process(
        "proxy::tests::security::local_connect_error_is_503_without_retry",
        || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(bounded(async {
                let a = Backend::echo("a", Behaviour::default()).await;
                let b = Backend::echo("b", Behaviour::default()).await;
                let router = TestRouter::new(vec![a.addr, b.addr]);
                let proxy = Proxy::plain(router.clone()).await;
                let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
                eventually("the proxy to accept", || {
                    proxy.stats().connections_accepted == 1
                })
                .await;
                // The lowest free descriptor number becomes the limit: no new descriptor.
                // SAFETY: dup/close on our own stdin descriptor.
                let next = unsafe {
                    let fd = libc::dup(0);
                    assert!(fd >= 0);
                    libc::close(fd);
                    fd
                };
                let before = set_nofile(next as u64);
                let _ = tcp
                    .write_all(b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
                    .await;
                let out = read_to_close(&mut tcp).await;
                set_nofile(before);
                assert!(out.starts_with("HTTP/1.1 503"), "{out}");
                let s = proxy.stats();
                assert_eq!(
                    (s.local_errors, s.retries, s.upstream_connect_errors),
                    (1, 0, 0)
                );
                assert_eq!(router.calls().len(), 1, "routed once: not moved elsewhere");
                assert_eq!(a.conns() + b.conns(), 0, "no backend was reached");
            }));
        },
    );
}
