//! The on-site workflow end to end against the real daemon: unlabelled traffic through the
//! watched folder, labels through `edgeadapt label`, `edgeadapt adapt`, held-out accuracy of the
//! promoted version against the source model, rollback to the source bit for bit, and a restart
//! that finds everything as it was.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{Daemon, free_port, http, write_config};
use common::{log_lines, repo, wait_until, wait_until_ok};
use edgeadapt::inference::{Classifier, Prediction, predict};
use edgeadapt::model::Bundle;
use edgeadapt::runtime::RuntimeOptions;

const SEEN: [&str; 8] = ["0", "2", "4", "6", "A", "C", "E", "G"];

fn fonts36() -> PathBuf {
    let root = repo().join("target/data/fonts36");
    assert!(root.is_dir(), "run tools/setup.sh first: {} is missing", root.display());
    root
}

/// Drops images into the watched folder (staged elsewhere and renamed in, as writers should)
/// under `<prefix>__<class>__<n>.png`, waits until all are classified and returns the
/// predictions from the classification log, keyed by class then file.
fn classify_through_folder(
    data_dir: &Path,
    images: &[(String, PathBuf)],
    prefix: &str,
) -> BTreeMap<String, Vec<(String, Prediction)>> {
    let stage = data_dir.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    let mut names = Vec::new();
    for (n, (class, path)) in images.iter().enumerate() {
        let name = format!("{prefix}__{class}__{n}.png");
        std::fs::copy(path, stage.join(&name)).unwrap();
        names.push(name);
    }
    for name in &names {
        std::fs::rename(stage.join(name), data_dir.join("watch").join(name)).unwrap();
    }
    let log = data_dir.join("classifications.jsonl");
    let what = format!("the {} '{prefix}' images to be classified", names.len());
    let lines = wait_until_ok(Duration::from_secs(120), &what, || {
        // Whole lines only: the agent may be writing the last one.
        let lines: Vec<serde_json::Value> = log_lines(&log, "")
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["file"].as_str().unwrap().starts_with(&format!("{prefix}__")))
            .collect();
        if lines.len() == names.len() { Ok(lines) } else { Err(format!("{} classified", lines.len())) }
    });
    let mut by_class: BTreeMap<String, Vec<(String, Prediction)>> = BTreeMap::new();
    for line in lines {
        let file = line["file"].as_str().unwrap().to_string();
        let class = file.split("__").nth(1).unwrap().to_string();
        let prediction: Prediction = serde_json::from_value(line["prediction"].clone()).unwrap();
        by_class.entry(class).or_default().push((file, prediction));
    }
    // In the order of the images given, not the order the agent happened to take them in.
    let index = |file: &str| file.rsplit("__").next().and_then(|n| n.strip_suffix(".png")?.parse::<usize>().ok());
    for predictions in by_class.values_mut() {
        predictions.sort_by_key(|(file, _)| index(file));
    }
    by_class
}

/// Accuracy (points) on the seen and on the unseen classes.
fn accuracy(results: &BTreeMap<String, Vec<(String, Prediction)>>) -> (f64, f64) {
    let mut counts = [(0usize, 0usize); 2];
    for (class, predictions) in results {
        let group = usize::from(!SEEN.contains(&class.as_str()));
        for (_, prediction) in predictions {
            counts[group].0 += usize::from(&prediction.class == class);
            counts[group].1 += 1;
        }
    }
    let points = |(correct, total): (usize, usize)| 100.0 * correct as f64 / total as f64;
    (points(counts[0]), points(counts[1]))
}

fn first_images(folder: &Path, classes: &[String], n: usize, skip: usize) -> Vec<(String, PathBuf)> {
    classes
        .iter()
        .flat_map(|class| (skip..skip + n).map(move |i| (class.clone(), folder.join(class).join(format!("{i}.png")))))
        .collect()
}

#[test]
fn label_adapt_check_rollback_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let log = dir.path().join("daemon.log");
    let data_dir = dir.path().join("data");
    let data = fonts36();
    let bundle = Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).unwrap();
    let classes = bundle.head.classes.clone();

    let daemon = Daemon::start(&config, port, &log);
    // Unlabelled local traffic: every class, labels unknown to the device.
    classify_through_folder(&data_dir, &first_images(&data.join("target/adapt"), &classes, 10, 0), "traffic");
    // On-site labelling of a few classes, through the running agent.
    for class in SEEN {
        let output = daemon.cli(&["label", data.join("target/adapt").join(class).to_str().unwrap(), "--class", class]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert!(String::from_utf8_lossy(&output.stdout).contains("60 stored, 0 refused"));
    }
    // A cancelled run changes nothing.
    let output = daemon.cli(&["adapt", "--no-wait"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = daemon.cli(&["adapt", "--cancel"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("run cancelled"));
    let agent = http();
    let state = wait_until(Duration::from_secs(60), "the cancelled run to end", || {
        let state: serde_json::Value =
            agent.get(daemon.url("/v1/adapt")).call().unwrap().body_mut().read_json().unwrap();
        state["running"].is_null().then_some(state)
    });
    assert!(state["last"]["Err"].as_str().unwrap().contains("cancelled"), "{state}");

    let output = daemon.cli(&["adapt"]);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("version 1 (recommended) promoted"), "{stdout}");

    // Held-out images the device never saw: the promoted version against the source model.
    let held_out = first_images(&data.join("target/test"), &classes, 15, 0);
    let adapted = classify_through_folder(&data_dir, &held_out, "adapted");
    let output = daemon.cli(&["rollback", "--to", "source"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let source = classify_through_folder(&data_dir, &held_out, "source");
    let (seen_adapted, unseen_adapted) = accuracy(&adapted);
    let (seen_source, unseen_source) = accuracy(&source);
    eprintln!("held out: seen {seen_source:.1} -> {seen_adapted:.1}, unseen {unseen_source:.1} -> {unseen_adapted:.1}");
    assert!(seen_adapted >= seen_source + 5.0, "seen {seen_source:.1} -> {seen_adapted:.1}");
    assert!(unseen_adapted >= unseen_source - 0.5, "unseen {unseen_source:.1} -> {unseen_adapted:.1}");

    // After the rollback the daemon's predictions are the bundle's, bit for bit.
    let mut fresh = Classifier::open(bundle, &RuntimeOptions::default()).unwrap();
    let files: Vec<PathBuf> = held_out.iter().map(|(_, p)| p.clone()).collect();
    let limits = edgeadapt::imaging::DecodeLimits::default();
    let inputs = edgeadapt::inference::prepare_files(&files, &fresh.bundle.manifest.input, &limits);
    let inputs: Vec<_> = inputs.into_iter().map(|i| i.unwrap()).collect();
    let batch = edgeadapt::imaging::stack(&inputs.iter().map(|i| i.view()).collect::<Vec<_>>());
    let expected = predict(fresh.logits(batch.view()).unwrap().view(), &fresh.bundle.head.classes, 3);
    let mut served: Vec<(usize, Prediction)> = source
        .values()
        .flatten()
        .map(|(file, p)| (file.rsplit("__").next().unwrap().trim_end_matches(".png").parse().unwrap(), p.clone()))
        .collect();
    served.sort_by_key(|(n, _)| *n);
    let served: Vec<Prediction> = served.into_iter().map(|(_, p)| p).collect();
    assert_eq!(served, expected);

    // The HTTP endpoint refuses bad requests with a reason and keeps running.
    let mut response = agent.post(daemon.url("/v1/label")).query("class", "no-such-class").send(&b"x"[..]).unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.body_mut().read_to_string().unwrap().contains("unknown class"));
    let response = agent.post(daemon.url("/v1/rollback")).query("to", "99").send_empty().unwrap();
    assert_eq!(response.status(), 404);
    let mut response = agent.post(daemon.url("/v1/classify")).send(&b"not an image"[..]).unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.body_mut().read_to_string().unwrap().contains("not a supported image"));

    // Serve the adapted version again, then restart: everything is as it was.
    assert!(daemon.cli(&["rollback", "--to", "1"]).status.success());
    let status_before: serde_json::Value = serde_json::from_slice(&daemon.cli(&["status", "--json"]).stdout).unwrap();
    daemon.stop();
    let daemon = Daemon::start(&config, port, &log);
    let status_after: serde_json::Value = serde_json::from_slice(&daemon.cli(&["status", "--json"]).stdout).unwrap();
    for key in ["serving", "versions", "samples", "last_run_ms", "new_labels_since_last_run"] {
        assert_eq!(status_after[key], status_before[key], "{key}");
    }
    assert_eq!(status_after["serving"], 1);
    let again = classify_through_folder(&data_dir, &held_out, "restarted");
    let strip = |r: &BTreeMap<String, Vec<(String, Prediction)>>| -> Vec<Prediction> {
        r.values().flatten().map(|(_, p)| p.clone()).collect()
    };
    // The same model: the same classes, and confidences equal up to the float rounding that
    // differs with how many images one folder poll batches together.
    let (again, adapted) = (strip(&again), strip(&adapted));
    assert_eq!(again.len(), adapted.len());
    for (after, before) in again.iter().zip(&adapted) {
        assert_eq!(after.class, before.class, "{after:?} vs {before:?}");
        assert!((after.confidence - before.confidence).abs() < 1e-4, "{after:?} vs {before:?}");
    }
    daemon.stop();
}

/// Unix only: the test listens to the daemon's systemd notifications.
#[cfg(unix)]
#[test]
fn the_policy_adapts_after_enough_new_labels() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "[adaptation]\nmethod = \"ft-tail+prior\"\nafter_new_labels = 40\n");
    // Housekeeping feeds the systemd watchdog once a second, each time just before it asks the
    // policy; the feeds show when the policy has been asked. Read at once, as systemd does: a
    // full queue (10 by default) would block the daemon's next feed.
    let notify = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let (notified, notifications) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buffer) {
            if notified.send(buffer[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let env = [("NOTIFY_SOCKET", notify.as_os_str()), ("WATCHDOG_USEC", OsStr::new("60000000"))];
    let daemon = Daemon::start_with_env(&config, port, &dir.path().join("daemon.log"), &env);
    let data = fonts36();
    let agent = http();
    for class in ["3", "K"] {
        for n in 0..20 {
            let bytes = std::fs::read(data.join("target/adapt").join(class).join(format!("{n}.png"))).unwrap();
            let response = agent.post(daemon.url("/v1/label")).query("class", class).send(bytes.as_slice()).unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    let status = wait_until_ok(Duration::from_secs(120), "a policy run to finish", || {
        let status: serde_json::Value =
            agent.get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap();
        let done = status["versions"].as_array().unwrap().len() == 2 && status["running"].is_null();
        if done { Ok(status) } else { Err(status.to_string()) }
    });
    assert_eq!(status["new_labels_since_last_run"], 0);
    let version = &status["versions"][1];
    assert_eq!(version["method"], "ft-tail+prior");
    // Without traffic the unseen-rate check is skipped, and says so.
    let skipped = version["metrics"]["gate_skipped"].as_array().unwrap();
    assert!(skipped.iter().any(|s| s.as_str().unwrap().contains("no unlabelled traffic")), "{version}");

    // No second run starts without new labels. Feeds queued behind this mark come from checks
    // that began after the run ended, and a feed follows the previous check's end: after two,
    // the policy has been asked at least once with no new labels.
    std::os::unix::net::UnixDatagram::unbound().unwrap().send_to(b"MARK", &notify).unwrap();
    let (mut marked, mut feeds) = (false, 0);
    wait_until(Duration::from_secs(30), "two watchdog feeds after the run", || {
        while let Ok(message) = notifications.try_recv() {
            marked |= message == b"MARK";
            feeds += usize::from(marked && message == b"WATCHDOG=1\n");
        }
        (feeds >= 2).then_some(())
    });
    let conn = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
    let runs: i64 =
        conn.query_row("SELECT COUNT(*) FROM events WHERE kind = 'adaptation.started'", [], |r| r.get(0)).unwrap();
    assert_eq!(runs, 1, "a run started without new labels");
    let status: serde_json::Value = agent.get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!(status["versions"].as_array().unwrap().len(), 2);
    assert!(status["running"].is_null(), "{status}");
    daemon.stop();
}

#[test]
fn sighup_reloads_what_can_change_and_names_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let hangup = || {
        let status = std::process::Command::new("kill").arg("-HUP").arg(daemon.child.id().to_string()).status();
        assert!(status.unwrap().success());
    };
    let reloads = || -> Vec<serde_json::Value> {
        let conn = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
        let mut statement =
            conn.prepare("SELECT payload FROM events WHERE kind = 'config.reloaded' ORDER BY id").unwrap();
        statement
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|p| serde_json::from_str(&p.unwrap()).unwrap())
            .collect()
    };
    // A broken file changes nothing and the agent stays up. The refusal is logged once the file
    // has been read, so from then on no reload can still be under way.
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{original}[gate]\nmax_seen_drop = 7\n")).unwrap();
    hangup();
    let log = dir.path().join("daemon.log");
    wait_until(Duration::from_secs(10), "the broken config to be refused in the log", || {
        log_lines(&log, "config not reloaded").into_iter().next()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("gate.max_seen_drop"), "the refusal names the key: {text}");
    assert!(reloads().is_empty());
    // A valid change: the gate applies at once, the watched folder's settings need a restart.
    std::fs::write(&config, original.replace("poll_ms = 50", "poll_ms = 60") + "[gate]\nmax_seen_drop = 0.1\n")
        .unwrap();
    hangup();
    let reloaded = wait_until(Duration::from_secs(10), "the valid config to be reloaded", || {
        Some(reloads()).filter(|r| !r.is_empty())
    });
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    assert_eq!(reloaded[0]["applied"], serde_json::json!(["gate"]));
    assert_eq!(reloaded[0]["needs_restart"], serde_json::json!(["watch"]));
    let status = http().get(daemon.url("/v1/status")).call().unwrap();
    assert_eq!(status.status(), 200);
    daemon.stop();
}
