//! Source reference samples: split tensors of a few source-domain images per class, shipped in
//! the bundle so that a device can estimate unseen-class health without unseen labels.

use ndarray::{ArrayD, Axis, IxDyn};

use super::bundle::{Bundle, BundleError};
use super::manifest::ReferenceSpec;
use super::tensors::{StoredAs, to_safetensors};

pub const REFERENCE_FILE: &str = "reference.safetensors";

/// Rewrites the bundle with `split` (`[n, ...]`, stored as f16) and `labels` (class indices,
/// stored as f32) as its reference set. Every other file is kept byte for byte.
pub fn write_reference(
    bundle: &Bundle,
    split: &ArrayD<f32>,
    labels: &[usize],
    description: &str,
) -> Result<(), BundleError> {
    let invalid = |problem: String| BundleError::Weights { path: bundle.dir.join(REFERENCE_FILE), problem };
    if split.shape().first() != Some(&labels.len()) || split.shape()[1..] != bundle.manifest.trunk.output_shape[..] {
        return Err(invalid(format!(
            "split tensors of shape {:?} do not match {} labels of per-sample shape {:?}",
            split.shape(),
            labels.len(),
            bundle.manifest.trunk.output_shape
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l >= bundle.head.num_classes()) {
        return Err(invalid(format!("label {bad} is not a class index")));
    }
    let labels = ArrayD::from_shape_vec(IxDyn(&[labels.len()]), labels.iter().map(|&l| l as f32).collect())
        .expect("one value per label");
    let bytes =
        to_safetensors(&[("split", split, StoredAs::F16), ("labels", &labels, StoredAs::F32)]).map_err(invalid)?;

    let mut manifest = bundle.manifest.clone();
    manifest.reference = Some(ReferenceSpec { file: REFERENCE_FILE.into(), description: description.into() });
    let mut contents = Vec::new();
    for file in bundle.manifest.referenced_files() {
        if file != REFERENCE_FILE {
            let path = bundle.dir.join(file);
            contents.push((file.to_string(), std::fs::read(&path).map_err(|source| BundleError::Io { path, source })?));
        }
    }
    contents.push((REFERENCE_FILE.to_string(), bytes));
    let files: Vec<(&str, &[u8])> = contents.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    // Adding references updates the bundle in place, as the command says.
    Bundle::write(&bundle.dir, manifest, &files, crate::output::Overwrite::Replace)
}

/// Concatenates per-batch split tensors along the batch axis.
pub fn concatenate(batches: &[ArrayD<f32>]) -> ArrayD<f32> {
    let views: Vec<_> = batches.iter().map(|b| b.view()).collect();
    ndarray::concatenate(Axis(0), &views).expect("batches of one trunk share a shape")
}
