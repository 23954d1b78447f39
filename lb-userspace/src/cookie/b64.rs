//! The little base64 (RFC 4648) and hex the cookie codec needs, without allocation on decode.
//!
//! Cookie values use the URL-safe alphabet without padding (section 5), strictly: one
//! canonical spelling per byte string (unused trailing bits must be zero), so a value cannot
//! be altered without changing the decoded bytes. Configured secrets are read leniently:
//! either alphabet, padding optional.

const URL_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Characters of the unpadded encoding of `n` bytes.
pub(super) const fn encoded_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// Bytes decoded from at most `n` characters.
pub(super) const fn max_decoded_len(n: usize) -> usize {
    n * 3 / 4
}

/// Appends the URL-safe, unpadded encoding of `input` to `out`.
pub(super) fn encode_url(input: &[u8], out: &mut String) {
    for chunk in input.chunks(3) {
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(chunk[0]) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        // 1 byte -> 2 characters, 2 -> 3, 3 -> 4.
        for i in 0..=chunk.len() {
            let six = (n >> (18 - 6 * i)) & 0x3f;
            out.push(URL_ALPHABET[six as usize] as char);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// URL-safe alphabet, no padding.
    UrlStrict,
    /// Standard or URL-safe alphabet, optional `=` padding.
    Lenient,
}

fn sextet(c: u8, mode: Mode) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        b'+' if mode == Mode::Lenient => 62,
        b'/' if mode == Mode::Lenient => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes `input` into the front of `out`, returning the decoded length, or `None` for a
/// character outside the alphabet, an impossible length, non-zero unused trailing bits, or
/// an `out` too small.
pub(super) fn decode(input: &[u8], out: &mut [u8], mode: Mode) -> Option<usize> {
    let mut input = input;
    if mode == Mode::Lenient && input.last() == Some(&b'=') {
        let stripped = input
            .strip_suffix(b"==")
            .or_else(|| input.strip_suffix(b"="))?;
        // Padding completes the last group of four; it is never a whole group on its own.
        if !input.len().is_multiple_of(4) || stripped.len().is_multiple_of(4) {
            return None;
        }
        input = stripped;
    }
    let len = input.len();
    if len % 4 == 1 || out.len() < max_decoded_len(len) {
        return None;
    }
    let mut written = 0;
    for group in input.chunks(4) {
        let mut n = 0u32;
        for &c in group {
            n = (n << 6) | sextet(c, mode)?;
        }
        // Left-align a short group to 24 bits.
        n <<= 6 * (4 - group.len() as u32);
        let bytes = group.len() - 1;
        // The bits after the last whole byte must be zero (canonical encoding).
        if n & (0x00ff_ffff >> (8 * bytes)) != 0 {
            return None;
        }
        for i in 0..bytes {
            out[written] = (n >> (16 - 8 * i)) as u8;
            written += 1;
        }
    }
    Some(written)
}

/// Decodes exactly `N * 2` hex digits (either case).
pub(super) fn decode_hex<const N: usize>(input: &[u8]) -> Option<[u8; N]> {
    if input.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(input.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn enc(input: &[u8]) -> String {
        let mut s = String::new();
        encode_url(input, &mut s);
        s
    }

    fn dec(input: &str, mode: Mode) -> Option<Vec<u8>> {
        let mut out = [0u8; 64];
        decode(input.as_bytes(), &mut out, mode).map(|n| out[..n].to_vec())
    }

    #[test]
    fn rfc4648_vectors() {
        let vectors: &[(&str, &str)] = &[
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, coded) in vectors {
            assert_eq!(enc(plain.as_bytes()), *coded, "encode {plain:?}");
            assert_eq!(encoded_len(plain.len()), coded.len(), "length of {plain:?}");
            for mode in [Mode::UrlStrict, Mode::Lenient] {
                let got = dec(coded, mode);
                assert_eq!(got.as_deref(), Some(plain.as_bytes()), "{mode:?} {coded:?}");
            }
        }
    }

    #[test]
    fn url_and_standard_alphabets() {
        assert_eq!(enc(&[0xfb, 0xff]), "-_8");
        assert_eq!(dec("-_8", Mode::UrlStrict), Some(vec![0xfb, 0xff]));
        assert_eq!(
            dec("+/8", Mode::UrlStrict),
            None,
            "strict: URL alphabet only"
        );
        assert_eq!(dec("+/8", Mode::Lenient), Some(vec![0xfb, 0xff]));
        assert_eq!(dec("+/8=", Mode::Lenient), Some(vec![0xfb, 0xff]));
        assert_eq!(dec("Zg==", Mode::Lenient), Some(b"f".to_vec()));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in ["Z", "Zm9vY", "Zh", "Zm=", "Zg=", "Z===", "Zg==="] {
            assert_eq!(dec(bad, Mode::Lenient), None, "{bad:?}");
            assert_eq!(dec(bad, Mode::UrlStrict), None, "{bad:?}");
        }
        // "Zm8" is the canonical spelling of "fo"; "Zm9" has a non-zero trailing bit.
        assert_eq!(dec("Zm9", Mode::UrlStrict), None);
        assert_eq!(dec("Zh", Mode::UrlStrict), None, "non-zero trailing bits");
        assert_eq!(
            dec("Zg==", Mode::UrlStrict),
            None,
            "no padding in strict mode"
        );
        assert_eq!(dec("Zm 9v", Mode::UrlStrict), None);
        assert_eq!(dec("====", Mode::Lenient), None);
        let mut small = [0u8; 2];
        assert_eq!(
            decode(b"Zm9v", &mut small, Mode::UrlStrict),
            None,
            "out too small"
        );
    }

    #[test]
    fn hex() {
        assert_eq!(decode_hex::<2>(b"0aFf"), Some([0x0a, 0xff]));
        assert_eq!(decode_hex::<2>(b"0aF"), None);
        assert_eq!(decode_hex::<2>(b"0aFg"), None);
        assert_eq!(decode_hex::<2>(b"+a00"), None);
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            let s = enc(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(dec(&s, Mode::UrlStrict), Some(bytes.clone()));
            prop_assert_eq!(dec(&s, Mode::Lenient), Some(bytes));
        }

        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut out = [0u8; 40];
            for mode in [Mode::UrlStrict, Mode::Lenient] {
                if let Some(n) = decode(&bytes, &mut out, mode) {
                    // Whatever decodes re-encodes to the same text (canonical).
                    let s = enc(&out[..n]);
                    if mode == Mode::UrlStrict {
                        prop_assert_eq!(s.as_bytes(), &bytes[..]);
                    }
                }
            }
        }
    }
}
