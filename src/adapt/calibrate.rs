//! Logit calibration between seen and unseen classes: a bias `γ` added to the unseen classes'
//! logits at prediction time. Fine-tuning on seen classes inflates their logits; `γ` undoes the
//! imbalance without any unseen labels.

use ndarray::{Array2, Axis};

/// ALG (average logit gap) from logits of seen-class samples:
/// `mean_i(mean_{c∈S, c≠y_i} z_c) − mean_i(mean_{c∈U} z_c)`.
pub fn alg_gamma(logits: &Array2<f32>, labels: &[usize], seen: &[usize], unseen: &[usize]) -> f32 {
    if unseen.is_empty() || logits.nrows() == 0 {
        return 0.0;
    }
    let mut seen_sum = 0.0f64;
    let mut unseen_sum = 0.0f64;
    let mut counted = 0usize;
    for (row, &label) in logits.axis_iter(Axis(0)).zip(labels) {
        let others: Vec<f32> = seen.iter().filter(|&&c| c != label).map(|&c| row[c]).collect();
        if others.is_empty() {
            continue;
        }
        seen_sum += others.iter().map(|&v| v as f64).sum::<f64>() / others.len() as f64;
        unseen_sum += unseen.iter().map(|&c| row[c] as f64).sum::<f64>() / unseen.len() as f64;
        counted += 1;
    }
    if counted == 0 {
        return 0.0;
    }
    ((seen_sum - unseen_sum) / counted as f64) as f32
}

/// Per-sample gap `max_{c∈S} z_c − max_{c∈U} z_c`: with bias `γ` a sample is predicted unseen
/// exactly when its gap is below `γ`, so the whole accuracy-vs-γ curve is one sort of these.
pub fn gaps(logits: &Array2<f32>, seen: &[usize], unseen: &[usize]) -> Vec<f32> {
    logits
        .axis_iter(Axis(0))
        .map(|row| {
            let best = |set: &[usize]| set.iter().map(|&c| row[c]).fold(f32::NEG_INFINITY, f32::max);
            best(seen) - best(unseen)
        })
        .collect()
}

/// Prior matching: the `γ` at which the share of `unlabelled` samples predicted as an unseen
/// class equals `target_rate` (the source model's share on the same traffic). Keeps the unseen
/// classes' share of local traffic where the source model put it, without unseen labels.
pub fn prior_matching_gamma(
    unlabelled_logits: &Array2<f32>,
    seen: &[usize],
    unseen: &[usize],
    target_rate: f32,
) -> f32 {
    let mut gaps = gaps(unlabelled_logits, seen, unseen);
    gaps.retain(|g| g.is_finite());
    if gaps.is_empty() || unseen.is_empty() {
        return 0.0;
    }
    gaps.sort_by(f32::total_cmp);
    let n = gaps.len();
    let k = ((target_rate.clamp(0.0, 1.0) * n as f32).round() as usize).min(n);
    match k {
        0 => gaps[0] - 1e-3,
        k if k == n => gaps[n - 1] + 1e-3,
        k => 0.5 * (gaps[k - 1] + gaps[k]),
    }
}

/// Prior matching corrected for the seen classes' better recall: the adapted model should give
/// the unseen classes the source model's share of traffic *minus* the seen-class samples it no
/// longer mistakes for unseen ones. With `r` the source's unseen share of unlabelled traffic,
/// `a` the source's unseen share on labelled seen-class samples and `a(γ)` the adapted model's,
/// the seen share of traffic is taken as `1 − r` and `γ` solves
/// `share_unlabelled(γ) = r − (1 − r)·(a − a(γ))` (the smallest `γ` reaching it).
pub fn recall_corrected_gamma(
    unlabelled_logits: &Array2<f32>,
    labelled_seen_logits: &Array2<f32>,
    seen: &[usize],
    unseen: &[usize],
    source_rate: f32,
    source_seen_as_unseen: f32,
) -> f32 {
    let unlabelled = sorted_gaps(unlabelled_logits, seen, unseen);
    let labelled = sorted_gaps(labelled_seen_logits, seen, unseen);
    if unlabelled.is_empty() || unseen.is_empty() {
        return 0.0;
    }
    let share_below =
        |sorted: &[f32], gamma: f32| sorted.partition_point(|&g| g < gamma) as f32 / sorted.len().max(1) as f32;
    let seen_share = 1.0 - source_rate;
    let mut candidates: Vec<f32> = unlabelled.iter().chain(&labelled).map(|g| g + 1e-4).collect();
    candidates.sort_by(f32::total_cmp);
    for gamma in candidates {
        let target = source_rate - seen_share * (source_seen_as_unseen - share_below(&labelled, gamma));
        if share_below(&unlabelled, gamma) >= target {
            return gamma;
        }
    }
    unlabelled[unlabelled.len() - 1] + 1e-3
}

/// The share of traffic an adapted model should predict as unseen so that every class counts
/// alike: the `γ` that maximises the estimated group-balanced accuracy
/// `|S|·q_S(γ) + |U|·q_U(γ)`, returned as the traffic share it predicts unseen at that `γ`.
/// `q_S(γ)`, the share of seen samples kept in the seen group, is measured on held-out labelled
/// samples; `q_U(γ)`, the share of unseen samples called unseen, is deconvolved from the
/// traffic with its unseen share `π`: `r(γ) = π·q_U(γ) + (1 − π)·(1 − q_S(γ))`. At the optimum
/// the per-class densities of the two groups' samples at the boundary are equal: a seen sample
/// is pushed across as readily as an unseen one, per class of each group. Matching the
/// traffic's own share instead maximises accuracy on the traffic, where rare unseen classes
/// count little. `None` without held-out samples, traffic or a usable `π`.
pub fn balanced_share(
    traffic_gaps: &[f32],
    held_out_seen_gaps: &[f32],
    traffic_unseen_share: f32,
    seen_classes: usize,
    unseen_classes: usize,
) -> Option<f32> {
    let traffic = sorted_finite(traffic_gaps);
    let held_out = sorted_finite(held_out_seen_gaps);
    let pi = traffic_unseen_share;
    if traffic.is_empty() || held_out.is_empty() || !(pi > 0.0 && pi < 1.0) || seen_classes == 0 || unseen_classes == 0
    {
        return None;
    }
    let below = |sorted: &[f32], gamma: f32| sorted.partition_point(|&g| g < gamma) as f32 / sorted.len() as f32;
    let mut candidates: Vec<f32> = traffic.iter().chain(&held_out).map(|g| g + 1e-4).collect();
    candidates.push(traffic[0].min(held_out[0]) - 1e-3);
    candidates.sort_by(f32::total_cmp);
    candidates.dedup();
    let score = |gamma: f32| {
        let seen_called_unseen = below(&held_out, gamma);
        let unseen_called_unseen = ((below(&traffic, gamma) - (1.0 - pi) * seen_called_unseen) / pi).clamp(0.0, 1.0);
        seen_classes as f32 * (1.0 - seen_called_unseen) + unseen_classes as f32 * unseen_called_unseen
    };
    let scores: Vec<f32> = candidates.iter().map(|&g| score(g)).collect();
    let best = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The score is flat where the groups' densities balance, and sampling noise picks any point
    // of such a plateau: take the middle of every γ within 1 % of the best.
    let tolerance = 0.01 * (seen_classes + unseen_classes) as f32;
    let winners: Vec<f32> =
        candidates.iter().zip(&scores).filter(|(_, s)| **s >= best - tolerance).map(|(g, _)| *g).collect();
    let gamma = winners[winners.len() / 2];
    Some(below(&traffic, gamma))
}

fn sorted_finite(values: &[f32]) -> Vec<f32> {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    sorted
}

fn sorted_gaps(logits: &Array2<f32>, seen: &[usize], unseen: &[usize]) -> Vec<f32> {
    let mut gaps = gaps(logits, seen, unseen);
    gaps.retain(|g| g.is_finite());
    gaps.sort_by(f32::total_cmp);
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::apply_calibration;
    use ndarray::array;

    #[test]
    fn alg_is_the_mean_gap_between_other_seen_and_unseen_logits() {
        // classes 0,1 seen; 2,3 unseen
        let logits = array![[5.0, 1.0, 0.0, -2.0], [3.0, 6.0, 1.0, 1.0]];
        let gamma = alg_gamma(&logits, &[0, 1], &[0, 1], &[2, 3]);
        // sample 0: other seen = 1, unseen mean = -1 -> 2; sample 1: other seen = 3, unseen mean = 1 -> 2
        assert!((gamma - 2.0).abs() < 1e-6);
        let mut shifted = logits.clone();
        apply_calibration(&mut shifted, &[2, 3], gamma);
        assert_eq!(shifted.row(0).to_vec(), vec![5.0, 1.0, 2.0, 0.0]);
    }

    #[test]
    fn prior_matching_reaches_the_target_share_of_unseen_predictions() {
        // Gaps (seen max - unseen max): 3, 1, -1, 2
        let logits = array![[4.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [3.0, 1.0, 1.0]];
        let gamma = prior_matching_gamma(&logits, &[0, 1], &[2], 0.5);
        let mut calibrated = logits.clone();
        apply_calibration(&mut calibrated, &[2], gamma);
        let unseen_share = calibrated.axis_iter(Axis(0)).filter(|r| r[2] > r[0].max(r[1])).count();
        assert_eq!(unseen_share, 2);
        assert!((gamma - 1.5).abs() < 1e-6);
    }

    #[test]
    fn the_recall_correction_hands_traffic_back_to_the_seen_classes() {
        // Unlabelled gaps 3, 1, -1, 2, -2, 0.5; source predicted half of the traffic unseen.
        let unlabelled = array![[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.5, 0.0]];
        // Labelled seen samples: the adapted model calls none of them unseen at γ below 0.2.
        let labelled = array![[2.0, 0.0], [1.5, 0.0], [0.2, 0.0], [3.0, 0.0]];
        let plain = prior_matching_gamma(&unlabelled, &[0], &[1], 0.5);
        // The source called 40 % of the labelled seen samples unseen: the target share drops to
        // 0.5 - 0.5 * 0.4 = 0.3, i.e. 2 of 6 unlabelled samples.
        let corrected = recall_corrected_gamma(&unlabelled, &labelled, &[0], &[1], 0.5, 0.4);
        assert!(corrected < plain, "{corrected} vs {plain}");
        let share = gaps(&unlabelled, &[0], &[1]).iter().filter(|&&g| g < corrected).count();
        assert_eq!(share, 2);
        // Without a recall gain there is nothing to hand back.
        let confident = array![[4.0, 0.0], [5.0, 0.0]];
        let same = recall_corrected_gamma(&unlabelled, &confident, &[0], &[1], 0.5, 0.0);
        assert_eq!(gaps(&unlabelled, &[0], &[1]).iter().filter(|&&g| g < same).count(), 3);
    }

    /// `n` evenly spaced values covering `[low, high]`.
    fn spread(low: f32, high: f32, n: usize) -> Vec<f32> {
        (0..n).map(|i| low + (high - low) * (i as f32 + 0.5) / n as f32).collect()
    }

    /// Traffic with `share` unseen samples: seen gaps on [-1, 3], unseen gaps on [-3, 1].
    fn overlapping_traffic(share: f32) -> Vec<f32> {
        let unseen = (1000.0 * share) as usize;
        spread(-3.0, 1.0, unseen).into_iter().chain(spread(-1.0, 3.0, 1000 - unseen)).collect()
    }

    #[test]
    fn the_balanced_share_counts_every_class_alike_not_every_sample() {
        let held_out = spread(-1.0, 3.0, 400);
        // Equal class counts: the boundary sits mid-overlap (γ = 0), where a quarter of each
        // group is on the wrong side, whatever the traffic's share.
        let even = balanced_share(&overlapping_traffic(0.5), &held_out, 0.5, 5, 5).unwrap();
        assert!((even - 0.5).abs() < 0.02, "{even}");
        // Rare unseen samples still get the balanced boundary: 0.1·0.75 + 0.9·0.25 = 0.3, not 0.1.
        let rare = balanced_share(&overlapping_traffic(0.1), &held_out, 0.1, 5, 5).unwrap();
        assert!((rare - 0.3).abs() < 0.03, "{rare}");
        // Five times as many unseen classes: every overlapping sample goes to them (γ = 1).
        let many = balanced_share(&overlapping_traffic(0.5), &held_out, 0.5, 2, 10).unwrap();
        assert!((many - 0.75).abs() < 0.02, "{many}");
    }

    #[test]
    fn the_balanced_share_needs_held_out_samples_and_a_share_strictly_between_0_and_1() {
        let traffic = overlapping_traffic(0.5);
        assert_eq!(balanced_share(&traffic, &[], 0.5, 5, 5), None);
        assert_eq!(balanced_share(&traffic, &[1.0], 0.0, 5, 5), None);
        assert_eq!(balanced_share(&traffic, &[1.0], 1.0, 5, 5), None);
        assert_eq!(balanced_share(&[], &[1.0], 0.5, 5, 5), None);
    }

    #[test]
    fn no_unseen_classes_means_no_calibration() {
        let logits = array![[1.0, 2.0]];
        assert_eq!(alg_gamma(&logits, &[0], &[0, 1], &[]), 0.0);
    }

    #[test]
    fn a_bias_above_the_gap_flips_the_prediction_to_unseen() {
        let logits = array![[4.0, 1.0, 3.0]];
        let gap = gaps(&logits, &[0, 1], &[2])[0];
        assert_eq!(gap, 1.0);
        let mut below = logits.clone();
        apply_calibration(&mut below, &[2], 0.9);
        assert!(below[[0, 0]] > below[[0, 2]]);
        let mut above = logits.clone();
        apply_calibration(&mut above, &[2], 1.1);
        assert!(above[[0, 2]] > above[[0, 0]]);
    }
}
