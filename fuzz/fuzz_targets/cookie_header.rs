//! Cookie header parsing: never panics; values come from the input; a stripped cookie can
//! never be found again (the persistence cookie must not reach the backend); every cookie of
//! the name is found, the first first; a Cache-Control made private forbids shared caching.
//!
//! Input: the cookie name to look for, a NUL, then header values separated by newlines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::cookie::{cookies, find, find_all, private_cache_control, strip};

fuzz_target!(|data: &[u8]| {
    let (name, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"SERVERID"[..], data),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let values: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    for (n, v) in cookies(values.iter().copied()) {
        assert!(!n.is_empty());
        assert!(!n.contains(';') && !v.contains(';'), "{n}={v}");
    }
    if let Some(v) = find(values.iter().copied(), name) {
        let whole = String::from_utf8_lossy(rest);
        assert!(whole.contains(v), "{v:?} not in the input");
    }
    assert_eq!(
        find_all(values.iter().copied(), name).next(),
        find(values.iter().copied(), name)
    );
    let text: Vec<String> = values
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    if let Some(cc) = private_cache_control(text.iter().map(String::as_str)) {
        assert!(cc.starts_with("private"), "{cc:?}");
        assert_eq!(private_cache_control([cc.as_str()]), None, "{cc:?} not private");
    }
    if let Some(left) = strip(values.iter().copied(), name)
        && !name.is_empty()
    {
        assert_eq!(
            find([left.as_slice()], name),
            None,
            "{name} survived stripping: {:?}",
            String::from_utf8_lossy(&left)
        );
    }
});
