//! Key-based persistence: a key taken from the request is hashed onto the pool's Maglev
//! table (the same on every instance), and with `sticky` each key also keeps its backend for
//! `timeout_s`, so a change of the backend set moves no live key. Kemp's hash methods (all
//! cookies, Super HTTP, URL, Host, query item, selected header) are sticky; Avi's consistent
//! hash is the hash alone.

use std::{net::IpAddr, time::Duration};

use super::{Context, Key, Lookup, Method, TableRef, from_table, store};
use crate::{
    config::KeySource,
    config::Pool,
    cookie,
    engine::{
        input::Input,
        table::{Table, digest},
    },
};

pub struct KeyHash {
    source: KeySource,
    /// digest(key) -> backend identity, when sticky.
    table: Option<Table<u128>>,
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The input's key for `source`; `None` when it has none.
pub fn key_of(source: &KeySource, input: &Input<'_>) -> Option<Vec<u8>> {
    let client = input.client();
    match source {
        KeySource::AllCookies => {
            let mut k = Vec::new();
            for (_, v) in cookie::cookies(input.cookie_headers()) {
                k.extend_from_slice(v.as_bytes());
                k.push(0);
            }
            (!k.is_empty()).then_some(k)
        }
        KeySource::SuperHttp { with_source_ip } => {
            let ua = input.header("user-agent")?;
            // Kemp: with "MSRPC" in the User-Agent the key is the Authorization value, or
            // blank (zero length) when there is none.
            let mut k = if ua.windows(5).any(|w| w == b"MSRPC") {
                input.header("authorization").unwrap_or_default().to_vec()
            } else {
                ua.to_vec()
            };
            if *with_source_ip {
                k.push(0);
                k.extend(ip_bytes(client.ip()));
            }
            Some(k)
        }
        KeySource::Url => input.path_and_query().map(|pq| pq.as_bytes().to_vec()),
        KeySource::Host => input.host().map(<[u8]>::to_vec),
        KeySource::QueryItem(name) => input.query_item(name).map(|v| v.as_bytes().to_vec()),
        KeySource::Header(name) => input.header(name).map(<[u8]>::to_vec),
        KeySource::SourceIp => Some(ip_bytes(client.ip())),
        KeySource::Sni => input.sni().map(|s| s.as_bytes().to_vec()),
        KeySource::SourceIpPort => {
            let mut k = ip_bytes(client.ip());
            k.extend_from_slice(&client.port().to_be_bytes());
            Some(k)
        }
    }
}

impl KeyHash {
    pub fn new(source: &KeySource, sticky: bool, capacity: usize, timeout: Duration) -> Self {
        KeyHash {
            source: source.clone(),
            table: sticky.then(|| Table::new(capacity, timeout)),
        }
    }
}

impl Method for KeyHash {
    fn kind(&self) -> &'static str {
        match (&self.source, self.table.is_some()) {
            (_, false) => "consistent-hash",
            (KeySource::AllCookies, true) => "all-cookies",
            (KeySource::SuperHttp { .. }, true) => "super-http",
            (KeySource::Url, true) => "url-hash",
            (KeySource::Host, true) => "host-header",
            (KeySource::QueryItem(_), true) => "query-item",
            (KeySource::Header(_), true) => "header",
            (KeySource::SourceIp | KeySource::SourceIpPort | KeySource::Sni, true) => {
                "consistent-hash"
            }
        }
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        let Some(k) = key_of(&self.source, input) else {
            return Lookup {
                binding: None,
                key: Key::Missing,
            };
        };
        Lookup {
            binding: self
                .table
                .as_ref()
                .and_then(|t| from_table(t, &digest(&k), cx)),
            key: Key::Hash(k),
        }
    }

    fn table_id(&self) -> String {
        let source = match &self.source {
            KeySource::AllCookies => "all-cookies".to_string(),
            KeySource::SuperHttp { with_source_ip } => format!("super-http:{with_source_ip}"),
            KeySource::Url => "url".into(),
            KeySource::Host => "host".into(),
            KeySource::QueryItem(q) => format!("query:{q}"),
            KeySource::Header(h) => format!("header:{h}"),
            KeySource::SourceIp => "source-ip".into(),
            KeySource::SourceIpPort => "source-ip-port".into(),
            KeySource::Sni => "sni".into(),
        };
        format!("{}:{source}", self.kind())
    }

    fn stored_keys(&self, _: &Input<'_>, lookup: &Lookup) -> Vec<u128> {
        match (&self.table, &lookup.key) {
            (Some(_), Key::Hash(k)) => vec![digest(k)],
            _ => Vec::new(),
        }
    }

    fn tables(&self) -> Vec<TableRef<'_>> {
        self.table.iter().map(TableRef::Keys).collect()
    }

    fn record(&self, input: &Input<'_>, lookup: &Lookup, identity: u32, cx: &Context<'_>) {
        if let (Some(t), Key::Hash(k)) = (&self.table, &lookup.key) {
            store(t, digest(k), identity, input.client().ip(), cx);
        }
    }
}
