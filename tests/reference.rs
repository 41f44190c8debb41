//! `edgeadapt add-reference` stores source split tensors in the bundle, verified on load.

mod common;

use std::process::Command;

use common::fixture;
use edgeadapt::imaging::{self, DecodeLimits};
use edgeadapt::inference::import_check::import_onnx;
use edgeadapt::inference::{Classifier, prepare_files};
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::import::ImportOptions;
use edgeadapt::runtime::RuntimeOptions;

#[test]
fn reference_samples_are_stored_as_f16_split_tensors_with_their_labels() {
    let dir = tempfile::tempdir().unwrap();
    let bundle_dir = dir.path().join("bundle");
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &bundle_dir);
    options.split = Some("split".into());
    options.classes = Some(fixture("onnx/tiny_cnn.classes.txt"));
    import_onnx(&options).unwrap();
    let data = dir.path().join("source");
    for (class, files) in [("cat", ["ok_gray.png", "ok_rgb.jpg"]), ("bird", ["ok_large.png", "ok_rgba.png"])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for (index, file) in files.iter().enumerate() {
            let extension = file.rsplit('.').next().unwrap();
            std::fs::copy(fixture(&format!("images/{file}")), data.join(class).join(format!("{index}.{extension}")))
                .unwrap();
        }
    }
    let output = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args([
            "add-reference",
            "--bundle",
            bundle_dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--per-class",
            "1",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let bundle = Bundle::load(&bundle_dir).expect("the rewritten bundle verifies");
    let (split, labels) = bundle.reference().unwrap().expect("reference present");
    assert_eq!(labels, vec![2, 0], "bird sorts before cat; one sample each");
    assert_eq!(split.shape(), &[2, 4, 8, 8]);

    let files = vec![data.join("bird/0.png"), data.join("cat/0.png")];
    let prepared = prepare_files(&files, &bundle.manifest.input, &DecodeLimits::default());
    let views: Vec<_> = prepared.iter().map(|p| p.as_ref().unwrap().view()).collect();
    let mut classifier = Classifier::open(bundle, &RuntimeOptions::default()).unwrap();
    let fresh = classifier.split(imaging::stack(&views).view()).unwrap();
    for (stored, computed) in split.iter().zip(fresh.iter()) {
        assert!((stored - computed).abs() <= 1e-3 * computed.abs().max(1.0), "f16 storage: {stored} vs {computed}");
    }
}
