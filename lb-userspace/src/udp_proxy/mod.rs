//! The UDP proxy of L7 UDP services (SIP, Kemp's "Force L7"): every datagram a client sends
//! to the VIP is parsed as a SIP message and placed by the persistence engine (the
//! `sip-header` method: one backend per Call-ID); what is not SIP is dropped and counted.
//!
//! Return path: one upstream socket per client flow (client address and port, and the
//! backend's address family). Whatever a backend sends to that socket belongs to that client
//! and is sent on from the VIP socket, so the client sees the VIP address and port. This
//! needs no parsing of replies (a backend may answer with a new transaction, or a message
//! whose Call-ID tether never saw) and costs one socket per active client; the other design,
//! one socket per backend with a (backend, Call-ID) -> client map, would misroute replies
//! without a Call-ID and need a second table. A reply is accepted only from a backend the
//! flow sent to. A flow with no datagram either way for the idle timeout is closed;
//! `max_flows` bounds them (a new client over the bound is dropped and counted).
//!
//! With mirroring, a message whose key no local table holds is looked up in Redis
//! ([`Engine::decide_or_ask`]). One task reads the VIP's datagrams, so such a message waits
//! for the answer in a task of its own (at most [`MAX_ASKING`] at once; beyond that, decided
//! locally at once): the other clients' datagrams are not held. Datagrams of a new call
//! that arrive during its lookup are looked up too and reach the same backend (Redis', or
//! the one the first decided); their order may change, as UDP allows.

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::watch};

use crate::engine::{
    Decided, Engine,
    input::{Input, SipMessage},
    mirrored::Miss,
};

/// Largest datagram read (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;
/// Messages waiting for a mirror lookup at most, per VIP (each holds its datagram for at
/// most the lookup's timeout).
pub const MAX_ASKING: u64 = 1024;

/// How a UDP service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpConfig {
    /// Client flows at most.
    pub max_flows: usize,
    /// A flow with no datagram either way for this long is closed.
    pub idle_timeout: Duration,
}

pub use crate::state::UdpStats;

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A client flow: its upstream socket and what it may hear from.
struct Flow {
    socket: Arc<UdpSocket>,
    /// Backends this flow sent to (replies are taken from these only).
    peers: Mutex<Vec<SocketAddr>>,
    /// Milliseconds since the proxy started, at the last datagram either way.
    last: AtomicU64,
}

/// (client, the backend's family is IPv6)
type FlowKey = (SocketAddr, bool);

struct Shared {
    vip: Arc<UdpSocket>,
    flows: Mutex<HashMap<FlowKey, Arc<Flow>>>,
    stats: Arc<UdpStats>,
    config: UdpConfig,
    epoch: Instant,
    /// Messages waiting for a mirror lookup now (each held by an [`Asking`]).
    asking: Arc<AtomicU64>,
}

/// One message waiting for a mirror lookup, counted in `Shared::asking` while it lives: a
/// task that panics or is dropped still gives its place back (a leaked count would
/// otherwise turn lookups off for good once it reached [`MAX_ASKING`]).
struct Asking(Arc<AtomicU64>);

impl Asking {
    fn new(count: &Arc<AtomicU64>) -> Asking {
        count.fetch_add(1, Ordering::Relaxed);
        Asking(count.clone())
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, HashMap<FlowKey, Arc<Flow>>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A UDP socket for `addr` with SO_REUSEPORT, so a successor that was handed no socket for
/// it (an older daemon's handoff) can bind while the old one still serves. Non-blocking, not
/// yet registered with a runtime: [`serve`] does that on the runtime it runs on.
pub fn reuseport_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Serve `vip` (bound to the VIP and port, non-blocking) until `stop` turns true; no datagram
/// is read after that, so the next task on the same socket reads every one still queued. The
/// socket, its flows and its lookup tasks run on the runtime this future runs on.
pub async fn serve(
    vip: std::net::UdpSocket,
    config: UdpConfig,
    engine: Arc<Engine>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<UdpStats>,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        vip: Arc::new(UdpSocket::from_std(vip)?),
        flows: Mutex::new(HashMap::new()),
        stats,
        config,
        epoch: Instant::now(),
        asking: Arc::new(AtomicU64::new(0)),
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            r = shared.vip.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // An ICMP error queued on the socket: not the socket's failure.
                Err(e) if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => return Err(e),
            },
        };
        on_datagram(&shared, &engine, &buf[..n], client, &stop).await;
    }
    // Flows end with their own stop receivers.
    Ok(())
}

/// Place one client datagram and send it to its backend.
async fn on_datagram(
    shared: &Arc<Shared>,
    engine: &Arc<Engine>,
    datagram: &[u8],
    client: SocketAddr,
    stop: &watch::Receiver<bool>,
) {
    let stats = &shared.stats;
    bump(&stats.received);
    let Some(msg) = SipMessage::parse(datagram) else {
        bump(&stats.dropped_malformed);
        return;
    };
    let mut input = Input::sip(&msg, client);
    let decided = if shared.asking.load(Ordering::Relaxed) < MAX_ASKING {
        engine.decide_or_ask(&mut input)
    } else {
        engine.decide(&mut input, &[]).map(Decided::Chosen)
    };
    let choice = match decided {
        Ok(Decided::Chosen(choice)) => choice,
        Ok(Decided::Miss(miss)) => {
            let asking = Asking::new(&shared.asking);
            let (shared, engine, stop) = (shared.clone(), engine.clone(), stop.clone());
            let datagram = datagram.to_vec();
            tokio::spawn(async move {
                let _asking = asking;
                asked(&shared, &engine, miss, &datagram, client, &stop).await;
            });
            return;
        }
        Err(_) => {
            bump(&stats.dropped_no_backend);
            return;
        }
    };
    // A datagram has no lifetime: it ends as it is sent.
    engine.ended(&choice.decision);
    send(shared, choice.backend, datagram, client, stop).await;
}

/// Wait for the mirror's answer to `miss`, then place and send the datagram.
async fn asked(
    shared: &Arc<Shared>,
    engine: &Engine,
    miss: Miss,
    datagram: &[u8],
    client: SocketAddr,
    stop: &watch::Receiver<bool>,
) {
    let answer = miss.answer().await;
    let Some(msg) = SipMessage::parse(datagram) else {
        return;
    };
    match engine.decide_answered(&mut Input::sip(&msg, client), &[], &answer) {
        Ok(choice) => {
            engine.ended(&choice.decision);
            send(shared, choice.backend, datagram, client, stop).await;
        }
        Err(_) => bump(&shared.stats.dropped_no_backend),
    }
}

/// Send a client's datagram to `backend` through the client's flow.
async fn send(
    shared: &Arc<Shared>,
    backend: SocketAddr,
    datagram: &[u8],
    client: SocketAddr,
    stop: &watch::Receiver<bool>,
) {
    let stats = &shared.stats;
    let Some(flow) = flow_for(shared, client, backend, stop) else {
        return;
    };
    if flow.socket.send_to(datagram, backend).await.is_ok() {
        bump(&stats.forwarded);
    } else {
        bump(&stats.send_errors);
    }
}

/// The client's flow towards `backend`'s family, opened if needed (`None`: over the limit,
/// or no socket could be opened; counted).
fn flow_for(
    shared: &Arc<Shared>,
    client: SocketAddr,
    backend: SocketAddr,
    stop: &watch::Receiver<bool>,
) -> Option<Arc<Flow>> {
    let key = (client, backend.is_ipv6());
    let now = shared.now_ms();
    let mut flows = shared.flows();
    if let Some(f) = flows.get(&key) {
        // Touched under the map's lock, so an expiring flow cannot miss it.
        f.last.store(now, Ordering::Relaxed);
        let mut peers = f.peers.lock().unwrap_or_else(|e| e.into_inner());
        if !peers.contains(&backend) {
            peers.push(backend);
        }
        return Some(f.clone());
    }
    if flows.len() >= shared.config.max_flows {
        bump(&shared.stats.dropped_flow_limit);
        return None;
    }
    let local = if backend.is_ipv6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = match std::net::UdpSocket::bind(local)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(UdpSocket::from_std)
    {
        Ok(s) => Arc::new(s),
        Err(e) => {
            // Debug only: a flood of new sources (fd limit reached) must not flood the log.
            log::debug!("UDP flow of {client}: opening its upstream socket: {e}");
            bump(&shared.stats.send_errors);
            return None;
        }
    };
    let flow = Arc::new(Flow {
        socket,
        peers: Mutex::new(vec![backend]),
        last: AtomicU64::new(now),
    });
    flows.insert(key, flow.clone());
    bump(&shared.stats.flows_opened);
    tokio::spawn(run_flow(shared.clone(), key, flow.clone(), stop.clone()));
    Some(flow)
}

/// Send the backends' datagrams on to the client until the flow is idle or the proxy stops.
async fn run_flow(
    shared: Arc<Shared>,
    key: FlowKey,
    flow: Arc<Flow>,
    mut stop: watch::Receiver<bool>,
) {
    let client = key.0;
    let idle = shared.config.idle_timeout;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let since = Duration::from_millis(
            shared
                .now_ms()
                .saturating_sub(flow.last.load(Ordering::Relaxed)),
        );
        let wait = idle.saturating_sub(since);
        tokio::select! {
            r = flow.socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let known = flow
                    .peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&from);
                if !known {
                    bump(&shared.stats.dropped_foreign);
                    continue;
                }
                flow.last.store(shared.now_ms(), Ordering::Relaxed);
                if shared.vip.send_to(&buf[..n], client).await.is_ok() {
                    bump(&shared.stats.replies);
                } else {
                    bump(&shared.stats.send_errors);
                }
            }
            _ = tokio::time::sleep(wait) => {
                let mut flows = shared.flows();
                let idle_for = shared.now_ms().saturating_sub(flow.last.load(Ordering::Relaxed));
                if idle_for >= idle.as_millis() as u64 {
                    flows.remove(&key);
                    break;
                }
            }
            _ = stopped(&mut stop) => {
                shared.flows().remove(&key);
                break;
            }
        }
    }
    bump(&shared.stats.flows_closed);
}

/// Until `stop` turns true (or its sender is gone). The watch's guard stays inside, so the
/// tasks that wait on it remain `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Client flows open now.
pub fn active(stats: &UdpStats) -> u64 {
    stats
        .flows_opened
        .load(Ordering::Relaxed)
        .saturating_sub(stats.flows_closed.load(Ordering::Relaxed))
}
