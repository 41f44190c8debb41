//! The trainable part of a classifier (tail layers, optional feature adapter, head) with a
//! forward pass that records what the backward pass needs and hand-derived gradients.
//!
//! Parameters live in one flat list of tensors so that optimisers, parameter averaging
//! (leave-out local SGD) and interpolation with the source (WiSE) treat every method alike.

pub mod graph;
pub mod weights;

use ndarray::{Array1, Array2, ArrayD, ArrayView2, Axis, Ix1, Ix2};

use crate::model::Bundle;
use crate::model::tail::TailLayer;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Elementwise activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Relu6,
    Silu,
    Sigmoid,
}

impl Activation {
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
            Activation::Silu => v * sigmoid(v),
            Activation::Sigmoid => sigmoid(v),
        }
    }

    /// Derivative at the pre-activation value `v`.
    pub(crate) fn derivative(self, v: f32) -> f32 {
        match self {
            Activation::Relu => (v > 0.0) as u8 as f32,
            Activation::Relu6 => (v > 0.0 && v < 6.0) as u8 as f32,
            Activation::Silu => {
                let s = sigmoid(v);
                s * (1.0 + v * (1.0 - s))
            }
            Activation::Sigmoid => {
                let s = sigmoid(v);
                s * (1.0 - s)
            }
        }
    }
}

/// One layer; weighted layers refer to slots in [`Network::params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Affine map on rows: `[rows, in] -> [rows, out]`, weight slot `[out, in]`, bias slot `[out]`.
    /// Covers both linear layers (one row per sample) and 1x1 convolutions (one row per position).
    Affine {
        weight: usize,
        bias: usize,
    },
    Act(Activation),
    /// Mean over the positions of each sample.
    GlobalAvgPool,
    /// Positions folded into features in ONNX's channel-major order.
    Flatten,
    /// Residual bottleneck on flat features: `f + B·act(A·f + a)`; B starts at zero.
    Adapter {
        down: usize,
        down_bias: usize,
        up: usize,
        act: Activation,
    },
}

/// A batch inside the network: `rows = samples * positions`, channels last.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub data: Array2<f32>,
    pub positions: usize,
}

impl Batch {
    /// A trunk output batch in ONNX layout (`[N, C, H, W]` or `[N, D]`), channels last.
    pub fn from_onnx(split: ndarray::ArrayViewD<'_, f32>) -> Result<Batch, String> {
        let shape = split.shape().to_vec();
        match shape.as_slice() {
            [n, d] => Ok(Batch {
                data: split
                    .into_dimensionality::<Ix2>()
                    .expect("rank 2")
                    .to_owned()
                    .into_shape_with_order((*n, *d))
                    .expect("owned"),
                positions: 1,
            }),
            [n, c, h, w] => {
                let channels_last = split.permuted_axes(vec![0, 2, 3, 1]);
                let data = channels_last
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((n * h * w, *c))
                    .expect("standard layout reshapes");
                Ok(Batch { data, positions: h * w })
            }
            other => Err(format!("split tensors must be [N, D] or [N, C, H, W], got {other:?}")),
        }
    }
}

/// Tail, optional adapter and head as one differentiable function from split tensors to logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub layers: Vec<Layer>,
    /// Head weight `[C, d]` and bias `[C]` slots.
    pub head: (usize, usize),
    pub params: Vec<ArrayD<f32>>,
    /// What each slot is, for messages and for choosing what trains.
    pub roles: Vec<Role>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Tail,
    Adapter,
    Head,
}

/// What the backward pass needs from the forward pass.
pub struct Tape {
    /// Input of each layer, and the adapter's pre-activation where there is one.
    pub(crate) inputs: Vec<Batch>,
    pub(crate) adapter_pre: Vec<Option<Array2<f32>>>,
    pub(crate) features: Array2<f32>,
}

impl Network {
    /// The bundle's tail and head.
    pub fn from_bundle(bundle: &Bundle) -> Network {
        let mut network = Network { layers: Vec::new(), head: (0, 0), params: Vec::new(), roles: Vec::new() };
        for layer in bundle.tail.layers() {
            let layer = match layer {
                TailLayer::Linear { weight, bias } | TailLayer::Conv1x1 { weight, bias } => {
                    let weight = network.push(weight.clone().into_dyn(), Role::Tail);
                    let bias = network.push(bias.clone().into_dyn(), Role::Tail);
                    Layer::Affine { weight, bias }
                }
                TailLayer::Relu => Layer::Act(Activation::Relu),
                TailLayer::Relu6 => Layer::Act(Activation::Relu6),
                TailLayer::Silu => Layer::Act(Activation::Silu),
                TailLayer::Sigmoid => Layer::Act(Activation::Sigmoid),
                TailLayer::GlobalAvgPool => Layer::GlobalAvgPool,
                TailLayer::Flatten => Layer::Flatten,
            };
            network.layers.push(layer);
        }
        network.head = (
            network.push(bundle.head.weight.clone().into_dyn(), Role::Head),
            network.push(bundle.head.bias.clone().into_dyn(), Role::Head),
        );
        network
    }

    /// A copy with a zero-initialised residual adapter inserted before the head (replacing any
    /// existing adapter), so that it still computes exactly what it computed before.
    pub fn with_adapter(&self, rank: usize, seed: u64) -> Network {
        let mut network = self.clone();
        network.layers.retain(|layer| !matches!(layer, Layer::Adapter { .. }));
        let d = network.params[network.head.0].shape()[1];
        let down = network.push(init_down(rank, d, seed).into_dyn(), Role::Adapter);
        let down_bias = network.push(Array1::<f32>::zeros(rank).into_dyn(), Role::Adapter);
        let up = network.push(Array2::<f32>::zeros((d, rank)).into_dyn(), Role::Adapter);
        network.layers.push(Layer::Adapter { down, down_bias, up, act: Activation::Relu });
        network
    }

    /// The rank of the feature adapter, 0 without one.
    pub fn adapter_rank(&self) -> usize {
        self.layers
            .iter()
            .find_map(|layer| match layer {
                Layer::Adapter { down, .. } => Some(self.params[*down].shape()[0]),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Whether the bundle's tail has weights to train.
    pub fn has_trainable_tail(&self) -> bool {
        self.roles.contains(&Role::Tail)
    }

    pub fn num_classes(&self) -> usize {
        self.params[self.head.1].len()
    }

    /// Channels of the split tensor the network takes, where the layers determine it (an empty
    /// tail takes the head's width; a flatten before any weighted layer leaves it open).
    pub fn input_channels(&self) -> Option<usize> {
        for layer in &self.layers {
            match layer {
                Layer::Affine { weight, .. } => return Some(self.params[*weight].shape()[1]),
                Layer::Adapter { down, .. } => return Some(self.params[*down].shape()[1]),
                Layer::Flatten => return None,
                Layer::Act(_) | Layer::GlobalAvgPool => {}
            }
        }
        Some(self.params[self.head.0].shape()[1])
    }

    fn push(&mut self, tensor: ArrayD<f32>, role: Role) -> usize {
        self.params.push(tensor);
        self.roles.push(role);
        self.params.len() - 1
    }

    pub(crate) fn matrix(&self, slot: usize) -> ArrayView2<'_, f32> {
        self.params[slot].view().into_dimensionality::<Ix2>().expect("weight slots hold matrices")
    }

    fn vector(&self, slot: usize) -> ndarray::ArrayView1<'_, f32> {
        self.params[slot].view().into_dimensionality::<Ix1>().expect("bias slots hold vectors")
    }

    /// Logits, and the tape for [`Network::backward`].
    pub fn forward(&self, input: Batch) -> (Array2<f32>, Tape) {
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut adapter_pre = Vec::with_capacity(self.layers.len());
        let mut current = input;
        for layer in &self.layers {
            let (next, pre) = self.layer_forward(layer, &current);
            inputs.push(current);
            adapter_pre.push(pre);
            current = next;
        }
        let features = to_flat(current);
        let logits = affine(features.view(), self.matrix(self.head.0), self.vector(self.head.1));
        (logits, Tape { inputs, adapter_pre, features })
    }

    /// Penultimate features (the head's input), without keeping a tape.
    pub fn features(&self, input: Batch) -> Array2<f32> {
        let mut current = input;
        for layer in &self.layers {
            current = self.layer_forward(layer, &current).0;
        }
        to_flat(current)
    }

    /// Logits only, without keeping a tape.
    pub fn logits(&self, input: Batch) -> Array2<f32> {
        let features = self.features(input);
        self.head_logits(features.view())
    }

    /// The head applied to features.
    pub fn head_logits(&self, features: ArrayView2<'_, f32>) -> Array2<f32> {
        affine(features, self.matrix(self.head.0), self.vector(self.head.1))
    }

    fn layer_forward(&self, layer: &Layer, x: &Batch) -> (Batch, Option<Array2<f32>>) {
        match *layer {
            Layer::Affine { weight, bias } => (
                Batch { data: affine(x.data.view(), self.matrix(weight), self.vector(bias)), positions: x.positions },
                None,
            ),
            Layer::Act(act) => (Batch { data: x.data.mapv(|v| act.apply(v)), positions: x.positions }, None),
            Layer::GlobalAvgPool => (Batch { data: pool(&x.data, x.positions), positions: 1 }, None),
            Layer::Flatten => (Batch { data: flatten(&x.data, x.positions), positions: 1 }, None),
            Layer::Adapter { down, down_bias, up, act } => {
                let pre = affine(x.data.view(), self.matrix(down), self.vector(down_bias));
                let hidden = pre.mapv(|v| act.apply(v));
                let out = &x.data + &hidden.dot(&self.matrix(up).t());
                (Batch { data: out, positions: x.positions }, Some(pre))
            }
        }
    }

    pub(crate) fn layer_slots(&self, layer: &Layer) -> Vec<usize> {
        match *layer {
            Layer::Affine { weight, bias } => vec![weight, bias],
            Layer::Adapter { down, down_bias, up, .. } => vec![down, down_bias, up],
            _ => vec![],
        }
    }
}

fn init_down(rank: usize, d: usize, seed: u64) -> Array2<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xada9);
    let scale = (1.0 / d as f32).sqrt();
    Array2::from_shape_simple_fn((rank, d), || (rng.random::<f32>() * 2.0 - 1.0) * scale)
}

fn affine(x: ArrayView2<'_, f32>, weight: ArrayView2<'_, f32>, bias: ndarray::ArrayView1<'_, f32>) -> Array2<f32> {
    let mut out = x.dot(&weight.t());
    out += &bias;
    out
}

fn to_flat(batch: Batch) -> Array2<f32> {
    if batch.positions == 1 { batch.data } else { flatten(&batch.data, batch.positions) }
}

fn pool(data: &Array2<f32>, positions: usize) -> Array2<f32> {
    let (rows, channels) = data.dim();
    let samples = rows / positions;
    data.view()
        .into_shape_with_order((samples, positions, channels))
        .expect("rows = samples * positions")
        .mean_axis(Axis(1))
        .expect("positions > 0")
}

pub(crate) fn flatten(data: &Array2<f32>, positions: usize) -> Array2<f32> {
    let (rows, channels) = data.dim();
    let samples = rows / positions;
    Array2::from_shape_fn((samples, channels * positions), |(n, j)| {
        data[[n * positions + j % positions, j / positions]]
    })
}

/// Adds `gamma` to the unseen classes' logits: an adapted version's calibration, applied by
/// inference and by adaptation alike.
pub fn apply_calibration(logits: &mut Array2<f32>, unseen: &[usize], gamma: f32) {
    if gamma == 0.0 {
        return;
    }
    for mut row in logits.axis_iter_mut(Axis(0)) {
        for &c in unseen {
            row[c] += gamma;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_batches_become_channels_last_rows_and_a_1x1_convolution_acts_per_position() {
        let split = ndarray::Array::from_shape_fn(ndarray::IxDyn(&[2, 3, 2, 2]), |i| {
            (i[0] * 100 + i[1] * 10 + i[2] * 2 + i[3]) as f32 / 50.0 - 1.0
        });
        let batch = Batch::from_onnx(split.view()).unwrap();
        assert_eq!((batch.data.dim(), batch.positions), ((8, 3), 4));
        // sample 1, position (h=1, w=0) is row 4 + 2, channel 2
        assert_eq!(batch.data[[6, 2]], split[[1, 2, 1, 0]]);
        let weight = ndarray::array![[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]];
        let bias = ndarray::array![0.25, -1.0];
        let network = Network {
            layers: vec![Layer::Affine { weight: 0, bias: 1 }],
            head: (2, 3),
            params: vec![
                weight.clone().into_dyn(),
                bias.clone().into_dyn(),
                Array2::<f32>::eye(8).into_dyn(),
                Array1::<f32>::zeros(8).into_dyn(),
            ],
            roles: vec![Role::Tail, Role::Tail, Role::Head, Role::Head],
        };
        let out = network.layer_forward(&network.layers[0], &batch).0;
        for (n, h, w, o) in [(0, 0, 1, 0), (1, 1, 1, 1)] {
            let expected: f32 = (0..3).map(|c| weight[[o, c]] * split[[n, c, h, w]]).sum::<f32>() + bias[o];
            assert!((out.data[[n * 4 + h * 2 + w, o]] - expected).abs() < 1e-6);
        }
        // Flatten after the convolution is ONNX's channel-major order.
        let flat = to_flat(out.clone());
        assert_eq!(flat.dim(), (2, 8));
        assert_eq!(flat[[1, 4 + 3]], out.data[[4 + 3, 1]]);
    }

    #[test]
    fn head_logits_are_features_times_weight_transposed_plus_bias() {
        let network = Network {
            layers: vec![],
            head: (0, 1),
            params: vec![
                ndarray::array![[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]].into_dyn(),
                ndarray::array![0.0, 0.5, -1.0].into_dyn(),
            ],
            roles: vec![Role::Head, Role::Head],
        };
        assert_eq!(network.head_logits(ndarray::array![[3.0, 4.0]].view()), ndarray::array![[3.0, 8.5, 6.0]]);
    }

    #[test]
    fn activations_match_their_definitions() {
        let values = [-7.0f32, -0.5, 0.0, 0.5, 7.0];
        let apply = |act: Activation| values.iter().map(|&v| act.apply(v)).collect::<Vec<_>>();
        assert_eq!(apply(Activation::Relu), vec![0.0, 0.0, 0.0, 0.5, 7.0]);
        assert_eq!(apply(Activation::Relu6), vec![0.0, 0.0, 0.0, 0.5, 6.0]);
        assert!((apply(Activation::Sigmoid)[2] - 0.5).abs() < 1e-7);
        assert!((apply(Activation::Silu)[3] - 0.5 * sigmoid(0.5)).abs() < 1e-7);
    }
}
