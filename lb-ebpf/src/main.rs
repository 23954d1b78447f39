//! tether's XDP data path: an L4 balancer with source-IP persistence and L2 direct server
//! return. `tether_xdp` is the balancer; `tether_pass`, `tether_swap_tx` and `tether_drop`
//! are trivial helpers for veth peers and benchmarks, and `floor` holds the benchmark's
//! floor programs (one persistence-table lookup, and a lookup plus an insert).
//!
//! One concern per module: `maps` (definitions), `parse` (headers), `service` (the VIP's
//! service), `persist` (bindings),
//! `clock` (the coarse clock, one helper call per tick),
//! `conntrack` (flows of services without persistence), `select` (Maglev), `forward` (MAC
//! rewrite, TX/redirect), `stats` (counters).
#![no_std]
#![no_main]

mod clock;
mod conntrack;
mod floor;
mod forward;
mod maps;
mod parse;
mod persist;
mod select;
mod service;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{FragKey, FragValue, SERVICE_F_L7, event, reason};
use parse::Kind;

/// An XDP action and the reason counted for it.
pub type Verdict = (u32, u32);

/// Verdict constructors.
pub mod verdict {
    use super::{Verdict, reason, xdp_action};

    pub const ABORTED: Verdict = (xdp_action::XDP_ABORTED, reason::ABORTED);

    #[inline(always)]
    pub const fn pass(reason: u32) -> Verdict {
        (xdp_action::XDP_PASS, reason)
    }

    #[inline(always)]
    pub const fn drop(reason: u32) -> Verdict {
        (xdp_action::XDP_DROP, reason)
    }
}

/// The balancer. Every packet is counted under exactly one reason.
#[xdp]
pub fn tether_xdp(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_tether_xdp(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count_reason(reason);
    action
}

#[inline(always)]
fn try_tether_xdp(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let flow = parse::parse(ctx).map_err(verdict::pass)?;
    if !flow.is_v6 && flow.kind == Kind::Packet {
        // The common case gets its own copy of `balance`, in which LLVM knows the family,
        // the kind and the constant words of the IPv4-mapped addresses, instead of carrying
        // (and spilling) them for IPv6, fragments and ICMP errors.
        let v4 = parse::Flow {
            src: parse::v4_mapped(flow.src[3]),
            dst: parse::v4_mapped(flow.dst[3]),
            is_v6: false,
            kind: Kind::Packet,
            ip_id_be: 0,
            ..flow
        };
        return balance(ctx, v4);
    }
    balance(ctx, flow)
}

/// Balance a parsed packet: its service, its backend, the rewrite, the counters.
#[inline(always)]
fn balance(ctx: &XdpContext, mut flow: parse::Flow) -> Result<Verdict, Verdict> {
    if flow.kind == Kind::LaterFragment {
        // Ports come from the first fragment; without it the stack reassembles (or drops).
        // SAFETY: the value is copied out at once; a concurrent replace of this entry
        // writes the same two ports.
        let ports = unsafe { maps::TETHER_FRAGS.get(frag_key(&flow)) }
            .copied()
            .ok_or(verdict::pass(reason::PASS_FRAGMENT))?;
        flow.sport_be = ports.sport_be;
        flow.dport_be = ports.dport_be;
    }
    let svc = service::find(&flow).ok_or(verdict::pass(reason::PASS_NOT_VIP))?;
    if svc.flags & SERVICE_F_L7 != 0 {
        return Err(verdict::pass(reason::PASS_L7));
    }
    if flow.kind == Kind::FirstFragment {
        let ports = FragValue {
            sport_be: flow.sport_be,
            dport_be: flow.dport_be,
        };
        if maps::TETHER_FRAGS.insert(frag_key(&flow), ports, 0).is_ok() {
            stats::count_event(event::FRAG_TRACKED);
        }
    }
    // SAFETY: the only reference to this service's slot in this run.
    let svc_stat = unsafe { stats::service(svc.index) }.ok_or(verdict::ABORTED)?;
    let choice = persist::choose(svc, &flow, svc_stat)?;
    // SAFETY: the only reference to this backend's slot in this run.
    let be_stat = unsafe { stats::backend(choice.id) }.ok_or(verdict::ABORTED)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let result = forward::forward(ctx, choice.backend);
    stats::account(svc_stat, be_stat, choice.event, bytes, result.is_ok());
    if flow.kind == Kind::Packet {
        return result;
    }
    // Forwarded ICMP errors and fragments are counted apart from the flows' own packets.
    match (result, flow.kind) {
        (Ok((action, _)), Kind::IcmpError) => Ok((action, reason::FWD_ICMP_ERROR)),
        (Ok((action, _)), Kind::LaterFragment) => Ok((action, reason::FWD_FRAGMENT)),
        (r, _) => r,
    }
}

/// The fragment-table key of an IPv4 datagram.
#[inline(always)]
fn frag_key(flow: &parse::Flow) -> FragKey {
    FragKey {
        src_be: flow.src[3].to_ne_bytes(),
        dst_be: flow.dst[3].to_ne_bytes(),
        id_be: flow.ip_id_be,
        proto: flow.proto,
        _pad: 0,
    }
}

/// XDP_PASS, for the peer of a veth in native mode (XDP_TX frames need a native program
/// on the receiving side).
#[xdp]
pub fn tether_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: swap the MAC addresses and send the frame back out.
#[xdp]
pub fn tether_swap_tx(ctx: XdpContext) -> u32 {
    let Some(macs) = parse::ptr_at::<parse::MacPair>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: the addresses are inside the frame (checked by `ptr_at`).
    unsafe {
        let m = &mut *macs;
        core::mem::swap(&mut m.dst, &mut m.src);
    }
    xdp_action::XDP_TX
}

/// Benchmark sink: drop everything.
#[xdp]
pub fn tether_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
