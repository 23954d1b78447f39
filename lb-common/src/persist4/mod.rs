//! Layout of the IPv4 persistence table: `n` LRU maps ("shards") of one power-of-two size.
//!
//! The kernel gives a hash map `roundup_pow_of_two(max_entries)` buckets of 16 bytes, so a
//! single table of 10Mi entries pays for 16Mi buckets (about 90 bytes per entry instead of
//! 80). Five shards of 2Mi entries hold the same 10Mi clients with no unused bucket. The XDP
//! program and the daemon choose a key's shard with [`shard_of`], so a binding userspace
//! writes is the one the data path reads.

use crate::PersistKey4;

/// Most shards the XDP program knows (`MAP_PERSIST4_SHARDS`).
pub const PERSIST4_MAX_SHARDS: u32 = 8;
/// Smallest shard of a split table: below this a split saves a few kilobytes at most, and
/// per-CPU LRU lists of a tiny shard would evict early.
pub const PERSIST4_MIN_SHARD_ENTRIES: u32 = 1024;

/// How the IPv4 table is split: `shards` maps of `shard_entries` entries each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Persist4Layout {
    /// 1 to `PERSIST4_MAX_SHARDS`.
    pub shards: u32,
    /// A power of two (for a split table at least `PERSIST4_MIN_SHARD_ENTRIES`).
    pub shard_entries: u32,
}

impl Persist4Layout {
    /// The layout for a configured table size of `entries`: the smallest capacity
    /// `shards * shard_entries >= entries` (ties: fewer shards). A power of two stays one
    /// table; 10Mi becomes 5 x 2Mi; capacity never exceeds `entries` by more than a quarter
    /// or `PERSIST4_MIN_SHARD_ENTRIES`.
    pub const fn for_entries(entries: u32) -> Persist4Layout {
        let want = if entries == 0 { 1 } else { entries as u64 };
        let mut best = Persist4Layout {
            shards: 2,
            shard_entries: 1 << 31,
        };
        let mut n = 1u64;
        while n <= PERSIST4_MAX_SHARDS as u64 {
            let mut s = want.div_ceil(n).next_power_of_two();
            if n > 1 && s < PERSIST4_MIN_SHARD_ENTRIES as u64 {
                s = PERSIST4_MIN_SHARD_ENTRIES as u64;
            }
            if s <= 1 << 31 && n * s < best.capacity() {
                best = Persist4Layout {
                    shards: n as u32,
                    shard_entries: s as u32,
                };
            }
            n += 1;
        }
        best
    }

    /// Entries the shards hold together.
    pub const fn capacity(&self) -> u64 {
        self.shards as u64 * self.shard_entries as u64
    }

    /// The layout as the kernel creates it with `BPF_F_NO_COMMON_LRU` over `cpus` possible
    /// CPUs: each shard's size rounded up to a multiple of `cpus` (what the pins report).
    /// The shard count, which chooses a key's shard, is unchanged.
    pub const fn as_created(&self, cpus: u32) -> Persist4Layout {
        let cpus = if cpus == 0 { 1 } else { cpus };
        Persist4Layout {
            shards: self.shards,
            shard_entries: self.shard_entries.div_ceil(cpus).saturating_mul(cpus),
        }
    }
}

/// Odd 64-bit multiplier (2^64 / golden ratio) of the shard hash.
const SHARD_MULT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The shard (`0..shards`) of the key whose 8 bytes, read as a little-endian u64, are
/// `word`: the high half of a multiplicative hash, reduced to the range by multiply-shift
/// (no division on the data path). `shards` of 0 or 1: shard 0.
#[inline(always)]
pub const fn shard_of(word: u64, shards: u32) -> u32 {
    let h = word.wrapping_mul(SHARD_MULT) >> 32;
    ((h * shards as u64) >> 32) as u32
}

impl PersistKey4 {
    /// The key's 8 bytes as a little-endian u64 (address bytes low, service high), as the
    /// XDP program assembles it.
    pub const fn word(&self) -> u64 {
        u32::from_le_bytes(self.addr_be) as u64 | (self.service as u64) << 32
    }

    /// Which of `shards` shards holds this key.
    pub const fn shard(&self, shards: u32) -> u32 {
        shard_of(self.word(), shards)
    }
}

#[cfg(test)]
mod tests;
