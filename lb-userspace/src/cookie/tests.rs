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

mod headers {
    use proptest::prelude::*;

    use super::super::*;

    fn set(name: &str, value: &str) -> SetCookie {
        SetCookie {
            name: name.into(),
            value: value.into(),
            max_age: None,
            path: None,
            domain: None,
            http_only: false,
            secure: false,
            same_site: None,
        }
    }

    #[test]
    fn render_exact() {
        let cases: Vec<(SetCookie, &str)> = vec![
            (set("a", "b"), "a=b"),
            (set("a", ""), "a="),
            (
                SetCookie::new("TETHER", "xyz"),
                "TETHER=xyz; Path=/; HttpOnly",
            ),
            (
                SetCookie {
                    max_age: Some(3600),
                    ..set("a", "b")
                },
                "a=b; Max-Age=3600",
            ),
            (
                SetCookie {
                    max_age: Some(0),
                    ..set("a", "b")
                },
                "a=b; Max-Age=0",
            ),
            (
                SetCookie {
                    path: Some("/app".into()),
                    ..set("a", "b")
                },
                "a=b; Path=/app",
            ),
            (
                SetCookie {
                    domain: Some("example.com".into()),
                    ..set("a", "b")
                },
                "a=b; Domain=example.com",
            ),
            (
                SetCookie {
                    secure: true,
                    ..set("a", "b")
                },
                "a=b; Secure",
            ),
            (
                SetCookie {
                    http_only: true,
                    ..set("a", "b")
                },
                "a=b; HttpOnly",
            ),
            (
                SetCookie {
                    same_site: Some(SameSite::Lax),
                    ..set("a", "b")
                },
                "a=b; SameSite=Lax",
            ),
            (
                SetCookie {
                    same_site: Some(SameSite::Strict),
                    ..set("a", "b")
                },
                "a=b; SameSite=Strict",
            ),
            (
                SetCookie {
                    same_site: Some(SameSite::None),
                    ..set("a", "b")
                },
                "a=b; Secure; SameSite=None",
            ),
            (
                SetCookie {
                    same_site: Some(SameSite::None),
                    secure: true,
                    ..set("a", "b")
                },
                "a=b; Secure; SameSite=None",
            ),
            (
                SetCookie {
                    name: "AVI_COOKIE".into(),
                    value: "v-_1".into(),
                    max_age: Some(43200),
                    path: Some("/".into()),
                    domain: Some(".example.com".into()),
                    http_only: true,
                    secure: true,
                    same_site: Some(SameSite::Lax),
                },
                "AVI_COOKIE=v-_1; Max-Age=43200; Path=/; Domain=.example.com; Secure; HttpOnly; \
                 SameSite=Lax",
            ),
        ];
        for (cookie, expect) in cases {
            assert_eq!(cookie.render(), expect, "{cookie:?}");
        }
    }

    #[test]
    fn render_every_combination() {
        let same_sites = [
            None,
            Some(SameSite::Lax),
            Some(SameSite::Strict),
            Some(SameSite::None),
        ];
        let mut seen = std::collections::HashSet::new();
        for bits in 0..32u32 {
            for same_site in same_sites {
                let on = |i: u32| bits & (1 << i) != 0;
                let cookie = SetCookie {
                    name: "c".into(),
                    value: "v".into(),
                    max_age: on(0).then_some(60),
                    path: on(1).then(|| "/".into()),
                    domain: on(2).then(|| "d.example".into()),
                    http_only: on(3),
                    secure: on(4),
                    same_site,
                };
                let mut expect = String::from("c=v");
                if on(0) {
                    expect += "; Max-Age=60";
                }
                if on(1) {
                    expect += "; Path=/";
                }
                if on(2) {
                    expect += "; Domain=d.example";
                }
                if on(4) || same_site == Some(SameSite::None) {
                    expect += "; Secure";
                }
                if on(3) {
                    expect += "; HttpOnly";
                }
                match same_site {
                    Some(SameSite::Lax) => expect += "; SameSite=Lax",
                    Some(SameSite::Strict) => expect += "; SameSite=Strict",
                    Some(SameSite::None) => expect += "; SameSite=None",
                    None => {}
                }
                assert_eq!(cookie.render(), expect);
                seen.insert(expect);
            }
        }
        // 128 combinations; SameSite=None with and without `secure` render the same.
        assert_eq!(seen.len(), 128 - 16);
    }

    #[test]
    fn validate() {
        assert_eq!(SetCookie::new("ok", "v").validate(), Ok(()));
        assert_eq!(SetCookie::new("ok", "\"quoted\"").validate(), Ok(()));
        assert!(matches!(
            SetCookie::new("a b", "v").validate(),
            Err(SetCookieError::Name(_))
        ));
        assert!(matches!(
            SetCookie::new("", "v").validate(),
            Err(SetCookieError::Name(_))
        ));
        for bad in ["a b", "a;b", "a,b", "a\\b", "a\"b", "\r\n", "é"] {
            assert_eq!(
                SetCookie::new("n", bad).validate(),
                Err(SetCookieError::Value),
                "{bad:?}"
            );
        }
        for bad in ["", "/a;b", "/\r\nX: y", "/é"] {
            let c = SetCookie {
                path: Some(bad.into()),
                ..SetCookie::new("n", "v")
            };
            assert!(
                matches!(c.validate(), Err(SetCookieError::Path(_))),
                "{bad:?}"
            );
        }
        for bad in ["", ".", "a b", "a;b", "a_b.com", "ex\r\nample"] {
            let c = SetCookie {
                domain: Some(bad.into()),
                ..SetCookie::new("n", "v")
            };
            assert!(
                matches!(c.validate(), Err(SetCookieError::Domain(_))),
                "{bad:?}"
            );
        }
        let c = SetCookie {
            domain: Some("xn--bcher-kva.example".into()),
            path: Some("/a b".into()),
            ..SetCookie::new("n", "v")
        };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn cookie_names() {
        for ok in ["TETHER", "AVI_COOKIE", "a", "x-y.z", "!#$%&'*+-.^_`|~", "0"] {
            assert!(valid_cookie_name(ok), "{ok:?}");
        }
        for bad in [
            "", "a b", "a=b", "a;b", "a,b", "(a)", "a\"", "a/b", "a:b", "a\t", "é", "a\x7f", "[a]",
            "{a}", "a?", "a@", "<a>", "a\\",
        ] {
            assert!(!valid_cookie_name(bad), "{bad:?}");
        }
    }

    fn parse<'a>(values: &[&'a [u8]]) -> Vec<(&'a str, &'a str)> {
        cookies(values.iter().copied()).collect()
    }

    #[test]
    fn parse_single_header() {
        assert_eq!(parse(&[b"a=1; b=2"]), [("a", "1"), ("b", "2")]);
        assert_eq!(parse(&[b"a=1;b=2"]), [("a", "1"), ("b", "2")]);
        assert_eq!(parse(&[b"  a = 1 ;\tb=2\t; "]), [("a", "1"), ("b", "2")]);
        assert_eq!(parse(&[b"a=x=y; b=\"q\""]), [("a", "x=y"), ("b", "\"q\"")]);
        assert_eq!(parse(&[b"a="]), [("a", "")]);
        assert_eq!(parse(&[b""]), []);
        assert_eq!(parse(&[]), []);
    }

    #[test]
    fn parse_empty_and_odd_pairs() {
        assert_eq!(parse(&[b";;a=1;; ; ;b=2;"]), [("a", "1"), ("b", "2")]);
        assert_eq!(
            parse(&[b"flag; a=1; =v; = ; b=2"]),
            [("a", "1"), ("b", "2")]
        );
        assert_eq!(parse(&[b";", b"", b" ; "]), []);
    }

    #[test]
    fn parse_split_headers() {
        assert_eq!(
            parse(&[b"a=1", b"b=2", b"c=3; d=4"]),
            [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]
        );
        assert_eq!(parse(&[b"a=1;", b"", b"; b=2"]), [("a", "1"), ("b", "2")]);
        // A pair never spans two header values.
        assert_eq!(parse(&[b"a=1; b", b"=2"]), [("a", "1")]);
    }

    #[test]
    fn parse_invalid_utf8() {
        assert_eq!(
            parse(&[b"a=\xff\xfe; b=2; \xc3=1; c=\xc3\xa9"]),
            [("b", "2"), ("c", "é")]
        );
    }

    #[test]
    fn find_first_occurrence() {
        let h: [&[u8]; 2] = [b"x=0; T=first", b"T=second; y=1"];
        assert_eq!(find(h, "T"), Some("first"));
        assert_eq!(find(h, "y"), Some("1"));
        assert_eq!(find(h, "t"), None, "names are case-sensitive");
        assert_eq!(find(h, "z"), None);
        let h: [&[u8]; 1] = [b"T=\xff; T=ok"];
        assert_eq!(find(h, "T"), Some("ok"), "a non-UTF-8 value is skipped");
    }

    fn stripped(values: &[&[u8]], name: &str) -> Option<String> {
        strip(values.iter().copied(), name).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    #[test]
    fn strip_keeps_others_in_order() {
        assert_eq!(
            stripped(&[b"a=1; T=x; b=2; c=3"], "T").as_deref(),
            Some("a=1; b=2; c=3")
        );
        assert_eq!(
            stripped(&[b"T=x; a=1", b"b=2", b"T=y;c=3"], "T").as_deref(),
            Some("a=1; b=2; c=3")
        );
        assert_eq!(
            stripped(&[b" a = 1 ;; T = x ; flag ;"], "T").as_deref(),
            Some("a = 1; flag")
        );
        assert_eq!(stripped(&[b"a=1; b=2"], "T").as_deref(), Some("a=1; b=2"));
        assert_eq!(
            stripped(&[b"Tx=1; xT=2; t=3"], "T").as_deref(),
            Some("Tx=1; xT=2; t=3")
        );
    }

    #[test]
    fn strip_to_nothing() {
        assert_eq!(stripped(&[b"T=x"], "T"), None);
        assert_eq!(stripped(&[b"T=x", b" ; T=y; "], "T"), None);
        assert_eq!(stripped(&[b""], "T"), None);
        assert_eq!(stripped(&[], "T"), None);
    }

    #[test]
    fn strip_is_byte_exact() {
        let out = strip([&b"a=\xff; T=\xfe; b=2"[..]], "T").unwrap();
        assert_eq!(out, b"a=\xff; b=2");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
            name in "[a-zA-Z=; ]{0,4}",
        ) {
            let slices: Vec<&[u8]> = values.iter().map(|v| &v[..]).collect();
            let all: Vec<(&str, &str)> = cookies(slices.iter().copied()).collect();
            for (n, v) in &all {
                prop_assert!(!n.is_empty());
                prop_assert!(!n.contains(';') && !v.contains(';'));
                prop_assert_eq!(n.trim_matches([' ', '\t']), *n);
                prop_assert_eq!(v.trim_matches([' ', '\t']), *v);
            }
            let first = all.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            prop_assert_eq!(find(slices.iter().copied(), &name), first);
            if let Some(rest) = strip(slices.iter().copied(), &name) {
                prop_assert!(!rest.is_empty());
                let again: Vec<(&str, &str)> = cookies([&rest[..]]).collect();
                let expect: Vec<(&str, &str)> = all.iter().copied().filter(|(n, _)| *n != name).collect();
                prop_assert_eq!(again, expect);
            } else {
                prop_assert!(all.iter().all(|(n, _)| *n == name));
            }
        }
    }
}
