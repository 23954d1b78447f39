//! The generated cookie key of a daemon whose profiles configure none, kept in its state
//! directory so that cookies survive restarts and every instance given the same file agrees.
//!
//! The file holds one line, `<key id> <64 hex digits>`, mode 0600, in a directory created
//! 0700. It is written once: a temporary file is filled, synced and hard-linked to its name,
//! so two instances starting together cannot both create it (the second reads the first's).

use std::{
    fs::{self, DirBuilder, OpenOptions},
    io::{ErrorKind, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use super::{CookieKeys, KEY_LEN, KeyError, b64, fill_random};

/// File name of the generated key in the state directory.
pub const KEY_FILE: &str = "cookie-key";

/// Create `dir` (0700) if it does not exist.
pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The key stored in `dir`, created on first use.
pub fn load_or_create(dir: &Path) -> Result<CookieKeys, KeyError> {
    let path = dir.join(KEY_FILE);
    let err = |reason: String| KeyError::Stored {
        path: path.clone(),
        reason,
    };
    ensure_dir(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    if !path.exists() {
        create(dir, &path).map_err(|e| err(format!("writing it: {e}")))?;
    }
    let meta = fs::metadata(&path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "readable by others (mode {mode:03o}): run chmod 600 on it"
        )));
    }
    let text = fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    parse(&text).ok_or_else(|| err("not `<key id> <64 hex digits>`".into()))
}

fn parse(text: &str) -> Option<CookieKeys> {
    let (id, hex) = text.trim().split_once(' ')?;
    let secret = b64::decode_hex::<KEY_LEN>(hex.trim().as_bytes())?;
    CookieKeys::new(&[(id.parse().ok()?, secret)]).ok()
}

/// Write a new random key unless another process got there first.
fn create(dir: &Path, path: &Path) -> std::io::Result<()> {
    let mut secret = [0u8; KEY_LEN + 1];
    fill_random(&mut secret);
    let hex: String = secret[..KEY_LEN]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Unique per writer: a writer never touches another's temporary file.
    let mut tag = [0u8; 8];
    fill_random(&mut tag);
    let tmp = dir.join(format!(
        ".{KEY_FILE}.{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(tag)
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{} {hex}", secret[KEY_LEN])?;
    f.sync_all()?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fs::File::open(dir)?.sync_all()?;
            log::info!(
                "generated the cookie key {}: keep it to keep cookies valid across restarts, copy it to let other instances accept them",
                path.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
