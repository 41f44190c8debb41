//! When to adapt and where a new sample goes. Pure decision logic.

use crate::config::AdaptationConfig;
use crate::store::Split;

/// Sample `index_in_class` (0-based, in arrival order) of a class goes to validation when it is
/// the middle one of each group of `every`, so a class has a validation sample from its third
/// label on (with the default of 5) and about 1 in `every` overall.
pub fn split_for(index_in_class: usize, every: usize) -> Split {
    if every >= 2 && index_in_class % every == every / 2 { Split::Validation } else { Split::Train }
}

/// Why a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    NewLabels(usize),
    Schedule,
}

/// Whether the policy starts a run now, given labels added since the last run and minutes since
/// it (or since start-up when there was none). Nothing starts without new labels: the result
/// would be the same version again.
pub fn due(policy: &AdaptationConfig, new_labels: usize, minutes_since_last_run: u64) -> Option<Trigger> {
    if new_labels == 0 {
        return None;
    }
    if policy.after_new_labels > 0 && new_labels >= policy.after_new_labels {
        return Some(Trigger::NewLabels(new_labels));
    }
    if policy.every_minutes > 0 && minutes_since_last_run >= policy.every_minutes {
        return Some(Trigger::Schedule);
    }
    None
}

/// The newest version's inputs, as far as a repeated run would see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastVersion<'a> {
    pub id: i64,
    pub method: &'a str,
    /// The newest sample the version's run saw.
    pub last_sample_id: i64,
}

/// Why a requested run would only repeat the newest version: same method, and no label stored
/// since that version's run (training is seeded, so the result would be the same). `None` when
/// the run has something new to learn, when there is no version yet, or when `force` is set.
pub fn repeats_last_version(
    last: Option<LastVersion<'_>>,
    method: &str,
    last_sample_id: i64,
    force: bool,
) -> Option<String> {
    let last = last?;
    if force || last.method != method || last_sample_id > last.last_sample_id {
        return None;
    }
    Some(format!(
        "nothing new to learn: no labels since version {} ({}), which was trained on the same samples; \
         nothing was created (label more images, choose another --method, or --force to adapt anyway)",
        last.id, last.method
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_run_without_new_labels_or_another_method_repeats_the_last_version_unless_forced() {
        let last = LastVersion { id: 3, method: "recommended", last_sample_id: 40 };
        let reason = repeats_last_version(Some(last), "recommended", 40, false).expect("a repeat");
        assert!(reason.contains("no labels since version 3"), "{reason}");
        assert!(reason.contains("--force"), "{reason}");
        assert_eq!(repeats_last_version(Some(last), "recommended", 40, true), None);
        assert_eq!(repeats_last_version(Some(last), "recommended", 41, false), None);
        assert_eq!(repeats_last_version(Some(last), "ft-head", 40, false), None);
        assert_eq!(repeats_last_version(None, "recommended", 40, false), None);
    }

    #[test]
    fn one_in_every_n_samples_of_a_class_is_held_out_from_the_third_on() {
        let splits: Vec<Split> = (0..10).map(|i| split_for(i, 5)).collect();
        let held: Vec<usize> = (0..10).filter(|&i| splits[i] == Split::Validation).collect();
        assert_eq!(held, vec![2, 7]);
        assert_eq!((0..4).filter(|&i| split_for(i, 2) == Split::Validation).count(), 2);
    }

    #[test]
    fn runs_start_on_label_count_or_schedule_and_never_without_new_labels() {
        let policy = AdaptationConfig { after_new_labels: 50, every_minutes: 60, ..AdaptationConfig::default() };
        assert_eq!(due(&policy, 50, 0), Some(Trigger::NewLabels(50)));
        assert_eq!(due(&policy, 49, 59), None);
        assert_eq!(due(&policy, 1, 60), Some(Trigger::Schedule));
        assert_eq!(due(&policy, 0, 600), None);
        let manual_only = AdaptationConfig::default();
        assert_eq!(due(&manual_only, 10_000, 10_000), None);
    }
}
