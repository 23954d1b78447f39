//! Benchmark references, not part of the balancer: the least any XDP program that keeps
//! source-IP state in `TETHER_PERSIST4` pays per packet, for `cargo xtask bench l4`'s floor
//! rows. The daemon never loads or attaches them.
//!
//! Both read the IPv4 source address at its fixed offset in an untagged Ethernet/IPv4 frame
//! (only the bounds are checked: the bench sends nothing else), look it up under service 0
//! (the key the daemon writes for the first service), and on the path they time swap the MAC
//! addresses and return XDP_TX. The other path returns XDP_PASS, so the bench can check from
//! the verdicts alone that every packet took the path it means to time.

use aya_ebpf::{
    bindings::{BPF_ANY, xdp_action},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{PersistKey4, PersistValue4};

use crate::{maps::TETHER_PERSIST4, parse};

/// The first 30 bytes of an untagged Ethernet/IPv4 frame, up to the source address.
#[repr(C)]
struct Head {
    macs: parse::MacPair,
    _ether_type: u16,
    _ip_to_src: [u8; 12],
    src: [u16; 2],
}
const _: () = assert!(core::mem::offset_of!(Head, src) == parse::ETH_LEN + 12);

/// The frame's head and its `TETHER_PERSIST4` key for service 0.
#[inline(always)]
fn head_and_key(ctx: &XdpContext) -> Option<(*mut Head, PersistKey4)> {
    let head = parse::ptr_at::<Head>(ctx, 0)?;
    // SAFETY: inside the frame (checked by `ptr_at`).
    let src = unsafe { (*head).src };
    let key = PersistKey4 {
        addr_be: (src[0] as u32 | (src[1] as u32) << 16).to_ne_bytes(),
        service: 0,
    };
    Some((head, key))
}

/// Swap the MAC addresses and send the frame back out.
#[inline(always)]
fn swap_tx(head: *mut Head) -> u32 {
    // SAFETY: inside the frame (checked by `ptr_at`).
    unsafe {
        let m = &mut (*head).macs;
        core::mem::swap(&mut m.dst, &mut m.src);
    }
    xdp_action::XDP_TX
}

/// Floor of a persistence hit: one `TETHER_PERSIST4` lookup, MAC swap, XDP_TX when the
/// client is in the table; XDP_PASS (frame untouched) when it is not or the frame is short.
#[xdp]
pub fn floor_hit(ctx: XdpContext) -> u32 {
    let Some((head, key)) = head_and_key(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    if TETHER_PERSIST4.get_ptr(key).is_none() {
        return xdp_action::XDP_PASS;
    }
    swap_tx(head)
}

/// Floor of a new client: the lookup, then on a miss an LRU insert (`BPF_ANY`, as the
/// balancer writes bindings) of a placeholder binding (backend 0, last seen at time 0), MAC
/// swap, XDP_TX. A client already in the table is passed untouched; a failed insert aborts.
#[xdp]
pub fn floor_new(ctx: XdpContext) -> u32 {
    let Some((head, key)) = head_and_key(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    if TETHER_PERSIST4.get_ptr(key).is_some() {
        return xdp_action::XDP_PASS;
    }
    let value = PersistValue4 {
        backend: 0,
        identity_tag: 0,
        last_seen_s: 0,
    };
    if TETHER_PERSIST4.insert(key, value, BPF_ANY as u64).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    swap_tx(head)
}
