//! The config file as the store of objects. Every change runs under one lock: read the
//! file, edit a copy of the whole document ([`super::edit`]), validate it with the loader's
//! own validator ([`Config::parse`]), then hand it to the control loop, which prepares
//! everything the reload path prepares, writes the file back atomically ([`write_atomic`])
//! and switches over. A refused change leaves the file and the running daemon as they were.

use std::{
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::edit::EditError;
use crate::config::{Config, ConfigError};

/// A validated document for the control loop to apply and write to the file.
#[derive(Debug)]
pub struct ApplyRequest {
    pub config: Arc<Config>,
    /// The file's new text.
    pub text: String,
    /// The file's text the change was made to: when the file holds anything else by the
    /// time the change would be written (edited by hand meanwhile), nothing is applied.
    pub base: String,
    /// The generation now serving, or why nothing changed.
    pub reply: oneshot::Sender<Result<u64, Refused>>,
}

/// Why the control loop did not apply a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The file no longer holds the text the change was made to.
    Stale,
    /// Preparing or writing failed: the reason.
    Failed(String),
}

impl ApplyRequest {
    /// Whether the file at `path` still holds the text this change was made to.
    pub fn base_is_current(&self, path: &Path) -> bool {
        std::fs::read_to_string(path).is_ok_and(|t| t == self.base)
    }
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Edit(#[from] EditError),
    /// 422: the changed config does not validate, as the loader words it.
    #[error("{0}")]
    Invalid(ConfigError),
    /// 422: the control loop could not apply it (a name that does not resolve, a field
    /// that needs a restart, a certificate that does not load); nothing changed.
    #[error("not applied, nothing changed: {0}")]
    NotApplied(String),
    /// 409: the file changed on disk between the read and the write.
    #[error(
        "the config file changed while this change was made (edited by hand?): nothing applied; retry"
    )]
    Stale,
    /// 500: the file cannot be read or is not JSON.
    #[error("{0}")]
    File(String),
    /// 503: the daemon is stopping.
    #[error("the daemon is not taking changes (stopping)")]
    Unavailable,
}

/// The objects' store: the config file and the way to the control loop.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// read-modify-validate-write-apply runs for one writer at a time.
    lock: Mutex<()>,
    apply: mpsc::Sender<ApplyRequest>,
}

/// What a change returns on success.
#[derive(Debug)]
pub struct Applied {
    pub object: Value,
    pub generation: u64,
}

impl Store {
    pub fn new(path: PathBuf, apply: mpsc::Sender<ApplyRequest>) -> Store {
        Store {
            path,
            lock: Mutex::new(()),
            apply,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's document as it is now.
    pub async fn read(&self) -> Result<Value, StoreError> {
        Ok(self.read_text().await?.1)
    }

    /// The file's text and its document.
    async fn read_text(&self) -> Result<(String, Value), StoreError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| StoreError::File(format!("reading {}: {e}", self.path.display())))?;
        let doc = serde_json::from_str(&text)
            .map_err(|e| StoreError::File(format!("{} is not JSON: {e}", self.path.display())))?;
        Ok((text, doc))
    }

    /// Run `edit` on the document, validate the result as a whole, apply it and write it
    /// back; all or nothing.
    pub async fn change(
        &self,
        edit: impl FnOnce(&mut Value) -> Result<Value, EditError>,
    ) -> Result<Applied, StoreError> {
        let _one_writer = self.lock.lock().await;
        let (base, mut doc) = self.read_text().await?;
        let object = edit(&mut doc)?;
        let text = render(&doc);
        let config = Config::parse(&text).map_err(StoreError::Invalid)?;
        let (reply, answer) = oneshot::channel();
        let req = ApplyRequest {
            config: Arc::new(config),
            text,
            base,
            reply,
        };
        self.apply
            .send(req)
            .await
            .map_err(|_| StoreError::Unavailable)?;
        match answer.await {
            Ok(Ok(generation)) => Ok(Applied { object, generation }),
            Ok(Err(Refused::Stale)) => Err(StoreError::Stale),
            Ok(Err(Refused::Failed(why))) => Err(StoreError::NotApplied(why)),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}

/// Keys written first, in this order (the rest follow alphabetically): the top-level
/// settings as the README lists them, then each object's identity.
const KEY_ORDER: &[&str] = &[
    "interface",
    "xdp_mode",
    "pin_dir",
    "state_dir",
    "persist_table_entries",
    "persist_new_bindings_per_cpu_s",
    "admin_listen",
    "admin_token_file",
    "drain_timeout_ms",
    "virtual_services",
    "pools",
    "persistence_profiles",
    "name",
    "type",
    "vip",
    "address",
    "port",
    "protocol",
    "mode",
    "pool",
    "persistence",
    "weight",
    "admin_state",
    "backends",
];

/// The config document as the file's text: pretty-printed (two spaces), keys in
/// [`KEY_ORDER`] then alphabetical, so `name` leads every object.
pub fn render(doc: &Value) -> String {
    fn write(out: &mut String, v: &Value, indent: usize) {
        let pad = |n: usize| "  ".repeat(n);
        match v {
            Value::Object(o) if !o.is_empty() => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort_by_key(|k| {
                    (
                        KEY_ORDER.iter().position(|o| o == k).unwrap_or(usize::MAX),
                        k.as_str(),
                    )
                });
                out.push_str("{\n");
                for (i, k) in keys.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    out.push_str(&Value::String((*k).clone()).to_string());
                    out.push_str(": ");
                    write(out, &o[k.as_str()], indent + 1);
                    out.push_str(if i + 1 < keys.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
            Value::Array(a) if !a.is_empty() => {
                out.push_str("[\n");
                for (i, item) in a.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    write(out, item, indent + 1);
                    out.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            // Scalars, `{}` and `[]` as serde_json writes them.
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(&mut out, doc, 0);
    out.push('\n');
    out
}

/// Replace `path` with `text` atomically: a temporary file in the same directory (the
/// original's mode and owner), fsync, rename over, fsync the directory. A crash leaves either
/// the old file or the new one, never a mix. A symbolic link is followed: its target is
/// replaced and the link stays.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let resolved = std::fs::canonicalize(path);
    let path = resolved.as_deref().unwrap_or(path);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the config path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let meta = std::fs::metadata(path).ok();
    let mode = meta
        .as_ref()
        .map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some(m) = &meta {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
        }
        // The umask may have narrowed the mode.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
