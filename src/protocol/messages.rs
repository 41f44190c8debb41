//! Payloads of every MQTT message, as JSON. Each carries a `schema` name with a version so a
//! receiver can refuse what it does not understand. docs/mqtt.md shows an example of each.

use crate::protocol::events::EventKind;
use serde::{Deserialize, Serialize};

pub const STATUS_SCHEMA: &str = "edgeadapt.status/1";
pub const METRICS_SCHEMA: &str = "edgeadapt.metrics/1";
pub const EVENT_SCHEMA: &str = "edgeadapt.event/1";
pub const COMMAND_SCHEMA: &str = "edgeadapt.command/1";
pub const RESPONSE_SCHEMA: &str = "edgeadapt.response/1";
pub const WEIGHTS_SCHEMA: &str = "edgeadapt.weights/1";

/// Retained on `status`. The Last Will is the same message with `online: false` and
/// `reason: "connection lost"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusMessage {
    pub schema: String,
    pub device: String,
    pub fleet: String,
    pub online: bool,
    /// `started`, `version changed`, `shutdown` or `connection lost`.
    pub reason: String,
    /// The version served (absent in the Last Will, which is fixed at connect time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The served bundle's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// The served bundle's id (`name@hash` of what it means): two bundles of one name differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub agent: String,
    pub at_ms: i64,
}

/// Published every `metrics_every_s` on `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsMessage {
    pub schema: String,
    pub device: String,
    pub at_ms: i64,
    pub serving: i64,
    /// Labelled samples per class: training, validation.
    pub samples: std::collections::BTreeMap<String, (usize, usize)>,
    pub new_labels_since_last_run: usize,
    pub traffic_samples: usize,
    pub undelivered_events: usize,
    pub classification: crate::protocol::counters::CountersReport,
    /// The served version's gate figures (seen validation accuracy, unseen-rate and reference
    /// health against the source), γ and method; absent for the source model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<serde_json::Value>,
    /// The newest adaptation run's result, promoted or rejected (absent before the first run):
    /// metrics are retained, so a watcher that starts late sees it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_adaptation: Option<AdaptationResult>,
}

/// What an adaptation run ended with, as the fleet shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptationResult {
    pub version: i64,
    pub promoted: bool,
    pub at_ms: i64,
    /// The gate's figures, `[adapted, reference]` pairs (e.g. `seen_validation`, `unseen_rate`).
    pub gate: serde_json::Value,
}

impl AdaptationResult {
    /// From a `version.promoted` or `version.rejected` event; `None` for other events.
    pub fn from_event(event: &EventMessage) -> Option<AdaptationResult> {
        let promoted = match EventKind::parse(&event.kind)? {
            EventKind::VersionPromoted => true,
            EventKind::VersionRejected => false,
            _ => return None,
        };
        Some(AdaptationResult {
            version: event.payload["version"].as_i64()?,
            promoted,
            at_ms: event.at_ms,
            gate: event.payload["metrics"]["gate"].clone(),
        })
    }
}

/// One outbox event on `events`. Delivery is at least once: receivers drop repeated `id`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    pub schema: String,
    pub device: String,
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub payload: serde_json::Value,
}

/// A command on `cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    pub schema: String,
    /// Chosen by the sender, unique per command; a repeated id gets the first answer again.
    pub id: String,
    pub command: String,
    #[serde(default)]
    pub args: serde_json::Value,
    /// The devices the command is for (signed commands only: a device refuses one that does
    /// not name it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// When the command expires, Unix ms (signed commands only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    /// `ed25519:BASE64` from an operator key or `hmac-sha256:HEX` from the fleet key, over
    /// `signing::signed_text` (required when the device trusts any key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The answer to a command, on `response`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseMessage {
    pub schema: String,
    pub device: String,
    /// The command's id (empty when the command was too malformed to have one).
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Describes a weights set on `weights/<version>/manifest`; the chunks follow on
/// `weights/<version>/chunk/<n>` as raw bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsManifest {
    pub schema: String,
    pub device: String,
    pub version: i64,
    pub parent: Option<i64>,
    pub method: String,
    /// The bundle the weights apply to (name and a hash of its files).
    pub bundle: String,
    /// Element type of every tensor in the safetensors payload.
    pub dtype: String,
    pub tensors: Vec<TensorInfo>,
    /// γ, unseen classes and adapter rank: what it takes to serve the weights.
    pub params: serde_json::Value,
    pub total_bytes: usize,
    pub chunk_bytes: usize,
    pub chunks: usize,
    /// Of the whole safetensors payload.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

pub fn response_ok(device: &str, id: &str, result: serde_json::Value) -> ResponseMessage {
    ResponseMessage {
        schema: RESPONSE_SCHEMA.into(),
        device: device.into(),
        id: id.into(),
        ok: true,
        result: Some(result),
        error: None,
    }
}

pub fn response_error(device: &str, id: &str, error: impl std::fmt::Display) -> ResponseMessage {
    ResponseMessage {
        schema: RESPONSE_SCHEMA.into(),
        device: device.into(),
        id: id.into(),
        ok: false,
        result: None,
        error: Some(error.to_string()),
    }
}
