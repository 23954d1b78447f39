//! Client side of the admin API for the `tether` CLI: one blocking HTTP/1.1 request per
//! command (no runtime needed), rendered as text. By default over the daemon's Unix socket;
//! over TCP with the bearer token.

use std::{
    fmt::{self, Write as _},
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use lb_common::reason;

use super::{api, query::percent_encode};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A walk of a large persistence table takes seconds.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bigger answers are refused (10 000 persistence rows are about 3 MB).
const MAX_RESPONSE: u64 = 64 << 20;

/// Where the CLI reaches the daemon.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The daemon's Unix socket (the default).
    Unix(PathBuf),
    /// `admin_listen`, with the bearer token.
    Tcp { addr: SocketAddr, token: String },
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

impl Endpoint {
    fn hint(&self) -> String {
        match self {
            Endpoint::Unix(_) => {
                "is tether running with this config, and are you root (the socket is 0600)?".into()
            }
            Endpoint::Tcp { addr, .. } => format!("is tether running? admin_listen is {addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin API at {admin}: {source}; {hint}", hint = admin.hint())]
    Unreachable {
        admin: Endpoint,
        source: std::io::Error,
    },
    #[error("admin API at {admin}: {source}")]
    Io {
        admin: Endpoint,
        source: std::io::Error,
    },
    #[error("admin API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("admin API: malformed response: {0}")]
    Protocol(String),
    #[error("admin API: unexpected JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request, `Connection: close`, body read to its end.
pub fn request(admin: &Endpoint, method: &str, path_and_query: &str) -> Result<Reply, CliError> {
    request_with_body(admin, method, path_and_query, None)
}

/// One request with an optional JSON body.
pub fn request_with_body(
    admin: &Endpoint,
    method: &str,
    path_and_query: &str,
    json: Option<&[u8]>,
) -> Result<Reply, CliError> {
    let io = |source| CliError::Io {
        admin: admin.clone(),
        source,
    };
    let unreachable = |source| CliError::Unreachable {
        admin: admin.clone(),
        source,
    };
    let (host, auth) = match admin {
        Endpoint::Unix(_) => ("localhost".to_string(), String::new()),
        Endpoint::Tcp { addr, token } => (
            addr.to_string(),
            format!("Authorization: Bearer {token}\r\n"),
        ),
    };
    let (len, ctype) = match json {
        Some(b) => (b.len(), "Content-Type: application/json\r\n"),
        None => (0, ""),
    };
    let mut req = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\n{auth}User-Agent: tether-cli\r\n\
         Accept: */*\r\n{ctype}Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(json.unwrap_or_default());
    let mut raw = Vec::new();
    match admin {
        Endpoint::Unix(path) => {
            let mut s = UnixStream::connect(path).map_err(unreachable)?;
            s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
            s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
            s.write_all(&req).map_err(io)?;
            s.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(io)?;
        }
        Endpoint::Tcp { addr, .. } => {
            let mut s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).map_err(unreachable)?;
            s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
            s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
            s.write_all(&req).map_err(io)?;
            s.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(io)?;
        }
    }
    parse_response(&raw)
}

/// Parse a whole HTTP/1.1 response (Content-Length, chunked, or up to the close).
pub fn parse_response(raw: &[u8]) -> Result<Reply, CliError> {
    let bad = |m: &str| CliError::Protocol(m.into());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(bad(&format!("status line {status_line:?}")));
    }
    let status: u16 = code
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("status line {status_line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(bad(&format!("header line {l:?}")));
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<usize>().map_err(|_| bad("Content-Length"))?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("chunked body"))?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| bad("body shorter than Content-Length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply { status, body })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// A successful answer's body, or the server's one-line error.
fn call(admin: &Endpoint, method: &str, path_and_query: &str) -> Result<Vec<u8>, CliError> {
    let r = request(admin, method, path_and_query)?;
    if r.status != 200 {
        return Err(CliError::Status {
            status: r.status,
            body: String::from_utf8_lossy(&r.body).trim().to_string(),
        });
    }
    Ok(r.body)
}

fn filter_query(service: Option<&str>, client: Option<IpAddr>, backend: Option<&str>) -> String {
    let client = client.map(|c| c.to_string());
    let parts: Vec<String> = [
        ("service", service),
        ("client", client.as_deref()),
        ("backend", backend),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={}", percent_encode(v))))
    .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// `tether status`: services, their backends and the XDP verdicts.
pub fn status(admin: &Endpoint) -> Result<String, CliError> {
    Ok(render_status(&fetch_status(admin)?))
}

/// `GET /status`, parsed.
pub fn fetch_status(admin: &Endpoint) -> Result<api::Status, CliError> {
    let body = call(admin, "GET", "/status")?;
    Ok(serde_json::from_slice(&body)?)
}

/// `tether persist list`: one line per entry.
pub fn persist_list(
    admin: &Endpoint,
    service: Option<&str>,
    client: Option<IpAddr>,
    backend: Option<&str>,
) -> Result<String, CliError> {
    let q = filter_query(service, client, backend);
    let body = call(admin, "GET", &format!("/persist{q}"))?;
    Ok(render_persist(&serde_json::from_slice(&body)?))
}

/// `tether persist flush`: deletes the matching entries (all without a filter).
pub fn persist_flush(
    admin: &Endpoint,
    service: Option<&str>,
    client: Option<IpAddr>,
    backend: Option<&str>,
) -> Result<String, CliError> {
    let q = filter_query(service, client, backend);
    let body = call(admin, "POST", &format!("/persist/flush{q}"))?;
    let r: api::FlushReply = serde_json::from_slice(&body)?;
    Ok(render_flush(&r))
}

/// `1h02m03s`, `4m05s`, `7s`.
pub fn render_flush(r: &api::FlushReply) -> String {
    let mut out = format!(
        "flushed {} persistence entr{}\n",
        r.flushed,
        if r.flushed == 1 { "y" } else { "ies" }
    );
    if r.l7_flushed > 0 {
        let _ = writeln!(
            out,
            "flushed {} L7 binding{}",
            r.l7_flushed,
            if r.l7_flushed == 1 { "" } else { "s" }
        );
    }
    out
}

pub fn duration(s: u64) -> String {
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m{s:02}s"),
        _ => format!("{d}d{h:02}h{m:02}m"),
    }
}

/// `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Columns padded to their widest cell; the first `left` columns left-aligned, the rest
/// (numbers) right-aligned.
fn table(rows: &[Vec<String>], left: usize, indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (c, cell) in r.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            if c < left {
                let _ = write!(line, "{cell:<w$}", w = width[c]);
            } else {
                let _ = write!(line, "{cell:>w$}", w = width[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn render_status(s: &api::Status) -> String {
    let mut out = String::new();
    let entries = s
        .persist_entries
        .map_or("unknown".to_string(), |n| n.to_string());
    let _ = writeln!(
        out,
        "tether: generation {}, {} XDP, up {}, {entries} persistence entries",
        s.generation,
        s.xdp_mode,
        duration(s.uptime_s)
    );
    let t = &s.persist_table;
    let cap = match t.new_bindings_per_cpu_s {
        0 => "no cap on new bindings".to_string(),
        n => format!("at most {n} new bindings/s per CPU"),
    };
    let _ = writeln!(
        out,
        "persistence table: {} entries, {} per CPU ({} possible CPUs), {cap}; created {}, refused by the cap {}, TCP without SYN unbound {}, evicted about {}",
        t.capacity,
        t.per_cpu_capacity,
        t.possible_cpus,
        t.bindings_created,
        t.bindings_rate_limited,
        t.non_syn_unbound,
        t.evictions_estimate
            .map_or("unknown".to_string(), |n| n.to_string())
    );
    if t.binding_events_dropped > 0 {
        let _ = writeln!(
            out,
            "mirroring: {} new XDP bindings not sent to the mirror (ring buffer full); they reach Redis with the next table sweep",
            t.binding_events_dropped
        );
    }
    for svc in &s.services {
        let vip = match svc.vip {
            IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        };
        let persistence = match &svc.persistence {
            Some(p) => format!(
                "persistence {} ({}s, /{} /{}, when down: {})",
                p.profile, p.timeout_s, p.ipv4_prefix, p.ipv6_prefix, p.policy
            ),
            None => "no persistence".into(),
        };
        let c = &svc.counters;
        let _ = writeln!(
            out,
            "\nservice {}  {vip}:{}/{}  pool {}  {persistence}",
            svc.name, svc.port, svc.protocol, svc.pool
        );
        let _ = writeln!(
            out,
            "  packets {}  bytes {}  hits {}  new {}  expired {}  reassigned {}  no backend {}",
            c.packets,
            bytes(c.bytes),
            c.persist_hits,
            c.new_assignments,
            c.expired,
            c.reassigned_down,
            c.no_backend
        );
        if let Some(l7) = &svc.l7 {
            let get = |n: &str| l7.counters.get(n).copied().unwrap_or(0);
            let rejected: u64 = l7
                .counters
                .iter()
                .filter(|(k, _)| k.starts_with("rejected_"))
                .map(|(_, v)| v)
                .sum();
            let _ = writeln!(
                out,
                "  l7: {} bindings  hits {}  new {}  cookies issued {}  learned {}  fallback {}  reassigned {}  refused {}  expired {}  rejected {}",
                l7.entries,
                get("persist_hits"),
                get("new_assignments"),
                get("cookies_issued"),
                get("cookies_learned"),
                get("fallback_hits"),
                get("reassigned_down"),
                get("refused_down"),
                get("expired"),
                rejected
            );
            let _ = writeln!(
                out,
                "  l7 tables: evicted {}  new keys refused (per-source quota) {}",
                get("table_evictions"),
                get("keys_refused"),
            );
            out.push_str(&render_l7_method(l7));
        }
        let mut rows = vec![
            [
                "BACKEND",
                "ADDRESS",
                "STATE",
                "WEIGHT",
                "BOUND",
                "PACKETS",
                "BYTES",
                "HITS",
                "NEW",
                "EXPIRED",
                "REASSIGNED",
            ]
            .map(String::from)
            .to_vec(),
        ];
        if svc.l7.is_some() {
            for h in ["L7 BOUND", "L7 HITS", "L7 NEW", "L7 MOVED OFF", "HEALTH"] {
                rows[0].push(h.into());
            }
        }
        let mut notes = Vec::new();
        for b in &svc.backends {
            let state = if b.admin_state != "enabled" && b.admin_state != b.state {
                format!("{} ({})", b.state, b.admin_state)
            } else {
                b.state.clone()
            };
            let c = &b.counters;
            rows.push(vec![
                b.name.clone(),
                b.address.to_string(),
                state,
                b.weight.to_string(),
                b.bound_clients.map_or("-".into(), |n| n.to_string()),
                c.packets.to_string(),
                bytes(c.bytes),
                c.persist_hits.to_string(),
                c.new_assignments.to_string(),
                c.expired.to_string(),
                c.reassigned_down.to_string(),
            ]);
            if svc.l7.is_some() {
                let l7 = b.l7.unwrap_or_default();
                rows.last_mut().expect("just pushed").extend([
                    b.l7_bound_clients.map_or("-".into(), |n| n.to_string()),
                    l7.hits.to_string(),
                    l7.new_assignments.to_string(),
                    l7.reassigned_down.to_string(),
                    health(b.health.as_ref()).into(),
                ]);
            }
            if let Some(h) = &b.health
                && !h.up
                && !h.detail.is_empty()
            {
                notes.push(format!("  {}: health check failing: {}", b.name, h.detail));
            }
        }
        out.push_str(&table(&rows, 3, "  "));
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }
    let get = |i: u32| {
        s.reasons
            .get(reason::NAMES[i as usize])
            .copied()
            .unwrap_or(0)
    };
    let _ = writeln!(
        out,
        "\nforwarded: {} (tx {}, redirect {})",
        get(reason::TX) + get(reason::REDIRECT),
        get(reason::TX),
        get(reason::REDIRECT)
    );
    let others: Vec<Vec<String>> = (0..reason::COUNT)
        .filter(|&r| r != reason::TX && r != reason::REDIRECT && get(r) > 0)
        .map(|r| vec![reason::NAMES[r as usize].to_string(), get(r).to_string()])
        .collect();
    if others.is_empty() {
        out.push_str("nothing passed or dropped\n");
    } else {
        out.push_str("passed/dropped:\n");
        out.push_str(&table(&others, 1, "  "));
    }
    out
}

/// `up`, `down`, or `-` without a health monitor.
pub fn health(h: Option<&api::HealthStatus>) -> &'static str {
    match h {
        Some(h) if h.up => "up",
        Some(_) => "down",
        None => "-",
    }
}

/// `hits / (hits + new)` as a percentage; `-` when nothing was decided.
pub fn hit_ratio(hits: u64, new: u64) -> String {
    match hits + new {
        0 => "-".into(),
        n => format!("{:.1}%", hits as f64 * 100.0 / n as f64),
    }
}

/// The per-method L7 figures of a service: its decisions, tables and invalid cookies.
fn render_l7_method(l7: &api::L7Status) -> String {
    let get = |n: &str| l7.counters.get(n).copied().unwrap_or(0);
    let (hits, new) = (get("persist_hits"), get("new_assignments"));
    let mut out = format!(
        "  l7 method {}: requests {}  hits {hits}  new {new}  hit ratio {}  expired {}  reassigned (backend down) {}\n",
        l7.method,
        l7.requests,
        hit_ratio(hits, new),
        l7.expirations,
        get("reassigned_down"),
    );
    if !l7.tables.is_empty() {
        let tables: Vec<String> = l7
            .tables
            .iter()
            .map(|t| format!("{} {}/{}", t.table, t.entries, t.capacity))
            .collect();
        let _ = writeln!(out, "  l7 table size: {}", tables.join(", "));
    }
    let invalid: Vec<String> = l7
        .counters
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("rejected_")?, v)))
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let total: u64 = l7
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("rejected_"))
        .map(|(_, v)| v)
        .sum();
    // Only cookie and ticket methods (or a method that somehow saw one) have any to show.
    if invalid.is_empty() {
        if matches!(l7.method.as_str(), "http-cookie" | "tls-ticket") {
            let _ = writeln!(out, "  l7 invalid cookies: {total}");
        }
    } else {
        let _ = writeln!(
            out,
            "  l7 invalid cookies: {total} ({})",
            invalid.join(", ")
        );
    }
    out
}

pub fn render_persist(l: &api::PersistList) -> String {
    let mut rows = vec![
        ["SERVICE", "CLIENT", "BACKEND", "AGE", ""]
            .map(String::from)
            .to_vec(),
    ];
    for e in &l.entries {
        let backend = match (&e.backend, e.backend_address) {
            (Some(n), Some(a)) => format!("{n} ({a})"),
            (Some(n), None) => n.clone(),
            _ => format!("#{} (not configured)", e.backend_id),
        };
        rows.push(vec![
            e.service
                .clone()
                .unwrap_or_else(|| format!("#{} (not configured)", e.service_index)),
            format!("{}/{}", e.client, e.prefix_len),
            backend,
            duration(e.age_s),
            if e.expired {
                "expired".into()
            } else {
                String::new()
            },
        ]);
    }
    let mut out = table(&rows, 3, "");
    let n = l.entries.len();
    let _ = writeln!(
        out,
        "{n} entr{}{}",
        if n == 1 { "y" } else { "ies" },
        if l.truncated {
            " shown; more matched (narrow with a service, client or backend)"
        } else {
            ""
        }
    );
    if !l.l7.is_empty() {
        out.push_str(&render_l7_rows(&l.l7));
    }
    out
}

/// The L7 bindings of `GET /persist`: the client prefix or the key digest, then the backend.
fn render_l7_rows(l7: &[api::L7Row]) -> String {
    let mut rows = vec![
        ["SERVICE", "L7 TABLE", "CLIENT / KEY", "BACKEND", "AGE", ""]
            .map(String::from)
            .to_vec(),
    ];
    for e in l7 {
        let who = match (e.client, e.prefix_len, &e.key_digest) {
            (Some(c), Some(p), _) => format!("{c}/{p}"),
            (_, _, Some(d)) => format!("key {}", &d[..d.len().min(16)]),
            _ => "-".into(),
        };
        let backend = match (&e.backend, e.backend_address) {
            (Some(n), Some(a)) => format!("{n} ({a})"),
            (Some(n), None) => n.clone(),
            _ => "(not configured)".into(),
        };
        let note = match (e.expired, e.open_connections) {
            (true, _) => "expired".to_string(),
            (false, 0) => String::new(),
            (false, n) => format!("{n} open"),
        };
        rows.push(vec![
            e.service.clone(),
            e.table.clone(),
            who,
            backend,
            duration(e.age_s),
            note,
        ]);
    }
    let n = l7.len();
    let mut out = String::from("\n");
    out.push_str(&table(&rows, 4, ""));
    let _ = writeln!(out, "{n} L7 binding{}", if n == 1 { "" } else { "s" });
    out
}
