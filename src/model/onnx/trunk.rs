//! The trunk as its own graph: the nodes up to the split tensor, with typed inputs and outputs.

use std::collections::{HashSet, VecDeque};

use super::graph::{GraphError, GraphIndex};
use super::proto::{GraphProto, NodeProto};

/// The sub-graph that computes `split` from the model input, as a standalone graph.
pub fn trunk_graph(graph: &GraphProto, split: &str) -> Result<GraphProto, GraphError> {
    let index = GraphIndex::new(graph);
    if !index.exists(split) {
        return Err(GraphError::TensorNotFound(split.to_string()));
    }
    let mut needed_nodes = HashSet::new();
    let mut needed_tensors = HashSet::new();
    let mut queue = VecDeque::from([split.to_string()]);
    while let Some(tensor) = queue.pop_front() {
        if !needed_tensors.insert(tensor.clone()) {
            continue;
        }
        if let Some(&producer) = index.producer.get(tensor.as_str())
            && needed_nodes.insert(producer)
        {
            queue.extend(index.node(producer).input.iter().filter(|i| !i.is_empty()).cloned());
        }
    }
    let mut trunk = GraphProto {
        name: Some("trunk".into()),
        node: graph.node.iter().enumerate().filter(|(i, _)| needed_nodes.contains(i)).map(|(_, n)| n.clone()).collect(),
        initializer: graph
            .initializer
            .iter()
            .filter(|t| t.name.as_ref().is_some_and(|n| needed_tensors.contains(n)))
            .cloned()
            .collect(),
        input: graph
            .input
            .iter()
            .filter(|i| i.name.as_ref().is_some_and(|n| needed_tensors.contains(n)))
            .cloned()
            .collect(),
        value_info: graph
            .value_info
            .iter()
            .filter(|v| v.name.as_ref().is_some_and(|n| needed_tensors.contains(n) && n != split))
            .cloned()
            .collect(),
        ..Default::default()
    };
    let output = graph
        .value_info
        .iter()
        .chain(graph.output.iter())
        .find(|v| v.name.as_deref() == Some(split))
        .cloned()
        .unwrap_or_else(|| float_value_info(split, None));
    if index.is_graph_input(split) {
        // The split is the model input itself: the trunk passes it through.
        let renamed = format!("{split}__trunk");
        trunk.node.push(NodeProto {
            name: Some("trunk_identity".into()),
            op_type: Some("Identity".into()),
            input: vec![split.to_string()],
            output: vec![renamed.clone()],
            ..Default::default()
        });
        trunk.output = vec![float_value_info(&renamed, None)];
    } else {
        trunk.output = vec![output];
    }
    Ok(trunk)
}

/// A float tensor value-info; `dims` of `None` leaves the shape unknown.
pub fn float_value_info(name: &str, dims: Option<&[Option<i64>]>) -> super::proto::ValueInfoProto {
    use super::proto::{
        TensorShapeProto, TypeProto, ValueInfoProto, tensor_proto::DataType, tensor_shape_proto, type_proto,
    };
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .enumerate()
            .map(|(axis, d)| tensor_shape_proto::Dimension {
                value: Some(match d {
                    Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                    None => tensor_shape_proto::dimension::Value::DimParam(if axis == 0 {
                        "N".into()
                    } else {
                        format!("d{axis}")
                    }),
                }),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Static dims of a value-info (`None` for symbolic or unknown).
pub fn value_info_dims(info: &super::proto::ValueInfoProto) -> Option<Vec<Option<i64>>> {
    use super::proto::{tensor_shape_proto::dimension::Value, type_proto};
    let Some(type_proto::Value::TensorType(tensor)) = info.r#type.as_ref()?.value.as_ref() else { return None };
    Some(
        tensor
            .shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Value::DimValue(v)) if v > 0 => Some(v),
                _ => None,
            })
            .collect(),
    )
}
