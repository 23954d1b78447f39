//! Active health checks: one small probe type per monitor kind (TCP handshake, HTTP(S) status,
//! UDP request/reply), rise/fall hysteresis, a concurrent startup round (`probe_all`) and
//! periodic per-backend monitoring (`PoolMonitor`) that reports state transitions as events.
//!
//! Every probe runs against the backend's own address on the monitor's port and finishes
//! within the monitor's timeout, whatever the backend does.

mod http;
mod tcp;
mod tracker;
mod udp;

use std::{future::Future, io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, mpsc::UnboundedSender},
    task::{JoinHandle, JoinSet},
    time::{Instant, MissedTickBehavior},
};

pub use tracker::Tracker;

use crate::config::{HealthCheckKind, HealthMonitor, Pool};

/// How a failure for a local reason (see [`crate::neterr`]) starts: such a result says
/// nothing about the backend and is not counted against it.
pub const LOCAL_FAILURE: &str = "local error, not the backend's: ";

/// Whether a probe's failure reason is a local one.
pub fn is_local_failure(reason: &str) -> bool {
    reason.starts_with(LOCAL_FAILURE)
}

/// The future a probe returns: `Ok(())` when healthy, else a short human reason.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One probe against one target. Small implementations per check type.
pub trait HealthCheck: Send + Sync {
    /// Ok(()) when healthy; Err(detail) with a short human reason ("connect: connection
    /// refused", "status 500 not in [2xx, 3xx]", "read status line: timeout after 200 ms").
    /// Finishes within the monitor's timeout.
    fn check<'a>(&'a self, target: SocketAddr) -> CheckFuture<'a>;
}

/// The status code of an HTTP health-check response's status line (`HTTP/1.1 200 OK`, without
/// the line end), or why it is malformed. Public for the fuzz target.
pub fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    http::parse_status_line(line)
}

/// The check for a monitor (timeout included).
pub fn build(monitor: &HealthMonitor) -> Arc<dyn HealthCheck> {
    match &monitor.kind {
        HealthCheckKind::Tcp => Arc::new(tcp::TcpCheck::new(monitor.timeout)),
        HealthCheckKind::Http {
            tls,
            path,
            host,
            expect,
        } => Arc::new(http::HttpCheck::new(
            monitor.timeout,
            *tls,
            path,
            host.as_deref(),
            expect,
        )),
        HealthCheckKind::Udp { send, expect } => Arc::new(udp::UdpCheck::new(
            monitor.timeout,
            send.clone(),
            expect.clone(),
        )),
    }
}

/// A backend changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    pub pool: String,
    pub backend: String,
    pub up: bool,
    /// Why: the last failure's reason when down, the passing streak when up.
    pub detail: String,
}

/// Probes in flight at once in `probe_all`: keeps a large pool's startup round under the
/// default 1024-descriptor limit while the daemon holds its own sockets.
const PROBE_CONCURRENCY: usize = 256;

/// One concurrent round of checks for every backend of a pool (startup: initial states),
/// results in backend order. Target = backend address + monitor port.
pub async fn probe_all(pool: &Pool, monitor: &HealthMonitor) -> Vec<Result<(), String>> {
    let check = build(monitor);
    let limit = Arc::new(Semaphore::new(PROBE_CONCURRENCY));
    let mut set = JoinSet::new();
    for (i, backend) in pool.backends.iter().enumerate() {
        let target = SocketAddr::new(backend.address, monitor.port);
        let check = Arc::clone(&check);
        let limit = Arc::clone(&limit);
        set.spawn(async move {
            // The semaphore is never closed; a failure here would be a bug, reported as such.
            let Ok(_permit) = limit.acquire_owned().await else {
                return (
                    i,
                    Err("probe not started: concurrency limit closed".to_string()),
                );
            };
            (i, check.check(target).await)
        });
    }
    // Only a panicking probe leaves its slot at this default.
    let mut results = vec![Err("probe did not complete".to_string()); pool.backends.len()];
    while let Some(joined) = set.join_next().await {
        if let Ok((i, result)) = joined {
            results[i] = match result {
                // Unknown is not down: start it up, as a pool without a monitor would.
                Err(reason) if is_local_failure(&reason) => {
                    log::warn!(
                        "health check of {} ({}): {reason}; counted as up",
                        pool.backends[i].name,
                        pool.backends[i].address
                    );
                    Ok(())
                }
                r => r,
            };
        }
    }
    results
}

/// Periodic monitoring of one pool: one task per backend, each with its own `Tracker`,
/// sending a `HealthEvent` on every transition. Dropping it aborts the tasks.
pub struct PoolMonitor {
    tasks: Vec<JoinHandle<()>>,
}

impl PoolMonitor {
    /// Start monitoring. The first check of each backend comes one interval after start (the
    /// initial round was `probe_all`) plus its share of a spread over the interval, so a large
    /// pool's probes do not fire at once. A backend missing from `initial_up` starts down.
    pub fn start(
        pool: &Pool,
        monitor: &HealthMonitor,
        initial_up: &[bool],
        tx: UnboundedSender<HealthEvent>,
    ) -> PoolMonitor {
        let check = build(monitor);
        let start = Instant::now();
        let count = pool.backends.len();
        let phase = pool_phase(&pool.name, monitor.interval);
        let tasks = pool
            .backends
            .iter()
            .enumerate()
            .map(|(i, backend)| {
                let first = start + monitor.interval + spread(i, count, phase, monitor.interval);
                let watch = Watch {
                    check: Arc::clone(&check),
                    target: SocketAddr::new(backend.address, monitor.port),
                    pool: pool.name.clone(),
                    backend: backend.name.clone(),
                    tracker: Tracker::new(
                        monitor.rise,
                        monitor.fall,
                        initial_up.get(i).copied().unwrap_or(false),
                    ),
                    rise: monitor.rise.max(1),
                    tx: tx.clone(),
                };
                tokio::spawn(watch.run(first, monitor.interval))
            })
            .collect();
        PoolMonitor { tasks }
    }
}

impl Drop for PoolMonitor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One backend's monitoring loop.
struct Watch {
    check: Arc<dyn HealthCheck>,
    target: SocketAddr,
    pool: String,
    backend: String,
    tracker: Tracker,
    rise: u32,
    tx: UnboundedSender<HealthEvent>,
}

impl Watch {
    async fn run(mut self, first: Instant, interval: Duration) {
        let mut ticks = tokio::time::interval_at(first, interval);
        // A stalled runtime should not cause a burst of catch-up probes.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let result = self.check.check(self.target).await;
            if let Err(reason) = &result
                && is_local_failure(reason)
            {
                log::warn!(
                    "health check {}/{} ({}) not counted: {reason}",
                    self.pool,
                    self.backend,
                    self.target
                );
                continue;
            }
            if let Err(reason) = &result {
                log::debug!(
                    "health check {}/{} ({}) failed: {reason}",
                    self.pool,
                    self.backend,
                    self.target
                );
            }
            let Some(up) = self.tracker.record(result.is_ok()) else {
                continue;
            };
            let detail = match result {
                Err(reason) => reason,
                Ok(()) if self.rise == 1 => "check passed".to_string(),
                Ok(()) => format!("{} consecutive checks passed", self.rise),
            };
            let event = HealthEvent {
                pool: self.pool.clone(),
                backend: self.backend.clone(),
                up,
                detail,
            };
            if self.tx.send(event).is_err() {
                // Nobody listens any more: the daemon is shutting down.
                return;
            }
        }
    }
}

/// Offset of backend `i` of `count` within the interval: evenly spread, shifted by a per-pool
/// phase so that pools with equal intervals do not all probe their first backend together.
fn spread(i: usize, count: usize, phase: Duration, interval: Duration) -> Duration {
    let interval_ns = interval.as_nanos();
    if interval_ns == 0 || count == 0 {
        return Duration::ZERO;
    }
    let offset = (interval_ns * i as u128 / count as u128 + phase.as_nanos()) % interval_ns;
    // offset < interval, which fits in a Duration.
    Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
}

/// A deterministic phase in [0, interval) from the pool name (FNV-1a).
fn pool_phase(name: &str, interval: Duration) -> Duration {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let interval_ns = interval.as_nanos();
    if interval_ns == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(u64::try_from(u128::from(hash) % interval_ns).unwrap_or(u64::MAX))
}

/// One probe's time budget, shared by all its steps; a step that runs out names itself.
pub(crate) struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    pub(crate) fn after(budget: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// Run one I/O step before the deadline; errors read "<step>: <reason>".
    pub(crate) async fn run<T>(
        &self,
        step: &str,
        io: impl Future<Output = io::Result<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout_at(self.at, io).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if crate::neterr::is_local(&e) => {
                Err(format!("{LOCAL_FAILURE}{step}: {}", io_detail(&e)))
            }
            Ok(Err(e)) => Err(format!("{step}: {}", io_detail(&e))),
            Err(_) => Err(format!(
                "{step}: timeout after {} ms",
                self.budget.as_millis()
            )),
        }
    }
}

/// A short reason for an I/O error: std renders OS errors as "Connection refused (os error
/// 111)"; operators want "connection refused".
pub(crate) fn io_detail(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(at)) => &text[..at],
        _ => text.as_str(),
    };
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        // Lower-case a capitalised word, not an acronym such as "TLS".
        (Some(first), Some(second)) if first.is_ascii_uppercase() && second.is_lowercase() => {
            let mut out = String::with_capacity(text.len());
            out.push(first.to_ascii_lowercase());
            out.push_str(&text[1..]);
            out
        }
        _ => text.to_string(),
    }
}

/// Bytes for a detail message: escaped, at most `max` of them.
pub(crate) fn snippet(bytes: &[u8], max: usize) -> String {
    let shown = &bytes[..bytes.len().min(max)];
    let more = if bytes.len() > max { "..." } else { "" };
    format!("{}{more}", shown.escape_ascii())
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::time::Duration;

    use crate::config::{HealthCheckKind, HealthMonitor};

    pub(crate) fn monitor(kind: HealthCheckKind, port: u16, timeout_ms: u64) -> HealthMonitor {
        HealthMonitor {
            kind,
            port,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(timeout_ms),
            rise: 2,
            fall: 2,
        }
    }

    /// A port nobody listens on (TCP and UDP): bound, then released.
    pub(crate) async fn closed_port() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback TCP port");
        listener
            .local_addr()
            .expect("local address of the listener")
            .port()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, SocketAddr},
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

    use super::{
        HealthEvent, PoolMonitor, io_detail, pool_phase, probe_all, spread,
        test_support::{closed_port, monitor},
    };
    use crate::config::{AdminState, BackendConfig, HealthCheckKind, Pool};

    fn pool(name: &str, addrs: &[IpAddr]) -> Pool {
        Pool {
            name: name.to_string(),
            backends: addrs
                .iter()
                .enumerate()
                .map(|(i, &address)| BackendConfig {
                    name: format!("b{i}"),
                    address,
                    weight: 1,
                    mac: None,
                    admin_state: AdminState::Enabled,
                    port: None,
                    header_value: None,
                })
                .collect(),
            health_monitor: None,
            algorithm: crate::config::Algorithm::RoundRobin,
        }
    }

    /// Accepts and closes connections on `addr`, counting them.
    async fn counting_listener(addr: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the test listener");
        let local = listener.local_addr().expect("listener address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        (local, accepted, task)
    }

    async fn next_event(rx: &mut mpsc::UnboundedReceiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no health event within 5 s")
            .expect("event channel closed early")
    }

    #[test]
    fn io_detail_is_short() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_detail(&refused), "connection refused", "OS error text");
        let custom = std::io::Error::other("TLS alert");
        assert_eq!(io_detail(&custom), "TLS alert", "acronyms keep their case");
    }

    #[test]
    fn spread_covers_the_interval_evenly() {
        let interval = Duration::from_millis(1000);
        let offsets: Vec<_> = (0..4)
            .map(|i| spread(i, 4, Duration::ZERO, interval))
            .collect();
        assert_eq!(
            offsets,
            [0, 250, 500, 750].map(Duration::from_millis),
            "four backends spread over one second"
        );
        let phase = pool_phase("web", interval);
        assert!(
            phase < interval,
            "phase {phase:?} must be below the interval"
        );
        for i in 0..1000 {
            let o = spread(i, 1000, phase, interval);
            assert!(
                o < interval,
                "offset {o:?} of backend {i} exceeds the interval"
            );
        }
        assert_eq!(
            spread(0, 0, phase, interval),
            Duration::ZERO,
            "empty pool: no offset"
        );
    }

    #[tokio::test]
    async fn probe_all_returns_results_in_backend_order() {
        let (addr, _, server) = counting_listener("127.0.0.1:0".parse().expect("addr")).await;
        // Same port on other loopback addresses: nothing listens there.
        let p = pool(
            "p",
            &[
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                addr.ip(),
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
            ],
        );
        let m = monitor(HealthCheckKind::Tcp, addr.port(), 500);
        let results = probe_all(&p, &m).await;
        server.abort();
        assert_eq!(results.len(), 3, "one result per backend: {results:?}");
        assert!(
            results[0].is_err(),
            "127.0.0.2 has no listener: {results:?}"
        );
        assert_eq!(results[1], Ok(()), "the listener is healthy: {results:?}");
        let err = results[2].as_ref().expect_err("127.0.0.3 has no listener");
        assert!(err.contains("connection refused"), "detail: {err}");
    }

    #[tokio::test]
    async fn probe_all_empty_pool() {
        let m = monitor(HealthCheckKind::Tcp, closed_port().await, 100);
        assert!(
            probe_all(&pool("empty", &[]), &m).await.is_empty(),
            "no backends, no results"
        );
    }

    #[tokio::test]
    async fn pool_monitor_reports_down_then_up() {
        let (addr, _, server) = counting_listener("127.0.0.1:0".parse().expect("addr")).await;
        let p = pool("web", &[addr.ip()]);
        let m = monitor(HealthCheckKind::Tcp, addr.port(), 50);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mon = PoolMonitor::start(&p, &m, &[true], tx);

        // Healthy for a few rounds: no event.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(rx.try_recv().is_err(), "no transition while healthy");

        // Close the listener: after `fall` failures the backend goes down.
        server.abort();
        let _ = server.await;
        let down = next_event(&mut rx).await;
        assert_eq!(
            (down.pool.as_str(), down.backend.as_str(), down.up),
            ("web", "b0", false),
            "down event: {down:?}"
        );
        assert!(
            down.detail.contains("connection refused"),
            "detail names the failure: {down:?}"
        );

        // Back on the same port: after `rise` successes it comes up again.
        let (_, _, server) = counting_listener(addr).await;
        let up = next_event(&mut rx).await;
        assert_eq!(
            (up.backend.as_str(), up.up),
            ("b0", true),
            "up event: {up:?}"
        );
        assert!(rx.try_recv().is_err(), "exactly one event per transition");
        drop(mon);
        server.abort();
    }

    #[tokio::test]
    async fn pool_monitor_starts_down_backend_and_brings_it_up() {
        let (addr, _, server) = counting_listener("127.0.0.1:0".parse().expect("addr")).await;
        let p = pool("p", &[addr.ip()]);
        let m = monitor(HealthCheckKind::Tcp, addr.port(), 50);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _mon = PoolMonitor::start(&p, &m, &[false], tx);
        let up = next_event(&mut rx).await;
        assert!(
            up.up,
            "initially down backend that answers comes up: {up:?}"
        );
        assert_eq!(up.detail, "2 consecutive checks passed", "up detail");
        server.abort();
    }

    #[tokio::test]
    async fn pool_monitor_stops_on_drop() {
        let (addr, accepted, server) =
            counting_listener("127.0.0.1:0".parse().expect("addr")).await;
        let p = pool("p", &[addr.ip()]);
        let m = monitor(HealthCheckKind::Tcp, addr.port(), 50);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mon = PoolMonitor::start(&p, &m, &[true], tx);

        // Let it probe a few times.
        let started = tokio::time::Instant::now();
        while accepted.load(Ordering::SeqCst) < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the monitor never probed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(mon);

        // The tasks held the only senders: once aborted, the channel closes.
        let closed = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("tasks still running 2 s after drop");
        assert_eq!(closed, None, "no event expected, just the channel closing");

        // And no more probes arrive.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after_drop = accepted.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            after_drop,
            "probes continued after drop"
        );
        server.abort();
    }

    /// A probe that fails with `errno` each time, counting its calls.
    struct Failing(i32, Arc<AtomicUsize>);

    impl super::HealthCheck for Failing {
        fn check<'a>(&'a self, _target: SocketAddr) -> super::CheckFuture<'a> {
            Box::pin(async move {
                self.1.fetch_add(1, Ordering::SeqCst);
                let e = std::io::Error::from_raw_os_error(self.0);
                super::Deadline::after(Duration::from_secs(1))
                    .run("connect", async move { Err::<(), _>(e) })
                    .await
            })
        }
    }

    fn watch(
        errno: i32,
        calls: &Arc<AtomicUsize>,
    ) -> (super::Watch, mpsc::UnboundedReceiver<HealthEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = super::Watch {
            check: Arc::new(Failing(errno, Arc::clone(calls))),
            target: "127.0.0.1:9".parse().expect("addr"),
            pool: "p".into(),
            backend: "b".into(),
            tracker: super::Tracker::new(1, 1, true),
            rise: 1,
            tx,
        };
        (w, rx)
    }

    #[tokio::test]
    async fn local_errors_never_take_a_backend_down() {
        for errno in [libc::EMFILE, libc::ENOBUFS, libc::EADDRNOTAVAIL] {
            let calls = Arc::new(AtomicUsize::new(0));
            let (w, mut rx) = watch(errno, &calls);
            let task = tokio::spawn(w.run(tokio::time::Instant::now(), Duration::from_millis(5)));
            tokio::time::timeout(Duration::from_secs(10), async {
                while calls.load(Ordering::SeqCst) < 5 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("five probes ran");
            task.abort();
            assert!(
                rx.try_recv().is_err(),
                "errno {errno}: five local failures with fall 1 sent an event"
            );
        }
        // The control: the same with a refused connect goes down at once.
        let calls = Arc::new(AtomicUsize::new(0));
        let (w, mut rx) = watch(libc::ECONNREFUSED, &calls);
        let task = tokio::spawn(w.run(tokio::time::Instant::now(), Duration::from_millis(5)));
        let ev = next_event(&mut rx).await;
        task.abort();
        assert!(!ev.up, "{ev:?}");
        assert_eq!(ev.detail, "connect: connection refused");
    }

    #[tokio::test]
    async fn local_errors_are_marked() {
        let e = super::Deadline::after(Duration::from_secs(1))
            .run("connect", async {
                Err::<(), _>(std::io::Error::from_raw_os_error(libc::EMFILE))
            })
            .await
            .expect_err("fails");
        assert!(super::is_local_failure(&e), "{e}");
        assert!(e.ends_with("connect: too many open files"), "{e}");
    }
}
