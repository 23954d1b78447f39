//! `mirroring`: the stored persistence tables shared between instances through Redis
//! (`crate::mirror`). Off when absent: one instance needs nothing. Redis is either one
//! server (`redis`, a URL), the master of a Sentinel deployment (`sentinel`), or a Redis
//! Cluster (`cluster`).

use serde::Deserialize;

use super::{ConfigError, names::check_name};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirroring {
    /// `redis://[user:password@]host[:port][/db]` or `redis+unix:///path`.
    #[serde(default)]
    pub redis: Option<String>,
    /// The master of a Sentinel deployment, found through its sentinels.
    #[serde(default)]
    pub sentinel: Option<RawSentinel>,
    /// A Redis Cluster, found through any of its nodes.
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    /// This instance's name, unique among the instances sharing the Redis.
    pub instance: String,
    /// How long an L7 local miss may wait for Redis' binding (0: never ask).
    #[serde(default)]
    pub lookup_timeout_ms: Option<u64>,
}

/// Default of `mirroring.lookup_timeout_ms`: far above a Redis round trip on a LAN (well
/// under a millisecond), so a loaded Redis still answers, yet small next to the new
/// client's own connection setup; only a local miss pays it, once per new key.
pub const DEFAULT_LOOKUP_TIMEOUT_MS: u64 = 50;
/// Most a request may be held for Redis.
pub const MAX_LOOKUP_TIMEOUT_MS: u64 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    /// The sentinels: `redis://[user:password@]host:26379`.
    pub nodes: Vec<String>,
    /// The master's name in the sentinels' config (`sentinel monitor <name> ...`).
    pub master: String,
    /// ACL user and password of the master (and the replica promoted in its place).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Database number on the master.
    #[serde(default)]
    pub db: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Some of the cluster's nodes, `redis://[user:password@]host:port`: the client learns
    /// the rest (and which node serves which slot) from the first that answers.
    pub nodes: Vec<String>,
}

/// Which Redis the instances share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redis {
    /// One server, by URL.
    Server(String),
    /// Whichever server the sentinels name master, asked on every (re)connection.
    Sentinel(Sentinel),
    /// A Redis Cluster: each key on the node serving its slot.
    Cluster(Cluster),
}

/// Validated `mirroring.cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Node URLs, in the order they are tried.
    pub nodes: Vec<String>,
}

/// Validated `mirroring.sentinel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    /// Sentinel URLs, in the order they are asked.
    pub nodes: Vec<String>,
    pub master: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

/// Validated `mirroring`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirroring {
    pub redis: Redis,
    pub instance: String,
    /// How long an L7 local miss waits for Redis' binding; zero: it does not ask.
    pub lookup_timeout: std::time::Duration,
}

pub(super) fn validate(raw: Option<&RawMirroring>) -> Result<Option<Mirroring>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    check_name("mirroring.instance", &raw.instance)?;
    let given: Vec<&str> = [
        raw.redis.as_ref().map(|_| "redis"),
        raw.sentinel.as_ref().map(|_| "sentinel"),
        raw.cluster.as_ref().map(|_| "cluster"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let redis = match (&raw.redis, &raw.sentinel, &raw.cluster) {
        (Some(url), None, None) => Redis::Server(server_url("mirroring.redis", url, true)?),
        (None, Some(s), None) => Redis::Sentinel(sentinel(s)?),
        (None, None, Some(c)) => Redis::Cluster(cluster(c)?),
        (None, None, None) => {
            return Err(ConfigError::new(
                "mirroring.redis",
                "required: the URL of one Redis server, a sentinel section naming the sentinels and the master, or a cluster section naming cluster nodes",
            ));
        }
        _ => {
            return Err(ConfigError::new(
                format!("mirroring.{}", given[1]),
                format!(
                    "give one of redis (one server), sentinel (a master found through Sentinel) or cluster (a Redis Cluster), not {}",
                    given.join(" and ")
                ),
            ));
        }
    };
    let lookup_ms = raw.lookup_timeout_ms.unwrap_or(DEFAULT_LOOKUP_TIMEOUT_MS);
    if lookup_ms > MAX_LOOKUP_TIMEOUT_MS {
        return Err(ConfigError::new(
            "mirroring.lookup_timeout_ms",
            format!(
                "{lookup_ms}: must be at most {MAX_LOOKUP_TIMEOUT_MS} (a request waits that long for Redis); 0 turns lookups off"
            ),
        ));
    }
    Ok(Some(Mirroring {
        redis,
        instance: raw.instance.clone(),
        lookup_timeout: std::time::Duration::from_millis(lookup_ms),
    }))
}

/// The URL without its password, for logs and errors: `redis://user:pw@h` gives
/// `redis://***@h` (also without a scheme, `user:pw@h` gives `***@h`).
pub fn redact(url: &str) -> String {
    let start = url.find("://").map_or(0, |s| s + 3);
    match url.rfind('@') {
        Some(at) if at >= start => format!("{}***@{}", &url[..start], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A checked Redis URL (`redis://`, or with `unix` also `redis+unix://`). Errors show the
/// URL without its password: they reach logs and the admin API's reload errors.
fn server_url(at: &str, url: &str, unix: bool) -> Result<String, ConfigError> {
    let url = url.trim();
    if url.starts_with("rediss://") {
        return Err(ConfigError::new(
            at,
            "rediss:// (TLS) is not supported by this build: use redis:// on a trusted network or a local TLS tunnel",
        ));
    }
    let scheme_ok = url.starts_with("redis://") || (unix && url.starts_with("redis+unix://"));
    if !scheme_ok {
        let schemes = if unix {
            "redis:// or redis+unix://"
        } else {
            "redis://"
        };
        return Err(ConfigError::new(
            at,
            format!("{:?}: must start with {schemes}", redact(url)),
        ));
    }
    redis::Client::open(url).map_err(|e| {
        let shown = redact(url);
        // The parser's message may quote the URL.
        let e = e.to_string().replace(url, &shown);
        ConfigError::new(at, format!("{shown:?} is not a Redis URL: {e}"))
    })?;
    Ok(url.to_string())
}

fn cluster(raw: &RawCluster) -> Result<Cluster, ConfigError> {
    if raw.nodes.is_empty() {
        return Err(ConfigError::new(
            "mirroring.cluster.nodes",
            "must list at least one cluster node (redis://host:port)",
        ));
    }
    let mut nodes = Vec::with_capacity(raw.nodes.len());
    for (i, n) in raw.nodes.iter().enumerate() {
        nodes.push(server_url(
            &format!("mirroring.cluster.nodes[{i}]"),
            n,
            false,
        )?);
    }
    let c = Cluster { nodes };
    c.client().map_err(|e| {
        ConfigError::new(
            "mirroring.cluster",
            format!("not a usable Cluster client: {e}"),
        )
    })?;
    Ok(c)
}

impl Cluster {
    /// The cluster client: it asks the nodes in order for the slot map, and follows
    /// redirections when slots move.
    pub fn client(&self) -> redis::RedisResult<redis::cluster::ClusterClient> {
        redis::cluster::ClusterClient::builder(self.nodes.clone())
            .connection_timeout(std::time::Duration::from_secs(1))
            .response_timeout(std::time::Duration::from_secs(1))
            .build()
    }
}

fn sentinel(raw: &RawSentinel) -> Result<Sentinel, ConfigError> {
    if raw.nodes.is_empty() {
        return Err(ConfigError::new(
            "mirroring.sentinel.nodes",
            "must list at least one sentinel (redis://host:26379)",
        ));
    }
    let mut nodes = Vec::with_capacity(raw.nodes.len());
    for (i, n) in raw.nodes.iter().enumerate() {
        nodes.push(server_url(
            &format!("mirroring.sentinel.nodes[{i}]"),
            n,
            false,
        )?);
    }
    check_name("mirroring.sentinel.master", &raw.master)?;
    let db = raw.db.unwrap_or(0);
    if db < 0 {
        return Err(ConfigError::new(
            "mirroring.sentinel.db",
            format!("{db}: must be 0 or more"),
        ));
    }
    for (at, v) in [
        ("mirroring.sentinel.username", &raw.username),
        ("mirroring.sentinel.password", &raw.password),
    ] {
        if v.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(at, "must not be empty (leave it out)"));
        }
    }
    // The client the worker builds from it: any refusal shows here, not at run time.
    let s = Sentinel {
        nodes,
        master: raw.master.clone(),
        username: raw.username.clone(),
        password: raw.password.clone(),
        db,
    };
    s.client().map_err(|e| {
        ConfigError::new(
            "mirroring.sentinel",
            format!("not a usable Sentinel client: {e}"),
        )
    })?;
    Ok(s)
}

impl Sentinel {
    /// A client of the master: each `async_get_client` asks the sentinels (in order) which
    /// server is master now and checks that server's `ROLE`.
    pub fn client(&self) -> redis::RedisResult<redis::sentinel::SentinelClient> {
        let mut info = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(u) = &self.username {
            info = info.set_username(u);
        }
        if let Some(p) = &self.password {
            info = info.set_password(p);
        }
        let node =
            redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        redis::sentinel::SentinelClient::build(
            self.nodes.clone(),
            self.master.clone(),
            Some(node),
            redis::sentinel::SentinelServerType::Master,
        )
    }
}
