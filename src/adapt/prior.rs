//! Prior matching on unlabelled local traffic: the unseen share to aim at (given, the source
//! model's own, or estimated by `share`) and the γ that makes the adapted model predict it.

use super::calibrate;
use super::method::{AdaptInput, Adapted, Hyper, PriorTarget, Traffic, share_predicted};
use super::share;
use crate::network::Network;

/// γ by prior matching on the traffic, aiming at `target`'s unseen share.
#[allow(clippy::too_many_arguments)]
pub(super) fn prior_gamma(
    target: PriorTarget,
    input: &AdaptInput<'_>,
    traffic: &Traffic,
    network: &Network,
    seen: &[usize],
    unseen: &[usize],
    hyper: &Hyper,
    seed: u64,
    notes: &mut Vec<String>,
) -> f32 {
    let source_rate = share_predicted(&traffic.source_logits, unseen);
    let logits = Adapted { network: network.clone(), gamma: 0.0, unseen: unseen.to_vec(), notes: vec![] }
        .logits_of(&traffic.splits);
    let share = match hyper.unseen_share {
        Some(given) => {
            notes.push(format!("unseen share {given:.3} (given)"));
            given
        }
        None if target != PriorTarget::Estimated => {
            notes.push(format!("unseen share {source_rate:.3}"));
            source_rate
        }
        None => {
            let choice = hyper.share_choice.unwrap_or_else(|| choose_share(input, traffic, seen, unseen, seed));
            notes.push(choice.to_string());
            choice.share
        }
    };
    if target == PriorTarget::RecallCorrected {
        let source_seen_as_unseen = share_predicted(input.teacher, unseen);
        let labelled = Adapted { network: network.clone(), gamma: 0.0, unseen: unseen.to_vec(), notes: vec![] }
            .logits_of(input.data);
        calibrate::recall_corrected_gamma(&logits, &labelled, seen, unseen, source_rate, source_seen_as_unseen)
    } else {
        calibrate::prior_matching_gamma(&logits, seen, unseen, share)
    }
}

/// The unseen share prior matching aims at (see `share::choose_share`), from source logits only.
pub(super) fn choose_share(
    input: &AdaptInput<'_>,
    traffic: &Traffic,
    seen: &[usize],
    unseen: &[usize],
    seed: u64,
) -> share::ShareChoice {
    let source_rate = share_predicted(&traffic.source_logits, unseen);
    share::choose_share(source_rate, estimate_share(input, traffic, seen, unseen, seed))
}

/// The best-bin estimate of the traffic's unseen share (see `share`).
fn estimate_share(
    input: &AdaptInput<'_>,
    traffic: &Traffic,
    seen: &[usize],
    unseen: &[usize],
    seed: u64,
) -> Option<share::Estimate> {
    let share_input = share::ShareInput {
        traffic: traffic.source_logits.view(),
        labelled: input.teacher.view(),
        labels: &input.data.labels,
        seen,
        unseen,
    };
    let config = share::ShareConfig { seed, ..share::ShareConfig::default() };
    share::estimate(&share_input, &[share::Estimator::Pu], &config)?.first().copied()
}
