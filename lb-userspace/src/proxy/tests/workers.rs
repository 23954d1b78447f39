//! Serving on several worker runtimes ([`serve_on`]): limits hold for the whole listener, and
//! a backend's connection slots are shared by the workers' pools.

use super::*;
use crate::workers::{Workers, listen_group};

/// A [`TestRouter`] that also records the thread each request was routed on.
struct ThreadRouter {
    inner: Arc<TestRouter>,
    threads: Mutex<Vec<String>>,
}

impl Router for ThreadRouter {
    fn route(
        &self,
        req: &mut http::request::Parts,
        conn: &ConnInfo,
        tried: &[SocketAddr],
    ) -> Result<Route, StatusCode> {
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        self.inner.route(req, conn, tried)
    }
}

/// Two `SO_REUSEPORT` sockets on one loopback address, one per worker, and a router to
/// `backend` that records threads.
fn group_of_two(
    backend: SocketAddr,
) -> (SocketAddr, Vec<std::net::TcpListener>, Arc<ThreadRouter>) {
    let first =
        listen_group(SocketAddr::from(([127, 0, 0, 1], 0)), vec![], 1, 128).expect("listen");
    let addr = first[0].local_addr().unwrap();
    let sockets = listen_group(addr, first, 2, 128).expect("a second socket in the group");
    assert_eq!(sockets.len(), 2, "one SO_REUSEPORT socket per worker");
    let router = Arc::new(ThreadRouter {
        inner: TestRouter::new(vec![backend]),
        threads: Mutex::default(),
    });
    (addr, sockets, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_and_share_the_connection_limit() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let workers = Workers::start(2).expect("worker threads");
        let (addr, sockets, router) = group_of_two(b.addr);
        let cfg = ProxyConfig {
            listen: addr,
            tls: None,
            proxy_protocol: None,
            trusted_forwarders: Default::default(),
            limits: Limits {
                max_connections: 2,
                ..test_limits()
            },
        };
        let stats = Arc::new(ProxyStats::default());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve_on(
            sockets,
            workers,
            cfg,
            router.clone(),
            rx,
            stats.clone(),
        ));
        let mut c1 = h1(addr).await;
        let mut c2 = h1(addr).await;
        for tx in [&mut c1, &mut c2] {
            let (status, _, _) = send(tx, get("/").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
        }
        // Whichever socket (and worker) the kernel picks, the limit is the listener's.
        for _ in 0..4 {
            let out = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(
                out, "",
                "a connection over the limit is closed without an answer"
            );
        }
        assert_eq!(stats.snapshot().connections_rejected, 4);
        let threads = router.threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 2, "{threads:?}");
        assert!(
            threads.iter().all(|t| t.starts_with("tether-worker-")),
            "requests are served on the worker threads: {threads:?}"
        );
        drop((c1, c2));
        stop.send(true).unwrap();
        tokio::time::timeout(IO_TIMEOUT, task)
            .await
            .expect("the workers drain and stop")
            .unwrap()
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_go_to_the_least_busy_worker() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let (addr, sockets, router) = group_of_two(b.addr);
        let cfg = ProxyConfig {
            listen: addr,
            tls: None,
            proxy_protocol: None,
            trusted_forwarders: Default::default(),
            limits: test_limits(),
        };
        let (_stop, rx) = watch::channel(false);
        let _task = tokio::spawn(serve_on(
            sockets,
            Workers::start(2).expect("worker threads"),
            cfg,
            router.clone(),
            rx,
            Arc::new(ProxyStats::default()),
        ));
        // Whichever socket the kernel hashes each one to, the workers end up with 4 each.
        let mut conns = Vec::new();
        for _ in 0..8 {
            let mut c = h1(addr).await;
            let (status, _, _) = send(&mut c, get("/").body(empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            conns.push(c);
        }
        let threads = router.threads.lock().unwrap().clone();
        for w in ["tether-worker-0", "tether-worker-1"] {
            let n = threads.iter().filter(|t| *t == w).count();
            assert_eq!(n, 4, "connections per worker: {threads:?}");
        }
    })
    .await;
}

/// A request on one worker whose backend's only slot is held by an idle connection in
/// another worker's pool closes that connection and gets through (no 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slot_idle_in_another_workers_pool_is_freed() {
    bounded(async {
        let b = Backend::echo("b", Behaviour::default()).await;
        let limits = Limits {
            max_connections_per_backend: 1,
            ..test_limits()
        };
        let slots = upstream::BackendSlots::default();
        let (one, two) = (
            upstream::Pool::new(limits, slots.clone()),
            upstream::Pool::new(limits, slots),
        );
        for (pool, conns) in [(&one, 1), (&two, 2)] {
            let req = Request::get("/")
                .header(header::HOST, "x")
                .body(body::ProxyBody::empty())
                .unwrap();
            let Ok(resp) = pool.request(b.addr, req).await else {
                panic!("request {conns} failed (saturated: the idle slot was not freed)")
            };
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap();
            assert_eq!(b.conns(), conns, "one new backend connection per pool");
        }
    })
    .await;
}
