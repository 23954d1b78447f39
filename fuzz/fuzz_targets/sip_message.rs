//! The SIP message parser of UDP services: never panics; a parsed message has a start line
//! and its header lookups (full and compact names) return values from the datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::engine::input::SipMessage;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = SipMessage::parse(data) {
        assert!(!m.start_line.is_empty());
        for name in ["Call-ID", "i", "From", "v"] {
            if let Some(v) = m.header(name) {
                assert!(v.len() <= data.len());
            }
        }
    }
});
