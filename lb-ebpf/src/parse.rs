//! Header parsing: Ethernet (one optional 802.1Q/802.1ad tag), IPv4 (with options) or IPv6,
//! then the TCP/UDP ports; for an ICMP/ICMPv6 error, the flow quoted inside it. Every failure
//! is a pass reason; the packet is never changed here.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP, reason};

/// Ethertypes as read from the wire into a native (little-endian) u16.
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

pub const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4_MIN_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// ICMP and ICMPv6 headers are 8 bytes before the quoted datagram.
const ICMP_LEN: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// TCP flag bits as read from byte 13 of the header.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 flags/fragment-offset field, offset bits and "more fragments" (host order).
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MF: u16 = 0x2000;

#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    ether_type: u16,
}

/// Destination and source MAC, the first 12 bytes of the frame, as 16-bit words.
#[repr(C)]
pub struct MacPair {
    pub dst: [u16; 3],
    pub src: [u16; 3],
}

#[repr(C)]
struct VlanHdr {
    _tci: u16,
    ether_type: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    _ttl: u8,
    proto: u8,
    _check: [u8; 2],
    src: [u16; 2],
    dst: [u16; 2],
}

/// Type and code of an ICMP or ICMPv6 header (the rest is not needed).
#[repr(C)]
struct IcmpHdr {
    kind: u8,
    _code: u8,
    _rest: [u8; ICMP_LEN - 2],
}

/// The ports at the start of a TCP or UDP header quoted in an ICMP error (RFC 792 and 4443
/// guarantee at least these 8 bytes of it).
#[repr(C)]
struct PortsHdr {
    sport: u16,
    dport: u16,
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    src: [u16; 8],
    dst: [u16; 8],
}

/// The part of the TCP header the balancer needs; sized so a check covers the whole header.
#[repr(C)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    _seq_ack_off: [u8; 9],
    flags: u8,
    _rest: [u8; TCP_MIN_LEN - 14],
}

#[repr(C)]
struct UdpHdr {
    sport: u16,
    dport: u16,
    _len: u16,
    _check: u16,
}

const _: () = assert!(size_of::<EthHdr>() == ETH_LEN);
const _: () = assert!(size_of::<VlanHdr>() == VLAN_LEN);
const _: () = assert!(size_of::<Ipv4Hdr>() == IPV4_MIN_LEN);
const _: () = assert!(size_of::<Ipv6Hdr>() == IPV6_LEN);
const _: () = assert!(size_of::<TcpHdr>() == TCP_MIN_LEN);
const _: () = assert!(size_of::<UdpHdr>() == UDP_LEN);
const _: () = assert!(size_of::<IcmpHdr>() == ICMP_LEN);
const _: () = assert!(core::mem::offset_of!(TcpHdr, flags) == 13);

/// An address (IPv6, or IPv4-mapped) as the native-order 32-bit words of its wire bytes:
/// the same words `lb_common::hash::addr_words` makes of the `[u8; 16]` form. Kept as words
/// so LLVM moves and masks 4 registers instead of 16 bytes.
pub type Addr = [u32; 4];

// Words are assembled from 16-bit loads below, low half first: little-endian only (bpfel).
const _: () = assert!(cfg!(target_endian = "little"));

/// Third word of an IPv4-mapped address (`::ffff:a.b.c.d`: bytes 8..12 are 0, 0, ff, ff).
pub const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The 32-bit word whose wire bytes are those of `lo` then `hi`.
#[inline(always)]
const fn word(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// The `[u8; 16]` (wire order) form of an address.
#[inline(always)]
pub fn addr_bytes(a: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = a[i].to_ne_bytes();
        out[4 * i] = b[0];
        out[4 * i + 1] = b[1];
        out[4 * i + 2] = b[2];
        out[4 * i + 3] = b[3];
        i += 1;
    }
    out
}

/// A map key on the stack, 8-byte aligned so its address field (at offset 0 or 4) can be
/// written with four word stores; otherwise LLVM writes the 16 bytes one by one.
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);

const _: () = assert!(core::mem::offset_of!(lb_common::ServiceKey, addr_be) % 4 == 0);
const _: () = assert!(core::mem::offset_of!(lb_common::PersistKey, addr_be) % 4 == 0);

/// Write `a` into `dst`, which must be 4-byte aligned (an address field of an [`Aligned`]
/// key: checked by the assertions above).
#[inline(always)]
pub fn store_addr(dst: &mut [u8; 16], a: &Addr) {
    let p = dst.as_mut_ptr().cast::<Addr>();
    // SAFETY: `dst` is 16 writable bytes; callers pass a field at a multiple of 4 inside an
    // 8-aligned `Aligned` key, so `p` is aligned for `[u32; 4]`.
    unsafe { p.write(*a) }
}

/// What a packet is to the balancer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP or UDP packet of the flow.
    Packet,
    /// The first fragment of an IPv4 datagram (offset 0, more to come): its ports are
    /// recorded for the later ones.
    FirstFragment,
    /// A later IPv4 fragment: no ports until they are found in the fragment table.
    LaterFragment,
    /// An ICMP/ICMPv6 error quoting a packet of the flow; the flow is given client-first,
    /// as the client's own packets would give it.
    IcmpError,
}

/// What the balancer needs from a packet: the client-to-VIP flow. Ports are in wire order.
pub struct Flow {
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub is_v6: bool,
    /// TCP flags (0 for UDP and for ICMP errors).
    pub tcp_flags: u8,
    pub kind: Kind,
    /// IPv4 identification (wire order), for fragments.
    pub ip_id_be: u16,
}

impl Flow {
    /// A packet that may start a binding: UDP, or a TCP SYN without ACK (Katran's rule: a
    /// packet of a connection that was never seen must not create state, or spoofed
    /// mid-connection packets would evict real clients).
    #[inline(always)]
    pub fn may_bind(&self) -> bool {
        self.is_own_packet() && (self.proto != PROTO_TCP || self.is_tcp_open())
    }

    /// A packet of the flow itself (not an ICMP error about it, not a later fragment): only
    /// such packets may write state.
    #[inline(always)]
    pub fn is_own_packet(&self) -> bool {
        self.kind == Kind::Packet || self.kind == Kind::FirstFragment
    }

    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline(always)]
    pub fn is_tcp_open(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Pointer to a `T` at `off` bytes into the frame, if the whole `T` is inside it. This is the
/// check the verifier needs before any packet access.
///
/// The end of the frame is read with a volatile load: otherwise LLVM may prove this check
/// redundant from earlier arithmetic on the IP length fields (which the verifier cannot
/// follow) and drop it, and the program would be rejected.
///
/// Header types here have at most 2-byte alignment: frames start 2-byte aligned and every
/// header offset (14, 18, IHL*4, 40) is even, so 16-bit loads are aligned.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    // SAFETY: `ctx.ctx` points to the kernel's xdp_md for this run.
    let end = unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) } as usize;
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// IPv4-mapped form of an IPv4 address given as two 16-bit words.
#[inline(always)]
fn v4_mapped_words(a: &[u16; 2]) -> Addr {
    v4_mapped(word(a[0], a[1]))
}

/// IPv4-mapped form of an IPv4 address given as its word (the last word of the mapped form).
#[inline(always)]
pub fn v4_mapped(w: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD2, w]
}

/// IPv6 address given as eight 16-bit words.
#[inline(always)]
fn v6_words(a: &[u16; 8]) -> Addr {
    [
        word(a[0], a[1]),
        word(a[2], a[3]),
        word(a[4], a[5]),
        word(a[6], a[7]),
    ]
}

/// Parse up to the L4 ports. `Err` carries the pass reason.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Flow, u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reason::MALFORMED_ETH)?;
    // SAFETY: `ptr_at` checked that the header is inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = ETH_LEN;
    // Untagged IPv4, the common case, is tested first and goes straight to `parse_v4`.
    if ether_type != ETH_P_IP {
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            let vlan: *const VlanHdr = ptr_at(ctx, ETH_LEN).ok_or(reason::MALFORMED_ETH)?;
            // SAFETY: checked by `ptr_at`.
            ether_type = unsafe { (*vlan).ether_type };
            if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
                return Err(reason::PASS_VLAN_STACK);
            }
            l3 = ETH_LEN + VLAN_LEN;
        }
        if ether_type == ETH_P_IPV6 {
            return parse_v6(ctx, l3);
        }
        if ether_type != ETH_P_IP {
            return Err(reason::PASS_NOT_IP);
        }
    }
    parse_v4(ctx, l3)
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Result<Flow, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(reason::MALFORMED_IPV4)?;
    // SAFETY: the fixed 20-byte header is inside the frame (checked by `ptr_at`).
    let ip = unsafe { &*ip };
    let vihl = ip.version_ihl;
    if vihl >> 4 != 4 {
        return Err(reason::MALFORMED_IPV4);
    }
    // IHL in bytes: 20..=60 after the check below, so the L4 offset stays bounded.
    let hlen = ((vihl & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes(ip.tot_len) as usize;
    // The options fit in the datagram, and the datagram fits in the frame (trailing padding
    // after it is allowed).
    if hlen < IPV4_MIN_LEN || tot < hlen || ctx.data() + l3 + tot > ctx.data_end() {
        return Err(reason::MALFORMED_IPV4);
    }
    let frag = u16::from_be_bytes(ip.frag_off);
    let proto = ip.proto;
    let mut flow = Flow {
        src: v4_mapped_words(&ip.src),
        dst: v4_mapped_words(&ip.dst),
        sport_be: 0,
        dport_be: 0,
        proto,
        is_v6: false,
        tcp_flags: 0,
        kind: Kind::Packet,
        // Read for fragments only (the fragment table's key).
        ip_id_be: 0,
    };
    if frag & IPV4_FRAG_OFFSET_MASK != 0 {
        // No ports here: the caller looks them up by datagram.
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Err(reason::PASS_FRAGMENT);
        }
        flow.kind = Kind::LaterFragment;
        flow.ip_id_be = u16::from_ne_bytes(ip.id);
        return Ok(flow);
    }
    if proto == PROTO_ICMP {
        return icmp_error_v4(ctx, l3 + hlen, tot - hlen);
    }
    let (sport_be, dport_be, tcp_flags) = ports(ctx, proto, l3 + hlen, tot - hlen)?;
    flow.sport_be = sport_be;
    flow.dport_be = dport_be;
    flow.tcp_flags = tcp_flags;
    if frag & IPV4_MF != 0 {
        flow.kind = Kind::FirstFragment;
        flow.ip_id_be = u16::from_ne_bytes(ip.id);
    }
    Ok(flow)
}

/// The client-to-VIP flow quoted in an ICMP error at `l4` (`room` bytes of ICMP message).
/// Errors are destination unreachable (3, which carries "fragmentation needed"), time
/// exceeded (11) and parameter problem (12); other ICMP (echo, ...) is the host's.
#[inline(always)]
fn icmp_error_v4(ctx: &XdpContext, l4: usize, room: usize) -> Result<Flow, u32> {
    let icmp: *const IcmpHdr = ptr_at(ctx, l4).ok_or(reason::MALFORMED_L4)?;
    // SAFETY: checked by `ptr_at`.
    let kind = unsafe { (*icmp).kind };
    if kind != 3 && kind != 11 && kind != 12 {
        return Err(reason::PASS_NOT_TCP_UDP);
    }
    let inner_l3 = l4 + ICMP_LEN;
    let ip: *const Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(reason::MALFORMED_ICMP)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let vihl = ip.version_ihl;
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || hlen < IPV4_MIN_LEN {
        return Err(reason::MALFORMED_ICMP);
    }
    // A quoted later fragment has no ports; a quoted non-TCP/UDP packet is not a VIP flow.
    if u16::from_be_bytes(ip.frag_off) & IPV4_FRAG_OFFSET_MASK != 0
        || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP)
    {
        return Err(reason::PASS_NOT_VIP);
    }
    let ports: *const PortsHdr = ptr_at(ctx, inner_l3 + hlen).ok_or(reason::MALFORMED_ICMP)?;
    if room < ICMP_LEN + hlen + size_of::<PortsHdr>() {
        return Err(reason::MALFORMED_ICMP);
    }
    // SAFETY: checked by `ptr_at`.
    let (qs, qd) = unsafe { ((*ports).sport, (*ports).dport) };
    // The quoted packet went from the VIP (a DSR backend's reply) to the client.
    Ok(Flow {
        src: v4_mapped_words(&ip.dst),
        dst: v4_mapped_words(&ip.src),
        sport_be: qd,
        dport_be: qs,
        proto: ip.proto,
        is_v6: false,
        tcp_flags: 0,
        kind: Kind::IcmpError,
        ip_id_be: 0,
    })
}

/// IPv6 extension headers that may come before the transport header.
#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Result<Flow, u32> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(reason::MALFORMED_IPV6)?;
    // SAFETY: the 40-byte header is inside the frame (checked by `ptr_at`).
    let ip = unsafe { &*ip };
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    if ip.version_class_flow[0] >> 4 != 6 || ctx.data() + l3 + IPV6_LEN + payload > ctx.data_end() {
        return Err(reason::MALFORMED_IPV6);
    }
    // An IPv4-mapped destination never appears on the wire (RFC 4291 2.5.5.2); without this
    // it would match the IPv4 service with the same key.
    let dst = v6_words(&ip.dst);
    if is_v4_mapped(&dst) {
        return Err(reason::PASS_NOT_VIP);
    }
    let proto = ip.next_header;
    if proto == PROTO_ICMPV6 {
        return icmp_error_v6(ctx, l3 + IPV6_LEN, payload);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(if is_ipv6_ext(proto) {
            reason::PASS_IPV6_EXT
        } else {
            reason::PASS_NOT_TCP_UDP
        });
    }
    let (sport_be, dport_be, tcp_flags) = ports(ctx, proto, l3 + IPV6_LEN, payload)?;
    Ok(Flow {
        src: v6_words(&ip.src),
        dst,
        sport_be,
        dport_be,
        proto,
        is_v6: true,
        tcp_flags,
        kind: Kind::Packet,
        ip_id_be: 0,
    })
}

#[inline(always)]
fn is_v4_mapped(a: &Addr) -> bool {
    a[0] | a[1] == 0 && a[2] == V4_MAPPED_WORD2
}

/// As [`icmp_error_v4`] for ICMPv6: destination unreachable (1), packet too big (2), time
/// exceeded (3), parameter problem (4); informational messages (echo, neighbour discovery)
/// are the host's.
#[inline(always)]
fn icmp_error_v6(ctx: &XdpContext, l4: usize, room: usize) -> Result<Flow, u32> {
    let icmp: *const IcmpHdr = ptr_at(ctx, l4).ok_or(reason::MALFORMED_L4)?;
    // SAFETY: checked by `ptr_at`.
    let kind = unsafe { (*icmp).kind };
    if !(1..=4).contains(&kind) {
        return Err(reason::PASS_NOT_TCP_UDP);
    }
    let inner_l3 = l4 + ICMP_LEN;
    let ip: *const Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(reason::MALFORMED_ICMP)?;
    // SAFETY: checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(reason::MALFORMED_ICMP);
    }
    // Quoted extension headers are not followed: such flows are not balanced either.
    if ip.next_header != PROTO_TCP && ip.next_header != PROTO_UDP {
        return Err(reason::PASS_NOT_VIP);
    }
    let ports: *const PortsHdr = ptr_at(ctx, inner_l3 + IPV6_LEN).ok_or(reason::MALFORMED_ICMP)?;
    if room < ICMP_LEN + IPV6_LEN + size_of::<PortsHdr>() {
        return Err(reason::MALFORMED_ICMP);
    }
    let vip = v6_words(&ip.src);
    if is_v4_mapped(&vip) {
        return Err(reason::PASS_NOT_VIP);
    }
    // SAFETY: checked by `ptr_at`.
    let (qs, qd) = unsafe { ((*ports).sport, (*ports).dport) };
    Ok(Flow {
        src: v6_words(&ip.dst),
        dst: vip,
        sport_be: qd,
        dport_be: qs,
        proto: ip.next_header,
        is_v6: true,
        tcp_flags: 0,
        kind: Kind::IcmpError,
        ip_id_be: 0,
    })
}

/// Ports (and TCP flags) of the TCP or UDP header at `l4`; `room` is what the IP header says
/// follows it. The whole minimal header must be inside the datagram and the frame.
#[inline(always)]
fn ports(ctx: &XdpContext, proto: u8, l4: usize, room: usize) -> Result<(u16, u16, u8), u32> {
    if proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(reason::MALFORMED_L4)?;
        if room < TCP_MIN_LEN {
            return Err(reason::MALFORMED_L4);
        }
        // SAFETY: checked by `ptr_at`.
        Ok(unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).flags) })
    } else if proto == PROTO_UDP {
        let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(reason::MALFORMED_L4)?;
        if room < UDP_LEN {
            return Err(reason::MALFORMED_L4);
        }
        // SAFETY: checked by `ptr_at`.
        Ok(unsafe { ((*udp).sport, (*udp).dport, 0) })
    } else {
        Err(reason::PASS_NOT_TCP_UDP)
    }
}
