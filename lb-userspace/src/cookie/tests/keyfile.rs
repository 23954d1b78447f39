//! The generated key kept in the state directory.

use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use super::super::{keyfile::*, *};

/// A fresh directory below the temp dir (the state directory itself is created by the code
/// under test), removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "tether-keyfile-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }

    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
}

/// A cookie sealed with `a` opens with `b`.
fn agree(a: &CookieKeys, b: &CookieKeys) -> bool {
    let p = CookiePayload::issue(7, pool_id("web"), 1_000, None);
    let v = encode(a, "SRV", "web", &p);
    decode(b, "SRV", "web", &v, 2_000) == Ok(p)
}

#[test]
fn a_generated_key_is_stored_private_and_reused() {
    let d = Dir::new("reuse");
    let first = load_or_create(&d.state()).expect("created");
    assert_eq!(mode(&d.state()), 0o700, "the state directory is private");
    let file = d.state().join(KEY_FILE);
    assert_eq!(mode(&file), 0o600, "the key file is private");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        text.trim().len(),
        64 + 1 + first.current_id().to_string().len()
    );
    // A restart reads the same key: its cookies stay valid.
    let second = load_or_create(&d.state()).expect("read back");
    assert_eq!(second.current_id(), first.current_id());
    assert!(agree(&first, &second) && agree(&second, &first));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text,
        "written once"
    );
    // A random ring does not open them.
    assert!(!agree(&first, &CookieKeys::generate()));
}

#[test]
fn instances_given_the_same_file_agree_even_when_starting_together() {
    let d = Dir::new("race");
    let state = d.state();
    let rings: Vec<CookieKeys> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| load_or_create(&state).expect("loaded")))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &rings[1..] {
        assert!(agree(&rings[0], r), "every instance holds the one key");
    }
    let left: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from(KEY_FILE)],
        "no temporary file left"
    );
}

#[test]
fn a_key_file_others_can_read_or_a_damaged_one_is_refused() {
    let d = Dir::new("refuse");
    load_or_create(&d.state()).expect("created");
    let file = d.state().join(KEY_FILE);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = load_or_create(&d.state()).expect_err("mode 644 refused");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&file, "1 not-hex\n").unwrap();
    let e = load_or_create(&d.state()).expect_err("damaged refused");
    assert!(e.to_string().contains(KEY_FILE), "names the file: {e}");
}
