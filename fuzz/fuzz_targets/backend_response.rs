//! A backend's HTTP/1.1 response as the in-task client reads it (head, interim 1xx, framing,
//! chunked decoding): never panics; the body is made of input bytes and no longer than the
//! input; the final status is a real one, never an interim 1xx other than 101; the same bytes
//! parse the same way twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::proxy::parse_backend_response;

fuzz_target!(|data: &[u8]| {
    let head_request = data.first().is_some_and(|b| b & 1 == 1);
    let data = data.get(1..).unwrap_or_default();
    let first = parse_backend_response(data, head_request);
    if let Ok(Some((status, body, _))) = &first {
        assert!((100..=999).contains(status), "status {status}");
        assert!(*status >= 200 || *status == 101, "interim {status} as final");
        assert!(body.len() <= data.len(), "{} body bytes from {}", body.len(), data.len());
        if head_request || *status == 204 || *status == 304 {
            assert!(body.is_empty(), "a bodiless response ({status}) with a body");
        }
    }
    assert_eq!(first, parse_backend_response(data, head_request), "not deterministic");
});
