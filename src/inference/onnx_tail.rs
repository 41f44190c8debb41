//! The tail and head in ONNX Runtime, on the trunk's execution provider (CUDA beside a
//! TensorRT trunk: [`provider_beside`]).
//!
//! On GPU providers the parameters are graph inputs ([`crate::network::graph`]), bound once per
//! version on the device, so serving a new version of the same structure swaps tensors: no new
//! session, no engine build. On the CPU they are constants of a session opened per version
//! (milliseconds), since ONNX Runtime packs constant weights once and then runs the tail's
//! matrix products faster than with weights as inputs ([`ParamsAs::for_provider`]).

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayViewD, Ix2};
use ort::memory::MemoryInfo;
use ort::session::IoBinding;
use ort::value::{Tensor, TensorRef};
use sha2::{Digest, Sha256};

use crate::network::Network;
use crate::network::graph::{LOGITS, SPLIT, TailGraph, tail_graph};
use crate::runtime::{self, InputShape, ModelSession, ProviderKind, RuntimeOptions};

/// An open tail session and the parameters of the version it serves.
pub struct OnnxTail {
    session: ModelSession,
    graph: TailGraph,
    /// SHA-256 of the encoded graph with parameters as inputs: equal for every network of one
    /// structure.
    structure: String,
    split_shape: Vec<usize>,
    params_as: ParamsAs,
    /// The runtime settings with the trunk's provider as the only one.
    options: RuntimeOptions,
    label: PathBuf,
    /// The served parameters bound to the session's inputs (on its device) and the logits to
    /// host memory; `None` where the parameters are constants of the session.
    binding: Option<IoBinding>,
}

/// How a tail session holds the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsAs {
    /// Constants of the session: a session per version.
    Constants,
    /// Graph inputs: one session per structure, tensors rebound per version.
    Inputs,
}

/// The provider the tail runs on beside a trunk on `trunk`: the same, except that a TensorRT
/// trunk gets a CUDA tail on the same GPU. CUDA runs a convolution whose weights are inputs as
/// it runs any other; TensorRT's support for that depends on its version, a miss would put the
/// node on the CPU, and its gain on a graph of a few matrix products is small.
pub fn provider_beside(trunk: ProviderKind) -> ProviderKind {
    match trunk {
        ProviderKind::Tensorrt => ProviderKind::Cuda,
        other => other,
    }
}

impl ParamsAs {
    /// Constants on the CPU: they run the default bundle's tail at batch 8 in 0.21 ms instead
    /// of 0.31 ms as inputs, and a session opens in a few milliseconds. Inputs on GPU
    /// providers, where a new session could mean a new TensorRT engine: minutes.
    pub fn for_provider(provider: ProviderKind) -> ParamsAs {
        if provider.is_gpu() { ParamsAs::Inputs } else { ParamsAs::Constants }
    }
}

/// The structure key of `network` on split tensors of `split_shape`, with its graph; fails
/// where the network cannot be expressed as an ONNX graph.
pub fn structure_of(network: &Network, split_shape: &[usize]) -> Result<(String, TailGraph), String> {
    let graph = tail_graph(network, split_shape)?;
    let bytes = crate::model::onnx::encode_model(&graph.model);
    Ok((hex::encode(Sha256::digest(&bytes)), graph))
}

impl OnnxTail {
    /// Opens the tail of `network` on `provider`, binds its parameters and runs it once, so
    /// that the first live image does not pay for kernel selection.
    pub fn open(
        network: &Network,
        split_shape: &[usize],
        provider: ProviderKind,
        params_as: ParamsAs,
        options: &RuntimeOptions,
        bundle_dir: &Path,
    ) -> Result<OnnxTail, String> {
        let (structure, graph) = structure_of(network, split_shape)?;
        let options = RuntimeOptions { providers: vec![provider], require_gpu: provider.is_gpu(), ..options.clone() };
        let label = bundle_dir.join("tail-and-head.onnx");
        let model = match params_as {
            ParamsAs::Constants => graph.with_weights_of(network)?,
            ParamsAs::Inputs => graph.model.clone(),
        };
        let session = open_session(&model, &structure, split_shape, &options, &label)?;
        let mut tail = OnnxTail {
            session,
            graph,
            structure,
            split_shape: split_shape.to_vec(),
            params_as,
            options,
            label,
            binding: None,
        };
        if params_as == ParamsAs::Inputs {
            tail.bind_inputs(network)?;
        }
        tail.warm_up()?;
        Ok(tail)
    }

    fn warm_up(&mut self) -> Result<(), String> {
        let batch = if self.session.provider.is_gpu() { self.options.gpu_batch.max(1) } else { 1 };
        let shape: Vec<usize> = std::iter::once(batch).chain(self.split_shape.iter().copied()).collect();
        self.logits(ndarray::ArrayD::<f32>::zeros(shape).view()).map(|_| ())
    }

    pub fn structure(&self) -> &str {
        &self.structure
    }

    pub fn provider(&self) -> ProviderKind {
        self.session.provider
    }

    /// Serves `network`'s parameters from now on; a network of another structure is refused.
    /// On a failure the tail keeps serving the version it served.
    pub fn bind(&mut self, network: &Network) -> Result<(), String> {
        if structure_of(network, &self.split_shape)?.0 != self.structure {
            return Err("the network's layers or shapes are not this tail session's".into());
        }
        if self.params_as == ParamsAs::Inputs {
            return self.bind_inputs(network);
        }
        let model = self.graph.with_weights_of(network)?;
        let session = open_session(&model, &self.structure, &self.split_shape, &self.options, &self.label)?;
        let served = std::mem::replace(&mut self.session, session);
        if let Err(problem) = self.warm_up() {
            self.session = served;
            return Err(problem);
        }
        Ok(())
    }

    /// A binding of the session with `network`'s parameters: ONNX Runtime copies them to the
    /// session's device here, once, and every run reads them there.
    fn bind_inputs(&mut self, network: &Network) -> Result<(), String> {
        let text = |e: ort::Error| e.to_string();
        let mut binding = self.session.session.create_binding().map_err(text)?;
        for input in &self.graph.params {
            let value = Tensor::from_array(TailGraph::feed(network, input)?).map_err(text)?;
            binding.bind_input(input.name.as_str(), &value).map_err(text)?;
        }
        self.binding = Some(binding);
        Ok(())
    }

    /// Logits (before calibration) of split tensors `[N, ...]`.
    pub fn logits(&mut self, split: ArrayViewD<'_, f32>) -> Result<Array2<f32>, String> {
        let text = |e: ort::Error| e.to_string();
        let outputs = match &mut self.binding {
            Some(binding) => {
                let split = Tensor::from_array(split.as_standard_layout().into_owned()).map_err(text)?;
                binding.bind_input(SPLIT, &split).map_err(text)?;
                // Bound anew each run: a run leaves its output bound, with that run's batch size.
                binding.bind_output_to_device(LOGITS, &MemoryInfo::default()).map_err(text)?;
                self.session.session.run_binding(binding).map_err(text)?
            }
            None => {
                let split = split.as_standard_layout();
                let split = TensorRef::from_array_view(split.view()).map_err(text)?;
                self.session.session.run(ort::inputs![SPLIT => split]).map_err(text)?
            }
        };
        let logits =
            outputs.get(LOGITS).ok_or("the tail graph returned no logits")?.try_extract_array::<f32>().map_err(text)?;
        logits.into_dimensionality::<Ix2>().map(|l| l.to_owned()).map_err(|e| e.to_string())
    }
}

fn open_session(
    model: &crate::model::onnx::proto::ModelProto,
    structure: &str,
    split_shape: &[usize],
    options: &RuntimeOptions,
    label: &Path,
) -> Result<ModelSession, String> {
    let bytes = crate::model::onnx::encode_model(model);
    let input = InputShape { name: SPLIT.into(), sample: split_shape.to_vec() };
    runtime::open_session_from_memory(label, &bytes, structure, Some(&input), options).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensorrt_trunk_gets_a_cuda_tail_and_gpu_tails_take_their_parameters_as_inputs() {
        assert_eq!(provider_beside(ProviderKind::Tensorrt), ProviderKind::Cuda);
        assert_eq!(provider_beside(ProviderKind::Cuda), ProviderKind::Cuda);
        assert_eq!(provider_beside(ProviderKind::Cpu), ProviderKind::Cpu);
        assert_eq!(ParamsAs::for_provider(ProviderKind::Cuda), ParamsAs::Inputs);
        assert_eq!(ParamsAs::for_provider(ProviderKind::Cpu), ParamsAs::Constants);
    }
}
