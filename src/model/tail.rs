//! The tail: layers between the split tensor and the penultimate features.
//!
//! These layers run in Rust rather than inside ONNX Runtime because they are the part of the
//! model that on-device adaptation updates; running them here means an adapted version needs
//! no new ONNX file and inference and training share one implementation.

use ndarray::{Array1, Array2, Array3, ArrayViewD, Axis, Ix4};

use super::manifest::TailLayerKind;

/// A batch flowing through the tail.
///
/// Spatial tensors are kept as `[N, H*W, C]` (channels last) so that a 1x1 convolution is a
/// single matrix product over all positions of the batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Activations {
    Spatial { data: Array3<f32>, height: usize, width: usize },
    Flat(Array2<f32>),
}

impl Activations {
    /// Takes a batch in ONNX layout: `[N, C, H, W]` or `[N, D]`.
    pub fn from_onnx(tensor: ArrayViewD<'_, f32>) -> Result<Activations, TailError> {
        match tensor.ndim() {
            2 => Ok(Activations::Flat(tensor.into_dimensionality::<ndarray::Ix2>().expect("checked rank").to_owned())),
            4 => {
                let tensor = tensor.into_dimensionality::<Ix4>().expect("checked rank");
                let (batch, channels, height, width) = tensor.dim();
                let channels_last = tensor.permuted_axes([0, 2, 3, 1]);
                let data = channels_last
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((batch, height * width, channels))
                    .expect("standard layout reshapes");
                Ok(Activations::Spatial { data, height, width })
            }
            rank => Err(TailError::Shape(format!(
                "the split tensor must have rank 2 [N, D] or 4 [N, C, H, W], got rank {rank} {:?}",
                tensor.shape()
            ))),
        }
    }

    pub fn batch_size(&self) -> usize {
        match self {
            Activations::Spatial { data, .. } => data.dim().0,
            Activations::Flat(data) => data.dim().0,
        }
    }

    /// Per-sample shape in ONNX order (`[C, H, W]` or `[D]`).
    pub fn sample_shape(&self) -> Vec<usize> {
        match self {
            Activations::Spatial { data, height, width } => vec![data.dim().2, *height, *width],
            Activations::Flat(data) => vec![data.dim().1],
        }
    }

    fn map_in_place(mut self, function: impl Fn(f32) -> f32) -> Activations {
        match &mut self {
            Activations::Spatial { data, .. } => data.mapv_inplace(&function),
            Activations::Flat(data) => data.mapv_inplace(&function),
        }
        self
    }
}

/// One tail layer with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum TailLayer {
    /// `y = x · weightᵀ + bias` on `[N, in]`; weight is `[out, in]`.
    Linear {
        weight: Array2<f32>,
        bias: Array1<f32>,
    },
    /// The same map applied at every spatial position.
    Conv1x1 {
        weight: Array2<f32>,
        bias: Array1<f32>,
    },
    Relu,
    Relu6,
    Silu,
    Sigmoid,
    GlobalAvgPool,
    /// ONNX `Flatten(axis=1)`: `[N, C, H, W]` becomes `[N, C*H*W]` in channel-major order.
    Flatten,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TailError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("tail layer {index} ({kind:?}): {problem}")]
    Layer { index: usize, kind: TailLayerKind, problem: String },
}

impl TailLayer {
    pub fn kind(&self) -> TailLayerKind {
        match self {
            TailLayer::Linear { .. } => TailLayerKind::Linear,
            TailLayer::Conv1x1 { .. } => TailLayerKind::Conv1x1,
            TailLayer::Relu => TailLayerKind::Relu,
            TailLayer::Relu6 => TailLayerKind::Relu6,
            TailLayer::Silu => TailLayerKind::Silu,
            TailLayer::Sigmoid => TailLayerKind::Sigmoid,
            TailLayer::GlobalAvgPool => TailLayerKind::GlobalAvgPool,
            TailLayer::Flatten => TailLayerKind::Flatten,
        }
    }

    /// Per-sample output shape for a per-sample input shape, or why the layer cannot take it.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        match (self, input) {
            (TailLayer::Linear { weight, .. }, [features]) => {
                expect_width(weight, *features)?;
                Ok(vec![weight.nrows()])
            }
            (TailLayer::Linear { .. }, _) => Err(format!("needs a flat [D] input, got {input:?}")),
            (TailLayer::Conv1x1 { weight, .. }, [channels, height, width]) => {
                expect_width(weight, *channels)?;
                Ok(vec![weight.nrows(), *height, *width])
            }
            (TailLayer::Conv1x1 { .. }, _) => Err(format!("needs a [C, H, W] input, got {input:?}")),
            (TailLayer::GlobalAvgPool, [channels, _, _]) => Ok(vec![*channels, 1, 1]),
            (TailLayer::GlobalAvgPool, _) => Err(format!("needs a [C, H, W] input, got {input:?}")),
            (TailLayer::Flatten, shape) => Ok(vec![shape.iter().product()]),
            (_, shape) => Ok(shape.to_vec()),
        }
    }

    pub fn forward(&self, input: Activations) -> Activations {
        match (self, input) {
            (TailLayer::Linear { weight, bias }, Activations::Flat(x)) => Activations::Flat(affine(&x, weight, bias)),
            (TailLayer::Conv1x1 { weight, bias }, Activations::Spatial { data, height, width }) => {
                let (batch, positions, channels) = data.dim();
                let rows = data.into_shape_with_order((batch * positions, channels)).expect("owned standard layout");
                let out = affine(&rows, weight, bias);
                let out_channels = out.ncols();
                let data = out.into_shape_with_order((batch, positions, out_channels)).expect("owned standard layout");
                Activations::Spatial { data, height, width }
            }
            (TailLayer::Relu, input) => input.map_in_place(|v| v.max(0.0)),
            (TailLayer::Relu6, input) => input.map_in_place(|v| v.clamp(0.0, 6.0)),
            (TailLayer::Sigmoid, input) => input.map_in_place(sigmoid),
            (TailLayer::Silu, input) => input.map_in_place(|v| v * sigmoid(v)),
            (TailLayer::GlobalAvgPool, Activations::Spatial { data, .. }) => {
                let pooled = data.mean_axis(Axis(1)).expect("at least one position");
                Activations::Spatial { data: pooled.insert_axis(Axis(1)), height: 1, width: 1 }
            }
            (TailLayer::Flatten, Activations::Spatial { data, .. }) => {
                let (batch, positions, channels) = data.dim();
                let channel_major = data.permuted_axes([0, 2, 1]);
                Activations::Flat(
                    channel_major
                        .as_standard_layout()
                        .into_owned()
                        .into_shape_with_order((batch, channels * positions))
                        .expect("standard layout reshapes"),
                )
            }
            (TailLayer::Flatten, flat @ Activations::Flat(_)) => flat,
            (layer, input) => unreachable!(
                "{:?} received a {:?} input; Tail::new checks shapes before any forward pass",
                layer.kind(),
                input.sample_shape()
            ),
        }
    }
}

fn expect_width(weight: &Array2<f32>, width: usize) -> Result<(), String> {
    if weight.ncols() == width {
        Ok(())
    } else {
        Err(format!("weight is {:?} but its input has {width} features", weight.dim()))
    }
}

fn affine(x: &Array2<f32>, weight: &Array2<f32>, bias: &Array1<f32>) -> Array2<f32> {
    let mut out = x.dot(&weight.t());
    out += bias;
    out
}

pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// The tail layers together with the shapes they were checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Tail {
    layers: Vec<TailLayer>,
    input_shape: Vec<usize>,
    feature_dim: usize,
}

impl Tail {
    /// Checks that the layers chain from `input_shape` (per sample, ONNX order) to flat features.
    pub fn new(layers: Vec<TailLayer>, input_shape: Vec<usize>) -> Result<Tail, TailError> {
        let mut shape = input_shape.clone();
        for (index, layer) in layers.iter().enumerate() {
            shape = layer.output_shape(&shape).map_err(|problem| TailError::Layer {
                index,
                kind: layer.kind(),
                problem,
            })?;
            if let TailLayer::Linear { weight, bias } | TailLayer::Conv1x1 { weight, bias } = layer
                && bias.len() != weight.nrows()
            {
                return Err(TailError::Layer {
                    index,
                    kind: layer.kind(),
                    problem: format!("bias has {} values for {} outputs", bias.len(), weight.nrows()),
                });
            }
        }
        let feature_dim = match shape.as_slice() {
            [features] => *features,
            other => {
                return Err(TailError::Shape(format!(
                    "the tail must end in flat features [D], it ends in {other:?} (add a flatten layer)"
                )));
            }
        };
        Ok(Tail { layers, input_shape, feature_dim })
    }

    pub fn layers(&self) -> &[TailLayer] {
        &self.layers
    }

    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    /// Runs a batch of split tensors to the penultimate features `[N, D]`.
    pub fn forward(&self, input: Activations) -> Result<Array2<f32>, TailError> {
        if input.sample_shape() != self.input_shape {
            return Err(TailError::Shape(format!(
                "the tail expects split tensors of shape {:?}, got {:?}",
                self.input_shape,
                input.sample_shape()
            )));
        }
        let mut current = input;
        for layer in &self.layers {
            current = layer.forward(current);
        }
        match current {
            Activations::Flat(features) => Ok(features),
            Activations::Spatial { data, .. } => {
                let batch = data.dim().0;
                Ok(data.into_shape_with_order((batch, self.feature_dim)).expect("checked by Tail::new"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, IxDyn, array, s};

    fn nchw(batch: usize, channels: usize, height: usize, width: usize) -> ndarray::ArrayD<f32> {
        Array::from_shape_fn(IxDyn(&[batch, channels, height, width]), |index| {
            let (n, c, h, w) = (index[0], index[1], index[2], index[3]);
            (n * 1000 + c * 100 + h * 10 + w) as f32 / 1000.0 - 0.5
        })
    }

    #[test]
    fn flatten_keeps_onnx_channel_major_order() {
        let input = nchw(2, 3, 2, 2);
        let activations = Activations::from_onnx(input.view()).unwrap();
        let flat = TailLayer::Flatten.forward(activations);
        let Activations::Flat(flat) = flat else { panic!("flatten must give a flat batch") };
        let expected = input.into_shape_with_order((2, 12)).unwrap();
        assert_eq!(flat, expected);
    }

    #[test]
    fn conv1x1_equals_a_linear_map_at_every_position() {
        let input = nchw(2, 3, 2, 2);
        let weight = array![[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]];
        let bias = array![0.25, -1.0];
        let layer = TailLayer::Conv1x1 { weight: weight.clone(), bias: bias.clone() };
        let Activations::Spatial { data, .. } = layer.forward(Activations::from_onnx(input.view()).unwrap()) else {
            panic!("conv keeps the batch spatial")
        };
        for n in 0..2 {
            for h in 0..2 {
                for w in 0..2 {
                    for o in 0..2 {
                        let expected: f32 = (0..3).map(|c| weight[[o, c]] * input[[n, c, h, w]]).sum::<f32>() + bias[o];
                        let got = data[[n, h * 2 + w, o]];
                        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
                    }
                }
            }
        }
    }

    #[test]
    fn pooling_then_flatten_gives_channel_means() {
        let input = nchw(1, 2, 2, 2);
        let tail = Tail::new(vec![TailLayer::GlobalAvgPool, TailLayer::Flatten], vec![2, 2, 2]).unwrap();
        let features = tail.forward(Activations::from_onnx(input.view()).unwrap()).unwrap();
        for c in 0..2 {
            let mean = input.slice(s![0, c, .., ..]).mean().unwrap();
            assert!((features[[0, c]] - mean).abs() < 1e-6);
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        let input = Activations::Flat(array![[-7.0, -0.5, 0.0, 0.5, 7.0]]);
        let apply = |layer: TailLayer| match layer.forward(input.clone()) {
            Activations::Flat(x) => x.row(0).to_vec(),
            _ => unreachable!(),
        };
        assert_eq!(apply(TailLayer::Relu), vec![0.0, 0.0, 0.0, 0.5, 7.0]);
        assert_eq!(apply(TailLayer::Relu6), vec![0.0, 0.0, 0.0, 0.5, 6.0]);
        let sig = apply(TailLayer::Sigmoid);
        assert!((sig[2] - 0.5).abs() < 1e-7 && (sig[4] - 1.0 / (1.0 + (-7.0f32).exp())).abs() < 1e-7);
        let silu = apply(TailLayer::Silu);
        assert!((silu[3] - 0.5 * sigmoid(0.5)).abs() < 1e-7);
    }

    #[test]
    fn mismatched_shapes_are_refused_when_the_tail_is_built() {
        let linear = TailLayer::Linear { weight: Array2::zeros((4, 5)), bias: Array1::zeros(4) };
        let error = Tail::new(vec![linear.clone()], vec![6]).unwrap_err();
        assert!(matches!(error, TailError::Layer { index: 0, .. }), "{error}");
        let error = Tail::new(vec![linear], vec![5, 2, 2]).unwrap_err();
        assert!(error.to_string().contains("flat"), "{error}");
        let error = Tail::new(vec![TailLayer::GlobalAvgPool], vec![5, 2, 2]).unwrap_err();
        assert!(matches!(error, TailError::Shape(_)), "{error}");
        let bad_bias = TailLayer::Linear { weight: Array2::zeros((4, 5)), bias: Array1::zeros(3) };
        assert!(Tail::new(vec![bad_bias], vec![5]).unwrap_err().to_string().contains("bias"));
    }

    #[test]
    fn a_batch_of_the_wrong_shape_is_an_error_not_a_panic() {
        let tail = Tail::new(vec![TailLayer::Flatten], vec![2, 2, 2]).unwrap();
        let error = tail.forward(Activations::from_onnx(nchw(1, 3, 2, 2).view()).unwrap()).unwrap_err();
        assert!(error.to_string().contains("[2, 2, 2]"), "{error}");
    }

    #[test]
    fn an_empty_tail_passes_flat_features_through() {
        let tail = Tail::new(vec![], vec![3]).unwrap();
        let features = tail.forward(Activations::Flat(array![[1.0, 2.0, 3.0]])).unwrap();
        assert_eq!(features, array![[1.0, 2.0, 3.0]]);
    }
}
