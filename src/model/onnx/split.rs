//! Where `import-onnx` splits a model when `--split` is not given: walking back from the
//! features through the chain of supported tail layers.

use super::graph::{GraphIndex, MatchedLayer, describe_node, match_tail};
use super::proto::NodeProto;

/// The split `import-onnx` takes when none is named, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitChoice {
    pub tensor: String,
    pub layers: Vec<MatchedLayer>,
    pub reason: String,
}

/// Chooses the split: the deepest tensor from which every node up to `features` is a supported
/// tail layer and whose first layer is trainable (linear or 1x1 convolution), so that the last
/// hidden layers adapt. Leading activations and pooling stay in the trunk, where they cost
/// nothing to cache. Without such a tensor the tail is empty (the split is the features).
pub fn choose_split(index: &GraphIndex<'_>, features: &str) -> SplitChoice {
    let mut best: Option<(String, Vec<MatchedLayer>)> = None;
    let mut current = features.to_string();
    let mut stop = String::new();
    for _ in 0..=index.node_count() {
        let Some(producer) = index.producer(&current) else {
            stop = format!("'{current}' is the model's input");
            break;
        };
        let node = index.node(producer);
        let Some(previous) = previous_in_chain(index, node) else {
            stop = format!("{} reads more than one tensor", describe_node(node));
            break;
        };
        if let Ok(layers) = match_tail(index, &previous, features)
            && layers.first().is_some_and(|l| l.layer.is_trainable())
            && index.producer(&previous).is_some()
        {
            best = Some((previous.clone(), layers));
        }
        current = previous;
    }
    match best {
        Some((tensor, layers)) => {
            let trainable = layers.iter().filter(|l| l.layer.is_trainable()).count();
            let before = index.producer(&tensor).map(|p| describe_node(index.node(p))).unwrap_or_default();
            SplitChoice {
                reason: format!(
                    "the deepest tensor from which every layer up to '{features}' is one the tail supports and the first has weights ({trainable} of {} layers trainable); it is computed by {before}",
                    layers.len()
                ),
                tensor,
                layers,
            }
        }
        None => SplitChoice {
            reason: format!(
                "no linear or 1x1 convolution layer precedes '{features}' through supported layers only ({stop}); the tail is empty and adaptation trains a feature adapter"
            ),
            tensor: features.to_string(),
            layers: Vec::new(),
        },
    }
}

/// The one tensor `node` computes from (its non-constant input); for the SiLU pattern's `Mul`,
/// the tensor the `Sigmoid` also reads. `None` where the node joins several tensors.
fn previous_in_chain(index: &GraphIndex<'_>, node: &NodeProto) -> Option<String> {
    let inputs: Vec<&String> = node.input.iter().filter(|i| !i.is_empty() && !index.is_constant(i)).collect();
    match inputs.as_slice() {
        [single] => Some((*single).clone()),
        [a, b] if node.op_type.as_deref() == Some("Mul") => {
            let gated_by = |gate: &str, other: &str| {
                index.producer(gate).map(|p| index.node(p)).is_some_and(|p| {
                    p.op_type.as_deref() == Some("Sigmoid") && p.input.first().map(String::as_str) == Some(other)
                })
            };
            if gated_by(b, a) {
                Some((*a).clone())
            } else if gated_by(a, b) {
                Some((*b).clone())
            } else {
                None
            }
        }
        _ => None,
    }
}
