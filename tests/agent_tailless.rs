//! The agent adapts a bundle without a trainable tail (an imported model split at its features):
//! `recommended` trains a feature adapter, the run is promoted or rejected by the gate like any
//! other, and a promoted version (whose weights include the adapter) is served again, with the
//! same predictions, after the agent is reopened.

mod common;

use std::path::Path;

use common::repo;
use edgeadapt::agent::Agent;
use edgeadapt::config::DeviceConfig;
use edgeadapt::inference::Prediction;
use edgeadapt::protocol::VersionRef;
use edgeadapt::store::VersionStatus;

/// A config with the given `[labelling]` and `[gate]` keys; the method is the default
/// (`recommended`).
fn config(bundle: &Path, data_dir: &Path, validation_every: usize, gate: &str) -> DeviceConfig {
    let text = format!(
        "device_id = \"tailless-test\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n[labelling]\nvalidation_every = \
         {validation_every}\n[gate]\n{gate}\n",
        bundle.display(),
        data_dir.display()
    );
    DeviceConfig::parse(&text, Path::new(".")).unwrap()
}

/// `(class, file name, bytes)`: `n` fonts36 images of digit `from` for each `(class, from)`.
fn images(split: &str, classes: &[(&str, &str)], n: usize) -> Vec<(String, String, Vec<u8>)> {
    let root = repo().join("target/data/fonts36").join(split);
    assert!(root.is_dir(), "run tools/setup.sh first: {} is missing", root.display());
    let mut out = Vec::new();
    for (class, from) in classes {
        for i in 0..n {
            let path = root.join(from).join(format!("{i}.png"));
            out.push((class.to_string(), path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Top-3 of 3 classes: the whole probability vector, so equal predictions mean equal logits up to
/// a shift.
fn classify(agent: &mut Agent, set: &[(String, String, Vec<u8>)]) -> Vec<Prediction> {
    let refs: Vec<(&str, &[u8])> = set.iter().map(|(_, what, bytes)| (what.as_str(), bytes.as_slice())).collect();
    agent.classify(&refs, 3).into_iter().map(|r| r.unwrap()).collect()
}

const SEEN: [(&str, &str); 2] = [("cat", "0"), ("dog", "1")];
const ALL: [(&str, &str); 3] = [("cat", "0"), ("dog", "1"), ("bird", "2")];

/// The stored record says the run trained an adapter: a rank in its parameters, the note in its
/// notes.
fn assert_adapter_recorded(agent: &mut Agent, id: i64) {
    let record = agent.store().version(id).unwrap();
    assert_eq!(record.method, "recommended");
    assert!(record.params["adapter_rank"].as_u64().unwrap() > 0, "{}", record.params);
    let notes: Vec<&str> = record.params["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(notes.contains(&"adapter (no trainable tail)"), "{notes:?}");
    assert!(record.weights.is_some_and(|w| !w.is_empty()));
}

#[test]
fn a_tailless_bundle_adapts_with_an_adapter_is_promoted_and_served_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::tailless_bundle(dir.path());
    // Every 2nd sample validates; the gate is loose so that a poor but finite result promotes.
    let gate = "max_seen_drop = 1.0\nmax_unseen_rate_drop = 1.0\nmax_reference_drop = 1.0";
    let config = config(&bundle, &dir.path().join("data"), 2, gate);
    let mut agent = Agent::open(&config).unwrap();
    assert_eq!(agent.classes(), ["cat", "dog", "bird"]);
    common::ingest_all(&mut agent, &images("target/adapt", &SEEN, 8));
    // Unlabelled traffic of every class, so the unseen-rate check has data.
    classify(&mut agent, &images("target/adapt", &ALL, 20)[..]);
    let probe = images("target/test", &ALL, 4);
    let before = classify(&mut agent, &probe);

    let mut steps = 0;
    let summary = agent.adapt_now(None, false, &mut |_, planned| steps = planned).unwrap();
    assert!(steps > 0, "the run reported its progress");
    assert_eq!(summary.method, "recommended");
    assert!(summary.promoted, "{summary:?}");
    assert!(summary.reasons.is_empty(), "{:?}", summary.reasons);
    assert!(summary.metrics["gate"]["seen_validation"].is_array(), "{}", summary.metrics);
    assert!(summary.metrics["gate"]["unseen_rate"].is_array(), "{}", summary.metrics);
    assert_eq!(agent.serving(), summary.version);
    assert_adapter_recorded(&mut agent, summary.version);
    let adapted = classify(&mut agent, &probe);
    assert_ne!(adapted, before, "the adapter changes what the served version predicts");
    let events = agent.store().recent_events(1).unwrap();
    assert_eq!(events[0].kind, "version.promoted");

    // Reopened, the agent rebuilds the adapter from the stored rank and serves the same version.
    drop(agent);
    let mut agent = Agent::open(&config).unwrap();
    assert_eq!(agent.serving(), summary.version);
    let events = agent.store().recent_events(5).unwrap();
    assert!(!events.iter().any(|e| e.kind == "version.load_failed"), "{events:?}");
    assert_eq!(classify(&mut agent, &probe), adapted);
    let status = agent.status().unwrap();
    assert_eq!(status.serving, summary.version);
    let version = status.versions.iter().find(|v| v.id == summary.version).unwrap();
    assert_eq!(version.status, VersionStatus::Promoted);
    assert_eq!(agent.new_labels().unwrap(), 0);

    // Rollback to the source drops the adapter; forward again restores it.
    agent.rollback(VersionRef::Source).unwrap();
    assert_eq!(classify(&mut agent, &probe), before);
    agent.rollback(VersionRef::Id(summary.version)).unwrap();
    assert_eq!(classify(&mut agent, &probe), adapted);
}

#[test]
fn a_tailless_run_without_validation_samples_is_rejected_and_the_source_stays_served() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::tailless_bundle(dir.path());
    // With every 20th sample held out (the 10th, 30th, ...) and 8 per class, none validates: the
    // gate rejects whatever the run produced, with that reason.
    let config = config(&bundle, &dir.path().join("data"), 20, "");
    let mut agent = Agent::open(&config).unwrap();
    common::ingest_all(&mut agent, &images("target/adapt", &SEEN, 8));
    let probe = images("target/test", &ALL, 4);
    let before = classify(&mut agent, &probe);

    let summary = agent.adapt_now(None, false, &mut |_, _| {}).unwrap();
    assert!(!summary.promoted, "{summary:?}");
    assert!(summary.reasons.iter().any(|r| r.contains("no validation samples")), "{:?}", summary.reasons);
    assert_eq!(agent.serving(), 0);
    assert_adapter_recorded(&mut agent, summary.version);
    assert_eq!(agent.store().version(summary.version).unwrap().status, VersionStatus::Rejected);
    assert_eq!(classify(&mut agent, &probe), before);
    let error = agent.rollback(VersionRef::Id(summary.version)).unwrap_err();
    assert!(error.to_string().contains("rejected"), "{error}");

    drop(agent);
    let mut agent = Agent::open(&config).unwrap();
    assert_eq!(agent.serving(), 0);
    assert_eq!(classify(&mut agent, &probe), before);
}
