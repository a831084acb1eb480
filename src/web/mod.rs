//! The web-security layer serve-guard and annotate share: who is calling (a bearer key, or a
//! browser session started by signing in with one), whether a state-changing request may come
//! from where it came from (Origin, CSRF token, JSON content type), the sign-in throttle, and
//! the accept loop with its connection limits.
//!
//! - [`keys`]: API keys kept as salted hashes, re-read (and revoked) when the file changes.
//! - [`session`]: random session ids with expiry, each with its CSRF token; the throttle.
//! - [`listen`]: HTTP/1.1 with a header-read timeout and caps on half-open and open connections.
//!
//! The rules, for every unsafe method (anything but GET, HEAD, OPTIONS):
//! - an `Origin` (or, without one, a `Referer`) naming another site is refused before the
//!   handler runs ([`refuse_cross_site`]);
//! - a form posted by a browser session must carry the session's CSRF token and name this
//!   site in `Origin` or `Referer` ([`Gate::check_form`]);
//! - a JSON endpoint takes only `Content-Type: application/json` (a cross-site page can send
//!   `text/plain` without asking; JSON needs a CORS preflight no server here answers), and
//!   with a session cookie the request must name this site too ([`Gate::check_json`]).

pub mod keys;
pub mod listen;
pub mod session;

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::error::{Result, usage};
use keys::{Caller, KeyFile, Role};
use listen::ConnectionLimits;
use session::{LoginThrottle, Sessions, ThrottleRate};

/// A request refused, with its status, a machine-readable code and a sentence for people.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refusal { status, code, message: message.into(), retry_after: None }
    }

    pub fn no_key() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.")
    }

    pub fn unknown_key() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "Incorrect API key provided.")
    }

    pub fn session_gone() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "Your session has expired or its key was revoked; sign in again.")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "insufficient_permissions", message)
    }

    pub fn cross_site() -> Self {
        Self::new(StatusCode::FORBIDDEN, "cross_site_request", "This request comes from another site (Origin); it is refused.")
    }

    pub fn bad_csrf() -> Self {
        Self::new(StatusCode::FORBIDDEN, "csrf_token_invalid", "The form's CSRF token is missing or not this session's; reload the page.")
    }

    pub fn not_json() -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "Send the body as JSON with `Content-Type: application/json`.")
    }

    pub fn throttled(seconds: u64) -> Self {
        Refusal {
            retry_after: Some(seconds),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_sign_in_attempts", format!("Too many failed sign-ins from this address; try again in {seconds} s."))
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": "invalid_request_error", "code": self.code}})
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// How a request proved who it is.
#[derive(Clone, Debug, PartialEq)]
pub enum Via {
    /// The server runs without keys (serve-guard only).
    Open,
    /// `Authorization: Bearer KEY`: a script.
    Bearer,
    /// The session cookie: a browser, whose forms carry `csrf`.
    Session { id: String, csrf: String },
}

#[derive(Clone, Debug)]
pub struct Principal {
    /// `None` on a server without keys.
    pub caller: Option<Caller>,
    pub via: Via,
}

impl Principal {
    /// The caller's name (`anonymous` on an open server).
    pub fn name(&self) -> String {
        self.caller.as_ref().map_or_else(|| "anonymous".to_string(), |c| c.name.clone())
    }

    /// The CSRF token forms of this session carry.
    pub fn csrf(&self) -> Option<&str> {
        match &self.via {
            Via::Session { csrf, .. } => Some(csrf),
            _ => None,
        }
    }

    /// Refuse (403) a caller whose role is not one of `roles`; an open server lets all in.
    pub fn require(&self, roles: &[Role]) -> std::result::Result<(), Refusal> {
        match &self.caller {
            Some(c) if !roles.contains(&c.role) => {
                let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
                Err(Refusal::forbidden(format!("This endpoint needs a {} key.", names.join(" or "))))
            }
            _ => Ok(()),
        }
    }
}

/// Keys, sessions and the sign-in throttle of one server.
pub struct Gate {
    keys: Option<KeyFile>,
    sessions: Sessions,
    throttle: LoginThrottle,
}

impl Gate {
    pub fn new(keys: Option<KeyFile>, cookie: &'static str, session_lifetime: Duration) -> Self {
        Gate { keys, sessions: Sessions::new(cookie, session_lifetime), throttle: LoginThrottle::new(ThrottleRate::default()) }
    }

    pub fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// Who is calling: the bearer key when one is sent, else the session cookie.
    pub fn identify(&self, headers: &HeaderMap) -> std::result::Result<Principal, Refusal> {
        let Some(keys) = &self.keys else { return Ok(Principal { caller: None, via: Via::Open }) };
        if let Some(key) = bearer(headers) {
            let caller = keys.check(&key).ok_or_else(Refusal::unknown_key)?;
            return Ok(Principal { caller: Some(caller), via: Via::Bearer });
        }
        let Some(id) = cookie(headers, self.sessions.cookie) else { return Err(Refusal::no_key()) };
        match self.sessions.get(&id) {
            Some(session) if keys.holds(&session.caller) => Ok(Principal { caller: Some(session.caller), via: Via::Session { id, csrf: session.csrf } }),
            Some(_) => {
                self.sessions.end(&id);
                Err(Refusal::session_gone())
            }
            None => Err(Refusal::session_gone()),
        }
    }

    /// Sign in with `key` from `peer`: the caller, if one of `roles`, and the `Set-Cookie`
    /// value of a new session. An address with too many failures is refused before the key
    /// is looked at.
    pub fn sign_in(&self, peer: IpAddr, key: &str, roles: &[Role]) -> std::result::Result<(Caller, String), Refusal> {
        self.throttle.check(peer).map_err(Refusal::throttled)?;
        let Some(keys) = &self.keys else { return Err(Refusal::forbidden("This server runs without keys; there is nothing to sign in to.")) };
        let Some(caller) = keys.check(key.trim()) else {
            self.throttle.failed(peer);
            return Err(Refusal::unknown_key());
        };
        Principal { caller: Some(caller.clone()), via: Via::Bearer }.require(roles)?;
        let (_, cookie) = self.sessions.start(caller.clone());
        Ok((caller, cookie))
    }

    /// End the request's session; the `Set-Cookie` value that removes the cookie.
    pub fn sign_out(&self, headers: &HeaderMap) -> String {
        if let Some(id) = cookie(headers, self.sessions.cookie) {
            self.sessions.end(&id);
        }
        self.sessions.clear_cookie()
    }

    /// A form post: a browser session must send its CSRF token, and a browser (session or
    /// open server) must name this site in `Origin` or `Referer`.
    pub fn check_form(&self, principal: &Principal, headers: &HeaderMap, token: Option<&str>) -> std::result::Result<(), Refusal> {
        if let Via::Session { csrf, .. } = &principal.via {
            if !token.is_some_and(|t| keys::same(t.as_bytes(), csrf.as_bytes())) {
                return Err(Refusal::bad_csrf());
            }
        }
        if principal.via != Via::Bearer && same_origin(headers) != Some(true) {
            return Err(Refusal::cross_site());
        }
        Ok(())
    }

    /// A JSON post: `application/json`, and from this site when sent with the session cookie.
    pub fn check_json(&self, principal: &Principal, headers: &HeaderMap) -> std::result::Result<(), Refusal> {
        require_json(headers)?;
        if matches!(principal.via, Via::Session { .. }) && same_origin(headers) != Some(true) {
            return Err(Refusal::cross_site());
        }
        Ok(())
    }
}

/// The key of `Authorization: Bearer KEY` (a bare key is accepted too).
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or(value).trim();
    Some(key.to_string())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('=').map(str::to_string))
        .filter(|v| !v.is_empty())
}

/// Whether the request names this site (the `Host` it was sent to) as where it comes from:
/// `Origin`, else `Referer`; `None` when it sends neither.
pub fn same_origin(headers: &HeaderMap) -> Option<bool> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let host = text(header::HOST);
    let ours = |origin: &str| host.is_some_and(|h| origin == format!("http://{h}") || origin == format!("https://{h}"));
    if let Some(origin) = text(header::ORIGIN) {
        return Some(ours(origin));
    }
    let referer = text(header::REFERER)?;
    let origin_end = referer.find("://").map(|i| i + 3).map(|start| referer[start..].find('/').map_or(referer.len(), |j| start + j));
    Some(origin_end.is_some_and(|end| ours(&referer[..end])))
}

/// `Content-Type: application/json` (parameters such as `charset` allowed).
pub fn require_json(headers: &HeaderMap) -> std::result::Result<(), Refusal> {
    let media = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(';').next()).map(|m| m.trim().to_ascii_lowercase());
    if media.as_deref() == Some("application/json") { Ok(()) } else { Err(Refusal::not_json()) }
}

/// Middleware: refuse a state-changing request that says it comes from another site, before
/// any handler (and so before any body is read or any work done).
pub async fn refuse_cross_site(request: Request, next: Next) -> Response {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && same_origin(request.headers()) == Some(false) {
        return Refusal::cross_site().into_response();
    }
    next.run(request).await
}

/// The connection and session flags both servers take.
#[derive(clap::Args, Serialize, Clone, Debug)]
pub struct WebArgs {
    /// Seconds a client has to send a request's headers (an idle keep-alive connection is closed after it too).
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Connections still sending their first request's headers, at most (the oldest is closed when another comes).
    #[arg(long, default_value_t = 128)]
    pub max_half_open: usize,
    /// Open connections at most (more are closed at once).
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Hours a browser session lasts after signing in.
    #[arg(long, default_value_t = 12.0)]
    pub session_hours: f64,
}

impl WebArgs {
    pub fn limits(&self) -> Result<ConnectionLimits> {
        if !(self.header_timeout > 0.0 && self.header_timeout.is_finite()) {
            return Err(usage("--header-timeout must be a positive number of seconds"));
        }
        if self.max_half_open == 0 || self.max_connections == 0 {
            return Err(usage("--max-half-open and --max-connections must be at least 1"));
        }
        Ok(ConnectionLimits { header_timeout: Duration::from_secs_f64(self.header_timeout), max_half_open: self.max_half_open, max_connections: self.max_connections })
    }

    pub fn session_lifetime(&self) -> Result<Duration> {
        if !(self.session_hours > 0.0 && self.session_hours <= 24.0 * 365.0) {
            return Err(usage("--session-hours must be more than 0 and at most a year"));
        }
        Ok(Duration::from_secs_f64(self.session_hours * 3600.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn origin_is_this_host_or_not() {
        let host = (header::HOST, "127.0.0.1:8090");
        assert_eq!(same_origin(&headers(&[host.clone(), (header::ORIGIN, "http://127.0.0.1:8090")])), Some(true));
        assert_eq!(same_origin(&headers(&[host.clone(), (header::ORIGIN, "http://127.0.0.1:9999")])), Some(false), "another port is another site");
        assert_eq!(same_origin(&headers(&[host.clone(), (header::ORIGIN, "null")])), Some(false));
        assert_eq!(same_origin(&headers(&[host.clone(), (header::REFERER, "http://127.0.0.1:8090/admin?x=1")])), Some(true));
        assert_eq!(same_origin(&headers(&[host.clone(), (header::REFERER, "http://127.0.0.1:8090.evil.test/")])), Some(false));
        assert_eq!(same_origin(&headers(std::slice::from_ref(&host))), None);
        assert_eq!(same_origin(&headers(&[(header::ORIGIN, "http://127.0.0.1:8090")])), Some(false), "no Host to compare with");
    }

    #[test]
    fn json_means_application_json() {
        assert!(require_json(&headers(&[(header::CONTENT_TYPE, "application/json; charset=utf-8")])).is_ok());
        assert!(require_json(&headers(&[(header::CONTENT_TYPE, "Application/JSON")])).is_ok());
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonp"] {
            assert_eq!(require_json(&headers(&[(header::CONTENT_TYPE, bad)])).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        assert!(require_json(&HeaderMap::new()).is_err());
    }

    #[test]
    fn sessions_need_their_token_and_this_site() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        const ROLES: &[Role] = &[Role::Annotator, Role::Admin];
        let key = keys::add(&path, "ana", Role::Annotator, ROLES).unwrap();
        let gate = Gate::new(Some(KeyFile::open(&path, ROLES, "test").unwrap()), "t_session", Duration::from_secs(60));
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(gate.sign_in(peer, &key, &[Role::Admin]).unwrap_err().status, StatusCode::FORBIDDEN);
        let (_, set_cookie) = gate.sign_in(peer, &key, ROLES).unwrap();
        let id = set_cookie.split(';').next().unwrap().to_string();
        let host = (header::HOST, "127.0.0.1:1");
        let browser = headers(&[host.clone(), (header::COOKIE, &id), (header::ORIGIN, "http://127.0.0.1:1")]);
        let principal = gate.identify(&browser).unwrap();
        assert_eq!(principal.name(), "ana");
        let token = principal.csrf().unwrap().to_string();
        assert!(gate.check_form(&principal, &browser, Some(&token)).is_ok());
        assert_eq!(gate.check_form(&principal, &browser, None), Err(Refusal::bad_csrf()));
        assert_eq!(gate.check_form(&principal, &browser, Some("0000")), Err(Refusal::bad_csrf()));
        let no_origin = headers(&[host.clone(), (header::COOKIE, &id)]);
        assert_eq!(gate.check_form(&principal, &no_origin, Some(&token)), Err(Refusal::cross_site()));
        assert_eq!(gate.check_json(&principal, &no_origin).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // A bearer key needs no token or origin: it is a script.
        let script = headers(&[(header::AUTHORIZATION, &format!("Bearer {key}")), (header::CONTENT_TYPE, "application/json")]);
        let principal = gate.identify(&script).unwrap();
        assert!(gate.check_form(&principal, &script, None).is_ok() && gate.check_json(&principal, &script).is_ok());
        assert_eq!(gate.identify(&headers(&[(header::COOKIE, "t_session=forged")])).unwrap_err().status, StatusCode::UNAUTHORIZED);
        // Signing out ends the session.
        gate.sign_out(&browser);
        assert_eq!(gate.identify(&browser).unwrap_err(), Refusal::session_gone());
    }
}
