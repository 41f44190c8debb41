//! Every event the agent records, with its payload, as the outbox stores it and the `events`
//! topic carries it (docs/agent.md "Events"). One enum, so a kind cannot be misspelt and a payload
//! says what it holds; parts whose shape belongs to another module (metrics, sample sets, the
//! policy, the warm-up) travel as JSON.

use serde::Serialize;
use serde_json::Value;

/// The kind of an event, by its name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    AgentStarted,
    AgentStopped,
    RuntimeWarmedUp,
    SampleIngested,
    SampleRejected,
    AdaptationStarted,
    AdaptationProgress,
    AdaptationFailed,
    AdaptationCancelled,
    AdaptationInterrupted,
    AdaptationSourceKept,
    VersionPromoted,
    VersionRejected,
    VersionRollback,
    VersionLoadFailed,
    PolicyChanged,
    ConfigReloaded,
    OutboxDropped,
    Deployment,
}

impl EventKind {
    pub const ALL: [EventKind; 19] = [
        EventKind::AgentStarted,
        EventKind::AgentStopped,
        EventKind::RuntimeWarmedUp,
        EventKind::SampleIngested,
        EventKind::SampleRejected,
        EventKind::AdaptationStarted,
        EventKind::AdaptationProgress,
        EventKind::AdaptationFailed,
        EventKind::AdaptationCancelled,
        EventKind::AdaptationInterrupted,
        EventKind::AdaptationSourceKept,
        EventKind::VersionPromoted,
        EventKind::VersionRejected,
        EventKind::VersionRollback,
        EventKind::VersionLoadFailed,
        EventKind::PolicyChanged,
        EventKind::ConfigReloaded,
        EventKind::OutboxDropped,
        EventKind::Deployment,
    ];

    /// The kinds that end an adaptation run, whichever way it went.
    pub const RUN_ENDS: [EventKind; 5] = [
        EventKind::AdaptationFailed,
        EventKind::AdaptationCancelled,
        EventKind::AdaptationSourceKept,
        EventKind::VersionPromoted,
        EventKind::VersionRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AgentStarted => "agent.started",
            EventKind::AgentStopped => "agent.stopped",
            EventKind::RuntimeWarmedUp => "runtime.warmed_up",
            EventKind::SampleIngested => "sample.ingested",
            EventKind::SampleRejected => "sample.rejected",
            EventKind::AdaptationStarted => "adaptation.started",
            EventKind::AdaptationProgress => "adaptation.progress",
            EventKind::AdaptationFailed => "adaptation.failed",
            EventKind::AdaptationCancelled => "adaptation.cancelled",
            EventKind::AdaptationInterrupted => "adaptation.interrupted",
            EventKind::AdaptationSourceKept => "adaptation.source_kept",
            EventKind::VersionPromoted => "version.promoted",
            EventKind::VersionRejected => "version.rejected",
            EventKind::VersionRollback => "version.rollback",
            EventKind::VersionLoadFailed => "version.load_failed",
            EventKind::PolicyChanged => "policy.changed",
            EventKind::ConfigReloaded => "config.reloaded",
            EventKind::OutboxDropped => "outbox.dropped",
            EventKind::Deployment => "deployment",
        }
    }

    /// The kind named `name`; `None` for a kind this build does not know (a newer agent's).
    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// Whether the served version changed (or failed to), so the retained status must follow.
    pub fn changes_served_version(self) -> bool {
        matches!(
            self,
            EventKind::VersionPromoted
                | EventKind::VersionRollback
                | EventKind::VersionLoadFailed
                | EventKind::Deployment
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a run ended without a version: the method (or, for a run that never started, where the
/// request came from) and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEnded {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub error: String,
}

/// A version a run made, promoted or rejected by the gate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionMade {
    pub version: i64,
    pub method: String,
    pub parent: i64,
    pub reasons: Vec<String>,
    pub metrics: Value,
}

/// A deployment's steps on a device, in order; `refused`, `failed`, `switched_back` and
/// `in_service` end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    Unpacked,
    WarmedUp,
    Refused,
    Failed,
    Switched,
    SwitchedBack,
    InService,
}

impl DeploymentState {
    /// Whether the deployment ended on this device, and how.
    pub fn ended(self) -> Option<bool> {
        match self {
            DeploymentState::InService => Some(true),
            DeploymentState::Refused | DeploymentState::Failed | DeploymentState::SwitchedBack => Some(false),
            _ => None,
        }
    }
}

/// One step of a deployment: which transfer, which bundle, and what the step found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentStep {
    pub transfer: String,
    pub bundle: String,
    pub state: DeploymentState,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// An event and its payload. Serialised as `{"kind": ..., "payload": {...}}`; the names are
/// [`EventKind::as_str`]'s (a test holds them together).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "payload")]
pub enum Event {
    #[serde(rename = "agent.started")]
    AgentStarted { device_id: String, serving: i64, pid: u32 },
    #[serde(rename = "agent.stopped")]
    AgentStopped { uptime_s: u64, cancelled_run: bool },
    /// The warm-up report: provider, seconds, what happened to the TensorRT engine cache.
    #[serde(rename = "runtime.warmed_up")]
    RuntimeWarmedUp(Value),
    /// `user` is the console user who labelled it, where there is one.
    #[serde(rename = "sample.ingested")]
    SampleIngested {
        id: i64,
        class: String,
        split: String,
        origin: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// An inbox file refused; `error` is the refusal as the HTTP API reports it.
    #[serde(rename = "sample.rejected")]
    SampleRejected { file: String, class: String, error: Value },
    /// `user` is the console user who started it, where there is one.
    #[serde(rename = "adaptation.started")]
    AdaptationStarted {
        method: String,
        origin: String,
        seen_classes: Vec<String>,
        samples: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    #[serde(rename = "adaptation.progress")]
    AdaptationProgress { method: String, step: usize, steps: usize },
    #[serde(rename = "adaptation.failed")]
    AdaptationFailed(RunEnded),
    #[serde(rename = "adaptation.cancelled")]
    AdaptationCancelled(RunEnded),
    /// A run cut short by a crash or power loss, found at the next start.
    #[serde(rename = "adaptation.interrupted")]
    AdaptationInterrupted { method: Value, started_event: i64 },
    /// `recommended` found no learning rate the gate's checks accept; the source stays served.
    #[serde(rename = "adaptation.source_kept")]
    AdaptationSourceKept(RunEnded),
    #[serde(rename = "version.promoted")]
    VersionPromoted(VersionMade),
    #[serde(rename = "version.rejected")]
    VersionRejected(VersionMade),
    #[serde(rename = "version.rollback")]
    VersionRollback { from: i64, to: i64 },
    #[serde(rename = "version.load_failed")]
    VersionLoadFailed { version: i64, error: String },
    /// The policy now in force.
    #[serde(rename = "policy.changed")]
    PolicyChanged(Value),
    #[serde(rename = "config.reloaded")]
    ConfigReloaded { applied: Vec<String>, needs_restart: Vec<String> },
    #[serde(rename = "outbox.dropped")]
    OutboxDropped { dropped: usize, first_id: i64, last_id: i64, limit: usize },
    #[serde(rename = "deployment")]
    Deployment(DeploymentStep),
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::AgentStarted { .. } => EventKind::AgentStarted,
            Event::AgentStopped { .. } => EventKind::AgentStopped,
            Event::RuntimeWarmedUp(_) => EventKind::RuntimeWarmedUp,
            Event::SampleIngested { .. } => EventKind::SampleIngested,
            Event::SampleRejected { .. } => EventKind::SampleRejected,
            Event::AdaptationStarted { .. } => EventKind::AdaptationStarted,
            Event::AdaptationProgress { .. } => EventKind::AdaptationProgress,
            Event::AdaptationFailed(_) => EventKind::AdaptationFailed,
            Event::AdaptationCancelled(_) => EventKind::AdaptationCancelled,
            Event::AdaptationInterrupted { .. } => EventKind::AdaptationInterrupted,
            Event::AdaptationSourceKept(_) => EventKind::AdaptationSourceKept,
            Event::VersionPromoted(_) => EventKind::VersionPromoted,
            Event::VersionRejected(_) => EventKind::VersionRejected,
            Event::VersionRollback { .. } => EventKind::VersionRollback,
            Event::VersionLoadFailed { .. } => EventKind::VersionLoadFailed,
            Event::PolicyChanged(_) => EventKind::PolicyChanged,
            Event::ConfigReloaded { .. } => EventKind::ConfigReloaded,
            Event::OutboxDropped { .. } => EventKind::OutboxDropped,
            Event::Deployment(_) => EventKind::Deployment,
        }
    }

    /// The payload as the outbox stores it.
    pub fn payload(&self) -> Value {
        match serde_json::to_value(self).expect("events serialise") {
            Value::Object(mut object) => object.remove("payload").unwrap_or(Value::Null),
            _ => unreachable!("an adjacently tagged enum serialises as an object"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ended() -> RunEnded {
        RunEnded { method: Some("recommended".into()), origin: None, error: "e".into() }
    }

    fn made() -> VersionMade {
        VersionMade { version: 3, method: "ft-tail".into(), parent: 0, reasons: vec![], metrics: json!({}) }
    }

    /// One event of every kind.
    fn one_of_each() -> Vec<Event> {
        vec![
            Event::AgentStarted { device_id: "d".into(), serving: 0, pid: 1 },
            Event::AgentStopped { uptime_s: 5, cancelled_run: false },
            Event::RuntimeWarmedUp(json!({ "provider": "cpu" })),
            Event::SampleIngested {
                id: 1,
                class: "A".into(),
                split: "train".into(),
                origin: "cli".into(),
                user: Some("ana".into()),
            },
            Event::SampleRejected { file: "inbox/A/x.png".into(), class: "A".into(), error: json!({}) },
            Event::AdaptationStarted {
                method: "m".into(),
                origin: "console".into(),
                seen_classes: vec![],
                samples: json!({}),
                user: Some("ana".into()),
            },
            Event::AdaptationProgress { method: "m".into(), step: 1, steps: 10 },
            Event::AdaptationFailed(ended()),
            Event::AdaptationCancelled(ended()),
            Event::AdaptationInterrupted { method: json!("m"), started_event: 4 },
            Event::AdaptationSourceKept(ended()),
            Event::VersionPromoted(made()),
            Event::VersionRejected(made()),
            Event::VersionRollback { from: 2, to: 0 },
            Event::VersionLoadFailed { version: 2, error: "e".into() },
            Event::PolicyChanged(json!({ "method": "m" })),
            Event::ConfigReloaded { applied: vec!["gate".into()], needs_restart: vec![] },
            Event::OutboxDropped { dropped: 3, first_id: 1, last_id: 3, limit: 2 },
            Event::Deployment(DeploymentStep {
                transfer: "t".into(),
                bundle: "b".into(),
                state: DeploymentState::Switched,
                detail: Value::Null,
            }),
        ]
    }

    #[test]
    fn each_event_is_serialised_under_its_kinds_name() {
        let events = one_of_each();
        assert_eq!(events.len(), EventKind::ALL.len());
        for (event, kind) in events.iter().zip(EventKind::ALL) {
            assert_eq!(event.kind(), kind);
            let value = serde_json::to_value(event).unwrap();
            assert_eq!(value["kind"], kind.as_str(), "{event:?}");
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::parse("no.such"), None);
    }

    #[test]
    fn payloads_keep_the_documented_fields() {
        let promoted = Event::VersionPromoted(made()).payload();
        assert_eq!(promoted, json!({ "version": 3, "method": "ft-tail", "parent": 0, "reasons": [], "metrics": {} }));
        let refused =
            Event::AdaptationFailed(RunEnded { method: None, origin: Some("schedule".into()), error: "x".into() });
        assert_eq!(refused.payload(), json!({ "origin": "schedule", "error": "x" }));
        assert_eq!(Event::PolicyChanged(json!({ "method": "m" })).payload(), json!({ "method": "m" }));
    }

    #[test]
    fn only_version_changes_move_the_status() {
        let moving: Vec<_> = EventKind::ALL.into_iter().filter(|k| k.changes_served_version()).collect();
        assert_eq!(
            moving,
            vec![
                EventKind::VersionPromoted,
                EventKind::VersionRollback,
                EventKind::VersionLoadFailed,
                EventKind::Deployment
            ]
        );
    }
}
