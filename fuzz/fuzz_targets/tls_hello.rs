//! The TLS readers of pass-through services: the ClientHello reader, fed whole or in pieces,
//! never panics and gives the same answer either way; the ServerHello scan never panics and
//! stops within its byte limit.
//!
//! Input: one byte choosing the split point, then the bytes (read as client, then as server).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::tlswire::{HelloReader, ServerScan, client_hello};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let whole = client_hello(bytes);
    let mut reader = HelloReader::new(64 * 1024);
    let at = (split as usize).min(bytes.len());
    let first = reader.push(&bytes[..at]);
    let pieces = match first {
        Ok(Some(h)) => Ok(Some(h)),
        Ok(None) => reader.push(&bytes[at..]),
        Err(e) => Err(e),
    };
    if let (Ok(Some(a)), Ok(Some(b))) = (&whole, &pieces) {
        assert_eq!(a, b, "the same hello whole and in pieces");
        assert!(a.session_id.len() <= 32);
    }
    let mut scan = ServerScan::new(16 * 1024);
    let mut fed = 0;
    for chunk in bytes.chunks(97) {
        if scan.done() {
            break;
        }
        scan.push(chunk);
        fed += chunk.len();
    }
    assert!(scan.done() || fed <= 16 * 1024 + 97);
});
