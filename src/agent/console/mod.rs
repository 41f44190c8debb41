//! The on-site console: a page served by the agent where site staff label recent traffic,
//! adapt, judge the result and roll back (docs/console.md).
//!
//! Every asset is in the binary. Every answer carries a Content-Security-Policy without inline
//! script; a request must name one of the console's own hosts (against DNS rebinding); every
//! change needs the session's CSRF token in `X-CSRF-Token`; images are reached by id only.

mod api;
pub mod recent;
pub mod sessions;
mod signin;
pub mod tls;
pub mod users;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::shared::Shared;
use sessions::{Refusal, Sessions};
use users::{Lockout, Users};

/// The session cookie's name.
pub const COOKIE: &str = "edgeadapt_console";
/// Sessions kept at once; beyond, the least recently used ends.
const MAX_SESSIONS: usize = 64;
/// A session ends after this long without a request.
const IDLE_MS: i64 = 12 * 3_600_000;

const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Who may sign in, and the failed sign-ins so far; shared by the console's listeners so that
/// guesses on both count together.
#[derive(Clone)]
pub struct Auth {
    users: Arc<Users>,
    lockout: Arc<Mutex<Lockout>>,
}

impl Auth {
    pub fn new(users: Users, lockout_failures: usize, lockout_minutes: u64) -> Auth {
        let window_ms = lockout_minutes as i64 * 60_000;
        Auth { users: Arc::new(users), lockout: Arc::new(Mutex::new(Lockout::new(lockout_failures, window_ms))) }
    }
}

/// Where a console router serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The agent's loopback endpoint: sign-in only when users exist; requests must name a
    /// loopback host.
    Loopback,
    /// The site network over TLS: always sign-in, Secure cookies.
    Site,
}

#[derive(Clone)]
pub(super) struct Console {
    shared: Arc<Shared>,
    sessions: Arc<Mutex<Sessions>>,
    auth: Auth,
    listener: Listener,
}

impl Console {
    /// Whether a browser must sign in here.
    fn needs_sign_in(&self) -> bool {
        self.listener == Listener::Site || !self.auth.users.is_empty()
    }
}

/// Host names a loopback request may name (with any port).
const LOOPBACK_HOSTS: [&str; 3] = ["127.0.0.1", "localhost", "[::1]"];

/// The console's routes under `/console` for one listener.
pub fn router(shared: Arc<Shared>, auth: Auth, listener: Listener) -> Router {
    let console =
        Console { shared, sessions: Arc::new(Mutex::new(Sessions::new(MAX_SESSIONS, IDLE_MS))), auth, listener };
    let assets = Router::new()
        .route("/console", get(|| async { axum::response::Redirect::permanent("/console/") }))
        .route("/console/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/console/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }));
    Router::new()
        .merge(assets)
        .merge(api::routes())
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

pub(super) use super::http::{blocking, error};

/// The host a request names, without its port.
fn host_name(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let name = match host.strip_prefix('[') {
        Some(rest) => format!("[{}]", rest.split(']').next()?),
        None => host.split(':').next()?.to_string(),
    };
    Some(name.to_ascii_lowercase())
}

/// The session token in the request's cookie.
pub(super) fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

/// Who is asking, as the guard found it.
#[derive(Clone, Debug)]
pub(super) struct User(pub String);

/// Checks the host, the session (except to start one) and, for changes, the CSRF token; adds
/// the security headers to every answer.
async fn guard(State(console): State<Console>, mut request: Request, next: Next) -> Response {
    let mut response = 'answer: {
        let loopback_host = host_name(request.headers()).is_some_and(|host| LOOPBACK_HOSTS.contains(&host.as_str()));
        if console.listener == Listener::Loopback && !loopback_host {
            break 'answer error(StatusCode::MISDIRECTED_REQUEST, "the console answers only to its own host names");
        }
        let path = request.uri().path();
        if !path.starts_with("/console/api/") || ["/console/api/session", "/console/api/login"].contains(&path) {
            break 'answer next.run(request).await;
        }
        let token = session_token(request.headers());
        let csrf = request.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_string);
        let changes = request.method() != Method::GET && request.method() != Method::HEAD;
        let now = crate::store::now_ms();
        let found = {
            let mut sessions = console.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let session = if changes {
                sessions.authorise_change(token.as_deref(), csrf.as_deref(), now)
            } else {
                sessions.find(token.as_deref(), now)
            };
            session.map(|s| s.user.clone())
        };
        match found {
            Ok(user) => {
                request.extensions_mut().insert(User(user));
                next.run(request).await
            }
            Err(Refusal::NoSession) => error(StatusCode::UNAUTHORIZED, "not signed in, or the session expired"),
            Err(Refusal::Csrf) => error(
                StatusCode::FORBIDDEN,
                "the request lacks this session's CSRF token; nothing was changed (reload the page)",
            ),
        }
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_host_is_read_without_its_port() {
        assert_eq!(host_name(&headers(&[("host", "127.0.0.1:8470")])).as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name(&headers(&[("host", "LocalHost")])).as_deref(), Some("localhost"));
        assert_eq!(host_name(&headers(&[("host", "[::1]:8470")])).as_deref(), Some("[::1]"));
        assert_eq!(host_name(&headers(&[("host", "evil.example:8470")])).as_deref(), Some("evil.example"));
        assert_eq!(host_name(&headers(&[])), None);
    }

    #[test]
    fn the_session_token_is_found_among_cookies() {
        let found = session_token(&headers(&[("cookie", "a=1; edgeadapt_console=tok; b=2")]));
        assert_eq!(found.as_deref(), Some("tok"));
        let found = session_token(&headers(&[("cookie", "a=1"), ("cookie", "edgeadapt_console=t2")]));
        assert_eq!(found.as_deref(), Some("t2"));
        assert_eq!(session_token(&headers(&[("cookie", "edgeadapt_consolex=no")])), None);
    }
}
