//! Rebuilds a standalone bundle from a device's published weights: the source bundle with the
//! adapted tail and head, and the unseen-class calibration folded into the head bias (adding γ
//! to those classes' biases is exactly what the device does to their logits).

use std::path::Path;

use ndarray::ArrayD;

use crate::model::Bundle;
use crate::model::manifest::TailLayerKind;
use crate::model::tensors::{StoredAs, TensorFile, to_safetensors};
use crate::network::Network;
use crate::protocol::messages::WeightsManifest;

pub fn bundle_from_weights(
    source: &Bundle,
    manifest: &WeightsManifest,
    payload: &[u8],
    out: &Path,
    overwrite: crate::output::Overwrite,
) -> Result<(), String> {
    let expected = source.id();
    if !source.is_named(&manifest.bundle) {
        return Err(format!(
            "the weights are for bundle {}, but {} is {expected}",
            manifest.bundle,
            source.dir.display()
        ));
    }
    let adapter_rank = manifest.params["adapter_rank"].as_u64().unwrap_or(0) as usize;
    if adapter_rank > 0 {
        return Err(format!(
            "version {} has a feature adapter (rank {adapter_rank}), which the bundle format cannot hold; \
             serve it through the agent instead",
            manifest.version
        ));
    }
    let what = format!("weights of version {}", manifest.version);
    let network = crate::network::weights::decode(payload, &Network::from_bundle(source), 0, &what)?;
    let gamma = manifest.params["gamma"].as_f64().unwrap_or(0.0) as f32;
    let unseen: Vec<usize> = manifest.params["unseen"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str())
                .map(|n| source.head.classes.iter().position(|c| c == n).ok_or(format!("unknown class '{n}'")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();

    // Slots come in the network's order: each weighted tail layer's weight and bias, then the head.
    let mut slots = network.params.iter();
    let mut replaced: std::collections::BTreeMap<String, Vec<(String, ArrayD<f32>)>> = Default::default();
    for spec in &source.manifest.tail {
        if matches!(spec.kind, TailLayerKind::Linear | TailLayerKind::Conv1x1) {
            let file = spec.weights.clone().expect("validated bundles name the file");
            let weight = slots.next().ok_or("too few parameters for the tail")?.clone();
            let bias = slots.next().ok_or("too few parameters for the tail")?.clone();
            let entry = replaced.entry(file).or_default();
            entry.push((spec.weight.clone().expect("validated"), weight));
            entry.push((spec.bias.clone().expect("validated"), bias));
        }
    }
    let head_weight = network.params[network.head.0].clone();
    let mut head_bias = network.params[network.head.1].clone();
    for &class in &unseen {
        head_bias[[class]] += gamma;
    }
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for file in source.manifest.referenced_files() {
        let original =
            std::fs::read(source.dir.join(file)).map_err(|e| format!("{}: {e}", source.dir.join(file).display()))?;
        let bytes = if let Some(tensors) = replaced.get(file) {
            let existing = TensorFile::parse(file, &original).map_err(|e| e.to_string())?;
            let mut all: Vec<(String, ArrayD<f32>)> = Vec::new();
            for name in existing.names() {
                let value = match tensors.iter().find(|(n, _)| n == name) {
                    Some((_, v)) => v.clone(),
                    None => {
                        existing.finite(name, existing.shape(name).map_or(0, |s| s.len())).map_err(|e| e.to_string())?
                    }
                };
                all.push((name.to_string(), value));
            }
            let refs: Vec<(&str, &ArrayD<f32>, StoredAs)> =
                all.iter().map(|(n, v)| (n.as_str(), v, StoredAs::F32)).collect();
            to_safetensors(&refs)?
        } else if file == source.manifest.head.file {
            to_safetensors(&[("weight", &head_weight, StoredAs::F32), ("bias", &head_bias, StoredAs::F32)])?
        } else {
            original
        };
        files.push((file.to_string(), bytes));
    }
    let mut new_manifest = source.manifest.clone();
    new_manifest.name = format!("{}-{}-v{}", source.manifest.name, manifest.device, manifest.version);
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    Bundle::write(out, new_manifest, &refs, overwrite).map_err(|e| e.to_string())
}
