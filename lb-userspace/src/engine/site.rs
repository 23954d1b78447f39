//! GSLB site persistence (Avi's GSLB site cookie): a client keeps reaching the site where
//! its session started. The first answer from this site sets a site cookie naming it,
//! AES-256-GCM sealed with the cookie key ring (the state directory's key: sites given a
//! copy of that file agree) and bound to the cookie name and the service, like the
//! persistence cookies. A request carrying a valid cookie of a peer site is proxied to that
//! site's address on the service's port, or redirected there (`on_wrong_site`). A request a
//! peer proxied here (marked with [`HOP_HEADER`]) is served here, so a misconfigured pair of
//! sites cannot loop; a peer that refuses the connection leaves the request to this site.
//! The site cookie is removed from requests served here, as the persistence cookies are.

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use http::{
    HeaderValue,
    header::{COOKIE, SET_COOKIE},
};
use lb_common::backend_identity;

use crate::{
    config::{Config, VirtualService, gslb::WrongSite},
    cookie::{self, CookieKeys, CookiePayload, KeyError},
};

/// Marks a request one site proxied to another.
pub const HOP_HEADER: &str = "x-tether-gslb-hop";
/// The "pool" the sites' identities belong to, in the cookie payload.
const SITE_POOL: &str = "gslb-sites";

pub struct PeerSite {
    id: u32,
    pub addr: SocketAddr,
    /// `host[:port]` of redirects.
    authority: String,
    default_port: bool,
}

/// Where a request belongs.
pub enum Where<'a> {
    /// Here; `known`: it carries this site's valid cookie (or was proxied by a peer).
    Local {
        known: bool,
    },
    Peer(&'a PeerSite),
}

pub struct SiteCookie {
    local: String,
    local_id: u32,
    pool: u32,
    peers: Vec<PeerSite>,
    keys: CookieKeys,
    cookie_name: String,
    service: String,
    mode: WrongSite,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SiteCookie {
    /// The site persistence of `svc`, if the config's `gslb` covers it.
    pub fn of(cfg: &Config, svc: &VirtualService) -> Result<Option<SiteCookie>, KeyError> {
        let Some(g) = cfg.gslb.as_ref().filter(|g| g.covers(&svc.name)) else {
            return Ok(None);
        };
        let keys = cookie::keyfile::load_or_create(&cfg.state_dir)?;
        let peers = g
            .peers
            .iter()
            .map(|p| {
                let host = p.redirect_host.clone().unwrap_or_else(|| match p.address {
                    std::net::IpAddr::V6(a) => format!("[{a}]"),
                    a => a.to_string(),
                });
                PeerSite {
                    id: backend_identity(SITE_POOL, &p.site),
                    addr: SocketAddr::new(p.address, svc.port),
                    authority: format!("{host}:{}", svc.port),
                    default_port: svc.port == 80 || svc.port == 443,
                }
            })
            .collect();
        Ok(Some(SiteCookie {
            local: g.site.clone(),
            local_id: backend_identity(SITE_POOL, &g.site),
            pool: cookie::pool_id(SITE_POOL),
            peers,
            keys,
            cookie_name: g.cookie_name.clone(),
            service: svc.name.clone(),
            mode: g.on_wrong_site,
        }))
    }

    /// Where `req` belongs: the first site cookie that opens decides.
    pub fn locate(&self, req: &http::request::Parts) -> Where<'_> {
        if req.headers.contains_key(HOP_HEADER) {
            return Where::Local { known: true };
        }
        let now = unix_now();
        let values = req
            .headers
            .get_all(COOKIE)
            .iter()
            .map(HeaderValue::as_bytes);
        for v in cookie::find_all(values, &self.cookie_name) {
            let Ok(p) = cookie::decode(&self.keys, &self.cookie_name, &self.service, v, now) else {
                continue;
            };
            if p.pool != self.pool {
                continue;
            }
            if p.backend == self.local_id {
                return Where::Local { known: true };
            }
            if let Some(peer) = self.peers.iter().find(|s| s.id == p.backend) {
                return Where::Peer(peer);
            }
        }
        Where::Local { known: false }
    }

    pub fn redirects(&self) -> bool {
        self.mode == WrongSite::Redirect
    }

    /// Mark a request proxied to a peer site (it is served there, whatever it carries).
    pub fn mark_hop(&self, req: &mut http::request::Parts) {
        if let Ok(v) = HeaderValue::from_str(&self.local) {
            req.headers.insert(HOP_HEADER, v);
        }
    }

    /// Remove the site cookie (and a client's hop mark) from a request served here.
    pub fn strip(&self, req: &mut http::request::Parts) {
        req.headers.remove(HOP_HEADER);
        let stripped = cookie::strip(
            req.headers
                .get_all(COOKIE)
                .iter()
                .map(HeaderValue::as_bytes),
            &self.cookie_name,
        );
        req.headers.remove(COOKIE);
        if let Some(v) = stripped.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
            req.headers.insert(COOKIE, v);
        }
    }

    /// Set this site's cookie on a response (a session cookie).
    pub fn set_cookie(&self, resp: &mut http::response::Parts, tls: bool) {
        let payload = CookiePayload::issue(self.local_id, self.pool, unix_now(), None);
        let value = cookie::encode(&self.keys, &self.cookie_name, &self.service, &payload);
        let mut sc = cookie::SetCookie::new(self.cookie_name.clone(), value);
        sc.secure = tls;
        sc.same_site = Some(cookie::SameSite::Lax);
        if let Ok(v) = HeaderValue::from_str(&sc.render()) {
            resp.headers.append(SET_COOKIE, v);
        }
    }

    /// Where a redirect to `peer` points: the same path and query there.
    pub fn location(
        &self,
        peer: &PeerSite,
        req: &http::request::Parts,
        tls: bool,
    ) -> Option<HeaderValue> {
        let scheme = if tls { "https" } else { "http" };
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = if peer.default_port
            && ((tls && peer.addr.port() == 443) || (!tls && peer.addr.port() == 80))
        {
            peer.authority
                .rsplit_once(':')
                .map_or(peer.authority.as_str(), |(h, _)| h)
        } else {
            &peer.authority
        };
        HeaderValue::from_str(&format!("{scheme}://{authority}{pq}")).ok()
    }
}
