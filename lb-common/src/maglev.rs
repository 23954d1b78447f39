//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016), built in userspace.
//!
//! The same builder feeds the kernel's per-service tables and the L7 key-based methods, so
//! every tier and every tether instance with the same pool picks the same backend for the same
//! key. Backends are identified by their name (stable across address changes and config
//! order); weights give each backend turns in proportion to its weight, and weight 0 means
//! the backend takes no entries.

use alloc::{vec, vec::Vec};

use crate::hash::{MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED, hash_bytes};
use crate::maps::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug)]
pub struct MaglevBackend<'a> {
    /// Value written into the table (the backend id).
    pub id: u32,
    /// Stable identity; determines the backend's permutation.
    pub name: &'a str,
    pub weight: u32,
}

/// Build a table of `size` entries (`size` must be prime for the permutations to cover it).
/// Returns all `NO_BACKEND` when no backend has a positive weight.
pub fn build_table(backends: &[MaglevBackend<'_>], size: u32) -> Vec<u32> {
    let m = size as u64;
    let mut table = vec![NO_BACKEND; size as usize];
    // Sort by name so the result does not depend on config order.
    let mut bs: Vec<&MaglevBackend<'_>> = backends.iter().filter(|b| b.weight > 0).collect();
    bs.sort_by(|a, b| a.name.cmp(b.name).then(a.id.cmp(&b.id)));
    if bs.is_empty() || m < 2 {
        return table;
    }
    let perm: Vec<(u64, u64)> = bs
        .iter()
        .map(|b| {
            let offset = hash_bytes(b.name.as_bytes(), MAGLEV_OFFSET_SEED) as u64 % m;
            let skip = hash_bytes(b.name.as_bytes(), MAGLEV_SKIP_SEED) as u64 % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let wmax = bs.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let mut next = vec![0u64; bs.len()];
    let mut credit = vec![0u64; bs.len()];
    let mut filled = 0u64;
    loop {
        for i in 0..bs.len() {
            // A backend takes a turn each time its credit reaches the largest weight, so
            // over a round of passes it fills entries in proportion to its weight.
            credit[i] += bs[i].weight as u64;
            if credit[i] < wmax {
                continue;
            }
            credit[i] -= wmax;
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != NO_BACKEND {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = bs[i].id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::maps::MAGLEV_TABLE_SIZE;
    use alloc::{format, string::String};
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn backends(names: &[String], weight: impl Fn(usize) -> u32) -> Vec<MaglevBackend<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| MaglevBackend {
                id: i as u32,
                name: n,
                weight: weight(i),
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &e in table {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn balance_equal_weights_within_one_percent() {
        for n in [3usize, 10, 100, 1000] {
            let ns = names(n);
            let t = build_table(&backends(&ns, |_| 1), MAGLEV_TABLE_SIZE);
            let c = counts(&t, n);
            let avg = MAGLEV_TABLE_SIZE as f64 / n as f64;
            let max = *c.iter().max().unwrap() as f64;
            assert!(max / avg <= 1.01, "n={n}: max {max} vs avg {avg}");
            assert!(c.iter().all(|&x| x > 0), "n={n}: a backend got no entries");
        }
    }

    #[test]
    fn disruption_removing_one_of_100_is_under_one_percent() {
        let ns = names(100);
        let before = build_table(&backends(&ns, |_| 1), MAGLEV_TABLE_SIZE);
        for removed in [0usize, 37, 99] {
            let after = build_table(
                &backends(&ns, |i| if i == removed { 0 } else { 1 }),
                MAGLEV_TABLE_SIZE,
            );
            let own = before.iter().filter(|&&b| b == removed as u32).count();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let extra = moved - own;
            let pct = extra as f64 * 100.0 / MAGLEV_TABLE_SIZE as f64;
            assert!(
                pct < 1.0,
                "removing {removed}: {extra} entries ({pct:.3}%) moved beyond its own {own}"
            );
        }
    }

    #[test]
    fn weights_are_proportional() {
        let ns = names(4);
        let t = build_table(&backends(&ns, |i| [1, 2, 3, 4][i]), MAGLEV_TABLE_SIZE);
        let c = counts(&t, 4);
        for (i, w) in [1.0f64, 2.0, 3.0, 4.0].iter().enumerate() {
            let want = MAGLEV_TABLE_SIZE as f64 * w / 10.0;
            let got = c[i] as f64;
            assert!(
                (got - want).abs() / want < 0.01,
                "backend {i}: {got} entries, want {want}"
            );
        }
    }

    #[test]
    fn zero_weight_gets_nothing_and_empty_pool_is_no_backend() {
        let ns = names(3);
        let t = build_table(
            &backends(&ns, |i| if i == 1 { 0 } else { 5 }),
            MAGLEV_TABLE_SIZE,
        );
        assert!(!t.contains(&1));
        assert!(!t.contains(&NO_BACKEND));
        let t = build_table(&backends(&ns, |_| 0), 7);
        assert_eq!(t, vec![NO_BACKEND; 7]);
        assert_eq!(build_table(&[], 7), vec![NO_BACKEND; 7]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn order_of_config_does_not_matter(n in 1usize..40, rot in 0usize..40) {
            let ns = names(n);
            let bs = backends(&ns, |i| 1 + (i as u32 % 3));
            let mut rotated = bs.clone();
            rotated.rotate_left(rot % n);
            prop_assert_eq!(build_table(&bs, 4099), build_table(&rotated, 4099));
        }

        #[test]
        fn every_entry_filled_with_a_weighted_backend(ws in proptest::collection::vec(0u32..5, 1..30)) {
            let ns = names(ws.len());
            let t = build_table(&backends(&ns, |i| ws[i]), 4099);
            if ws.iter().all(|&w| w == 0) {
                prop_assert!(t.iter().all(|&e| e == NO_BACKEND));
            } else {
                prop_assert!(t.iter().all(|&e| e != NO_BACKEND && ws[e as usize] > 0));
            }
        }

        #[test]
        fn removing_a_backend_only_moves_its_entries_mostly(n in 5usize..60, victim in 0usize..60) {
            let victim = victim % n;
            let ns = names(n);
            let before = build_table(&backends(&ns, |_| 1), MAGLEV_TABLE_SIZE);
            let after = build_table(&backends(&ns, |i| u32::from(i != victim)), MAGLEV_TABLE_SIZE);
            let own = before.iter().filter(|&&b| b == victim as u32).count();
            let extra = before.iter().zip(&after).filter(|(b, a)| b != a).count() - own;
            // Maglev's bound grows with N / M; at these sizes a few percent at most.
            prop_assert!((extra as f64) < 0.03 * MAGLEV_TABLE_SIZE as f64, "extra {}", extra);
        }
    }
}
