//! The JSON shape, parsed strictly (`deny_unknown_fields`). Text enums are serde enums;
//! addresses stay strings, so validation names the field with a clearer reason than serde's.
//! Persistence profiles are a tagged enum (`profiles::RawProfile`).

use serde::Deserialize;

use super::{AdminState, Algorithm, Protocol, XdpMode, profiles::RawProfile};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: Option<XdpMode>,
    #[serde(default)]
    pub pin_dir: Option<String>,
    #[serde(default)]
    pub state_dir: Option<String>,
    #[serde(default)]
    pub persist_table_entries: Option<u32>,
    /// New source-IP bindings each CPU may create per second (0: no cap; absent: derived
    /// from the table's per-CPU share).
    #[serde(default)]
    pub persist_new_bindings_per_cpu_s: Option<u32>,
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// The admin API's bearer token (created 0600 on first start); default
    /// `<state_dir>/admin.token`. Required with a non-loopback `admin_listen`.
    #[serde(default)]
    pub admin_token_file: Option<String>,
    #[serde(default)]
    pub drain_timeout_ms: Option<u32>,
    #[serde(default)]
    pub virtual_services: Vec<RawService>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub persistence_profiles: Vec<RawProfile>,
    /// Stored tables mirrored through Redis (off when absent).
    #[serde(default)]
    pub mirroring: Option<super::mirroring::RawMirroring>,
    /// GSLB site persistence (off when absent).
    #[serde(default)]
    pub gslb: Option<super::gslb::RawGslb>,
}

/// How a virtual service is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    L4Dsr,
    L7,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: RawMode,
    pub pool: String,
    #[serde(default)]
    pub persistence: Option<String>,
    /// `l7` only: TLS termination.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// `l7` only: pass TLS through to the backends (routing on the ClientHello).
    #[serde(default)]
    pub tls_passthrough: Option<bool>,
    /// `l7` only: the sources (CIDRs) that must send a PROXY protocol (v1 or v2) header;
    /// `false` is off. A JSON value: `true` gets its own error message.
    #[serde(default)]
    pub proxy_protocol: Option<serde_json::Value>,
    /// `l7` only: the sources (CIDRs) whose X-Forwarded-For, Forwarded and X-Real-IP are kept.
    #[serde(default)]
    pub trusted_forwarders: Option<Vec<String>>,
    /// `l7` only.
    #[serde(default)]
    pub limits: Option<RawLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_header_bytes: Option<u32>,
    #[serde(default)]
    pub request_timeout_ms: Option<u32>,
    #[serde(default)]
    pub idle_timeout_ms: Option<u32>,
    #[serde(default)]
    pub connect_timeout_ms: Option<u32>,
    #[serde(default)]
    pub response_timeout_ms: Option<u32>,
    #[serde(default)]
    pub max_connections_per_source: Option<u32>,
    #[serde(default)]
    pub h2_max_concurrent_streams: Option<u32>,
    #[serde(default)]
    pub max_connections_per_backend: Option<u32>,
    #[serde(default)]
    pub min_body_rate_bytes_s: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub health_monitor: Option<RawHealthMonitor>,
    /// How the L7 proxy balances new clients.
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MonitorType {
    Tcp,
    Http,
    Https,
    Udp,
}

impl MonitorType {
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorType::Tcp => "tcp",
            MonitorType::Http => "http",
            MonitorType::Https => "https",
            MonitorType::Udp => "udp",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthMonitor {
    #[serde(rename = "type")]
    pub kind: MonitorType,
    pub port: u16,
    #[serde(default)]
    pub interval_ms: Option<u32>,
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    #[serde(default)]
    pub rise: Option<u32>,
    #[serde(default)]
    pub fall: Option<u32>,
    #[serde(default)]
    pub http_path: Option<String>,
    #[serde(default)]
    pub http_host: Option<String>,
    #[serde(default)]
    pub expect_status: Option<Vec<String>>,
    #[serde(default)]
    pub udp_send: Option<String>,
    #[serde(default)]
    pub udp_expect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub admin_state: Option<AdminState>,
    /// Port the L7 proxy connects to (default: the virtual service's port).
    #[serde(default)]
    pub port: Option<u16>,
    /// Avi custom HTTP header persistence: requests whose header has this value go here.
    #[serde(default)]
    pub header_value: Option<String>,
}
