//! The JSON shape, parsed strictly. Field types are loose where a better message than
//! serde's comes from validation (enums as strings, addresses as strings).

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: Option<String>,
    #[serde(default)]
    pub pin_dir: Option<String>,
    #[serde(default)]
    pub persist_table_entries: Option<u32>,
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Persistent files (the admin token); default /var/lib/tether.
    #[serde(default)]
    pub state_dir: Option<String>,
    /// The admin API's bearer token (created 0600 on first start); default
    /// `<state_dir>/admin.token`. Required with a non-loopback `admin_listen`.
    #[serde(default)]
    pub admin_token_file: Option<String>,
    #[serde(default)]
    pub virtual_services: Vec<RawService>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default)]
    pub persistence_profiles: Vec<RawProfile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub mode: String,
    pub pool: String,
    #[serde(default)]
    pub persistence: Option<String>,
    /// `l7` only: TLS termination.
    #[serde(default)]
    pub tls: Option<RawTls>,
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

#[derive(Debug, Deserialize)]
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
    pub algorithm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthMonitor {
    #[serde(rename = "type")]
    pub kind: String,
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
    pub admin_state: Option<String>,
    /// Port the L7 proxy connects to (default: the virtual service's port).
    #[serde(default)]
    pub port: Option<u16>,
    /// Avi custom HTTP header persistence: requests whose header has this value go here.
    #[serde(default)]
    pub header_value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub ipv4_prefix: Option<u8>,
    #[serde(default)]
    pub ipv6_prefix: Option<u8>,
    #[serde(default)]
    pub select_new_server_when_down: Option<String>,
    #[serde(default)]
    pub cookie_name: Option<String>,
    #[serde(default)]
    pub max_lifetime_min: Option<u32>,
    #[serde(default)]
    pub always_send: Option<bool>,
    #[serde(default)]
    pub add_port: Option<bool>,
    #[serde(default)]
    pub http_only: Option<bool>,
    #[serde(default)]
    pub secure: Option<bool>,
    #[serde(default)]
    pub same_site: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub keys: Option<Vec<RawKey>>,
    #[serde(default)]
    pub fallback: Option<RawFallback>,
    /// `query-item`: the query parameter; `header` and `custom-header`: the header name.
    #[serde(default)]
    pub item: Option<String>,
    /// `super-http`: append the source address to the key (Kemp "Super HTTP and Source IP").
    #[serde(default)]
    pub with_source_ip: Option<bool>,
    /// `consistent-hash`: the identifier hashed (Avi).
    #[serde(default)]
    pub hash_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: u8,
    pub secret: String,
}

/// Kemp's "... or source IP": source-IP persistence when the request carries no cookie.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub ipv4_prefix: Option<u8>,
    #[serde(default)]
    pub ipv6_prefix: Option<u8>,
}
