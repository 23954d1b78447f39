//! Scripted persistence (Avi DataScript): a Lua script sees the request (method, path,
//! query, headers, cookies, client address) and names a persistence key, a backend, or
//! nothing. A key is hashed like the key-hash methods' (Maglev, and a sticky table for
//! `timeout_s`); a backend name binds the request to it; nothing leaves the request to the
//! fallback or the pool's balancing. An error, a cut-off (instruction budget, memory cap) or
//! an unknown backend name is counted and treated as nothing: a script never fails a request.

use std::time::Duration;

use super::{Binding, Context, Key, Lookup, Method, TableRef, from_table, store};
use crate::{
    config::{Pool, ScriptProfile},
    cookie,
    engine::{
        input::Input,
        table::{Table, digest},
    },
    script::{Answer, CallError, Request, ScriptPool},
    state::RouterStats,
};

pub struct Script {
    pool: ScriptPool,
    /// digest(key) -> backend identity.
    table: Table<u128>,
}

/// Lua states per script: one per core (requests run on the runtime's worker threads, one
/// script call at a time each), at most 8.
fn states() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

impl Script {
    pub fn new(s: &ScriptProfile, capacity: usize, timeout: Duration) -> Self {
        Script {
            pool: ScriptPool::new(&s.file.display().to_string(), &s.source, s.limits, states()),
            table: Table::new(capacity, timeout),
        }
    }
}

/// What the script sees of `input` (an HTTP request; other inputs show only the client).
fn request<'a>(input: &'a Input<'_>) -> Request<'a> {
    let Some(r) = input.http_request() else {
        return Request {
            client: Some(input.client()),
            ..Request::default()
        };
    };
    Request {
        method: r.method.as_str(),
        path: r.uri.path(),
        query: input.query_items().collect(),
        headers: r
            .headers
            .iter()
            .filter(|(n, _)| *n != http::header::COOKIE)
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect(),
        cookies: cookie::cookies(input.cookie_headers()).collect(),
        client: Some(input.client()),
    }
}

impl Method for Script {
    fn kind(&self) -> &'static str {
        "script"
    }

    fn lookup(&self, input: &mut Input<'_>, pool: &Pool, cx: &Context<'_>) -> Lookup {
        let answer = self.pool.call(&request(input));
        let missing = Lookup {
            binding: None,
            key: Key::Missing,
        };
        match answer {
            Ok(Answer::Nothing) => missing,
            Ok(Answer::Key(k)) => Lookup {
                binding: from_table(&self.table, &digest(&k), cx),
                key: Key::Hash(k),
            },
            Ok(Answer::Backend(name)) => match pool.backends.iter().position(|b| b.name == name) {
                Some(i) => Lookup {
                    binding: Some(Binding::Index(i)),
                    key: Key::NotKeyed,
                },
                None => {
                    log::debug!(
                        "{}: the script named no backend of the pool: {name:?}",
                        cx.service
                    );
                    RouterStats::bump(&cx.stats.script_errors);
                    missing
                }
            },
            Err(e) => {
                log::debug!("{}: script: {e}", cx.service);
                RouterStats::bump(match e {
                    CallError::Budget | CallError::Memory => &cx.stats.script_cutoffs,
                    CallError::Failed(_) => &cx.stats.script_errors,
                });
                missing
            }
        }
    }

    fn record(&self, input: &Input<'_>, lookup: &Lookup, identity: u32, cx: &Context<'_>) {
        if let Key::Hash(k) = &lookup.key {
            store(&self.table, digest(k), identity, input.client().ip(), cx);
        }
    }

    fn stored_keys(&self, _: &Input<'_>, lookup: &Lookup) -> Vec<u128> {
        match &lookup.key {
            Key::Hash(k) => vec![digest(k)],
            _ => Vec::new(),
        }
    }

    /// Its keys' table: listed, saved across restarts and mirrored like the others.
    fn tables(&self) -> Vec<TableRef<'_>> {
        vec![TableRef::Keys(&self.table)]
    }
}
