//! Where tether's pins live, and whether the pin directory can be trusted.
//!
//! Pins must outlive the daemon: a restart finds the persistence table, the counters and the
//! XDP link where the last process left them. That holds only for a bpffs in a mount
//! namespace that outlives the process, in practice the host's. `ip netns exec` (and a
//! container without the host's /sys/fs/bpf bind-mounted) gives the process a private mount
//! namespace with a fresh /sys and no bpffs; pins made there vanish with the process.
//! [`reach_host_bpffs`] therefore runs first thing, before any thread exists, and either
//! joins the mount namespace of the ancestor that ran `ip netns exec` (whose /sys/fs/bpf is
//! the host's bpffs), mounts bpffs on the host, or refuses to start with the fix in the
//! message. Nothing tether reads from /sys
//! depends on the network namespace (interfaces come from netlink and ioctls), so joining
//! the host's mount namespace changes nothing else.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Component, Path, PathBuf},
};

/// `statfs` magic of a bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Inode number of the initial PID namespace (`PROC_PID_INIT_INO`).
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
/// Where bpffs is mounted on a host.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "{BPFFS_MOUNT} is not a bpffs in this mount namespace and the host's bpffs cannot be reached ({detail}): \
         pins made here would vanish when tether exits, and every persistence entry with them. \
         In a container, bind-mount the host's bpffs (docker run -v /sys/fs/bpf:/sys/fs/bpf, or a \
         hostPath volume); or run tether from the host's mount namespace and enter the network \
         namespace with `tether run --netns NAME` instead of `ip netns exec`"
    )]
    Unreachable { detail: String },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("network namespace {name:?} ({path}): {source}")]
    Netns {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pin_dir {path}: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, BpffsError>;

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BpffsError {
    let what = what.into();
    move |source| BpffsError::Sys { what, source }
}

/// Whether `path` is on a bpffs (`statfs` magic). A missing path is not.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn ns_id(path: &str) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Join a namespace through `setns`. The caller must still be single-threaded (mount
/// namespaces require it; network namespaces apply to the calling thread only).
fn setns(file: &File, nstype: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid namespace fd.
    if unsafe { libc::setns(file.as_raw_fd(), nstype) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Enter the network namespace `name` (`/run/netns/NAME`, as `ip netns` names them). Only
/// the network namespace changes; call before any thread starts, so every thread is in it.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/run/netns").join(name)
    };
    let err = |source| BpffsError::Netns {
        name: name.into(),
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(err)?;
    setns(&f, libc::CLONE_NEWNET).map_err(err)
}

/// How the host's bpffs was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// /sys/fs/bpf was a bpffs already (the host, or a container with it bind-mounted).
    Here,
    /// This process was in a private mount namespace (`ip netns exec`): it joined the mount
    /// namespace of the ancestor with this pid, whose /sys/fs/bpf is a bpffs.
    Joined(u32),
    /// On the host with no bpffs mounted: mounted on /sys/fs/bpf (it stays until reboot).
    Mounted,
}

/// Parent pid from `/proc/PID/stat` (the field after the command, which may hold spaces).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// This process's ancestors, nearest first, up to PID 1 (bounded).
fn ancestors() -> Vec<u32> {
    let mut out = Vec::new();
    let mut pid = std::process::id();
    while let Some(p) = parent_of(pid) {
        if p == 0 || out.contains(&p) || out.len() >= 64 {
            break;
        }
        out.push(p);
        pid = p;
    }
    if !out.contains(&1) {
        out.push(1);
    }
    out
}

/// Make the host's bpffs visible at /sys/fs/bpf in this process (see the module docs).
/// Must run before any thread is started. Relative paths keep working: the working
/// directory is carried over.
///
/// The host's mount namespace is found through the process tree: the nearest ancestor (the
/// shell or service manager that ran `ip netns exec`, up to PID 1) in another mount namespace
/// whose /sys/fs/bpf is a bpffs. An ancestor in another mount namespace without one means
/// the host has no bpffs mounted; with no ancestor in another mount namespace this process
/// is on the host itself (or in a container's own namespace).
pub fn reach_host_bpffs() -> Result<Reach> {
    let mount = Path::new(BPFFS_MOUNT);
    if is_bpffs(mount) {
        return Ok(Reach::Here);
    }
    let ours = ns_id("/proc/self/ns/mnt").map_err(sys("reading /proc/self/ns/mnt"))?;
    let mut other_ns_without_bpffs = None;
    let mut unreadable = Vec::new();
    for pid in ancestors() {
        match ns_id(&format!("/proc/{pid}/ns/mnt")) {
            Ok(id) if id == ours => continue,
            Ok(_) => {}
            Err(e) => {
                unreadable.push(format!("pid {pid}: {e}"));
                continue;
            }
        }
        if !is_bpffs(&PathBuf::from(format!("/proc/{pid}/root{BPFFS_MOUNT}"))) {
            other_ns_without_bpffs.get_or_insert(pid);
            continue;
        }
        join_mount_ns(pid)?;
        if !is_bpffs(mount) {
            return Err(BpffsError::Unreachable {
                detail: format!(
                    "joined the mount namespace of pid {pid}, but /sys/fs/bpf is still no bpffs"
                ),
            });
        }
        log::info!(
            "this process had a private mount namespace (ip netns exec?): joined that of pid {pid}, whose /sys/fs/bpf is the host's bpffs, so pins outlive the process"
        );
        return Ok(Reach::Joined(pid));
    }
    if let Some(pid) = other_ns_without_bpffs {
        return Err(BpffsError::Unreachable {
            detail: format!(
                "the mount namespace of pid {pid}, outside this one, has no bpffs either: mount it there first (mount -t bpf bpf /sys/fs/bpf)"
            ),
        });
    }
    // Every readable ancestor shares this mount namespace: this is the host's.
    if in_initial_pid_ns() {
        mount_bpffs(mount)?;
        log::info!("mounted bpffs on {BPFFS_MOUNT}");
        return Ok(Reach::Mounted);
    }
    // A container's own namespace: a bpffs mounted here lives only as long as the container.
    let mut detail =
        "this looks like a container (own PID namespace) without the host's bpffs".to_string();
    if !unreadable.is_empty() {
        detail += &format!("; unreadable: {}", unreadable.join("; "));
    }
    Err(BpffsError::Unreachable { detail })
}

fn join_mount_ns(pid: u32) -> Result<()> {
    let unreachable = |what: &str, e: std::io::Error| BpffsError::Unreachable {
        detail: format!("{what} of pid {pid}: {e}"),
    };
    let ns = File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| unreachable("opening the mount namespace", e))?;
    let cwd = File::open(".").ok();
    setns(&ns, libc::CLONE_NEWNS).map_err(|e| unreachable("joining the mount namespace", e))?;
    // setns reset the working directory to the new root; relative config paths must still
    // mean what they meant.
    if let Some(d) = cwd {
        // SAFETY: a valid directory fd.
        unsafe { libc::fchdir(d.as_raw_fd()) };
    }
    Ok(())
}

fn in_initial_pid_ns() -> bool {
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == PROC_PID_INIT_INO)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, dst, fs) = (c("bpf"), c(&at.to_string_lossy()), c("bpf"));
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(sys(format!("mounting bpffs on {}", at.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Create (0700) or check the pin directory before anything is pinned or opened in it. It
/// must be an absolute path without `..` on a bpffs, with no symbolic link on the way or
/// inside it, owned by root and writable by nobody else; anything else is refused, since
/// whoever can write there can swap the maps the data path reads.
pub fn prepare_pin_dir(dir: &Path) -> Result<()> {
    check_pin_dir_path(dir)?;
    let unsafe_dir = |reason: String| BpffsError::Unsafe {
        path: dir.to_owned(),
        reason,
    };
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(sys(format!("creating {}", dir.display())))?;
        // The umask may have removed bits only; make the mode exact.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(sys(format!("chmod 0700 {}", dir.display())))?;
    }
    check_pin_dir_path(dir)?;
    let m = std::fs::symlink_metadata(dir).map_err(sys(format!("stat {}", dir.display())))?;
    if !m.is_dir() {
        return Err(unsafe_dir("not a directory".into()));
    }
    if m.uid() != 0 {
        return Err(unsafe_dir(format!(
            "owned by uid {}, not root: whoever owns it can replace the maps",
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:o} is group- or world-writable (chmod 0700 it)",
            m.mode() & 0o7777
        )));
    }
    let entries = std::fs::read_dir(dir).map_err(sys(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(sys(format!("listing {}", dir.display())))?;
        let ft = e
            .file_type()
            .map_err(sys(format!("stat {}", e.path().display())))?;
        if ft.is_symlink() {
            return Err(unsafe_dir(format!(
                "{} is a symbolic link; tether never follows one out of its pin directory",
                e.file_name().to_string_lossy()
            )));
        }
    }
    Ok(())
}

/// The path checks of [`prepare_pin_dir`] that need no directory yet: absolute, no `..`,
/// no symbolic link among the existing components, and on a bpffs (its deepest existing
/// component).
pub fn check_pin_dir_path(dir: &Path) -> Result<()> {
    let unsafe_dir = |reason: String| BpffsError::Unsafe {
        path: dir.to_owned(),
        reason,
    };
    if !dir.is_absolute() {
        return Err(unsafe_dir("must be an absolute path".into()));
    }
    if dir.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(unsafe_dir("must not contain `..`".into()));
    }
    let mut deepest = PathBuf::from("/");
    let mut prefix = PathBuf::new();
    for c in dir.components() {
        prefix.push(c);
        match std::fs::symlink_metadata(&prefix) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_dir(format!(
                    "{} is a symbolic link; give the real path",
                    prefix.display()
                )));
            }
            Ok(_) => deepest = prefix.clone(),
            Err(_) => break,
        }
    }
    if !is_bpffs(&deepest) {
        return Err(unsafe_dir(format!(
            "{} is not on a bpffs: pins elsewhere are impossible, and a private bpffs would vanish with the process",
            deepest.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
