//! The safety gate: whether an adapted version may be served. Pure decision logic; the agent
//! measures the inputs, and `recommended` applies the same checks to its own candidates.

use serde::{Deserialize, Serialize};

/// Tolerances of the safety gate, as fractions (0.02 = 2 points).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// How far validation accuracy on the seen classes may fall below the current version's.
    pub max_seen_drop: f32,
    /// How far the share of traffic predicted as an unseen class may fall below the source's.
    pub max_unseen_rate_drop: f32,
    /// How far accuracy on the bundle's reference samples of unseen classes may fall below the
    /// source's.
    pub max_reference_drop: f32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig { max_seen_drop: 0.02, max_unseen_rate_drop: 0.05, max_reference_drop: 0.05 }
    }
}

/// What the gate looks at, as fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateInput {
    /// Validation accuracy on the seen classes: candidate, and the version served now.
    pub seen_validation: Option<(f32, f32)>,
    /// Share of unlabelled traffic predicted as an unseen class: candidate, source model.
    pub unseen_rate: Option<(f32, f32)>,
    /// Accuracy on the bundle's reference samples of unseen classes: candidate, source model.
    pub reference_unseen: Option<(f32, f32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateDecision {
    pub promote: bool,
    /// Why a version is rejected (empty when promoted).
    pub reasons: Vec<String>,
    /// Checks that could not run for lack of data.
    pub skipped: Vec<String>,
}

/// Promotes only when seen validation accuracy holds up against the current version and every
/// available unseen-health indicator stays within its tolerance of the source model. Without
/// seen validation samples nothing is known about the candidate, so it is rejected.
pub fn decide(input: &GateInput, config: &GateConfig) -> GateDecision {
    let mut reasons = Vec::new();
    match input.seen_validation {
        Some((candidate, current)) => reasons.extend(seen_drop(candidate, current, "the current version", config)),
        None => reasons.push("no validation samples of the seen classes to check the candidate on".into()),
    }
    let (health, skipped) = unseen_health(input, config);
    reasons.extend(health);
    GateDecision { promote: reasons.is_empty(), reasons, skipped }
}

/// Why seen validation accuracy `candidate` falls too far below `baseline`'s, if it does.
pub fn seen_drop(candidate: f32, baseline_accuracy: f32, baseline: &str, config: &GateConfig) -> Option<String> {
    (candidate < baseline_accuracy - config.max_seen_drop).then(|| {
        format!(
            "seen validation accuracy {:.1} % is more than {:.1} points below {baseline}'s {:.1} %",
            points(candidate),
            points(config.max_seen_drop),
            points(baseline_accuracy)
        )
    })
}

/// The unseen-health checks alone, which need no labelled sample: the reasons to reject, and
/// the checks that could not run for lack of data.
pub fn unseen_health(input: &GateInput, config: &GateConfig) -> (Vec<String>, Vec<String>) {
    let mut reasons = Vec::new();
    let mut skipped = Vec::new();
    match input.unseen_rate {
        Some((candidate, source)) if candidate < source - config.max_unseen_rate_drop => reasons.push(format!(
            "traffic predicted as unseen classes fell to {:.1} % from the source model's {:.1} % (tolerance {:.1} points)",
            points(candidate),
            points(source),
            points(config.max_unseen_rate_drop)
        )),
        Some(_) => {}
        None => skipped.push("unseen rate: no unlabelled traffic yet".into()),
    }
    match input.reference_unseen {
        Some((candidate, source)) if candidate < source - config.max_reference_drop => reasons.push(format!(
            "reference accuracy on unseen classes fell to {:.1} % from the source model's {:.1} % (tolerance {:.1} points)",
            points(candidate),
            points(source),
            points(config.max_reference_drop)
        )),
        Some(_) => {}
        None => skipped.push("reference accuracy: the bundle has no reference samples of the unseen classes".into()),
    }
    (reasons, skipped)
}

fn points(fraction: f32) -> f32 {
    fraction * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> GateInput {
        GateInput {
            seen_validation: Some((0.90, 0.80)),
            unseen_rate: Some((0.50, 0.52)),
            reference_unseen: Some((0.97, 0.98)),
        }
    }

    #[test]
    fn a_candidate_within_every_tolerance_is_promoted() {
        let decision = decide(&healthy(), &GateConfig::default());
        assert!(decision.promote, "{decision:?}");
        assert!(decision.reasons.is_empty() && decision.skipped.is_empty());
    }

    #[test]
    fn each_check_can_reject_on_its_own_and_says_why() {
        let config = GateConfig::default();
        let cases = [
            (GateInput { seen_validation: Some((0.77, 0.80)), ..healthy() }, "seen validation"),
            (GateInput { unseen_rate: Some((0.40, 0.52)), ..healthy() }, "predicted as unseen"),
            (GateInput { reference_unseen: Some((0.90, 0.98)), ..healthy() }, "reference accuracy"),
            (GateInput { seen_validation: None, ..healthy() }, "no validation samples"),
        ];
        for (input, phrase) in cases {
            let decision = decide(&input, &config);
            assert!(!decision.promote, "{input:?}");
            assert_eq!(decision.reasons.len(), 1, "{decision:?}");
            assert!(decision.reasons[0].contains(phrase), "{decision:?}");
        }
    }

    #[test]
    fn drops_exactly_at_the_tolerance_pass_and_missing_health_data_is_reported() {
        let config = GateConfig { max_seen_drop: 0.25, max_unseen_rate_drop: 0.25, max_reference_drop: 0.25 };
        let input =
            GateInput { seen_validation: Some((0.5, 0.75)), unseen_rate: Some((0.25, 0.5)), reference_unseen: None };
        let decision = decide(&input, &config);
        assert!(decision.promote, "{decision:?}");
        assert_eq!(decision.skipped.len(), 1);
    }
}
