//! The agent as the broker link sees it ([`AgentPort`]): the served version, metrics, and the
//! event outbox with the weights sets of promoted versions.

use super::shared::Shared;
use crate::fleet::port::{AgentPort, LinkHealth, Outbox, Served};
use crate::protocol::events::EventKind;
use crate::protocol::messages::{AdaptationResult, METRICS_SCHEMA, MetricsMessage};
use crate::store::VersionStatus;

impl AgentPort for Shared {
    fn served(&self) -> Option<Served> {
        let status = self.status().ok()?;
        Some(Served {
            version: status.serving,
            bundle: status.bundle,
            bundle_id: status.bundle_id,
            provider: status.provider,
        })
    }

    fn metrics(&self, device: &str) -> Option<MetricsMessage> {
        let status = self.status().ok()?;
        let (adaptation, last) = {
            let agent = self.lock();
            (agent.served_version_metrics().ok().flatten(), agent.last_adaptation().ok().flatten())
        };
        Some(MetricsMessage {
            schema: METRICS_SCHEMA.into(),
            device: device.to_string(),
            at_ms: crate::store::now_ms(),
            serving: status.serving,
            samples: status.samples,
            new_labels_since_last_run: status.new_labels_since_last_run,
            traffic_samples: status.traffic_samples,
            undelivered_events: status.undelivered_events,
            classification: status.classification,
            adaptation,
            last_adaptation: last.map(|v| AdaptationResult {
                version: v.id,
                promoted: v.status == VersionStatus::Promoted,
                at_ms: v.created_ms,
                gate: v.metrics["gate"].clone(),
            }),
        })
    }

    fn mark_delivered(&self, ids: &[i64]) -> Result<(), String> {
        self.lock().store().mark_delivered(ids).map_err(|e| e.to_string())
    }

    fn outbox(&self, after: i64, room: usize, limit: usize, max_packet: usize) -> Result<Outbox, String> {
        let mut agent = self.lock();
        let dropped = agent.store().trim_outbox(limit).map_err(|e| e.to_string())?;
        if dropped > 0 {
            tracing::warn!(dropped, limit, "outbox full: oldest undelivered events dropped");
        }
        let events = agent.store().pending_events_after(after, room).map_err(|e| e.to_string())?;
        let mut weights = Vec::new();
        for event in events.iter().filter(|e| e.kind == EventKind::VersionPromoted.as_str()) {
            if let Some(version) = event.payload["version"].as_i64() {
                match agent.weights_set(version, max_packet) {
                    Ok(set) => weights.push((version, set)),
                    Err(error) => tracing::warn!(version, %error, "cannot prepare weights to publish"),
                }
            }
        }
        Ok(Outbox { events, weights })
    }

    fn link_changed(&self, health: LinkHealth) {
        *self.link.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(health);
    }
}
