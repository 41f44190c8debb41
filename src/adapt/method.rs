//! Running an adaptation method (named as in `spec`): its hyperparameters, its input and the
//! adapted model it returns. `recommended` is the device default.

use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::calibrate;
use super::data::SplitSet;
use super::gate::GateConfig;
use super::optim::{SgdConfig, cosine};
use super::share;
pub use super::spec::{Calibration, Distill, Method, Part, PriorTarget, Recipe};
use super::train::{AdaptError, Cancel, DistillConfig, TrainConfig, Trainable, train};
use crate::network::{Batch, Network};

/// Hyper-parameters shared by the methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyper {
    pub steps: usize,
    pub batch_size: usize,
    /// Overrides every method's base learning rate (rates are divided by each layer's mean
    /// squared input norm, so they are comparable across layers and models).
    pub learning_rate: Option<f32>,
    /// Default base rates: naive head fine-tuning, tail, adapter.
    pub head_rate: f32,
    pub tail_rate: f32,
    pub adapter_rate: f32,
    /// Rates `recommended` chooses from on the device's own seen-class validation split.
    pub recommended_rates: Vec<f32>,
    /// Share of each seen class's samples `recommended` holds out for that choice.
    pub validation_share: f32,
    /// Training steps of each candidate `recommended` scores (the chosen rate then trains for
    /// `steps`).
    pub selection_steps: usize,
    pub sgd: SgdConfig,
    pub adapter_rank: usize,
    pub distill_temperature: f32,
    pub distill_weight: f32,
    /// Leave-out local SGD: rounds, copies per round, local steps, fraction of seen classes left out.
    pub lolsgd_rounds: usize,
    pub lolsgd_copies: usize,
    pub lolsgd_local_steps: usize,
    pub lolsgd_leave_out: f32,
    pub wise_alpha: f32,
    pub pcv_splits: usize,
    pub threads: usize,
    /// The unseen share of the unlabelled traffic for prior matching, instead of its estimate
    /// (bench diagnostics: the true share).
    pub unseen_share: Option<f32>,
    /// The share choice for prior matching when it is already made (`recommended` makes it
    /// once for its candidates and its final run).
    pub share_choice: Option<share::ShareChoice>,
    /// `recommended` aims prior matching at the share that balances per-class errors between
    /// the seen and unseen groups (see `calibrate::balanced_share`).
    pub balanced_share: bool,
    /// The gate's tolerances, which `recommended` applies to its candidates.
    pub gate: GateConfig,
    /// Stops the run from another thread.
    pub cancel: Cancel,
}

impl Default for Hyper {
    fn default() -> Self {
        Hyper {
            steps: 300,
            batch_size: 64,
            learning_rate: None,
            head_rate: 1.0,
            tail_rate: 8.0,
            adapter_rate: 2.0,
            recommended_rates: vec![4.0, 8.0, 16.0, 32.0],
            validation_share: 0.2,
            selection_steps: 100,
            sgd: SgdConfig { momentum: 0.9, weight_decay: 5e-4 },
            adapter_rank: 64,
            distill_temperature: 2.0,
            distill_weight: 1.0,
            lolsgd_rounds: 10,
            lolsgd_copies: 4,
            lolsgd_local_steps: 30,
            lolsgd_leave_out: 0.5,
            wise_alpha: 0.5,
            pcv_splits: 3,
            threads: TrainConfig::default().threads,
            unseen_share: None,
            share_choice: None,
            balanced_share: false,
            gate: GateConfig::default(),
            cancel: Cancel::default(),
        }
    }
}

/// An adapted model: the network plus the unseen-class logit bias.
#[derive(Debug, Clone)]
pub struct Adapted {
    pub network: Network,
    pub gamma: f32,
    pub unseen: Vec<usize>,
    /// What the method decided, for reports (e.g. the γ or the configuration `recommended` chose).
    pub notes: Vec<String>,
}

impl Adapted {
    pub fn logits(&self, batch: Batch) -> Array2<f32> {
        let mut logits = self.network.logits(batch);
        crate::network::apply_calibration(&mut logits, &self.unseen, self.gamma);
        logits
    }

    /// Logits for a whole set, in evaluation chunks.
    pub fn logits_of(&self, set: &SplitSet) -> Array2<f32> {
        let parts: Vec<Array2<f32>> = set.chunks(256).map(|batch| self.logits(batch)).collect();
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views).unwrap_or_else(|_| Array2::zeros((0, self.network.num_classes())))
    }
}

/// Everything a method may use: the source network, seen-class samples and the source model's
/// logits for them. No unseen labels and no test data.
pub struct AdaptInput<'a> {
    pub source: &'a Network,
    pub data: &'a SplitSet,
    /// Source-model logits of `data`, row per sample.
    pub teacher: &'a Array2<f32>,
    pub classes: usize,
    /// Unlabelled local traffic, for prior matching.
    pub unlabelled: Option<&'a Traffic>,
    /// The bundle's source-domain reference samples, for the gate's checks `recommended` makes.
    pub reference: Option<&'a SplitSet>,
}

/// Unlabelled local traffic with the source model's logits on it, computed once rather than by
/// every adaptation and health estimate that needs them.
pub struct Traffic {
    pub splits: SplitSet,
    pub source_logits: Array2<f32>,
}

impl Traffic {
    pub fn new(splits: SplitSet, source: &Network) -> Traffic {
        let source_logits =
            Adapted { network: source.clone(), gamma: 0.0, unseen: vec![], notes: vec![] }.logits_of(&splits);
        Traffic { splits, source_logits }
    }
}

pub fn seen_and_unseen(labels: &[usize], classes: usize) -> (Vec<usize>, Vec<usize>) {
    let mut seen = labels.to_vec();
    seen.sort_unstable();
    seen.dedup();
    let unseen = (0..classes).filter(|c| !seen.contains(c)).collect();
    (seen, unseen)
}

/// Runs a method. `progress` receives completed steps out of [`planned_steps`].
pub fn adapt(
    method: &Method,
    input: &AdaptInput<'_>,
    hyper: &Hyper,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<Adapted, AdaptError> {
    let (seen, unseen) = seen_and_unseen(&input.data.labels, input.classes);
    let recipe = match method {
        Method::Source => return Ok(Adapted { network: input.source.clone(), gamma: 0.0, unseen, notes: vec![] }),
        Method::Recommended => return super::recommended::adapt_recommended(input, hyper, seed, progress),
        Method::Trained(recipe) => recipe,
    };
    let mut done = 0usize;
    let mut network =
        train_network(recipe, input, input.data, input.teacher, &unseen, hyper, seed, &mut |n| progress(done + n))?;
    done += planned_train_steps(recipe, hyper);
    if recipe.wise {
        network = interpolate(input.source, &network, hyper.wise_alpha);
    }
    let mut notes = Vec::new();
    let traffic = input.unlabelled.filter(|u| !u.splits.is_empty());
    let gamma = match (recipe.calibration, traffic) {
        (None, _) => 0.0,
        (Some(Calibration::Prior(target)), Some(traffic)) => {
            super::prior::prior_gamma(target, input, traffic, &network, &seen, &unseen, hyper, seed, &mut notes)
        }
        // Prior matching without traffic falls back to ALG.
        (Some(Calibration::Alg | Calibration::Prior(_)), _) => {
            let logits = Adapted { network: network.clone(), gamma: 0.0, unseen: unseen.clone(), notes: vec![] }
                .logits_of(input.data);
            calibrate::alg_gamma(&logits, &input.data.labels, &seen, &unseen)
        }
        (Some(Calibration::Pcv), _) => pcv_gamma(recipe, input, &seen, hyper, seed, &mut |n| progress(done + n))?,
    };
    if recipe.calibration.is_some() {
        notes.push(format!("γ {gamma:.2}"));
    }
    Ok(Adapted { network, gamma, unseen, notes })
}

/// Steps a method runs, for progress bars.
pub fn planned_steps(method: &Method, hyper: &Hyper) -> usize {
    match method {
        Method::Source => 0,
        Method::Recommended => {
            let rates = super::recommended::recommended_rates(hyper).len();
            hyper.steps + if rates > 1 { rates * hyper.selection_steps } else { 0 }
        }
        Method::Trained(recipe) => {
            let pcv = recipe.calibration == Some(Calibration::Pcv);
            planned_train_steps(recipe, hyper) * if pcv { 1 + hyper.pcv_splits } else { 1 }
        }
    }
}

fn planned_train_steps(recipe: &Recipe, hyper: &Hyper) -> usize {
    if recipe.leave_out { hyper.lolsgd_rounds * hyper.lolsgd_copies * hyper.lolsgd_local_steps } else { hyper.steps }
}

fn train_config(recipe: &Recipe, hyper: &Hyper, seed: u64) -> TrainConfig {
    let trainable = match recipe.part {
        Part::HeadSeenRows => vec![Trainable::HeadSeenRows],
        Part::Head => vec![Trainable::Head],
        Part::Adapter => vec![Trainable::Adapter],
        Part::Tail => vec![Trainable::Tail],
    };
    let distill = recipe.distill.map(|distill| DistillConfig {
        unseen_only: distill == Distill::UnseenOnly,
        temperature: hyper.distill_temperature,
        weight: hyper.distill_weight,
    });
    let default_rate = match recipe.part {
        Part::Head | Part::HeadSeenRows => hyper.head_rate,
        Part::Adapter => hyper.adapter_rate,
        Part::Tail => hyper.tail_rate,
    };
    TrainConfig {
        trainable,
        steps: hyper.steps,
        batch_size: hyper.batch_size,
        learning_rate: hyper.learning_rate.unwrap_or(default_rate),
        sgd: hyper.sgd,
        distill,
        cosine_schedule: true,
        seed,
        threads: hyper.threads,
        cancel: hyper.cancel.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
fn train_network(
    recipe: &Recipe,
    input: &AdaptInput<'_>,
    data: &SplitSet,
    teacher: &Array2<f32>,
    unseen: &[usize],
    hyper: &Hyper,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<Network, AdaptError> {
    let start = if recipe.part == Part::Adapter {
        input.source.with_adapter(hyper.adapter_rank, seed)
    } else {
        input.source.clone()
    };
    let config = train_config(recipe, hyper, seed);
    if !recipe.leave_out {
        return train(&start, data, Some(teacher), unseen, &config, progress).map(|(network, _)| network);
    }
    leave_out_sgd(&start, data, teacher, unseen, &config, hyper, seed, progress)
}

/// Leave-out local SGD: each round trains copies on different subsets of the seen classes and
/// averages them, so that what all subsets agree on (the domain shift) survives and what is
/// specific to one subset partly cancels.
#[allow(clippy::too_many_arguments)]
fn leave_out_sgd(
    start: &Network,
    data: &SplitSet,
    teacher: &Array2<f32>,
    unseen: &[usize],
    config: &TrainConfig,
    hyper: &Hyper,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<Network, AdaptError> {
    let (seen, _) = seen_and_unseen(&data.labels, start.num_classes());
    let keep =
        (((1.0 - hyper.lolsgd_leave_out) * seen.len() as f32).round() as usize).clamp(2.min(seen.len()), seen.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x1015);
    let mut current = start.clone();
    let mut done = 0;
    for round in 0..hyper.lolsgd_rounds {
        let mut copies = Vec::with_capacity(hyper.lolsgd_copies);
        for copy in 0..hyper.lolsgd_copies {
            let mut subset = seen.clone();
            subset.shuffle(&mut rng);
            subset.truncate(keep);
            let indices: Vec<usize> = (0..data.len()).filter(|&i| subset.contains(&data.labels[i])).collect();
            let part = data.select(&indices);
            let part_teacher = teacher.select(Axis(0), &indices);
            let local = TrainConfig {
                steps: hyper.lolsgd_local_steps,
                learning_rate: config.learning_rate * cosine(round, hyper.lolsgd_rounds),
                cosine_schedule: false,
                seed: seed.wrapping_mul(1000).wrapping_add((round * hyper.lolsgd_copies + copy) as u64),
                ..config.clone()
            };
            let (trained, _) = train(&current, &part, Some(&part_teacher), unseen, &local, |n| progress(done + n))?;
            done += hyper.lolsgd_local_steps;
            copies.push(trained);
        }
        current = average(&copies);
    }
    Ok(current)
}

fn average(networks: &[Network]) -> Network {
    let mut mean = networks[0].clone();
    for slot in 0..mean.params.len() {
        for other in &networks[1..] {
            mean.params[slot] += &other.params[slot];
        }
        mean.params[slot] /= networks.len() as f32;
    }
    mean
}

/// `alpha · adapted + (1 − alpha) · source`, slot by slot.
pub fn interpolate(source: &Network, adapted: &Network, alpha: f32) -> Network {
    let mut mixed = adapted.clone();
    for (slot, param) in mixed.params.iter_mut().enumerate() {
        if let Some(source_param) = source.params.get(slot).filter(|p| p.shape() == param.shape()) {
            param.zip_mut_with(source_param, |a, &s| *a = alpha * *a + (1.0 - alpha) * s);
        }
    }
    mixed
}

/// Pseudo cross-validation of γ: split the seen classes into pseudo-seen and pseudo-unseen
/// halves, adapt on the pseudo-seen half, and pick the γ that maximises accuracy on all seen
/// samples while keeping pseudo-unseen accuracy at least the source model's; average over splits.
fn pcv_gamma(
    recipe: &Recipe,
    input: &AdaptInput<'_>,
    seen: &[usize],
    hyper: &Hyper,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<f32, AdaptError> {
    if seen.len() < 4 {
        return Ok(0.0);
    }
    let source_logits = input.teacher;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9c5);
    let mut gammas = Vec::new();
    let per_split = planned_train_steps(recipe, hyper);
    for split in 0..hyper.pcv_splits {
        let mut shuffled = seen.to_vec();
        shuffled.shuffle(&mut rng);
        let (pseudo_seen, pseudo_unseen) = shuffled.split_at(seen.len() / 2);
        let train_idx: Vec<usize> =
            (0..input.data.len()).filter(|&i| pseudo_seen.contains(&input.data.labels[i])).collect();
        let part = input.data.select(&train_idx);
        let part_teacher = input.teacher.select(Axis(0), &train_idx);
        let (_, unseen_here) = seen_and_unseen(&part.labels, input.classes);
        let mut network = train_network(
            recipe,
            input,
            &part,
            &part_teacher,
            &unseen_here,
            hyper,
            seed + 7919 * (split as u64 + 1),
            &mut |n| progress(per_split * (split + 1) + n),
        )?;
        if recipe.wise {
            network = interpolate(input.source, &network, hyper.wise_alpha);
        }
        let logits = Adapted { network, gamma: 0.0, unseen: vec![], notes: vec![] }.logits_of(input.data);
        let labels = &input.data.labels;
        let is_pseudo_unseen: Vec<bool> = labels.iter().map(|l| pseudo_unseen.contains(l)).collect();
        let source_pseudo_unseen_acc = accuracy_where(source_logits, labels, &is_pseudo_unseen, &unseen_here, 0.0);
        let candidates = candidate_gammas(&logits, pseudo_seen, &unseen_here);
        let mut best: Option<(f32, f32)> = None;
        for gamma in candidates {
            let pseudo_unseen_acc = accuracy_where(&logits, labels, &is_pseudo_unseen, &unseen_here, gamma);
            if pseudo_unseen_acc + 1e-6 < source_pseudo_unseen_acc {
                continue;
            }
            let all = accuracy_where(&logits, labels, &vec![true; labels.len()], &unseen_here, gamma);
            if best.is_none_or(|(_, a)| all > a) {
                best = Some((gamma, all));
            }
        }
        gammas.push(best.map_or(0.0, |(g, _)| g));
    }
    Ok(gammas.iter().sum::<f32>() / gammas.len() as f32)
}

/// Share of rows whose argmax is one of `classes`.
/// The share of rows whose most probable class is one of `classes`.
pub fn share_predicted(logits: &Array2<f32>, classes: &[usize]) -> f32 {
    let hits = crate::metrics::argmax_rows(logits.view()).into_iter().filter(|c| classes.contains(c)).count();
    hits as f32 / logits.nrows().max(1) as f32
}

fn candidate_gammas(logits: &Array2<f32>, seen: &[usize], unseen: &[usize]) -> Vec<f32> {
    let mut gaps = calibrate::gaps(logits, seen, unseen);
    gaps.retain(|g| g.is_finite());
    gaps.sort_by(f32::total_cmp);
    let mut candidates = vec![0.0];
    candidates.extend(gaps.iter().map(|g| g + 1e-3));
    candidates
}

fn accuracy_where(logits: &Array2<f32>, labels: &[usize], mask: &[bool], unseen: &[usize], gamma: f32) -> f32 {
    let mut correct = 0usize;
    let mut total = 0usize;
    for ((row, &label), &keep) in logits.axis_iter(Axis(0)).zip(labels).zip(mask) {
        if !keep {
            continue;
        }
        total += 1;
        let predicted = crate::metrics::argmax(
            row.iter().enumerate().map(|(c, &z)| if unseen.contains(&c) { z + gamma } else { z }),
        );
        correct += (predicted == label) as usize;
    }
    if total == 0 { 0.0 } else { correct as f32 / total as f32 }
}
