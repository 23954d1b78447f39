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

impl HttpCookie {
    /// The backend identity a cookie value names, if it opens, has not expired (by its own
    /// lifetime, or a session cookie by `session_max_age`) and is this pool's.
    fn open(&self, v: &str, cx: &Context<'_>, now: u64) -> Result<u32, Reject> {
        let p = cookie::decode(
            &self.keys.load(),
            &self.profile.cookie_name,
            cx.service,
            v,
            now,
        )?;
        if p.pool != cx.pool_id {
            return Err(Reject::ForeignService);
        }
        if self.profile.max_lifetime.is_none()
            && now.saturating_sub(p.issued_at) >= self.profile.session_max_age.as_secs()
        {
            return Err(Reject::Expired);
        }
        Ok(p.backend)
    }
}

impl Method for HttpCookie {
    fn kind(&self) -> &'static str {
        "http-cookie"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        let name = self.profile.cookie_name.as_str();
        let now = unix_now();
        // Several cookies may carry the name (another path or a sibling domain set one, or a
        // client planted one in front): the first that opens, is current and is this pool's
        // wins. When none does, the first one's reason is counted.
        let mut first: Option<(String, Reject)> = None;
        let mut chosen: Option<(String, u32)> = None;
        for v in input.cookies_named(name) {
            match self.open(v, cx, now) {
                Ok(identity) => {
                    chosen = Some((v.to_owned(), identity));
                    break;
                }
                Err(r) if first.is_none() => first = Some((v.to_owned(), r)),
                Err(_) => {}
            }
        }
        // On a retry the cookie was stripped by the first attempt: use what it saw.
        if chosen.is_none()
            && first.is_none()
            && let Some(v) = input
                .http_request()
                .and_then(|r| r.extensions.get::<StrippedCookie>())
                .map(|s| s.0.clone())
        {
            match self.open(&v, cx, now) {
                Ok(identity) => chosen = Some((v, identity)),
                Err(r) => first = Some((v, r)),
            }
        }
        let binding = chosen.as_ref().map(|(_, id)| Binding::Identity(*id));
        let presented = match (chosen, first) {
            (Some((v, _)), _) => Some(v),
            (None, Some((v, r))) => {
                cx.stats.reject(r);
                Some(v)
            }
            (None, None) => None,
        };
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
            // A shared cache must not keep one client's persistence cookie for others.
            let existing: Vec<String> = head
                .headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            if let Some(cc) = cookie::private_cache_control(existing.iter().map(String::as_str))
                && let Ok(v) = HeaderValue::from_str(&cc)
            {
                head.headers.insert(header::CACHE_CONTROL, v);
            }
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
