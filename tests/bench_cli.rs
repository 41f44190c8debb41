//! `edgeadapt bench` end to end on a small slice of fonts36: the JSON follows the documented
//! schema and the plot is written; `--label-budget` compares arrival order with the queue;
//! `--merge-devices` compares devices alone with their merge.

mod common;

use std::process::Command;

use common::repo;

#[test]
fn a_small_bench_writes_the_table_json_and_plot() {
    let fonts36 = repo().join("target/data/fonts36");
    assert!(fonts36.is_dir(), "run tools/setup.sh first: {} is missing", fonts36.display());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    for split in ["target/adapt", "target/test"] {
        for class in ["0", "1", "2", "A", "B", "C"] {
            let to = root.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for n in 0..4 {
                std::fs::copy(fonts36.join(split).join(class).join(format!("{n}.png")), to.join(format!("{n}.png")))
                    .unwrap();
            }
        }
    }
    // The bench reads every class folder present; the other 30 classes simply have no samples.
    let json = dir.path().join("bench.json");
    let plot = dir.path().join("bench.png");
    let output = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args([
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--seen",
            "0,A,B",
            "--methods",
            "source,ft-head,ft-tail+prior,recommended,recommended@true-share,oracle",
            "--traffic-unseen-share",
            "0.5",
        ])
        .args(["--seeds", "2", "--steps", "5", "--cache", dir.path().join("cache").to_str().unwrap()])
        .args(["--json", json.to_str().unwrap(), "--plot", plot.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("| method | overall |") && stdout.contains("| recommended |"), "{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["seen_classes"], serde_json::json!(["0", "A", "B"]));
    // 12 seen and 12 unseen images in target/adapt: resampled to half of each, all 24 kept.
    assert_eq!(report["traffic"]["true_unseen_share"], 0.5, "{}", report["traffic"]);
    assert_eq!(report["traffic"]["samples"], 24);
    let estimators: Vec<&str> =
        report["traffic"]["estimates"].as_array().unwrap().iter().map(|e| e["estimator"].as_str().unwrap()).collect();
    assert_eq!(estimators, ["count", "bbse", "em", "pu"]);
    assert!(stdout.contains("unseen share of the unlabelled traffic (24 samples): true 0.500; count "), "{stdout}");
    let given = report["methods"]["recommended@true-share"]["choices"][0].as_array().unwrap();
    assert!(given.iter().any(|c| c.as_str().unwrap().contains("unseen share 0.500 (given)")), "{given:?}");
    for method in ["source", "ft-head", "ft-tail+prior", "recommended", "recommended@true-share", "oracle"] {
        let entry = &report["methods"][method];
        for metric in ["overall", "seen", "unseen", "seconds"] {
            let per_seed = entry[metric]["per_seed"].as_array().unwrap_or_else(|| panic!("{method}.{metric}: {entry}"));
            assert_eq!(per_seed.len(), 2, "{method}.{metric}");
            let mean = entry[metric]["mean"].as_f64().unwrap();
            assert!(entry[metric]["std"].as_f64().unwrap() >= 0.0);
            if metric != "seconds" {
                assert!((0.0..=1.0).contains(&mean), "{method}.{metric} = {mean}");
            }
        }
        assert!(entry["unseen_estimate"]["predicted_unseen_rate"]["mean"].is_number(), "{method}");
    }
    // The source model's two seeds are identical: nothing trains.
    let source = &report["methods"]["source"]["overall"]["per_seed"];
    assert_eq!(source[0], source[1]);
    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG file");
    // The split tensors were cached: a second run reads them instead of running the trunk.
    assert!(std::fs::read_dir(dir.path().join("cache")).unwrap().count() >= 2);
}

/// A method that cannot run on a bundle (`ft-tail` on an empty tail) gets a row that says why;
/// the other rows are measured, and `recommended` trains a feature adapter instead.
#[test]
fn a_method_that_cannot_run_gets_a_row_with_the_reason_and_the_rest_are_measured() {
    let fonts36 = repo().join("target/data/fonts36");
    assert!(fonts36.is_dir(), "run tools/setup.sh first: {} is missing", fonts36.display());
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::tailless_bundle(dir.path());
    let root = dir.path().join("data");
    for split in ["target/adapt", "target/test"] {
        for (class, from) in [("cat", "0"), ("dog", "1"), ("bird", "2")] {
            let to = root.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for n in 0..6 {
                std::fs::copy(fonts36.join(split).join(from).join(format!("{n}.png")), to.join(format!("{n}.png")))
                    .unwrap();
            }
        }
    }
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args(["bench", "--bundle", bundle.to_str().unwrap(), "--data", root.to_str().unwrap()])
        .args(["--seen", "cat,dog", "--methods", "source,ft-tail+alg,adapter+alg,recommended"])
        .args(["--seeds", "1", "--steps", "5", "--cache", dir.path().join("cache").to_str().unwrap()])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let row = |name: &str| stdout.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or("").to_string();
    assert!(row("ft-tail+alg").contains("cannot run: nothing to train"), "{stdout}");
    for measured in ["source", "adapter+alg", "recommended"] {
        assert!(row(measured).contains(" ± "), "{measured}: {stdout}");
    }
    assert!(row("recommended").contains("adapter (no trainable tail)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["methods"]["ft-tail+alg"]["error"].as_str().unwrap().contains("nothing to train"));
    assert!(report["methods"]["recommended"]["error"].is_null());
}

#[test]
fn a_label_budget_bench_compares_arrival_order_with_the_queue_on_uneven_traffic() {
    let fonts36 = repo().join("target/data/fonts36");
    assert!(fonts36.is_dir(), "run tools/setup.sh first: {} is missing", fonts36.display());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    for split in ["target/adapt", "target/test"] {
        for class in ["0", "A", "B"] {
            let to = root.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for n in 0..4 {
                std::fs::copy(fonts36.join(split).join(class).join(format!("{n}.png")), to.join(format!("{n}.png")))
                    .unwrap();
            }
        }
    }
    let bench = |skew: &str| {
        Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .args(["bench", "--data", root.to_str().unwrap(), "--seen", "0,A,B", "--label-budget", "6"])
            .args(["--min-samples", "2", &format!("--traffic-skew={skew}"), "--seeds", "1", "--steps", "5"])
            .args(["--cache", dir.path().join("cache").to_str().unwrap()])
            .output()
            .unwrap()
    };
    let output = bench("1");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // Zipf with exponent 1 over 4 images a class: 4, then ceil(4/2) = 2, then ceil(4/3) = 2.
    assert!(stdout.contains("site traffic: 8 images (skew 1); 6 labels; a class takes part with 2 labels"), "{stdout}");
    assert!(stdout.contains("| arrival |") && stdout.contains("| queue |"), "{stdout}");

    let refused = bench("-0.5");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--traffic-skew must be a number ≥ 0, not -0.5"), "{stderr}");
}

#[test]
fn a_merge_bench_compares_devices_alone_their_merge_and_all_labels() {
    let fonts36 = repo().join("target/data/fonts36");
    assert!(fonts36.is_dir(), "run tools/setup.sh first: {} is missing", fonts36.display());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    for split in ["target/adapt", "target/test"] {
        for class in ["0", "1", "A", "B", "C"] {
            let to = root.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for n in 0..4 {
                std::fs::copy(fonts36.join(split).join(class).join(format!("{n}.png")), to.join(format!("{n}.png")))
                    .unwrap();
            }
        }
    }
    let bench = |devices: &str| {
        Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .args(["bench", "--data", root.to_str().unwrap(), "--seen", "0,1,A,B", "--merge-devices", devices])
            .args(["--seeds", "1", "--steps", "5", "--cache", dir.path().join("cache").to_str().unwrap()])
            .output()
            .unwrap()
    };
    let output = bench("2");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("2 devices, 2 classes each (disjoint)"), "{stdout}");
    for row in [
        "| device 1 alone | 0,A |",
        "| device 2 alone | 1,B |",
        "| merge | 0,1,A,B |",
        "| one device with all labels |",
    ] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
    let refused = bench("3");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least 2 per device"));
}
