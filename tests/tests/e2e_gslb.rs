//! GSLB site persistence between two "sites" (two tether instances in their own LB
//! namespaces, each with its own VIP for the service `web`): a client's first answer sets a
//! sealed site cookie naming the site that served it; at the other site, a request with that
//! cookie is proxied to the cookie's site (or redirected there, `on_wrong_site: redirect`),
//! and a request without one, or with a forged one, is served locally and gets that site's
//! cookie. The site cookie never reaches a backend.

use std::net::Ipv4Addr;

use serde_json::json;
use tether_tests::{
    daemon::ConfigBuilder,
    http::{HttpResponse, request_from},
    l7lab::{IO_TIMEOUT, PORT},
    multilab::Fleet,
    netns::VIP,
};

const SITE_PORT: u16 = PORT + 1;
/// West's service address: its LB's own address (east keeps the shared VIP).
const WEST_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
const COOKIE: &str = "tether_site";

fn sites(mode: &'static str) -> impl Fn(usize, ConfigBuilder) -> ConfigBuilder {
    move |i, b| {
        let b = b.l7_service("web", SITE_PORT, None, json!({}));
        if i == 0 {
            b.top_field(
                "gslb",
                json!({"site": "east", "services": ["web"], "on_wrong_site": mode,
                       "peers": [{"site": "west", "address": WEST_VIP.to_string()}]}),
            )
        } else {
            // The same service under its own VIP.
            let mut svc = b.build()["virtual_services"][0].clone();
            svc["vip"] = json!(WEST_VIP.to_string());
            b.top_field("virtual_services", json!([svc])).top_field(
                "gslb",
                json!({"site": "west", "services": ["web"],
                       "peers": [{"site": "east", "address": VIP.to_string()}]}),
            )
        }
    }
}

fn get(
    f: &Fleet,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    target: &str,
    cookie: Option<&str>,
) -> HttpResponse {
    let header = cookie.map(|c| format!("{COOKIE}={c}"));
    let headers: Vec<(&str, &str)> = header.iter().map(|h| ("Cookie", h.as_str())).collect();
    let dst = std::net::SocketAddrV4::new(dst, SITE_PORT);
    let target = target.to_string();
    f.topo
        .in_client(move || request_from(src, dst, &target, &headers, IO_TIMEOUT))
        .and_then(|r| r.map_err(Into::into))
        .unwrap_or_else(|e| f.fail(format!("GET {dst}: {e:#}")))
}

#[test]
fn site_cookie_keeps_a_client_at_its_site() {
    let mut f = Fleet::new(2, 3, 2, false, sites("proxy"));
    // The shared VIP is east's alone: west reaches east's service there.
    let west_lb = f.topo.lb_node(1).clone();
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &west_lb.ns,
            "addr",
            "del",
            &format!("{VIP}/32"),
            "dev",
            &west_lb.ifname,
        ])
        .output()
        .expect("ip addr del");
    assert!(out.status.success(), "removing the VIP from west: {out:?}");
    f.start(0);
    f.start(1);
    f.topo.steer_client(0).expect("steer to east");
    let src = f.topo.client_addrs[0];

    // West serves a new client and names itself.
    let first = get(&f, src, WEST_VIP, "/", None);
    assert_eq!(first.status, 200, "{first:?}");
    let west = first
        .set_cookie_value(COOKIE)
        .unwrap_or_else(|| f.fail(format!("west set no site cookie: {first:?}")));
    let set = first.set_cookie(COOKIE).expect("set-cookie");
    assert!(set.contains("HttpOnly") && set.contains("Path=/"), "{set}");
    assert_eq!(
        first.echo().expect("echo").cookie,
        None,
        "no cookie reached the backend"
    );

    // At east, the west cookie is proxied to west: the backend sees east as the client
    // (west does not trust east's X-Forwarded-For), and nothing of the cookie.
    for n in 0..4 {
        let r = get(&f, src, VIP, &format!("/page/{n}?q=1"), Some(&west));
        assert_eq!(r.status, 200, "{r:?}");
        let e = r.echo().expect("echo");
        assert_eq!(
            e.x_forwarded_for.as_deref(),
            Some("10.99.0.2"),
            "request {n} with west's cookie went through west: {e:?}"
        );
        assert_eq!(e.target, format!("/page/{n}?q=1"));
        assert_eq!(e.cookie, None, "the site cookie is stripped at west");
        assert!(
            r.set_cookie(COOKIE).is_none(),
            "a known client gets no new cookie"
        );
    }

    // Without a cookie, or with a forged one, east serves and names itself.
    for cookie in [None, Some("AAAAforged"), Some(&west[..west.len() - 2])] {
        let r = get(&f, src, VIP, "/", cookie);
        let e = r.echo().expect("echo");
        assert_eq!(
            e.x_forwarded_for.as_deref(),
            Some(&*src.to_string()),
            "{cookie:?}: served at east"
        );
        let east = r
            .set_cookie_value(COOKIE)
            .unwrap_or_else(|| f.fail(format!("{cookie:?}: east set no site cookie: {r:?}")));
        // East's cookie keeps the client at east, also when it arrives at west.
        let back = get(&f, src, WEST_VIP, "/", Some(&east));
        assert_eq!(
            back.echo().expect("echo").x_forwarded_for.as_deref(),
            Some("10.99.0.3"),
            "east's cookie at west is proxied to east"
        );
    }

    // on_wrong_site: redirect.
    f.builders[0] = f.builders[0].clone().top_field(
        "gslb",
        json!({"site": "east", "services": ["web"], "on_wrong_site": "redirect",
               "peers": [{"site": "west", "address": WEST_VIP.to_string()}]}),
    );
    f.restart(0);
    let r = get(&f, src, VIP, "/a/b?c=d", Some(&west));
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(&*format!("http://{WEST_VIP}:{SITE_PORT}/a/b?c=d")),
        "{r:?}"
    );
    f.stop(0);
    f.stop(1);
}
