//! `import-onnx` and `export-onnx` on small classifiers committed as fixtures, checked against
//! values ONNX Runtime produced for the original models.

mod common;

use common::{array, fixture, json, max_abs_diff, run_onnx, shape};
use edgeadapt::inference::Classifier;
use edgeadapt::inference::import_check::import_onnx;
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::import::{ImportError, ImportOptions};
use edgeadapt::model::onnx::{decode_model, encode_model, export};
use edgeadapt::runtime::RuntimeOptions;
use ndarray::{ArrayD, Ix4};

const TOLERANCE: f32 = 1e-4;

fn expected(model: &str) -> serde_json::Value {
    json(&fixture("onnx/expected.json"))["models"][model].clone()
}

fn expected_input(model: &str) -> ArrayD<f32> {
    let entry = expected(model);
    array(&entry["input"], &shape(&entry["input_shape"]))
}

fn expected_output(model: &str, name: &str) -> ArrayD<f32> {
    let entry = &expected(model)["outputs"][name];
    array(&entry["data"], &shape(&entry["shape"]))
}

fn import(
    model: &str,
    features: &str,
    split: Option<&str>,
    out: &std::path::Path,
) -> Result<edgeadapt::model::onnx::import::ImportReport, ImportError> {
    let mut options = ImportOptions::new(fixture(&format!("onnx/{model}.onnx")), features, out);
    options.split = split.map(str::to_string);
    import_onnx(&options)
}

fn open(dir: &std::path::Path) -> Classifier {
    Classifier::open(Bundle::load(dir).expect("bundle loads"), &RuntimeOptions::default()).expect("classifier opens")
}

#[test]
fn a_cnn_with_a_1x1_conv_tail_imports_and_reproduces_the_original_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn");
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.split = Some("split".into());
    options.classes = Some(fixture("onnx/tiny_cnn.classes.txt"));
    let report = import_onnx(&options).expect("tiny_cnn imports");
    assert_eq!(report.tail, vec!["conv1x1", "relu6", "globalavgpool", "flatten", "linear", "relu"]);
    assert_eq!(report.split_shape, vec![4, 8, 8]);
    assert!(report.max_logit_diff < TOLERANCE, "import check: {}", report.max_logit_diff);

    let mut classifier = open(&out);
    assert_eq!(classifier.bundle.head.classes, vec!["cat", "dog", "bird"]);
    let input = expected_input("tiny_cnn").into_dimensionality::<Ix4>().unwrap();
    let split = classifier.split(input.view()).unwrap();
    assert!(max_abs_diff(&split, &expected_output("tiny_cnn", "split")) < TOLERANCE);
    let features = classifier.features_from_split(split.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&features, &expected_output("tiny_cnn", "features")) < TOLERANCE);
    let logits = classifier.logits(input.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&logits, &expected_output("tiny_cnn", "logits")) < TOLERANCE);
}

#[test]
fn matmul_add_layers_and_the_silu_pattern_import_from_an_mlp() {
    let dir = tempfile::tempdir().unwrap();
    let report = import("tiny_mlp", "features", Some("split"), &dir.path().join("mlp")).expect("tiny_mlp imports");
    assert_eq!(report.tail, vec!["linear", "silu"]);
    assert_eq!(report.input.channels, 1);
    let mut classifier = open(&dir.path().join("mlp"));
    let input = expected_input("tiny_mlp").into_dimensionality::<Ix4>().unwrap();
    let logits = classifier.logits(input.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&logits, &expected_output("tiny_mlp", "logits")) < TOLERANCE);
    assert_eq!(classifier.bundle.head.classes, vec!["0", "1", "2", "3"], "default class names are 0..C-1");
}

#[test]
fn without_a_split_the_deepest_supported_tail_starting_with_weights_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    // tiny_cnn: conv1 (3x3) -> relu1 -> split -> conv2 (1x1) ...: relu1 has no weights, so it
    // stays in the trunk and the tail starts at the 1x1 convolution.
    let report = import("tiny_cnn", "features", None, &dir.path().join("cnn")).unwrap();
    assert_eq!(report.split, "split");
    assert_eq!(report.tail, ["conv1x1", "relu6", "globalavgpool", "flatten", "linear", "relu"]);
    assert!(report.split_reason.as_deref().unwrap().contains("relu1 (Relu)"), "{:?}", report.split_reason);
    // tiny_mlp: Flatten -> MatMul+Add -> Sigmoid -> MatMul+Add -> SiLU: both linear layers train.
    let report = import("tiny_mlp", "features", None, &dir.path().join("mlp")).unwrap();
    assert_eq!(report.split, "pixels");
    assert_eq!(report.tail, ["linear", "sigmoid", "linear", "silu"]);
    let mut classifier = open(&dir.path().join("mlp"));
    let input = expected_input("tiny_mlp").into_dimensionality::<Ix4>().unwrap();
    let logits = classifier.logits(input.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&logits, &expected_output("tiny_mlp", "logits")) < TOLERANCE);
    // The unsupported Conv3x3 and Softmax before the features leave only fc1 for the tail.
    let report = import("tiny_unsupported", "features", None, &dir.path().join("unsupported")).unwrap();
    assert_eq!(report.tail, ["linear", "relu"]);
}

#[test]
fn naming_the_features_as_the_split_gives_an_empty_tail_and_a_trunk_that_ends_at_them() {
    let dir = tempfile::tempdir().unwrap();
    let report = import("tiny_cnn", "features", Some("features"), &dir.path().join("b")).unwrap();
    assert!(report.split_reason.is_none());
    assert!(report.tail.is_empty());
    assert_eq!(report.split_shape, vec![5]);
    let mut classifier = open(&dir.path().join("b"));
    let input = expected_input("tiny_cnn").into_dimensionality::<Ix4>().unwrap();
    let logits = classifier.logits(input.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&logits, &expected_output("tiny_cnn", "logits")) < TOLERANCE);
}

#[test]
fn unsupported_tail_nodes_are_all_listed_and_no_bundle_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    let error = import("tiny_unsupported", "features", Some("split"), &out).unwrap_err().to_string();
    assert!(error.contains("conv2 (Conv)") && error.contains("not 1x1"), "{error}");
    assert!(error.contains("softmax (Softmax)"), "{error}");
    assert!(!out.exists());
}

#[test]
fn two_linear_readers_of_the_features_need_the_head_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    let error = import("tiny_two_heads", "features", None, &out).unwrap_err().to_string();
    assert!(error.contains("head_a (Gemm)") && error.contains("head_b (Gemm)") && error.contains("--head"), "{error}");

    let mut options = ImportOptions::new(fixture("onnx/tiny_two_heads.onnx"), "features", &out);
    options.head = Some("head_b".into());
    import_onnx(&options).expect("naming the head disambiguates");
    let mut classifier = open(&out);
    let input = expected_input("tiny_two_heads").into_dimensionality::<Ix4>().unwrap();
    let logits = classifier.logits(input.view()).unwrap().into_dyn();
    assert!(max_abs_diff(&logits, &expected_output("tiny_two_heads", "logits_b")) < TOLERANCE);

    // The bundle just written is not replaced without being asked.
    let error = import_onnx(&options).unwrap_err().to_string();
    assert!(error.contains("already exists") && error.contains("--force"), "{error}");
    options.out = dir.path().join("c");
    options.head = Some("no_such_node".into());
    let error = import_onnx(&options).unwrap_err().to_string();
    assert!(error.contains("no_such_node"), "{error}");
    assert!(!options.out.exists(), "a failed import leaves nothing behind");
}

#[test]
fn bad_arguments_get_errors_that_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    let error = import("tiny_cnn", "no_such_tensor", None, &out).unwrap_err().to_string();
    assert!(error.contains("'no_such_tensor'"), "{error}");
    let error = import("tiny_cnn", "features", Some("nowhere"), &out).unwrap_err().to_string();
    assert!(error.contains("'nowhere'"), "{error}");

    let classes = dir.path().join("two.txt");
    std::fs::write(&classes, "cat\ndog\n").unwrap();
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.classes = Some(classes);
    let error = import_onnx(&options).unwrap_err().to_string();
    assert!(error.contains("two.txt") && error.contains("2 class names") && error.contains("3 outputs"), "{error}");

    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.mean = Some(vec![0.1, 0.2]);
    let error = import_onnx(&options).unwrap_err().to_string();
    assert!(error.contains("--mean"), "{error}");

    let not_onnx = dir.path().join("model.onnx");
    std::fs::write(&not_onnx, b"\xff\xff\xff not protobuf").unwrap();
    let error = import_onnx(&ImportOptions::new(&not_onnx, "features", &out)).unwrap_err().to_string();
    assert!(error.contains("not an ONNX model"), "{error}");
    assert!(!out.exists());
}

#[test]
fn an_exported_bundle_is_one_onnx_model_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn");
    import("tiny_cnn", "features", Some("split"), &out).unwrap();
    let bundle = Bundle::load(&out).unwrap();
    let trunk = decode_model(&std::fs::read(bundle.trunk_path()).unwrap()).unwrap();
    let full = export::full_model(&trunk, &bundle.manifest.trunk.output, &bundle.tail, &bundle.head).unwrap();
    let exported = dir.path().join("full.onnx");
    std::fs::write(&exported, encode_model(&full)).unwrap();
    let logits = run_onnx(&exported, "image", &expected_input("tiny_cnn"), export::LOGITS);
    assert!(max_abs_diff(&logits, &expected_output("tiny_cnn", "logits")) < TOLERANCE);
}
