//! The mirror as the engines' [`Remote`]: an L7 local miss reads the key from Redis on the
//! worker's lookup connection (one multiplexed connection shared by every request; with a
//! cluster, MGET is split by hash slot and sent to each slot's node at once), bounded
//! by `mirroring.lookup_timeout_ms`. While the worker is not connected nothing is asked:
//! the request is decided locally at once. At most [`MAX_IN_FLIGHT`] lookups wait for Redis
//! at once, process-wide: the keys come from clients (cookies, headers, TLS session IDs), so
//! a client sending random values would otherwise flood the shared Redis; beyond the cap a
//! miss is decided locally at once and counted (`tether_mirror_lookups_shed_total`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::{MirrorStats, codec, con::Con};
use crate::engine::mirrored::{Found, Remote};
use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;

/// Lookups waiting for Redis at once, process-wide. Enough for the misses of many new
/// clients within one `lookup_timeout_ms`, small enough that a flood of invented keys
/// cannot crowd out the writes (and other instances' lookups) on the shared Redis.
pub const MAX_IN_FLIGHT: usize = 256;

pub(super) struct Lookups {
    /// The connection for lookups while the worker is connected.
    pub con: ArcSwapOption<Con>,
    /// `mirroring.lookup_timeout_ms` in force; zero: lookups are off (also while a reload
    /// has removed `mirroring`).
    timeout_ms: AtomicU64,
    pub stats: Arc<MirrorStats>,
    /// One permit per lookup waiting for Redis ([`MAX_IN_FLIGHT`]).
    pub(super) in_flight: Arc<Semaphore>,
}

impl Lookups {
    pub fn new(timeout: Duration, stats: Arc<MirrorStats>) -> Lookups {
        let l = Lookups {
            con: Default::default(),
            timeout_ms: AtomicU64::new(0),
            stats,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        };
        l.set_timeout(timeout);
        l
    }

    /// Take a reloaded timeout (zero: off).
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Remote for Lookups {
    fn lookup(&self, service: &str, keys: &[(String, u128)]) -> Option<BoxFuture<'static, Found>> {
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        if timeout.is_zero() || keys.is_empty() {
            return None;
        }
        // The permit lives in the future: dropped when it ends, times out or is abandoned.
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            MirrorStats::bump(&self.stats.lookups_shed);
            return None;
        };
        let Some(con) = self.con.load_full() else {
            MirrorStats::bump(&self.stats.lookups_skipped);
            return None;
        };
        MirrorStats::bump(&self.stats.lookups);
        let keys: Vec<String> = keys
            .iter()
            .map(|(table, k)| codec::key(service, table, *k))
            .collect();
        let stats = self.stats.clone();
        Some(Box::pin(async move {
            let _permit = permit;
            let mut con = (*con).clone();
            let mut cmd = redis::cmd("MGET");
            cmd.arg(&keys);
            let mget = cmd.query_async::<Vec<Option<String>>>(&mut con);
            match tokio::time::timeout(timeout, mget).await {
                Err(_) => {
                    MirrorStats::bump(&stats.lookup_timeouts);
                    None
                }
                Ok(Err(e)) => {
                    MirrorStats::bump(&stats.lookup_errors);
                    log::debug!("mirroring: lookup of {keys:?}: {e}");
                    None
                }
                Ok(Ok(values)) => {
                    let found = found(&values);
                    if found.is_some() {
                        MirrorStats::bump(&stats.lookup_hits);
                    }
                    found
                }
            }
        }))
    }
}

/// The first binding among MGET's values: (its index, backend identity).
pub(super) fn found(values: &[Option<String>]) -> Found {
    values.iter().enumerate().find_map(|(i, v)| {
        let (backend, _) = codec::parse_value(v.as_deref()?)?;
        Some((i, backend))
    })
}
