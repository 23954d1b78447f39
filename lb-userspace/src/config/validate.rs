//! Validation of the parsed config into typed values, one small function per section.
//! Every error names the field path and the reason.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{MAX_BACKENDS, MAX_SERVICES};

use super::{
    AdminState, Algorithm, BackendConfig, Config, ConfigError, DEFAULT_ADMIN_LISTEN,
    DEFAULT_DRAIN_TIMEOUT_MS, HealthCheckKind, HealthMonitor, L7Limits, L7Options,
    MAX_DRAIN_TIMEOUT_MS, MAX_NEW_BINDINGS_PER_CPU_S, MAX_PERSIST_ENTRIES, MAX_WEIGHT, MethodInput,
    PersistenceProfile, Pool, Protocol, ServiceMode, StatusMatch, TlsFiles, VirtualService,
    XdpMode,
    names::check_name,
    profiles,
    raw::{MonitorType, RawConfig, RawHealthMonitor, RawMode, RawPool, RawService},
};

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

/// The whole config, section by section; nothing is returned until all of it is valid.
pub(super) fn validate(mut raw: RawConfig) -> Result<Config, ConfigError> {
    let globals = globals(&raw)?;
    // The built-in profiles the file does not redefine, after the file's own.
    let system = {
        let defined: Vec<&str> = raw.persistence_profiles.iter().map(|p| p.name()).collect();
        super::system::missing_system_profiles(&defined)
    };
    for p in system {
        raw.persistence_profiles
            .push(serde_json::from_value(p).expect("the system profiles deserialize"));
    }
    let (profiles, profile_idx) = profiles::validate(&raw.persistence_profiles)?;
    let (pools, pool_idx) = pools(&raw.pools)?;
    let services = services(&raw.virtual_services, &pool_idx, &profile_idx, &profiles)?;
    let mirroring = super::mirroring::validate(raw.mirroring.as_ref())?;
    let gslb = super::gslb::validate(raw.gslb.as_ref(), &services)?;
    Ok(Config {
        interface: raw.interface,
        xdp_mode: globals.xdp_mode,
        pin_dir: globals.pin_dir,
        state_dir: globals.state_dir,
        admin_token_file: globals.admin_token_file,
        persist_table_entries: globals.persist_table_entries,
        persist_new_bindings_per_cpu_s: globals.persist_new_bindings_per_cpu_s,
        admin_listen: globals.admin_listen,
        drain_timeout: globals.drain_timeout,
        services,
        pools,
        profiles,
        mirroring,
        gslb,
    })
}

/// The top-level settings.
struct Globals {
    xdp_mode: XdpMode,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    admin_token_file: Option<PathBuf>,
    persist_table_entries: u32,
    persist_new_bindings_per_cpu_s: Option<u32>,
    admin_listen: std::net::SocketAddr,
    drain_timeout: std::time::Duration,
}

fn globals(raw: &RawConfig) -> Result<Globals, ConfigError> {
    if raw.interface.is_empty() || raw.interface.len() > 15 || raw.interface.contains(['/', ' ']) {
        return Err(ConfigError::new(
            "interface",
            format!(
                "{:?} is not a valid interface name (1-15 characters, no '/' or space)",
                raw.interface
            ),
        ));
    }
    let xdp_mode = raw.xdp_mode.unwrap_or(XdpMode::Auto);
    let pin_dir = PathBuf::from(raw.pin_dir.as_deref().unwrap_or(lb_common::DEFAULT_PIN_DIR));
    // `..` would let the path leave /sys/fs/bpf while still starting with it.
    if !pin_dir.is_absolute()
        || !pin_dir.starts_with("/sys/fs/bpf")
        || pin_dir == Path::new("/sys/fs/bpf")
        || pin_dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ConfigError::new(
            "pin_dir",
            format!(
                "{}: must be a directory below /sys/fs/bpf, without `..`",
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

    if let Some(n) = raw.persist_new_bindings_per_cpu_s
        && n > MAX_NEW_BINDINGS_PER_CPU_S
    {
        return Err(ConfigError::new(
            "persist_new_bindings_per_cpu_s",
            format!("{n}: must be 0 (no cap) to {MAX_NEW_BINDINGS_PER_CPU_S}"),
        ));
    }
    let drain_timeout_ms = raw.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS);
    if drain_timeout_ms > MAX_DRAIN_TIMEOUT_MS {
        return Err(ConfigError::new(
            "drain_timeout_ms",
            format!("{drain_timeout_ms}: must be 0 to {MAX_DRAIN_TIMEOUT_MS}"),
        ));
    }
    let drain_timeout = std::time::Duration::from_millis(u64::from(drain_timeout_ms));

    let admin_listen = raw.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let admin_listen: std::net::SocketAddr = admin_listen.parse().map_err(|_| {
        ConfigError::new(
            "admin_listen",
            format!("{admin_listen:?} is not an address:port such as 127.0.0.1:9180"),
        )
    })?;
    let (state_dir, admin_token_file) = super::admin::validate(
        raw.state_dir.as_deref(),
        raw.admin_token_file.as_deref(),
        admin_listen,
    )?;
    if state_dir == Path::new("/") {
        return Err(ConfigError::new(
            "state_dir",
            "/: must be a directory of its own",
        ));
    }
    Ok(Globals {
        xdp_mode,
        pin_dir,
        state_dir,
        admin_token_file,
        persist_table_entries,
        persist_new_bindings_per_cpu_s: raw.persist_new_bindings_per_cpu_s,
        admin_listen,
        drain_timeout,
    })
}

/// The pools and their indexes by name.
fn pools(raw: &[RawPool]) -> Result<(Vec<Pool>, HashMap<String, usize>), ConfigError> {
    // Pools.
    let mut pools = Vec::new();
    let mut pool_idx = HashMap::new();
    let mut total_backends = 0usize;
    for (i, p) in raw.iter().enumerate() {
        let at = |f: &str| format!("pools[{i}].{f}");
        check_name(&at("name"), &p.name)?;
        if pool_idx.insert(p.name.clone(), i).is_some() {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate pool name {:?}", p.name),
            ));
        }
        let backends = backends(i, p)?;
        total_backends += backends.len();
        let health_monitor = match &p.health_monitor {
            None => None,
            Some(h) => Some(health_monitor(&format!("pools[{i}].health_monitor"), h)?),
        };
        let algorithm = p.algorithm.unwrap_or(Algorithm::RoundRobin);
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

    Ok((pools, pool_idx))
}

/// The virtual services, with their pool and profile indexes resolved.
fn services(
    raw: &[RawService],
    pool_idx: &HashMap<String, usize>,
    profile_idx: &HashMap<String, usize>,
    profiles: &[PersistenceProfile],
) -> Result<Vec<VirtualService>, ConfigError> {
    if raw.len() > MAX_SERVICES as usize {
        return Err(ConfigError::new(
            "virtual_services",
            format!("{} services: at most {MAX_SERVICES}", raw.len()),
        ));
    }
    let mut services = Vec::new();
    let mut svc_names = HashSet::new();
    let mut listeners = HashMap::new();
    for (i, s) in raw.iter().enumerate() {
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
        let protocol = s.protocol;
        if let Some(prev) = listeners.insert((vip, s.port, protocol), &s.name) {
            return Err(ConfigError::new(
                at("port"),
                format!(
                    "{vip}:{} {} is already served by {prev:?}",
                    s.port,
                    protocol.as_str()
                ),
            ));
        }
        // A `sip-header` profile makes a UDP service L7 (Kemp's "Force L7").
        let sip = s
            .persistence
            .as_ref()
            .and_then(|p| profile_idx.get(p))
            .is_some_and(|&pi| profiles[pi].kind.is_sip());
        let mode = service_mode(i, s, sip)?;
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
        if let (Some(pi), ServiceMode::L7(o)) = (persistence, &mode) {
            let p = &profiles[pi];
            match (p.kind.input(), o.tls_passthrough) {
                (MethodInput::Http, true) => {
                    return Err(ConfigError::new(
                        at("persistence"),
                        format!(
                            "profile {:?} inspects HTTP: a \"tls_passthrough\" service sees only the TLS handshake",
                            p.name
                        ),
                    ));
                }
                (MethodInput::TlsHello, false) => {
                    return Err(ConfigError::new(
                        at("persistence"),
                        format!(
                            "profile {:?} reads the TLS ClientHello: it needs \"tls_passthrough\": true",
                            p.name
                        ),
                    ));
                }
                (MethodInput::TlsSession, _) if o.tls.is_none() => {
                    return Err(ConfigError::new(
                        at("persistence"),
                        format!(
                            "profile {:?} keeps the backend in TLS session tickets: the service needs \"tls\" (TLS terminated by tether)",
                            p.name
                        ),
                    ));
                }
                _ => {}
            }
        }
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

    Ok(services)
}

/// The backends of pool `i`.
fn backends(i: usize, p: &RawPool) -> Result<Vec<BackendConfig>, ConfigError> {
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
        let admin_state = b.admin_state.unwrap_or(AdminState::Enabled);
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
    Ok(backends)
}

/// How service `i` is served: `l4-dsr` takes no proxy settings, `l7` serves HTTP over TCP,
/// or SIP over UDP when `sip` (its profile is `sip-header`).
fn service_mode(i: usize, s: &RawService, sip: bool) -> Result<ServiceMode, ConfigError> {
    let at = |f: &str| format!("virtual_services[{i}].{f}");
    Ok(match s.mode {
        RawMode::L4Dsr => {
            for (field, set) in [
                ("tls", s.tls.is_some()),
                ("tls_passthrough", s.tls_passthrough.is_some()),
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
        RawMode::L7 => {
            if s.protocol == Protocol::Udp {
                udp_l7(&at, s, sip)?;
            } else if sip {
                return Err(ConfigError::new(
                    at("persistence"),
                    "a \"sip-header\" profile reads SIP over UDP: it needs protocol \"udp\"",
                ));
            }
            ServiceMode::L7(l7_options(&format!("virtual_services[{i}]"), s)?)
        }
    })
}

/// An L7 UDP service: SIP with a `sip-header` profile ("Force L7"), served by the UDP
/// proxy. Of the limits only `max_connections` (client flows) and `idle_timeout_ms` apply.
fn udp_l7(at: &dyn Fn(&str) -> String, s: &RawService, sip: bool) -> Result<(), ConfigError> {
    if !sip {
        return Err(ConfigError::new(
            at("protocol"),
            "mode \"l7\" serves HTTP over TCP, and SIP over UDP with a \"sip-header\" persistence profile",
        ));
    }
    let l = s.limits.as_ref();
    for (field, set) in [
        ("tls", s.tls.is_some()),
        ("proxy_protocol", s.proxy_protocol.is_some()),
        (
            "limits.max_header_bytes",
            l.is_some_and(|l| l.max_header_bytes.is_some()),
        ),
        (
            "limits.request_timeout_ms",
            l.is_some_and(|l| l.request_timeout_ms.is_some()),
        ),
        (
            "limits.connect_timeout_ms",
            l.is_some_and(|l| l.connect_timeout_ms.is_some()),
        ),
        (
            "limits.response_timeout_ms",
            l.is_some_and(|l| l.response_timeout_ms.is_some()),
        ),
    ] {
        if set {
            return Err(ConfigError::new(
                at(field),
                "does not apply to a UDP service",
            ));
        }
    }
    Ok(())
}

fn l7_options(base: &str, s: &RawService) -> Result<L7Options, ConfigError> {
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
    let tls_passthrough = s.tls_passthrough.unwrap_or(false);
    if tls_passthrough && tls.is_some() {
        return Err(ConfigError::new(
            at("tls_passthrough"),
            "TLS is either terminated (\"tls\") or passed through, not both",
        ));
    }
    if tls_passthrough
        && s.proxy_protocol
            .as_ref()
            .is_some_and(|v| v != &serde_json::Value::Bool(false))
    {
        return Err(ConfigError::new(
            at("proxy_protocol"),
            "not supported with \"tls_passthrough\" yet",
        ));
    }
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
        tls_passthrough,
        proxy_protocol: super::trusted::proxy_protocol(
            &at("proxy_protocol"),
            s.proxy_protocol.as_ref(),
        )?,
        trusted_forwarders: super::trusted::list(
            &at("trusted_forwarders"),
            s.trusted_forwarders.as_deref().unwrap_or_default(),
        )?,
        limits,
    })
}

fn health_monitor(base: &str, h: &RawHealthMonitor) -> Result<HealthMonitor, ConfigError> {
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
    let kind = check_kind(base, h)?;
    Ok(HealthMonitor {
        kind,
        port: h.port,
        interval,
        timeout,
        rise,
        fall,
    })
}

/// What a monitor checks; fields of another type are refused.
fn check_kind(base: &str, h: &RawHealthMonitor) -> Result<HealthCheckKind, ConfigError> {
    let at = |f: &str| format!("{base}.{f}");
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
    let kind = match h.kind {
        MonitorType::Tcp => {
            refuse(&http_only, "tcp")?;
            refuse(&udp_only, "tcp")?;
            HealthCheckKind::Tcp
        }
        MonitorType::Http | MonitorType::Https => {
            refuse(&udp_only, h.kind.as_str())?;
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
                tls: h.kind == MonitorType::Https,
                path,
                host: h.http_host.clone(),
                expect,
            }
        }
        MonitorType::Udp => {
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
    };
    Ok(kind)
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
