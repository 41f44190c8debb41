//! Classification with a bundle: the trunk runs in ONNX Runtime, and the tail and head run there
//! too, on the trunk's execution provider ([`onnx_tail`]), or in Rust where they cannot or where
//! `runtime.tail = "rust"`.

mod files;
pub mod import_check;
pub mod onnx_tail;
mod predict;

pub use files::{collect_image_files, is_image_name, prepare_bytes, prepare_files};
pub use predict::{FileResult, Prediction, predict};

use std::path::PathBuf;

use ndarray::{Array2, ArrayD, ArrayView4, ArrayViewD, Axis};
use serde::Serialize;

use crate::imaging::{self, DecodeLimits};
use crate::model::Bundle;
use crate::network::{Batch, Network};
use crate::runtime::{self, ModelSession, ProviderKind, RuntimeError, RuntimeOptions, TailPlacement};
use onnx_tail::OnnxTail;

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{model}: the model has no {what} named '{name}' (it has: {available})")]
    MissingTensor { model: PathBuf, what: &'static str, name: String, available: String },
    #[error("{model}: inference failed: {problem}")]
    Run { model: PathBuf, problem: String },
    #[error("split tensors of shape {got:?} do not match the bundle's {expected:?}")]
    SplitShape { got: Vec<usize>, expected: Vec<usize> },
    #[error("{bundle}: the tail and head cannot run in ONNX Runtime (runtime.tail = \"onnx\"): {problem}")]
    OnnxTail { bundle: PathBuf, problem: String },
}

/// Tail sessions kept open for networks of other structures (the source's and an adapted
/// version's), so that a rollback swaps tensors too.
const KEPT_TAIL_SESSIONS: usize = 4;

/// Batches of at least twice this many samples run the tail on several threads.
const PARALLEL_MIN_SAMPLES: usize = 8;

/// A bundle opened for inference.
pub struct Classifier {
    pub bundle: Bundle,
    /// Tail and head: the same code adaptation trains, so an adapted version only swaps weights.
    network: Network,
    /// Bias added to the unseen classes' logits by the active adapted version (0 for the source).
    calibration: Calibration,
    trunk: ModelSession,
    /// The one batch size the trunk runs on (GPU providers; the CPU takes any size).
    fixed_batch: Option<usize>,
    options: RuntimeOptions,
    /// Tail sessions by structure, the most recently served last.
    tails: Vec<OnnxTail>,
    /// Whether the last of `tails` serves `network` (false where it could not be opened).
    tail_ready: bool,
    tail_sessions_opened: usize,
}

/// How the start-up warm-up went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warmup {
    pub provider: ProviderKind,
    /// Where the tail and head run: the provider of their ONNX Runtime session, `None` in Rust.
    pub tail_provider: Option<ProviderKind>,
    /// Opening the model and the first run, TensorRT engine build included.
    pub seconds: f64,
    /// What happened to the TensorRT engine cache (`None` without one).
    pub engine_cache: Option<String>,
}

/// The unseen-class logit bias of an adapted version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Calibration {
    pub gamma: f32,
    pub unseen: Vec<usize>,
}

impl Classifier {
    pub fn open(bundle: Bundle, options: &RuntimeOptions) -> Result<Classifier, InferenceError> {
        let contract = &bundle.manifest.input;
        let input = runtime::InputShape { name: contract.tensor.clone(), sample: sample_shape(contract) };
        let trunk = runtime::open_session(&bundle.trunk_path(), bundle.trunk_sha256(), Some(&input), options)?;
        check_names(&trunk, "input", &contract.tensor, trunk.session.inputs().iter().map(|o| o.name()))?;
        check_names(&trunk, "output", &bundle.manifest.trunk.output, trunk.session.outputs().iter().map(|o| o.name()))?;
        let network = Network::from_bundle(&bundle);
        let fixed_batch = trunk.provider.is_gpu().then_some(options.gpu_batch.max(1));
        let mut classifier = Classifier {
            bundle,
            network,
            calibration: Calibration::default(),
            trunk,
            fixed_batch,
            options: options.clone(),
            tails: Vec::new(),
            tail_ready: false,
            tail_sessions_opened: 0,
        };
        if let Err(problem) = classifier.serve_tail_in_onnx()
            && options.tail == TailPlacement::Onnx
        {
            return Err(InferenceError::OnnxTail { bundle: classifier.bundle.dir.clone(), problem });
        }
        Ok(classifier)
    }

    /// Binds the served network to a tail session of its structure, opening one if none is
    /// kept. On failure the tail runs in Rust.
    fn serve_tail_in_onnx(&mut self) -> Result<(), String> {
        self.tail_ready = false;
        if self.options.tail == TailPlacement::Rust {
            return Ok(());
        }
        let split_shape = self.bundle.manifest.trunk.output_shape.clone();
        let provider = onnx_tail::provider_beside(self.trunk.provider);
        let params_as = onnx_tail::ParamsAs::for_provider(provider);
        // Constants mean a session per version: keeping others would only hold their memory.
        let kept = if params_as == onnx_tail::ParamsAs::Constants { 1 } else { KEPT_TAIL_SESSIONS };
        let outcome = onnx_tail::structure_of(&self.network, &split_shape).and_then(|(structure, _)| {
            match self.tails.iter().position(|tail| tail.structure() == structure) {
                Some(index) => {
                    let mut tail = self.tails.remove(index);
                    let bound = tail.bind(&self.network);
                    self.tails.push(tail);
                    if bound.is_ok() && params_as == onnx_tail::ParamsAs::Constants {
                        self.tail_sessions_opened += 1;
                    }
                    bound
                }
                None => {
                    let network = &self.network;
                    let tail =
                        OnnxTail::open(network, &split_shape, provider, params_as, &self.options, &self.bundle.dir)?;
                    self.tail_sessions_opened += 1;
                    self.tails.push(tail);
                    Ok(())
                }
            }
        });
        let excess = self.tails.len().saturating_sub(kept);
        self.tails.drain(..excess);
        match outcome {
            Ok(()) => {
                self.tail_ready = true;
                Ok(())
            }
            Err(problem) if self.options.tail == TailPlacement::Onnx => {
                tracing::error!(%problem, "runtime.tail = \"onnx\", but the tail and head run in Rust: they cannot run in ONNX Runtime");
                Err(problem)
            }
            Err(problem) => {
                tracing::warn!(%problem, "the tail and head run in Rust: they cannot run in ONNX Runtime");
                Err(problem)
            }
        }
    }

    /// Tail sessions opened so far: once per structure on GPU providers, once per version
    /// served on the CPU.
    pub fn tail_sessions_opened(&self) -> usize {
        self.tail_sessions_opened
    }

    /// Where the tail and head run now: `Some(provider)` in ONNX Runtime, `None` in Rust.
    pub fn tail_provider(&self) -> Option<ProviderKind> {
        self.tail_ready.then(|| self.tails.last().map(OnnxTail::provider)).flatten()
    }

    /// Opens the bundle and runs it once, so that a TensorRT engine is built (or loaded from its
    /// cache) and cuDNN has picked its algorithms at start rather than on live images: a first engine build can take minutes on a Jetson. `tick`
    /// gets the time so far about once a second meanwhile.
    pub fn open_warm(
        bundle: Bundle,
        options: &RuntimeOptions,
        tick: &(dyn Fn(std::time::Duration) + Sync),
    ) -> Result<(Classifier, Warmup), InferenceError> {
        let started = std::time::Instant::now();
        let mut classifier = with_ticker(tick, || -> Result<Classifier, InferenceError> {
            let mut classifier = Classifier::open(bundle, options)?;
            let sample = sample_shape(&classifier.bundle.manifest.input);
            let zeros = ndarray::Array4::<f32>::zeros((1, sample[0], sample[1], sample[2]));
            classifier.split(zeros.view())?;
            Ok(classifier)
        })?;
        let engine_cache = classifier.trunk.engine_cache.take().map(|cache| {
            if let Err(problem) = cache.seal() {
                tracing::warn!(%problem, "TensorRT engine cache left unsealed; it will be rebuilt next start");
            }
            cache.verdict.describe()
        });
        let warmup = Warmup {
            provider: classifier.provider(),
            tail_provider: classifier.tail_provider(),
            seconds: started.elapsed().as_secs_f64(),
            engine_cache,
        };
        let tail = warmup.tail_provider.map_or("rust".to_string(), |p| p.to_string());
        match &warmup.engine_cache {
            Some(cache) => {
                tracing::info!(provider = %warmup.provider, %tail, seconds = warmup.seconds, engine_cache = %cache, "model warmed up")
            }
            None => tracing::info!(provider = %warmup.provider, %tail, seconds = warmup.seconds, "model warmed up"),
        }
        Ok((classifier, warmup))
    }

    /// Runs the trunk on batches of exactly `size` (padded or in parts), as GPU providers do
    /// from `runtime.gpu_batch`; `None` passes batches through. Lets the CPU check the padding.
    pub fn set_fixed_batch(&mut self, size: Option<usize>) {
        self.fixed_batch = size.map(|s| s.max(1));
    }

    /// Serves another version of the tail, adapter and head from now on. A version of a
    /// structure served before only swaps the tensors its tail session reads.
    pub fn set_model(&mut self, network: Network, calibration: Calibration) {
        self.network = network;
        self.calibration = calibration;
        // On failure the version is served from Rust; the warning is logged.
        let _ = self.serve_tail_in_onnx();
    }

    /// The network and calibration being served.
    pub fn model(&self) -> (&Network, &Calibration) {
        (&self.network, &self.calibration)
    }

    /// The execution provider the trunk actually runs on.
    pub fn provider(&self) -> ProviderKind {
        self.trunk.provider
    }

    /// Runs the trunk: a batch in the contract's layout to split tensors `[N, ...]`.
    pub fn split(&mut self, batch: ArrayView4<'_, f32>) -> Result<ArrayD<f32>, InferenceError> {
        let size = self.fixed_batch;
        in_fixed_batches(batch.into_dyn(), size, |part| {
            self.split_once(part.into_dimensionality().expect("a 4-D batch stays 4-D"))
        })
    }

    fn split_once(&mut self, batch: ArrayView4<'_, f32>) -> Result<ArrayD<f32>, InferenceError> {
        let run_error = |problem: String| InferenceError::Run { model: self.trunk.model.clone(), problem };
        let batch = batch.as_standard_layout();
        let input = ort::value::TensorRef::from_array_view(batch.view()).map_err(|e| run_error(e.to_string()))?;
        let input_name = self.bundle.manifest.input.tensor.as_str();
        let outputs =
            self.trunk.session.run(ort::inputs![input_name => input]).map_err(|e| run_error(e.to_string()))?;
        let output = outputs.get(self.bundle.manifest.trunk.output.as_str()).ok_or_else(|| {
            run_error(format!("output '{}' missing from the results", self.bundle.manifest.trunk.output))
        })?;
        let array = output.try_extract_array::<f32>().map_err(|e| run_error(e.to_string()))?;
        Ok(array.to_owned())
    }

    /// Tail on split tensors: `[N, ...]` to penultimate features `[N, d]`.
    pub fn features_from_split(&self, split: ArrayViewD<'_, f32>) -> Result<Array2<f32>, InferenceError> {
        Ok(self.network.features(self.batch(split)?))
    }

    /// Logits of split tensors with the served version's calibration.
    pub fn logits_from_split(&mut self, split: ArrayViewD<'_, f32>) -> Result<Array2<f32>, InferenceError> {
        let mut logits = match self.tail_provider() {
            Some(_) => self.onnx_logits(split)?,
            None => self.rust_logits(split)?,
        };
        crate::network::apply_calibration(&mut logits, &self.calibration.unseen, self.calibration.gamma);
        Ok(logits)
    }

    /// On GPU providers in the trunk's fixed batch size, for the same reason as the trunk.
    fn onnx_logits(&mut self, split: ArrayViewD<'_, f32>) -> Result<Array2<f32>, InferenceError> {
        let got = split.shape().get(1..).unwrap_or(&[]).to_vec();
        if got != self.bundle.manifest.trunk.output_shape {
            return Err(InferenceError::SplitShape { got, expected: self.bundle.manifest.trunk.output_shape.clone() });
        }
        let tail = self.tails.last_mut().expect("a ready tail session");
        let model = &self.trunk.model;
        let logits = in_fixed_batches(split, self.fixed_batch, |part| {
            tail.logits(part).map(Array2::into_dyn).map_err(|problem| InferenceError::Run {
                model: model.clone(),
                problem: format!("tail and head: {problem}"),
            })
        })?;
        Ok(logits.into_dimensionality().expect("logits are [N, classes]"))
    }

    /// Large batches are split over the cores: ONNX Runtime's threads are idle while the tail
    /// runs, and the tail's matrix products are too small to thread well on their own.
    fn rust_logits(&self, split: ArrayViewD<'_, f32>) -> Result<Array2<f32>, InferenceError> {
        let samples = split.shape().first().copied().unwrap_or(0);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(samples / PARALLEL_MIN_SAMPLES);
        if workers <= 1 {
            return Ok(self.network.logits(self.batch(split)?));
        }
        let per_worker = samples.div_ceil(workers);
        let parts: Vec<_> = (0..samples)
            .step_by(per_worker)
            .map(|start| split.slice_axis(Axis(0), ndarray::Slice::from(start..(start + per_worker).min(samples))))
            .collect();
        // The classifier's sessions are not shared with threads: only the network and the shape.
        let (network, expected) = (&self.network, &self.bundle.manifest.trunk.output_shape);
        let results: Vec<Result<Array2<f32>, InferenceError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| scope.spawn(move || Ok(network.logits(network_batch(part, expected)?))))
                .collect();
            handles.into_iter().map(|h| h.join().expect("tail workers do not panic")).collect()
        });
        let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = results.iter().map(|r| r.view()).collect();
        Ok(ndarray::concatenate(Axis(0), &views).expect("parts share the class count"))
    }

    fn batch(&self, split: ArrayViewD<'_, f32>) -> Result<Batch, InferenceError> {
        network_batch(split, &self.bundle.manifest.trunk.output_shape)
    }

    pub fn logits(&mut self, batch: ArrayView4<'_, f32>) -> Result<Array2<f32>, InferenceError> {
        let split = self.split(batch)?;
        self.logits_from_split(split.view())
    }

    /// Classifies files in batches. A file that cannot be read or decoded gets its own error and
    /// the rest of the batch still runs.
    pub fn classify_files(
        &mut self,
        files: &[PathBuf],
        batch_size: usize,
        top_k: usize,
        limits: &DecodeLimits,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<FileResult>, InferenceError> {
        let mut results = Vec::with_capacity(files.len());
        for chunk in files.chunks(batch_size.max(1)) {
            let prepared = prepare_files(chunk, &self.bundle.manifest.input, limits);
            let tensors: Vec<_> =
                prepared.iter().filter_map(|outcome| outcome.as_ref().ok().map(|t| t.view())).collect();
            let mut predictions = Vec::new();
            if !tensors.is_empty() {
                let batch = imaging::stack(&tensors);
                let logits = self.logits(batch.view())?;
                predictions = predict(logits.view(), &self.bundle.head.classes, top_k);
            }
            let mut predictions = predictions.into_iter();
            for (file, outcome) in chunk.iter().zip(prepared) {
                let outcome = match outcome {
                    Ok(_) => Ok(predictions.next().expect("one prediction per decoded image")),
                    Err(error) => Err(error.to_string()),
                };
                results.push(FileResult { file: file.clone(), outcome });
            }
            progress(chunk.len());
        }
        Ok(results)
    }
}

/// Split tensors `[N, ...]` of the `expected` per-sample shape as the network's batch.
fn network_batch(split: ArrayViewD<'_, f32>, expected: &[usize]) -> Result<Batch, InferenceError> {
    let got = split.shape().get(1..).unwrap_or(&[]).to_vec();
    if got != expected {
        return Err(InferenceError::SplitShape { got, expected: expected.to_vec() });
    }
    Batch::from_onnx(split).map_err(|_| InferenceError::SplitShape { got, expected: expected.to_vec() })
}

/// `run` on parts of `batch` of exactly `size` samples (the last padded with zeros and its
/// result cut back), concatenated; with no size, on the whole batch.
fn in_fixed_batches(
    batch: ArrayViewD<'_, f32>,
    size: Option<usize>,
    mut run: impl FnMut(ArrayViewD<'_, f32>) -> Result<ArrayD<f32>, InferenceError>,
) -> Result<ArrayD<f32>, InferenceError> {
    let samples = batch.shape()[0];
    let Some(size) = size.filter(|_| samples > 0) else {
        return run(batch);
    };
    let mut parts = Vec::with_capacity(samples.div_ceil(size));
    for start in (0..samples).step_by(size) {
        let end = (start + size).min(samples);
        let part = batch.slice_axis(Axis(0), ndarray::Slice::from(start..end));
        if size == end - start {
            parts.push(run(part)?);
        } else {
            let mut shape = part.shape().to_vec();
            shape[0] = size;
            let mut padded = ArrayD::<f32>::zeros(shape);
            padded.slice_axis_mut(Axis(0), ndarray::Slice::from(0..end - start)).assign(&part);
            let result = run(padded.view())?;
            parts.push(result.slice_axis(Axis(0), ndarray::Slice::from(0..end - start)).to_owned());
        }
    }
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    Ok(ndarray::concatenate(Axis(0), &views).expect("parts share their shape"))
}

/// One sample's input shape in the contract's layout.
fn sample_shape(contract: &crate::model::manifest::InputContract) -> Vec<usize> {
    let (c, h, w) = (contract.channels as usize, contract.height as usize, contract.width as usize);
    match contract.layout {
        crate::model::manifest::Layout::Nchw => vec![c, h, w],
        crate::model::manifest::Layout::Nhwc => vec![h, w, c],
    }
}

/// Runs `work` while a helper thread calls `tick` with the elapsed time about once a second.
/// The helper stops when `work` returns and also when it panics (a guard stops it on drop):
/// otherwise the scope would wait forever for a helper that nothing tells to stop.
fn with_ticker<T>(tick: &(dyn Fn(std::time::Duration) + Sync), work: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};

    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    let started = std::time::Instant::now();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&done);
        scope.spawn(|| {
            let mut next = 1;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if started.elapsed().as_secs() >= next {
                    tick(started.elapsed());
                    next += 1;
                }
            }
        });
        work()
    })
}

fn check_names<'a>(
    session: &ModelSession,
    what: &'static str,
    wanted: &str,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), InferenceError> {
    let names: Vec<&str> = names.collect();
    if names.contains(&wanted) {
        Ok(())
    } else {
        Err(InferenceError::MissingTensor {
            model: session.model.clone(),
            what,
            name: wanted.to_string(),
            available: names.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticker_stops_when_the_work_it_watches_panics() {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| with_ticker(&|_| {}, || panic!("the work failed")));
            let _ = sender.send(outcome.is_err());
        });
        let outcome = receiver.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(outcome, Ok(true), "with_ticker must hand the work's panic on, not wait for its ticker forever");
    }

    #[test]
    fn the_ticker_ticks_while_slow_work_runs_and_stops_after() {
        let ticks = std::sync::atomic::AtomicUsize::new(0);
        let value = with_ticker(
            &|_| {
                ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
            || {
                std::thread::sleep(std::time::Duration::from_millis(1100));
                7
            },
        );
        assert_eq!(value, 7);
        assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }
}
