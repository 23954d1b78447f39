//! Per-source quota of new persistence keys: one client (an IPv4 address, an IPv6 /64)
//! may create at most `limit` new table entries a minute per service, so a flood of fresh
//! URLs, header values, IPv6 sources or app cookies from it cannot evict everyone else's
//! bindings. Beyond the quota the request is still served; only the entry is not stored.
//!
//! Cheap on the request path: a few sharded maps of (source -> minute, count), with a bounded
//! number of sources per shard; counts from an earlier minute are simply replaced.

use std::{collections::HashMap, hash::BuildHasher, net::IpAddr, sync::Mutex, time::Instant};

const SHARDS: usize = 16;
/// Sources tracked per shard; when a shard is full of this minute's sources a new one is
/// admitted untracked (the quota is per source: it cannot hold back many distinct sources).
const SOURCES_PER_SHARD: usize = 4096;

pub struct SourceQuota {
    /// New keys per source per minute; 0: no quota.
    limit: u32,
    start: Instant,
    shards: Vec<Mutex<HashMap<u64, (u32, u32)>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// The quota's unit of a client: the IPv4 address, or the IPv6 /64 (an IPv4-mapped IPv6
/// address counts as its IPv4 address).
fn source_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u64 | 1 << 63,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => u32::from(v4) as u64 | 1 << 63,
            // The tag bit is part of the /64 here too; a v6 prefix with it set and a v4
            // address may share a counter, which only makes the quota stricter for both.
            None => (u128::from(a) >> 64) as u64,
        },
    }
}

impl SourceQuota {
    pub fn new(limit: u32) -> Self {
        SourceQuota {
            limit,
            start: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    /// May `client` create one more key at `now`? Counts it when yes.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let minute = (now.saturating_duration_since(self.start).as_secs() / 60) as u32;
        let key = source_key(client);
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, n)) = shard.get_mut(&key) {
            if *m != minute {
                (*m, *n) = (minute, 0);
            }
            if *n >= self.limit {
                return false;
            }
            *n += 1;
            return true;
        }
        if shard.len() >= SOURCES_PER_SHARD {
            shard.retain(|_, (m, _)| *m == minute);
            if shard.len() >= SOURCES_PER_SHARD {
                return true;
            }
        }
        shard.insert(key, (minute, 1));
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn quota_is_per_source_per_minute() {
        let q = SourceQuota::new(3);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.7".parse().expect("ip");
        let b: IpAddr = "198.51.100.8".parse().expect("ip");
        for n in 0..3 {
            assert!(q.allow(a, t0), "key {n} of a is within the quota");
        }
        assert!(
            !q.allow(a, t0),
            "the 4th new key of a in the minute is refused"
        );
        assert!(q.allow(b, t0), "another source has its own quota");
        assert!(
            q.allow(a, t0 + Duration::from_secs(61)),
            "a new minute resets the count"
        );
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let q = SourceQuota::new(2);
        let t0 = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(q.allow(ip("2001:db8:1:2::1"), t0));
        assert!(q.allow(ip("2001:db8:1:2::ffff"), t0));
        assert!(
            !q.allow(ip("2001:db8:1:2:abcd::9"), t0),
            "a fresh address in the same /64 is the same source"
        );
        assert!(q.allow(ip("2001:db8:1:3::1"), t0), "another /64");
        assert!(q.allow(ip("::ffff:192.0.2.1"), t0));
        assert!(q.allow(ip("192.0.2.1"), t0));
        assert!(
            !q.allow(ip("192.0.2.1"), t0),
            "a v4-mapped address counts as its IPv4 address"
        );
    }

    #[test]
    fn zero_is_no_quota_and_memory_is_bounded() {
        let q = SourceQuota::new(0);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.9".parse().expect("ip");
        assert!((0..10_000).all(|_| q.allow(a, t0)));
        let q = SourceQuota::new(1);
        for i in 0..200_000u32 {
            q.allow(IpAddr::V4(i.into()), t0);
        }
        let tracked: usize = q.shards.iter().map(|s| s.lock().expect("lock").len()).sum();
        assert!(tracked <= SHARDS * SOURCES_PER_SHARD, "tracked {tracked}");
    }
}
