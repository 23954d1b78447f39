//! Counter layouts and verdict reasons.

use core::mem::size_of;

/// Per-CPU counters of one service or one backend (`TETHER_SVC_STAT`, `TETHER_BE_STAT`).
/// Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (whole frames).
    pub bytes: u64,
    /// Packets whose client had a live persistence entry.
    pub persist_hits: u64,
    /// New persistence entries (or, without persistence, nothing: flows are not tracked).
    pub new_assignments: u64,
    /// Entries found older than the timeout and re-chosen.
    pub expired: u64,
    /// Entries moved because their backend was down (policy `immediate`).
    pub reassigned_down: u64,
    /// Packets dropped because the pool had no usable backend.
    pub no_backend: u64,
    /// Packets of a service without persistence that followed their flow's entry in the
    /// connection table (`TETHER_FLOWS`) rather than the Maglev table.
    pub flow_hits: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 64);

impl TrafficCounters {
    /// Sum of per-CPU values.
    pub fn sum<'a>(it: impl IntoIterator<Item = &'a TrafficCounters>) -> TrafficCounters {
        let mut t = TrafficCounters::default();
        for c in it {
            t.packets += c.packets;
            t.bytes += c.bytes;
            t.persist_hits += c.persist_hits;
            t.new_assignments += c.new_assignments;
            t.expired += c.expired;
            t.reassigned_down += c.reassigned_down;
            t.no_backend += c.no_backend;
            t.flow_hits += c.flow_hits;
        }
        t
    }
}

/// Why a packet got its verdict; index into `TETHER_REASONS`. Every packet the XDP program
/// sees increments exactly one of these.
pub mod reason {
    /// Forwarded to a backend with XDP_TX.
    pub const TX: u32 = 0;
    /// Forwarded to a backend through the devmap.
    pub const REDIRECT: u32 = 1;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    pub const PASS_NOT_IP: u32 = 2;
    /// Destination is not a virtual service: passed.
    pub const PASS_NOT_VIP: u32 = 3;
    /// IP protocol is neither TCP nor UDP: passed.
    pub const PASS_NOT_TCP_UDP: u32 = 4;
    /// Virtual service handled by the L7 proxy: passed.
    pub const PASS_L7: u32 = 5;
    /// IPv4 fragment other than the first (no ports): passed.
    pub const PASS_FRAGMENT: u32 = 6;
    /// IPv6 with an extension header before L4: passed.
    pub const PASS_IPV6_EXT: u32 = 7;
    /// Truncated Ethernet or VLAN header: passed.
    pub const MALFORMED_ETH: u32 = 8;
    /// Truncated IPv4 header, IHL < 5, or a header past the frame: passed.
    pub const MALFORMED_IPV4: u32 = 9;
    /// Truncated IPv6 header: passed.
    pub const MALFORMED_IPV6: u32 = 10;
    /// TCP/UDP header truncated: passed.
    pub const MALFORMED_L4: u32 = 11;
    /// VIP hit but the pool has no usable backend: dropped.
    pub const DROP_NO_BACKEND: u32 = 12;
    /// Chosen backend slot is not configured or has no egress: dropped.
    pub const DROP_BAD_BACKEND: u32 = 13;
    /// A map that must hold an entry did not (inconsistent state): aborted.
    pub const ABORTED: u32 = 14;
    /// More than one VLAN tag: passed.
    pub const PASS_VLAN_STACK: u32 = 15;
    /// An ICMP or ICMPv6 error about a VIP flow (e.g. "fragmentation needed", "packet too
    /// big"), sent to that flow's backend so path MTU discovery works with DSR.
    pub const FWD_ICMP_ERROR: u32 = 16;
    /// A later IPv4 fragment sent where its first fragment went.
    pub const FWD_FRAGMENT: u32 = 17;
    /// An ICMP error for a VIP whose quoted header is truncated or inconsistent: passed.
    pub const MALFORMED_ICMP: u32 = 18;
    pub const COUNT: u32 = 19;
    /// Slots in `TETHER_REASONS`: room for reasons added later without resizing the pinned map.
    pub const SLOTS: u32 = 32;

    /// Names for userspace (metrics labels, `tether status`).
    pub const NAMES: [&str; COUNT as usize] = [
        "tx",
        "redirect",
        "pass_not_ip",
        "pass_not_vip",
        "pass_not_tcp_udp",
        "pass_l7",
        "pass_fragment",
        "pass_ipv6_ext",
        "malformed_eth",
        "malformed_ipv4",
        "malformed_ipv6",
        "malformed_l4",
        "drop_no_backend",
        "drop_bad_backend",
        "aborted",
        "pass_vlan_stack",
        "fwd_icmp_error",
        "fwd_fragment",
        "malformed_icmp",
    ];
}

/// Events that are not verdicts; index into `TETHER_EVENTS` (per CPU).
pub mod event {
    /// Bindings created for a key that was not in the table (each may evict another entry
    /// once the CPU's share of the table is full).
    pub const BINDING_CREATED: u32 = 0;
    /// New clients not stored because of the per-CPU rate cap.
    pub const BINDING_RATE_LIMITED: u32 = 1;
    /// TCP packets without SYN and without a live binding: forwarded by Maglev, not stored.
    pub const NON_SYN_UNBOUND: u32 = 2;
    /// Bindings deleted by the daemon (flush, removed services and backends); written by
    /// userspace into CPU 0's slot so evictions can be estimated from the other counts.
    pub const USER_DELETED: u32 = 3;
    /// First fragments whose ports were recorded for the later fragments.
    pub const FRAG_TRACKED: u32 = 4;
    /// Bindings not output to `MAP_BINDINGS` because the ring buffer was full (the daemon's
    /// mirror drains it too slowly): those bindings reach the other instances only with the
    /// next sweep of the table.
    pub const BINDING_EVENT_DROPPED: u32 = 5;
    pub const COUNT: u32 = 6;
    /// Slots in `TETHER_EVENTS` (room to grow without resizing the pinned map).
    pub const SLOTS: u32 = 16;

    pub const NAMES: [&str; COUNT as usize] = [
        "binding_created",
        "binding_rate_limited",
        "non_syn_unbound",
        "user_deleted",
        "frag_tracked",
        "binding_event_dropped",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, only u64 fields.
    unsafe impl aya::Pod for super::TrafficCounters {}
}
