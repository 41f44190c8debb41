//! Reading a classifier graph: which nodes form the trunk, the tail and the head.
//!
//! Pure functions over the parsed protobuf, so every rule is testable without ONNX Runtime.

use std::collections::HashMap;

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};

use super::proto::{GraphProto, NodeProto, TensorProto, attribute_proto::AttributeType};
use super::tensor;
pub use super::trunk::{float_value_info, trunk_graph, value_info_dims};
use crate::model::tail::TailLayer;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("tensor '{0}' is not produced by any node and is not a graph input")]
    TensorNotFound(String),
    #[error("no Gemm or MatMul(+Add) node reads the feature tensor '{features}' (its readers: {readers})")]
    NoHead { features: String, readers: String },
    #[error("several linear layers read '{features}': {candidates}; name the classifier with --head NODE")]
    AmbiguousHead { features: String, candidates: String },
    #[error("--head {0}: {1}")]
    BadHead(String, String),
    #[error(
        "the head's output '{output}' is not a model output (it feeds: {readers}); the classifier must be the last layer"
    )]
    HeadNotLast { output: String, readers: String },
    #[error(
        "between '{split}' and '{features}' these nodes are outside the supported tail layers (1x1 Conv, Gemm, MatMul+Add, Relu, Clip(0,6), Sigmoid, x*Sigmoid(x), GlobalAveragePool, ReduceMean over H,W, Flatten, Reshape to [N,-1], Dropout, Identity): {nodes}"
    )]
    Unsupported { split: String, features: String, nodes: String },
    #[error("the tail must be a chain: tensor '{tensor}' feeds several nodes ({readers})")]
    Branch { tensor: String, readers: String },
    #[error("'{features}' cannot be reached from '{split}': {problem}")]
    Unreachable { split: String, features: String, problem: String },
    #[error("node {node}: {problem}")]
    Node { node: String, problem: String },
}

/// One matched tail layer and the node it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchedLayer {
    pub layer: TailLayer,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MatchedHead {
    pub name: String,
    pub weight: Array2<f32>,
    pub bias: Array1<f32>,
    pub output: String,
}

/// Lookups over a graph.
pub struct GraphIndex<'g> {
    graph: &'g GraphProto,
    initializers: HashMap<&'g str, &'g TensorProto>,
    pub(super) producer: HashMap<&'g str, usize>,
    readers: HashMap<&'g str, Vec<usize>>,
}

impl<'g> GraphIndex<'g> {
    pub fn new(graph: &'g GraphProto) -> GraphIndex<'g> {
        let initializers = graph.initializer.iter().filter_map(|t| Some((t.name.as_deref()?, t))).collect();
        let mut producer = HashMap::new();
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, node) in graph.node.iter().enumerate() {
            for output in &node.output {
                producer.insert(output.as_str(), index);
            }
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                let list = readers.entry(input.as_str()).or_default();
                if !list.contains(&index) {
                    list.push(index);
                }
            }
        }
        GraphIndex { graph, initializers, producer, readers }
    }

    pub fn node(&self, index: usize) -> &'g NodeProto {
        &self.graph.node[index]
    }

    fn readers(&self, tensor: &str) -> &[usize] {
        self.readers.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    pub(super) fn is_graph_input(&self, tensor: &str) -> bool {
        self.graph.input.iter().any(|i| i.name.as_deref() == Some(tensor)) && !self.initializers.contains_key(tensor)
    }

    fn is_graph_output(&self, tensor: &str) -> bool {
        self.graph.output.iter().any(|o| o.name.as_deref() == Some(tensor))
    }

    pub fn exists(&self, tensor: &str) -> bool {
        self.producer.contains_key(tensor) || self.is_graph_input(tensor)
    }

    /// A constant tensor: an initializer or the output of a `Constant` node.
    fn constant(&self, name: &str) -> Option<&'g TensorProto> {
        if let Some(tensor) = self.initializers.get(name) {
            return Some(tensor);
        }
        let node = self.node(*self.producer.get(name)?);
        if node.op_type.as_deref() != Some("Constant") {
            return None;
        }
        node.attribute.iter().find(|a| a.name.as_deref() == Some("value")).and_then(|a| a.t.as_ref())
    }

    /// The index of the node that computes `tensor`.
    pub(super) fn producer(&self, tensor: &str) -> Option<usize> {
        self.producer.get(tensor).copied()
    }

    pub(super) fn node_count(&self) -> usize {
        self.graph.node.len()
    }

    pub(super) fn is_constant(&self, name: &str) -> bool {
        self.constant(name).is_some()
    }

    fn constant_f32(&self, node: &NodeProto, name: &str) -> Result<ArrayD<f32>, GraphError> {
        let tensor = self
            .constant(name)
            .ok_or_else(|| node_error(node, format!("input '{name}' must be a constant (initializer)")))?;
        tensor::to_f32(tensor).map_err(|problem| node_error(node, problem))
    }

    fn describe(&self, indices: &[usize]) -> String {
        indices.iter().map(|&i| describe_node(self.node(i))).collect::<Vec<_>>().join(", ")
    }
}

pub fn describe_node(node: &NodeProto) -> String {
    format!(
        "{} ({})",
        node.name.as_deref().filter(|n| !n.is_empty()).unwrap_or("<unnamed>"),
        node.op_type.as_deref().unwrap_or("?")
    )
}

fn node_error(node: &NodeProto, problem: impl Into<String>) -> GraphError {
    GraphError::Node { node: describe_node(node), problem: problem.into() }
}

fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i)
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name) && a.r#type == Some(AttributeType::Ints as i32))
        .map(|a| a.ints.clone())
}

fn attr_float(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.f)
}

fn node_name(node: &NodeProto) -> String {
    node.name.clone().unwrap_or_default()
}

/// A linear map read from Gemm (`transA = 0`) or MatMul(+Add): weight `[out, in]`, bias `[out]`.
fn linear_from_gemm(index: &GraphIndex<'_>, node: &NodeProto) -> Result<(Array2<f32>, Array1<f32>), GraphError> {
    if attr_int(node, "transA").unwrap_or(0) != 0 {
        return Err(node_error(node, "transA = 1 is not supported"));
    }
    let weight = index.constant_f32(node, node.input.get(1).map(String::as_str).unwrap_or(""))?;
    let weight: Array2<f32> =
        weight.into_dimensionality::<Ix2>().map_err(|_| node_error(node, "weight must be a matrix"))?;
    let alpha = attr_float(node, "alpha").unwrap_or(1.0);
    let beta = attr_float(node, "beta").unwrap_or(1.0);
    let weight = if attr_int(node, "transB").unwrap_or(0) != 0 { weight } else { weight.reversed_axes() };
    let weight = weight.mapv(|w| w * alpha).as_standard_layout().into_owned();
    let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
        Some(name) => broadcast_bias(node, index.constant_f32(node, name)?, weight.nrows())?.mapv(|b| b * beta),
        None => Array1::zeros(weight.nrows()),
    };
    Ok((weight, bias))
}

fn broadcast_bias(node: &NodeProto, bias: ArrayD<f32>, outputs: usize) -> Result<Array1<f32>, GraphError> {
    let values: Vec<f32> = bias.iter().copied().collect();
    match values.len() {
        1 => Ok(Array1::from_elem(outputs, values[0])),
        n if n == outputs => Ok(Array1::from(values)),
        n => Err(node_error(node, format!("bias has {n} values for {outputs} outputs"))),
    }
}

/// A MatMul(+Add) read as a linear map; `add` is the node that supplies the bias, if any.
struct MatMulParts {
    weight: Array2<f32>,
    bias: Array1<f32>,
    add: Option<usize>,
}

/// The MatMul's weight as `[out, in]`, and the Add that supplies the bias if there is one.
fn matmul_parts(index: &GraphIndex<'_>, node: &NodeProto, input: &str) -> Result<MatMulParts, GraphError> {
    if node.input.first().map(String::as_str) != Some(input) {
        return Err(node_error(node, "the activation must be the first MatMul input"));
    }
    let weight = index.constant_f32(node, node.input.get(1).map(String::as_str).unwrap_or(""))?;
    let weight: Array2<f32> = weight
        .into_dimensionality::<Ix2>()
        .map_err(|_| node_error(node, "weight must be a matrix"))?
        .reversed_axes()
        .as_standard_layout()
        .into_owned();
    let output = &node.output[0];
    let add = match index.readers(output) {
        [single] => {
            let add = index.node(*single);
            let other = add.input.iter().find(|i| *i != output);
            (add.op_type.as_deref() == Some("Add") && other.is_some_and(|o| index.is_constant(o))).then_some(*single)
        }
        _ => None,
    };
    let bias = match add {
        Some(add_index) => {
            let add = index.node(add_index);
            let name = add.input.iter().find(|i| *i != output).expect("checked above");
            broadcast_bias(add, index.constant_f32(add, name)?, weight.nrows())?
        }
        None => Array1::zeros(weight.nrows()),
    };
    Ok(MatMulParts { weight, bias, add })
}

/// Finds the classifier: the Gemm or MatMul(+Add) that maps `features` to a model output.
pub fn find_head(index: &GraphIndex<'_>, features: &str, head: Option<&str>) -> Result<MatchedHead, GraphError> {
    if !index.exists(features) {
        return Err(GraphError::TensorNotFound(features.to_string()));
    }
    let readers = index.readers(features);
    let linear: Vec<usize> = readers
        .iter()
        .copied()
        .filter(|&i| {
            let node = index.node(i);
            matches!(node.op_type.as_deref(), Some("Gemm" | "MatMul"))
                && node.input.first().map(String::as_str) == Some(features)
        })
        .collect();
    let chosen = match head {
        Some(name) => {
            let found = index.graph.node.iter().position(|n| n.name.as_deref() == Some(name));
            let Some(found) = found else {
                return Err(GraphError::BadHead(name.into(), "no node has this name".into()));
            };
            if !linear.contains(&found) {
                return Err(GraphError::BadHead(
                    name.into(),
                    format!(
                        "{} does not map '{features}' linearly (Gemm or MatMul with '{features}' as first input)",
                        describe_node(index.node(found))
                    ),
                ));
            }
            found
        }
        None => match linear.as_slice() {
            [single] => *single,
            [] => {
                return Err(GraphError::NoHead {
                    features: features.into(),
                    readers: if readers.is_empty() { "none".into() } else { index.describe(readers) },
                });
            }
            several => {
                return Err(GraphError::AmbiguousHead {
                    features: features.into(),
                    candidates: index.describe(several),
                });
            }
        },
    };
    let node = index.node(chosen);
    let (weight, bias, output) = if node.op_type.as_deref() == Some("Gemm") {
        let (weight, bias) = linear_from_gemm(index, node)?;
        (weight, bias, node.output[0].clone())
    } else {
        let MatMulParts { weight, bias, add } = matmul_parts(index, node, features)?;
        let output = match add {
            Some(add) => index.node(add).output[0].clone(),
            None => node.output[0].clone(),
        };
        (weight, bias, output)
    };
    if !index.is_graph_output(&output) {
        return Err(GraphError::HeadNotLast { readers: index.describe(index.readers(&output)), output });
    }
    Ok(MatchedHead { name: node_name(node), weight, bias, output })
}

/// Walks from `split` to `features`, matching each node to a tail layer.
pub fn match_tail(index: &GraphIndex<'_>, split: &str, features: &str) -> Result<Vec<MatchedLayer>, GraphError> {
    if !index.exists(split) {
        return Err(GraphError::TensorNotFound(split.to_string()));
    }
    let unreachable =
        |problem: String| GraphError::Unreachable { split: split.into(), features: features.into(), problem };
    let mut layers = Vec::new();
    let mut unsupported: Vec<String> = Vec::new();
    let mut current = split.to_string();
    let mut steps = 0;
    while current != features {
        steps += 1;
        if steps > index.graph.node.len() + 1 {
            return Err(unreachable("the walk does not terminate".into()));
        }
        let readers = index.readers(&current);
        if let Some(output) = silu_output(index, &current, readers) {
            layers.push(MatchedLayer { layer: TailLayer::Silu, name: node_name(index.node(readers[0])) });
            current = output;
            continue;
        }
        let node_index = match readers {
            [] => return Err(unreachable(format!("'{current}' is not read by any node"))),
            [single] => *single,
            several => return Err(GraphError::Branch { tensor: current.clone(), readers: index.describe(several) }),
        };
        let node = index.node(node_index);
        let foreign: Vec<&String> =
            node.input.iter().filter(|i| !i.is_empty() && **i != current && !index.is_constant(i)).collect();
        if !foreign.is_empty() {
            unsupported.push(format!(
                "{} reads {} from outside the tail",
                describe_node(node),
                foreign.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(", ")
            ));
            current = node.output[0].clone();
            continue;
        }
        let name = node_name(node);
        let op = node.op_type.as_deref().unwrap_or("");
        let mut next = node.output[0].clone();
        let mut push = |layer: TailLayer| layers.push(MatchedLayer { layer, name: name.clone() });
        match op {
            "Conv" => match conv1x1(index, node) {
                Ok((weight, bias)) => push(TailLayer::Conv1x1 { weight, bias }),
                Err(problem) => unsupported.push(format!("{} ({problem})", describe_node(node))),
            },
            "Gemm" => {
                let (weight, bias) = linear_from_gemm(index, node)?;
                push(TailLayer::Linear { weight, bias });
            }
            "MatMul" => {
                let MatMulParts { weight, bias, add } = matmul_parts(index, node, &current)?;
                push(TailLayer::Linear { weight, bias });
                if let Some(add) = add {
                    next = index.node(add).output[0].clone();
                }
            }
            "Relu" => push(TailLayer::Relu),
            "Sigmoid" => push(TailLayer::Sigmoid),
            "Clip" => match clip_bounds(index, node)? {
                (Some(min), Some(max)) if min == 0.0 && max == 6.0 => push(TailLayer::Relu6),
                (Some(0.0), None) => push(TailLayer::Relu),
                bounds => unsupported.push(format!(
                    "{} (bounds {bounds:?}; only [0, 6] and [0, inf) are supported)",
                    describe_node(node)
                )),
            },
            "GlobalAveragePool" => push(TailLayer::GlobalAvgPool),
            "ReduceMean" => match reduce_mean_axes(index, node)? {
                Some(keepdims) => {
                    push(TailLayer::GlobalAvgPool);
                    if !keepdims {
                        push(TailLayer::Flatten);
                    }
                }
                None => {
                    unsupported.push(format!("{} (only a mean over axes [2, 3] is supported)", describe_node(node)))
                }
            },
            "Flatten" if attr_int(node, "axis").unwrap_or(1) == 1 => push(TailLayer::Flatten),
            "Reshape" if is_batch_flatten(index, node) => push(TailLayer::Flatten),
            "Dropout" | "Identity" => {}
            _ => unsupported.push(describe_node(node)),
        }
        current = next;
    }
    if !unsupported.is_empty() {
        return Err(GraphError::Unsupported {
            split: split.into(),
            features: features.into(),
            nodes: unsupported.join("; "),
        });
    }
    Ok(layers)
}

/// `t -> Sigmoid -> s; Mul(t, s)`: the SiLU pattern exporters emit. Returns the Mul's output.
fn silu_output(index: &GraphIndex<'_>, tensor: &str, readers: &[usize]) -> Option<String> {
    let [a, b] = readers else { return None };
    let (sigmoid, mul) = match (index.node(*a).op_type.as_deref(), index.node(*b).op_type.as_deref()) {
        (Some("Sigmoid"), Some("Mul")) => (index.node(*a), index.node(*b)),
        (Some("Mul"), Some("Sigmoid")) => (index.node(*b), index.node(*a)),
        _ => return None,
    };
    let gate = &sigmoid.output[0];
    let mut inputs: Vec<&str> = mul.input.iter().map(String::as_str).collect();
    inputs.sort_unstable();
    let mut expected = vec![tensor, gate.as_str()];
    expected.sort_unstable();
    (inputs == expected && index.readers(gate).len() == 1).then(|| mul.output[0].clone())
}

fn conv1x1(index: &GraphIndex<'_>, node: &NodeProto) -> Result<(Array2<f32>, Array1<f32>), String> {
    let weight_name = node.input.get(1).ok_or("no weight input")?;
    let weight = index.constant(weight_name).ok_or("weight is not a constant")?;
    let weight = tensor::to_f32(weight)?;
    let shape = weight.shape().to_vec();
    if shape.len() != 4 || shape[2] != 1 || shape[3] != 1 {
        return Err(format!("kernel {shape:?} is not 1x1"));
    }
    let all_ones = |name: &str| attr_ints(node, name).is_none_or(|v| v.iter().all(|&x| x == 1));
    let all_zero = |name: &str| attr_ints(node, name).is_none_or(|v| v.iter().all(|&x| x == 0));
    if attr_int(node, "group").unwrap_or(1) != 1 {
        return Err("grouped convolution".into());
    }
    if !all_ones("strides") || !all_ones("dilations") || !all_zero("pads") {
        return Err("strides, dilations and pads must be trivial".into());
    }
    let weight = weight.into_shape_with_order((shape[0], shape[1])).map_err(|e| e.to_string())?;
    let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
        Some(name) => {
            let bias = tensor::to_f32(index.constant(name).ok_or("bias is not a constant")?)?;
            bias.into_dimensionality::<Ix1>().map_err(|_| "bias must be a vector".to_string())?
        }
        None => Array1::zeros(shape[0]),
    };
    if bias.len() != shape[0] {
        return Err(format!("bias has {} values for {} channels", bias.len(), shape[0]));
    }
    Ok((weight, bias))
}

fn clip_bounds(index: &GraphIndex<'_>, node: &NodeProto) -> Result<(Option<f32>, Option<f32>), GraphError> {
    let scalar = |slot: usize, attribute: &str| -> Result<Option<f32>, GraphError> {
        match node.input.get(slot).filter(|n| !n.is_empty()) {
            Some(name) => Ok(index.constant_f32(node, name)?.iter().next().copied()),
            None => Ok(attr_float(node, attribute)),
        }
    };
    Ok((scalar(1, "min")?, scalar(2, "max")?))
}

/// `Some(keepdims)` when the ReduceMean averages over exactly the spatial axes of a rank-4 tensor.
fn reduce_mean_axes(index: &GraphIndex<'_>, node: &NodeProto) -> Result<Option<bool>, GraphError> {
    let axes = match node.input.get(1).filter(|n| !n.is_empty()) {
        Some(name) => {
            let constant = index.constant(name).ok_or_else(|| node_error(node, "axes must be a constant"))?;
            tensor::to_i64(constant).map_err(|p| node_error(node, p))?
        }
        None => attr_ints(node, "axes").unwrap_or_default(),
    };
    let mut axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
    axes.sort_unstable();
    let keepdims = attr_int(node, "keepdims").unwrap_or(1) != 0;
    Ok((axes == [2, 3]).then_some(keepdims))
}

fn is_batch_flatten(index: &GraphIndex<'_>, node: &NodeProto) -> bool {
    let Some(shape) = node.input.get(1).and_then(|n| index.constant(n)) else { return false };
    matches!(tensor::to_i64(shape).as_deref(), Ok([0, -1]))
}
