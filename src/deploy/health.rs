//! The health check a new bundle passes before it serves: shadowed on recent images next to the
//! served version, it must agree with it often enough, keep the labelled images as right, not
//! pile its predictions onto one class and not lose its confidence. Each test catches a way a
//! bundle breaks that its checksums cannot see (wrong preprocessing, a swapped class list, a
//! head that collapsed in export), while a better model that disagrees where the old one was
//! wrong still passes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One image as both models saw it. `candidate` is `None` where the new bundle failed on it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub served: (String, f32),
    pub candidate: Option<(String, f32)>,
    /// The staff's label, for a labelled sample.
    pub label: Option<String>,
}

/// What the shadowing measured; fractions in 0..=1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub images: usize,
    pub failed: usize,
    /// Share of images where both predict the same class.
    pub agreement: f64,
    pub labelled: usize,
    pub accuracy_served: f64,
    pub accuracy_candidate: f64,
    /// Each model's most predicted class and its share of the images.
    pub top_class_served: (String, f64),
    pub top_class_candidate: (String, f64),
    pub confidence_served: f64,
    pub confidence_candidate: f64,
}

pub use crate::protocol::health::Thresholds;

pub fn report(observations: &[Observation]) -> ShadowReport {
    let answered: Vec<(&Observation, &(String, f32))> =
        observations.iter().filter_map(|o| o.candidate.as_ref().map(|c| (o, c))).collect();
    let share = |count: usize, of: usize| if of == 0 { 0.0 } else { count as f64 / of as f64 };
    let agree = answered.iter().filter(|(o, c)| o.served.0 == c.0).count();
    let labelled: Vec<(&String, &String, &String)> =
        answered.iter().filter_map(|(o, c)| o.label.as_ref().map(|label| (label, &o.served.0, &c.0))).collect();
    let served_right = labelled.iter().filter(|(label, served, _)| label == served).count();
    let candidate_right = labelled.iter().filter(|(label, _, candidate)| label == candidate).count();
    let top = |classes: Vec<&String>| {
        let mut counts = BTreeMap::<&String, usize>::new();
        for class in &classes {
            *counts.entry(class).or_default() += 1;
        }
        // Ties go to the first name, so the report is the same every time.
        let best = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
        best.map_or((String::new(), 0.0), |(class, n)| ((*class).clone(), share(*n, classes.len())))
    };
    let mean = |values: Vec<f32>| {
        if values.is_empty() { 0.0 } else { values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64 }
    };
    ShadowReport {
        images: observations.len(),
        failed: observations.len() - answered.len(),
        agreement: share(agree, answered.len()),
        labelled: labelled.len(),
        accuracy_served: share(served_right, labelled.len()),
        accuracy_candidate: share(candidate_right, labelled.len()),
        top_class_served: top(answered.iter().map(|(o, _)| &o.served.0).collect()),
        top_class_candidate: top(answered.iter().map(|(_, c)| &c.0).collect()),
        confidence_served: mean(answered.iter().map(|(o, _)| o.served.1).collect()),
        confidence_candidate: mean(answered.iter().map(|(_, c)| c.1).collect()),
    }
}

/// Why the new bundle is unhealthy; empty when it may serve.
pub fn judge(report: &ShadowReport, limits: &Thresholds) -> Vec<String> {
    let mut reasons = Vec::new();
    let percent = |x: f64| format!("{:.0} %", x * 100.0);
    if report.failed > 0 {
        reasons.push(format!("the new bundle failed on {} of {} images", report.failed, report.images));
    }
    if report.images - report.failed < limits.min_images {
        return reasons;
    }
    if report.agreement < limits.min_agreement {
        reasons.push(format!(
            "it agrees with the served model on {} of the images (at least {} needed)",
            percent(report.agreement),
            percent(limits.min_agreement)
        ));
    }
    if report.labelled >= limits.min_labelled
        && report.accuracy_candidate < report.accuracy_served - limits.max_accuracy_drop
    {
        reasons.push(format!(
            "it is right on {} of {} labelled images, the served model on {} (at most {} points fewer allowed)",
            percent(report.accuracy_candidate),
            report.labelled,
            percent(report.accuracy_served),
            (limits.max_accuracy_drop * 100.0).round()
        ));
    }
    let (class, top_share) = &report.top_class_candidate;
    let served_top = report.top_class_served.1;
    if *top_share > served_top + limits.max_top_share_rise {
        reasons.push(format!(
            "it predicts '{class}' for {} of the images; the served model's most predicted class has {}",
            percent(*top_share),
            percent(served_top)
        ));
    }
    if report.confidence_candidate < report.confidence_served * limits.min_confidence_ratio {
        reasons.push(format!(
            "its mean confidence is {:.2}, the served model's {:.2}",
            report.confidence_candidate, report.confidence_served
        ));
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(served: &str, candidate: Option<&str>, label: Option<&str>) -> Observation {
        Observation {
            served: (served.into(), 0.8),
            candidate: candidate.map(|c| (c.to_string(), 0.8)),
            label: label.map(String::from),
        }
    }

    /// 40 images over four classes, labelled; the served model is right on the first 30 and
    /// says 'a' for the rest (right on 2 of them).
    fn traffic(candidate: impl Fn(usize, &str) -> Option<String>) -> Vec<Observation> {
        (0..40)
            .map(|i| {
                let truth = ["a", "b", "c", "d"][i % 4];
                let served = if i < 30 { truth } else { "a" };
                Observation {
                    served: (served.into(), 0.8),
                    candidate: candidate(i, truth).map(|c| (c, 0.8)),
                    label: Some(truth.into()),
                }
            })
            .collect()
    }

    #[test]
    fn the_same_model_again_is_healthy() {
        let observations = traffic(|i, truth| Some(if i < 30 { truth } else { "a" }.into()));
        let report = report(&observations);
        assert_eq!(report.agreement, 1.0);
        assert_eq!((report.labelled, report.accuracy_served), (40, 0.8));
        assert!(judge(&report, &Thresholds::default()).is_empty());
    }

    #[test]
    fn a_better_model_that_disagrees_where_the_old_was_wrong_is_healthy() {
        let report = report(&traffic(|_, truth| Some(truth.into())));
        assert_eq!(report.accuracy_candidate, 1.0);
        assert!(report.agreement < 1.0);
        assert!(judge(&report, &Thresholds::default()).is_empty(), "{report:?}");
    }

    #[test]
    fn a_collapsed_head_is_caught_three_ways() {
        let report = report(&traffic(|_, _| Some("d".into())));
        let reasons = judge(&report, &Thresholds::default());
        assert_eq!(report.top_class_candidate, ("d".to_string(), 1.0));
        assert!(reasons.iter().any(|r| r.contains("agrees with the served model on 18 %")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("right on 25 % of 40 labelled")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("predicts 'd' for 100 %")), "{reasons:?}");
    }

    #[test]
    fn a_swapped_class_list_is_caught_without_labels() {
        fn names(c: &str) -> &str {
            match c {
                "a" => "b",
                "b" => "a",
                other => other,
            }
        }
        let observations: Vec<Observation> = traffic(|_, truth| Some(names(truth).into()))
            .into_iter()
            .map(|o| Observation { label: None, ..o })
            .collect();
        let report = report(&observations);
        assert_eq!(report.labelled, 0);
        assert!(judge(&report, &Thresholds::default()).iter().any(|r| r.contains("agrees")), "{report:?}");
    }

    #[test]
    fn failures_always_count_and_few_images_judge_nothing_else() {
        let mut observations = vec![seen("a", Some("b"), None); 5];
        observations.push(seen("a", None, None));
        let reasons = judge(&report(&observations), &Thresholds::default());
        assert_eq!(reasons, ["the new bundle failed on 1 of 6 images"]);
        assert!(judge(&report(&observations[..5]), &Thresholds::default()).is_empty(), "too few to judge");
        assert!(judge(&report(&[]), &Thresholds::default()).is_empty());
    }

    #[test]
    fn a_model_that_lost_its_confidence_is_caught() {
        let observations: Vec<Observation> = traffic(|i, truth| Some(if i < 30 { truth } else { "a" }.into()))
            .into_iter()
            .map(|o| Observation { candidate: o.candidate.map(|(c, _)| (c, 0.3)), ..o })
            .collect();
        let reasons = judge(&report(&observations), &Thresholds::default());
        assert_eq!(reasons, ["its mean confidence is 0.30, the served model's 0.80"]);
    }

    #[test]
    fn thresholds_outside_zero_to_one_are_refused_by_name() {
        let bad = Thresholds { min_agreement: 1.5, ..Thresholds::default() };
        assert!(bad.validate().unwrap_err().contains("health.min_agreement"));
        assert!(Thresholds::default().validate().is_ok());
    }
}
