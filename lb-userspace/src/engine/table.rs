//! Userspace persistence tables of the L7 proxy (app cookie values, client addresses):
//! sharded, capped, least-recently-used eviction, lazy expiry on lookup.
//!
//! Expiry follows Avi's rule for client-IP persistence: an entry does not expire while the
//! client has a connection open; the timeout counts from its last activity or close.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    num::NonZeroUsize,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use lru::LruCache;

const SHARDS: usize = 16;

struct Shard<K: Hash + Eq> {
    entries: LruCache<K, (u32, Instant)>,
    /// Open client connections per key (only for tables that count them).
    open: HashMap<K, u32>,
}

/// What [`Table::insert_admitted`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The key was present: re-bound and refreshed.
    Refreshed,
    /// A new entry, in free room or in place of an expired one.
    Added,
    /// A new entry that evicted another key's live entry.
    Evicted,
    /// A new key not admitted: nothing stored.
    Refused,
}

/// Told of every new binding and every re-binding to another backend made through
/// [`Table::insert_admitted`] (key, new backend, the backend it replaced), after the shard's
/// lock is released; not of refreshes, nor of bindings taken with [`Table::apply`]. The
/// mirror publishes through it; it must not block.
pub type Watcher<K> = Box<dyn Fn(&K, u32, Option<u32>) + Send + Sync>;

/// key -> backend identity (`lb_common::backend_identity`), stable across reloads.
pub struct Table<K: Hash + Eq> {
    shards: Vec<Mutex<Shard<K>>>,
    timeout: Duration,
    /// Entries all shards hold together.
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
    watcher: OnceLock<Watcher<K>>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    /// At most `capacity` entries (rounded up to a multiple of the shard count).
    pub fn new(capacity: usize, timeout: Duration) -> Self {
        let per = NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).expect("non-zero");
        Table {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: LruCache::new(per),
                        open: HashMap::new(),
                    })
                })
                .collect(),
            timeout,
            capacity: per.get() * SHARDS,
            hasher: Default::default(),
            watcher: OnceLock::new(),
        }
    }

    /// Install the table's watcher; `false` when it already has one (kept).
    pub fn watch(&self, w: Watcher<K>) -> bool {
        self.watcher.set(w).is_ok()
    }

    /// Take a binding another instance made (mirroring): bind or re-bind `k` to `backend`
    /// with last use `at` (a binding kept to the same backend keeps the later of the two
    /// uses). The watcher is not told. Returns whether the backend changed or `k` was new.
    pub fn apply(&self, k: K, backend: u32, at: Instant) -> bool {
        let mut s = self.shard(&k);
        match s.entries.get_mut(&k) {
            Some((b, seen)) if *b == backend => {
                *seen = (*seen).max(at);
                false
            }
            Some(entry) => {
                *entry = (backend, at);
                true
            }
            None => {
                s.entries.put(k, (backend, at));
                true
            }
        }
    }

    fn shard(&self, k: &K) -> std::sync::MutexGuard<'_, Shard<K>> {
        let i = (self.hasher.hash_one(k) as usize) % SHARDS;
        // A poisoned shard only means a panic elsewhere mid-update of plain data: keep going.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live binding of `k`, refreshing its last use. An entry idle past the timeout
    /// with no open connection is removed and reported as a miss (`Err(true)`); no entry is
    /// `Err(false)`.
    pub fn get(&self, k: &K, now: Instant) -> Result<u32, bool> {
        let mut s = self.shard(k);
        let open = s.open.get(k).copied().unwrap_or(0);
        let Some((backend, seen)) = s.entries.get_mut(k) else {
            return Err(false);
        };
        if open == 0 && now.saturating_duration_since(*seen) > self.timeout {
            s.entries.pop(k);
            return Err(true);
        }
        *seen = now;
        Ok(*backend)
    }

    /// Bind `k`; `true` when that evicted another client's live (unexpired) entry to make
    /// room.
    pub fn insert(&self, k: K, backend: u32, now: Instant) -> bool {
        self.insert_admitted(k, backend, now, || true) == Inserted::Evicted
    }

    /// Bind `k`: a present key is re-bound and refreshed; a new one only when `admit` says
    /// so (asked under the shard's lock, once, only for a new key).
    pub fn insert_admitted(
        &self,
        k: K,
        backend: u32,
        now: Instant,
        admit: impl FnOnce() -> bool,
    ) -> Inserted {
        let mut s = self.shard(&k);
        let previous = s.entries.peek(&k).map(|e| e.0);
        let existed = previous.is_some();
        if !existed && !admit() {
            return Inserted::Refused;
        }
        let watched = self.watcher.get().map(|w| (w, k.clone()));
        let result = match s.entries.push(k, (backend, now)) {
            Some((old, (_, seen))) if !existed => {
                if s.open.contains_key(&old) || now.saturating_duration_since(seen) <= self.timeout
                {
                    Inserted::Evicted
                } else {
                    Inserted::Added
                }
            }
            _ if existed => Inserted::Refreshed,
            _ => Inserted::Added,
        };
        drop(s);
        if let Some((w, k)) = watched
            && previous != Some(backend)
        {
            w(&k, backend, previous);
        }
        result
    }

    /// Whether `k` has an entry (live or not), without refreshing it.
    pub fn contains(&self, k: &K) -> bool {
        self.shard(k).entries.contains(k)
    }

    /// Like [`Table::insert`], but keeps an existing binding of `k` (whatever its age).
    /// Returns whether `k` was added.
    pub fn insert_absent(&self, k: K, backend: u32, now: Instant) -> bool {
        let mut s = self.shard(&k);
        if s.entries.contains(&k) {
            return false;
        }
        s.entries.put(k, (backend, now));
        true
    }

    pub fn remove(&self, k: &K) {
        self.shard(k).entries.pop(k);
    }

    /// A client connection opened: the entry cannot expire until it closes. When it is the
    /// client's only connection and the entry sat idle past the timeout with none open, the
    /// entry has expired: it is removed and `true` returned (the lookups that follow, made
    /// while this connection is open, could not tell).
    pub fn opened(&self, k: &K, now: Instant) -> bool {
        let mut s = self.shard(k);
        let n = s.open.entry(k.clone()).or_insert(0);
        *n += 1;
        let first = *n == 1;
        let stale = s
            .entries
            .peek(k)
            .is_some_and(|(_, seen)| now.saturating_duration_since(*seen) > self.timeout);
        if first && stale {
            s.entries.pop(k);
            return true;
        }
        false
    }

    /// A client connection closed: the timeout counts from now once none is open.
    pub fn closed(&self, k: &K, now: Instant) {
        let mut s = self.shard(k);
        match s.open.get_mut(k) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                s.open.remove(k);
            }
        }
        if let Some((_, seen)) = s.entries.peek_mut(k) {
            *seen = now;
        }
    }

    /// Every entry: (key, backend identity, idle time, open connections, expired). Does not
    /// refresh anything.
    pub fn entries(&self, now: Instant) -> Vec<(K, u32, Duration, u32, bool)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let s = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, (backend, seen)) in s.entries.iter() {
                let idle = now.saturating_duration_since(*seen);
                let open = s.open.get(k).copied().unwrap_or(0);
                out.push((
                    k.clone(),
                    *backend,
                    idle,
                    open,
                    open == 0 && idle > self.timeout,
                ));
            }
        }
        out
    }

    /// Add the live (unexpired) entries per backend identity to `out`, shard by shard,
    /// without copying keys.
    pub fn count_live(&self, now: Instant, out: &mut HashMap<u32, u64>) {
        for shard in &self.shards {
            let s = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, (backend, seen)) in s.entries.iter() {
                let open = s.open.get(k).copied().unwrap_or(0);
                if open > 0 || now.saturating_duration_since(*seen) <= self.timeout {
                    *out.entry(*backend).or_insert(0) += 1;
                }
            }
        }
    }

    /// Remove the entries `matches` selects; returns how many were removed.
    pub fn remove_where(&self, matches: impl Fn(&K, u32) -> bool) -> usize {
        let mut removed = 0;
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|e| e.into_inner());
            let doomed: Vec<K> = s
                .entries
                .iter()
                .filter(|(k, (b, _))| matches(k, *b))
                .map(|(k, _)| k.clone())
                .collect();
            for k in &doomed {
                s.entries.pop(k);
            }
            removed += doomed.len();
        }
        removed
    }

    /// Idle time after which an entry with no open connection expires.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Entries the table holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A bounded key for arbitrary client-supplied strings (cookie values, header values): a
/// 128-bit digest, so a long value is never stored whole and cannot grow the table's memory.
pub fn digest(value: &[u8]) -> u128 {
    let a = lb_common::hash::hash_bytes(value, 0x7461_626c) as u128;
    let b = lb_common::hash::hash_bytes(value, 0x6b65_7932) as u128;
    let c = lb_common::hash::hash_bytes(value, 0x3333_7777) as u128;
    let d = lb_common::hash::hash_bytes(value, 0x5151_a5a5) as u128;
    a << 96 | b << 64 | c << 32 | d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_idle_timeout_unless_a_connection_is_open() {
        let t: Table<u32> = Table::new(64, Duration::from_secs(10));
        let t0 = Instant::now();
        t.insert(1, 7, t0);
        assert_eq!(t.get(&1, t0 + Duration::from_secs(9)), Ok(7));
        // Refreshed at 9 s: still live at 18 s.
        assert_eq!(t.get(&1, t0 + Duration::from_secs(18)), Ok(7));
        assert_eq!(
            t.get(&1, t0 + Duration::from_secs(29)),
            Err(true),
            "expired and removed"
        );
        assert_eq!(t.get(&1, t0 + Duration::from_secs(29)), Err(false));

        t.insert(2, 8, t0);
        assert!(!t.opened(&2, t0));
        assert_eq!(
            t.get(&2, t0 + Duration::from_secs(100)),
            Ok(8),
            "an open connection holds it"
        );
        t.closed(&2, t0 + Duration::from_secs(200));
        assert_eq!(
            t.get(&2, t0 + Duration::from_secs(205)),
            Ok(8),
            "timeout counts from the close"
        );
        assert_eq!(t.get(&2, t0 + Duration::from_secs(216)), Err(true));

        // The router's order: the connection opens, then its requests look up. An entry idle
        // past the timeout since the last close expires at that open.
        t.insert(3, 9, t0);
        assert!(!t.opened(&3, t0));
        t.closed(&3, t0 + Duration::from_secs(1));
        assert!(
            !t.opened(&3, t0 + Duration::from_secs(5)),
            "within the timeout: kept"
        );
        assert_eq!(t.get(&3, t0 + Duration::from_secs(6)), Ok(9));
        t.closed(&3, t0 + Duration::from_secs(6));
        assert!(
            t.opened(&3, t0 + Duration::from_secs(20)),
            "idle 14 s with none open: expired"
        );
        assert_eq!(t.get(&3, t0 + Duration::from_secs(20)), Err(false));
        // A second connection of a client that already has one does not expire anything.
        t.insert(3, 9, t0 + Duration::from_secs(20));
        assert!(!t.opened(&3, t0 + Duration::from_secs(500)));
    }

    #[test]
    fn capacity_is_bounded_with_lru_eviction() {
        let t: Table<u32> = Table::new(160, Duration::from_secs(60));
        let now = Instant::now();
        for k in 0..10_000 {
            t.insert(k, k, now);
        }
        assert!(t.len() <= 160, "len {}", t.len());
        assert_eq!(t.capacity(), 160);
        assert!(t.get(&9_999, now).is_ok(), "the newest survives");
    }

    #[test]
    fn insert_reports_evicting_a_live_entry_only() {
        // 16 shards of one entry each: a key evicts whatever its shard held.
        let t0 = Instant::now();
        // Insert fresh keys at `at` until `victim` is gone; what that insert said.
        let evict = |t: &Table<u32>, victim: u32, at: Instant| {
            for k in 1000..100_000 {
                let said = t.insert(k, 1, at);
                if !t.contains(&victim) {
                    return said;
                }
            }
            panic!("{victim} never evicted");
        };
        let t: Table<u32> = Table::new(16, Duration::from_secs(10));
        assert!(!t.insert(1, 1, t0), "an empty shard evicts nothing");
        assert!(!t.insert(1, 2, t0), "re-binding a key evicts nothing");
        assert!(evict(&t, 1, t0), "a live entry evicted is reported");

        let t: Table<u32> = Table::new(16, Duration::from_secs(10));
        t.insert(1, 1, t0);
        assert!(
            !evict(&t, 1, t0 + Duration::from_secs(60)),
            "an expired entry dropped is no eviction"
        );

        let t: Table<u32> = Table::new(16, Duration::from_secs(10));
        t.insert(1, 1, t0);
        assert!(!t.opened(&1, t0));
        assert!(
            evict(&t, 1, t0 + Duration::from_secs(60)),
            "an entry held by an open connection is live"
        );
    }

    #[test]
    fn admission_is_asked_for_new_keys_only() {
        let t: Table<u32> = Table::new(64, Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(t.insert_admitted(1, 7, now, || false), Inserted::Refused);
        assert!(!t.contains(&1), "a refused key is not stored");
        assert_eq!(t.insert_admitted(1, 7, now, || true), Inserted::Added);
        assert_eq!(
            t.insert_admitted(1, 8, now, || panic!("asked for a present key")),
            Inserted::Refreshed
        );
        assert_eq!(t.get(&1, now), Ok(8), "re-bound");
    }

    #[test]
    fn entries_are_listed_and_removed_by_predicate() {
        let t: Table<u32> = Table::new(64, Duration::from_secs(10));
        let t0 = Instant::now();
        for k in 0..6 {
            t.insert(k, k % 2, t0);
        }
        assert!(!t.opened(&4, t0));
        let later = t0 + Duration::from_secs(30);
        let mut listed = t.entries(later);
        listed.sort_by_key(|e| e.0);
        assert_eq!(listed.len(), 6);
        assert_eq!(listed[1], (1, 1, Duration::from_secs(30), 0, true));
        assert_eq!(
            listed[4],
            (4, 0, Duration::from_secs(30), 1, false),
            "an open connection keeps it live"
        );
        let mut live = HashMap::new();
        t.count_live(later, &mut live);
        assert_eq!(live, HashMap::from([(0, 1)]), "only the held entry is live");
        t.count_live(t0, &mut live);
        assert_eq!(
            live,
            HashMap::from([(0, 4), (1, 3)]),
            "all live at first, added"
        );
        assert_eq!(t.remove_where(|_, b| b == 1), 3);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(&1, t0), Err(false));
        assert_eq!(t.get(&2, t0), Ok(0));
    }

    #[test]
    fn digest_separates_values_and_bounds_keys() {
        assert_ne!(digest(b"abc"), digest(b"abd"));
        assert_eq!(digest(&[b'x'; 100_000]), digest(&[b'x'; 100_000]));
    }
}
