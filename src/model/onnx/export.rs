//! Writing a bundle (trunk + tail + head) back out as one self-contained ONNX model.
//!
//! Lets an adapted version run anywhere ONNX runs, and gives benchmarks and import checks a
//! plain single-session model to compare against.

use ndarray::{ArrayD, IxDyn};

use super::graph::float_value_info;
use super::proto::{AttributeProto, ModelProto, NodeProto, attribute_proto::AttributeType};
use super::tensor;
use crate::model::{Head, Tail, TailLayer};

/// Name of the logits output of exported models.
pub const LOGITS: &str = "logits";

/// An integer node attribute; the tail graph (`network::graph`) builds its nodes with it too.
pub(crate) fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

fn float_attribute(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

fn node(name: String, op: &str, inputs: Vec<String>, output: String, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: Some(name),
        op_type: Some(op.into()),
        input: inputs,
        output: vec![output],
        attribute,
        ..Default::default()
    }
}

/// Appends the tail and head to a trunk model whose output is `split`.
pub fn full_model(trunk: &ModelProto, split: &str, tail: &Tail, head: &Head) -> Result<ModelProto, String> {
    let mut model = trunk.clone();
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(0);
    let graph = model.graph.as_mut().ok_or("the trunk model has no graph")?;
    let mut current = split.to_string();
    for (index, layer) in tail.layers().iter().enumerate() {
        let prefix = format!("edgeadapt_tail_{index}");
        let output = format!("{prefix}_out");
        let mut weighted = |kind: &str, weight: ArrayD<f32>, bias: ArrayD<f32>, attributes: Vec<AttributeProto>| {
            let (w, b) = (format!("{prefix}_weight"), format!("{prefix}_bias"));
            graph.initializer.push(tensor::from_f32(&w, &weight));
            graph.initializer.push(tensor::from_f32(&b, &bias));
            node(prefix.clone(), kind, vec![current.clone(), w, b], output.clone(), attributes)
        };
        let new_node = match layer {
            TailLayer::Linear { weight, bias } => {
                weighted("Gemm", weight.clone().into_dyn(), bias.clone().into_dyn(), vec![int_attribute("transB", 1)])
            }
            TailLayer::Conv1x1 { weight, bias } => {
                let (out, inp) = weight.dim();
                let kernel =
                    weight.clone().into_shape_with_order(IxDyn(&[out, inp, 1, 1])).map_err(|e| e.to_string())?;
                weighted("Conv", kernel, bias.clone().into_dyn(), vec![])
            }
            TailLayer::Relu => node(prefix.clone(), "Relu", vec![current.clone()], output.clone(), vec![]),
            TailLayer::Relu6 if opset >= 11 => {
                let (lo, hi) = (format!("{prefix}_min"), format!("{prefix}_max"));
                graph.initializer.push(tensor::from_f32(&lo, &ArrayD::from_elem(IxDyn(&[]), 0.0)));
                graph.initializer.push(tensor::from_f32(&hi, &ArrayD::from_elem(IxDyn(&[]), 6.0)));
                node(prefix.clone(), "Clip", vec![current.clone(), lo, hi], output.clone(), vec![])
            }
            TailLayer::Relu6 => node(
                prefix.clone(),
                "Clip",
                vec![current.clone()],
                output.clone(),
                vec![float_attribute("min", 0.0), float_attribute("max", 6.0)],
            ),
            TailLayer::Sigmoid => node(prefix.clone(), "Sigmoid", vec![current.clone()], output.clone(), vec![]),
            TailLayer::Silu => {
                let gate = format!("{prefix}_gate");
                graph.node.push(node(
                    format!("{prefix}_sigmoid"),
                    "Sigmoid",
                    vec![current.clone()],
                    gate.clone(),
                    vec![],
                ));
                node(prefix.clone(), "Mul", vec![current.clone(), gate], output.clone(), vec![])
            }
            TailLayer::GlobalAvgPool => {
                node(prefix.clone(), "GlobalAveragePool", vec![current.clone()], output.clone(), vec![])
            }
            TailLayer::Flatten => {
                node(prefix.clone(), "Flatten", vec![current.clone()], output.clone(), vec![int_attribute("axis", 1)])
            }
        };
        graph.node.push(new_node);
        current = output;
    }
    graph.initializer.push(tensor::from_f32("edgeadapt_head_weight", &head.weight.clone().into_dyn()));
    graph.initializer.push(tensor::from_f32("edgeadapt_head_bias", &head.bias.clone().into_dyn()));
    graph.node.push(node(
        "edgeadapt_head".into(),
        "Gemm",
        vec![current, "edgeadapt_head_weight".into(), "edgeadapt_head_bias".into()],
        LOGITS.into(),
        vec![int_attribute("transB", 1)],
    ));
    graph.output = vec![float_value_info(LOGITS, Some(&[None, Some(head.num_classes() as i64)]))];
    graph.name = Some("edgeadapt".into());
    Ok(model)
}
