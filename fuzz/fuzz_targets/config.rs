//! The config loader: any text is either a config or an error naming a field; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(cfg) => {
            // A valid config is internally consistent: every reference resolves.
            for s in &cfg.services {
                assert!(s.pool < cfg.pools.len());
                assert!(s.persistence.is_none_or(|p| p < cfg.profiles.len()));
            }
        }
        Err(e) => assert!(!e.path.is_empty(), "error without a field: {e}"),
    }
});
