//! The mirror's task: one Redis connection for writes and reads, one for the channel, and
//! one it lends to the requests' lookups while it is connected, all to the one server
//! configured or to the master the sentinels name at connection time. With a Redis
//! Cluster, writes and reads go through cluster connections (each key to its slot's node),
//! the channel is a subscription on one node (the cluster passes every PUBLISH to every
//! node), and the catch-up scans every master.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use futures_util::StreamExt as _;
use redis::AsyncConnectionConfig;
use tokio::sync::{mpsc, watch};

use super::{Event, MirrorStats, QUEUE_CAPACITY, XdpTarget, codec, con::Con};
use crate::{
    config::mirroring::{Mirroring, Redis},
    engine::{Engine, methods::TableRef},
};

/// Connect and command timeouts: a slow Redis is a failed one.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Asking the sentinels which server is master, and checking that server's role.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bindings per script call.
const BATCH: usize = 256;
/// Script calls in flight at once on a cluster connection (one per key there).
const CLUSTER_IN_FLIGHT: usize = 64;
/// How often tables are looked at for refreshes.
const SWEEP_TICK: Duration = Duration::from_secs(1);
/// How often the XDP table's used bindings are written again (its TTLs renewed in Redis):
/// well under any useful source-IP timeout, and one table walk per period.
const XDP_SWEEP: Duration = Duration::from_secs(10);

pub(super) struct Worker {
    pub caught_up: tokio::sync::watch::Sender<bool>,
    /// The instance name in force (set from the target before each run).
    pub instance: String,
    pub rx: mpsc::Receiver<Event>,
    pub engines: Arc<ArcSwap<Vec<Arc<Engine>>>>,
    pub xdp: Option<Arc<dyn XdpTarget>>,
    pub lookups: Arc<super::lookup::Lookups>,
    pub stats: Arc<MirrorStats>,
}

/// Why a session ended.
type SessionResult = Result<(), redis::RedisError>;

/// The mirror task for the daemon's life: mirrors through the `mirroring` in force in
/// `target`, and when a reload changes it, drops the connections and starts again with the
/// new Redis or instance name. Bindings waiting or being written then are not lost: the new
/// connection's full sweep writes every live binding. With `None` (mirroring removed) what
/// the tables send is discarded. Ends when every sender is gone.
pub(super) async fn serve(mut w: Worker, mut target: watch::Receiver<Option<Mirroring>>) {
    loop {
        let current = target.borrow_and_update().clone();
        // Not connected to the new target yet (a session dropped by the change leaves its
        // connection here); without `mirroring`, engines ask nothing.
        w.lookups.con.store(None);
        w.lookups.set_timeout(
            current
                .as_ref()
                .map_or(Duration::ZERO, |m| m.lookup_timeout),
        );
        w.caught_up.send_replace(false);
        w.stats.connected.store(0, Ordering::Relaxed);
        gauges(&VecDeque::new(), &w.stats);
        match current {
            Some(m) => {
                w.instance = m.instance;
                tokio::select! {
                    () = run(&mut w, &m.redis) => return,
                    changed = target.changed() => if changed.is_err() { return },
                }
            }
            None => loop {
                tokio::select! {
                    ev = w.rx.recv() => if ev.is_none() { return },
                    changed = target.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                }
            },
        }
    }
}

/// Where each session connects.
pub(super) enum Source {
    Server(redis::Client),
    /// Asked again before every session: after a failover, the promoted replica.
    Sentinel(Box<redis::sentinel::SentinelClient>),
    /// The channel's node is the next configured one after each session.
    Cluster {
        client: Box<redis::cluster::ClusterClient>,
        nodes: Vec<String>,
        next: usize,
    },
}

/// A session's connections.
struct Connections {
    con: Con,
    lookup: Con,
    /// The server whose channel is subscribed.
    channel: redis::Client,
}

impl Source {
    pub(super) fn new(redis: &Redis) -> redis::RedisResult<Source> {
        Ok(match redis {
            Redis::Server(url) => Source::Server(redis::Client::open(url.as_str())?),
            Redis::Sentinel(s) => Source::Sentinel(Box::new(s.client()?)),
            Redis::Cluster(c) => Source::Cluster {
                client: Box::new(c.client()?),
                nodes: c.nodes.clone(),
                next: 0,
            },
        })
    }

    /// Connect for a session.
    async fn connect(&mut self) -> redis::RedisResult<Connections> {
        if let Source::Cluster {
            client,
            nodes,
            next,
        } = self
        {
            // Lookups get their own connection: a request's GET does not queue behind a
            // batch.
            let con = cluster_connection(client).await?;
            let lookup = cluster_connection(client).await?;
            let url = &nodes[*next % nodes.len()];
            *next = next.wrapping_add(1);
            return Ok(Connections {
                con,
                lookup,
                channel: redis::Client::open(url.as_str())?,
            });
        }
        let client = self.client().await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(IO_TIMEOUT))
            .set_response_timeout(Some(IO_TIMEOUT));
        let con = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let lookup = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Connections {
            con: Con::Server(con),
            lookup: Con::Server(lookup),
            channel: client,
        })
    }

    /// The server to connect to now (of a cluster, the first node listed).
    pub(super) async fn client(&mut self) -> redis::RedisResult<redis::Client> {
        match self {
            Source::Server(c) => Ok(c.clone()),
            Source::Cluster { nodes, .. } => redis::Client::open(nodes[0].as_str()),
            Source::Sentinel(s) => {
                let c = tokio::time::timeout(SENTINEL_TIMEOUT, s.async_get_client())
                    .await
                    .map_err(|_| timeout_error("asking the sentinels for the master"))??;
                log::info!(
                    "mirroring: the sentinels name {} master",
                    c.get_connection_info().addr()
                );
                Ok(c)
            }
        }
    }
}

/// Mirror through `redis` until the channel closes.
async fn run(w: &mut Worker, redis: &Redis) {
    let mut source = match Source::new(redis) {
        Ok(c) => c,
        Err(e) => {
            // Validated with the config: only a bug gets here. Wait for another config.
            log::error!("mirroring: {e}; mirroring is off");
            return std::future::pending().await;
        }
    };
    let script = redis::Script::new(codec::BIND_SCRIPT);
    let mut pending: VecDeque<Event> = VecDeque::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let r = match source.connect().await {
            Ok(c) => session(w, c, &script, &mut pending).await,
            Err(e) => Err(e),
        };
        // Requests stop asking at once, rather than each waiting for its timeout.
        w.lookups.con.store(None);
        w.stats.connected.store(0, Ordering::Relaxed);
        if let Err(e) = r {
            MirrorStats::bump(&w.stats.failures);
            log::warn!("mirroring: Redis: {e}; serving from local tables, retrying in {backoff:?}");
        }
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_MIN;
        }
        // Keep queueing while we wait.
        let deadline = tokio::time::Instant::now() + backoff;
        loop {
            match tokio::time::timeout_at(deadline, w.rx.recv()).await {
                Ok(Some(ev)) => queue(&mut pending, ev, &w.stats),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        gauges(&pending, &w.stats);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn queue(pending: &mut VecDeque<Event>, ev: Event, stats: &MirrorStats) {
    if pending.len() >= QUEUE_CAPACITY {
        pending.pop_front();
        MirrorStats::bump(&stats.dropped);
    }
    pending.push_back(ev);
}

fn gauges(pending: &VecDeque<Event>, stats: &MirrorStats) {
    stats.pending.store(pending.len() as u64, Ordering::Relaxed);
    let lag = pending
        .front()
        .map_or(0, |e| e.at.elapsed().as_millis() as u64);
    stats.lag_ms.store(lag, Ordering::Relaxed);
}

async fn cluster_connection(client: &redis::cluster::ClusterClient) -> redis::RedisResult<Con> {
    let c = tokio::time::timeout(SENTINEL_TIMEOUT, client.get_async_connection())
        .await
        .map_err(|_| timeout_error("connecting to the cluster"))??;
    Ok(Con::Cluster(c))
}

async fn session(
    w: &mut Worker,
    c: Connections,
    script: &redis::Script,
    pending: &mut VecDeque<Event>,
) -> SessionResult {
    let Connections {
        mut con,
        lookup: lookup_con,
        channel,
    } = c;
    let mut pubsub = tokio::time::timeout(IO_TIMEOUT, channel.get_async_pubsub())
        .await
        .map_err(|_| timeout_error("connecting for the channel"))??;
    tokio::time::timeout(IO_TIMEOUT, pubsub.subscribe(codec::CHANNEL))
        .await
        .map_err(|_| timeout_error("subscribing"))??;
    let mut messages = pubsub.into_on_message();
    MirrorStats::bump(&w.stats.connections);
    w.stats.connected.store(1, Ordering::Relaxed);
    w.lookups.con.store(Some(Arc::new(lookup_con)));
    log::info!(
        "mirroring: connected to Redis (channel on {}); catching up",
        channel.get_connection_info().addr()
    );

    // What waited, then everything live (Redis may have restarted empty), then what the
    // others hold.
    while let Ok(ev) = w.rx.try_recv() {
        queue(pending, ev, &w.stats);
    }
    while !pending.is_empty() {
        let n = pending.len().min(BATCH);
        let batch: Vec<Event> = pending.iter().take(n).cloned().collect();
        write(w, &mut con, script, &batch).await?;
        pending.drain(..n);
        gauges(pending, &w.stats);
    }
    let mut swept: HashMap<(Arc<str>, Arc<str>), Instant> = HashMap::new();
    sweep(w, &mut con, script, &mut swept, true).await?;
    let n = catch_up(w, &mut con).await?;
    log::info!("mirroring: caught up ({n} bindings in Redis)");
    w.caught_up.send_replace(true);

    let mut tick = tokio::time::interval(SWEEP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = w.rx.recv() => {
                let Some(ev) = ev else { return Ok(()) };
                let mut batch = vec![ev];
                while batch.len() < BATCH {
                    match w.rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                if let Err(e) = write(w, &mut con, script, &batch).await {
                    for ev in batch {
                        queue(pending, ev, &w.stats);
                    }
                    gauges(pending, &w.stats);
                    return Err(e);
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return Err(timeout_error("the channel connection closed"));
                };
                if let Ok(payload) = msg.get_payload::<String>() {
                    on_message(w, &payload);
                }
            }
            _ = tick.tick() => {
                sweep(w, &mut con, script, &mut swept, false).await?;
            }
        }
    }
}

fn timeout_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "timed out or closed",
        what.to_string(),
    ))
}

/// Write `batch` with the bind script; adopt Redis' value where it differs.
async fn write(
    w: &Worker,
    con: &mut Con,
    script: &redis::Script,
    batch: &[Event],
) -> SessionResult {
    if batch.is_empty() {
        return Ok(());
    }
    let invoke = |events: &[Event]| {
        let mut inv = script.prepare_invoke();
        inv.arg(codec::CHANNEL);
        for ev in events {
            inv.key(codec::key(&ev.service, &ev.table, ev.key));
            inv.arg(codec::value(ev.backend, &w.instance))
                .arg(ev.ttl_ms.max(1))
                .arg(ev.previous.map(|p| p.to_string()).unwrap_or_default());
        }
        inv
    };
    let held: Vec<String> = if con.is_cluster() {
        // A script's keys must share a slot: one call per key, many in flight at once,
        // each sent to its key's node.
        let mut calls = Vec::with_capacity(batch.len());
        for ev in batch {
            let inv = invoke(std::slice::from_ref(ev));
            let mut con = con.clone();
            calls.push(Box::pin(async move {
                inv.invoke_async::<Vec<String>>(&mut con).await
            }));
        }
        let answers: Vec<redis::RedisResult<Vec<String>>> = futures_util::stream::iter(calls)
            .buffered(CLUSTER_IN_FLIGHT)
            .collect()
            .await;
        let mut held = Vec::with_capacity(batch.len());
        for a in answers {
            held.extend(a?);
        }
        held
    } else {
        invoke(batch).invoke_async(con).await?
    };
    w.stats
        .published
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    for (ev, v) in batch.iter().zip(&held) {
        if let Some((backend, _)) = codec::parse_value(v)
            && backend != ev.backend
            && apply(w, &ev.service, &ev.table, ev.key, backend)
        {
            MirrorStats::bump(&w.stats.conflicts);
        }
    }
    Ok(())
}

/// A binding announced on the channel: another instance's is applied.
fn on_message(w: &Worker, payload: &str) {
    let Some((key, value)) = codec::parse_message(payload) else {
        return;
    };
    let (Some((service, table, k)), Some((backend, instance))) =
        (codec::parse_key(key), codec::parse_value(value))
    else {
        return;
    };
    if instance != w.instance && apply(w, service, table, k, backend) {
        MirrorStats::bump(&w.stats.applied);
    }
}

/// Bind `k` in table `table` of `service` (an engine's or the XDP table) without
/// publishing it again; whether that changed anything.
fn apply(w: &Worker, service: &str, table: &str, k: u128, backend: u32) -> bool {
    if table == codec::XDP_TABLE {
        return w.xdp.as_ref().is_some_and(|x| x.apply(service, k, backend));
    }
    let engines = w.engines.load();
    let Some(e) = engines.iter().find(|e| e.service_name() == service) else {
        return false;
    };
    let now = Instant::now();
    for (id, t) in e.tables_by_id() {
        if id != table {
            continue;
        }
        return match t {
            TableRef::Clients { table, .. } => table.apply(k.to_be_bytes(), backend, now),
            TableRef::Keys(table) => table.apply(k, backend, now),
        };
    }
    false
}

/// Write again the bindings used since each table's last sweep (a quarter of its timeout
/// ago, 1 s to 60 s), or with `all` every live binding.
async fn sweep(
    w: &Worker,
    con: &mut Con,
    script: &redis::Script,
    swept: &mut HashMap<(Arc<str>, Arc<str>), Instant>,
    all: bool,
) -> SessionResult {
    let now = Instant::now();
    let mut batch = Vec::new();
    let engines = w.engines.load_full();
    for e in engines.iter() {
        let service: Arc<str> = e.service_name().into();
        for (id, t) in e.tables_by_id() {
            let table: Arc<str> = id.into();
            let timeout = match &t {
                TableRef::Clients { table, .. } => table.timeout(),
                TableRef::Keys(table) => table.timeout(),
            };
            if timeout.is_zero() {
                continue;
            }
            let period = (timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let slot = (service.clone(), table.clone());
            let last = swept.get(&slot).copied();
            if !all && last.is_some_and(|l| now.duration_since(l) < period) {
                continue;
            }
            // Used since the last sweep (plus a tick of slack), or held by a connection.
            let window = last.map_or(timeout, |l| now.duration_since(l) + SWEEP_TICK);
            let ttl_ms = timeout.as_millis() as u64;
            let mut push = |key: u128, backend: u32| {
                batch.push(Event {
                    service: service.clone(),
                    table: table.clone(),
                    key,
                    backend,
                    previous: None,
                    ttl_ms,
                    at: now,
                })
            };
            match t {
                TableRef::Clients { table, .. } => {
                    for (k, b, idle, open, expired) in table.entries(now) {
                        if !expired && (all || open > 0 || idle <= window) {
                            push(u128::from_be_bytes(k), b);
                        }
                    }
                }
                TableRef::Keys(table) => {
                    for (k, b, idle, open, expired) in table.entries(now) {
                        if !expired && (all || open > 0 || idle <= window) {
                            push(k, b);
                        }
                    }
                }
            }
            swept.insert(slot, now);
        }
    }
    // The XDP table: the data path refreshes its entries without telling anyone, so the
    // used ones are written again every XDP_SWEEP (a walk of the kernel table).
    let xdp_slot = (Arc::<str>::from(codec::XDP_TABLE), Arc::<str>::from(""));
    let xdp_last = swept.get(&xdp_slot).copied();
    let xdp_due = all || xdp_last.is_none_or(|l| now.duration_since(l) >= XDP_SWEEP);
    if xdp_due && let Some(x) = &w.xdp {
        let window = xdp_last.map_or(Duration::MAX, |l| now.duration_since(l) + SWEEP_TICK);
        let live = tokio::task::block_in_place(|| x.live());
        for b in live {
            if all || b.age <= window {
                batch.push(Event {
                    service: b.service.into(),
                    table: codec::XDP_TABLE.into(),
                    key: b.key,
                    backend: b.backend,
                    previous: None,
                    ttl_ms: b.ttl_ms,
                    at: now,
                });
            }
        }
        swept.insert(xdp_slot, now);
    }
    for chunk in batch.chunks(BATCH) {
        write(w, con, script, chunk).await?;
    }
    Ok(())
}

/// Read every binding Redis holds into the local tables (of a cluster, every master's);
/// returns how many there were.
async fn catch_up(w: &Worker, con: &mut Con) -> Result<usize, redis::RedisError> {
    let Con::Cluster(cluster) = con else {
        return catch_up_node(w, con, None).await;
    };
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut cluster.clone())
        .await?;
    let masters = masters(&nodes);
    if masters.is_empty() {
        return Err(timeout_error("CLUSTER NODES named no master"));
    }
    let mut total = 0;
    for (host, port) in masters {
        total += catch_up_node(w, con, Some((host, port))).await?;
    }
    Ok(total)
}

/// (host, port) of each master CLUSTER NODES lists that is not failed.
pub(super) fn masters(nodes: &str) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
            continue;
        }
        // ip:port@cport[,hostname]
        let addr = addr.split(['@', ',']).next().unwrap_or("");
        if let Some((host, port)) = addr.rsplit_once(':')
            && let Ok(port) = port.parse()
            && !host.is_empty()
        {
            out.push((host.trim_matches(['[', ']']).to_string(), port));
        }
    }
    out
}

/// The catch-up of one server, or with `node` of that cluster node (SCAN sent there, the
/// values read through the cluster connection, which splits MGET by slot).
async fn catch_up_node(
    w: &Worker,
    con: &mut Con,
    node: Option<(String, u16)>,
) -> Result<usize, redis::RedisError> {
    let pattern = format!("{}*", codec::PREFIX);
    let mut cursor: u64 = 0;
    let mut total = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000);
        let (next, keys): (u64, Vec<String>) = match (&node, &mut *con) {
            (Some((host, port)), Con::Cluster(c)) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let v = c
                    .route_command(
                        scan,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?;
                redis::from_redis_value(v)?
            }
            _ => scan.query_async(con).await?,
        };
        if !keys.is_empty() {
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(con).await?;
            for (key, value) in keys.iter().zip(values) {
                let Some(value) = value else { continue };
                let (Some((service, table, k)), Some((backend, _))) =
                    (codec::parse_key(key), codec::parse_value(&value))
                else {
                    continue;
                };
                total += 1;
                if apply(w, service, table, k, backend) {
                    MirrorStats::bump(&w.stats.applied);
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(total);
        }
    }
}
