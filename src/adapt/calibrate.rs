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

/// Adds `gamma` to the unseen classes' logits.
pub fn apply(logits: &mut Array2<f32>, unseen: &[usize], gamma: f32) {
    if gamma == 0.0 {
        return;
    }
    for mut row in logits.axis_iter_mut(Axis(0)) {
        for &c in unseen {
            row[c] += gamma;
        }
    }
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

fn sorted_gaps(logits: &Array2<f32>, seen: &[usize], unseen: &[usize]) -> Vec<f32> {
    let mut gaps = gaps(logits, seen, unseen);
    gaps.retain(|g| g.is_finite());
    gaps.sort_by(f32::total_cmp);
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn alg_is_the_mean_gap_between_other_seen_and_unseen_logits() {
        // classes 0,1 seen; 2,3 unseen
        let logits = array![[5.0, 1.0, 0.0, -2.0], [3.0, 6.0, 1.0, 1.0]];
        let gamma = alg_gamma(&logits, &[0, 1], &[0, 1], &[2, 3]);
        // sample 0: other seen = 1, unseen mean = -1 -> 2; sample 1: other seen = 3, unseen mean = 1 -> 2
        assert!((gamma - 2.0).abs() < 1e-6);
        let mut shifted = logits.clone();
        apply(&mut shifted, &[2, 3], gamma);
        assert_eq!(shifted.row(0).to_vec(), vec![5.0, 1.0, 2.0, 0.0]);
    }

    #[test]
    fn prior_matching_reaches_the_target_share_of_unseen_predictions() {
        // Gaps (seen max - unseen max): 3, 1, -1, 2
        let logits = array![[4.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [3.0, 1.0, 1.0]];
        let gamma = prior_matching_gamma(&logits, &[0, 1], &[2], 0.5);
        let mut calibrated = logits.clone();
        apply(&mut calibrated, &[2], gamma);
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
        apply(&mut below, &[2], 0.9);
        assert!(below[[0, 0]] > below[[0, 2]]);
        let mut above = logits.clone();
        apply(&mut above, &[2], 1.1);
        assert!(above[[0, 2]] > above[[0, 0]]);
    }
}
