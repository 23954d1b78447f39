//! The HTTP health check's status-line parser: never panics; a parsed status has 3 digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::health::parse_status_line;

fuzz_target!(|data: &[u8]| {
    if let Ok(code) = parse_status_line(data) {
        assert!((0..=999).contains(&code), "{code}");
        assert!(data.starts_with(b"HTTP/"));
    }
});
