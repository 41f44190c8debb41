//! Split tensors of an image folder, extracted once by the trunk and cached on disk (f16).

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use sha2::{Digest, Sha256};

use crate::adapt::data::SplitSet;
use crate::dataset::read_image_folder;
use crate::imaging::{self, DecodeLimits};
use crate::inference::{Classifier, prepare_files};
use crate::model::tensors::{StoredAs, TensorFile, to_safetensors};

/// Reads `<root>/<class>/<image>`, runs the trunk and returns the split tensors with labels.
/// Results are cached in `cache_dir` under a key made of the trunk's hash, the input contract
/// and every file's content.
pub fn folder_splits(
    classifier: &mut Classifier,
    root: &Path,
    cache_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<SplitSet> {
    let images = read_image_folder(root, &classifier.bundle.head.classes)?;
    let mut hasher = Sha256::new();
    hasher.update(classifier.bundle.trunk_sha256().as_bytes());
    hasher.update(toml::to_string(&classifier.bundle.manifest.input)?.as_bytes());
    for image in &images {
        hasher.update(image.path.strip_prefix(root).unwrap_or(&image.path).to_string_lossy().as_bytes());
        hasher.update(image.label.to_le_bytes());
        hasher.update(Sha256::digest(std::fs::read(&image.path)?));
    }
    let key = hex::encode(hasher.finalize());
    let cache_file = cache_dir.join(format!("splits-{}.safetensors", &key[..24]));
    if let Ok(cached) = read_cache(&cache_file, images.len()) {
        return Ok(cached);
    }
    let mut sets = Vec::new();
    let limits = DecodeLimits::default();
    for (done, chunk) in images.chunks(64).enumerate() {
        let files: Vec<PathBuf> = chunk.iter().map(|i| i.path.clone()).collect();
        let prepared = prepare_files(&files, &classifier.bundle.manifest.input, &limits);
        let tensors = prepared.into_iter().collect::<Result<Vec<_>, _>>()?;
        let batch = imaging::stack(&tensors.iter().map(|t| t.view()).collect::<Vec<_>>());
        let split = classifier.split(batch.view())?;
        sets.push(
            SplitSet::from_onnx(split.view(), chunk.iter().map(|i| i.label).collect()).map_err(anyhow::Error::msg)?,
        );
        progress((done * 64 + chunk.len()).min(images.len()), images.len());
    }
    let set = SplitSet::concat(&sets.iter().collect::<Vec<_>>());
    if let Err(error) = write_cache(&cache_file, &set) {
        tracing::warn!(file = %cache_file.display(), %error, "cannot cache split tensors");
    }
    Ok(set)
}

fn read_cache(file: &Path, expected: usize) -> anyhow::Result<SplitSet> {
    let tensors = TensorFile::read(file)?;
    let data = tensors.finite("split", 2)?;
    let labels = tensors.finite("labels", 1)?;
    let positions = tensors.finite("positions", 1)?;
    anyhow::ensure!(labels.len() == expected, "stale cache");
    let positions = positions[[0]] as usize;
    let data = data.into_dimensionality::<ndarray::Ix2>()?.mapv(half::f16::from_f32);
    Ok(SplitSet { data, positions, labels: labels.iter().map(|&l| l as usize).collect() })
}

fn write_cache(file: &Path, set: &SplitSet) -> anyhow::Result<()> {
    std::fs::create_dir_all(file.parent().unwrap_or(Path::new(".")))?;
    let data = set.data.mapv(|v| v.to_f32()).into_dyn();
    let labels = ArrayD::from_shape_vec(IxDyn(&[set.len()]), set.labels.iter().map(|&l| l as f32).collect())?;
    let positions = ArrayD::from_elem(IxDyn(&[1]), set.positions as f32);
    let bytes = to_safetensors(&[
        ("split", &data, StoredAs::F16),
        ("labels", &labels, StoredAs::F32),
        ("positions", &positions, StoredAs::F32),
    ])
    .map_err(anyhow::Error::msg)?;
    let partial = file.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(partial, file)?;
    Ok(())
}
