//! L2 direct server return: rewrite the Ethernet addresses, leave IP and L4 untouched, send
//! the frame out of the ingress interface (XDP_TX) or another one (devmap redirect).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{BACKEND_UNUSED, Backend, reason};

use crate::{
    Verdict,
    maps::TETHER_TX_PORTS,
    parse::{MacPair, ptr_at},
    verdict,
};

#[inline(always)]
pub fn forward(ctx: &XdpContext, be: &Backend) -> Result<Verdict, Verdict> {
    if be.state == BACKEND_UNUSED {
        return Err(verdict::drop(reason::DROP_BAD_BACKEND));
    }
    // Parsing checked this already; the verifier needs to see it again here.
    let macs: *mut MacPair = ptr_at(ctx, 0).ok_or(verdict::pass(reason::MALFORMED_ETH))?;
    let ifindex = be.ifindex;
    let verdict = if ifindex == 0 || ifindex as usize == ctx.ingress_ifindex() {
        (xdp_action::XDP_TX, reason::TX)
    } else {
        // Only records the target; the frame leaves after the program returns, so the
        // rewrite below still applies. A port missing from the devmap drops the frame
        // untouched.
        match TETHER_TX_PORTS.redirect(ifindex, 0) {
            Ok(action) => (action, reason::REDIRECT),
            Err(_) => return Err(verdict::drop(reason::DROP_BAD_BACKEND)),
        }
    };
    // SAFETY: the 12 bytes are inside the frame (checked by `ptr_at`).
    unsafe {
        (*macs).dst = words(&be.mac_dst);
        (*macs).src = words(&be.mac_src);
    }
    Ok(verdict)
}

/// A MAC address as the three 16-bit words it occupies in the frame.
#[inline(always)]
fn words(mac: &[u8; 6]) -> [u16; 3] {
    [
        u16::from_ne_bytes([mac[0], mac[1]]),
        u16::from_ne_bytes([mac[2], mac[3]]),
        u16::from_ne_bytes([mac[4], mac[5]]),
    ]
}
