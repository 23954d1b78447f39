//! `Cookie` parsing and `Set-Cookie` rendering.

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

#[test]
fn every_cookie_of_a_name_is_found_in_order() {
    let h: [&[u8]; 2] = [b"a=1; SRV=x; b=2", b"SRV=y;SRV = z"];
    assert_eq!(find_all(h, "SRV").collect::<Vec<_>>(), ["x", "y", "z"]);
    assert_eq!(find_all(h, "srv").count(), 0, "names are case-sensitive");
}

#[test]
fn cache_control_for_a_response_setting_a_cookie() {
    let cc = |v: &[&str]| private_cache_control(v.iter().copied());
    assert_eq!(cc(&[]).as_deref(), Some("private"));
    assert_eq!(cc(&[""]).as_deref(), Some("private"));
    assert_eq!(
        cc(&["Public, max-age=60", " must-revalidate "]).as_deref(),
        Some("private, max-age=60, must-revalidate")
    );
    for kept in [
        "private",
        "PRIVATE=\"set-cookie\"",
        "no-store",
        "max-age=0, No-Cache",
        "no-cache=\"Set-Cookie\"",
    ] {
        assert_eq!(cc(&[kept]), None, "{kept}");
    }
}
