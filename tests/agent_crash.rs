//! Crash safety: the daemon is killed with SIGKILL again and again while labels arrive and while
//! a run trains. Every label it acknowledged must be in the store afterwards, no version may be
//! half-written, and the daemon must restart cleanly each time.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port, http, write_config};
use common::{repo, wait_until_ok};
use sha2::{Digest, Sha256};

fn label_images() -> Vec<(String, Vec<u8>)> {
    let root = repo().join("target/data/fonts36/target/adapt");
    assert!(root.is_dir(), "run tools/setup.sh first: {} is missing", root.display());
    let mut images = Vec::new();
    for class in ["1", "3", "5", "B", "D", "F"] {
        for n in 0..60 {
            images.push((class.to_string(), std::fs::read(root.join(class).join(format!("{n}.png"))).unwrap()));
        }
    }
    images
}

/// Posts labels one by one until `stop` or the last image; records the hash of every
/// acknowledged one. Fails when the agent answers nothing for a minute.
fn labeller(
    port: u16,
    images: Arc<Vec<(String, Vec<u8>)>>,
    next: Arc<Mutex<usize>>,
    acknowledged: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let agent = http();
        let mut answered = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let index = *next.lock().unwrap();
            let Some((class, bytes)) = images.get(index) else { return };
            let url = format!("http://127.0.0.1:{port}/v1/label");
            match agent.post(&url).query("class", class).send(bytes.as_slice()) {
                Ok(response) if response.status() == 200 || response.status() == 409 => {
                    // 409: stored before a crash whose answer never arrived; it is in the store.
                    if response.status() == 200 {
                        acknowledged.lock().unwrap().insert(hex::encode(Sha256::digest(bytes)));
                    }
                    *next.lock().unwrap() += 1;
                    answered = Instant::now();
                }
                Ok(response) => panic!("label refused: HTTP {}", response.status()),
                Err(error) => {
                    // Killed and not yet restarted: try again shortly.
                    let silent = answered.elapsed();
                    assert!(silent < Duration::from_secs(60), "the agent answered no label for {silent:?}: {error}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    })
}

/// Joins a labeller, failing with its own panic message.
fn join(worker: std::thread::JoinHandle<()>) {
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

fn stored_hashes(db: &PathBuf) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement = conn.prepare("SELECT sha256 FROM samples").unwrap();
    statement.query_map([], |row| row.get::<_, String>(0)).unwrap().map(|r| r.unwrap()).collect()
}

fn check_store(db: &PathBuf) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    let mut statement = conn.prepare("SELECT id, weights, weights_sha256 FROM versions WHERE id > 0").unwrap();
    let rows = statement
        .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, String>(2)?)))
        .unwrap();
    for row in rows {
        let (id, weights, sha) = row.unwrap();
        assert_eq!(hex::encode(Sha256::digest(&weights)), sha, "version {id} is damaged");
    }
}

#[test]
fn acknowledged_labels_and_versions_survive_repeated_kills() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let log = dir.path().join("daemon.log");
    let db = dir.path().join("data/store.db");
    let images = Arc::new(label_images());
    let next = Arc::new(Mutex::new(0));
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));

    // Kills during ingest, at different moments.
    for (cycle, delay_ms) in [150u64, 420, 60, 800, 230, 510].into_iter().enumerate() {
        let daemon = Daemon::start(&config, port, &log);
        let stop = Arc::new(AtomicBool::new(false));
        let worker = labeller(port, images.clone(), next.clone(), acknowledged.clone(), stop.clone());
        // The kill lands wherever ingest happens to be after this long.
        std::thread::sleep(Duration::from_millis(delay_ms));
        daemon.kill();
        stop.store(true, Ordering::SeqCst);
        join(worker);
        let stored = stored_hashes(&db);
        let missing: Vec<_> = acknowledged.lock().unwrap().difference(&stored).cloned().collect();
        assert!(missing.is_empty(), "cycle {cycle}: {} acknowledged labels lost", missing.len());
        check_store(&db);
    }
    let labelled = acknowledged.lock().unwrap().len();
    assert!(labelled > 20, "only {labelled} labels went through; the kills came too early to test anything");

    // Label the rest, then kill during a run, twice, at different points.
    let daemon = Daemon::start(&config, port, &log);
    let stop = Arc::new(AtomicBool::new(false));
    join(labeller(port, images.clone(), next.clone(), acknowledged.clone(), stop));
    let mut daemon = daemon;
    for fraction in [0.1, 0.6] {
        let agent = http();
        let response = agent.post(daemon.url("/v1/adapt")).send_empty().unwrap();
        assert_eq!(response.status(), 202);
        let what = format!("the run to pass {fraction} of its steps");
        wait_until_ok(Duration::from_secs(120), &what, || {
            let state: serde_json::Value =
                agent.get(daemon.url("/v1/adapt")).call().unwrap().body_mut().read_json().unwrap();
            let step = state["running"]["step"].as_f64().unwrap_or(0.0);
            let steps = state["running"]["steps"].as_f64().unwrap_or(1.0);
            assert!(state["running"].is_object(), "the run ended before the kill: {state}");
            if step / steps >= fraction { Ok(()) } else { Err(state.to_string()) }
        });
        daemon.kill();
        check_store(&db);
        daemon = Daemon::start(&config, port, &log);
        let status: serde_json::Value =
            http().get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap();
        assert_eq!(status["serving"], 0, "no version was finished, so the source is served");
        let conn = rusqlite::Connection::open(&db).unwrap();
        let last: String = conn
            .query_row("SELECT kind FROM events WHERE kind LIKE 'adaptation.%' ORDER BY id DESC LIMIT 1", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(last, "adaptation.interrupted");
    }
    // A run that is left alone finishes and is promoted.
    let output = daemon.cli(&["adapt"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    daemon.kill();
    check_store(&db);
    let daemon = Daemon::start(&config, port, &log);
    let status: serde_json::Value =
        http().get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!(status["serving"], 1);
    let stored = stored_hashes(&db);
    assert!(acknowledged.lock().unwrap().is_subset(&stored));
    assert_eq!(stored.len(), images.len());
    daemon.stop();
}
