use serde_json::json;

use super::*;

fn no_peer_lookup(_: &str) -> Result<bool, String> {
    panic!("the peer must not be looked up")
}

#[test]
fn classify_from_netlink_json() {
    // A NIC (a veth by name only: the kind decides, not the name).
    let nic = json!({"ifname": "veth0", "linkinfo": null});
    assert_eq!(classify(&nic, no_peer_lookup), Peer::NotVeth);
    let bridge = json!({"ifname": "br0", "linkinfo": {"info_kind": "bridge"}});
    assert_eq!(classify(&bridge, no_peer_lookup), Peer::NotVeth);

    let remote = json!({"ifname": "eth0", "link_index": 7, "link_netnsid": 0,
                        "linkinfo": {"info_kind": "veth"}});
    assert_eq!(
        classify(&remote, no_peer_lookup),
        Peer::Remote { netnsid: 0 }
    );

    let local = json!({"ifname": "va", "link": "vb", "linkinfo": {"info_kind": "veth"}});
    assert_eq!(
        classify(&local, |p| {
            assert_eq!(p, "vb");
            Ok(false)
        }),
        Peer::Local {
            name: "vb".into(),
            native_xdp: false
        }
    );
    assert_eq!(
        classify(&local, |_| Err("gone".into())),
        Peer::Unknown {
            reason: "reading peer vb: gone".into()
        }
    );
}

#[test]
fn native_attachment_read_from_json() {
    assert!(native_xdp_attached(&json!({"xdp": {"mode": 1}})));
    assert!(!native_xdp_attached(&json!({"xdp": {"mode": 2}})));
    assert!(!native_xdp_attached(&json!({})));
    assert!(native_xdp_attached(
        &json!({"xdp": {"mode": 4, "attached": [{"mode": 2}, {"mode": 1}]}})
    ));
}

#[test]
fn auto_on_a_veth_picks_a_mode_that_forwards() {
    let remote = Peer::Remote { netnsid: 3 };
    let bare = Peer::Local {
        name: "vb".into(),
        native_xdp: false,
    };
    let ready = Peer::Local {
        name: "vb".into(),
        native_xdp: true,
    };
    let unknown = Peer::Unknown { reason: "x".into() };
    for p in [&remote, &bare, &unknown] {
        match decide(XdpMode::Auto, "eth0", p) {
            Decision::Generic { why: Some(why) } => {
                assert!(why.contains("veth") && why.contains("generic"), "{why}")
            }
            d => panic!("auto with peer {p:?}: {d:?}"),
        }
    }
    assert_eq!(decide(XdpMode::Auto, "eth0", &ready), Decision::Native);
    assert_eq!(
        decide(XdpMode::Auto, "eth0", &Peer::NotVeth),
        Decision::NativeElseGeneric
    );
}

#[test]
fn explicit_native_on_an_unready_veth_is_refused_with_the_fix() {
    let d = decide(XdpMode::Native, "eth0", &Peer::Remote { netnsid: 0 });
    let Decision::Refuse(msg) = d else {
        panic!("native on a veth with an uninspectable peer: {d:?}")
    };
    assert!(msg.contains("\"auto\"") && msg.contains("generic"), "{msg}");
    assert_eq!(
        decide(
            XdpMode::Native,
            "eth0",
            &Peer::Local {
                name: "p".into(),
                native_xdp: true
            }
        ),
        Decision::Native
    );
    assert_eq!(
        decide(XdpMode::Native, "eth0", &Peer::NotVeth),
        Decision::Native
    );
    assert_eq!(
        decide(XdpMode::Generic, "eth0", &Peer::Remote { netnsid: 0 }),
        Decision::Generic { why: None }
    );
}
