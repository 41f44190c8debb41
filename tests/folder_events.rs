//! The watched folder and the inbox react to file events: with the poll set to a minute, an
//! image renamed into the watched folder is classified, and one written into an inbox class
//! folder is labelled, long before the poll would have read them.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, free_port, http, write_config};
use common::{repo, wait_until};

#[test]
fn files_renamed_or_written_in_are_read_at_once_without_waiting_for_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let text = std::fs::read_to_string(&config).unwrap().replace("poll_ms = 50", "poll_ms = 60000");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start(&config, port, &log);
    if !common::log_lines(&log, "no file events").is_empty() {
        common::skipped("this file system gives no file events (inotify); the agent polls only");
        daemon.stop();
        return;
    }
    let data = dir.path().join("data");
    let image = repo().join("target/data/fonts36/target/test/A/0.png");
    // The poll's first tick reads the empty folders at start; the next is a minute on, so the
    // 20 s deadlines below are met only through file events.
    std::thread::sleep(Duration::from_millis(300));

    let staged = dir.path().join("staged.png");
    std::fs::copy(&image, &staged).unwrap();
    std::fs::rename(&staged, data.join("watch/frame.png")).unwrap();
    wait_until(Duration::from_secs(20), "the renamed-in image's result line", || {
        std::fs::read_to_string(data.join("classifications.jsonl")).ok().filter(|log| log.contains("frame.png"))
    });

    std::fs::create_dir_all(data.join("inbox/B")).unwrap();
    std::fs::copy(repo().join("target/data/fonts36/target/adapt/B/0.png"), data.join("inbox/B/b0.png")).unwrap();
    wait_until(Duration::from_secs(20), "the inbox image to be labelled", || {
        let status: serde_json::Value =
            http().get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap();
        status["samples"].get("B").cloned()
    });
    daemon.stop();
}
