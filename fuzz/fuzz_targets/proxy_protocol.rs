//! PROXY protocol v1 and v2 headers: never panics; a complete header lies within the input,
//! and anything that parses was recognised as a header start.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::proxy::{is_proxy_header_start, parse_proxy_header};

fuzz_target!(|data: &[u8]| {
    let start = is_proxy_header_start(data);
    if let Ok(Some((_, len))) = parse_proxy_header(data) {
        assert!(len <= data.len(), "header of {len} bytes in {}", data.len());
        assert_eq!(start, Some(true), "a parsed header must be seen as one");
        // The same header followed by anything parses the same.
        let mut longer = data[..len].to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let again = parse_proxy_header(&longer).expect("prefix parsed before");
        assert_eq!(again.map(|(_, n)| n), Some(len));
    }
    if start == Some(false) {
        assert!(
            parse_proxy_header(data).is_err(),
            "not a header start, yet parsed"
        );
    }
});
