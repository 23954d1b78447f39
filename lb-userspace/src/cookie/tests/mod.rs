use proptest::prelude::*;

use super::*;

const NAME: &str = "TETHER";
const SERVICE: &str = "web-https";
const NOW: u64 = 1_700_000_000;

fn ring(keys: &[(u8, u8)]) -> CookieKeys {
    let keys: Vec<(u8, [u8; KEY_LEN])> = keys
        .iter()
        .map(|&(id, fill)| (id, [fill; KEY_LEN]))
        .collect();
    CookieKeys::new(&keys).unwrap()
}

fn payload() -> CookiePayload {
    CookiePayload {
        backend: lb_common::backend_identity("pool-a", "app-1"),
        pool: pool_id("pool-a"),
        issued_at: NOW,
        expires_at: NOW + 3600,
    }
}

fn raw_of(value: &str) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = b64::decode(value.as_bytes(), &mut buf, b64::Mode::UrlStrict).expect("valid value");
    buf[..n].to_vec()
}

fn value_of(raw: &[u8]) -> String {
    let mut s = String::new();
    b64::encode_url(raw, &mut s);
    s
}

fn arb_payload() -> impl Strategy<Value = CookiePayload> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        prop_oneof![Just(0u64), any::<u64>()],
    )
        .prop_map(|(backend, pool, issued_at, expires_at)| CookiePayload {
            backend,
            pool,
            issued_at,
            expires_at,
        })
}

/// Decoding time at which `p` is still valid.
fn valid_time(p: &CookiePayload) -> u64 {
    if p.expires_at == 0 {
        u64::MAX
    } else {
        p.expires_at - 1
    }
}

#[test]
fn value_shape() {
    let keys = ring(&[(7, 1)]);
    let v = encode(&keys, NAME, SERVICE, &payload());
    assert_eq!(v.len(), COOKIE_VALUE_LEN);
    assert_eq!(COOKIE_VALUE_LEN, 78);
    assert!(
        v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{v}"
    );
    let raw = raw_of(&v);
    assert_eq!(raw.len(), COOKIE_RAW_LEN);
    assert_eq!(raw[0], COOKIE_VERSION);
    assert_eq!(raw[1], 7, "key id");
    assert_eq!(raw[2..6], service_tag(SERVICE).to_le_bytes());
    assert_eq!(decode(&keys, NAME, SERVICE, &v, NOW), Ok(payload()));
    let set = SetCookie::new(NAME, v);
    assert_eq!(
        set.validate(),
        Ok(()),
        "a cookie value is valid cookie-octets"
    );
}

#[test]
fn fresh_nonce_per_cookie() {
    let keys = ring(&[(1, 1)]);
    let a = encode(&keys, NAME, SERVICE, &payload());
    let b = encode(&keys, NAME, SERVICE, &payload());
    assert_ne!(a, b, "same payload, different cookies");
    assert_ne!(raw_of(&a)[6..18], raw_of(&b)[6..18], "nonces differ");
}

#[test]
fn nonces_stay_distinct_across_pool_refills() {
    // Nonces come from a per-thread pool of OS randomness refilled every 40 cookies: across
    // several refills no nonce repeats, and every cookie still opens.
    let keys = ring(&[(1, 1)]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let c = encode(&keys, NAME, SERVICE, &payload());
        assert!(
            seen.insert(raw_of(&c)[6..18].to_vec()),
            "a nonce repeated within 200 cookies"
        );
        assert_eq!(
            decode(&keys, NAME, SERVICE, &c, NOW),
            Ok(payload()),
            "a cookie sealed with a pooled nonce opens"
        );
    }
}

#[test]
fn every_bit_flip_is_rejected() {
    let keys = ring(&[(3, 9)]);
    let raw = raw_of(&encode(&keys, NAME, SERVICE, &payload()));
    for bit in 0..raw.len() * 8 {
        let mut bad = raw.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let expect = match bit / 8 {
            0 => Reject::Malformed,
            1 => Reject::UnknownKey,
            2..=5 => Reject::ForeignService,
            _ => Reject::Tampered,
        };
        assert_eq!(
            decode(&keys, NAME, SERVICE, &value_of(&bad), NOW),
            Err(expect),
            "bit {bit}"
        );
    }
}

#[test]
fn flipped_key_id_to_a_known_key_is_tampered() {
    let keys = ring(&[(2, 1), (3, 2)]);
    let mut raw = raw_of(&encode(&keys, NAME, SERVICE, &payload()));
    assert_eq!(raw[1], 2);
    raw[1] = 3;
    assert_eq!(
        decode(&keys, NAME, SERVICE, &value_of(&raw), NOW),
        Err(Reject::Tampered)
    );
}

#[test]
fn wrong_cookie_name_is_tampered() {
    let keys = ring(&[(1, 1)]);
    let v = encode(&keys, NAME, SERVICE, &payload());
    for other in ["TETHEr", "TETHER2", "X", "TETHE"] {
        assert_eq!(
            decode(&keys, other, SERVICE, &v, NOW),
            Err(Reject::Tampered),
            "{other}"
        );
    }
}

#[test]
fn other_service_is_foreign() {
    let keys = ring(&[(1, 1)]);
    let v = encode(&keys, NAME, SERVICE, &payload());
    assert_eq!(
        decode(&keys, NAME, "web-http", &v, NOW),
        Err(Reject::ForeignService)
    );
    assert_eq!(
        decode(&keys, NAME, "", &v, NOW),
        Err(Reject::ForeignService)
    );
}

#[test]
fn unknown_key_id() {
    let v = encode(&ring(&[(5, 1)]), NAME, SERVICE, &payload());
    assert_eq!(
        decode(&ring(&[(6, 1)]), NAME, SERVICE, &v, NOW),
        Err(Reject::UnknownKey)
    );
    assert_eq!(
        decode(&ring(&[(6, 1), (4, 1)]), NAME, SERVICE, &v, NOW),
        Err(Reject::UnknownKey)
    );
}

#[test]
fn same_id_other_secret_is_tampered() {
    let v = encode(&ring(&[(5, 1)]), NAME, SERVICE, &payload());
    assert_eq!(
        decode(&ring(&[(5, 2)]), NAME, SERVICE, &v, NOW),
        Err(Reject::Tampered)
    );
}

#[test]
fn rotation() {
    let old = ring(&[(1, 0xaa)]);
    let rotated = ring(&[(2, 0xbb), (1, 0xaa)]);
    assert_eq!(rotated.current_id(), 2);
    assert_eq!(rotated.ids().collect::<Vec<_>>(), [2, 1]);

    let old_cookie = encode(&old, NAME, SERVICE, &payload());
    assert_eq!(
        decode(&rotated, NAME, SERVICE, &old_cookie, NOW),
        Ok(payload())
    );

    let new_cookie = encode(&rotated, NAME, SERVICE, &payload());
    assert_eq!(raw_of(&new_cookie)[1], 2, "new cookies use the new key");
    assert_eq!(
        decode(&rotated, NAME, SERVICE, &new_cookie, NOW),
        Ok(payload())
    );
    // Instances not yet rotated do not know the new key...
    assert_eq!(
        decode(&old, NAME, SERVICE, &new_cookie, NOW),
        Err(Reject::UnknownKey)
    );
    // ...which is why a new key is first added behind the current one everywhere, then
    // moved to the front.
    let staged = ring(&[(1, 0xaa), (2, 0xbb)]);
    assert_eq!(
        decode(&staged, NAME, SERVICE, &new_cookie, NOW),
        Ok(payload())
    );
    assert_eq!(raw_of(&encode(&staged, NAME, SERVICE, &payload()))[1], 1);

    // Dropping the old key ends its cookies.
    let dropped = ring(&[(2, 0xbb)]);
    assert_eq!(
        decode(&dropped, NAME, SERVICE, &old_cookie, NOW),
        Err(Reject::UnknownKey)
    );
}

#[test]
fn expiry_boundary() {
    let keys = ring(&[(1, 1)]);
    let p = CookiePayload {
        expires_at: NOW + 60,
        ..payload()
    };
    let v = encode(&keys, NAME, SERVICE, &p);
    assert_eq!(decode(&keys, NAME, SERVICE, &v, 0), Ok(p));
    assert_eq!(decode(&keys, NAME, SERVICE, &v, NOW + 59), Ok(p));
    assert_eq!(
        decode(&keys, NAME, SERVICE, &v, NOW + 60),
        Err(Reject::Expired)
    );
    assert_eq!(
        decode(&keys, NAME, SERVICE, &v, u64::MAX),
        Err(Reject::Expired)
    );

    let session = CookiePayload {
        expires_at: 0,
        ..payload()
    };
    let v = encode(&keys, NAME, SERVICE, &session);
    for now in [0, NOW, u64::MAX] {
        assert_eq!(
            decode(&keys, NAME, SERVICE, &v, now),
            Ok(session),
            "now {now}"
        );
    }
}

#[test]
fn expired_is_reported_only_for_authentic_cookies() {
    let keys = ring(&[(1, 1)]);
    let v = encode(&keys, NAME, SERVICE, &payload());
    assert_eq!(
        decode(&keys, "other", SERVICE, &v, u64::MAX),
        Err(Reject::Tampered)
    );
}

#[test]
fn issue() {
    let p = CookiePayload::issue(7, 8, NOW, Some(600));
    assert_eq!(
        p,
        CookiePayload {
            backend: 7,
            pool: 8,
            issued_at: NOW,
            expires_at: NOW + 600
        }
    );
    assert_eq!(CookiePayload::issue(7, 8, NOW, None).expires_at, 0);
    assert_eq!(
        CookiePayload::issue(7, 8, u64::MAX - 1, Some(600)).expires_at,
        u64::MAX
    );
    // A zero lifetime at time 0 must not turn into "no expiry".
    assert_eq!(CookiePayload::issue(7, 8, 0, Some(0)).expires_at, 1);
}

#[test]
fn malformed_inputs() {
    let keys = ring(&[(1, 1)]);
    let good = encode(&keys, NAME, SERVICE, &payload());
    let raw = raw_of(&good);

    let mut wrong_version = raw.clone();
    wrong_version[0] = 2;
    let mut zero_version = raw.clone();
    zero_version[0] = 0;
    let mut longer = raw.clone();
    longer.push(0);
    let mut much_longer = raw.clone();
    much_longer.extend_from_slice(&raw);
    let inputs: Vec<String> = vec![
        String::new(),
        "!".into(),
        "not base64 at all".into(),
        format!("{good}="),
        format!("{good}=="),
        format!(" {good}"),
        format!("\"{good}\""),
        good.replace('-', "+").replace('_', "/") + if good.contains(['-', '_']) { "" } else { "!" },
        good[..good.len() - 1].to_owned(),
        good[..good.len() - 2].to_owned(),
        format!("{good}A"),
        value_of(&raw[..1]),
        value_of(&raw[..COOKIE_RAW_LEN - 1]),
        value_of(&longer),
        value_of(&much_longer),
        value_of(&wrong_version),
        value_of(&zero_version),
        "A".repeat(MAX_COOKIE_VALUE_LEN + 4),
        "A".repeat(100_000),
        "é".repeat(40),
    ];
    for input in &inputs {
        assert_eq!(
            decode(&keys, NAME, SERVICE, input, NOW),
            Err(Reject::Malformed),
            "{input:?}"
        );
    }
}

#[test]
fn non_canonical_trailing_bits_are_malformed() {
    let keys = ring(&[(1, 1)]);
    let good = encode(&keys, NAME, SERVICE, &payload());
    // 58 bytes: the last character carries 4 data bits and 2 zero bits.
    let last = good.as_bytes()[good.len() - 1];
    let idx = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        .iter()
        .position(|&c| c == last)
        .unwrap();
    assert_eq!(idx & 0b11, 0);
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bad = format!(
        "{}{}",
        &good[..good.len() - 1],
        &alphabet[idx | 1..=idx | 1]
    );
    assert_eq!(
        decode(&keys, NAME, SERVICE, &bad, NOW),
        Err(Reject::Malformed)
    );
}

#[test]
fn instances_agree() {
    let config = [
        (
            4u8,
            "0001020304050607080900010203040506070809000102030405060708090a0b".to_owned(),
        ),
        (
            3u8,
            "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqo".to_owned(),
        ),
    ];
    let a = CookieKeys::from_config(&config).unwrap();
    let b = CookieKeys::from_config(&config).unwrap();
    let from_a = encode(&a, NAME, SERVICE, &payload());
    let from_b = encode(&b, NAME, SERVICE, &payload());
    assert_eq!(decode(&b, NAME, SERVICE, &from_a, NOW), Ok(payload()));
    assert_eq!(decode(&a, NAME, SERVICE, &from_b, NOW), Ok(payload()));
}

#[test]
fn generated_rings_do_not_agree() {
    let a = CookieKeys::generate();
    let b = CookieKeys::generate();
    assert_eq!(a.ids().count(), 1);
    let v = encode(&a, NAME, SERVICE, &payload());
    assert_eq!(decode(&a, NAME, SERVICE, &v, NOW), Ok(payload()));
    let err = decode(&b, NAME, SERVICE, &v, NOW).unwrap_err();
    assert!(
        matches!(err, Reject::UnknownKey | Reject::Tampered),
        "{err:?}"
    );
}

#[test]
fn secret_encodings() {
    let secret: [u8; KEY_LEN] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xfb);
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let url = value_of(&secret);
    assert_eq!(url.len(), 43);
    let standard = url.replace('-', "+").replace('_', "/");
    assert_ne!(url, standard, "the secret exercises both alphabets");
    let reference = CookieKeys::new(&[(9, secret)]).unwrap();
    let v = encode(&reference, NAME, SERVICE, &payload());
    for s in [
        hex.clone(),
        hex.to_uppercase(),
        format!("  {hex}\n"),
        url.clone(),
        standard.clone(),
        format!("{standard}="),
        format!("{url}="),
    ] {
        let keys =
            CookieKeys::from_config(&[(9, s.as_str())]).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(
            decode(&keys, NAME, SERVICE, &v, NOW),
            Ok(payload()),
            "{s:?}"
        );
    }
}

#[test]
fn secret_errors() {
    let e = CookieKeys::from_config(&[(1, "QUJD")]).unwrap_err();
    assert_eq!(e, KeyError::Length { id: 1, len: 3 });
    let msg = e.to_string();
    assert!(
        msg.contains("3 bytes") && msg.contains("need 32") && msg.contains("64 hex"),
        "{msg}"
    );
    // Hex of the wrong length is reported as such, not as bad base64.
    let short_hex = "ab".repeat(31);
    assert_eq!(
        CookieKeys::from_config(&[(1, short_hex)]).unwrap_err(),
        KeyError::Length { id: 1, len: 31 }
    );
    assert_eq!(
        CookieKeys::from_config(&[(1, "00".repeat(33))]).unwrap_err(),
        KeyError::Length { id: 1, len: 33 }
    );
    assert_eq!(
        CookieKeys::from_config(&[(1, "")]).unwrap_err(),
        KeyError::Length { id: 1, len: 0 }
    );
    // 33 bytes.
    let long = value_of(&[7u8; 33]);
    assert_eq!(
        CookieKeys::from_config(&[(2, long)]).unwrap_err(),
        KeyError::Length { id: 2, len: 33 }
    );
    let secret = "not a key!";
    let e = CookieKeys::from_config(&[(3, secret)]).unwrap_err();
    assert_eq!(e, KeyError::Encoding { id: 3 });
    assert!(
        !e.to_string().contains(secret),
        "errors never echo the secret"
    );
    assert_eq!(
        CookieKeys::from_config::<&str>(&[]).unwrap_err(),
        KeyError::Empty
    );
    let hex = "00".repeat(32);
    assert_eq!(
        CookieKeys::from_config(&[(1, hex.as_str()), (1, hex.as_str())]).unwrap_err(),
        KeyError::DuplicateId(1)
    );
    assert_eq!(CookieKeys::new(&[]).unwrap_err(), KeyError::Empty);
}

#[test]
fn debug_hides_secrets() {
    let keys = CookieKeys::from_config(&[(1, "ab".repeat(32))]).unwrap();
    let s = format!("{keys:?}");
    assert_eq!(s, "CookieKeys { ids: [1], .. }");
}

#[test]
fn backend_id_not_in_the_clear() {
    let keys = ring(&[(1, 1)]);
    for i in 0..500u32 {
        // Distinctive ids (no zero bytes) so chance matches stay negligible.
        let backend = 0x5a00_0000 | (i.wrapping_mul(0x0001_0203) & 0x00ff_ffff) | 0x0001_0101;
        let p = CookiePayload {
            backend,
            pool: pool_id("pool-a"),
            issued_at: NOW,
            expires_at: 0,
        };
        let raw = raw_of(&encode(&keys, NAME, SERVICE, &p));
        for needle in [backend.to_le_bytes(), backend.to_be_bytes()] {
            assert!(
                !raw.windows(4).any(|w| w == needle),
                "backend {backend:#x} in clear"
            );
        }
        let address = [10u8, 0, 0, 7];
        assert!(!raw.windows(4).any(|w| w == address));
    }
}

#[test]
fn reject_labels() {
    let labels: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "malformed",
            "unknown_key",
            "foreign_service",
            "tampered",
            "expired"
        ]
    );
    assert_eq!(
        Reject::Tampered.to_string(),
        "persistence cookie failed authentication"
    );
}

#[test]
fn long_names_use_the_heap_path() {
    let keys = ring(&[(1, 1)]);
    let name = "n".repeat(300);
    let service = "s".repeat(300);
    let v = encode(&keys, &name, &service, &payload());
    assert_eq!(decode(&keys, &name, &service, &v, NOW), Ok(payload()));
    assert_eq!(
        decode(&keys, &name[1..], &service, &v, NOW),
        Err(Reject::Tampered)
    );
}

proptest! {
    #[test]
    fn round_trip(
        p in arb_payload(),
        name in "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,40}",
        service in "\\PC{0,60}",
        id in any::<u8>(),
        fill in any::<u8>(),
    ) {
        let keys = ring(&[(id, fill)]);
        let v = encode(&keys, &name, &service, &p);
        prop_assert_eq!(v.len(), COOKIE_VALUE_LEN);
        prop_assert_eq!(decode(&keys, &name, &service, &v, valid_time(&p)), Ok(p));
    }

    #[test]
    fn random_bit_flip_is_rejected(p in arb_payload(), bit in 0..COOKIE_RAW_LEN * 8) {
        let keys = ring(&[(1, 1)]);
        let mut raw = raw_of(&encode(&keys, NAME, SERVICE, &p));
        raw[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&keys, NAME, SERVICE, &value_of(&raw), valid_time(&p)).is_err());
    }

    #[test]
    fn arbitrary_values_never_panic(value in "\\PC{0,300}") {
        let keys = ring(&[(1, 1)]);
        prop_assert!(decode(&keys, NAME, SERVICE, &value, NOW).is_err());
    }

    #[test]
    fn arbitrary_bytes_of_the_right_length_are_rejected(
        bytes in proptest::collection::vec(any::<u8>(), COOKIE_RAW_LEN),
    ) {
        let keys = ring(&[(1, 1)]);
        prop_assert!(decode(&keys, NAME, SERVICE, &value_of(&bytes), NOW).is_err());
    }
}

mod headers;
mod keyfile;
