use proptest::prelude::*;

use super::*;

#[test]
fn powers_of_two_stay_one_table() {
    for k in 0..=26 {
        assert_eq!(
            Persist4Layout::for_entries(1 << k),
            Persist4Layout {
                shards: 1,
                shard_entries: 1 << k
            },
            "a table of 2^{k} entries is not split"
        );
    }
}

#[test]
fn ten_mebi_entries_are_five_shards_of_two_mebi() {
    assert_eq!(
        Persist4Layout::for_entries(10 << 20),
        Persist4Layout {
            shards: 5,
            shard_entries: 2 << 20
        }
    );
    assert_eq!(
        Persist4Layout::for_entries(3 * 4096),
        Persist4Layout {
            shards: 3,
            shard_entries: 4096
        }
    );
    // 6 x 2048 holds as many: fewer shards win the tie.
    assert_eq!(Persist4Layout::for_entries(3 * 4096 - 1).shards, 3);
    // Small tables are not split below the minimum shard.
    assert_eq!(
        Persist4Layout::for_entries(3),
        Persist4Layout {
            shards: 1,
            shard_entries: 4
        }
    );
    assert_eq!(Persist4Layout::for_entries(0).capacity(), 1);
    assert_eq!(Persist4Layout::for_entries(u32::MAX).capacity(), 1 << 32);
}

#[test]
fn as_created_rounds_each_shard_up_to_the_cpus_and_keeps_the_count() {
    let l = Persist4Layout::for_entries(3 * 4096);
    assert_eq!(
        l.as_created(6),
        Persist4Layout {
            shards: 3,
            shard_entries: 4098
        }
    );
    assert_eq!(
        l.as_created(4),
        l,
        "a power of two of CPUs divides the shard"
    );
    assert_eq!(l.as_created(1), l);
    assert_eq!(l.as_created(0), l, "no CPU count: as asked");
    let small = Persist4Layout::for_entries(3);
    assert_eq!(small.as_created(3).shard_entries, 6);
    assert_eq!(small.as_created(3).as_created(3), small.as_created(3));
}

#[test]
fn the_key_word_is_its_bytes_little_endian() {
    let k = PersistKey4 {
        addr_be: [10, 1, 2, 3],
        service: 7,
    };
    // SAFETY: 8 bytes, repr(C), no padding.
    let bytes: [u8; 8] = unsafe { core::mem::transmute(k) };
    assert_eq!(k.word(), u64::from_le_bytes(bytes));
}

#[test]
fn consecutive_clients_spread_evenly_over_the_shards() {
    for shards in 2..=PERSIST4_MAX_SHARDS {
        let mut counts = [0u32; PERSIST4_MAX_SHARDS as usize];
        let clients = 8000 * shards;
        for i in 0..clients {
            let k = PersistKey4 {
                addr_be: (0x0a00_0000 + i).to_be_bytes(),
                service: 3,
            };
            counts[k.shard(shards) as usize] += 1;
        }
        for (s, &c) in counts.iter().enumerate().take(shards as usize) {
            assert!(
                (7200..=8800).contains(&c),
                "{shards} shards: shard {s} got {c} of {clients} clients ({counts:?})"
            );
        }
    }
}

proptest! {
    #[test]
    fn layout_holds_the_entries_in_at_most_eight_power_of_two_shards(entries in 1u32..=u32::MAX) {
        let l = Persist4Layout::for_entries(entries);
        let n = entries as u64;
        prop_assert!(l.capacity() >= n, "{l:?} holds fewer than {entries}");
        prop_assert!((1..=PERSIST4_MAX_SHARDS).contains(&l.shards), "{l:?}");
        prop_assert!(l.shard_entries.is_power_of_two(), "{l:?}");
        prop_assert!(l.shards == 1 || l.shard_entries >= PERSIST4_MIN_SHARD_ENTRIES, "{l:?}");
        // The kernel allocates `capacity` elements and as many buckets (each shard a power
        // of two): bytes per requested entry stay within 5/4 of the per-element cost, or
        // the waste is below one minimum shard.
        prop_assert!(
            4 * l.capacity() <= 5 * n || l.capacity() < n + PERSIST4_MIN_SHARD_ENTRIES as u64,
            "{l:?} for {entries}"
        );
        // No layout with fewer shards holds `entries` in less.
        for fewer in 1..l.shards as u64 {
            let floor = if fewer > 1 { PERSIST4_MIN_SHARD_ENTRIES as u64 } else { 1 };
            let s = n.div_ceil(fewer).next_power_of_two().max(floor);
            let other = fewer * s;
            prop_assert!(other > l.capacity() || s > 1 << 31, "{fewer} shards hold {entries} in {other}");
        }
    }

    #[test]
    fn shard_is_in_range(word: u64, shards in 0u32..=PERSIST4_MAX_SHARDS) {
        let s = shard_of(word, shards);
        prop_assert!(s < shards.max(1), "shard {s} of {shards}");
    }
}
