//! `fleet merge`: devices at one site that labelled different classes pool what they learned.
//! Their served versions' weights sets are averaged slot by slot (local SGD's averaging step,
//! across devices); the merge has seen every class any of them saw, so its unseen classes are
//! those none of them saw. Calibration (γ) is not averaged: each receiver recomputes it on its
//! own traffic (`recalibrate`), and judges the merge with its own gate like any adopted version.

use serde_json::{Value, json};

use crate::model::tensors::{StoredAs, TensorFile, to_safetensors};
use crate::protocol::messages::{TensorInfo, WEIGHTS_SCHEMA, WeightsManifest};

/// The merged weights set: its manifest (to travel as a transfer's `meta`) and its payload.
pub fn merge(sets: &[(WeightsManifest, Vec<u8>)]) -> Result<(WeightsManifest, Vec<u8>), String> {
    let (first, _) = sets.first().ok_or("no versions to merge")?;
    if sets.len() < 2 {
        return Err("a merge needs versions from at least two devices".into());
    }
    for (manifest, _) in sets {
        if manifest.bundle != first.bundle {
            return Err(format!(
                "{}@{} is for bundle {}, {}@{} for {}: only versions of one bundle can be merged",
                manifest.device, manifest.version, manifest.bundle, first.device, first.version, first.bundle
            ));
        }
        if manifest.version == 0 {
            return Err(format!("{} serves its source model: there is nothing of it to merge", manifest.device));
        }
        let names =
            |m: &WeightsManifest| m.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect::<Vec<_>>();
        if names(manifest) != names(first) || manifest.params["adapter_rank"] != first.params["adapter_rank"] {
            return Err(format!(
                "{}@{} ({}) and {}@{} ({}) changed different parts of the model, so their weights cannot be \
                 averaged; adapt them with the same method first",
                manifest.device, manifest.version, manifest.method, first.device, first.version, first.method
            ));
        }
    }
    let mut sums: Vec<(String, ndarray::ArrayD<f32>)> = Vec::new();
    for (manifest, payload) in sets {
        let what = format!("weights of {}@{}", manifest.device, manifest.version);
        let file = TensorFile::parse(&what, payload).map_err(|e| e.to_string())?;
        for (at, info) in manifest.tensors.iter().enumerate() {
            let value = file.finite(&info.name, info.shape.len()).map_err(|e| e.to_string())?;
            match sums.get_mut(at) {
                Some((_, sum)) => *sum += &value,
                None => sums.push((info.name.clone(), value)),
            }
        }
    }
    let n = sets.len() as f32;
    sums.iter_mut().for_each(|(_, sum)| sum.mapv_inplace(|v| v / n));
    let refs: Vec<(&str, &ndarray::ArrayD<f32>, StoredAs)> =
        sums.iter().map(|(name, sum)| (name.as_str(), sum, StoredAs::F16)).collect();
    let payload = to_safetensors(&refs)?;
    let unseen = unseen_by_all(sets)?;
    let from: Vec<String> = sets.iter().map(|(m, _)| format!("{}@{}", m.device, m.version)).collect();
    let params = json!({
        "seed": first.params["seed"],
        "gamma": 0.0,
        "unseen": unseen,
        "adapter_rank": first.params["adapter_rank"],
        "notes": [format!("the average of {}", from.join(", "))],
        "recalibrate": true,
    });
    let manifest = WeightsManifest {
        schema: WEIGHTS_SCHEMA.into(),
        device: from.join("+"),
        version: 0,
        parent: None,
        method: "merge".into(),
        bundle: first.bundle.clone(),
        dtype: "f16".into(),
        tensors: sums
            .iter()
            .map(|(name, sum)| TensorInfo { name: name.clone(), shape: sum.shape().to_vec() })
            .collect(),
        params,
        total_bytes: payload.len(),
        chunk_bytes: payload.len(),
        chunks: 1,
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&payload)),
    };
    Ok((manifest, payload))
}

/// The classes no device saw: the intersection of their unseen lists.
fn unseen_by_all(sets: &[(WeightsManifest, Vec<u8>)]) -> Result<Vec<String>, String> {
    let list = |m: &WeightsManifest| -> Result<Vec<String>, String> {
        m.params["unseen"]
            .as_array()
            .ok_or_else(|| format!("{}@{} lists no unseen classes", m.device, m.version))?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(String::from)
                    .ok_or_else(|| format!("{}@{}: a class that is not a name", m.device, m.version))
            })
            .collect()
    };
    let mut unseen = list(&sets[0].0)?;
    for (manifest, _) in &sets[1..] {
        let other = list(manifest)?;
        unseen.retain(|c| other.contains(c));
    }
    Ok(unseen)
}

/// Whether an adopted weights set asks the receiver to compute its own γ.
pub fn wants_recalibration(params: &Value) -> bool {
    params["recalibrate"] == true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(device: &str, value: f32, unseen: &[&str]) -> (WeightsManifest, Vec<u8>) {
        let array = ndarray::ArrayD::from_elem(vec![2, 2], value);
        let payload = to_safetensors(&[("slot.3", &array, StoredAs::F16)]).unwrap();
        let manifest = WeightsManifest {
            schema: WEIGHTS_SCHEMA.into(),
            device: device.into(),
            version: 2,
            parent: Some(1),
            method: "ft-tail".into(),
            bundle: "b@1".into(),
            dtype: "f16".into(),
            tensors: vec![TensorInfo { name: "slot.3".into(), shape: vec![2, 2] }],
            params: json!({ "seed": 1, "gamma": 0.7, "unseen": unseen, "adapter_rank": 0, "notes": [] }),
            total_bytes: payload.len(),
            chunk_bytes: payload.len(),
            chunks: 1,
            sha256: String::new(),
        };
        (manifest, payload)
    }

    #[test]
    fn versions_are_averaged_slot_by_slot_and_unseen_is_what_no_device_saw() {
        let (manifest, payload) =
            merge(&[set("a", 1.0, &["x", "y", "z"]), set("b", 2.0, &["y", "z"]), set("c", 3.0, &["x", "z"])]).unwrap();
        let file = TensorFile::parse("merged", &payload).unwrap();
        assert!(file.finite("slot.3", 2).unwrap().iter().all(|&v| v == 2.0));
        assert_eq!(manifest.params["unseen"], json!(["z"]));
        assert!(wants_recalibration(&manifest.params));
        assert_eq!(manifest.device, "a@2+b@2+c@2");
        crate::protocol::weights::matches_manifest(&payload, &manifest).unwrap();
    }

    #[test]
    fn versions_of_other_bundles_parts_or_the_source_are_refused() {
        let mut other_bundle = set("b", 2.0, &[]);
        other_bundle.0.bundle = "c@2".into();
        assert!(merge(&[set("a", 1.0, &[]), other_bundle]).unwrap_err().contains("one bundle"));
        let mut other_part = set("b", 2.0, &[]);
        other_part.0.tensors[0].name = "slot.5".into();
        assert!(merge(&[set("a", 1.0, &[]), other_part]).unwrap_err().contains("different parts"));
        let mut source = set("b", 2.0, &[]);
        source.0.version = 0;
        assert!(merge(&[set("a", 1.0, &[]), source]).unwrap_err().contains("source model"));
        assert!(merge(&[set("a", 1.0, &[])]).unwrap_err().contains("at least two"));
    }
}
