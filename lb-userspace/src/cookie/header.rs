//! `Set-Cookie` rendering and `Cookie` request header parsing (RFC 6265).

use std::fmt::Write as _;

/// The `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SameSite {
    Lax,
    Strict,
    /// Browsers ignore `SameSite=None` without `Secure`, so [`SetCookie::render`] always adds
    /// `Secure` with it: such a cookie is then only sent over HTTPS.
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// An invalid [`SetCookie`] field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetCookieError {
    #[error("cookie name {0:?} is not an RFC 6265 token")]
    Name(String),
    #[error("cookie value has a character outside RFC 6265 cookie-octets")]
    Value,
    #[error("cookie path {0:?} has a control character or ';'")]
    Path(String),
    #[error("cookie domain {0:?} is not a host name")]
    Domain(String),
}

/// One `Set-Cookie` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    /// Seconds; `None`: a session cookie, dropped when the browser closes.
    pub max_age: Option<u64>,
    pub path: Option<String>,
    pub domain: Option<String>,
    pub http_only: bool,
    pub secure: bool,
    /// `Some(SameSite::None)` implies `Secure`.
    pub same_site: Option<SameSite>,
}

impl SetCookie {
    /// A session cookie for the whole site: `Path=/` (without it a browser scopes the cookie
    /// to the directory of the request that set it, and persistence would break across
    /// paths) and `HttpOnly` (scripts have no use for a persistence cookie); no `Max-Age`,
    /// `Domain`, `Secure` or `SameSite`.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            max_age: None,
            path: Some("/".to_owned()),
            domain: None,
            http_only: true,
            secure: false,
            same_site: None,
        }
    }

    /// Checks every field can be rendered as RFC 6265 syntax (configuration loading should
    /// call this once per profile, with a placeholder value).
    pub fn validate(&self) -> Result<(), SetCookieError> {
        if !valid_cookie_name(&self.name) {
            return Err(SetCookieError::Name(self.name.clone()));
        }
        if !valid_cookie_value(&self.value) {
            return Err(SetCookieError::Value);
        }
        if let Some(path) = &self.path
            && (path.is_empty()
                || path
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b';' || !b.is_ascii()))
        {
            return Err(SetCookieError::Path(path.clone()));
        }
        if let Some(domain) = &self.domain {
            let host = domain.strip_prefix('.').unwrap_or(domain);
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(SetCookieError::Domain(domain.clone()));
            }
        }
        Ok(())
    }

    /// The header value, attributes in a fixed order:
    /// `name=value; Max-Age=N; Path=p; Domain=d; Secure; HttpOnly; SameSite=S`, each only
    /// when set. `Secure` is also rendered for `SameSite=None`. Fields are written verbatim:
    /// check them once with [`SetCookie::validate`].
    pub fn render(&self) -> String {
        debug_assert_eq!(self.validate(), Ok(()), "rendering an invalid Set-Cookie");
        let mut s = String::with_capacity(
            self.name.len()
                + self.value.len()
                + self.path.as_ref().map_or(0, |p| p.len())
                + self.domain.as_ref().map_or(0, |d| d.len())
                + 80,
        );
        s.push_str(&self.name);
        s.push('=');
        s.push_str(&self.value);
        if let Some(max_age) = self.max_age {
            let _ = write!(s, "; Max-Age={max_age}");
        }
        if let Some(path) = &self.path {
            s.push_str("; Path=");
            s.push_str(path);
        }
        if let Some(domain) = &self.domain {
            s.push_str("; Domain=");
            s.push_str(domain);
        }
        if self.secure || self.same_site == Some(SameSite::None) {
            s.push_str("; Secure");
        }
        if self.http_only {
            s.push_str("; HttpOnly");
        }
        if let Some(same_site) = self.same_site {
            s.push_str("; SameSite=");
            s.push_str(same_site.as_str());
        }
        s
    }
}

/// RFC 6265 `cookie-name`: a non-empty RFC 7230 token (no separators, spaces or controls).
pub fn valid_cookie_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(is_tchar)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 6265 `cookie-value`: cookie-octets, optionally in double quotes.
fn valid_cookie_value(value: &str) -> bool {
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    inner
        .bytes()
        .all(|b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Non-empty `;`-separated pairs, trimmed, across several header values.
struct RawPairs<'a, I> {
    headers: I,
    rest: &'a [u8],
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for RawPairs<'a, I> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            if self.rest.is_empty() {
                self.rest = self.headers.next()?;
                continue;
            }
            let (pair, rest) = match self.rest.iter().position(|&b| b == b';') {
                Some(i) => (&self.rest[..i], &self.rest[i + 1..]),
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            let pair = trim_ows(pair);
            if !pair.is_empty() {
                return Some(pair);
            }
        }
    }
}

/// Name and value of a pair, trimmed; `None` without `=`.
fn split_pair(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = pair.iter().position(|&b| b == b'=')?;
    Some((trim_ows(&pair[..eq]), trim_ows(&pair[eq + 1..])))
}

/// The `(name, value)` pairs of one or more `Cookie` header values, in order; see
/// [`cookies`].
pub struct Cookies<'a, I> {
    pairs: RawPairs<'a, I>,
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for Cookies<'a, I> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        for pair in self.pairs.by_ref() {
            let Some((name, value)) = split_pair(pair) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            if let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) {
                return Some((name, value));
            }
        }
        None
    }
}

/// The `(name, value)` pairs of the `Cookie` header values of a request, in order. Several
/// values (HTTP/2 clients send one per cookie, RFC 9113 section 8.2.3) are one list, as if
/// joined with `"; "`. Spaces and tabs around pairs, names and values are ignored, as are
/// empty pairs, pairs without `=` or with an empty name, and pairs that are not UTF-8.
/// Values are returned as sent (a quoted value keeps its quotes). Never panics.
///
/// With a `HeaderMap`: `cookies(headers.get_all(COOKIE).iter().map(|v| v.as_bytes()))`.
pub fn cookies<'a, I>(header_values: I) -> Cookies<'a, I::IntoIter>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    Cookies {
        pairs: RawPairs {
            headers: header_values.into_iter(),
            rest: &[],
        },
    }
}

/// The values of every cookie named `name`, in order (a client may send several: one per
/// path or domain that set it, or one planted by a sibling subdomain).
pub fn find_all<'a, I>(header_values: I, name: &str) -> impl Iterator<Item = &'a str>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    cookies(header_values).filter_map(move |(n, v)| (n == name).then_some(v))
}

/// The `Cache-Control` value for a response that sets a persistence cookie, so no shared
/// cache stores the cookie and hands it to other clients (HAProxy's `nocache`), given the
/// response's own values (`None`: keep them as they are):
/// - none: `private`;
/// - one that already forbids shared caching (`private`, `no-store` or `no-cache`, with or
///   without a value): unchanged;
/// - others: `private` first, then the response's directives without `public`.
pub fn private_cache_control<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let directives: Vec<&str> = values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let name = |d: &str| {
        d.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    if directives
        .iter()
        .any(|d| matches!(name(d).as_str(), "private" | "no-store" | "no-cache"))
    {
        return None;
    }
    let mut out = String::from("private");
    for d in directives.iter().filter(|d| name(d) != "public") {
        out.push_str(", ");
        out.push_str(d);
    }
    Some(out)
}

/// Value of the first cookie named `name` (names are case-sensitive).
pub fn find<'a, I>(header_values: I, name: &str) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    cookies(header_values).find_map(|(n, v)| (n == name).then_some(v))
}

/// The `Cookie` header value to forward: every pair of every value, joined with `"; "`,
/// except those named `name`; `None` when nothing is left (drop the header). Other pairs are
/// kept in order and as sent (only spaces around them and empty pairs are dropped),
/// including pairs [`cookies`] skips (not UTF-8, no `=`), so the result is bytes: use
/// `HeaderValue::from_bytes`. A pair named `name` goes whatever its value.
pub fn strip<'a, I>(header_values: I, name: &str) -> Option<Vec<u8>>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let pairs = RawPairs {
        headers: header_values.into_iter(),
        rest: &[],
    };
    let mut out = Vec::new();
    for pair in pairs {
        if split_pair(pair).is_some_and(|(n, _)| n == name.as_bytes()) {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(pair);
    }
    (!out.is_empty()).then_some(out)
}
