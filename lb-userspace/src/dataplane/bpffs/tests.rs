//! Pin directory checks against the real bpffs on /sys/fs/bpf (needs root, as every test that
//! touches maps does).

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::*;

/// A fresh path under /sys/fs/bpf, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            is_bpffs(Path::new(BPFFS_MOUNT)),
            "these tests need bpffs on {BPFFS_MOUNT} (run as root; `cargo xtask test` mounts it)"
        );
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/tether-test-pindir-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn refusal(r: Result<()>) -> String {
    match r {
        Err(e @ BpffsError::Unsafe { .. }) => e.to_string(),
        other => panic!("expected the pin directory to be refused, got {other:?}"),
    }
}

#[test]
fn created_0700_and_reused() {
    let s = Scratch::new("create");
    let dir = s.0.join("nested");
    prepare_pin_dir(&dir).expect("a new pin directory is created");
    let m = std::fs::symlink_metadata(&dir).expect("stat");
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o700, "pin directory mode");
    assert_eq!(m.uid(), 0);
    prepare_pin_dir(&dir).expect("an existing good directory is accepted");
}

#[test]
fn group_or_world_writable_refused() {
    for mode in [0o770, 0o707, 0o777] {
        let s = Scratch::new("mode");
        std::fs::create_dir(&s.0).expect("mkdir");
        std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let e = refusal(prepare_pin_dir(&s.0));
        assert!(e.contains("group- or world-writable"), "mode {mode:o}: {e}");
    }
}

#[test]
fn not_owned_by_root_refused() {
    let s = Scratch::new("owner");
    std::fs::create_dir(&s.0).expect("mkdir");
    std::os::unix::fs::chown(&s.0, Some(4242), None).expect("chown");
    let e = refusal(prepare_pin_dir(&s.0));
    assert!(e.contains("uid 4242"), "{e}");
}

#[test]
fn dot_dot_refused() {
    let e = refusal(prepare_pin_dir(Path::new(
        "/sys/fs/bpf/tether/../../../tmp/x",
    )));
    assert!(e.contains("`..`"), "{e}");
}

#[test]
fn not_on_bpffs_refused() {
    let dir = std::env::temp_dir().join(format!("tether-test-pindir-{}", std::process::id()));
    let e = refusal(prepare_pin_dir(&dir));
    assert!(e.contains("not on a bpffs"), "{e}");
    assert!(!dir.exists(), "nothing is created off bpffs");
}

#[test]
fn symlinks_refused() {
    // The directory itself a link out of bpffs.
    let outside = std::env::temp_dir().join(format!("tether-test-out-{}", std::process::id()));
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    let s = Scratch::new("link");
    std::os::unix::fs::symlink(&outside, &s.0).expect("symlink on bpffs");
    let e = refusal(prepare_pin_dir(&s.0));
    assert!(e.contains("symbolic link"), "{e}");
    let e = refusal(prepare_pin_dir(&s.0.join("below")));
    assert!(e.contains("symbolic link"), "a link on the way: {e}");

    // A link inside the pin directory, where a map pin would be opened.
    let d = Scratch::new("inner");
    prepare_pin_dir(&d.0).expect("fresh directory");
    std::os::unix::fs::symlink(outside.join("TETHER_PERSIST"), d.0.join("TETHER_PERSIST"))
        .expect("symlink inside");
    let e = refusal(prepare_pin_dir(&d.0));
    assert!(e.contains("TETHER_PERSIST is a symbolic link"), "{e}");
    let _ = std::fs::remove_file(d.0.join("TETHER_PERSIST"));
    let _ = std::fs::remove_dir_all(&outside);
}
