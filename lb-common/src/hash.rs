//! The one flow hash used by the kernel path and by userspace.
//!
//! MurmurHash3 (x86, 32-bit) rounds over fixed arrays of words, so the BPF verifier sees a
//! constant-bounded loop, plus a byte-string variant for userspace keys (backend names,
//! HTTP key material). Both use the same round and finaliser, so a userspace tool can
//! predict exactly which Maglev entry the XDP program will read for a client.

/// Seed for flow hashes (client key -> Maglev entry).
pub const FLOW_SEED: u32 = 0x7e7e_5eed;
/// Seeds for the two Maglev permutation hashes (offset, skip) of a backend name.
pub const MAGLEV_OFFSET_SEED: u32 = 0x6d61_676c;
pub const MAGLEV_SKIP_SEED: u32 = 0x736b_6970;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash a fixed number of 32-bit words. Identical to MurmurHash3_x86_32 of the words'
/// little-endian bytes.
#[inline(always)]
pub fn hash_words<const N: usize>(words: &[u32; N], seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < N {
        h = round(h, words[i]);
        i += 1;
    }
    fmix(h ^ (N as u32 * 4))
}

/// MurmurHash3_x86_32 of a byte string (userspace keys; not used on the packet path).
pub fn hash_bytes(bytes: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut chunks = bytes.chunks_exact(4);
    for c in &mut chunks {
        h = round(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= (*b as u32) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    fmix(h ^ bytes.len() as u32)
}

/// Words of a 16-byte address in wire order (no byte swapping: both sides are little-endian
/// readers of the same bytes, and the result only has to be the same everywhere).
#[inline(always)]
pub fn addr_words(addr_be: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_le_bytes([addr_be[0], addr_be[1], addr_be[2], addr_be[3]]),
        u32::from_le_bytes([addr_be[4], addr_be[5], addr_be[6], addr_be[7]]),
        u32::from_le_bytes([addr_be[8], addr_be[9], addr_be[10], addr_be[11]]),
        u32::from_le_bytes([addr_be[12], addr_be[13], addr_be[14], addr_be[15]]),
    ]
}

/// Hash that picks the Maglev entry for a new client of a persistent service: the service
/// index and the client address already masked to the profile's prefix. Every tether
/// instance with the same pool picks the same backend for the same client.
#[inline(always)]
pub fn client_hash(service_index: u32, masked_addr_be: &[u8; 16]) -> u32 {
    let a = addr_words(masked_addr_be);
    hash_words(&[service_index, a[0], a[1], a[2], a[3]], FLOW_SEED)
}

/// Hash for services without persistence (timeout 0): the whole flow, so each connection
/// of one client is balanced on its own. Ports are in wire order.
#[inline(always)]
pub fn flow_hash(
    service_index: u32,
    src_addr_be: &[u8; 16],
    src_port_be: u16,
    dst_port_be: u16,
) -> u32 {
    let a = addr_words(src_addr_be);
    let ports = (src_port_be as u32) << 16 | dst_port_be as u32;
    hash_words(&[service_index, a[0], a[1], a[2], a[3], ports], FLOW_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_bytes_variant() {
        let words = [1u32, 0xdead_beef, 7, 0x0102_0304];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(hash_words(&words, 42), hash_bytes(&bytes, 42));
    }

    #[test]
    fn murmur3_reference_vectors() {
        // Published MurmurHash3_x86_32 test vectors.
        assert_eq!(hash_bytes(b"", 0), 0);
        assert_eq!(hash_bytes(b"", 1), 0x514e_28b7);
        assert_eq!(hash_bytes(b"test", 0), 0xba6b_d213);
        assert_eq!(hash_bytes(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            hash_bytes(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    proptest::proptest! {
        #[test]
        fn words_equal_bytes_for_any_input(ws in proptest::array::uniform6(proptest::num::u32::ANY), seed: u32) {
            let mut bytes = [0u8; 24];
            for (i, w) in ws.iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            proptest::prop_assert_eq!(hash_words(&ws, seed), hash_bytes(&bytes, seed));
        }

        #[test]
        fn client_hash_depends_on_service(addr: [u8; 16], s in 0u32..1000) {
            // Not a collision-freedom claim, just that the service is part of the key.
            let same = (0..8).filter(|d| client_hash(s, &addr) == client_hash(s + 1 + d, &addr)).count();
            proptest::prop_assert!(same < 2);
        }
    }
}
