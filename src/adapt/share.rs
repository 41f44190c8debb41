//! How much of a site's unlabelled traffic belongs to the unseen classes.
//!
//! Prior matching needs this share. The source model's own share of unseen predictions is biased
//! by the very shift adaptation corrects, so the device estimates the share from what it has:
//! the source model's logits on unlabelled traffic and on the labelled seen-class samples from
//! the same site. Each estimator rests on a different assumption:
//!
//! - [`Estimator::Count`]: the source model's share of unseen predictions (classify and count);
//!   right only when the source model errs equally in both directions.
//! - [`Estimator::Bbse`]: classify and count corrected by the confusion between the two groups
//!   (black-box shift estimation). The seen row is measured on site; the unseen row is not
//!   observable, so it assumes a sample crosses to the other group at a rate proportional to
//!   that group's number of classes.
//! - [`Estimator::Em`]: maximum-likelihood class priors by EM (Saerens et al. 2002) on
//!   posteriors whose temperature is fitted on the labelled seen samples; assumes the shift
//!   leaves the calibrated posteriors right up to the priors.
//! - [`Estimator::Pu`]: positive-unlabelled mixture proportion (best-bin estimation, Garg et al.
//!   2021): the labelled seen samples are the positives; among traffic that the source model
//!   finds most seen-like, the excess over the positives' rate bounds the seen share. Assumes
//!   the labelled samples are a fair draw of the seen traffic and that the most seen-like
//!   traffic holds few unseen samples. It does not rely on how the unseen classes behave.
//!
//! Every estimate gets a bootstrap interval (traffic and labelled samples resampled together).

use ndarray::{Array2, ArrayView2, Axis};
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    Count,
    Bbse,
    Em,
    Pu,
}

impl Estimator {
    pub const ALL: [Estimator; 4] = [Estimator::Count, Estimator::Bbse, Estimator::Em, Estimator::Pu];

    pub fn name(self) -> &'static str {
        match self {
            Estimator::Count => "count",
            Estimator::Bbse => "bbse",
            Estimator::Em => "em",
            Estimator::Pu => "pu",
        }
    }
}

/// One estimator's share with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub estimator: Estimator,
    pub share: f32,
    pub low: f32,
    pub high: f32,
}

/// The source model's logits a device has for the estimate.
pub struct ShareInput<'a> {
    /// On unlabelled local traffic.
    pub traffic: ArrayView2<'a, f32>,
    /// On labelled seen-class samples from the same site, with their labels.
    pub labelled: ArrayView2<'a, f32>,
    pub labels: &'a [usize],
    pub seen: &'a [usize],
    pub unseen: &'a [usize],
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareConfig {
    pub bootstrap: usize,
    /// Two-sided coverage of the intervals.
    pub coverage: f32,
    pub seed: u64,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig { bootstrap: 100, coverage: 0.9, seed: 0 }
    }
}

/// The shares and intervals of `estimators`, in that order; `None` where the input cannot
/// support an estimate (no traffic, no labelled samples, or no seen or unseen class).
pub fn estimate(input: &ShareInput<'_>, estimators: &[Estimator], config: &ShareConfig) -> Option<Vec<Estimate>> {
    if input.traffic.nrows() == 0 || input.labelled.nrows() == 0 || input.unseen.is_empty() || input.seen.is_empty() {
        return None;
    }
    let traffic = Prepared::new(input.traffic, input.seen, input.unseen);
    let labelled = Prepared::new(input.labelled, input.seen, input.unseen);
    let (full, top) = shares(&traffic, &labelled, input, estimators, None);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ 0x5a4e);
    let mut draws: Vec<Vec<f32>> = vec![Vec::with_capacity(config.bootstrap); estimators.len()];
    for _ in 0..config.bootstrap {
        let t: Vec<usize> = (0..traffic.len()).map(|_| rng.random_range(0..traffic.len())).collect();
        let l: Vec<usize> = (0..labelled.len()).map(|_| rng.random_range(0..labelled.len())).collect();
        let labels: Vec<usize> = l.iter().map(|&i| input.labels[i]).collect();
        let resampled = ShareInput { labels: &labels, ..*input };
        let (values, _) = shares(&traffic.select(&t), &labelled.select(&l), &resampled, estimators, Some(top));
        for (column, value) in draws.iter_mut().zip(values) {
            column.push(value);
        }
    }
    let tail = (1.0 - config.coverage.clamp(0.0, 1.0)) / 2.0;
    Some(
        estimators
            .iter()
            .zip(full)
            .zip(draws)
            .map(|((&estimator, share), mut column)| {
                column.sort_by(f32::total_cmp);
                let (low, high) = if column.is_empty() {
                    (share, share)
                } else {
                    (quantile(&column, tail), quantile(&column, 1.0 - tail))
                };
                Estimate { estimator, share, low: low.min(share), high: high.max(share) }
            })
            .collect(),
    )
}

/// Widest bootstrap interval of the estimate that prior matching still acts on.
pub const MAX_INTERVAL: f32 = 0.25;

/// The unseen share prior matching aims at, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareChoice {
    pub share: f32,
    /// The source model's share of unseen predictions on the traffic.
    pub source: f32,
    pub estimate: Option<Estimate>,
    pub reason: ShareReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareReason {
    /// The estimate is above the source model's share: the source calls unseen samples seen.
    Raised,
    /// The source model's share is at or above the estimate, and is kept.
    SourceKept,
    /// The estimate's interval is wider than [`MAX_INTERVAL`]: the source model's share is kept.
    TooUncertain,
    /// Nothing to estimate from (no traffic or no labelled samples).
    NoEstimate,
    /// The share that balances per-class errors between seen and unseen classes
    /// (`calibrate::balanced_share`; the bench row `recommended@balanced`).
    Balanced,
}

/// Raises the source model's share to the best-bin estimate where the estimate is higher, and
/// keeps it otherwise. Best-bin estimation bounds the seen share from above (unseen samples
/// among the most seen-like traffic only inflate it), so its unseen share errs low: above the
/// source model's share it is evidence that the source under-predicts the unseen classes; below
/// it, it is not evidence of the opposite. Lowering the share would also trade unseen accuracy
/// for seen accuracy, the one trade the product never makes without labels.
pub fn choose_share(source: f32, estimate: Option<Estimate>) -> ShareChoice {
    let (share, reason) = match estimate {
        None => (source, ShareReason::NoEstimate),
        Some(e) if e.high - e.low > MAX_INTERVAL => (source, ShareReason::TooUncertain),
        Some(e) if e.share > source => (e.share, ShareReason::Raised),
        Some(_) => (source, ShareReason::SourceKept),
    };
    ShareChoice { share, source, estimate, reason }
}

impl std::fmt::Display for ShareChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unseen share {:.3}", self.share)?;
        let why = match self.reason {
            ShareReason::Raised => "raised from the source's",
            ShareReason::SourceKept => "the source's, kept",
            ShareReason::TooUncertain => "the source's, estimate too uncertain",
            ShareReason::NoEstimate => "the source's, nothing to estimate from",
            ShareReason::Balanced => "balanced per class; the source's",
        };
        write!(f, " ({why} {:.3}", self.source)?;
        if let Some(e) = self.estimate {
            write!(f, "; estimate {:.3} [{:.3}, {:.3}]", e.share, e.low, e.high)?;
        }
        f.write_str(")")
    }
}

/// What each sample contributes to the estimators, computed once and resampled by index.
#[derive(Clone)]
struct Prepared {
    logits: Array2<f32>,
    predicted_unseen: Vec<bool>,
    /// `max_{c∈S} z_c − max_{c∈U} z_c`: how seen-like the source model finds the sample.
    gap: Vec<f32>,
}

impl Prepared {
    fn new(logits: ArrayView2<'_, f32>, seen: &[usize], unseen: &[usize]) -> Prepared {
        let gap: Vec<f32> = logits
            .axis_iter(Axis(0))
            .map(|row| {
                let best = |set: &[usize]| set.iter().map(|&c| row[c]).fold(f32::NEG_INFINITY, f32::max);
                best(seen) - best(unseen)
            })
            .collect();
        Prepared { logits: logits.to_owned(), predicted_unseen: gap.iter().map(|&g| g < 0.0).collect(), gap }
    }

    fn len(&self) -> usize {
        self.gap.len()
    }

    fn select(&self, indices: &[usize]) -> Prepared {
        Prepared {
            logits: self.logits.select(Axis(0), indices),
            predicted_unseen: indices.iter().map(|&i| self.predicted_unseen[i]).collect(),
            gap: indices.iter().map(|&i| self.gap[i]).collect(),
        }
    }

    fn unseen_rate(&self) -> f32 {
        self.predicted_unseen.iter().filter(|&&u| u).count() as f32 / self.len().max(1) as f32
    }
}

/// The shares of `estimators`, and the best bin's share of labelled samples (best-bin
/// estimation's bin, kept fixed in the bootstrap).
fn shares(
    traffic: &Prepared,
    labelled: &Prepared,
    input: &ShareInput<'_>,
    estimators: &[Estimator],
    pu_top: Option<f64>,
) -> (Vec<f32>, f64) {
    let mut top = 1.0;
    let values = estimators
        .iter()
        .map(|estimator| match estimator {
            Estimator::Count => traffic.unseen_rate(),
            Estimator::Bbse => {
                bbse(traffic.unseen_rate(), labelled.unseen_rate(), input.seen.len(), input.unseen.len())
            }
            Estimator::Em => em_share(&traffic.logits, fit_temperature(&labelled.logits, input.labels), input.unseen),
            Estimator::Pu => {
                let (share, bin) = pu_share(&traffic.gap, &labelled.gap, pu_top);
                top = bin;
                share
            }
        })
        .collect();
    (values, top)
}

/// `π = (r − a) / (b − a)`: `r` the traffic's unseen-prediction rate, `a` the measured rate at
/// which seen samples are called unseen, `b = 1 − a·|S|/|U|` the assumed rate at which unseen
/// samples stay unseen (a sample crosses to a group in proportion to its number of classes).
pub fn bbse(traffic_rate: f32, seen_called_unseen: f32, seen_classes: usize, unseen_classes: usize) -> f32 {
    let a = seen_called_unseen;
    let b = 1.0 - a * seen_classes as f32 / unseen_classes.max(1) as f32;
    if b - a < 0.05 {
        return traffic_rate;
    }
    ((traffic_rate - a) / (b - a)).clamp(0.0, 1.0)
}

/// The temperature that minimises the negative log-likelihood of the labels (argmax over all
/// classes), by golden-section search on `ln T` in [ln 0.05, ln 20].
pub fn fit_temperature(logits: &Array2<f32>, labels: &[usize]) -> f32 {
    let nll = |log_t: f64| {
        let t = log_t.exp() as f32;
        super::loss::mean_nll(&logits.mapv(|v| v / t), labels)
    };
    let (mut lo, mut hi) = (0.05f64.ln(), 20f64.ln());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (hi - ratio * (hi - lo), lo + ratio * (hi - lo));
    let (mut f1, mut f2) = (nll(x1), nll(x2));
    for _ in 0..40 {
        if f1 <= f2 {
            hi = x2;
            (x2, f2) = (x1, f1);
            x1 = hi - ratio * (hi - lo);
            f1 = nll(x1);
        } else {
            lo = x1;
            (x1, f1) = (x2, f2);
            x2 = lo + ratio * (hi - lo);
            f2 = nll(x2);
        }
    }
    (0.5 * (lo + hi)).exp() as f32
}

/// Maximum-likelihood class priors of the traffic by EM on `softmax(z / T)`, starting from (and
/// assuming the source was trained on) uniform priors; returns the unseen classes' total.
pub fn em_share(logits: &Array2<f32>, temperature: f32, unseen: &[usize]) -> f32 {
    let classes = logits.ncols();
    if logits.nrows() == 0 || classes == 0 {
        return 0.0;
    }
    let posteriors = super::loss::softmax_rows(&logits.mapv(|v| v / temperature));
    let mut priors = vec![1.0 / classes as f64; classes];
    let uniform = 1.0 / classes as f64;
    for _ in 0..200 {
        let mut next = vec![0.0f64; classes];
        for row in posteriors.axis_iter(Axis(0)) {
            let weighted: Vec<f64> = row.iter().zip(&priors).map(|(&p, &q)| p as f64 * q / uniform).collect();
            let sum: f64 = weighted.iter().sum();
            if sum > 0.0 {
                for (n, w) in next.iter_mut().zip(&weighted) {
                    *n += w / sum;
                }
            }
        }
        let total: f64 = next.iter().sum();
        next.iter_mut().for_each(|n| *n /= total.max(f64::MIN_POSITIVE));
        let change: f64 = next.iter().zip(&priors).map(|(a, b)| (a - b).abs()).sum();
        priors = next;
        if change < 1e-7 {
            break;
        }
    }
    unseen.iter().map(|&c| priors[c]).sum::<f64>() as f32
}

/// Best-bin estimation: over thresholds `t` on the seen-likeness score,
/// `1 − π ≤ P_traffic(s ≥ t) / P_labelled(s ≥ t)`; take the threshold whose ratio plus its
/// finite-sample margin is smallest (δ = 0.1), and return `1 −` that ratio with the share of
/// labelled samples above the threshold. With `top` given, the threshold is the score above
/// which that share of labelled samples lies (the bootstrap keeps the bin and resamples the
/// counts; re-choosing the bin in every resample makes the interval jump between bins).
pub fn pu_share(traffic_scores: &[f32], labelled_scores: &[f32], top: Option<f64>) -> (f32, f64) {
    let (n, m) = (traffic_scores.len(), labelled_scores.len());
    if n == 0 || m == 0 {
        return (0.0, 1.0);
    }
    let mut traffic: Vec<f32> = traffic_scores.to_vec();
    traffic.sort_by(f32::total_cmp);
    let mut labelled: Vec<f32> = labelled_scores.to_vec();
    labelled.sort_by(f32::total_cmp);
    let at_least =
        |sorted: &[f32], t: f32| (sorted.len() - sorted.partition_point(|&s| s < t)) as f64 / sorted.len() as f64;
    let ratio_at = |t: f32| at_least(&traffic, t) / at_least(&labelled, t);
    let (ratio, positives) = match top {
        Some(fraction) => {
            let index = ((1.0 - fraction) * m as f64).floor().clamp(0.0, (m - 1) as f64) as usize;
            let t = labelled[index];
            (ratio_at(t), at_least(&labelled, t))
        }
        None => {
            let delta = 0.1f64;
            let margin = 1.01
                * (((4.0 / delta).ln() / (2.0 * n as f64)).sqrt() + ((4.0 / delta).ln() / (2.0 * m as f64)).sqrt());
            let mut best: Option<(f64, f64, f64)> = None;
            for &t in &labelled {
                let positives = at_least(&labelled, t);
                let ratio = ratio_at(t);
                let bound = ratio + margin / positives;
                if best.is_none_or(|(b, _, _)| bound < b) {
                    best = Some((bound, ratio, positives));
                }
            }
            best.map_or((1.0, 1.0), |(_, ratio, positives)| (ratio, positives))
        }
    };
    ((1.0 - ratio).clamp(0.0, 1.0) as f32, positives)
}

fn quantile(sorted: &[f32], q: f32) -> f32 {
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f32;
    let (below, above) = (position.floor() as usize, position.ceil() as usize);
    let weight = position - below as f32;
    sorted[below] * (1.0 - weight) + sorted[above] * weight
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    const CLASSES: usize = 6;
    const SEEN: [usize; 3] = [0, 1, 2];
    const UNSEEN: [usize; 3] = [3, 4, 5];

    /// A Gaussian mixture in `CLASSES` dimensions, class `c` around `3·e_c`, scored by the source
    /// model's nearest-mean logits `−|x − μ_c|² / 2`. `drift(c)` moves class `c`'s target samples
    /// a fraction of the way towards another class's mean: the domain shift.
    struct Mixture {
        drift: fn(usize) -> Option<(usize, f32)>,
    }

    impl Mixture {
        fn logits(&self, labels: &[usize], seed: u64) -> Array2<f32> {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut normal = move || {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            };
            let mean = |c: usize| Array1::from_shape_fn(CLASSES, |d| if d == c { 3.0 } else { 0.0 });
            let mut out = Array2::zeros((labels.len(), CLASSES));
            for (row, &label) in labels.iter().enumerate() {
                let mut centre = mean(label);
                if let Some((towards, fraction)) = (self.drift)(label) {
                    centre = &centre * (1.0 - fraction) + &(mean(towards) * fraction);
                }
                let x: Array1<f32> = centre.mapv(|m| m + 0.9 * normal());
                for c in 0..CLASSES {
                    let d = &x - &mean(c);
                    out[[row, c]] = -0.5 * d.dot(&d);
                }
            }
            out
        }

        /// Traffic with `share` of unseen samples, labelled seen samples, and the true share.
        fn site(&self, share: f32, seed: u64) -> (Array2<f32>, Array2<f32>, Vec<usize>) {
            let n = 1200;
            let unseen_n = (share * n as f32).round() as usize;
            let traffic_labels: Vec<usize> =
                (0..n).map(|i| if i < unseen_n { UNSEEN[i % 3] } else { SEEN[i % 3] }).collect();
            let labels: Vec<usize> = (0..300).map(|i| SEEN[i % 3]).collect();
            (self.logits(&traffic_labels, seed), self.logits(&labels, seed + 1), labels)
        }

        fn estimates(&self, share: f32, seed: u64) -> Vec<Estimate> {
            self.estimates_by(&Estimator::ALL, share, seed, &ShareConfig { bootstrap: 60, ..ShareConfig::default() })
        }

        fn estimates_by(&self, estimators: &[Estimator], share: f32, seed: u64, config: &ShareConfig) -> Vec<Estimate> {
            let (traffic, labelled, labels) = self.site(share, seed);
            let input = ShareInput {
                traffic: traffic.view(),
                labelled: labelled.view(),
                labels: &labels,
                seen: &SEEN,
                unseen: &UNSEEN,
            };
            estimate(&input, estimators, config).unwrap()
        }
    }

    fn get(estimates: &[Estimate], estimator: Estimator) -> Estimate {
        *estimates.iter().find(|e| e.estimator == estimator).unwrap()
    }

    /// Unseen samples drift halfway towards a seen class: the source model calls many of them
    /// seen and under-predicts the unseen share.
    const UNDER: Mixture = Mixture { drift: |c| (c >= 3).then(|| (c - 3, 0.35)) };
    /// Seen samples drift towards an unseen class: the source model over-predicts the share.
    const OVER: Mixture = Mixture { drift: |c| (c < 3).then(|| (c + 3, 0.35)) };
    /// No shift but the priors: the label-shift setting EM is built for.
    const PRIORS_ONLY: Mixture = Mixture { drift: |_| None };
    /// Every class drifts to its neighbour in the other group by the same amount: the
    /// symmetric confusion BBSE assumes.
    const SYMMETRIC: Mixture = Mixture { drift: |c| Some(((c + 3) % 6, 0.3)) };

    #[test]
    fn best_bin_estimation_corrects_a_source_model_that_under_or_over_predicts_the_unseen_share() {
        for (mixture, name) in [(&UNDER, "under"), (&OVER, "over")] {
            for truth in [0.2, 0.5, 0.8] {
                let estimates = mixture.estimates(truth, 3);
                let pu = get(&estimates, Estimator::Pu);
                assert!((pu.share - truth).abs() < 0.05, "{name} {truth}: {pu:?}");
                assert!(pu.high - pu.low < 0.15, "{name} {truth}: {pu:?}");
                // An upper bound on the seen share: the interval does not sit above the truth.
                assert!(pu.low <= truth, "{name} {truth}: {pu:?}");
            }
        }
        // The source model is biased in the direction each mixture is built for.
        for truth in [0.5, 0.8] {
            assert!(get(&UNDER.estimates(truth, 3), Estimator::Count).share < truth - 0.1);
        }
        for truth in [0.2, 0.5] {
            assert!(get(&OVER.estimates(truth, 3), Estimator::Count).share > truth + 0.1);
        }
    }

    #[test]
    fn the_share_is_raised_to_a_confident_estimate_and_never_lowered() {
        let given = |share, low, high| Some(Estimate { estimator: Estimator::Pu, share, low, high });
        let raised = choose_share(0.2, given(0.35, 0.3, 0.4));
        assert_eq!((raised.share, raised.reason), (0.35, ShareReason::Raised));
        let kept = choose_share(0.5, given(0.35, 0.3, 0.4));
        assert_eq!((kept.share, kept.reason), (0.5, ShareReason::SourceKept));
        let wide = choose_share(0.2, given(0.6, 0.3, 0.7));
        assert_eq!((wide.share, wide.reason), (0.2, ShareReason::TooUncertain));
        let none = choose_share(0.2, None);
        assert_eq!((none.share, none.reason), (0.2, ShareReason::NoEstimate));
        assert_eq!(
            raised.to_string(),
            "unseen share 0.350 (raised from the source's 0.200; estimate 0.350 [0.300, 0.400])"
        );
        // On the under-predicting mixture the whole path raises the share towards the truth.
        let pu = UNDER.estimates_by(&[Estimator::Pu], 0.5, 3, &ShareConfig::default())[0];
        let source = get(&UNDER.estimates(0.5, 3), Estimator::Count).share;
        let choice = choose_share(source, Some(pu));
        assert_eq!(choice.reason, ShareReason::Raised);
        assert!((choice.share - 0.5).abs() < 0.05, "{choice}");
    }

    #[test]
    fn em_recovers_shifted_priors_when_only_the_priors_shift() {
        for truth in [0.2, 0.8] {
            let em = get(&PRIORS_ONLY.estimates(truth, 5), Estimator::Em);
            assert!((em.share - truth).abs() < 0.05, "{truth}: {em:?}");
            assert!(em.low <= truth + 0.02 && truth - 0.02 <= em.high, "{truth}: {em:?}");
        }
    }

    #[test]
    fn bbse_corrects_a_symmetric_confusion_that_plain_counting_does_not() {
        for truth in [0.2, 0.8] {
            let estimates = SYMMETRIC.estimates(truth, 7);
            let (count, bbse) = (get(&estimates, Estimator::Count), get(&estimates, Estimator::Bbse));
            assert!((count.share - truth).abs() > 0.08, "{truth}: {count:?}");
            assert!((bbse.share - truth).abs() < 0.05, "{truth}: {bbse:?}");
        }
    }

    #[test]
    fn the_temperature_fit_recovers_a_known_scale() {
        // Logits that are exactly log-probabilities at temperature 1, scaled by 3.
        let probabilities = [[0.7f32, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]];
        let mut logits = Array2::zeros((3000, 3));
        let mut labels = Vec::new();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for row in 0..3000 {
            let p = probabilities[row % 3];
            for c in 0..3 {
                logits[[row, c]] = 3.0 * p[c].ln();
            }
            let draw: f32 = rng.random();
            labels.push(if draw < p[0] {
                0
            } else if draw < p[0] + p[1] {
                1
            } else {
                2
            });
        }
        let t = fit_temperature(&logits, &labels);
        assert!((t - 3.0).abs() < 0.3, "{t}");
    }

    #[test]
    fn estimates_are_deterministic_for_a_seed_and_absent_without_data() {
        assert_eq!(UNDER.estimates(0.5, 11), UNDER.estimates(0.5, 11));
        let empty = Array2::<f32>::zeros((0, CLASSES));
        let (traffic, _, labels) = UNDER.site(0.5, 1);
        let input = ShareInput {
            traffic: traffic.view(),
            labelled: empty.view(),
            labels: &labels[..0],
            seen: &SEEN,
            unseen: &UNSEEN,
        };
        assert!(estimate(&input, &Estimator::ALL, &ShareConfig::default()).is_none());
    }
}
