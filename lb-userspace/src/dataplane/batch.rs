//! BPF_MAP_UPDATE_BATCH for u32 -> u32 maps (aya 0.14 has no batch API). A Maglev table is
//! 65537 entries: one syscall instead of 65537 single updates (~100 ms), so a health change
//! reprograms a service in about a millisecond.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Write `values[i]` at `keys[i]` for all i, in one syscall.
pub fn update_u32(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` points at live key and value buffers of `count` u32s each, which the
    // kernel only reads; the attr size is that of the batch member.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "batch update wrote {} of {} entries",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}
