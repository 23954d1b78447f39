//! Active cookie persistence (Kemp "Active Cookie", Avi "HTTP Cookie"): tether issues an
//! encrypted cookie naming the backend (see `crate::cookie`), honours it on later requests
//! and strips it before the request is forwarded, so backends never see it.

use std::{
    path::Path,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use http::{HeaderValue, header};

use super::{Binding, Context, Decision, Lookup, Method, Reply};
use crate::{
    config::Pool,
    config::{CookieProfile, PersistenceKind, PersistenceProfile},
    cookie::{self, CookieKeys, CookiePayload, KeyError, Reject, SetCookie},
    engine::input::Input,
    state::RouterStats,
};

/// The persistence cookie a lookup removed from the request, kept in its extensions so a
/// retry of the same request still sees it.
#[derive(Clone)]
pub struct StrippedCookie(pub String);

pub struct HttpCookie {
    profile: CookieProfile,
    keys: ArcSwap<CookieKeys>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The configured ring, else the key generated once and kept in `state_dir`.
fn keys(service: &str, c: &CookieProfile, state_dir: &Path) -> Result<CookieKeys, KeyError> {
    if c.keys.is_empty() {
        log::info!(
            "profile of {service}: no cookie keys configured, using the key kept in {}",
            state_dir.display()
        );
        cookie::keyfile::load_or_create(state_dir)
    } else {
        CookieKeys::from_config(&c.keys)
    }
}

impl HttpCookie {
    pub fn new(service: &str, profile: &CookieProfile, state_dir: &Path) -> Result<Self, KeyError> {
        Ok(HttpCookie {
            keys: ArcSwap::from_pointee(keys(service, profile, state_dir)?),
            profile: profile.clone(),
        })
    }
}

impl Method for HttpCookie {
    fn kind(&self) -> &'static str {
        "http-cookie"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        let name = self.profile.cookie_name.as_str();
        // On a retry the cookie was stripped by the first attempt: use what it saw.
        let presented = input.cookie(name).map(str::to_owned).or_else(|| {
            input
                .http_request()
                .and_then(|r| r.extensions.get::<StrippedCookie>())
                .map(|s| s.0.clone())
        });
        let mut binding = None;
        if let Some(v) = &presented {
            match cookie::decode(&self.keys.load(), name, cx.service, v, unix_now()) {
                Ok(p) if p.pool == cx.pool_id => binding = Some(Binding::Identity(p.backend)),
                Ok(_) => cx.stats.reject(Reject::ForeignService),
                Err(r) => cx.stats.reject(r),
            }
        }
        // The persistence cookie is tether's: the backend never sees it.
        if let Some(req) = input.http_request_mut() {
            let stripped = cookie::strip(
                req.headers
                    .get_all(header::COOKIE)
                    .iter()
                    .map(|v| v.as_bytes()),
                name,
            );
            req.headers.remove(header::COOKIE);
            if let Some(rest) = stripped
                && let Ok(v) = HeaderValue::from_bytes(&rest)
            {
                req.headers.insert(header::COOKIE, v);
            }
            if let Some(v) = presented {
                req.extensions.insert(StrippedCookie(v));
            }
        }
        Lookup {
            binding,
            ..Lookup::default()
        }
    }

    fn selection_hint(&self, input: &Input<'_>) -> u64 {
        if self.profile.add_port {
            input.client().port() as u64
        } else {
            0
        }
    }

    /// Set-Cookie when the cookie was missing, invalid or re-bound, or always when asked.
    fn on_reply(&self, d: &Decision, reply: &mut Reply<'_>, cx: &Context<'_>) {
        if d.by_method && !self.profile.always_send {
            return;
        }
        let Reply::Http { head, tls } = reply else {
            return;
        };
        let p = &self.profile;
        let lifetime = p.max_lifetime.map(|l| l.as_secs());
        let payload = CookiePayload::issue(d.identity, cx.pool_id, unix_now(), lifetime);
        let value = cookie::encode(&self.keys.load(), &p.cookie_name, cx.service, &payload);
        let sc = SetCookie {
            name: p.cookie_name.clone(),
            value,
            max_age: lifetime,
            path: Some(p.path.clone()),
            domain: p.domain.clone(),
            http_only: p.http_only,
            secure: p.secure.unwrap_or(*tls),
            same_site: p.same_site,
        };
        if let Ok(v) = HeaderValue::from_str(&sc.render()) {
            head.headers.append(header::SET_COOKIE, v);
            RouterStats::bump(&cx.stats.cookies_issued);
        }
    }

    /// Keys rotate in place: configured ones, or the stored one when they are removed.
    fn update(
        &self,
        service: &str,
        profile: &PersistenceProfile,
        state_dir: &Path,
    ) -> Result<(), KeyError> {
        if let PersistenceKind::HttpCookie(c) = &profile.kind {
            self.keys.store(Arc::new(keys(service, c, state_dir)?));
        }
        Ok(())
    }
}
