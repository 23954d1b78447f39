//! Configuration: JSON parsed strictly (`deny_unknown_fields`) into raw structs, then
//! validated into typed values. Every error names the field path and the reason, and nothing
//! is applied until the whole file has validated.
//!
//! The model follows Avi's: a virtual service references a pool and, optionally, a
//! persistence profile.

mod admin;
mod raw;
mod trusted;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{
    DOWN_POLICY_IMMEDIATE, DOWN_POLICY_NEVER, MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
};

pub use admin::{DEFAULT_STATE_DIR, TOKEN_FILE_NAME};
pub use raw::RawConfig;

/// A configuration error: where, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    /// Field path, e.g. `virtual_services[0].port`.
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Errors loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownPolicy {
    /// Move a persisted client to a new backend as soon as its backend is down.
    Immediate,
    /// Keep it on its backend until the persistence entry expires.
    Never,
}

impl DownPolicy {
    pub fn to_kernel(self) -> u32 {
        match self {
            DownPolicy::Immediate => DOWN_POLICY_IMMEDIATE,
            DownPolicy::Never => DOWN_POLICY_NEVER,
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub pin_dir: PathBuf,
    pub persist_table_entries: u32,
    /// Admin API and Prometheus metrics (`/metrics`, `/status`, `/persist`).
    pub admin_listen: std::net::SocketAddr,
    /// Persistent files (the admin token).
    pub state_dir: PathBuf,
    /// As configured; [`Config::admin_token_path`] gives the default.
    pub admin_token_file: Option<PathBuf>,
    pub services: Vec<VirtualService>,
    pub pools: Vec<Pool>,
    pub profiles: Vec<PersistenceProfile>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Index into `Config::pools`.
    pub pool: usize,
    /// Index into `Config::profiles`; `None` means no persistence.
    pub persistence: Option<usize>,
    pub mode: ServiceMode,
}

/// How a virtual service is served.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceMode {
    /// XDP forwards with L2 direct server return.
    L4Dsr,
    /// XDP passes the traffic to the stack; tether's HTTP proxy serves it.
    L7(L7Options),
}

#[derive(Debug, Clone, PartialEq)]
pub struct L7Options {
    pub tls: Option<TlsFiles>,
    /// Peers that must send a PROXY protocol header; `None`: off. Any other peer's header
    /// closes its connection.
    pub proxy_protocol: Option<crate::cidr::Cidrs>,
    /// Clients whose forwarding headers are kept and appended to; everyone else's are replaced.
    pub trusted_forwarders: crate::cidr::Cidrs,
    pub limits: L7Limits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Proxy limits (defaults in the spirit of HAProxy's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L7Limits {
    pub max_connections: u32,
    pub max_header_bytes: u32,
    pub request_timeout: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub connect_timeout: std::time::Duration,
    pub response_timeout: std::time::Duration,
    /// Open connections from one client address (IPv6: one /64).
    pub max_connections_per_source: u32,
    pub h2_max_concurrent_streams: u32,
    /// Connections to one backend, pooled and busy.
    pub max_connections_per_backend: u32,
    /// Request bodies slower than this (after `request_timeout` of grace) get a 408; 0: off.
    pub min_body_rate_bytes_s: u32,
}

/// How the L7 proxy balances clients that no persistence decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Weighted round robin.
    RoundRobin,
    /// Fewest open requests, relative to weight.
    LeastConnections,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    /// Without a monitor every enabled backend counts as up.
    pub health_monitor: Option<HealthMonitor>,
    pub algorithm: Algorithm,
}

/// Active health check run by the daemon against each backend's own address.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthMonitor {
    pub kind: HealthCheckKind,
    pub port: u16,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheckKind {
    /// The TCP handshake completes.
    Tcp,
    /// `GET path` over HTTP/1.1 (TLS without certificate verification when `tls`) answers with
    /// a status in `expect`.
    Http {
        tls: bool,
        path: String,
        host: Option<String>,
        expect: Vec<StatusMatch>,
    },
    /// A datagram with `send` gets a reply (containing `expect`, when set).
    Udp {
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

/// An expected HTTP status: one code, or a class such as `2xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Code(u16),
    Class(u8),
}

impl StatusMatch {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Code(c) => c == status,
            StatusMatch::Class(c) => status / 100 == c as u16,
        }
    }
}

/// Operator's intent for a backend, independent of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    Enabled,
    /// Keeps its persisted clients until their entries expire, takes no new ones.
    Draining,
    /// Takes nothing; persisted clients are moved (policy `immediate`) or kept (`never`).
    Disabled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
    /// Explicit MAC; otherwise resolved from the neighbour table.
    pub mac: Option<[u8; 6]>,
    pub admin_state: AdminState,
    /// Port the L7 proxy connects to; `None`: the virtual service's port.
    pub port: Option<u16>,
    /// Static value for `custom-header` persistence.
    pub header_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PersistenceProfile {
    pub name: String,
    pub kind: PersistenceKind,
    pub timeout_s: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub down_policy: DownPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistenceKind {
    /// Source address (masked to the prefixes) -> backend, for `timeout_s`.
    ClientIp,
    /// Kemp "Active Cookie", Avi "HTTP Cookie": tether issues an encrypted cookie naming the backend.
    HttpCookie(CookieProfile),
    /// Kemp "Server Cookie", Avi "App Cookie": learn {cookie value -> backend} from the
    /// backend's Set-Cookie, kept for `timeout_s`.
    AppCookie(AppCookieProfile),
    /// A request key hashed onto the pool's Maglev table (Kemp's hash methods, Avi's
    /// consistent hash); `sticky` keeps each key's backend for `timeout_s` on top, so a change
    /// of the backend set does not move a live client.
    KeyHash {
        key: KeySource,
        sticky: bool,
        fallback: Option<ClientIpFallback>,
    },
    /// Avi custom HTTP header: the named header's value matched against each backend's
    /// `header_value`; others are balanced normally.
    CustomHeader { header: String },
}

/// Where a key-based method finds its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Kemp "Hash All Cookies": the values of all cookies.
    AllCookies,
    /// Kemp "Super HTTP": User-Agent, or Authorization when User-Agent contains "MSRPC"
    /// (empty when absent); `with_source_ip` appends the source address.
    SuperHttp {
        with_source_ip: bool,
    },
    /// Kemp "URL Hash": path and query.
    Url,
    /// Kemp "HTTP Host Header".
    Host,
    /// Kemp "Hash of HTTP Query Item".
    QueryItem(String),
    /// Kemp "Selected Header".
    Header(String),
    /// Avi consistent hash by source address / address and port.
    SourceIp,
    SourceIpPort,
}

impl PersistenceKind {
    /// Needs the L7 proxy.
    pub fn is_http(&self) -> bool {
        !matches!(self, PersistenceKind::ClientIp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieProfile {
    pub cookie_name: String,
    /// `None`: a session cookie (no Max-Age) whose payload never expires.
    pub max_lifetime: Option<std::time::Duration>,
    /// Set-Cookie on every response, not only when the cookie was missing or invalid.
    pub always_send: bool,
    /// Kemp "add port": mix the client's port into the choice of a new backend.
    pub add_port: bool,
    pub http_only: bool,
    /// `None`: Secure under TLS only.
    pub secure: Option<bool>,
    pub same_site: Option<SameSiteMode>,
    pub path: String,
    pub domain: Option<String>,
    /// (key id, secret), newest first; empty: a random key per process.
    pub keys: Vec<(u8, String)>,
    pub fallback: Option<ClientIpFallback>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSiteMode {
    Lax,
    Strict,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCookieProfile {
    pub cookie_name: String,
    pub fallback: Option<ClientIpFallback>,
}

/// Source-IP persistence used when the request carries no cookie of the profile's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIpFallback {
    pub timeout_s: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

pub const MAX_WEIGHT: u32 = 1000;
pub const MAX_TIMEOUT_S: u32 = 365 * 24 * 3600;
pub const MAX_PERSIST_ENTRIES: u32 = 64 << 20;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";

impl Config {
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Config::parse(&text)?)
    }

    /// Parse and validate JSON text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            // "." is the root; an empty path comes from an unknown field named "" (found by
            // the config fuzz target): either way the error still names a place.
            let path = if path == "." || path.is_empty() {
                "<root>".to_string()
            } else {
                path
            };
            ConfigError::new(path, e.into_inner().to_string())
        })?;
        validate(raw)
    }

    /// The admin API's bearer token file.
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join(TOKEN_FILE_NAME))
    }

    pub fn profile(&self, svc: &VirtualService) -> Option<&PersistenceProfile> {
        svc.persistence.map(|i| &self.profiles[i])
    }
}

fn parse_ip(path: &str, s: &str) -> Result<IpAddr, ConfigError> {
    s.parse()
        .map_err(|_| ConfigError::new(path, format!("{s:?} is not an IPv4 or IPv6 address")))
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new(path, "must not be empty"));
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            path,
            format!("{name:?}: use 1-64 characters of A-Z a-z 0-9 - _ ."),
        ));
    }
    Ok(())
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    if raw.interface.is_empty() || raw.interface.len() > 15 || raw.interface.contains(['/', ' ']) {
        return Err(ConfigError::new(
            "interface",
            format!(
                "{:?} is not a valid interface name (1-15 characters, no '/' or space)",
                raw.interface
            ),
        ));
    }
    let xdp_mode = match raw.xdp_mode.as_deref().unwrap_or("auto") {
        "auto" => XdpMode::Auto,
        "native" => XdpMode::Native,
        "generic" => XdpMode::Generic,
        other => {
            return Err(ConfigError::new(
                "xdp_mode",
                format!("{other:?}: expected \"auto\", \"native\" or \"generic\""),
            ));
        }
    };
    let pin_dir = PathBuf::from(raw.pin_dir.as_deref().unwrap_or(lb_common::DEFAULT_PIN_DIR));
    if !pin_dir.is_absolute()
        || !pin_dir.starts_with("/sys/fs/bpf")
        || pin_dir == Path::new("/sys/fs/bpf")
    {
        return Err(ConfigError::new(
            "pin_dir",
            format!(
                "{}: must be a directory below /sys/fs/bpf",
                pin_dir.display()
            ),
        ));
    }
    let persist_table_entries = raw
        .persist_table_entries
        .unwrap_or(lb_common::PERSIST_DEFAULT_ENTRIES);
    if persist_table_entries == 0 || persist_table_entries > MAX_PERSIST_ENTRIES {
        return Err(ConfigError::new(
            "persist_table_entries",
            format!("{persist_table_entries}: must be 1 to {MAX_PERSIST_ENTRIES}"),
        ));
    }

    let admin_listen = raw.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let admin_listen: std::net::SocketAddr = admin_listen.parse().map_err(|_| {
        ConfigError::new(
            "admin_listen",
            format!("{admin_listen:?} is not an address:port such as 127.0.0.1:9180"),
        )
    })?;
    let (state_dir, admin_token_file) = admin::validate(
        raw.state_dir.as_deref(),
        raw.admin_token_file.as_deref(),
        admin_listen,
    )?;

    // Profiles.
    let mut profiles = Vec::new();
    let mut profile_idx = HashMap::new();
    for (i, p) in raw.persistence_profiles.iter().enumerate() {
        let at = |f: &str| format!("persistence_profiles[{i}].{f}");
        check_name(&at("name"), &p.name)?;
        if profile_idx.insert(p.name.clone(), i).is_some() {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate profile name {:?}", p.name),
            ));
        }
        let kind = profile_kind(i, p)?;
        let timeout_s = p.timeout_s.unwrap_or(300);
        if timeout_s > MAX_TIMEOUT_S {
            return Err(ConfigError::new(
                at("timeout_s"),
                format!("{timeout_s}: must be 0 (no persistence) to {MAX_TIMEOUT_S}"),
            ));
        }
        let ipv4_prefix = p.ipv4_prefix.unwrap_or(32);
        if ipv4_prefix > 32 {
            return Err(ConfigError::new(
                at("ipv4_prefix"),
                format!("{ipv4_prefix}: must be 0 to 32"),
            ));
        }
        let ipv6_prefix = p.ipv6_prefix.unwrap_or(128);
        if ipv6_prefix > 128 {
            return Err(ConfigError::new(
                at("ipv6_prefix"),
                format!("{ipv6_prefix}: must be 0 to 128"),
            ));
        }
        let down_policy = match p
            .select_new_server_when_down
            .as_deref()
            .unwrap_or("immediate")
        {
            "immediate" => DownPolicy::Immediate,
            "never" => DownPolicy::Never,
            other => {
                return Err(ConfigError::new(
                    at("select_new_server_when_down"),
                    format!("{other:?}: expected \"immediate\" or \"never\""),
                ));
            }
        };
        profiles.push(PersistenceProfile {
            name: p.name.clone(),
            kind,
            timeout_s,
            ipv4_prefix,
            ipv6_prefix,
            down_policy,
        });
    }

    // Pools.
    let mut pools = Vec::new();
    let mut pool_idx = HashMap::new();
    let mut total_backends = 0usize;
    for (i, p) in raw.pools.iter().enumerate() {
        let at = |f: &str| format!("pools[{i}].{f}");
        check_name(&at("name"), &p.name)?;
        if pool_idx.insert(p.name.clone(), i).is_some() {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate pool name {:?}", p.name),
            ));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut backends = Vec::new();
        for (j, b) in p.backends.iter().enumerate() {
            let at = |f: &str| format!("pools[{i}].backends[{j}].{f}");
            check_name(&at("name"), &b.name)?;
            if !names.insert(b.name.as_str()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("duplicate backend name {:?} in pool {:?}", b.name, p.name),
                ));
            }
            let address = parse_ip(&at("address"), &b.address)?;
            if address.is_unspecified() || address.is_multicast() {
                return Err(ConfigError::new(
                    at("address"),
                    format!("{address} cannot be a backend"),
                ));
            }
            // One server per address and port (L7 backends may share an address).
            if !addrs.insert((address, b.port)) {
                return Err(ConfigError::new(
                    at("address"),
                    format!(
                        "{address} (port {:?}) appears twice in pool {:?}",
                        b.port, p.name
                    ),
                ));
            }
            let weight = b.weight.unwrap_or(1);
            if weight > MAX_WEIGHT {
                return Err(ConfigError::new(
                    at("weight"),
                    format!("{weight}: must be 0 to {MAX_WEIGHT}"),
                ));
            }
            let mac = match &b.mac {
                None => None,
                Some(s) => Some(parse_mac(s).ok_or_else(|| {
                    ConfigError::new(
                        at("mac"),
                        format!("{s:?} is not a MAC address like 02:00:00:00:00:01"),
                    )
                })?),
            };
            let admin_state = match b.admin_state.as_deref().unwrap_or("enabled") {
                "enabled" => AdminState::Enabled,
                "draining" => AdminState::Draining,
                "disabled" => AdminState::Disabled,
                other => {
                    return Err(ConfigError::new(
                        at("admin_state"),
                        format!("{other:?}: expected \"enabled\", \"draining\" or \"disabled\""),
                    ));
                }
            };
            if b.port == Some(0) {
                return Err(ConfigError::new(at("port"), "must be 1 to 65535"));
            }
            if let Some(v) = &b.header_value
                && (v.is_empty() || v.bytes().any(|c| c.is_ascii_control()))
            {
                return Err(ConfigError::new(
                    at("header_value"),
                    format!("{v:?}: must be a non-empty header value"),
                ));
            }
            backends.push(BackendConfig {
                name: b.name.clone(),
                address,
                weight,
                mac,
                admin_state,
                port: b.port,
                header_value: b.header_value.clone(),
            });
        }
        total_backends += backends.len();
        let health_monitor = match &p.health_monitor {
            None => None,
            Some(h) => Some(health_monitor(&format!("pools[{i}].health_monitor"), h)?),
        };
        let algorithm = match p.algorithm.as_deref().unwrap_or("round-robin") {
            "round-robin" => Algorithm::RoundRobin,
            "least-connections" => Algorithm::LeastConnections,
            other => {
                return Err(ConfigError::new(
                    format!("pools[{i}].algorithm"),
                    format!("{other:?}: expected \"round-robin\" or \"least-connections\""),
                ));
            }
        };
        pools.push(Pool {
            name: p.name.clone(),
            backends,
            health_monitor,
            algorithm,
        });
    }
    if total_backends > MAX_BACKENDS as usize {
        return Err(ConfigError::new(
            "pools",
            format!("{total_backends} backends in all: at most {MAX_BACKENDS}"),
        ));
    }

    // Services.
    if raw.virtual_services.len() > MAX_SERVICES as usize {
        return Err(ConfigError::new(
            "virtual_services",
            format!(
                "{} services: at most {MAX_SERVICES}",
                raw.virtual_services.len()
            ),
        ));
    }
    let mut services = Vec::new();
    let mut svc_names = HashSet::new();
    let mut listeners = HashMap::new();
    for (i, s) in raw.virtual_services.iter().enumerate() {
        let at = |f: &str| format!("virtual_services[{i}].{f}");
        check_name(&at("name"), &s.name)?;
        if !svc_names.insert(s.name.as_str()) {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate virtual service name {:?}", s.name),
            ));
        }
        let vip = parse_ip(&at("vip"), &s.vip)?;
        if vip.is_unspecified() || vip.is_multicast() {
            return Err(ConfigError::new(
                at("vip"),
                format!("{vip} cannot be a virtual IP"),
            ));
        }
        if s.port == 0 {
            return Err(ConfigError::new(at("port"), "must be 1 to 65535"));
        }
        let protocol = match s.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(ConfigError::new(
                    at("protocol"),
                    format!("{other:?}: expected \"tcp\" or \"udp\""),
                ));
            }
        };
        if let Some(prev) = listeners.insert((vip, s.port, protocol), &s.name) {
            return Err(ConfigError::new(
                at("port"),
                format!(
                    "{vip}:{} {:?} is already served by {prev:?}",
                    s.port, s.protocol
                ),
            ));
        }
        let mode = match s.mode.as_str() {
            "l4-dsr" => {
                for (field, set) in [
                    ("tls", s.tls.is_some()),
                    ("proxy_protocol", s.proxy_protocol.is_some()),
                    ("trusted_forwarders", s.trusted_forwarders.is_some()),
                    ("limits", s.limits.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::new(at(field), "applies to mode \"l7\" only"));
                    }
                }
                ServiceMode::L4Dsr
            }
            "l7" => {
                if protocol != Protocol::Tcp {
                    return Err(ConfigError::new(
                        at("protocol"),
                        "mode \"l7\" serves HTTP over TCP",
                    ));
                }
                ServiceMode::L7(l7_options(&format!("virtual_services[{i}]"), s)?)
            }
            other => {
                return Err(ConfigError::new(
                    at("mode"),
                    format!("{other:?}: expected \"l4-dsr\" or \"l7\""),
                ));
            }
        };
        let pool = *pool_idx
            .get(&s.pool)
            .ok_or_else(|| ConfigError::new(at("pool"), format!("no pool named {:?}", s.pool)))?;
        let persistence = match &s.persistence {
            None => None,
            Some(p) => Some(*profile_idx.get(p).ok_or_else(|| {
                ConfigError::new(
                    at("persistence"),
                    format!("no persistence profile named {p:?}"),
                )
            })?),
        };
        if let Some(pi) = persistence
            && profiles[pi].kind.is_http()
            && mode == ServiceMode::L4Dsr
        {
            return Err(ConfigError::new(
                at("persistence"),
                format!(
                    "profile {:?} inspects HTTP: it needs mode \"l7\"",
                    profiles[pi].name
                ),
            ));
        }
        services.push(VirtualService {
            name: s.name.clone(),
            vip,
            port: s.port,
            protocol,
            pool,
            persistence,
            mode,
        });
    }

    Ok(Config {
        interface: raw.interface,
        xdp_mode,
        pin_dir,
        persist_table_entries,
        admin_listen,
        state_dir,
        admin_token_file,
        services,
        pools,
        profiles,
    })
}

fn l7_options(base: &str, s: &raw::RawService) -> Result<L7Options, ConfigError> {
    let at = |f: &str| format!("{base}.{f}");
    let tls = match &s.tls {
        None => None,
        Some(t) => {
            for (f, v) in [("cert_file", &t.cert_file), ("key_file", &t.key_file)] {
                let path = Path::new(v);
                if !path.is_file() {
                    return Err(ConfigError::new(
                        at(&format!("tls.{f}")),
                        format!("{v}: no such readable file"),
                    ));
                }
            }
            Some(TlsFiles {
                cert_file: PathBuf::from(&t.cert_file),
                key_file: PathBuf::from(&t.key_file),
            })
        }
    };
    let l = s.limits.as_ref();
    let num =
        |f: &str, v: Option<u32>, default: u32, min: u32, max: u32| -> Result<u32, ConfigError> {
            let v = v.unwrap_or(default);
            if v < min || v > max {
                return Err(ConfigError::new(
                    at(&format!("limits.{f}")),
                    format!("{v}: must be {min} to {max}"),
                ));
            }
            Ok(v)
        };
    let ms = |f: &str, v: Option<u32>, default: u32| -> Result<std::time::Duration, ConfigError> {
        Ok(std::time::Duration::from_millis(
            num(f, v, default, 10, 3_600_000)? as u64,
        ))
    };
    let limits = L7Limits {
        max_connections: num(
            "max_connections",
            l.and_then(|l| l.max_connections),
            10_000,
            1,
            1_000_000,
        )?,
        max_header_bytes: num(
            "max_header_bytes",
            l.and_then(|l| l.max_header_bytes),
            64 * 1024,
            1024,
            1 << 20,
        )?,
        request_timeout: ms(
            "request_timeout_ms",
            l.and_then(|l| l.request_timeout_ms),
            10_000,
        )?,
        idle_timeout: ms("idle_timeout_ms", l.and_then(|l| l.idle_timeout_ms), 60_000)?,
        connect_timeout: ms(
            "connect_timeout_ms",
            l.and_then(|l| l.connect_timeout_ms),
            3_000,
        )?,
        response_timeout: ms(
            "response_timeout_ms",
            l.and_then(|l| l.response_timeout_ms),
            60_000,
        )?,
        max_connections_per_source: num(
            "max_connections_per_source",
            l.and_then(|l| l.max_connections_per_source),
            1_000,
            1,
            1_000_000,
        )?,
        h2_max_concurrent_streams: num(
            "h2_max_concurrent_streams",
            l.and_then(|l| l.h2_max_concurrent_streams),
            100,
            1,
            10_000,
        )?,
        max_connections_per_backend: num(
            "max_connections_per_backend",
            l.and_then(|l| l.max_connections_per_backend),
            1_024,
            1,
            1_000_000,
        )?,
        min_body_rate_bytes_s: num(
            "min_body_rate_bytes_s",
            l.and_then(|l| l.min_body_rate_bytes_s),
            500,
            0,
            1 << 30,
        )?,
    };
    Ok(L7Options {
        tls,
        proxy_protocol: trusted::proxy_protocol(&at("proxy_protocol"), s.proxy_protocol.as_ref())?,
        trusted_forwarders: trusted::list(
            &at("trusted_forwarders"),
            s.trusted_forwarders.as_deref().unwrap_or_default(),
        )?,
        limits,
    })
}

/// Avi gives a blank cookie name a random 8-character one; tether derives it from the profile
/// name instead, so it survives restarts and every instance uses the same one.
fn derived_cookie_name(profile: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut h = lb_common::hash::hash_bytes(profile.as_bytes(), 0x636b_6e6d) as u64;
    (0..8)
        .map(|i| {
            if i == 4 {
                h = lb_common::hash::hash_bytes(profile.as_bytes(), h as u32) as u64;
            }
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn profile_kind(i: usize, p: &raw::RawProfile) -> Result<PersistenceKind, ConfigError> {
    let at = |f: &str| format!("persistence_profiles[{i}].{f}");
    let cookie_fields = [
        ("max_lifetime_min", p.max_lifetime_min.is_some()),
        ("always_send", p.always_send.is_some()),
        ("add_port", p.add_port.is_some()),
        ("http_only", p.http_only.is_some()),
        ("secure", p.secure.is_some()),
        ("same_site", p.same_site.is_some()),
        ("path", p.path.is_some()),
        ("domain", p.domain.is_some()),
        ("keys", p.keys.is_some()),
    ];
    let refuse = |fields: &[(&str, bool)]| -> Result<(), ConfigError> {
        match fields.iter().find(|(_, set)| *set) {
            Some((f, _)) => Err(ConfigError::new(
                at(f),
                format!("does not apply to a {:?} profile", p.kind),
            )),
            None => Ok(()),
        }
    };
    let cookie_name = |required: bool| -> Result<String, ConfigError> {
        match p.cookie_name.as_deref() {
            None | Some("") if !required => Ok(derived_cookie_name(&p.name)),
            None | Some("") => Err(ConfigError::new(
                at("cookie_name"),
                "required: the name of the server's cookie, e.g. JSESSIONID",
            )),
            Some(n) if crate::persist::cookie::valid_cookie_name(n) => Ok(n.to_string()),
            Some(n) => Err(ConfigError::new(
                at("cookie_name"),
                format!("{n:?} is not a valid cookie name (an HTTP token)"),
            )),
        }
    };
    let fallback = match &p.fallback {
        None => None,
        Some(f) => {
            if f.kind != "client-ip" {
                return Err(ConfigError::new(
                    at("fallback.type"),
                    format!("{:?}: expected \"client-ip\"", f.kind),
                ));
            }
            let timeout_s = f.timeout_s.unwrap_or(300);
            if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
                return Err(ConfigError::new(
                    at("fallback.timeout_s"),
                    format!("{timeout_s}: must be 1 to {MAX_TIMEOUT_S}"),
                ));
            }
            let ipv4_prefix = f.ipv4_prefix.unwrap_or(32);
            if ipv4_prefix > 32 {
                return Err(ConfigError::new(
                    at("fallback.ipv4_prefix"),
                    format!("{ipv4_prefix}: must be 0 to 32"),
                ));
            }
            let ipv6_prefix = f.ipv6_prefix.unwrap_or(128);
            if ipv6_prefix > 128 {
                return Err(ConfigError::new(
                    at("fallback.ipv6_prefix"),
                    format!("{ipv6_prefix}: must be 0 to 128"),
                ));
            }
            Some(ClientIpFallback {
                timeout_s,
                ipv4_prefix,
                ipv6_prefix,
            })
        }
    };
    match p.kind.as_str() {
        "client-ip" | "http-cookie" | "app-cookie"
            if let Some((f, _)) = [
                ("item", p.item.is_some()),
                ("with_source_ip", p.with_source_ip.is_some()),
                ("hash_key", p.hash_key.is_some()),
            ]
            .into_iter()
            .find(|(_, set)| *set) =>
        {
            Err(ConfigError::new(
                at(f),
                format!("does not apply to a {:?} profile", p.kind),
            ))
        }
        "client-ip" => {
            refuse(&cookie_fields)?;
            refuse(&[
                ("cookie_name", p.cookie_name.is_some()),
                ("fallback", p.fallback.is_some()),
            ])?;
            Ok(PersistenceKind::ClientIp)
        }
        "http-cookie" => {
            // The cookie carries its own lifetime (max_lifetime_min); nothing is kept locally.
            refuse(&[
                ("timeout_s", p.timeout_s.is_some()),
                ("ipv4_prefix", p.ipv4_prefix.is_some()),
                ("ipv6_prefix", p.ipv6_prefix.is_some()),
            ])?;
            let max_lifetime = match p.max_lifetime_min {
                None => None,
                Some(m) if (10..=720).contains(&m) => {
                    Some(std::time::Duration::from_secs(m as u64 * 60))
                }
                Some(m) => {
                    return Err(ConfigError::new(
                        at("max_lifetime_min"),
                        format!(
                            "{m}: must be 10 to 720 minutes (leave it out for a session cookie)"
                        ),
                    ));
                }
            };
            let same_site = match p.same_site.as_deref().unwrap_or("lax") {
                "lax" => Some(SameSiteMode::Lax),
                "strict" => Some(SameSiteMode::Strict),
                "none" => Some(SameSiteMode::None),
                "omit" => None,
                other => {
                    return Err(ConfigError::new(
                        at("same_site"),
                        format!("{other:?}: expected \"lax\", \"strict\", \"none\" or \"omit\""),
                    ));
                }
            };
            let path = p.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ';') {
                return Err(ConfigError::new(
                    at("path"),
                    format!(
                        "{path:?}: must start with '/' and contain no ';' or control characters"
                    ),
                ));
            }
            if let Some(d) = &p.domain
                && (d.is_empty()
                    || !d
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)))
            {
                return Err(ConfigError::new(
                    at("domain"),
                    format!("{d:?} is not a domain name"),
                ));
            }
            let keys: Vec<(u8, String)> = p
                .keys
                .iter()
                .flatten()
                .map(|k| (k.id, k.secret.clone()))
                .collect();
            if !keys.is_empty() {
                crate::persist::cookie::CookieKeys::from_config(&keys)
                    .map_err(|e| ConfigError::new(at("keys"), e.to_string()))?;
            }
            Ok(PersistenceKind::HttpCookie(CookieProfile {
                cookie_name: cookie_name(false)?,
                max_lifetime,
                always_send: p.always_send.unwrap_or(false),
                add_port: p.add_port.unwrap_or(false),
                http_only: p.http_only.unwrap_or(true),
                secure: p.secure,
                same_site,
                path,
                domain: p.domain.clone(),
                keys,
                fallback,
            }))
        }
        "app-cookie" => {
            refuse(&cookie_fields)?;
            refuse(&[
                ("ipv4_prefix", p.ipv4_prefix.is_some()),
                ("ipv6_prefix", p.ipv6_prefix.is_some()),
            ])?;
            Ok(PersistenceKind::AppCookie(AppCookieProfile {
                cookie_name: cookie_name(true)?,
                fallback,
            }))
        }
        "all-cookies" | "super-http" | "url-hash" | "host-header" | "query-item" | "header"
        | "consistent-hash" => {
            refuse(&cookie_fields)?;
            refuse(&[
                ("cookie_name", p.cookie_name.is_some()),
                ("ipv4_prefix", p.ipv4_prefix.is_some()),
                ("ipv6_prefix", p.ipv6_prefix.is_some()),
            ])?;
            let item = |what: &str| -> Result<String, ConfigError> {
                match p.item.as_deref() {
                    Some(n)
                        if !n.is_empty()
                            && n.bytes()
                                .all(|b| b.is_ascii_graphic() && b != b'=' && b != b'&') =>
                    {
                        Ok(n.to_string())
                    }
                    Some(n) => Err(ConfigError::new(
                        at("item"),
                        format!("{n:?} is not a valid {what} name"),
                    )),
                    None => Err(ConfigError::new(
                        at("item"),
                        format!("required: the {what} to hash"),
                    )),
                }
            };
            if p.kind != "query-item" && p.kind != "header" && p.item.is_some() {
                return Err(ConfigError::new(
                    at("item"),
                    format!("does not apply to a {:?} profile", p.kind),
                ));
            }
            if p.kind != "super-http" && p.with_source_ip.is_some() {
                return Err(ConfigError::new(
                    at("with_source_ip"),
                    format!("does not apply to a {:?} profile", p.kind),
                ));
            }
            if p.kind != "consistent-hash" && p.hash_key.is_some() {
                return Err(ConfigError::new(
                    at("hash_key"),
                    format!("does not apply to a {:?} profile", p.kind),
                ));
            }
            let key = match p.kind.as_str() {
                "all-cookies" => KeySource::AllCookies,
                "super-http" => KeySource::SuperHttp {
                    with_source_ip: p.with_source_ip.unwrap_or(false),
                },
                "url-hash" => KeySource::Url,
                "host-header" => KeySource::Host,
                "query-item" => KeySource::QueryItem(item("query item")?),
                "header" => KeySource::Header(item("header")?.to_ascii_lowercase()),
                _ => match p.hash_key.as_deref().unwrap_or("source-ip") {
                    "source-ip" => KeySource::SourceIp,
                    "source-ip-port" => KeySource::SourceIpPort,
                    "url" => KeySource::Url,
                    "host" => KeySource::Host,
                    "all-cookies" => KeySource::AllCookies,
                    "super-http" => KeySource::SuperHttp {
                        with_source_ip: false,
                    },
                    other => match (other.split_once(':'), other) {
                        (Some(("header", h)), _) if !h.is_empty() => {
                            KeySource::Header(h.to_ascii_lowercase())
                        }
                        (Some(("query", q)), _) if !q.is_empty() => {
                            KeySource::QueryItem(q.to_string())
                        }
                        _ => {
                            return Err(ConfigError::new(
                                at("hash_key"),
                                format!(
                                    "{other:?}: expected source-ip, source-ip-port, url, host, all-cookies, super-http, header:NAME or query:NAME"
                                ),
                            ));
                        }
                    },
                },
            };
            // Avi's consistent hash is the hash alone; Kemp's methods keep "the same value on
            // the same server for a time".
            let sticky = p.kind != "consistent-hash";
            if !sticky && p.fallback.is_some() {
                return Err(ConfigError::new(
                    at("fallback"),
                    "does not apply to a \"consistent-hash\" profile",
                ));
            }
            Ok(PersistenceKind::KeyHash {
                key,
                sticky,
                fallback,
            })
        }
        "custom-header" => {
            refuse(&cookie_fields)?;
            refuse(&[
                ("cookie_name", p.cookie_name.is_some()),
                ("fallback", p.fallback.is_some()),
                ("with_source_ip", p.with_source_ip.is_some()),
                ("hash_key", p.hash_key.is_some()),
            ])?;
            let header = match p.item.as_deref() {
                Some(h)
                    if !h.is_empty()
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                {
                    h.to_ascii_lowercase()
                }
                Some(h) => {
                    return Err(ConfigError::new(
                        at("item"),
                        format!("{h:?} is not a valid header name"),
                    ));
                }
                None => {
                    return Err(ConfigError::new(
                        at("item"),
                        "required: the header whose value selects the backend",
                    ));
                }
            };
            Ok(PersistenceKind::CustomHeader { header })
        }
        other => Err(ConfigError::new(
            at("type"),
            format!(
                "{other:?}: expected \"client-ip\", \"http-cookie\", \"app-cookie\", \"all-cookies\", \"super-http\", \"url-hash\", \"host-header\", \"query-item\", \"header\", \"custom-header\" or \"consistent-hash\""
            ),
        )),
    }
}

fn health_monitor(base: &str, h: &raw::RawHealthMonitor) -> Result<HealthMonitor, ConfigError> {
    let at = |f: &str| format!("{base}.{f}");
    let ms = |f: &str,
              v: Option<u32>,
              default: u32,
              min: u32,
              max: u32|
     -> Result<std::time::Duration, ConfigError> {
        let v = v.unwrap_or(default);
        if v < min || v > max {
            return Err(ConfigError::new(
                at(f),
                format!("{v}: must be {min} to {max}"),
            ));
        }
        Ok(std::time::Duration::from_millis(v as u64))
    };
    if h.port == 0 {
        return Err(ConfigError::new(at("port"), "must be 1 to 65535"));
    }
    let interval = ms("interval_ms", h.interval_ms, 5000, 100, 3_600_000)?;
    let timeout = ms("timeout_ms", h.timeout_ms, 2000, 10, 600_000)?;
    if timeout > interval {
        return Err(ConfigError::new(
            at("timeout_ms"),
            "must not exceed interval_ms",
        ));
    }
    let count = |f: &str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
        let v = v.unwrap_or(default);
        if !(1..=100).contains(&v) {
            return Err(ConfigError::new(at(f), format!("{v}: must be 1 to 100")));
        }
        Ok(v)
    };
    let rise = count("rise", h.rise, 2)?;
    let fall = count("fall", h.fall, 3)?;
    let http_only = [
        ("http_path", h.http_path.is_some()),
        ("http_host", h.http_host.is_some()),
        ("expect_status", h.expect_status.is_some()),
    ];
    let udp_only = [
        ("udp_send", h.udp_send.is_some()),
        ("udp_expect", h.udp_expect.is_some()),
    ];
    let refuse = |fields: &[(&str, bool)], kind: &str| -> Result<(), ConfigError> {
        match fields.iter().find(|(_, set)| *set) {
            Some((f, _)) => Err(ConfigError::new(
                at(f),
                format!("does not apply to a {kind:?} monitor"),
            )),
            None => Ok(()),
        }
    };
    let kind = match h.kind.as_str() {
        "tcp" => {
            refuse(&http_only, "tcp")?;
            refuse(&udp_only, "tcp")?;
            HealthCheckKind::Tcp
        }
        "http" | "https" => {
            refuse(&udp_only, &h.kind)?;
            let path = h.http_path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
                return Err(ConfigError::new(
                    at("http_path"),
                    format!(
                        "{path:?}: must start with '/' and contain no spaces or control characters"
                    ),
                ));
            }
            if let Some(host) = &h.http_host
                && (host.is_empty() || host.chars().any(|c| c.is_ascii_control() || c == ' '))
            {
                return Err(ConfigError::new(
                    at("http_host"),
                    format!("{host:?} is not a valid Host header value"),
                ));
            }
            let expect = match &h.expect_status {
                None => vec![StatusMatch::Class(2), StatusMatch::Class(3)],
                Some(list) if list.is_empty() => {
                    return Err(ConfigError::new(at("expect_status"), "must not be empty"));
                }
                Some(list) => list
                    .iter()
                    .map(|s| {
                        parse_status(s).ok_or_else(|| {
                            ConfigError::new(
                                at("expect_status"),
                                format!("{s:?}: expected a status such as \"200\" or a class such as \"2xx\""),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            };
            HealthCheckKind::Http {
                tls: h.kind == "https",
                path,
                host: h.http_host.clone(),
                expect,
            }
        }
        "udp" => {
            refuse(&http_only, "udp")?;
            let send = h.udp_send.clone().ok_or_else(|| {
                ConfigError::new(
                    at("udp_send"),
                    "required for a \"udp\" monitor (the payload to send)",
                )
            })?;
            if send.is_empty() || send.len() > 1024 {
                return Err(ConfigError::new(at("udp_send"), "must be 1 to 1024 bytes"));
            }
            HealthCheckKind::Udp {
                send: send.into_bytes(),
                expect: h.udp_expect.clone().map(String::into_bytes),
            }
        }
        other => {
            return Err(ConfigError::new(
                at("type"),
                format!("{other:?}: expected \"tcp\", \"http\", \"https\" or \"udp\""),
            ));
        }
    };
    Ok(HealthMonitor {
        kind,
        port: h.port,
        interval,
        timeout,
        rise,
        fall,
    })
}

fn parse_status(s: &str) -> Option<StatusMatch> {
    let b = s.as_bytes();
    if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && s[1..].eq_ignore_ascii_case("xx") {
        return Some(StatusMatch::Class(b[0] - b'0'));
    }
    match s.parse::<u16>() {
        Ok(c) if (100..=599).contains(&c) => Some(StatusMatch::Code(c)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
