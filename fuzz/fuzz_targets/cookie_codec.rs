//! The persistence cookie codec: any value decodes to a payload or a reject reason, never a
//! panic; nothing but a sealed value opens; a sealed payload opens to itself.
//!
//! Input: 24 bytes of payload fields, then the cookie value to decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::cookie::{CookieKeys, CookiePayload, decode, encode};

const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fuzz_target!(|data: &[u8]| {
    let keys = CookieKeys::from_config(&[(7u8, SECRET)]).expect("test key");
    let (fields, value) = data.split_at(data.len().min(24));
    if let Ok(value) = std::str::from_utf8(value) {
        // Random bytes never authenticate (a forgery would need the key).
        assert!(
            decode(&keys, "SRV", "web", value, 1_000).is_err(),
            "{value:?} opened"
        );
    }
    if fields.len() == 24 {
        let u32_at = |i: usize| u32::from_le_bytes(fields[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(fields[i..i + 8].try_into().expect("8"));
        let lifetime = (u64_at(16) % 3 != 0).then_some(u64_at(16) % 100_000 + 1);
        let now = u64_at(8) % (1 << 40);
        let p = CookiePayload::issue(u32_at(0), u32_at(4), now, lifetime);
        let sealed = encode(&keys, "SRV", "web", &p);
        assert_eq!(decode(&keys, "SRV", "web", &sealed, now), Ok(p));
        assert!(
            decode(&keys, "SRV", "api", &sealed, now).is_err(),
            "other service"
        );
        assert!(
            decode(&keys, "OTHER", "web", &sealed, now).is_err(),
            "other cookie name"
        );
    }
});
