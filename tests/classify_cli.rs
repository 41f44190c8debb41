//! `edgeadapt classify` through the real binary: every bad input gets its own error naming the
//! file, and the good images in the same batch are still classified.

mod common;

use std::process::Command;

use common::fixture;
use edgeadapt::inference::import_check::import_onnx;
use edgeadapt::model::onnx::import::ImportOptions;

fn tiny_bundle(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("bundle");
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.classes = Some(fixture("onnx/tiny_cnn.classes.txt"));
    import_onnx(&options).expect("fixture imports");
    out
}

fn classify(args: &[&str]) -> (i32, String, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_edgeadapt")).arg("classify").args(args).output().expect("binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn each_bad_image_is_reported_by_name_and_the_rest_of_the_batch_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(dir.path());
    let images = fixture("images");
    let names = [
        "ok_gray.png",
        "ok_rgb.jpg",
        "ok_rgba.png",
        "ok_gray16.png",
        "ok_large.png",
        "truncated.png",
        "not_an_image.png",
        "bomb.png",
        "empty.png",
    ];
    let paths: Vec<String> = names.iter().map(|n| images.join(n).display().to_string()).collect();
    let mut args = vec!["--bundle", bundle.to_str().unwrap(), "--json", "--batch", "4", "--top", "2"];
    args.extend(paths.iter().map(String::as_str));
    let (code, stdout, stderr) = classify(&args);
    assert_eq!(code, 2, "partial failure exits with 2; stderr: {stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    assert_eq!(lines.len(), names.len(), "one result per file, in order");
    let expected_errors = [
        ("truncated.png", "cannot decode"),
        ("not_an_image.png", "not a supported image"),
        ("bomb.png", "decompression bomb"),
        ("empty.png", "empty file"),
    ];
    for (name, line) in names.iter().zip(&lines) {
        assert!(line["file"].as_str().unwrap().ends_with(name));
        match expected_errors.iter().find(|(bad, _)| bad == name) {
            Some((_, reason)) => {
                let error = line["outcome"]["error"].as_str().unwrap_or_else(|| panic!("{name} must fail: {line}"));
                assert!(error.contains(name) && error.contains(reason), "{name}: {error}");
            }
            None => {
                let prediction = &line["outcome"]["prediction"];
                assert!(["cat", "dog", "bird"].contains(&prediction["class"].as_str().unwrap()), "{name}: {line}");
                assert_eq!(prediction["top"].as_array().unwrap().len(), 2);
            }
        }
    }
}

#[test]
fn folders_are_walked_and_a_table_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(dir.path());
    let folder = dir.path().join("imgs");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::copy(fixture("images/ok_gray.png"), folder.join("a.png")).unwrap();
    std::fs::copy(fixture("images/ok_rgb.jpg"), folder.join("sub/b.jpg")).unwrap();
    std::fs::write(folder.join("notes.txt"), "ignored: not an image name").unwrap();
    let (code, stdout, stderr) = classify(&["--bundle", bundle.to_str().unwrap(), folder.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("| file"), "{stdout}");
    assert!(stdout.contains("a.png") && stdout.contains("b.jpg") && !stdout.contains("notes.txt"), "{stdout}");
    assert!(stderr.contains("2 images, 0 failed; provider cpu, tail and head on cpu"), "{stderr}");
}

#[test]
fn a_missing_bundle_is_a_clear_error() {
    let (code, _, stderr) = classify(&["--bundle", "/nonexistent/bundle", "x.png"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/bundle/manifest.toml"), "{stderr}");
}
