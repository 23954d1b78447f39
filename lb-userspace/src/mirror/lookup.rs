//! The mirror as the engines' [`Remote`]: an L7 local miss reads the key from Redis on the
//! worker's lookup connection (one multiplexed connection shared by every request; with a
//! cluster, MGET is split by hash slot and sent to each slot's node at once), bounded
//! by `mirroring.lookup_timeout_ms`. While the worker is not connected nothing is asked:
//! the request is decided locally at once.

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

pub(super) struct Lookups {
    /// The connection for lookups while the worker is connected.
    pub con: ArcSwapOption<Con>,
    /// `mirroring.lookup_timeout_ms` in force; zero: lookups are off (also while a reload
    /// has removed `mirroring`).
    timeout_ms: AtomicU64,
    pub stats: Arc<MirrorStats>,
}

impl Lookups {
    pub fn new(timeout: Duration, stats: Arc<MirrorStats>) -> Lookups {
        let l = Lookups {
            con: Default::default(),
            timeout_ms: AtomicU64::new(0),
            stats,
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
