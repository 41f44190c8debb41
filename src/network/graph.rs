//! The network as an ONNX graph whose parameters are graph inputs, so that ONNX Runtime can run
//! the tail and head on the trunk's execution provider and a new version only swaps tensors:
//! networks of the same structure give byte-identical graphs, whatever their weights.

use ndarray::{ArrayD, IxDyn};

use super::{Activation, Layer, Network};
use crate::model::onnx::export::int_attribute;
use crate::model::onnx::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use crate::model::onnx::{tensor, trunk::float_value_info};

/// Name of the split tensor input.
pub const SPLIT: &str = "split";
/// Name of the logits output.
pub const LOGITS: &str = "logits";
/// Opset 13 is understood by every ONNX Runtime edgeadapt supports, JetPack's builds included.
const OPSET: i64 = 13;
const IR_VERSION: i64 = 7;

/// One parameter input: the slot it is fed from and the shape it is fed in (a 1x1
/// convolution's `[out, in]` weight goes in as `[out, in, 1, 1]`, the same data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInput {
    pub name: String,
    pub slot: usize,
    pub shape: Vec<usize>,
}

/// The graph and how to feed it.
#[derive(Debug, Clone, PartialEq)]
pub struct TailGraph {
    pub model: ModelProto,
    pub params: Vec<ParamInput>,
}

impl TailGraph {
    /// A copy of the slot's tensor in the shape its input takes.
    pub fn feed(network: &Network, input: &ParamInput) -> Result<ArrayD<f32>, String> {
        let param = network.params.get(input.slot).ok_or_else(|| format!("no parameter slot {}", input.slot))?;
        param.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&input.shape)).map_err(|_| {
            format!("parameter slot {} has shape {:?}, the graph takes {:?}", input.slot, param.shape(), input.shape)
        })
    }
}

impl TailGraph {
    /// The same graph with `network`'s parameters as constants (initializers) instead of inputs:
    /// ONNX Runtime's CPU provider packs constant weights once, at session creation.
    pub fn with_weights_of(&self, network: &Network) -> Result<ModelProto, String> {
        let mut model = self.model.clone();
        let graph = model.graph.as_mut().expect("tail graphs have a graph");
        for input in &self.params {
            graph.input.retain(|i| i.name.as_deref() != Some(input.name.as_str()));
            graph.initializer.push(tensor::from_f32(&input.name, &TailGraph::feed(network, input)?));
        }
        Ok(model)
    }
}

/// The graph computing `network` from split tensors of `split_shape` (one sample, ONNX layout:
/// `[C, H, W]` or `[D]`). Fails, naming the layer, where the network's layers and shapes do not
/// describe a computation ONNX can express the same way.
pub fn tail_graph(network: &Network, split_shape: &[usize]) -> Result<TailGraph, String> {
    let mut builder = Builder { graph: GraphProto::default(), params: Vec::new(), current: SPLIT.into(), count: 0 };
    let mut shape = split_shape.to_vec();
    if shape.len() != 1 && shape.len() != 3 {
        return Err(format!("split tensors must be [D] or [C, H, W] per sample, got {shape:?}"));
    }
    for (index, layer) in network.layers.iter().enumerate() {
        let at = |problem: String| format!("layer {index} ({layer:?}): {problem}");
        match *layer {
            Layer::Affine { weight, bias } => {
                let [out, inp] = matrix_shape(network, weight);
                if shape[0] != inp {
                    return Err(at(format!("takes {inp} channels, gets {}", shape[0])));
                }
                if shape.len() == 3 {
                    let w = builder.param(weight, vec![out, inp, 1, 1]);
                    let b = builder.param(bias, vec![out]);
                    builder.op("Conv", vec![w, b], vec![]);
                } else {
                    let w = builder.param(weight, vec![out, inp]);
                    let b = builder.param(bias, vec![out]);
                    builder.op("Gemm", vec![w, b], vec![int_attribute("transB", 1)]);
                }
                shape[0] = out;
            }
            Layer::Act(act) => builder.activation(act),
            Layer::GlobalAvgPool if shape.len() == 3 => {
                builder.op("GlobalAveragePool", vec![], vec![]);
                shape = vec![shape[0], 1, 1];
            }
            // One position per sample already: the mean is the value itself.
            Layer::GlobalAvgPool => {}
            Layer::Flatten if shape.len() == 3 => builder.flatten(&mut shape),
            Layer::Flatten => {}
            Layer::Adapter { down, down_bias, up, act } => {
                if shape.len() == 3 && shape[1] * shape[2] != 1 {
                    return Err(at(format!("an adapter on {shape:?} would act per position")));
                }
                builder.flatten(&mut shape);
                let [rank, width] = matrix_shape(network, down);
                if shape[0] != width || matrix_shape(network, up) != [width, rank] {
                    return Err(at(format!("adapter shapes do not fit {} features", shape[0])));
                }
                let residual = builder.current.clone();
                let d = builder.param(down, vec![rank, width]);
                let db = builder.param(down_bias, vec![rank]);
                builder.op("Gemm", vec![d, db], vec![int_attribute("transB", 1)]);
                builder.activation(act);
                let u = builder.param(up, vec![width, rank]);
                builder.op("Gemm", vec![u], vec![int_attribute("transB", 1)]);
                builder.op_on("Add", vec![residual, builder.current.clone()], vec![]);
            }
        }
    }
    builder.flatten(&mut shape);
    let [classes, width] = matrix_shape(network, network.head.0);
    if shape[0] != width {
        return Err(format!("the head takes {width} features, the layers give {}", shape[0]));
    }
    let w = builder.param(network.head.0, vec![classes, width]);
    let b = builder.param(network.head.1, vec![classes]);
    builder.op("Gemm", vec![w, b], vec![int_attribute("transB", 1)]);
    builder.graph.node.push(NodeProto {
        name: Some("logits".into()),
        op_type: Some("Identity".into()),
        input: vec![builder.current.clone()],
        output: vec![LOGITS.into()],
        ..Default::default()
    });

    let mut graph = builder.graph;
    let split_dims: Vec<Option<i64>> =
        std::iter::once(None).chain(split_shape.iter().map(|&d| Some(d as i64))).collect();
    graph.input.push(float_value_info(SPLIT, Some(&split_dims)));
    for input in &builder.params {
        let dims: Vec<Option<i64>> = input.shape.iter().map(|&d| Some(d as i64)).collect();
        graph.input.push(float_value_info(&input.name, Some(&dims)));
    }
    graph.output.push(float_value_info(LOGITS, Some(&[None, Some(classes as i64)])));
    graph.name = Some("edgeadapt_tail".into());
    let model = ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some("edgeadapt".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
        graph: Some(graph),
        ..Default::default()
    };
    Ok(TailGraph { model, params: builder.params })
}

fn matrix_shape(network: &Network, slot: usize) -> [usize; 2] {
    let shape = network.params[slot].shape();
    [shape[0], shape.get(1).copied().unwrap_or(1)]
}

struct Builder {
    graph: GraphProto,
    params: Vec<ParamInput>,
    /// The tensor the next node reads.
    current: String,
    count: usize,
}

impl Builder {
    fn param(&mut self, slot: usize, shape: Vec<usize>) -> String {
        let name = format!("param_{slot}");
        self.params.push(ParamInput { name: name.clone(), slot, shape });
        name
    }

    /// A node on the current tensor and `extra` inputs; its output becomes the current tensor.
    fn op(&mut self, op: &str, extra: Vec<String>, attribute: Vec<AttributeProto>) {
        let inputs = std::iter::once(self.current.clone()).chain(extra).collect();
        self.op_on(op, inputs, attribute);
    }

    fn op_on(&mut self, op: &str, input: Vec<String>, attribute: Vec<AttributeProto>) {
        let name = format!("n{}_{}", self.count, op.to_ascii_lowercase());
        self.count += 1;
        let output = format!("{name}_out");
        self.graph.node.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input,
            output: vec![output.clone()],
            attribute,
            ..Default::default()
        });
        self.current = output;
    }

    fn constant(&mut self, value: f32) -> String {
        let name = format!("const_{}", self.graph.initializer.len());
        self.graph.initializer.push(tensor::from_f32(&name, &ArrayD::from_elem(IxDyn(&[]), value)));
        name
    }

    fn activation(&mut self, act: Activation) {
        match act {
            Activation::Relu => self.op("Relu", vec![], vec![]),
            Activation::Relu6 => {
                let (lo, hi) = (self.constant(0.0), self.constant(6.0));
                self.op("Clip", vec![lo, hi], vec![]);
            }
            Activation::Sigmoid => self.op("Sigmoid", vec![], vec![]),
            Activation::Silu => {
                let x = self.current.clone();
                self.op("Sigmoid", vec![], vec![]);
                self.op_on("Mul", vec![x, self.current.clone()], vec![]);
            }
        }
    }

    /// `[C, H, W]` to `[C * H * W]` in ONNX's channel-major order, as the network flattens.
    fn flatten(&mut self, shape: &mut Vec<usize>) {
        if shape.len() == 3 {
            self.op("Flatten", vec![], vec![int_attribute("axis", 1)]);
            *shape = vec![shape.iter().product()];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Role;

    fn network_with_adapter() -> Network {
        let params = vec![
            ArrayD::from_elem(IxDyn(&[6, 4]), 0.1),
            ArrayD::from_elem(IxDyn(&[6]), 0.0),
            ArrayD::from_elem(IxDyn(&[3, 6]), 0.2),
            ArrayD::from_elem(IxDyn(&[3]), 0.0),
        ];
        let network = Network {
            layers: vec![
                Layer::Affine { weight: 0, bias: 1 },
                Layer::Act(Activation::Relu6),
                Layer::GlobalAvgPool,
                Layer::Flatten,
            ],
            head: (2, 3),
            params,
            roles: vec![Role::Tail, Role::Tail, Role::Head, Role::Head],
        };
        network.with_adapter(2, 0)
    }

    #[test]
    fn a_convolution_weight_is_fed_as_a_four_dimensional_kernel_and_every_slot_is_an_input() {
        let network = network_with_adapter();
        let graph = tail_graph(&network, &[4, 2, 2]).unwrap();
        let slots: Vec<usize> = graph.params.iter().map(|p| p.slot).collect();
        assert_eq!(slots.len(), network.params.len());
        assert_eq!(graph.params[0].shape, vec![6, 4, 1, 1]);
        assert_eq!(TailGraph::feed(&network, &graph.params[0]).unwrap().shape(), &[6, 4, 1, 1]);
        let ops: Vec<&str> =
            graph.model.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_deref().unwrap()).collect();
        assert_eq!(
            ops,
            ["Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm", "Relu", "Gemm", "Add", "Gemm", "Identity"]
        );
    }

    #[test]
    fn networks_of_one_structure_give_the_same_graph_whatever_their_weights() {
        let mut network = network_with_adapter();
        let before = tail_graph(&network, &[4, 2, 2]).unwrap();
        network.params[0].fill(3.0);
        assert_eq!(tail_graph(&network, &[4, 2, 2]).unwrap(), before);
        let constant = before.with_weights_of(&network).unwrap();
        let graph = constant.graph.unwrap();
        assert_eq!(graph.input.len(), 1, "only the split is an input");
        assert_eq!(graph.initializer.len(), 2 + network.params.len(), "Clip's bounds and every slot");
        let without_adapter = Network { layers: network.layers[..4].to_vec(), ..network.clone() };
        assert_ne!(tail_graph(&without_adapter, &[4, 2, 2]).unwrap().model, before.model);
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_with_the_layer_named() {
        let network = network_with_adapter();
        let error = tail_graph(&network, &[5, 2, 2]).unwrap_err();
        assert!(error.contains("layer 0") && error.contains("takes 4 channels, gets 5"), "{error}");
        assert!(tail_graph(&network, &[4, 2]).unwrap_err().contains("[D] or [C, H, W]"));
    }
}
