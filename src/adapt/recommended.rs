//! `recommended`, the device default: its learning rate chosen on a validation split of the
//! device's own labelled samples.

use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::calibrate;
use super::data::SplitSet;
use super::gate::{self, GateInput};
use super::health;
use super::method::{AdaptInput, Adapted, Hyper, Method, adapt, seen_and_unseen};
use super::share::{self, ShareChoice, ShareReason};
use super::spec::{Calibration, Part, PriorTarget, Recipe};
use super::train::AdaptError;
use crate::network::Network;

/// The device default: train the tail with the head frozen, calibrate by prior matching on
/// unlabelled local traffic (ALG without such traffic), and choose the learning rate on a
/// validation split of the seen samples. Calibration protects the unseen classes, so the
/// validation choice may safely favour the seen classes. Every candidate must pass the gate's
/// checks against the source model (seen validation, reference accuracy on unseen classes), so
/// that a model on which adaptation hurts keeps its source instead of trading one group of
/// classes for the other; the final run must pass the reference check too.
/// docs/adaptation.md has the numbers.
pub(super) fn adapt_recommended(
    input: &AdaptInput<'_>,
    hyper: &Hyper,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<Adapted, AdaptError> {
    let recipe = recommended_for(input.source);
    let method = Method::Trained(recipe.clone());
    let rates = recommended_rates(hyper);
    let (train_part, validation) = validation_split(input.data, hyper.validation_share, seed);
    let choice = share_choice(input, seed);
    let hyper = &Hyper { share_choice: choice, ..hyper.clone() };
    let (_, unseen) = seen_and_unseen(&input.data.labels, input.classes);
    let source = Adapted { network: input.source.clone(), gamma: 0.0, unseen, notes: vec![] };
    let mut done = 0;
    let mut scores: Vec<(f32, Score)> = Vec::new();
    let mut refusals: Vec<(f32, Vec<String>)> = Vec::new();
    // Only the balanced share looks at a candidate again.
    let mut candidates: Vec<Adapted> = Vec::new();
    let held_out = input.data.select(&validation);
    let source_score = Score::of(&source.logits_of(&held_out), &held_out.labels);
    let train_labels: Vec<usize> = train_part.iter().map(|&i| input.data.labels[i]).collect();
    if rates.len() > 1 && !validation.is_empty() && seen_and_unseen(&train_labels, input.classes).0.len() >= 2 {
        let part = input.data.select(&train_part);
        let part_teacher = input.teacher.select(Axis(0), &train_part);
        let part_input = AdaptInput { data: &part, teacher: &part_teacher, ..*input };
        for &rate in &rates {
            let candidate = Hyper { learning_rate: Some(rate), steps: hyper.selection_steps, ..hyper.clone() };
            let adapted = match adapt(&method, &part_input, &candidate, seed, &mut |n| progress(done + n)) {
                Ok(adapted) => Some(adapted),
                // A rate that diverges is no candidate; a cancelled run stops here.
                Err(AdaptError::NotFinite { .. }) => None,
                Err(other) => return Err(other),
            };
            done += hyper.selection_steps;
            let Some(adapted) = adapted else { continue };
            let score = Score::of(&adapted.logits_of(&held_out), &held_out.labels);
            let mut reasons: Vec<String> =
                gate::seen_drop(score.accuracy, source_score.accuracy, "the source model", &hyper.gate)
                    .into_iter()
                    .collect();
            reasons.extend(reference_check(&adapted, &source, input.reference, &hyper.gate));
            if reasons.is_empty() {
                scores.push((rate, score));
                if hyper.balanced_share {
                    candidates.push(adapted);
                }
            } else {
                refusals.push((rate, reasons));
            }
        }
        if scores.is_empty() && !refusals.is_empty() {
            return Err(source_kept(&refusals));
        }
    }
    let best = best_rate(&scores);
    let rate = best.unwrap_or(hyper.learning_rate.unwrap_or(hyper.tail_rate));
    let balanced = match (hyper.balanced_share, best) {
        (true, Some(_)) if hyper.unseen_share.is_none() => {
            let index = scores.iter().position(|(r, _)| *r == rate).expect("the best rate was scored");
            balanced_share(input, &candidates[index], &held_out, choice)
        }
        _ => None,
    };
    let final_hyper = Hyper { learning_rate: Some(rate), share_choice: balanced.or(choice), ..hyper.clone() };
    let mut adapted = adapt(&method, input, &final_hyper, seed, &mut |n| progress(done + n))?;
    let final_reasons = reference_check(&adapted, &source, input.reference, &hyper.gate);
    if !final_reasons.is_empty() {
        return Err(source_kept(&[(rate, final_reasons)]));
    }
    adapted.notes.insert(0, format!("lr {rate}"));
    if recipe.part == Part::Adapter {
        adapted.notes.insert(0, "adapter (no trainable tail)".to_string());
    }
    if !scores.is_empty() || !refusals.is_empty() {
        let mut tried: Vec<(f32, String)> = scores.iter().map(|(r, s)| (*r, format!("{:.3}", s.accuracy))).collect();
        tried.extend(refusals.iter().map(|(r, _)| (*r, "refused".to_string())));
        tried.sort_by(|a, b| a.0.total_cmp(&b.0));
        let tried = tried.iter().map(|(r, s)| format!("{r}: {s}")).collect::<Vec<_>>().join(", ");
        adapted.notes.push(format!("validation {tried} (source {:.3})", source_score.accuracy));
    }
    Ok(adapted)
}

/// The gate's reference check of `adapted` against the source model: accuracy on the bundle's
/// reference samples of the unseen classes. The gate's unseen-rate check is not repeated here:
/// prior matching never aims below the share the source model predicts.
fn reference_check(
    adapted: &Adapted,
    source: &Adapted,
    reference: Option<&SplitSet>,
    config: &gate::GateConfig,
) -> Vec<String> {
    let health = health::estimate(adapted, source, reference, None);
    let input = GateInput { seen_validation: None, unseen_rate: None, reference_unseen: health.reference_unseen };
    gate::unseen_health(&input, config).0
}

/// The source model is kept: every rate was refused, each for the reasons given.
fn source_kept(refusals: &[(f32, Vec<String>)]) -> AdaptError {
    let reasons =
        refusals.iter().map(|(rate, reasons)| format!("lr {rate}: {}", reasons.join(", "))).collect::<Vec<_>>();
    AdaptError::SourceKept { rates: refusals.iter().map(|(rate, _)| *rate).collect(), reasons: reasons.join("; ") }
}

/// The balanced unseen share (see `calibrate::balanced_share`) measured on the chosen
/// candidate, which did not train on `held_out`, with the traffic's estimated share; `None`
/// where the estimate is missing or too uncertain.
fn balanced_share(
    input: &AdaptInput<'_>,
    candidate: &Adapted,
    held_out: &SplitSet,
    choice: Option<ShareChoice>,
) -> Option<ShareChoice> {
    let traffic = input.unlabelled.filter(|t| !t.splits.is_empty())?;
    let (seen, unseen) = seen_and_unseen(&input.data.labels, input.classes);
    let choice = choice?;
    let estimate = choice.estimate?;
    if estimate.high - estimate.low > share::MAX_INTERVAL {
        return None;
    }
    let raw = Adapted { gamma: 0.0, ..candidate.clone() };
    let traffic_gaps = calibrate::gaps(&raw.logits_of(&traffic.splits), &seen, &unseen);
    let held_out_gaps = calibrate::gaps(&raw.logits_of(held_out), &seen, &unseen);
    let share = calibrate::balanced_share(&traffic_gaps, &held_out_gaps, estimate.share, seen.len(), unseen.len())?;
    Some(ShareChoice { share, reason: ShareReason::Balanced, ..choice })
}

/// The unseen share prior matching aims at, from every labelled sample: made once, so that
/// every candidate and the final run aim at the same share.
fn share_choice(input: &AdaptInput<'_>, seed: u64) -> Option<ShareChoice> {
    let traffic = input.unlabelled.filter(|t| !t.splits.is_empty())?;
    let (seen, unseen) = seen_and_unseen(&input.data.labels, input.classes);
    Some(super::prior::choose_share(input, traffic, &seen, &unseen, seed))
}

/// A candidate's validation result: accuracy first; between equal accuracies (frequent with a
/// few validation samples per class) the lower mean negative log-likelihood, which still tells
/// candidates apart.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score {
    accuracy: f32,
    nll: f32,
}

impl Score {
    fn of(logits: &Array2<f32>, labels: &[usize]) -> Score {
        let predicted = crate::metrics::argmax_rows(logits.view());
        let accuracy = crate::metrics::accuracy(labels, &predicted).unwrap_or(0.0) as f32;
        Score { accuracy, nll: super::loss::mean_nll(logits, labels) }
    }

    fn better_than(&self, other: &Score) -> bool {
        self.accuracy > other.accuracy || (self.accuracy == other.accuracy && self.nll < other.nll)
    }
}

/// The best-scoring rate; exact ties go to the smaller rate.
fn best_rate(scores: &[(f32, Score)]) -> Option<f32> {
    let mut best: Option<(f32, Score)> = None;
    for &(rate, score) in scores {
        let wins = best.is_none_or(|(best_rate, best_score)| {
            score.better_than(&best_score) || (score == best_score && rate < best_rate)
        });
        if wins {
            best = Some((rate, score));
        }
    }
    best.map(|(rate, _)| rate)
}

pub(super) fn recommended_rates(hyper: &Hyper) -> Vec<f32> {
    match hyper.learning_rate {
        Some(rate) => vec![rate],
        None => hyper.recommended_rates.clone(),
    }
}

/// Holds out `share` of each class's samples (at least one where a class has two or more).
fn validation_split(data: &SplitSet, share: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7a11d);
    let (seen, _) = seen_and_unseen(&data.labels, 0);
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for class in seen {
        let mut members: Vec<usize> = (0..data.len()).filter(|&i| data.labels[i] == class).collect();
        members.shuffle(&mut rng);
        let held = if members.len() >= 2 { ((members.len() as f32 * share).round() as usize).max(1) } else { 0 };
        validation.extend_from_slice(&members[..held]);
        train.extend_from_slice(&members[held..]);
    }
    train.sort_unstable();
    validation.sort_unstable();
    (train, validation)
}

/// The method `recommended` trains with on `source` (its learning rate is chosen per device):
/// the tail where the bundle has one with weights, else a feature adapter.
pub fn recommended_for(source: &Network) -> Recipe {
    let part = if source.has_trainable_tail() { Part::Tail } else { Part::Adapter };
    Recipe { part, calibration: Some(Calibration::Prior(PriorTarget::Estimated)), ..Recipe::tail() }
}
