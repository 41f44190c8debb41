//! One device's deployment as the fleet follows it: the answer to `deploy` (switched, refused,
//! or an error), then the `deployment` event that ends the probation (in service, or switched
//! back). Deadlines make a silent device a failure, never a hang.

use serde_json::Value;

use super::rollout::Outcome;
use crate::protocol::events::DeploymentState;

/// Time past the probation a device has to report that it is in service.
pub const REPORT_GRACE_MS: i64 = 60_000;

#[derive(Debug, Clone, PartialEq)]
enum Awaiting {
    Answer { deadline_ms: i64 },
    InService { deadline_ms: i64 },
}

#[derive(Debug, Clone)]
pub struct Following {
    pub command_id: String,
    transfer: String,
    probation_ms: i64,
    awaiting: Awaiting,
}

impl Following {
    /// `answer_within_ms`: how long the device may stage and shadow before it answers.
    pub fn new(command_id: &str, transfer: &str, probation_s: u64, now_ms: i64, answer_within_ms: i64) -> Following {
        Following {
            command_id: command_id.into(),
            transfer: transfer.into(),
            probation_ms: probation_s as i64 * 1000,
            awaiting: Awaiting::Answer { deadline_ms: now_ms + answer_within_ms },
        }
    }

    /// Whether the device switched and is on probation.
    pub fn on_probation(&self) -> bool {
        matches!(self.awaiting, Awaiting::InService { .. })
    }

    /// The device's answer to the `deploy` command.
    pub fn on_answer(&mut self, ok: bool, result: &Value, error: Option<&str>, now_ms: i64) -> Option<Outcome> {
        if !ok {
            return Some(Outcome::Failed(error.unwrap_or("refused without a reason").to_string()));
        }
        match result["state"].as_str() {
            Some("in_service") => Some(Outcome::InService),
            Some("switched") => {
                self.awaiting = Awaiting::InService { deadline_ms: now_ms + self.probation_ms + REPORT_GRACE_MS };
                None
            }
            Some("refused") => Some(Outcome::Failed(format!("health check: {}", reasons(result)))),
            _ => Some(Outcome::Failed(format!("an answer this version does not know: {result}"))),
        }
    }

    /// A `deployment` event of the device; others' transfers are ignored.
    pub fn on_event(&mut self, transfer: &str, state: DeploymentState, detail: &Value) -> Option<Outcome> {
        if transfer != self.transfer {
            return None;
        }
        match state {
            DeploymentState::InService => Some(Outcome::InService),
            DeploymentState::SwitchedBack => Some(Outcome::Failed(format!(
                "switched back: {}",
                detail["reason"].as_str().unwrap_or("no reason given")
            ))),
            DeploymentState::Refused => Some(Outcome::Failed(format!("health check: {}", reasons(detail)))),
            DeploymentState::Failed => Some(Outcome::Failed(detail["error"].as_str().unwrap_or("failed").to_string())),
            // The answer says so too, with the time the probation started.
            DeploymentState::Switched | DeploymentState::Unpacked | DeploymentState::WarmedUp => None,
        }
    }

    /// A failure once the deadline of what is awaited has passed.
    pub fn on_tick(&self, now_ms: i64) -> Option<Outcome> {
        match self.awaiting {
            Awaiting::Answer { deadline_ms } if now_ms >= deadline_ms => {
                Some(Outcome::Failed("no answer to deploy in time (is the device online?)".into()))
            }
            Awaiting::InService { deadline_ms } if now_ms >= deadline_ms => {
                Some(Outcome::Failed("switched, but did not report being in service after its probation".into()))
            }
            _ => None,
        }
    }
}

fn reasons(value: &Value) -> String {
    let list: Vec<&str> = value["reasons"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if list.is_empty() { "no reason given".into() } else { list.join("; ") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn following() -> Following {
        Following::new("c1", "t1", 10, 0, 5_000)
    }

    #[test]
    fn a_switch_then_the_end_of_probation_is_in_service() {
        let mut follow = following();
        assert_eq!(follow.on_answer(true, &json!({ "state": "switched" }), None, 1000), None);
        assert!(follow.on_probation());
        assert_eq!(follow.on_tick(60_000), None, "probation and grace not over");
        assert_eq!(follow.on_event("other", DeploymentState::InService, &Value::Null), None);
        assert_eq!(follow.on_event("t1", DeploymentState::InService, &Value::Null), Some(Outcome::InService));
    }

    #[test]
    fn refusals_errors_and_switch_backs_fail_with_their_reasons() {
        let refused = json!({ "state": "refused", "reasons": ["it agrees on 3 %", "collapsed"] });
        assert_eq!(
            following().on_answer(true, &refused, None, 0),
            Some(Outcome::Failed("health check: it agrees on 3 %; collapsed".into()))
        );
        assert_eq!(
            following().on_answer(false, &Value::Null, Some("deploy: bad sha256"), 0),
            Some(Outcome::Failed("deploy: bad sha256".into()))
        );
        let back = following().on_event("t1", DeploymentState::SwitchedBack, &json!({ "reason": "restarted" }));
        assert_eq!(back, Some(Outcome::Failed("switched back: restarted".into())));
        assert_eq!(following().on_answer(true, &json!({ "state": "in_service" }), None, 0), Some(Outcome::InService));
    }

    #[test]
    fn silence_fails_at_each_deadline() {
        let mut follow = following();
        assert_eq!(follow.on_tick(4_999), None);
        assert!(matches!(follow.on_tick(5_000), Some(Outcome::Failed(m)) if m.contains("no answer")));
        follow.on_answer(true, &json!({ "state": "switched" }), None, 1_000);
        assert_eq!(follow.on_tick(1_000 + 10_000 + REPORT_GRACE_MS - 1), None);
        assert!(
            matches!(follow.on_tick(1_000 + 10_000 + REPORT_GRACE_MS), Some(Outcome::Failed(m)) if m.contains("in service"))
        );
    }
}
