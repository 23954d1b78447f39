//! Server cookie persistence (Kemp "Server Cookie", Avi "App Cookie"): the backend's own
//! session cookie is learned from its `Set-Cookie`, and later requests carrying that value
//! (as a cookie, a query item or a `;name=value` path parameter) go back to it.

use std::time::Duration;

use http::header;

use super::{Context, Decision, Lookup, Method, Reply, TableRef, from_table, store};
use crate::{
    config::AppCookieProfile,
    config::Pool,
    engine::{
        input::Input,
        table::{Table, digest},
    },
    state::RouterStats,
};

pub struct AppCookie {
    cookie_name: String,
    /// digest(value) -> backend identity.
    table: Table<u128>,
}

impl AppCookie {
    pub fn new(profile: &AppCookieProfile, capacity: usize, timeout: Duration) -> Self {
        AppCookie {
            cookie_name: profile.cookie_name.clone(),
            table: Table::new(capacity, timeout),
        }
    }

    fn value<'a>(&self, input: &'a Input<'_>) -> Option<&'a str> {
        session_value(input, &self.cookie_name)
    }
}

/// The app-cookie session value of `input` for cookie `name`: the cookie, else a query item
/// of the same name, else a path parameter (Avi: "look for a URI query of the same name").
/// The cookie's name is exact (RFC 6265); in the URL it is matched without regard to case,
/// because servlet containers rewrite URLs as `;jsessionid=` for the cookie `JSESSIONID`.
/// An empty value is no session: every client sending `JSESSIONID=` would share one.
pub fn session_value<'a>(input: &'a Input<'_>, name: &str) -> Option<&'a str> {
    let named = |(k, v): &(&str, &str)| k.eq_ignore_ascii_case(name) && !v.is_empty();
    input
        .cookie(name)
        .filter(|v| !v.is_empty())
        .or_else(|| input.query_items().find(named).map(|(_, v)| v))
        .or_else(|| input.path_params().find(named).map(|(_, v)| v))
}

impl Method for AppCookie {
    fn kind(&self) -> &'static str {
        "app-cookie"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        Lookup {
            binding: self
                .value(input)
                .and_then(|v| from_table(&self.table, &digest(v.as_bytes()), cx)),
            ..Lookup::default()
        }
    }

    fn stored_keys(&self, input: &Input<'_>, _: &Lookup) -> Vec<u128> {
        self.value(input)
            .map(|v| digest(v.as_bytes()))
            .into_iter()
            .collect()
    }

    fn table_id(&self) -> String {
        format!("app-cookie:{}", self.cookie_name)
    }

    fn tables(&self) -> Vec<TableRef<'_>> {
        vec![TableRef::Keys(&self.table)]
    }

    fn on_reply(&self, d: &Decision, reply: &mut Reply<'_>, cx: &Context<'_>) {
        let Reply::Http { head, .. } = reply else {
            return;
        };
        for v in head.headers.get_all(header::SET_COOKIE) {
            // Set-Cookie: name=value; attributes...
            let Ok(s) = v.to_str() else { continue };
            let pair = s.split(';').next().unwrap_or("");
            if let Some((n, val)) = pair.split_once('=')
                && n.trim() == self.cookie_name
                && !val.trim().is_empty()
            {
                let key = digest(val.trim().as_bytes());
                if store(&self.table, key, d.identity, d.client, cx) {
                    RouterStats::bump(&cx.stats.cookies_learned);
                }
            }
        }
    }
}
