//! What the broker link needs from the agent, and all it may reach: the agent implements this,
//! so the link depends on no part of the agent. Calls block (they read the store); the link
//! makes them off its event loop.

use crate::protocol::messages::MetricsMessage;
use crate::store::PendingEvent;

/// The served model as the retained status names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub version: i64,
    pub bundle: String,
    pub bundle_id: String,
    pub provider: String,
}

/// A version's weights set: the manifest and its chunks, each one publish.
pub type WeightsSet = (Vec<u8>, Vec<Vec<u8>>);

/// Undelivered events to publish, with the weights sets of the versions they promote.
#[derive(Debug, Default)]
pub struct Outbox {
    pub events: Vec<PendingEvent>,
    /// `(version, set)` for each `version.promoted` event whose weights could be prepared.
    pub weights: Vec<(i64, WeightsSet)>,
}

/// Where the link stands, for the people looking at the device (the console's device view).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinkHealth {
    pub state: LinkPhase,
    /// Since when (Unix ms).
    pub since_ms: i64,
    /// Why the broker is unreachable, while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkPhase {
    /// Started, no answer from the broker yet.
    Connecting,
    Connected,
    /// The connection failed or broke; the link retries with back-off.
    Unreachable,
}

pub trait AgentPort: Send + Sync + 'static {
    /// The served version, or `None` when the agent cannot say.
    fn served(&self) -> Option<Served>;
    /// The figures the metrics message carries, for `device`.
    fn metrics(&self, device: &str) -> Option<MetricsMessage>;
    /// Records that the broker acknowledged these events.
    fn mark_delivered(&self, ids: &[i64]) -> Result<(), String>;
    /// Drops the oldest undelivered events beyond `limit`, then returns up to `room` undelivered
    /// events after id `after`, with weights sets in packets of at most `max_packet` bytes.
    fn outbox(&self, after: i64, room: usize, limit: usize, max_packet: usize) -> Result<Outbox, String>;
    /// The link connected, or lost or could not reach the broker. Does not block.
    fn link_changed(&self, health: LinkHealth);
}
