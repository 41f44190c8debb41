//! A bundle whose files are corrupted, swapped, non-finite or of the wrong shape is refused
//! with a message naming the file (and tensor), before anything runs.

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use edgeadapt::inference::Classifier;
use edgeadapt::inference::import_check::import_onnx;
use edgeadapt::model::bundle::sha256_file;
use edgeadapt::model::onnx::import::ImportOptions;
use edgeadapt::model::tensors::{StoredAs, to_safetensors};
use edgeadapt::model::{Bundle, Manifest};
use edgeadapt::runtime::RuntimeOptions;
use ndarray::{Array1, Array2};

fn imported(dir: &Path) -> PathBuf {
    let out = dir.join("bundle");
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.split = Some("split".into());
    import_onnx(&options).expect("fixture imports");
    out
}

/// Rewrites the manifest through `edit`, keeping it otherwise valid.
fn edit_manifest(bundle: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = bundle.join("manifest.toml");
    let mut manifest = Manifest::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, manifest.to_toml()).unwrap();
}

/// Replaces a file and records its new checksum, as a careless (not malicious) edit would.
fn replace_with_checksum(bundle: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(bundle.join(file), bytes).unwrap();
    let sum = sha256_file(&bundle.join(file)).unwrap();
    edit_manifest(bundle, |m| {
        m.checksums.insert(file.to_string(), sum);
    });
}

fn load_error(bundle: &Path) -> String {
    Bundle::load(bundle).expect_err("the bundle must be refused").to_string()
}

#[test]
fn a_flipped_byte_in_any_file_is_a_checksum_error_naming_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    for file in ["trunk.onnx", "tail.safetensors", "head.safetensors"] {
        let path = bundle.join(file);
        let original = std::fs::read(&path).unwrap();
        let mut corrupted = original.clone();
        let middle = corrupted.len() / 2;
        corrupted[middle] ^= 0x40;
        std::fs::write(&path, &corrupted).unwrap();
        let error = load_error(&bundle);
        assert!(error.contains(file) && error.contains("checksum mismatch"), "{file}: {error}");
        std::fs::write(&path, &original).unwrap();
    }
    Bundle::load(&bundle).expect("restored bundle loads again");
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    std::fs::remove_file(bundle.join("head.safetensors")).unwrap();
    assert!(load_error(&bundle).contains("head.safetensors"));
}

#[test]
fn a_malformed_manifest_is_refused_with_the_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    let path = bundle.join("manifest.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace("channels = 3", "channels = \"three\"");
    std::fs::write(&path, text).unwrap();
    let error = load_error(&bundle);
    assert!(error.contains("manifest.toml") && error.contains("channels"), "{error}");
}

#[test]
fn head_weights_with_nan_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    let mut weight = Array2::<f32>::zeros((3, 5)).into_dyn();
    weight[[1, 2]] = f32::NAN;
    let bias = Array1::<f32>::zeros(3).into_dyn();
    let bytes = to_safetensors(&[("weight", &weight, StoredAs::F32), ("bias", &bias, StoredAs::F32)]).unwrap();
    replace_with_checksum(&bundle, "head.safetensors", &bytes);
    let error = load_error(&bundle);
    assert!(error.contains("head.safetensors") && error.contains("'weight'") && error.contains("NaN"), "{error}");
}

#[test]
fn head_weights_of_the_wrong_shape_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    let weight = Array2::<f32>::zeros((3, 7)).into_dyn();
    let bias = Array1::<f32>::zeros(3).into_dyn();
    let bytes = to_safetensors(&[("weight", &weight, StoredAs::F32), ("bias", &bias, StoredAs::F32)]).unwrap();
    replace_with_checksum(&bundle, "head.safetensors", &bytes);
    let error = load_error(&bundle);
    assert!(error.contains("7 features") && error.contains("produces 5"), "{error}");
}

#[test]
fn tail_weights_that_do_not_chain_are_refused_naming_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    let path = bundle.join("tail.safetensors");
    let file = edgeadapt::model::tensors::TensorFile::read(&path).unwrap();
    let mut tensors: Vec<(String, ndarray::ArrayD<f32>)> = file
        .names()
        .iter()
        .map(|n| (n.to_string(), file.finite(n, if n.ends_with("bias") { 1 } else { 2 }).unwrap()))
        .collect();
    for (name, tensor) in &mut tensors {
        if name == "tail.0.weight" {
            *tensor = Array2::<f32>::zeros((6, 9)).into_dyn();
        }
    }
    let refs: Vec<(&str, &ndarray::ArrayD<f32>, StoredAs)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t, StoredAs::F32)).collect();
    replace_with_checksum(&bundle, "tail.safetensors", &to_safetensors(&refs).unwrap());
    let error = load_error(&bundle);
    assert!(error.contains("tail layer 0") && error.contains("Conv1x1"), "{error}");
}

#[test]
fn a_trunk_without_the_declared_split_output_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    edit_manifest(&bundle, |m| m.trunk.output = "not_there".into());
    let bundle = Bundle::load(&bundle).expect("names are checked against the model, not the manifest");
    let error = Classifier::open(bundle, &RuntimeOptions::default()).err().expect("open must fail").to_string();
    assert!(error.contains("'not_there'") && error.contains("split"), "{error}");
}

#[test]
fn a_trunk_with_a_different_input_name_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = imported(dir.path());
    edit_manifest(&bundle, |m| m.input.tensor = "pixels".into());
    let error = Classifier::open(Bundle::load(&bundle).unwrap(), &RuntimeOptions::default()).err().unwrap().to_string();
    assert!(error.contains("input named 'pixels'") && error.contains("image"), "{error}");
}
