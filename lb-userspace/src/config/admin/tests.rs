use std::path::Path;

use crate::config::Config;

fn parse(extra: &str) -> Result<Config, crate::config::ConfigError> {
    Config::parse(&format!(r#"{{"interface": "eth0"{extra}}}"#))
}

#[test]
fn defaults_put_the_token_in_the_state_dir() {
    let c = parse("").expect("minimal config");
    assert_eq!(c.state_dir, Path::new("/var/lib/tether"));
    assert_eq!(c.admin_token_file, None);
    assert_eq!(
        c.admin_token_path(),
        Path::new("/var/lib/tether/admin.token")
    );
    let c = parse(r#", "state_dir": "/srv/tether""#).expect("state_dir");
    assert_eq!(c.admin_token_path(), Path::new("/srv/tether/admin.token"));
    let c = parse(r#", "admin_token_file": "/etc/tether/token""#).expect("token file");
    assert_eq!(c.admin_token_path(), Path::new("/etc/tether/token"));
}

#[test]
fn non_loopback_admin_listen_needs_a_named_token_file() {
    for listen in ["0.0.0.0:9180", "10.0.0.1:9180", "[::]:9180"] {
        let e = parse(&format!(r#", "admin_listen": "{listen}""#))
            .expect_err("non-loopback without admin_token_file");
        assert_eq!(e.path, "admin_listen", "{e}");
        assert!(e.reason.contains("admin_token_file"), "{e}");
        parse(&format!(
            r#", "admin_listen": "{listen}", "admin_token_file": "/etc/tether/token""#
        ))
        .unwrap_or_else(|e| panic!("{listen} with a token file: {e}"));
    }
    for listen in ["127.0.0.1:9180", "127.0.0.2:1", "[::1]:9180"] {
        parse(&format!(r#", "admin_listen": "{listen}""#))
            .unwrap_or_else(|e| panic!("loopback {listen}: {e}"));
    }
}

#[test]
fn paths_must_be_absolute() {
    for (field, v) in [
        ("state_dir", "var/lib/tether"),
        ("state_dir", "/var/lib/../tmp"),
        ("admin_token_file", "token"),
        ("admin_token_file", "/etc/tether/../../tmp/t"),
        ("admin_token_file", "/"),
    ] {
        let e = parse(&format!(r#", "{field}": "{v}""#)).expect_err(v);
        assert_eq!(e.path, field, "{e}");
    }
}
