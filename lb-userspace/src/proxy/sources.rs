//! Open connections per client source, capped so one address cannot take every slot.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
};

/// IPv6 clients are counted per /64: one host usually owns a whole /64 and could otherwise
/// open each connection from a fresh address.
const V6_PREFIX_MASK: u128 = !0u128 << 64;

/// Clones share the counts (one limiter for all the workers of a listener).
#[derive(Clone)]
pub(super) struct SourceLimiter {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One counted connection; uncounted on drop.
pub(super) struct SourceSlot {
    key: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

fn key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & V6_PREFIX_MASK)),
        v4 => v4,
    }
}

impl SourceLimiter {
    pub(super) fn new(max: usize) -> SourceLimiter {
        SourceLimiter {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `addr`, or `None` when it has `max` open.
    pub(super) fn acquire(&self, addr: IpAddr) -> Option<SourceSlot> {
        let key = key(addr);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            key,
            open: self.open.clone(),
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn caps_each_source_and_forgets_closed_ones() {
        let l = SourceLimiter::new(2);
        let a1 = l.acquire(ip("192.0.2.1")).expect("first");
        let a2 = l
            .acquire(ip("::ffff:192.0.2.1"))
            .expect("second (same, mapped)");
        assert!(l.acquire(ip("192.0.2.1")).is_none(), "third refused");
        let _b = l
            .acquire(ip("192.0.2.2"))
            .expect("another source is unaffected");
        drop(a1);
        let a3 = l.acquire(ip("192.0.2.1")).expect("a slot came back");
        drop((a2, a3));
        assert_eq!(l.tracked(), 1, "a source with nothing open is forgotten");
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = SourceLimiter::new(1);
        let _a = l.acquire(ip("2001:db8:1:2::1")).expect("first");
        assert!(
            l.acquire(ip("2001:db8:1:2:ffff::9")).is_none(),
            "same /64, other address"
        );
        let _b = l.acquire(ip("2001:db8:1:3::1")).expect("another /64");
    }
}
