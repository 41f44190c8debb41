//! `edgeadapt label` through the real binary: each problem is said once. A wrong `--class`
//! prints one line with the nearest class names (not one line per file listing every class), and
//! a refused file's path appears once in its message, here and in the agent's log.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, free_port, write_config};
use common::fixture;

fn label(config: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("--config")
        .arg(config)
        .arg("label")
        .args(args)
        .env("EDGEADAPT_LOG", "warn")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn stored_samples(config: &Path) -> usize {
    let output =
        Command::new(env!("CARGO_BIN_EXE_edgeadapt")).arg("--config").arg(config).args(["status", "--json"]).output();
    let status: serde_json::Value = serde_json::from_slice(&output.unwrap().stdout).expect("status prints JSON");
    status["samples"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|s| s.as_array().unwrap())
        .map(|n| n.as_u64().unwrap())
        .sum::<u64>() as usize
}

fn assert_wrong_class_said_once(code: i32, stdout: &str, stderr: &str) {
    assert_eq!(code, 1, "a wrong class is an error; stdout: {stdout} stderr: {stderr}");
    assert_eq!(stderr.matches("unknown class 'bolt'").count(), 1, "said once: {stderr}");
    assert!(stderr.contains("B, L, O, T"), "the nearest class names: {stderr}");
    assert!(!stderr.contains("0, 1, 2, 3"), "not every class: {stderr}");
    assert!(!stderr.contains(".png"), "no line per file: {stderr}");
}

#[test]
fn a_wrong_class_is_said_once_with_the_nearest_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let folder = common::fonts36_images("target/adapt/B", dir.path(), 5);
    let config = write_config(dir.path(), free_port(), "");
    let (code, stdout, stderr) = label(&config, &[folder.to_str().unwrap(), "--class", "bolt"]);
    assert_wrong_class_said_once(code, &stdout, &stderr);
    assert_eq!(stored_samples(&config), 0, "nothing stored");
}

#[test]
fn a_wrong_class_through_the_running_agent_is_said_once_and_refused_files_are_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let folder = common::fonts36_images("target/adapt/B", dir.path(), 5);
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let log = dir.path().join("agent.log");
    let daemon = Daemon::start(&config, port, &log);

    let (code, stdout, stderr) = label(&config, &[folder.to_str().unwrap(), "--class", "bolt"]);
    assert_wrong_class_said_once(code, &stdout, &stderr);

    let truncated = fixture("images/truncated.png");
    let text = fixture("images/not_an_image.png");
    let (code, _, stderr) = label(&config, &[truncated.to_str().unwrap(), text.to_str().unwrap(), "--class", "B"]);
    assert_eq!(code, 1, "{stderr}");
    for file in [&truncated, &text] {
        let name = file.display().to_string();
        let line = stderr.lines().find(|l| l.contains(&name)).unwrap_or_else(|| panic!("{name} named: {stderr}"));
        assert_eq!(line.matches(&name).count(), 1, "the path once: {line}");
    }

    // The agent's own log: a broken image in the watched folder and one in the inbox.
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("inbox/B")).unwrap();
    std::fs::copy(&truncated, data.join("watch/broken-watched.png")).unwrap();
    std::fs::copy(&truncated, data.join("inbox/B/broken-label.png")).unwrap();
    let settled = [data.join("classified/failed/broken-watched.png"), data.join("rejected/B/broken-label.png")];
    common::wait_until(Duration::from_secs(60), "the broken images to be moved aside", || {
        settled.iter().all(|p| p.exists()).then_some(())
    });
    daemon.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    for name in ["broken-watched.png", "broken-label.png"] {
        let line = log.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} in the log: {log}"));
        assert_eq!(line.matches(name).count(), 1, "the file once: {line}");
    }
}
