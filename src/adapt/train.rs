//! The training loop shared by every method: seeded batches of seen-class samples, SGD with
//! momentum and a cosine schedule, optional distillation from the source model, both cores.

use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use rand::seq::IndexedRandom;

use super::data::SplitSet;
use super::loss::{cross_entropy, distillation};
use super::optim::{Sgd, SgdConfig, cosine};
use crate::network::{Network, Role};

/// What may change during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    Tail,
    Adapter,
    /// Every head row.
    Head,
    /// Only the rows of classes present in the training data.
    HeadSeenRows,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillConfig {
    /// Distil only the unseen classes' relations (else all classes).
    pub unseen_only: bool,
    pub temperature: f32,
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub trainable: Vec<Trainable>,
    pub steps: usize,
    pub batch_size: usize,
    /// Base rate; each slot's step is this divided by the mean squared norm of its layer's input.
    pub learning_rate: f32,
    pub sgd: SgdConfig,
    pub distill: Option<DistillConfig>,
    /// Cosine decay over the run, or a constant rate (local runs of leave-out SGD).
    pub cosine_schedule: bool,
    pub seed: u64,
    pub threads: usize,
    pub cancel: Cancel,
}

/// Lets another thread stop a run between steps; the run then ends with
/// [`AdaptError::Cancelled`] and changes nothing.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Tokens compare equal when they are the same token.
impl PartialEq for Cancel {
    fn eq(&self, other: &Cancel) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            trainable: vec![Trainable::Tail],
            steps: 300,
            batch_size: 64,
            learning_rate: 0.1,
            sgd: SgdConfig { momentum: 0.9, weight_decay: 5e-4 },
            distill: None,
            cosine_schedule: true,
            seed: 0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()).min(4),
            cancel: Cancel::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdaptError {
    #[error("no labelled samples to adapt on")]
    NoSamples,
    #[error("adaptation needs at least two seen classes; only '{0}' has samples")]
    SingleClass(String),
    #[error("label {label} is not a class of this model ({classes} classes)")]
    UnknownLabel { label: usize, classes: usize },
    #[error("the split tensors have {got} channels, the model's tail expects {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("training diverged at step {step}: {what} is not finite; the previous version is kept")]
    NotFinite { step: usize, what: String },
    #[error("nothing to train: the configuration selects no parameters")]
    NothingToTrain,
    #[error("cancelled at step {step}; the previous version is kept")]
    Cancelled { step: usize },
    #[error(
        "no adapted candidate passed the gate's checks against the source model ({reasons}); the previous version is kept"
    )]
    SourceKept { rates: Vec<f32>, reasons: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    pub steps: usize,
    /// Mean loss of each tenth of the run.
    pub loss_curve: Vec<f32>,
}

/// Which parameter slots `trainable` selects.
pub fn wanted_slots(network: &Network, trainable: &[Trainable]) -> Vec<bool> {
    network
        .roles
        .iter()
        .map(|role| match role {
            Role::Tail => trainable.contains(&Trainable::Tail),
            Role::Adapter => trainable.contains(&Trainable::Adapter),
            Role::Head => trainable.iter().any(|t| matches!(t, Trainable::Head | Trainable::HeadSeenRows)),
        })
        .collect()
}

/// Checks the data against the model before any training.
pub fn validate(network: &Network, data: &SplitSet, classes: usize, class_names: &[String]) -> Result<(), AdaptError> {
    if data.is_empty() {
        return Err(AdaptError::NoSamples);
    }
    if let Some(&label) = data.labels.iter().find(|&&l| l >= classes) {
        return Err(AdaptError::UnknownLabel { label, classes });
    }
    let first = data.labels[0];
    if data.labels.iter().all(|&l| l == first) {
        return Err(AdaptError::SingleClass(class_names.get(first).cloned().unwrap_or_else(|| first.to_string())));
    }
    if let Some(expected) = network.input_channels()
        && data.channels() != expected
    {
        return Err(AdaptError::Dimension { got: data.channels(), expected });
    }
    Ok(())
}

/// Trains a copy of `network` on `data`; `teacher` holds the source model's logits per sample
/// (needed for distillation). Returns the trained copy, or an error and no change.
pub fn train(
    network: &Network,
    data: &SplitSet,
    teacher: Option<&Array2<f32>>,
    unseen: &[usize],
    config: &TrainConfig,
    mut progress: impl FnMut(usize),
) -> Result<(Network, TrainReport), AdaptError> {
    let wanted = wanted_slots(network, &config.trainable);
    if !wanted.iter().any(|&w| w) {
        return Err(AdaptError::NothingToTrain);
    }
    let classes = network.num_classes();
    let seen: Vec<usize> = {
        let mut s = data.labels.clone();
        s.sort_unstable();
        s.dedup();
        s
    };
    let seen_rows_only = config.trainable.contains(&Trainable::HeadSeenRows);
    let mut network = network.clone();
    let probe: Vec<usize> = (0..data.len().min(256)).collect();
    let scales = network.input_scales(data.batch(&probe));
    let mut sgd = Sgd::new(config.sgd, network.params.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
    let all: Vec<usize> = (0..data.len()).collect();
    let mut losses = Vec::with_capacity(config.steps);
    let distill_classes: Vec<usize> = match config.distill {
        Some(d) if d.unseen_only => unseen.to_vec(),
        Some(_) => (0..classes).collect(),
        None => vec![],
    };
    for step in 0..config.steps {
        if config.cancel.is_cancelled() {
            return Err(AdaptError::Cancelled { step });
        }
        let batch: Vec<usize> =
            (0..config.batch_size.min(data.len())).map(|_| *all.choose(&mut rng).expect("data is not empty")).collect();
        let (loss, mut grads) = batch_gradients(&network, data, teacher, &batch, &wanted, config, &distill_classes);
        if !loss.is_finite() {
            return Err(AdaptError::NotFinite { step, what: "the loss".into() });
        }
        if seen_rows_only {
            if let Some(grad) = grads[network.head.0].as_mut() {
                mask_rows(grad, &seen);
            }
            if let Some(grad) = grads[network.head.1].as_mut() {
                mask_rows(grad, &seen);
            }
        }
        if let Some(slot) = grads.iter().position(|g| g.as_ref().is_some_and(|g| g.iter().any(|v| !v.is_finite()))) {
            return Err(AdaptError::NotFinite { step, what: format!("the gradient of parameter {slot}") });
        }
        let factor = config.learning_rate * if config.cosine_schedule { cosine(step, config.steps) } else { 1.0 };
        let rates: Vec<f32> = scales.iter().map(|s| factor / s).collect();
        sgd.step(&mut network.params, &grads, &rates);
        losses.push(loss);
        progress(step + 1);
    }
    if let Some(slot) = network.params.iter().position(|p| p.iter().any(|v| !v.is_finite())) {
        return Err(AdaptError::NotFinite { step: config.steps, what: format!("parameter {slot}") });
    }
    let tenth = (losses.len() / 10).max(1);
    let loss_curve = losses.chunks(tenth).map(|c| c.iter().sum::<f32>() / c.len() as f32).collect();
    Ok((network, TrainReport { steps: config.steps, loss_curve }))
}

fn mask_rows(grad: &mut ArrayD<f32>, keep: &[usize]) {
    for (row, mut values) in grad.outer_iter_mut().enumerate() {
        if !keep.contains(&row) {
            values.fill(0.0);
        }
    }
}

/// Loss and gradients of one batch, split over threads; gradients are batch means.
fn batch_gradients(
    network: &Network,
    data: &SplitSet,
    teacher: Option<&Array2<f32>>,
    batch: &[usize],
    wanted: &[bool],
    config: &TrainConfig,
    distill_classes: &[usize],
) -> (f32, Vec<Option<ArrayD<f32>>>) {
    let total = batch.len() as f32;
    let part = |indices: &[usize]| {
        let (logits, tape) = network.forward(data.batch(indices));
        let labels: Vec<usize> = indices.iter().map(|&i| data.labels[i]).collect();
        let (mut loss, mut dlogits) = cross_entropy(&logits, &labels);
        if let (Some(distill), Some(teacher)) = (config.distill, teacher) {
            let rows = teacher.select(ndarray::Axis(0), indices);
            let (d_loss, d_grad) = distillation(&logits, &rows, distill_classes, distill.temperature);
            loss += distill.weight * d_loss;
            dlogits.scaled_add(distill.weight, &d_grad);
        }
        // Per-part means become a mean over the whole batch.
        let share = indices.len() as f32 / total;
        dlogits *= share;
        (loss * share, network.backward(&tape, &dlogits, wanted))
    };
    let threads = config.threads.clamp(1, batch.len().max(1));
    let parts: Vec<&[usize]> = batch.chunks(batch.len().div_ceil(threads)).collect();
    let results: Vec<(f32, Vec<Option<ArrayD<f32>>>)> = if parts.len() == 1 {
        vec![part(parts[0])]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts.iter().map(|indices| scope.spawn(|| part(indices))).collect();
            handles.into_iter().map(|h| h.join().expect("gradient workers do not panic")).collect()
        })
    };
    let mut results = results.into_iter();
    let (mut loss, mut grads) = results.next().expect("at least one part");
    for (part_loss, part_grads) in results {
        loss += part_loss;
        for (sum, add) in grads.iter_mut().zip(part_grads) {
            if let (Some(sum), Some(add)) = (sum.as_mut(), add) {
                *sum += &add;
            }
        }
    }
    (loss, grads)
}
