//! Configuration: JSON parsed strictly (`deny_unknown_fields`) into raw structs, then
//! validated into typed values. Every error names the field path and the reason, and nothing
//! is applied until the whole file has validated.
//!
//! The model follows Avi's: a virtual service references a pool and, optionally, a
//! persistence profile.

mod admin;
pub mod gslb;
pub mod mirroring;
mod names;
mod profiles;
mod raw;
mod system;
mod trusted;
mod validate;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{DOWN_POLICY_IMMEDIATE, DOWN_POLICY_NEVER, PROTO_TCP, PROTO_UDP};
use serde::Deserialize;

pub use admin::TOKEN_FILE_NAME;
use raw::RawConfig;
pub use system::{SYSTEM_PROFILES, is_system_profile, system_profile};
pub use validate::parse_mac;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where it forwards, else generic: see `dataplane::veth`.
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Where the daemon keeps what must outlive it: the generated cookie key, the L7
    /// tables' snapshot.
    pub state_dir: PathBuf,
    pub persist_table_entries: u32,
    /// New source-IP bindings each CPU may make per second: `Some(0)` no cap, `None` derived
    /// from the table size (`dataplane::new_binding_cap`).
    pub persist_new_bindings_per_cpu_s: Option<u32>,
    /// Admin API and Prometheus metrics (`/metrics`, `/status`, `/persist`).
    pub admin_listen: std::net::SocketAddr,
    /// How long a restarted or reloaded L7 listener's old connections may take to finish.
    pub drain_timeout: std::time::Duration,
    /// As configured; [`Config::admin_token_path`] gives the default.
    pub admin_token_file: Option<PathBuf>,
    pub services: Vec<VirtualService>,
    pub pools: Vec<Pool>,
    pub profiles: Vec<PersistenceProfile>,
    /// Stored tables shared with other instances through Redis; `None`: off.
    pub mirroring: Option<mirroring::Mirroring>,
    /// This instance's GSLB site and the services with site persistence; `None`: off.
    pub gslb: Option<gslb::Gslb>,
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
    /// TLS is passed through to the backends, not terminated: the proxy reads the
    /// ClientHello and the ServerHello and splices bytes (Kemp service type "Generic").
    pub tls_passthrough: bool,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Entries of each table the method and its fallback keep.
    pub table_capacity: usize,
    /// New table entries one client source may create per minute; 0: no quota.
    pub max_new_keys_per_source_per_min: u32,
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
    /// Kemp SIP header over UDP ("Force L7"): the value of a SIP header field (full or
    /// compact name) hashed onto the pool and kept for `timeout_s`; messages without it by
    /// source address.
    SipHeader { header: String },
    /// Avi DataScript: a Lua script names a key, a backend or nothing for each request.
    Script(ScriptProfile),
    /// Kemp SSL session ID (TLS passed through): {session ID or TLS 1.2 ticket -> backend}
    /// learned from the server's handshake, for `timeout_s`.
    SslSessionId { fallback: Option<ClientIpFallback> },
    /// Avi TLS persistence (TLS terminated by tether): the backend travels in the session
    /// tickets tether issues, sealed with `keys` (cookie key format; empty: the generated
    /// cookie key kept in `state_dir`), valid `timeout_s`.
    TlsTicket { keys: Vec<(u8, String)> },
}

/// A `script` profile: the script's text as validated (compiled) with the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptProfile {
    pub file: PathBuf,
    pub source: String,
    pub limits: crate::script::Limits,
    pub fallback: Option<ClientIpFallback>,
}

/// What a persistence method reads of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodInput {
    /// The client's address only: any L7 service.
    Address,
    /// The HTTP request: TLS terminated by tether, or cleartext.
    Http,
    /// The TLS ClientHello: a `tls_passthrough` service.
    TlsHello,
    /// The TLS session tether terminates: a service with `tls`.
    TlsSession,
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
    /// The server name of the TLS ClientHello (pass-through services).
    Sni,
}

impl PersistenceKind {
    /// Needs the L7 proxy.
    pub fn is_http(&self) -> bool {
        !matches!(self, PersistenceKind::ClientIp)
    }

    /// Reads SIP messages (an L7 UDP service), not HTTP requests.
    pub fn is_sip(&self) -> bool {
        matches!(self, PersistenceKind::SipHeader { .. })
    }

    /// What the method reads, which decides the services it can serve.
    pub fn input(&self) -> MethodInput {
        match self {
            PersistenceKind::ClientIp
            | PersistenceKind::KeyHash {
                key: KeySource::SourceIp | KeySource::SourceIpPort,
                ..
            } => MethodInput::Address,
            PersistenceKind::SslSessionId { .. }
            | PersistenceKind::KeyHash {
                key: KeySource::Sni,
                ..
            } => MethodInput::TlsHello,
            PersistenceKind::TlsTicket { .. } => MethodInput::TlsSession,
            _ => MethodInput::Http,
        }
    }

    /// The "... or source IP" fallback, for the methods that have one.
    pub fn fallback(&self) -> Option<&ClientIpFallback> {
        match self {
            PersistenceKind::HttpCookie(c) => c.fallback.as_ref(),
            PersistenceKind::AppCookie(a) => a.fallback.as_ref(),
            PersistenceKind::KeyHash { fallback, .. } => fallback.as_ref(),
            PersistenceKind::Script(s) => s.fallback.as_ref(),
            PersistenceKind::SslSessionId { fallback } => fallback.as_ref(),
            PersistenceKind::ClientIp
            | PersistenceKind::CustomHeader { .. }
            | PersistenceKind::SipHeader { .. }
            | PersistenceKind::TlsTicket { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieProfile {
    pub cookie_name: String,
    /// `None`: a session cookie (no Max-Age), honoured up to `session_max_age` after issue.
    pub max_lifetime: Option<std::time::Duration>,
    /// Server-side maximum age of a session cookie (from its issued-at), so an old replayed
    /// one stops pinning.
    pub session_max_age: std::time::Duration,
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

pub use crate::cookie::SameSite as SameSiteMode;

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
pub const MAX_NEW_BINDINGS_PER_CPU_S: u32 = 100_000_000;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
/// `drain_timeout_ms` when absent (Envoy's `--drain-time-s` default is 600 s, HAProxy has
/// none by default; 30 s covers ordinary requests without keeping old processes for long).
pub const DEFAULT_DRAIN_TIMEOUT_MS: u32 = 30_000;
pub const MAX_DRAIN_TIMEOUT_MS: u32 = 3_600_000;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";

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
        let raw: RawConfig =
            serde_path_to_error::deserialize(de).map_err(|e| serde_error(text, e))?;
        validate::validate(raw)
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

/// A serde error as a [`ConfigError`]: the field path (`<root>` for the document) and the
/// reason, with serde's "unknown variant" worded as the rest of the config errors are.
fn serde_error(text: &str, e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = e.path().to_string();
    let reason = e.into_inner().to_string();
    if let Some(located) = profile_error(text, &path, &reason) {
        return located;
    }
    // "." is the root; an empty path comes from an unknown field named "" (found by the
    // config fuzz target): either way the error still names a place.
    let path = if path == "." || path.is_empty() {
        "<root>".to_string()
    } else {
        path
    };
    ConfigError::new(path, reword(&reason))
}

/// An error inside `persistence_profiles[i]`, located: serde reads a tagged enum from a
/// buffer, which loses the path below the profile, so the profile is read again on its own.
fn profile_error(text: &str, path: &str, reason: &str) -> Option<ConfigError> {
    let rest = path.strip_prefix("persistence_profiles[")?;
    let (i, _) = rest.split_once(']')?;
    let i: usize = i.parse().ok()?;
    let doc: serde_json::Value = serde_json::from_str(text).ok()?;
    let mut body = doc
        .get("persistence_profiles")?
        .get(i)?
        .as_object()?
        .clone();
    let kind = body.remove("type")?;
    let kind = kind.as_str()?;
    let at = format!("persistence_profiles[{i}]");
    match profiles::locate(kind, serde_json::Value::Object(body)) {
        Some((field, why)) if !field.contains(['.', '[']) && why.starts_with("unknown field") => {
            Some(ConfigError::new(
                format!("{at}.{field}"),
                format!("does not apply to a {kind:?} profile ({why})"),
            ))
        }
        Some((field, why)) if field == "." => Some(ConfigError::new(at, reword(&why))),
        Some((field, why)) => Some(ConfigError::new(format!("{at}.{field}"), reword(&why))),
        // Not a known type: that is the error.
        None if reason.starts_with("unknown variant") => {
            Some(ConfigError::new(format!("{at}.type"), reword(reason)))
        }
        None => None,
    }
}

/// serde's ``unknown variant `x`, expected one of `a`, `b`, `c` `` as
/// `"x": expected "a", "b" or "c"`; other messages unchanged.
fn reword(msg: &str) -> String {
    let Some((got, expected)) = msg
        .strip_prefix("unknown variant `")
        .and_then(|r| r.split_once("`, expected "))
    else {
        return msg.to_string();
    };
    let expected = expected.split(" at line ").next().unwrap_or(expected);
    let names: Vec<String> = expected
        .trim_start_matches("one of ")
        .replace(" or ", ", ")
        .split(", ")
        .map(|n| format!("\"{}\"", n.trim_matches('`')))
        .collect();
    let list = match names.split_last() {
        Some((last, init)) if !init.is_empty() => format!("{} or {last}", init.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    };
    format!("{got:?}: expected {list}")
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
