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

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, array};

    use super::*;
    use crate::model::onnx::proto::{AttributeProto, ValueInfoProto};
    use crate::model::onnx::tensor::{from_f32, from_i64};

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|i| i.to_string()).collect(),
            output: outputs.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    fn with(mut node: NodeProto, attribute: Vec<AttributeProto>) -> NodeProto {
        node.attribute = attribute;
        node
    }

    fn attribute(name: &str, kind: AttributeType) -> AttributeProto {
        AttributeProto { name: Some(name.into()), r#type: Some(kind as i32), ..Default::default() }
    }

    fn int(name: &str, value: i64) -> AttributeProto {
        AttributeProto { i: Some(value), ..attribute(name, AttributeType::Int) }
    }

    fn ints(name: &str, values: &[i64]) -> AttributeProto {
        AttributeProto { ints: values.to_vec(), ..attribute(name, AttributeType::Ints) }
    }

    fn float(name: &str, value: f32) -> AttributeProto {
        AttributeProto { f: Some(value), ..attribute(name, AttributeType::Float) }
    }

    fn constant(name: &str, values: ArrayD<f32>) -> TensorProto {
        from_f32(name, &values)
    }

    /// A graph that reads `inputs` and produces `outputs`.
    fn graph(inputs: &[&str], nodes: Vec<NodeProto>, initializer: Vec<TensorProto>, outputs: &[&str]) -> GraphProto {
        GraphProto {
            node: nodes,
            initializer,
            input: inputs.iter().map(|i| float_value_info(i, None)).collect(),
            output: outputs.iter().map(|o| float_value_info(o, None)).collect(),
            ..Default::default()
        }
    }

    /// `[out = 2, in = 3]`, as Gemm holds it with `transB = 1`.
    fn weight() -> ArrayD<f32> {
        array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]].into_dyn()
    }

    /// `fc = Gemm(f, w, b)` with `transB = 1` and `logits` as the model output.
    fn gemm_head(extra: Vec<AttributeProto>) -> GraphProto {
        let mut attributes = vec![int("transB", 1)];
        attributes.extend(extra);
        let fc = with(node("Gemm", "fc", &["f", "w", "b"], &["logits"]), attributes);
        let initializers = vec![constant("w", weight()), constant("b", array![10.0f32, 20.0].into_dyn())];
        graph(&["f"], vec![fc], initializers, &["logits"])
    }

    fn names(values: &[ValueInfoProto]) -> Vec<&str> {
        values.iter().map(|v| v.name.as_deref().unwrap()).collect()
    }

    fn layer(layer: TailLayer, name: &str) -> MatchedLayer {
        MatchedLayer { layer, name: name.into() }
    }

    /// Runs `walk` on a thread of its own: a walk that loops forever fails the test instead of
    /// hanging it.
    fn ends<T: Send + 'static>(walk: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(walk()));
        result.recv_timeout(std::time::Duration::from_secs(10)).expect("the walk did not end within 10 s")
    }

    fn node_error(node: &str, problem: &str) -> GraphError {
        GraphError::Node { node: node.into(), problem: problem.into() }
    }

    #[test]
    fn the_index_knows_node_outputs_and_graph_inputs_but_not_initializers_listed_as_inputs() {
        // Older exporters list initializers among the graph inputs; they are still constants.
        let mut graph = graph(&["x", "w"], vec![node("Relu", "relu", &["x"], &["y"])], vec![], &["y"]);
        graph.initializer.push(constant("w", array![1.0f32].into_dyn()));
        let index = GraphIndex::new(&graph);
        assert!(index.exists("x") && index.exists("y"));
        assert!(!index.exists("w") && !index.exists("nowhere"));
        assert_eq!(index.node(0).name.as_deref(), Some("relu"));
    }

    #[test]
    fn a_node_is_described_by_name_and_op_with_placeholders_for_what_is_missing() {
        assert_eq!(describe_node(&node("Gemm", "fc", &[], &[])), "fc (Gemm)");
        assert_eq!(describe_node(&node("Relu", "", &[], &[])), "<unnamed> (Relu)");
        assert_eq!(describe_node(&NodeProto::default()), "<unnamed> (?)");
    }

    #[test]
    fn a_gemm_head_has_its_weight_scaled_by_alpha_and_its_bias_by_beta() {
        let graph = gemm_head(vec![float("alpha", 2.0), float("beta", 0.5)]);
        let head = find_head(&GraphIndex::new(&graph), "f", None).unwrap();
        assert_eq!(head.name, "fc");
        assert_eq!(head.output, "logits");
        assert_eq!(head.weight, array![[2.0f32, 4.0, 6.0], [8.0, 10.0, 12.0]]);
        assert_eq!(head.bias, array![5.0f32, 10.0]);
    }

    #[test]
    fn a_gemm_weight_stored_in_by_out_is_transposed() {
        let mut graph = gemm_head(vec![]);
        graph.node[0].attribute.clear();
        graph.initializer[0] = constant("w", weight().reversed_axes());
        let head = find_head(&GraphIndex::new(&graph), "f", None).unwrap();
        assert_eq!(head.weight.into_dyn(), weight());
    }

    #[test]
    fn a_single_bias_value_is_given_to_every_output() {
        let mut graph = gemm_head(vec![]);
        graph.initializer[1] = constant("b", array![7.0f32].into_dyn());
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None).unwrap().bias, array![7.0f32, 7.0]);
    }

    #[test]
    fn a_constant_node_serves_as_a_weight_like_an_initializer() {
        let mut graph = gemm_head(vec![]);
        let w = graph.initializer.remove(0);
        let value = AttributeProto { t: Some(w), ..attribute("value", AttributeType::Tensor) };
        graph.node.insert(0, with(node("Constant", "const_w", &[], &["w"]), vec![value]));
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None).unwrap().weight.into_dyn(), weight());
    }

    #[test]
    fn a_matmul_and_its_add_are_one_head_that_ends_at_the_add() {
        let nodes =
            vec![node("MatMul", "mm", &["f", "w"], &["product"]), node("Add", "add", &["product", "b"], &["logits"])];
        let initializers = vec![constant("w", weight().reversed_axes()), constant("b", array![1.0f32, 2.0].into_dyn())];
        let graph = graph(&["f"], nodes, initializers, &["logits"]);
        let head = find_head(&GraphIndex::new(&graph), "f", None).unwrap();
        assert_eq!((head.name.as_str(), head.output.as_str()), ("mm", "logits"));
        assert_eq!(head.weight.into_dyn(), weight());
        assert_eq!(head.bias, array![1.0f32, 2.0]);
    }

    #[test]
    fn a_matmul_without_an_add_is_a_head_with_zero_bias() {
        let nodes = vec![node("MatMul", "mm", &["f", "w"], &["logits"])];
        let graph = graph(&["f"], nodes, vec![constant("w", weight().reversed_axes())], &["logits"]);
        let head = find_head(&GraphIndex::new(&graph), "f", None).unwrap();
        assert_eq!(head.output, "logits");
        assert_eq!(head.bias, array![0.0f32, 0.0]);
    }

    #[test]
    fn an_unknown_feature_tensor_is_not_found() {
        let graph = gemm_head(vec![]);
        assert_eq!(find_head(&GraphIndex::new(&graph), "nope", None), Err(GraphError::TensorNotFound("nope".into())));
    }

    #[test]
    fn features_without_a_linear_reader_have_no_head_and_the_readers_are_named() {
        let relu = graph(&["f"], vec![node("Relu", "act", &["f"], &["r"])], vec![], &["r"]);
        let expected = GraphError::NoHead { features: "f".into(), readers: "act (Relu)".into() };
        assert_eq!(find_head(&GraphIndex::new(&relu), "f", None), Err(expected));
        let unread = graph(&["f"], vec![], vec![], &["f"]);
        let expected = GraphError::NoHead { features: "f".into(), readers: "none".into() };
        assert_eq!(find_head(&GraphIndex::new(&unread), "f", None), Err(expected));
    }

    #[test]
    fn two_linear_readers_are_ambiguous_until_one_is_named() {
        let mut graph = gemm_head(vec![]);
        graph.node.push(with(node("Gemm", "fc2", &["f", "w"], &["other"]), vec![int("transB", 1)]));
        graph.output.push(float_value_info("other", None));
        let index = GraphIndex::new(&graph);
        let expected = GraphError::AmbiguousHead { features: "f".into(), candidates: "fc (Gemm), fc2 (Gemm)".into() };
        assert_eq!(find_head(&index, "f", None), Err(expected));
        let head = find_head(&index, "f", Some("fc2")).unwrap();
        assert_eq!((head.name.as_str(), head.output.as_str()), ("fc2", "other"));
    }

    #[test]
    fn a_named_head_must_exist_and_map_the_features_linearly() {
        let mut graph = gemm_head(vec![]);
        graph.node.push(node("Relu", "act", &["f"], &["r"]));
        let index = GraphIndex::new(&graph);
        let missing = GraphError::BadHead("nope".into(), "no node has this name".into());
        assert_eq!(find_head(&index, "f", Some("nope")), Err(missing));
        match find_head(&index, "f", Some("act")) {
            Err(GraphError::BadHead(name, problem)) => {
                assert_eq!(name, "act");
                assert!(problem.starts_with("act (Relu) does not map 'f' linearly"), "{problem}");
            }
            other => panic!("expected BadHead, got {other:?}"),
        }
    }

    #[test]
    fn a_head_whose_output_feeds_another_node_is_not_the_last_layer() {
        let mut graph = gemm_head(vec![]);
        graph.node.push(node("Softmax", "softmax", &["logits"], &["probabilities"]));
        graph.output = vec![float_value_info("probabilities", None)];
        let expected = GraphError::HeadNotLast { output: "logits".into(), readers: "softmax (Softmax)".into() };
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None), Err(expected));
    }

    #[test]
    fn a_gemm_over_the_transposed_activation_is_refused() {
        let graph = gemm_head(vec![int("transA", 1)]);
        let expected = node_error("fc (Gemm)", "transA = 1 is not supported");
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None), Err(expected));
    }

    #[test]
    fn a_weight_that_is_not_a_constant_is_refused() {
        let mut graph = gemm_head(vec![]);
        graph.initializer.remove(0);
        graph.input.push(float_value_info("w", None));
        let expected = node_error("fc (Gemm)", "input 'w' must be a constant (initializer)");
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None), Err(expected));
    }

    #[test]
    fn a_weight_that_is_not_a_matrix_is_refused() {
        let mut graph = gemm_head(vec![]);
        graph.initializer[0] = constant("w", array![1.0f32, 2.0].into_dyn());
        let expected = node_error("fc (Gemm)", "weight must be a matrix");
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None), Err(expected));
    }

    #[test]
    fn a_bias_of_the_wrong_length_is_refused() {
        let mut graph = gemm_head(vec![]);
        graph.initializer[1] = constant("b", array![1.0f32, 2.0, 3.0].into_dyn());
        let expected = node_error("fc (Gemm)", "bias has 3 values for 2 outputs");
        assert_eq!(find_head(&GraphIndex::new(&graph), "f", None), Err(expected));
    }

    #[test]
    fn a_tail_is_matched_layer_by_layer_in_order() {
        let nodes = vec![
            node("Conv", "conv", &["s", "cw", "cb"], &["c"]),
            node("Clip", "clip", &["c", "min", "max"], &["r"]),
            node("GlobalAveragePool", "pool", &["r"], &["p"]),
            with(node("Flatten", "flat", &["p"], &["f"]), vec![int("axis", 1)]),
        ];
        let initializers = vec![
            constant("cw", weight().into_shape_with_order(vec![2, 3, 1, 1]).unwrap()),
            constant("cb", array![0.5f32, -0.5].into_dyn()),
            constant("min", array![0.0f32].into_dyn()),
            constant("max", array![6.0f32].into_dyn()),
        ];
        let graph = graph(&["s"], nodes, initializers, &["f"]);
        let conv = TailLayer::Conv1x1 { weight: weight().into_dimensionality().unwrap(), bias: array![0.5, -0.5] };
        let expected = vec![
            layer(conv, "conv"),
            layer(TailLayer::Relu6, "clip"),
            layer(TailLayer::GlobalAvgPool, "pool"),
            layer(TailLayer::Flatten, "flat"),
        ];
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Ok(expected));
    }

    #[test]
    fn sigmoid_times_its_input_is_one_silu_layer() {
        let nodes = vec![node("Sigmoid", "gate", &["s"], &["g"]), node("Mul", "mul", &["g", "s"], &["f"])];
        let graph = graph(&["s"], nodes, vec![], &["f"]);
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Ok(vec![layer(TailLayer::Silu, "gate")]));
    }

    #[test]
    fn a_mean_over_height_and_width_is_a_pool_that_flattens_without_keepdims() {
        let mean = with(node("ReduceMean", "mean", &["s"], &["f"]), vec![ints("axes", &[-1, -2]), int("keepdims", 0)]);
        let graph = graph(&["s"], vec![mean], vec![], &["f"]);
        let expected = vec![layer(TailLayer::GlobalAvgPool, "mean"), layer(TailLayer::Flatten, "mean")];
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Ok(expected));
    }

    #[test]
    fn reduce_mean_axes_may_be_given_as_a_constant_input() {
        let mean = node("ReduceMean", "mean", &["s", "axes"], &["f"]);
        let graph = graph(&["s"], vec![mean], vec![from_i64("axes", &[2, 3])], &["f"]);
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Ok(vec![layer(TailLayer::GlobalAvgPool, "mean")]));
    }

    #[test]
    fn a_batch_reshape_a_clip_from_zero_and_a_linear_layer_match_and_pass_throughs_vanish() {
        let nodes = vec![
            node("Reshape", "reshape", &["s", "shape"], &["a"]),
            node("Dropout", "drop", &["a"], &["b"]),
            node("Identity", "same", &["b"], &["c"]),
            with(node("Clip", "relu", &["c"], &["d"]), vec![float("min", 0.0)]),
            node("MatMul", "mm", &["d", "w"], &["e"]),
            node("Add", "add", &["e", "bias"], &["f"]),
        ];
        let initializers = vec![
            from_i64("shape", &[0, -1]),
            constant("w", weight().reversed_axes()),
            constant("bias", array![1.0f32, 2.0].into_dyn()),
        ];
        let graph = graph(&["s"], nodes, initializers, &["f"]);
        let linear = TailLayer::Linear { weight: weight().into_dimensionality().unwrap(), bias: array![1.0, 2.0] };
        let expected = vec![layer(TailLayer::Flatten, "reshape"), layer(TailLayer::Relu, "relu"), layer(linear, "mm")];
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Ok(expected));
    }

    #[test]
    fn splitting_at_the_features_leaves_an_empty_tail() {
        let graph = gemm_head(vec![]);
        assert_eq!(match_tail(&GraphIndex::new(&graph), "f", "f"), Ok(vec![]));
    }

    #[test]
    fn an_unknown_split_is_not_found() {
        let graph = gemm_head(vec![]);
        assert_eq!(match_tail(&GraphIndex::new(&graph), "nope", "f"), Err(GraphError::TensorNotFound("nope".into())));
    }

    #[test]
    fn a_dead_end_before_the_features_is_unreachable() {
        let graph = graph(&["s"], vec![node("Relu", "relu", &["s"], &["x"])], vec![], &["x"]);
        let expected = GraphError::Unreachable {
            split: "s".into(),
            features: "f".into(),
            problem: "'x' is not read by any node".into(),
        };
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Err(expected));
    }

    #[test]
    fn a_cycle_ends_the_walk_with_unreachable_instead_of_looping() {
        let nodes = vec![node("Relu", "there", &["s"], &["x"]), node("Relu", "back", &["x"], &["s"])];
        let graph = graph(&["s"], nodes, vec![], &["x"]);
        let expected = GraphError::Unreachable {
            split: "s".into(),
            features: "f".into(),
            problem: "the walk does not terminate".into(),
        };
        assert_eq!(ends(move || match_tail(&GraphIndex::new(&graph), "s", "f")), Err(expected));
    }

    #[test]
    fn a_fork_in_the_tail_is_refused_as_a_branch() {
        let nodes = vec![node("Relu", "a", &["s"], &["x"]), node("Sigmoid", "b", &["s"], &["y"])];
        let graph = graph(&["s"], nodes, vec![], &["x", "y"]);
        let expected = GraphError::Branch { tensor: "s".into(), readers: "a (Relu), b (Sigmoid)".into() };
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Err(expected));
    }

    #[test]
    fn every_unsupported_node_of_the_tail_is_named_at_once() {
        let nodes = vec![
            node("Softmax", "soft", &["s"], &["a"]),
            node("Conv", "wide", &["a", "kernel"], &["b"]),
            node("Clip", "clip", &["b", "low", "high"], &["c"]),
            node("Add", "mix", &["c", "other"], &["f"]),
        ];
        let initializers = vec![
            constant("kernel", ArrayD::zeros(vec![2, 2, 3, 3])),
            constant("low", array![-1.0f32].into_dyn()),
            constant("high", array![1.0f32].into_dyn()),
        ];
        let graph = graph(&["s", "other"], nodes, initializers, &["f"]);
        let Err(GraphError::Unsupported { split, features, nodes }) = match_tail(&GraphIndex::new(&graph), "s", "f")
        else {
            panic!("expected Unsupported");
        };
        assert_eq!((split.as_str(), features.as_str()), ("s", "f"));
        let named = [
            "soft (Softmax)",
            "wide (Conv) (kernel [2, 2, 3, 3] is not 1x1)",
            "clip (Clip) (bounds",
            "mix (Add) reads 'other'",
        ];
        for part in named {
            assert!(nodes.contains(part), "{part} in: {nodes}");
        }
    }

    #[test]
    fn a_matmul_that_takes_the_activation_second_is_refused() {
        let nodes = vec![node("MatMul", "mm", &["w", "s"], &["f"])];
        let graph = graph(&["s"], nodes, vec![constant("w", weight())], &["f"]);
        let expected = node_error("mm (MatMul)", "the activation must be the first MatMul input");
        assert_eq!(match_tail(&GraphIndex::new(&graph), "s", "f"), Err(expected));
    }

    /// `x -> conv -> c -> relu -> s -> fc -> logits`, with a second, unused input.
    fn classifier() -> GraphProto {
        let nodes = vec![
            node("Conv", "conv", &["x", "cw"], &["c"]),
            node("Relu", "relu", &["c"], &["s"]),
            with(node("Gemm", "fc", &["s", "fw"], &["logits"]), vec![int("transB", 1)]),
        ];
        let initializers = vec![constant("cw", ArrayD::zeros(vec![2, 3, 1, 1])), constant("fw", weight())];
        graph(&["x", "unused"], nodes, initializers, &["logits"])
    }

    #[test]
    fn the_trunk_keeps_only_the_nodes_constants_and_inputs_the_split_needs() {
        let trunk = trunk_graph(&classifier(), "s").unwrap();
        let nodes: Vec<&str> = trunk.node.iter().map(|n| n.name.as_deref().unwrap()).collect();
        assert_eq!(nodes, ["conv", "relu"]);
        let initializers: Vec<&str> = trunk.initializer.iter().map(|t| t.name.as_deref().unwrap()).collect();
        assert_eq!(initializers, ["cw"]);
        assert_eq!(names(&trunk.input), ["x"]);
        assert_eq!(names(&trunk.output), ["s"]);
    }

    #[test]
    fn the_trunk_output_takes_its_shape_from_the_value_info() {
        let mut graph = classifier();
        let split = float_value_info("s", Some(&[None, Some(2), Some(7), Some(7)]));
        graph.value_info = vec![float_value_info("c", None), split.clone()];
        let trunk = trunk_graph(&graph, "s").unwrap();
        assert_eq!(trunk.output, [split]);
        assert_eq!(names(&trunk.value_info), ["c"]);
    }

    #[test]
    fn a_trunk_split_at_the_model_input_passes_it_through() {
        let trunk = trunk_graph(&classifier(), "x").unwrap();
        assert_eq!(trunk.node, [node("Identity", "trunk_identity", &["x"], &["x__trunk"])]);
        assert_eq!(names(&trunk.input), ["x"]);
        assert_eq!(names(&trunk.output), ["x__trunk"]);
    }

    #[test]
    fn a_trunk_at_an_unknown_tensor_is_not_found() {
        assert_eq!(trunk_graph(&classifier(), "nope"), Err(GraphError::TensorNotFound("nope".into())));
    }

    #[test]
    fn a_cycle_does_not_hang_the_trunk_walk() {
        let nodes = vec![node("Relu", "a", &["b"], &["a"]), node("Relu", "b", &["a"], &["b"])];
        let graph = graph(&["x"], nodes, vec![], &["a"]);
        let trunk = ends(move || trunk_graph(&graph, "a")).unwrap();
        assert_eq!(trunk.node.len(), 2);
    }

    #[test]
    fn value_info_dims_keeps_static_sizes_and_leaves_the_rest_unknown() {
        let info = float_value_info("t", Some(&[None, Some(3), Some(0)]));
        assert_eq!(value_info_dims(&info), Some(vec![None, Some(3), None]));
        // Without a shape there are no dims to tell.
        assert_eq!(value_info_dims(&float_value_info("t", None)), None);
    }
}
