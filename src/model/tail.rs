//! The tail: layers between the split tensor and the penultimate features, with their weights
//! and the shapes they were checked against.
//!
//! These layers run in Rust rather than inside ONNX Runtime because they are the part of the
//! model that on-device adaptation updates. Inference and training both run them through
//! the `network` module, so an adapted version needs no new ONNX file and there is
//! one implementation of the forward pass.

use ndarray::{Array1, Array2};

use super::manifest::TailLayerKind;

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
    /// Whether the layer has weights adaptation can train.
    pub fn is_trainable(&self) -> bool {
        matches!(self, TailLayer::Linear { .. } | TailLayer::Conv1x1 { .. })
    }

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
}

fn expect_width(weight: &Array2<f32>, width: usize) -> Result<(), String> {
    if weight.ncols() == width {
        Ok(())
    } else {
        Err(format!("weight is {:?} but its input has {width} features", weight.dim()))
    }
}

/// The tail layers together with the shapes they were checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Tail {
    layers: Vec<TailLayer>,
    feature_dim: usize,
}

impl Tail {
    /// Checks that the layers chain from `input_shape` (per sample, ONNX order) to flat features.
    pub fn new(layers: Vec<TailLayer>, input_shape: Vec<usize>) -> Result<Tail, TailError> {
        let mut shape = input_shape;
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
        Ok(Tail { layers, feature_dim })
    }

    pub fn layers(&self) -> &[TailLayer] {
        &self.layers
    }

    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shapes_chain_through_convolution_pooling_and_flatten() {
        let conv = TailLayer::Conv1x1 { weight: Array2::zeros((8, 3)), bias: Array1::zeros(8) };
        let tail = Tail::new(vec![conv, TailLayer::Relu6, TailLayer::GlobalAvgPool, TailLayer::Flatten], vec![3, 2, 2])
            .unwrap();
        assert_eq!(tail.feature_dim(), 8);
        let flat = Tail::new(vec![TailLayer::Flatten], vec![3, 2, 2]).unwrap();
        assert_eq!(flat.feature_dim(), 12);
        assert_eq!(Tail::new(vec![], vec![7]).unwrap().feature_dim(), 7);
    }
}
