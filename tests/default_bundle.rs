//! The shipped default bundle: it verifies, and its Rust preprocessing + trunk + tail + head
//! reproduce the values the export script recorded with ONNX Runtime in Python.

mod common;

use common::{array, fixture, json, max_abs_diff, repo, run_onnx};
use edgeadapt::imaging::{self, DecodeLimits};
use edgeadapt::inference::Classifier;
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::{decode_model, encode_model, export};
use edgeadapt::runtime::{RuntimeOptions, TailPlacement};
use ndarray::{ArrayD, Axis, IxDyn};

const TOLERANCE: f32 = 1e-4;

fn default_bundle() -> Bundle {
    Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).expect("the default bundle verifies")
}

struct Recorded {
    file: String,
    split: ArrayD<f32>,
    features: ArrayD<f32>,
    logits: ArrayD<f32>,
}

fn recorded() -> Vec<Recorded> {
    let expected = json(&fixture("default_model/expected.json"));
    expected["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|image| {
            let split_shape: Vec<usize> = common::shape(&image["split_shape"]);
            Recorded {
                file: image["file"].as_str().unwrap().to_string(),
                split: array(&image["split"], &split_shape),
                features: array(&image["features"], &[1280]),
                logits: array(&image["logits"], &[36]),
            }
        })
        .collect()
}

/// Decodes and prepares the fixture images with the bundle's contract, as one batch.
fn fixture_batch(bundle: &Bundle, images: &[Recorded]) -> ndarray::Array4<f32> {
    let samples: Vec<_> = images
        .iter()
        .map(|r| {
            let image =
                imaging::decode_file(&fixture(&format!("default_model/{}", r.file)), &DecodeLimits::default()).unwrap();
            imaging::to_model_input(&image, &bundle.manifest.input)
        })
        .collect();
    imaging::stack(&samples.iter().map(|s| s.view()).collect::<Vec<_>>())
}

#[test]
fn the_default_bundle_describes_the_documented_model() {
    let bundle = default_bundle();
    let manifest = &bundle.manifest;
    assert_eq!((manifest.input.height, manifest.input.width, manifest.input.channels), (96, 96, 3));
    assert_eq!(manifest.trunk.output_shape, vec![320, 3, 3]);
    assert_eq!(bundle.tail.feature_dim(), 1280);
    assert_eq!(bundle.head.num_classes(), 36);
    assert_eq!(bundle.head.classes[10], "A");
    let (split, labels) = bundle.reference().unwrap().expect("reference samples ship with the bundle");
    assert_eq!(split.shape()[0], labels.len());
    assert!((0..36).all(|class| labels.contains(&class)), "every class has reference samples");
}

#[test]
fn preprocessing_and_inference_match_the_values_recorded_at_export() {
    let bundle = default_bundle();
    let images = recorded();
    let batch = fixture_batch(&bundle, &images);
    let mut classifier = Classifier::open(bundle, &RuntimeOptions::default()).unwrap();
    let split = classifier.split(batch.view()).unwrap();
    let features = classifier.features_from_split(split.view()).unwrap();
    let logits = classifier.logits_from_split(split.view()).unwrap();
    for (index, image) in images.iter().enumerate() {
        let sample_split = split.index_axis(Axis(0), index).to_owned();
        let sample_features = features.row(index).to_owned().into_dyn();
        let sample_logits = logits.row(index).to_owned().into_dyn();
        let diffs = [
            max_abs_diff(&sample_split, &image.split),
            max_abs_diff(&sample_features, &image.features),
            max_abs_diff(&sample_logits, &image.logits),
        ];
        assert!(diffs.iter().all(|d| *d < TOLERANCE), "{}: split/features/logits differ by {diffs:?}", image.file);
        let predicted = sample_logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let recorded = image.logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(predicted, recorded, "{}", image.file);
    }
}

#[test]
fn trunk_tail_and_head_equal_the_whole_model_run_as_one_onnx_session() {
    let bundle = default_bundle();
    let images = recorded();
    let batch = fixture_batch(&bundle, &images);
    let trunk = decode_model(&std::fs::read(bundle.trunk_path()).unwrap()).unwrap();
    let full = export::full_model(&trunk, &bundle.manifest.trunk.output, &bundle.tail, &bundle.head).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.onnx");
    std::fs::write(&path, encode_model(&full)).unwrap();
    let whole = run_onnx(&path, "image", &batch.clone().into_dyn(), export::LOGITS);
    let mut classifier = Classifier::open(bundle, &RuntimeOptions::default()).unwrap();
    let ours = classifier.logits(batch.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&ours, &whole) < TOLERANCE);
    let recorded = ArrayD::from_shape_vec(
        IxDyn(&[images.len(), 36]),
        images.iter().flat_map(|i| i.logits.iter().copied()).collect(),
    )
    .unwrap();
    assert!(max_abs_diff(&whole, &recorded) < TOLERANCE);
}

#[test]
fn large_batches_split_over_threads_in_rust_give_the_same_logits() {
    let bundle = default_bundle();
    let images = recorded();
    let batch = fixture_batch(&bundle, &images);
    let views: Vec<_> = (0..4).map(|_| batch.view()).collect();
    let big = ndarray::concatenate(Axis(0), &views).unwrap();
    let options = RuntimeOptions { tail: TailPlacement::Rust, ..RuntimeOptions::default() };
    let mut classifier = Classifier::open(bundle, &options).unwrap();
    let split = classifier.split(big.view()).unwrap();
    let together = classifier.logits_from_split(split.view()).unwrap();
    for (index, row) in together.axis_iter(Axis(0)).enumerate() {
        let single =
            classifier.logits_from_split(split.slice_axis(Axis(0), ndarray::Slice::from(index..index + 1))).unwrap();
        assert_eq!(row, single.row(0), "sample {index}");
    }
}
