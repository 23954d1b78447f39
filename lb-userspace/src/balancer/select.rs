//! How the L7 proxy picks a backend for a client no persistence decides (as pingora's
//! `BackendSelection`): small implementations behind one trait. Candidates are indexes into
//! the pool's backends that are up and not excluded (retries).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::Algorithm;

pub trait BackendSelection: Send + Sync {
    /// Pick one of `candidates` (each `(index, weight)`, weight > 0). `hint` varies per
    /// request (Kemp's "add port" mixes the client port in).
    fn select(&self, candidates: &[(usize, u32)], hint: u64) -> Option<usize>;
    /// A request to backend `index` started / ended (least connections counts them).
    fn started(&self, index: usize) {
        let _ = index;
    }
    fn ended(&self, index: usize) {
        let _ = index;
    }
}

pub fn for_algorithm(a: Algorithm, pool_size: usize) -> Box<dyn BackendSelection> {
    match a {
        Algorithm::RoundRobin => Box::new(WeightedRoundRobin::default()),
        // Sized for any pool a reload can bring, so counts never fall off the end.
        Algorithm::LeastConnections => Box::new(LeastConnections::new(
            pool_size.max(lb_common::MAX_BACKENDS as usize),
        )),
    }
}

/// Weighted round robin: request n goes to the candidate whose cumulative weight range
/// contains n mod the total weight.
#[derive(Default)]
pub struct WeightedRoundRobin {
    next: AtomicU64,
}

impl BackendSelection for WeightedRoundRobin {
    fn select(&self, candidates: &[(usize, u32)], hint: u64) -> Option<usize> {
        let total: u64 = candidates.iter().map(|(_, w)| *w as u64).sum();
        if total == 0 {
            return None;
        }
        let mut n = self.next.fetch_add(1, Ordering::Relaxed).wrapping_add(hint) % total;
        for (i, w) in candidates {
            if n < *w as u64 {
                return Some(*i);
            }
            n -= *w as u64;
        }
        None
    }
}

/// Fewest requests in flight relative to weight; ties go round robin.
pub struct LeastConnections {
    active: Vec<AtomicU32>,
    tie: AtomicU64,
}

impl LeastConnections {
    pub fn new(pool_size: usize) -> Self {
        LeastConnections {
            active: (0..pool_size).map(|_| AtomicU32::new(0)).collect(),
            tie: AtomicU64::new(0),
        }
    }

    fn load(&self, i: usize) -> u32 {
        self.active.get(i).map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

impl BackendSelection for LeastConnections {
    fn select(&self, candidates: &[(usize, u32)], hint: u64) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let start = (self.tie.fetch_add(1, Ordering::Relaxed).wrapping_add(hint)
            % candidates.len() as u64) as usize;
        // Compare active/weight as cross products to stay in integers.
        (0..candidates.len())
            .map(|k| candidates[(start + k) % candidates.len()])
            .min_by(|(a, wa), (b, wb)| {
                (self.load(*a) as u64 * *wb as u64).cmp(&(self.load(*b) as u64 * *wa as u64))
            })
            .map(|(i, _)| i)
    }

    fn started(&self, index: usize) {
        if let Some(a) = self.active.get(index) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn ended(&self, index: usize) {
        if let Some(a) = self.active.get(index) {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_honours_weights_and_skips_nothing() {
        let rr = WeightedRoundRobin::default();
        let c = [(0, 1), (2, 3), (5, 1)];
        let mut counts = [0usize; 6];
        for _ in 0..500 {
            counts[rr.select(&c, 0).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 0, 300, 0, 0, 100]);
        assert_eq!(rr.select(&[], 0), None);
        assert_eq!(rr.select(&[(1, 0)], 0), None);
    }

    #[test]
    fn least_connections_prefers_the_idle_relative_to_weight() {
        let lc = LeastConnections::new(3);
        let c = [(0, 1), (1, 1), (2, 2)];
        lc.started(0);
        lc.started(1);
        lc.started(2);
        // Loads per weight: 1, 1, 0.5 -> backend 2.
        assert_eq!(lc.select(&c, 0), Some(2));
        lc.started(2);
        lc.started(2);
        // 1, 1, 1.5 -> 0 or 1.
        assert!(matches!(lc.select(&c, 0), Some(0) | Some(1)));
        lc.ended(0);
        assert_eq!(lc.select(&c, 0), Some(0));
        lc.ended(0);
        lc.ended(0); // never below zero
        assert_eq!(lc.load(0), 0);
    }

    proptest::proptest! {
        #[test]
        fn selections_are_always_candidates(ws in proptest::collection::vec(1u32..5, 1..8), hint: u64) {
            let c: Vec<(usize, u32)> = ws.iter().enumerate().map(|(i, w)| (i * 2, *w)).collect();
            for s in [for_algorithm(Algorithm::RoundRobin, 16), for_algorithm(Algorithm::LeastConnections, 16)] {
                for _ in 0..20 {
                    let i = s.select(&c, hint).unwrap();
                    proptest::prop_assert!(c.iter().any(|(ci, _)| *ci == i));
                }
            }
        }
    }
}
