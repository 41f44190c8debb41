//! The tail and head give the same logits in ONNX Runtime (on the CPU a session per version with
//! the parameters as constants; the inputs path GPUs take is run here too) and in Rust: on the
//! default bundle, on an imported model whose tail has two weighted layers, in fixed batches, and
//! after swapping in versions with an adapter and a calibration.

mod common;

use common::{fixture, repo};
use edgeadapt::inference::import_check::import_onnx;
use edgeadapt::inference::onnx_tail::{OnnxTail, ParamsAs};
use edgeadapt::inference::{Calibration, Classifier};
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::import::ImportOptions;
use edgeadapt::network::{Batch, Network};
use edgeadapt::runtime::{ProviderKind, RuntimeOptions, TailPlacement};
use ndarray::{Array2, ArrayD, IxDyn};

/// Both paths sum the same products in different orders (ONNX Runtime's blocked GEMM and
/// `matrixmultiply`): measured differences are below 1e-6.
const TOLERANCE: f32 = 1e-4;

fn open(bundle: &Bundle, tail: TailPlacement) -> Classifier {
    Classifier::open(bundle.clone(), &RuntimeOptions { tail, ..RuntimeOptions::default() }).expect("classifier opens")
}

/// Split tensors in a trunk's output range, deterministic.
fn splits(bundle: &Bundle, samples: usize, seed: u32) -> ArrayD<f32> {
    let shape: Vec<usize> =
        std::iter::once(samples).chain(bundle.manifest.trunk.output_shape.iter().copied()).collect();
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    ArrayD::from_shape_simple_fn(IxDyn(&shape), || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 10_000) as f32 / 10_000.0 * 3.0
    })
}

/// A version as adaptation makes one: every parameter moved, an adapter, a calibration.
fn adapted(source: &Network, classes: usize) -> (Network, Calibration) {
    let mut network = source.with_adapter(4, 7);
    for (slot, param) in network.params.iter_mut().enumerate() {
        let mut step = slot as f32;
        param.mapv_inplace(|v| {
            step += 0.37;
            v * 0.9 + 0.01 * step.sin()
        });
    }
    (network, Calibration { gamma: 1.5, unseen: (0..classes).step_by(3).collect() })
}

fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn assert_paths_agree(in_rust: &mut Classifier, in_onnx: &mut Classifier, what: &str) -> Array2<f32> {
    for samples in [1, 8, 32] {
        let split = splits(&in_rust.bundle, samples, samples as u32);
        let rust = in_rust.logits_from_split(split.view()).unwrap();
        let onnx = in_onnx.logits_from_split(split.view()).unwrap();
        let diff = max_diff(&rust, &onnx);
        assert!(diff < TOLERANCE, "{what}, batch {samples}: the paths differ by {diff}");
    }
    in_onnx.logits_from_split(splits(&in_onnx.bundle, 8, 99).view()).unwrap()
}

fn check_bundle(bundle: &Bundle) {
    let mut in_rust = open(bundle, TailPlacement::Rust);
    let mut in_onnx = open(bundle, TailPlacement::Onnx);
    assert_eq!(in_rust.tail_provider(), None);
    assert_eq!(in_onnx.tail_provider(), Some(ProviderKind::Cpu));
    let source_logits = assert_paths_agree(&mut in_rust, &mut in_onnx, "source");

    let (network, calibration) = adapted(in_rust.model().0, bundle.head.num_classes());
    in_rust.set_model(network.clone(), calibration.clone());
    in_onnx.set_model(network.clone(), calibration.clone());
    assert_eq!(in_onnx.tail_provider(), Some(ProviderKind::Cpu), "the adapted version runs in ONNX Runtime");
    let adapted_logits = assert_paths_agree(&mut in_rust, &mut in_onnx, "adapted version");
    assert!(max_diff(&adapted_logits, &source_logits) > 0.1, "the ONNX tail serves the new version, not the old");

    // A second version of the same structure: on the CPU a new session with its constants.
    let opened = in_onnx.tail_sessions_opened();
    let mut second = network.clone();
    second.params[network.head.1].mapv_inplace(|v| v + 0.5);
    in_rust.set_model(second.clone(), calibration.clone());
    in_onnx.set_model(second, calibration);
    assert_paths_agree(&mut in_rust, &mut in_onnx, "second version");
    assert_eq!(in_onnx.tail_sessions_opened(), opened + 1);

    // In fixed batches (as on GPU providers): the last part padded, its padding cut off.
    in_onnx.set_fixed_batch(Some(8));
    assert_paths_agree(&mut in_rust, &mut in_onnx, "fixed batches of 8");
    in_onnx.set_fixed_batch(None);

    // Back to the source: the kept session of the source's structure serves it again.
    let source = Network::from_bundle(bundle);
    in_rust.set_model(source.clone(), Calibration::default());
    in_onnx.set_model(source, Calibration::default());
    let back = assert_paths_agree(&mut in_rust, &mut in_onnx, "rolled back to the source");
    assert!(max_diff(&back, &source_logits) < TOLERANCE, "a rollback serves the source's logits again");
}

#[test]
fn the_default_bundle_gives_the_same_logits_on_both_paths_through_version_swaps() {
    check_bundle(&Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).expect("default bundle"));
}

#[test]
fn an_imported_model_with_two_weighted_tail_layers_gives_the_same_logits_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn");
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.split = Some("split".into());
    let report = import_onnx(&options).expect("tiny_cnn imports");
    assert_eq!(report.tail.iter().filter(|kind| ["conv1x1", "linear"].contains(&kind.as_str())).count(), 2);
    check_bundle(&Bundle::load(&out).expect("imported bundle"));
}

#[test]
fn images_classify_alike_on_both_paths() {
    let bundle = Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).expect("default bundle");
    let files = edgeadapt::inference::collect_image_files(&[fixture("default_model")]).unwrap();
    assert!(!files.is_empty());
    let limits = edgeadapt::imaging::DecodeLimits::default();
    let classify = |tail| {
        let mut classifier = open(&bundle, tail);
        classifier.classify_files(&files, 4, 3, &limits, |_| {}).unwrap()
    };
    for (rust, onnx) in classify(TailPlacement::Rust).iter().zip(classify(TailPlacement::Onnx)) {
        let (rust, onnx) = (rust.outcome.as_ref().unwrap(), onnx.outcome.as_ref().unwrap());
        assert_eq!(rust.class, onnx.class, "{}", onnx.class);
        assert!((rust.confidence - onnx.confidence).abs() < 1e-4);
    }
}

/// The parameters-as-inputs path that GPU providers take, run on the CPU: one session serves
/// every version of its structure by rebinding tensors.
#[test]
fn parameters_bound_as_inputs_serve_each_version_of_a_structure_in_one_session() {
    let bundle = Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).expect("default bundle");
    let source = Network::from_bundle(&bundle);
    let split_shape = bundle.manifest.trunk.output_shape.clone();
    let options = RuntimeOptions::default();
    let (version, _) = adapted(&source, bundle.head.num_classes());
    let mut tail =
        OnnxTail::open(&version, &split_shape, ProviderKind::Cpu, ParamsAs::Inputs, &options, &bundle.dir).unwrap();
    let structure = tail.structure().to_string();
    let mut second = version.clone();
    second.params[version.head.0].mapv_inplace(|v| -v);
    for network in [&version, &second, &version] {
        tail.bind(network).unwrap();
        for samples in [1, 8] {
            let split = splits(&bundle, samples, 7);
            let rust = network.logits(Batch::from_onnx(split.view()).unwrap());
            let diff = max_diff(&rust, &tail.logits(split.view()).unwrap());
            assert!(diff < TOLERANCE, "batch {samples}: the paths differ by {diff}");
        }
    }
    assert_eq!(tail.structure(), structure);
    let error = tail.bind(&source).unwrap_err();
    assert!(error.contains("not this tail session's"), "a network of another structure is refused: {error}");
}
