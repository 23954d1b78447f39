//! The cookie codec's use of base64 (RFC 4648, the `base64` crate) and hex.
//!
//! Cookie values use the URL-safe alphabet without padding (section 5), strictly: one
//! canonical spelling per byte string (unused trailing bits must be zero, the crate's
//! default), so a value cannot be altered without changing the decoded bytes. Configured
//! secrets are read leniently: either alphabet, padding optional.

use base64::{
    Engine as _, alphabet,
    engine::{
        DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::URL_SAFE_NO_PAD,
    },
};

const INDIFFERENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const URL_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, INDIFFERENT);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, INDIFFERENT);

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
    URL_SAFE_NO_PAD.encode_string(input, out);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// URL-safe alphabet, no padding.
    UrlStrict,
    /// Standard or URL-safe alphabet, optional `=` padding.
    Lenient,
}

/// Decodes `input` into the front of `out`, returning the decoded length, or `None` for a
/// character outside the alphabet, an impossible length, non-zero unused trailing bits, or
/// an `out` too small. No allocation.
pub(super) fn decode(input: &[u8], out: &mut [u8], mode: Mode) -> Option<usize> {
    match mode {
        Mode::UrlStrict => URL_SAFE_NO_PAD.decode_slice(input, out).ok(),
        // Padding, when present, completes the last group of four.
        Mode::Lenient if input.contains(&b'=') && !input.len().is_multiple_of(4) => None,
        Mode::Lenient => URL_LENIENT
            .decode_slice(input, out)
            .or_else(|_| STANDARD_LENIENT.decode_slice(input, out))
            .ok(),
    }
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
