//! A small packet builder for BPF_PROG_TEST_RUN fixtures and benchmarks.
//!
//! Builds Ethernet frames (optionally with 802.1Q/802.1ad tags) carrying IPv4 (options and
//! fragment fields) or IPv6, and TCP, UDP or any raw L4 protocol, with correct IPv4 header and
//! TCP/UDP checksums. A built [`Frame`] knows where each layer starts, so tests can truncate
//! or corrupt it at a layer boundary.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use tether_tests::packet::PacketBuilder;
//!
//! let f = PacketBuilder::tcp4(Ipv4Addr::new(10, 0, 0, 1), 40000, Ipv4Addr::new(10, 0, 0, 100), 80)
//!     .vlan(7)
//!     .payload(b"hello")
//!     .build();
//! assert_eq!(f.l3, 18);
//! assert_eq!(f.l4, 38);
//! assert_eq!(f.bytes.len(), 38 + 20 + 5);
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 "more fragments" flag in the flags/fragment-offset field.
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 "don't fragment" flag.
pub const IPV4_DF: u16 = 0x4000;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Default addresses of the frame: a client sending to the balancer.
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];

#[derive(Clone, Debug)]
enum L3 {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        tos: u8,
        id: u16,
        /// Flags and fragment offset (in 8-byte units), host order.
        frag: u16,
        options: Vec<u8>,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        flow_label: u32,
    },
    /// Any other ethertype with an opaque body.
    Other { ether_type: u16, body: Vec<u8> },
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Raw protocol number and header bytes (ICMP, an IPv6 extension header, ...).
    Raw {
        proto: u8,
        header: Vec<u8>,
    },
}

/// Builder for one frame. Start with [`PacketBuilder::tcp4`], [`udp4`](Self::udp4),
/// [`tcp6`](Self::tcp6), [`udp6`](Self::udp6) or [`ethertype`](Self::ethertype).
#[derive(Clone, Debug)]
pub struct PacketBuilder {
    dst_mac: Mac,
    src_mac: Mac,
    /// (TPID, TCI), outermost first.
    vlans: Vec<(u16, u16)>,
    l3: L3,
    l4: L4,
    payload: Vec<u8>,
}

/// A built frame and where its layers start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Offset of the IP header (after Ethernet and VLAN tags).
    pub l3: usize,
    /// Offset of the TCP/UDP (or raw L4) header.
    pub l4: usize,
    /// Offset of the payload (end of the L4 header).
    pub payload: usize,
}

impl PacketBuilder {
    fn new(l3: L3, l4: L4) -> Self {
        Self {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlans: Vec::new(),
            l3,
            l4,
            payload: Vec::new(),
        }
    }

    fn v4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self::new(
            L3::V4 {
                src,
                dst,
                ttl: 64,
                tos: 0,
                id: 0x1234,
                frag: IPV4_DF,
                options: Vec::new(),
            },
            l4,
        )
    }

    fn v6(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Self {
        Self::new(
            L3::V6 {
                src,
                dst,
                hop_limit: 64,
                flow_label: 0,
            },
            l4,
        )
    }

    fn tcp(sport: u16, dport: u16) -> L4 {
        L4::Tcp {
            sport,
            dport,
            seq: 1,
            ack: 0,
            flags: TCP_SYN,
            window: 65535,
        }
    }

    /// IPv4 TCP SYN.
    pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::v4(src, dst, Self::tcp(sport, dport))
    }

    /// IPv4 UDP.
    pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::v4(src, dst, L4::Udp { sport, dport })
    }

    /// IPv4 with another protocol; `header` is the L4 header (e.g. an ICMP echo).
    pub fn raw4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, header: &[u8]) -> Self {
        Self::v4(
            src,
            dst,
            L4::Raw {
                proto,
                header: header.to_vec(),
            },
        )
    }

    /// IPv6 TCP SYN.
    pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self::v6(src, dst, Self::tcp(sport, dport))
    }

    /// IPv6 UDP.
    pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self::v6(src, dst, L4::Udp { sport, dport })
    }

    /// IPv6 whose next header is `next_header` with `header` as its bytes (an extension
    /// header, ICMPv6, ...).
    pub fn raw6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, header: &[u8]) -> Self {
        Self::v6(
            src,
            dst,
            L4::Raw {
                proto: next_header,
                header: header.to_vec(),
            },
        )
    }

    /// A frame of another ethertype (ARP, LLDP, ...) with `body` after the Ethernet header.
    pub fn ethertype(ether_type: u16, body: &[u8]) -> Self {
        Self::new(
            L3::Other {
                ether_type,
                body: body.to_vec(),
            },
            L4::Raw {
                proto: 0,
                header: Vec::new(),
            },
        )
    }

    /// Source and destination MAC.
    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Push an 802.1Q tag with VLAN id `vid` (after any tag already pushed).
    pub fn vlan(self, vid: u16) -> Self {
        self.vlan_tag(ETH_P_8021Q, vid & 0x0fff)
    }

    /// Push a tag with any TPID (0x8100, 0x88a8) and TCI.
    pub fn vlan_tag(mut self, tpid: u16, tci: u16) -> Self {
        self.vlans.push((tpid, tci));
        self
    }

    /// IPv4 options (padded with End-of-Options to a multiple of 4 bytes; at most 40).
    pub fn ipv4_options(mut self, opts: &[u8]) -> Self {
        assert!(opts.len() <= 40, "IPv4 options are at most 40 bytes");
        if let L3::V4 { options, .. } = &mut self.l3 {
            options.clear();
            options.extend_from_slice(opts);
            while options.len() % 4 != 0 {
                options.push(0);
            }
        } else {
            panic!("ipv4_options on a non-IPv4 packet");
        }
        self
    }

    /// IPv4 fragment fields: `more` sets MF, `offset` is in 8-byte units. Clears DF.
    pub fn fragment(mut self, more: bool, offset: u16) -> Self {
        if let L3::V4 { frag, .. } = &mut self.l3 {
            *frag = (offset & 0x1fff) | if more { IPV4_MF } else { 0 };
        } else {
            panic!("fragment on a non-IPv4 packet");
        }
        self
    }

    /// IPv4 TTL or IPv6 hop limit.
    pub fn ttl(mut self, t: u8) -> Self {
        match &mut self.l3 {
            L3::V4 { ttl, .. } => *ttl = t,
            L3::V6 { hop_limit, .. } => *hop_limit = t,
            L3::Other { .. } => panic!("ttl on a non-IP packet"),
        }
        self
    }

    /// IPv4 identification.
    pub fn ip_id(mut self, v: u16) -> Self {
        if let L3::V4 { id, .. } = &mut self.l3 {
            *id = v;
        }
        self
    }

    /// IPv6 flow label (the traffic class and IPv4 TOS stay 0).
    pub fn flow_label(mut self, v: u32) -> Self {
        if let L3::V6 { flow_label, .. } = &mut self.l3 {
            *flow_label = v & 0x000f_ffff;
        }
        self
    }

    /// TCP flags, sequence and acknowledgement numbers.
    pub fn tcp_flags(mut self, f: u8, s: u32, a: u32) -> Self {
        if let L4::Tcp {
            flags, seq, ack, ..
        } = &mut self.l4
        {
            *flags = f;
            *seq = s;
            *ack = a;
        } else {
            panic!("tcp_flags on a non-TCP packet");
        }
        self
    }

    /// Payload after the L4 header.
    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// Build the frame with correct lengths and checksums.
    pub fn build(&self) -> Frame {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&self.dst_mac);
        b.extend_from_slice(&self.src_mac);
        for (tpid, tci) in &self.vlans {
            b.extend_from_slice(&tpid.to_be_bytes());
            b.extend_from_slice(&tci.to_be_bytes());
        }
        let ether_type = match &self.l3 {
            L3::V4 { .. } => ETH_P_IP,
            L3::V6 { .. } => ETH_P_IPV6,
            L3::Other { ether_type, .. } => *ether_type,
        };
        b.extend_from_slice(&ether_type.to_be_bytes());
        let l3 = b.len();

        let l4_bytes = self.l4_bytes();
        let l4_hdr_len = l4_bytes.len();
        let mut l4_and_payload = l4_bytes;
        l4_and_payload.extend_from_slice(&self.payload);

        match &self.l3 {
            L3::V4 {
                src,
                dst,
                ttl,
                tos,
                id,
                frag,
                options,
            } => {
                let hlen = 20 + options.len();
                let total = hlen + l4_and_payload.len();
                assert!(total <= 0xffff, "IPv4 datagram too long");
                let mut h = Vec::with_capacity(hlen);
                h.push(0x40 | (hlen / 4) as u8);
                h.push(*tos);
                h.extend_from_slice(&(total as u16).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&frag.to_be_bytes());
                h.push(*ttl);
                h.push(self.proto());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                h.extend_from_slice(options);
                let c = internet_checksum(&h, 0);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                let pseudo = pseudo_v4(*src, *dst, self.proto(), l4_and_payload.len());
                self.fill_l4_checksum(&mut l4_and_payload, &pseudo);
                b.extend_from_slice(&h);
            }
            L3::V6 {
                src,
                dst,
                hop_limit,
                flow_label,
            } => {
                assert!(l4_and_payload.len() <= 0xffff, "IPv6 payload too long");
                let vtf = (6u32 << 28) | flow_label;
                b.extend_from_slice(&vtf.to_be_bytes());
                b.extend_from_slice(&(l4_and_payload.len() as u16).to_be_bytes());
                b.push(self.proto());
                b.push(*hop_limit);
                b.extend_from_slice(&src.octets());
                b.extend_from_slice(&dst.octets());
                let pseudo = pseudo_v6(*src, *dst, self.proto(), l4_and_payload.len());
                self.fill_l4_checksum(&mut l4_and_payload, &pseudo);
            }
            L3::Other { body, .. } => {
                b.extend_from_slice(body);
                let end = b.len();
                return Frame {
                    bytes: b,
                    l3,
                    l4: end,
                    payload: end,
                };
            }
        }
        let l4 = b.len();
        b.extend_from_slice(&l4_and_payload);
        Frame {
            bytes: b,
            l3,
            l4,
            payload: l4 + l4_hdr_len,
        }
    }

    /// Build and return only the bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.build().bytes
    }

    fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
            } => {
                let mut t = Vec::with_capacity(20);
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push(5 << 4); // data offset: 5 words, no options
                t.push(*flags);
                t.extend_from_slice(&window.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                t
            }
            L4::Udp { sport, dport } => {
                let len = (8 + self.payload.len()) as u16;
                let mut u = Vec::with_capacity(8);
                u.extend_from_slice(&sport.to_be_bytes());
                u.extend_from_slice(&dport.to_be_bytes());
                u.extend_from_slice(&len.to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u
            }
            L4::Raw { header, .. } => header.clone(),
        }
    }

    /// Write the TCP or UDP checksum of `seg` (header and payload) given its pseudo-header.
    fn fill_l4_checksum(&self, seg: &mut [u8], pseudo: &[u8]) {
        let at = match self.l4 {
            L4::Tcp { .. } => 16,
            L4::Udp { .. } => 6,
            L4::Raw { .. } => return,
        };
        let mut c = internet_checksum(seg, sum_words(pseudo));
        if c == 0 && matches!(self.l4, L4::Udp { .. }) {
            c = 0xffff; // UDP: 0 means "no checksum"
        }
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p
}

/// One's-complement sum of big-endian 16-bit words (odd trailing byte padded with 0).
fn sum_words(data: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
        s = (s & 0xffff) + (s >> 16);
    }
    if let [b] = chunks.remainder() {
        s += (*b as u32) << 8;
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// Internet checksum (RFC 1071) of `data`, starting from a partial sum `initial` (e.g. a
/// pseudo-header's).
pub fn internet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut s = initial + sum_words(data);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

impl Frame {
    /// The first `len` bytes (all of them if `len` is longer).
    pub fn truncated(&self, len: usize) -> Vec<u8> {
        self.bytes[..len.min(self.bytes.len())].to_vec()
    }

    /// Ethertype of the frame's L3 header.
    fn ether_type(&self) -> u16 {
        u16::from_be_bytes([self.bytes[self.l3 - 2], self.bytes[self.l3 - 1]])
    }

    fn is_v4(&self) -> bool {
        self.ether_type() == ETH_P_IP
    }

    fn is_v6(&self) -> bool {
        self.ether_type() == ETH_P_IPV6
    }

    /// Recompute the IPv4 header checksum (after editing header fields). No-op for IPv6.
    pub fn fix_ipv4_checksum(&mut self) {
        if !self.is_v4() {
            return;
        }
        let ihl = ((self.bytes[self.l3] & 0x0f) as usize * 4).max(20);
        let end = (self.l3 + ihl).min(self.bytes.len());
        if end < self.l3 + 12 {
            return;
        }
        self.bytes[self.l3 + 10] = 0;
        self.bytes[self.l3 + 11] = 0;
        let c = internet_checksum(&self.bytes[self.l3..end], 0);
        self.bytes[self.l3 + 10..self.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }

    /// Set the IP version nibble (IPv4 or IPv6 header).
    pub fn set_ip_version(&mut self, v: u8) -> &mut Self {
        let b = &mut self.bytes[self.l3];
        *b = (*b & 0x0f) | (v << 4);
        self.fix_ipv4_checksum();
        self
    }

    /// Set the IPv4 IHL nibble without moving any bytes.
    pub fn set_ipv4_ihl(&mut self, ihl: u8) -> &mut Self {
        assert!(self.is_v4(), "not IPv4");
        let b = &mut self.bytes[self.l3];
        *b = (*b & 0xf0) | (ihl & 0x0f);
        self.fix_ipv4_checksum();
        self
    }

    /// Set the IPv4 total length (and fix the header checksum).
    pub fn set_ipv4_total_len(&mut self, len: u16) -> &mut Self {
        assert!(self.is_v4(), "not IPv4");
        self.bytes[self.l3 + 2..self.l3 + 4].copy_from_slice(&len.to_be_bytes());
        self.fix_ipv4_checksum();
        self
    }

    /// Set the IPv6 payload length.
    pub fn set_ipv6_payload_len(&mut self, len: u16) -> &mut Self {
        assert!(self.is_v6(), "not IPv6");
        self.bytes[self.l3 + 4..self.l3 + 6].copy_from_slice(&len.to_be_bytes());
        self
    }

    /// Truncate to `len` bytes and make the IP length field agree with what is left, so the
    /// IP header is consistent and only the L4 header is short. `len` must be past the fixed
    /// IP header.
    pub fn truncated_consistent(&self, len: usize) -> Frame {
        let mut f = self.clone();
        f.bytes.truncate(len);
        if f.is_v4() {
            assert!(len >= f.l3 + 20, "cut inside the IPv4 header");
            f.set_ipv4_total_len((len - f.l3) as u16);
        } else if f.is_v6() {
            assert!(len >= f.l3 + 40, "cut inside the IPv6 header");
            f.set_ipv6_payload_len((len - f.l3 - 40) as u16);
        }
        f
    }

    /// Flip all bits of the byte at `off`.
    pub fn corrupt_byte(&mut self, off: usize) -> &mut Self {
        self.bytes[off] ^= 0xff;
        self
    }

    /// Make the IPv4 header checksum wrong.
    pub fn corrupt_ipv4_checksum(&mut self) -> &mut Self {
        assert!(self.is_v4(), "not IPv4");
        self.bytes[self.l3 + 10] ^= 0x5a;
        self
    }

    /// Pad the frame with zeros to `len` bytes (Ethernet's 60-byte minimum, for example),
    /// leaving the IP length fields as they are.
    pub fn padded(&self, len: usize) -> Frame {
        let mut f = self.clone();
        if f.bytes.len() < len {
            f.bytes.resize(len, 0);
        }
        f
    }

    /// Whether the IPv4 header checksum is right (true for non-IPv4 frames).
    pub fn ipv4_checksum_ok(&self) -> bool {
        if !self.is_v4() {
            return true;
        }
        // As in `fix_ipv4_checksum`: at least the fixed header, at most what is there.
        let ihl = ((self.bytes[self.l3] & 0x0f) as usize * 4).max(20);
        let end = (self.l3 + ihl).min(self.bytes.len());
        internet_checksum(&self.bytes[self.l3..end], 0) == 0
    }

    /// Whether the TCP/UDP checksum is right (true for other protocols).
    pub fn l4_checksum_ok(&self) -> bool {
        let seg_end;
        let pseudo;
        let proto;
        if self.is_v4() {
            let h = &self.bytes[self.l3..];
            proto = h[9];
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            seg_end = self.l3 + total;
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            pseudo = pseudo_v4(src, dst, proto, total.saturating_sub(self.l4 - self.l3));
        } else if self.is_v6() {
            let h = &self.bytes[self.l3..];
            proto = h[6];
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            seg_end = self.l3 + 40 + plen;
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap());
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap());
            pseudo = pseudo_v6(src, dst, proto, plen);
        } else {
            return true;
        }
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return true;
        }
        let seg = &self.bytes[self.l4..seg_end];
        internet_checksum(seg, sum_words(&pseudo)) == 0
    }

    /// The frame with other MAC addresses (what the balancer's rewrite should produce).
    pub fn with_macs(&self, src: Mac, dst: Mac) -> Frame {
        let mut f = self.clone();
        f.bytes[0..6].copy_from_slice(&dst);
        f.bytes[6..12].copy_from_slice(&src);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

    #[test]
    fn rfc1071_style_header_checksum() {
        // A well-known IPv4 header (checksum field zeroed); its checksum is 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h, 0), 0xb861);
    }

    #[test]
    fn layouts_and_checksums() {
        let cases = [
            (
                PacketBuilder::tcp4(A4, 1, B4, 2).payload(b"abc").build(),
                14,
                34,
                54,
            ),
            (
                PacketBuilder::udp4(A4, 1, B4, 2).payload(b"abcd").build(),
                14,
                34,
                42,
            ),
            (
                PacketBuilder::tcp6(A6, 1, B6, 2).payload(b"x").build(),
                14,
                54,
                74,
            ),
            (
                PacketBuilder::udp6(A6, 1, B6, 2).vlan(5).build(),
                18,
                58,
                66,
            ),
            (
                PacketBuilder::tcp4(A4, 1, B4, 2)
                    .vlan_tag(ETH_P_8021AD, 1)
                    .vlan(2)
                    .ipv4_options(&[1, 1, 1])
                    .payload(b"odd")
                    .build(),
                22,
                46,
                66,
            ),
        ];
        for (f, l3, l4, payload) in cases {
            assert_eq!((f.l3, f.l4, f.payload), (l3, l4, payload), "{f:?}");
            assert!(f.ipv4_checksum_ok(), "ip checksum {f:?}");
            assert!(f.l4_checksum_ok(), "l4 checksum {f:?}");
        }
    }

    #[test]
    fn fields_on_the_wire() {
        let f = PacketBuilder::tcp4(A4, 0x1234, B4, 80)
            .fragment(true, 3)
            .ttl(9)
            .build();
        let b = &f.bytes;
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!(b[14], 0x45);
        assert_eq!(u16::from_be_bytes([b[16], b[17]]) as usize, b.len() - 14);
        assert_eq!(u16::from_be_bytes([b[20], b[21]]), IPV4_MF | 3);
        assert_eq!((b[22], b[23]), (9, IPPROTO_TCP));
        assert_eq!(&b[26..30], &A4.octets());
        assert_eq!(&b[34..38], &[0x12, 0x34, 0, 80]);
        let v = PacketBuilder::udp6(A6, 1, B6, 2).vlan(0x123).build();
        assert_eq!(&v.bytes[12..18], &[0x81, 0x00, 0x01, 0x23, 0x86, 0xdd]);
        assert_eq!(v.bytes[18] >> 4, 6);
    }

    #[test]
    fn edits_keep_or_break_checksums_as_asked() {
        let f = PacketBuilder::tcp4(A4, 1, B4, 2).payload(b"hello").build();
        let t = f.truncated_consistent(f.l4 + 10);
        assert_eq!(t.bytes.len(), f.l4 + 10);
        assert_eq!(u16::from_be_bytes([t.bytes[16], t.bytes[17]]), 30);
        assert!(t.ipv4_checksum_ok());
        let mut g = f.clone();
        g.set_ipv4_ihl(4);
        assert!(g.ipv4_checksum_ok());
        let mut g = f.clone();
        g.corrupt_ipv4_checksum();
        assert!(!g.ipv4_checksum_ok());
        assert_eq!(f.truncated(3), f.bytes[..3].to_vec());
        assert_eq!(f.padded(100).bytes.len(), 100);
        let m = f.with_macs([1; 6], [2; 6]);
        assert_eq!(&m.bytes[..12], &[2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1]);
        assert_eq!(&m.bytes[12..], &f.bytes[12..]);
        let e = PacketBuilder::ethertype(ETH_P_ARP, &[1, 2]).build();
        assert_eq!(e.bytes.len(), 16);
    }
}
