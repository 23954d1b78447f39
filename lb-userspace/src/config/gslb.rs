//! `gslb`: this instance's site in a global deployment, the peer sites' addresses, and the
//! L7 services with site persistence (Avi's GSLB site cookie persistence): a client keeps
//! reaching the site where its session started.
//!
//! ```json
//! "gslb": {"site": "east", "services": ["web"], "on_wrong_site": "proxy",
//!          "peers": [{"site": "west", "address": "198.51.100.10", "redirect_host": "west.example.com"}]}
//! ```

use std::net::IpAddr;

use serde::Deserialize;

use super::{ConfigError, ServiceMode, VirtualService, names::check_name};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGslb {
    pub site: String,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    /// The L7 services whose clients stay with their site.
    pub services: Vec<String>,
    #[serde(default)]
    pub on_wrong_site: Option<WrongSite>,
    #[serde(default)]
    pub cookie_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub site: String,
    /// The address of the peer site's services (its VIP: the same services and ports).
    pub address: String,
    /// The host name redirects name (default: the address).
    #[serde(default)]
    pub redirect_host: Option<String>,
}

/// What a request carrying another site's cookie gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WrongSite {
    /// Proxied to that site's VIP (the client sees nothing).
    #[default]
    Proxy,
    /// `307 Temporary Redirect` to that site's host (the client goes there itself).
    Redirect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub site: String,
    pub address: IpAddr,
    pub redirect_host: Option<String>,
}

/// Validated `gslb`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gslb {
    pub site: String,
    pub peers: Vec<Peer>,
    pub services: Vec<String>,
    pub on_wrong_site: WrongSite,
    pub cookie_name: String,
}

/// The site cookie's name when none is configured.
pub const DEFAULT_COOKIE_NAME: &str = "tether_site";

impl Gslb {
    /// Whether `service` has site persistence.
    pub fn covers(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == service)
    }
}

pub(super) fn validate(
    raw: Option<&RawGslb>,
    services: &[VirtualService],
) -> Result<Option<Gslb>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    check_name("gslb.site", &raw.site)?;
    let mut peers: Vec<Peer> = Vec::new();
    for (i, p) in raw.peers.iter().enumerate() {
        let at = format!("gslb.peers[{i}]");
        check_name(&format!("{at}.site"), &p.site)?;
        if p.site == raw.site || peers.iter().any(|q| q.site == p.site) {
            return Err(ConfigError::new(
                format!("{at}.site"),
                format!(
                    "{:?}: every site is named once (this one is {:?})",
                    p.site, raw.site
                ),
            ));
        }
        let address: IpAddr = p.address.parse().map_err(|_| {
            ConfigError::new(
                format!("{at}.address"),
                format!("{:?} is not an IPv4 or IPv6 address", p.address),
            )
        })?;
        if let Some(h) = &p.redirect_host
            && (h.is_empty()
                || h.len() > 253
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
        {
            return Err(ConfigError::new(
                format!("{at}.redirect_host"),
                format!("{h:?}: a host name (letters, digits, '-' and '.')"),
            ));
        }
        peers.push(Peer {
            site: p.site.clone(),
            address,
            redirect_host: p.redirect_host.clone(),
        });
    }
    for (i, name) in raw.services.iter().enumerate() {
        let at = format!("gslb.services[{i}]");
        let Some(svc) = services.iter().find(|s| &s.name == name) else {
            return Err(ConfigError::new(at, format!("no virtual service {name:?}")));
        };
        let http = match &svc.mode {
            ServiceMode::L7(o) => !o.tls_passthrough && svc.protocol == super::Protocol::Tcp,
            ServiceMode::L4Dsr => false,
        };
        if !http {
            return Err(ConfigError::new(
                at,
                format!("{name:?}: site persistence needs an l7 HTTP service (a cookie)"),
            ));
        }
    }
    let cookie_name = raw
        .cookie_name
        .clone()
        .unwrap_or_else(|| DEFAULT_COOKIE_NAME.to_string());
    if !crate::cookie::valid_cookie_name(&cookie_name) {
        return Err(ConfigError::new(
            "gslb.cookie_name",
            format!("{cookie_name:?} is not a cookie name"),
        ));
    }
    Ok(Some(Gslb {
        site: raw.site.clone(),
        peers,
        services: raw.services.clone(),
        on_wrong_site: raw.on_wrong_site.unwrap_or_default(),
        cookie_name,
    }))
}
