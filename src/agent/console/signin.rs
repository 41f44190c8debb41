//! Signing in and out of the console, and the session the page starts from.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;

use super::blocking;
use super::sessions::Session;
use super::{COOKIE, Console, Listener, error, session_token};

/// The user of a console without sign-in (loopback only).
const LOCAL_USER: &str = "local";

fn random_token() -> String {
    hex::encode(rand::rng().random::<[u8; 32]>())
}

/// The session; for a console without sign-in, started here for the local user.
pub(super) async fn session(State(console): State<Console>, headers: axum::http::HeaderMap) -> Response {
    let now = crate::store::now_ms();
    let token = session_token(&headers);
    let found = {
        let mut sessions = console.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.find(token.as_deref(), now) {
            Ok(found) => Some((token.unwrap_or_default(), found.clone(), false)),
            Err(_) if console.needs_sign_in() => None,
            Err(_) => {
                let token = random_token();
                let started = sessions.start(token.clone(), LOCAL_USER, random_token(), now).clone();
                Some((token, started, true))
            }
        }
    };
    match found {
        Some((token, session, new)) => session_answer(&console, token, session, new).await,
        None => (StatusCode::UNAUTHORIZED, Json(json!({ "error": "sign in to use the console", "login": true })))
            .into_response(),
    }
}

#[derive(Deserialize)]
pub(super) struct LoginBody {
    user: String,
    password: String,
}

/// Signs in: a locked name is refused before its password is checked; each failure counts.
pub(super) async fn login(
    State(console): State<Console>,
    body: Result<Json<LoginBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(LoginBody { user, password })) = body else {
        return error(StatusCode::BAD_REQUEST, "the body must be {\"user\": NAME, \"password\": PASSWORD}");
    };
    let now = crate::store::now_ms();
    let locked = console.auth.lockout.lock().unwrap_or_else(|p| p.into_inner()).check(&user, now);
    if let Err(seconds) = locked {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed sign-ins for '{user}'; try again in {seconds} s"),
        );
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return response;
    }
    let users = Arc::clone(&console.auth.users);
    let name = user.clone();
    let verified = match blocking(move || users.verify(&name, &password)).await {
        Ok(verified) => verified,
        Err(response) => return response,
    };
    {
        let mut lockout = console.auth.lockout.lock().unwrap_or_else(|p| p.into_inner());
        if !verified {
            lockout.failed(&user, now);
            tracing::warn!(%user, "console sign-in refused");
            return error(StatusCode::UNAUTHORIZED, "wrong user name or password");
        }
        lockout.succeeded(&user);
    }
    tracing::info!(%user, "signed in to the console");
    let token = random_token();
    let session = {
        let mut sessions = console.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.start(token.clone(), &user, random_token(), now).clone()
    };
    session_answer(&console, token, session, true).await
}

/// What the page needs to start: the user, the CSRF token, the classes; sets the cookie for a
/// new session.
async fn session_answer(console: &Console, token: String, session: Session, new: bool) -> Response {
    let (classes, device_id) = {
        let shared = Arc::clone(&console.shared);
        match blocking(move || {
            let agent = shared.lock();
            (agent.classes().to_vec(), agent.config().device_id.clone())
        })
        .await
        {
            Ok(found) => found,
            Err(response) => return response,
        }
    };
    let body = json!({ "user": session.user, "csrf": session.csrf, "classes": classes, "device_id": device_id });
    let mut response = Json(body).into_response();
    if new {
        let secure = if console.listener == Listener::Site { "; Secure" } else { "" };
        let cookie = format!("{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict{secure}");
        response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("a plain cookie"));
    }
    response
}

pub(super) async fn logout(State(console): State<Console>, headers: axum::http::HeaderMap) -> Response {
    if let Some(token) = session_token(&headers) {
        console.sessions.lock().unwrap_or_else(|p| p.into_inner()).end(&token);
    }
    let mut response = Json(json!({ "signed_out": true })).into_response();
    let secure = if console.listener == Listener::Site { "; Secure" } else { "" };
    let expired = format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&expired).expect("a plain cookie"));
    response
}
