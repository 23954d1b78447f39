//! Inputs the fuzz targets (`fuzz/`, `cargo xtask fuzz`) found crashing, as plain tests of
//! the public API they exercise. Each input is also a seed in `fuzz/seeds/<target>/`.

use tether::{
    config::Config,
    engine::{input::Input, methods::session_value},
};

/// `config`: an unknown field named "" gave an error with an empty field path.
#[test]
fn config_unknown_empty_field_is_named_at_the_root() {
    let e = Config::parse(r#"{"": "eth0", "interface": "eth0"}"#).expect_err("unknown field");
    assert_eq!(e.path, "<root>", "{e}");
    assert!(e.reason.contains("unknown field"), "{e}");
}

/// `query_path_params`: an empty app-cookie value in the Cookie header was taken as a session
/// key (every client sending `JSESSIONID=` would share one backend), while empty query and
/// path parameters were already skipped.
#[test]
fn empty_app_cookie_value_is_no_key() {
    let value = |target: &str, cookie: &str| {
        let mut head = http::Request::get(target)
            .header(http::header::COOKIE, cookie)
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let input = Input::http(&mut head, "192.0.2.1:4000".parse().expect("addr"));
        session_value(&input, "JSESSIONID").map(str::to_string)
    };
    assert_eq!(value("/SESSIONID", "/app;JSESSIONID=;y"), None);
    // An empty cookie does not hide a query parameter.
    assert_eq!(value("/a?JSESSIONID=q1", "JSESSIONID="), Some("q1".into()));
    assert_eq!(value("/a", "JSESSIONID=c1"), Some("c1".into()));
}
