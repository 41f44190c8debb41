//! The console's JSON API under `/console/api` (docs/console.md lists it). Labels go through
//! the same ingest as every other origin; runs and rollbacks through the same calls as the
//! HTTP API and MQTT commands, with the user recorded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{Console, User, blocking, error, signin};
use crate::adapt::queue::{self, Candidate, Labelled as Known, Pick};
use crate::agent::shared::{Origin, Shared, StartError};
use crate::agent::{AgentError, IngestError, Labelled};
use crate::protocol::VersionRef;
use crate::store::{StoreError, TrafficImage};

/// Images a traffic listing returns at most.
const MAX_LISTED: usize = 1000;

const QUEUE_RULE: &str = "where a label most likely completes a class: images grouped by the model's guess, \
                          each group judged by the model and the answers given for it, classes short of the \
                          labels they need to take part in a run first, then the classes with the fewest; \
                          the newest image of a group first; near-duplicates left out";

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/console/api/session", get(signin::session))
        .route("/console/api/login", post(signin::login))
        .route("/console/api/logout", post(signin::logout))
        .route("/console/api/traffic", get(traffic))
        .route("/console/api/queue", get(label_queue))
        .route("/console/api/traffic/{id}/thumbnail", get(thumbnail))
        .route("/console/api/traffic/{id}/image", get(image))
        .route("/console/api/traffic/{id}/label", post(label))
        .route("/console/api/traffic/{id}/skip", post(skip))
        .route("/console/api/classes", get(classes))
        .route("/console/api/adapt", post(adapt).get(adapt_state))
        .route("/console/api/adapt/events", get(adapt_events))
        .route("/console/api/versions", get(versions))
        .route("/console/api/rollback", post(rollback))
        .route("/console/api/device", get(device))
}

/// Blocking agent work off the async threads, with its error as the answer: a panic is a 500,
/// an agent error the status [`agent_error`] gives it. Handlers end their happy path with `?`.
async fn agent_work<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, Response> {
    blocking(work).await?.map_err(agent_error)
}

fn agent_error(e: AgentError) -> Response {
    match e {
        e @ AgentError::Store(StoreError::NoSuchVersion(_)) => error(StatusCode::NOT_FOUND, e),
        e @ AgentError::Store(StoreError::Rejected { .. }) => error(StatusCode::CONFLICT, e),
        e @ (AgentError::Input(_) | AgentError::NothingNew(_)) => error(StatusCode::BAD_REQUEST, e),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
struct TrafficQuery {
    limit: Option<usize>,
    class: Option<String>,
    max_confidence: Option<f32>,
    #[serde(default)]
    unlabelled: bool,
}

async fn traffic(State(console): State<Console>, Query(query): Query<TrafficQuery>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let limit = query.limit.unwrap_or(200).min(MAX_LISTED);
    let (all, kept_limit) = agent_work(move || {
        let mut agent = shared.lock();
        let kept_limit = agent.config().console.keep_images;
        agent.flush_images()?;
        let all = agent.store().traffic_images(MAX_LISTED)?;
        Ok((all, kept_limit))
    })
    .await?;
    let count = all.len();
    let images: Vec<TrafficImage> = all
        .into_iter()
        .filter(|i| query.class.as_ref().is_none_or(|c| &i.predicted == c))
        .filter(|i| query.max_confidence.is_none_or(|m| i.confidence <= m))
        .filter(|i| !query.unlabelled || (i.sample.is_none() && !i.skipped))
        .take(limit)
        .collect();
    Ok(Json(json!({ "images": images, "kept": { "count": count, "limit": kept_limit } })).into_response())
}

#[derive(Deserialize)]
struct QueueQuery {
    limit: Option<usize>,
}

async fn label_queue(State(console): State<Console>, Query(query): Query<QueueQuery>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let limit = query.limit.unwrap_or(50).min(MAX_LISTED);
    let (images, counts, min_samples) = agent_work(move || {
        let mut agent = shared.lock();
        let min_samples = agent.policy()?.min_samples_per_class;
        agent.flush_images()?;
        let counts = agent.store().sample_counts()?;
        let images = agent.store().traffic_images(MAX_LISTED)?;
        Ok((images, counts, min_samples))
    })
    .await?;
    let known = Known {
        per_class: counts.iter().map(|(class, (train, _))| (class.clone(), *train)).collect(),
        hashes: images.iter().filter(|i| i.sample.is_some()).filter_map(|i| i.dhash).collect(),
        min_samples,
        answered: images
            .iter()
            .filter(|i| i.sample.is_some() || i.skipped)
            .map(|i| (i.predicted.clone(), i.label.clone()))
            .collect(),
    };
    let open: Vec<&TrafficImage> = images.iter().filter(|i| i.sample.is_none() && !i.skipped).collect();
    let candidates: Vec<Candidate> = open
        .iter()
        .map(|i| Candidate { id: i.id, predicted: i.predicted.clone(), top: i.top.clone(), dhash: i.dhash })
        .collect();
    let by_id: HashMap<i64, &TrafficImage> = open.iter().map(|i| (i.id, *i)).collect();
    let queue: Vec<serde_json::Value> = queue::next_to_label(&candidates, &known, limit)
        .into_iter()
        .map(|pick: Pick| json!({ "image": by_id[&pick.id], "reason": pick.reason, "likely": pick.likely }))
        .collect();
    Ok(Json(json!({ "rule": QUEUE_RULE, "queue": queue })).into_response())
}

fn gone(id: i64) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("image {id} is no longer kept (the console keeps only the newest images; see console.keep_images)"),
    )
}

/// An image's bytes with the type its first bytes say.
fn image_response(bytes: Vec<u8>) -> Response {
    let content_type = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        _ => "application/octet-stream",
    };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "private, max-age=3600")], bytes).into_response()
}

async fn thumbnail(State(console): State<Console>, Path(id): Path<i64>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let found = agent_work(move || {
        let mut agent = shared.lock();
        match agent.store().traffic_thumbnail(id)? {
            Some(preview) if !preview.is_empty() => Ok(Some(preview)),
            // No preview yet (or none could be made): the image itself.
            _ => Ok(agent.store().traffic_image(id)?.map(|(_, bytes)| bytes)),
        }
    })
    .await?;
    Ok(found.map_or_else(|| gone(id), image_response))
}

async fn image(State(console): State<Console>, Path(id): Path<i64>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let found = agent_work(move || Ok(shared.lock().store().traffic_image(id)?)).await?;
    Ok(found.map_or_else(|| gone(id), |(_, bytes)| image_response(bytes)))
}

#[derive(Deserialize)]
struct LabelBody {
    class: String,
}

/// Labels a kept image: the same checks, store and events as a label from any other origin,
/// with the user recorded.
async fn label(
    State(console): State<Console>,
    Extension(User(user)): Extension<User>,
    Path(id): Path<i64>,
    body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Response> {
    let Json(LabelBody { class }) =
        body.map_err(|e| error(StatusCode::BAD_REQUEST, format!("the body must be {{\"class\": NAME}}: {e}")))?;
    let shared = Arc::clone(&console.shared);
    let outcome = agent_work(move || {
        let mut agent = shared.lock();
        let Some((kept, bytes)) = agent.store().traffic_image(id)? else { return Ok(None) };
        let what = format!("recent image {id} ({})", kept.name);
        let item = Labelled { what: &what, bytes: &bytes, class: &class };
        let result = agent.ingest_by(&[item], "console", Some(&user)).remove(0);
        match &result {
            Ok(ingested) => agent.store().mark_traffic_labelled(id, ingested.id)?,
            // Already a sample: this image is done either way.
            Err(IngestError::Duplicate { id: sample, .. }) => agent.store().mark_traffic_labelled(id, *sample)?,
            Err(_) => {}
        }
        Ok(Some(result))
    })
    .await?;
    match outcome {
        Some(Ok(ingested)) => Ok(Json(json!({ "sample": ingested })).into_response()),
        Some(Err(e)) => {
            let status = match e {
                IngestError::Duplicate { .. } => StatusCode::CONFLICT,
                IngestError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            Err(error(status, e))
        }
        None => Err(gone(id)),
    }
}

async fn skip(State(console): State<Console>, Path(id): Path<i64>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    if agent_work(move || Ok(shared.lock().store().skip_traffic_image(id)?)).await? {
        Ok(Json(json!({ "skipped": id })).into_response())
    } else {
        Err(error(StatusCode::NOT_FOUND, format!("image {id} is no longer kept, or is labelled already")))
    }
}

async fn classes(State(console): State<Console>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let (min, classes, counts) = agent_work(move || {
        let mut agent = shared.lock();
        let min = agent.policy()?.min_samples_per_class;
        let classes = agent.classes().to_vec();
        let counts = agent.store().sample_counts()?;
        Ok((min, classes, counts))
    })
    .await?;
    let rows: Vec<serde_json::Value> = classes
        .iter()
        .map(|class| {
            let (train, validation) = counts.get(class).copied().unwrap_or((0, 0));
            json!({
                "class": class, "train": train, "validation": validation,
                "takes_part": train >= min, "missing": min.saturating_sub(train),
            })
        })
        .collect();
    Ok(Json(json!({ "min_samples": min, "classes": rows })).into_response())
}

async fn adapt(State(console): State<Console>, Extension(User(user)): Extension<User>) -> Response {
    let shared = Arc::clone(&console.shared);
    match blocking(move || shared.start_run_by(None, false, Origin::Console, Some(&user))).await {
        Ok(Ok((_, progress))) => (StatusCode::ACCEPTED, Json(json!({ "started": progress }))).into_response(),
        Ok(Err(e @ (StartError::Busy(_) | StartError::Deploying(_)))) => error(StatusCode::CONFLICT, e),
        Ok(Err(StartError::Agent(e))) => agent_error(e),
        Err(response) => response,
    }
}

fn run_state(shared: &Shared) -> serde_json::Value {
    let last = match shared.last_result() {
        Some(Ok(summary)) => json!(summary),
        Some(Err(error)) => json!({ "error": error }),
        None => serde_json::Value::Null,
    };
    json!({ "running": shared.run_progress(), "last": last })
}

async fn adapt_state(State(console): State<Console>) -> Response {
    Json(run_state(&console.shared)).into_response()
}

/// How often the progress stream looks at the run.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Server-sent events: `progress` while a run goes, then `done` with its result; `idle` when
/// none was going.
async fn adapt_events(State(console): State<Console>) -> Response {
    let shared = Arc::clone(&console.shared);
    let stream = futures_util::stream::unfold((shared, None, false), |(shared, last, ended)| async move {
        if ended {
            return None;
        }
        loop {
            let running = shared.run_progress();
            match (&running, &last) {
                (Some(progress), _) if Some(progress) != last.as_ref() => {
                    let event = SseEvent::default().event("progress").json_data(progress).expect("serialises");
                    return Some((Ok::<_, Infallible>(event), (shared, running, false)));
                }
                (None, None) => {
                    let event = SseEvent::default().event("idle").data("{}");
                    return Some((Ok(event), (shared, None, true)));
                }
                (None, Some(_)) => {
                    let state = run_state(&shared);
                    let event = SseEvent::default().event("done").json_data(&state["last"]).expect("serialises");
                    return Some((Ok(event), (shared, None, true)));
                }
                _ => tokio::time::sleep(PROGRESS_EVERY).await,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn versions(State(console): State<Console>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let (serving, records) = agent_work(move || {
        let mut agent = shared.lock();
        let serving = agent.serving();
        let records = agent.store().versions()?;
        Ok((serving, records))
    })
    .await?;
    let versions: Vec<serde_json::Value> = records
        .iter()
        .map(|v| {
            let counts = &v.sample_set["counts"];
            json!({
                "id": v.id, "parent": v.parent, "status": v.status, "method": v.method,
                "created_ms": v.created_ms, "reasons": v.reasons, "metrics": v.metrics,
                "samples": if counts.is_null() { serde_json::Value::Null } else { counts.clone() },
            })
        })
        .collect();
    Ok(Json(json!({ "serving": serving, "versions": versions })).into_response())
}

#[derive(Deserialize)]
struct RollbackBody {
    to: String,
}

async fn rollback(
    State(console): State<Console>,
    Extension(User(user)): Extension<User>,
    body: Result<Json<RollbackBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Response> {
    let Ok(Json(RollbackBody { to })) = body else {
        return Err(error(StatusCode::BAD_REQUEST, "the body must be {\"to\": \"source\" | \"previous\" | N}"));
    };
    let to = to.parse::<VersionRef>().map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let shared = Arc::clone(&console.shared);
    let serving = agent_work(move || shared.lock().rollback(to)).await?;
    tracing::info!(%user, serving, "rolled back from the console");
    Ok(Json(json!({ "serving": serving })).into_response())
}

async fn device(State(console): State<Console>) -> Result<Response, Response> {
    let shared = Arc::clone(&console.shared);
    let (status, events, data_dir, mqtt) = agent_work(move || {
        let status = shared.status()?;
        let mut agent = shared.lock();
        let events = agent.store().recent_events(20)?;
        let data_dir = agent.config().data_dir.clone();
        let mqtt = agent.config().mqtt.clone();
        Ok((status, events, data_dir, mqtt))
    })
    .await?;
    let data_bytes = data_dir.as_deref().map(folder_bytes);
    Ok(Json(json!({
        "device_id": status.device_id, "bundle": status.bundle, "provider": status.provider,
        "serving": status.serving, "data_bytes": data_bytes,
        "undelivered_events": status.undelivered_events,
        "fleet": {
            "enabled": mqtt.enabled,
            "broker": if mqtt.enabled { Some(mqtt.broker) } else { None },
            "link": console.shared.link_health(),
        },
        "classification": status.classification, "events": events,
    }))
    .into_response())
}

/// Bytes of the regular files directly in `folder` and one level down (the store and its
/// journal, the logs), without following links.
fn folder_bytes(folder: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(folder)
        .max_depth(2)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_file())
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}
