//! The agent's loopback HTTP endpoint: routes, their JSON answers, and the limits that keep a
//! hostile or careless client from exhausting the agent (connections, requests at once, body
//! size, header and request timeouts). docs/agent.md lists the API and the limits.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::shared::{Origin, Shared, StartError};
use super::{AgentError, IngestError, Labelled, RunProgress, RunSummary};
use crate::config::HttpConfig;
use crate::protocol::VersionRef;

type SharedState = State<Arc<Shared>>;

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// A JSON `{"error": ...}` answer; the console's API answers errors the same way.
pub(super) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(ErrorBody { error: message.to_string(), detail: None })).into_response()
}

/// The endpoint's routes with its limits: bodies are capped, a request that takes longer than
/// `request_timeout_s` gets 503, and every error, the framework's own included, is a JSON
/// `{"error": ...}`.
///
/// A queue of `max_requests` places (more get 503 with Retry-After before their body is read)
/// holds the requests that carry an image (classify, label); status, the run's state,
/// cancel, adapt and rollback are small and answered beside it, so a full queue never hides the
/// agent's state. A body must arrive within `header_timeout_s` once its request holds a place in
/// the queue, so that slow senders cannot keep the places.
pub fn router(shared: Arc<Shared>, limits: &HttpConfig) -> Router {
    let queue = Queue {
        permits: Arc::new(Semaphore::new(limits.max_requests)),
        max_body: limits.max_body_bytes,
        body_timeout: Duration::from_secs(limits.header_timeout_s),
    };
    let timeout = Duration::from_secs(limits.request_timeout_s);
    let queued = Router::new()
        .route("/v1/classify", post(http_classify))
        .route("/v1/label", post(http_label))
        .layer(middleware::from_fn(move |request: Request, next: Next| queue.clone().admit(request, next)));
    Router::new()
        .route("/v1/status", get(http_status))
        .route("/v1/adapt", post(http_adapt).get(http_adapt_state))
        .route("/v1/adapt/cancel", post(http_cancel))
        .route("/v1/rollback", post(http_rollback))
        .merge(queued)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see docs/agent.md for the API") })
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes as usize))
        .layer(middleware::from_fn(move |request: Request, next: Next| async move {
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, format!("no answer within {} s", timeout.as_secs())),
            }
        }))
        .layer(middleware::from_fn(json_errors))
        .with_state(shared)
}

/// The classification queue: places for requests that carry an image.
#[derive(Clone)]
struct Queue {
    permits: Arc<Semaphore>,
    max_body: u64,
    body_timeout: Duration,
}

impl Queue {
    /// Admits a request: 413 at once for a declared body over the limit, 503 with Retry-After
    /// when every place is taken, 408 when the body does not arrive in time; otherwise the
    /// request runs with its body read.
    async fn admit(self, request: Request, next: Next) -> Response {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body) {
            return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body exceeds {} bytes", self.max_body));
        }
        let Ok(_permit) = self.permits.try_acquire_owned() else {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "busy: too many requests at once; try again");
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        };
        let (parts, body) = request.into_parts();
        let read = tokio::time::timeout(self.body_timeout, axum::body::to_bytes(body, self.max_body as usize)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            // Within its declared length, a body that fails to arrive whole was cut off.
            Ok(Err(_)) if declared.is_some() => return error(StatusCode::BAD_REQUEST, "the body was cut off"),
            Ok(Err(_)) => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body exceeds {} bytes", self.max_body));
            }
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {} s", self.body_timeout.as_secs()),
                );
            }
        };
        next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
    }
}

/// Answers a connection over the limit with 503 and Retry-After without reading its request,
/// then reads and drops what the client sends for a moment so that it gets the answer.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"error":"busy: too many connections at once; try again"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(answer.as_bytes()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 16 * 1024];
    let _ =
        tokio::time::timeout(REFUSE_DRAIN, async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} })
            .await;
}

/// Largest framework error text kept when it is turned into JSON.
const ERROR_TEXT_LIMIT: usize = 4096;

/// Makes the framework's own rejections (bad query, 405, 413, ...) JSON like ours.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, ERROR_TEXT_LIMIT).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut json = error(status, text);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// Connections over the limit that are still being answered 503; beyond this many they are
/// closed without an answer.
const REFUSING: usize = 1024;
/// How long a refused connection's request is read (and dropped) after the 503, so that the
/// client sees the answer rather than a reset.
const REFUSE_DRAIN: Duration = Duration::from_secs(2);

/// Serves `app`: at most `max_connections` connections (more are answered 503 with
/// Retry-After and closed), and a connection that does not send a request's headers within
/// `header_timeout_s`, or sits idle that long between requests, is closed. With `tls`, each
/// connection is TLS, and one whose handshake takes longer than `header_timeout_s` is closed.
pub async fn serve(listener: TcpListener, app: Router, limits: HttpConfig, tls: Option<tokio_rustls::TlsAcceptor>) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let header_timeout = Duration::from_secs(limits.header_timeout_s);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, typically: wait for some to be freed.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            if let Ok(permit) = Arc::clone(&refusing).try_acquire_owned() {
                tokio::spawn(async move {
                    let _permit = permit;
                    refuse_connection(stream).await;
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let served = match tls {
                None => builder.serve_connection(TokioIo::new(stream), service).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => builder.serve_connection(TokioIo::new(stream), service).await,
                    Ok(Err(error)) => return tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => return tracing::debug!("TLS handshake timed out"),
                },
            };
            if let Err(error) = served {
                tracing::debug!(%error, "HTTP connection ended");
            }
        });
    }
}

/// Runs blocking agent work off the async threads; a panic becomes a 500.
pub(super) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("request failed: {e}")))
}

async fn http_status(State(shared): SharedState) -> Response {
    match blocking(move || shared.status()).await {
        Ok(Ok(status)) => axum::Json(status).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct ClassifyQuery {
    top: Option<usize>,
    name: Option<String>,
}

async fn http_classify(State(shared): SharedState, Query(query): Query<ClassifyQuery>, body: Bytes) -> Response {
    let result = blocking(move || {
        let name = query.name.unwrap_or_else(|| "request body".into());
        shared.lock().classify(&[(name.as_str(), &body)], query.top.unwrap_or(3).clamp(1, 100)).remove(0)
    })
    .await;
    match result {
        Ok(Ok(prediction)) => axum::Json(prediction).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct LabelQuery {
    class: Option<String>,
    name: Option<String>,
}

async fn http_label(State(shared): SharedState, Query(query): Query<LabelQuery>, body: Bytes) -> Response {
    let Some(class) = query.class else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter `class`");
    };
    let result = blocking(move || {
        let name = query.name.unwrap_or_else(|| "request body".into());
        let item = Labelled { what: &name, bytes: &body, class: &class };
        shared.lock().ingest(&[item], "http").remove(0)
    })
    .await;
    match result {
        Ok(Ok(ingested)) => axum::Json(ingested).into_response(),
        Ok(Err(e)) => {
            let status = match e {
                IngestError::Duplicate { .. } => StatusCode::CONFLICT,
                IngestError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            let detail = serde_json::to_value(&e).ok();
            (status, axum::Json(ErrorBody { error: e.to_string(), detail })).into_response()
        }
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct AdaptQuery {
    method: Option<String>,
    /// Adapt even when the run would repeat the newest version.
    #[serde(default)]
    force: bool,
}

async fn http_adapt(State(shared): SharedState, Query(query): Query<AdaptQuery>) -> Response {
    match blocking(move || shared.start_run(query.method.as_deref(), query.force, Origin::Command)).await {
        Ok(Ok((_, progress))) => (StatusCode::ACCEPTED, axum::Json(progress)).into_response(),
        Ok(Err(e @ (StartError::Busy(_) | StartError::Deploying(_)))) => error(StatusCode::CONFLICT, e),
        Ok(Err(StartError::Agent(e @ AgentError::NothingNew(_)))) => (
            StatusCode::CONFLICT,
            axum::Json(ErrorBody { error: e.to_string(), detail: Some(serde_json::json!({ "kind": "nothing_new" })) }),
        )
            .into_response(),
        Ok(Err(StartError::Agent(e @ AgentError::Adapt(_) | e @ AgentError::Input(_)))) => {
            error(StatusCode::BAD_REQUEST, e)
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(response) => response,
    }
}

/// The run in progress and the last finished one.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunState {
    pub running: Option<RunProgress>,
    pub last: Option<Result<RunSummary, String>>,
}

async fn http_adapt_state(State(shared): SharedState) -> Response {
    axum::Json(RunState { running: shared.run_progress(), last: shared.last_result() }).into_response()
}

async fn http_cancel(State(shared): SharedState) -> Response {
    axum::Json(serde_json::json!({ "cancelled": shared.cancel_run() })).into_response()
}

#[derive(Deserialize)]
struct RollbackQuery {
    to: Option<String>,
}

async fn http_rollback(State(shared): SharedState, Query(query): Query<RollbackQuery>, body: Bytes) -> Response {
    // Rolling back is never a default: the target must be named, where the docs say.
    if !body.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the target goes in the query (`?to=source` or `?to=N`), not the body");
    }
    let Some(to) = query.to else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter `to` (`source` or a version number)");
    };
    let to = match to.parse::<VersionRef>() {
        Ok(to) => to,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match blocking(move || shared.lock().rollback(to)).await {
        Ok(Ok(serving)) => axum::Json(serde_json::json!({ "serving": serving })).into_response(),
        Ok(Err(e @ AgentError::Store(crate::store::StoreError::NoSuchVersion(_)))) => error(StatusCode::NOT_FOUND, e),
        Ok(Err(e @ AgentError::Store(crate::store::StoreError::Rejected { .. }))) => error(StatusCode::CONFLICT, e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(response) => response,
    }
}
