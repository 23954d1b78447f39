//! `?service=NAME&client=ADDR&backend=NAME` into a persistence [`Filter`], against the names
//! of the running configuration.

use std::net::IpAddr;

use crate::{dataplane::persist_table::Filter, state::Snapshot};

/// A request the server refuses with 400; the message names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Decode `%XX` escapes and `+` (space) of a query component.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Encode a query component (everything but unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The raw parameters, each at most once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub service: Option<String>,
    pub client: Option<String>,
    pub backend: Option<String>,
}

pub fn parse_params(query: Option<&str>) -> Result<Params, BadRequest> {
    let mut p = Params::default();
    for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)
            .ok_or_else(|| BadRequest(format!("malformed query parameter {pair:?}")))?;
        let v =
            percent_decode(v).ok_or_else(|| BadRequest(format!("{k}: malformed value {v:?}")))?;
        let slot = match k.as_str() {
            "service" => &mut p.service,
            "client" => &mut p.client,
            "backend" => &mut p.backend,
            other => {
                return Err(BadRequest(format!(
                    "unknown parameter {other:?} (expected service, client or backend)"
                )));
            }
        };
        if v.is_empty() {
            return Err(BadRequest(format!("{k}: empty value")));
        }
        if slot.replace(v).is_some() {
            return Err(BadRequest(format!("{k}: given more than once")));
        }
    }
    Ok(p)
}

/// Resolve names against `snap`. A backend name is looked up in the service's pool when
/// `service` is given, else in every pool (`POOL/NAME` picks one when several have it).
pub fn filter(snap: &Snapshot, query: Option<&str>) -> Result<Filter, BadRequest> {
    let p = parse_params(query)?;
    let cfg = &snap.config;
    let service = match &p.service {
        None => None,
        Some(name) => {
            let i = cfg
                .services
                .iter()
                .position(|s| &s.name == name)
                .ok_or_else(|| BadRequest(format!("service: no virtual service named {name:?}")))?;
            Some(i)
        }
    };
    let client = match &p.client {
        None => None,
        Some(a) => Some(
            a.parse::<IpAddr>()
                .map_err(|_| BadRequest(format!("client: {a:?} is not an IPv4 or IPv6 address")))?,
        ),
    };
    let backend_id = match &p.backend {
        None => None,
        Some(name) => {
            let (pool_name, be_name) = match name.split_once('/') {
                Some((pool, be)) => (Some(pool), be),
                None => (None, name.as_str()),
            };
            let mut found = Vec::new();
            for (pi, pool) in cfg.pools.iter().enumerate() {
                if service.is_some_and(|s| cfg.services[s].pool != pi)
                    || pool_name.is_some_and(|n| n != pool.name)
                {
                    continue;
                }
                if let Some(bi) = pool.backends.iter().position(|b| b.name == be_name)
                    && let Some(&id) = snap.backend_ids.get(pi).and_then(|v| v.get(bi))
                {
                    found.push((pool.name.as_str(), id));
                }
            }
            match found.as_slice() {
                [] => {
                    let scope = match service {
                        Some(s) => format!(
                            " in pool {:?} of service {:?}",
                            cfg.pools[cfg.services[s].pool].name, cfg.services[s].name
                        ),
                        None => String::new(),
                    };
                    return Err(BadRequest(format!(
                        "backend: no backend named {name:?}{scope}"
                    )));
                }
                [(_, id)] => Some(*id),
                several => {
                    let pools: Vec<&str> = several.iter().map(|(p, _)| *p).collect();
                    return Err(BadRequest(format!(
                        "backend: {name:?} is in several pools ({}); give service= or POOL/NAME",
                        pools.join(", ")
                    )));
                }
            }
        }
    };
    let service_index = match service {
        None => None,
        // Never widen a flush to every service because the snapshot is inconsistent.
        Some(i) => Some(*snap.service_index.get(i).ok_or_else(|| {
            BadRequest(format!(
                "service: {:?} has no kernel index yet",
                cfg.services[i].name
            ))
        })?),
    };
    Ok(Filter {
        service_index,
        client,
        backend_id,
    })
}
