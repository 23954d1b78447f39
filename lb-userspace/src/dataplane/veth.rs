//! Choosing the XDP mode on a veth.
//!
//! A frame sent with XDP_TX from a veth in native (driver) mode is delivered straight into
//! its peer's XDP path: when the peer has no native XDP program, the kernel drops it
//! (`rx_queue_0_xdp_tx_errors` rises) while tether counts it forwarded. Generic mode goes
//! through the stack and always works, with TSO intact (on veth it is also the faster mode:
//! iperf3 through the VIP 16.5 Gbit/s generic against 3.4 native with the peer prepared).
//! So `auto` picks native on a veth only when the peer, in this network namespace, has a
//! native XDP program; a peer in another namespace cannot be inspected and counts as not
//! ready. The interface kind comes from netlink (`IFLA_INFO_KIND`), never from its name.

use std::process::Command;

use crate::config::XdpMode;

/// What the attach interface's peer can take, as far as this namespace can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Not a veth: native mode is the driver's business.
    NotVeth,
    /// A veth whose peer `name` is in this namespace; `native_xdp`: it has a native program.
    Local { name: String, native_xdp: bool },
    /// A veth whose peer is in another network namespace (`link_netnsid`).
    Remote { netnsid: i64 },
    /// A veth whose peer could not be read.
    Unknown { reason: String },
}

/// The mode to attach in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Native, falling back to generic with a warning if the driver refuses (`auto` on
    /// other interfaces).
    NativeElseGeneric,
    Native,
    /// Generic; `why` is logged.
    Generic {
        why: Option<String>,
    },
    /// Refused: the message says what to do.
    Refuse(String),
}

fn link_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("ip")
        .args(["-d", "-j", "link", "show"])
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parsing ip -j: {e}"))?;
    v.get(0)
        .cloned()
        .ok_or_else(|| "ip -j printed no link".to_string())
}

/// Read the facts for `iface` (netlink through `ip -d -j link`).
pub fn inspect(iface: &str) -> Peer {
    let link = match link_json(&["dev", iface]) {
        Ok(l) => l,
        Err(reason) => return Peer::Unknown { reason },
    };
    classify(&link, |peer| {
        link_json(&["dev", peer]).map(|p| native_xdp_attached(&p))
    })
}

/// Whether `ip -d -j link` shows a program attached in driver mode (`xdp.mode` 1, or a
/// multi-attachment with a driver program).
fn native_xdp_attached(link: &serde_json::Value) -> bool {
    let xdp = &link["xdp"];
    xdp["mode"].as_u64() == Some(1)
        || xdp["attached"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["mode"].as_u64() == Some(1)))
}

/// [`inspect`] on already-read JSON; `peer_native` reads the peer by name.
fn classify(
    link: &serde_json::Value,
    peer_native: impl FnOnce(&str) -> Result<bool, String>,
) -> Peer {
    if link["linkinfo"]["info_kind"].as_str() != Some("veth") {
        return Peer::NotVeth;
    }
    if let Some(netnsid) = link["link_netnsid"].as_i64() {
        return Peer::Remote { netnsid };
    }
    let Some(name) = link["link"].as_str() else {
        return Peer::Unknown {
            reason: "its peer is not listed".into(),
        };
    };
    match peer_native(name) {
        Ok(native_xdp) => Peer::Local {
            name: name.into(),
            native_xdp,
        },
        Err(reason) => Peer::Unknown {
            reason: format!("reading peer {name}: {reason}"),
        },
    }
}

/// The mode for `mode` on `iface` given its peer.
pub fn decide(mode: XdpMode, iface: &str, peer: &Peer) -> Decision {
    let not_ready = match peer {
        Peer::NotVeth => None,
        Peer::Local {
            native_xdp: true, ..
        } => None,
        Peer::Local {
            name,
            native_xdp: false,
        } => Some(format!(
            "its peer {name} has no native XDP program to receive XDP_TX frames"
        )),
        Peer::Remote { netnsid } => Some(format!(
            "its peer is in another network namespace (netnsid {netnsid}) where tether cannot check that it has a native XDP program to receive XDP_TX frames"
        )),
        Peer::Unknown { reason } => Some(format!(
            "its peer cannot be inspected ({reason}), so it may not receive XDP_TX frames"
        )),
    };
    match (mode, not_ready) {
        (XdpMode::Generic, _) => Decision::Generic { why: None },
        (XdpMode::Native, None) => Decision::Native,
        (XdpMode::Native, Some(why)) => Decision::Refuse(format!(
            "xdp_mode \"native\" on veth {iface} would drop every forwarded frame: {why}. \
             Use \"xdp_mode\": \"auto\" or \"generic\" (generic is also the faster mode on veth), \
             or attach a native XDP program to the peer (and turn its tx checksum offload off)"
        )),
        (XdpMode::Auto, None) if matches!(peer, Peer::NotVeth) => Decision::NativeElseGeneric,
        (XdpMode::Auto, None) => Decision::Native,
        (XdpMode::Auto, Some(why)) => Decision::Generic {
            why: Some(format!(
                "{iface} is a veth and {why}: using generic (skb) mode, which forwards"
            )),
        },
    }
}

#[cfg(test)]
mod tests;
