//! A closed stdout or stderr ends a command as it ends Unix tools (`edgeadapt classify --json DIR
//! 2>&1 | head -1`): soon, by SIGPIPE, with no panic message; it never hangs.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{free_port, write_config};
use common::repo;

fn edgeadapt() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgeadapt"));
    command.env("EDGEADAPT_LOG", "info").stdin(Stdio::null());
    command
}

/// Waits for the child to exit, or kills it and fails after `limit`.
fn exit_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?} after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects a child's stderr on a thread (so that a full pipe never blocks it).
fn collect(mut stderr: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
}

fn assert_ended_by_sigpipe(status: ExitStatus, stderr: &str) {
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "ended as Unix tools do on a closed pipe: {status}; {stderr}");
    assert!(!stderr.contains("panicked"), "no panic message: {stderr}");
}

#[test]
fn classify_ends_quietly_when_its_reader_goes_away_first() {
    let dir = tempfile::tempdir().unwrap();
    let folder = common::fonts36_images("target/test/0", dir.path(), 40);
    let bundle = repo().join("models/efficientnet-lite0-fonts36");
    let mut child = edgeadapt()
        .args(["classify", "--json", "--bundle"])
        .arg(&bundle)
        .arg(&folder)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let stderr = collect(child.stderr.take().unwrap());
    let status = exit_within(&mut child, Duration::from_secs(120), "classify");
    assert_ended_by_sigpipe(status, &stderr.join().unwrap());
}

#[test]
fn classify_with_stdout_and_stderr_in_one_pipe_ends_after_the_first_line() {
    // `2>&1 | head -1`: the first log line is read, then both outputs are closed.
    let dir = tempfile::tempdir().unwrap();
    let folder = common::fonts36_images("target/test/0", dir.path(), 40);
    let bundle = repo().join("models/efficientnet-lite0-fonts36");
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = edgeadapt()
        .args(["classify", "--json", "--bundle"])
        .arg(&bundle)
        .arg(&folder)
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(reader);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "the command wrote a line");
    drop(reader);
    let status = exit_within(&mut child, Duration::from_secs(120), "classify 2>&1 | head -1");
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "ended as Unix tools do on a closed pipe: {status}");
}

#[test]
fn label_ends_quietly_when_its_reader_goes_away_and_keeps_what_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let folder = common::fonts36_images("target/test/0", dir.path(), 3);
    let config = write_config(dir.path(), free_port(), "");
    let mut child = edgeadapt()
        .arg("--config")
        .arg(&config)
        .args(["label", "--class", "0"])
        .arg(&folder)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let stderr = collect(child.stderr.take().unwrap());
    let status = exit_within(&mut child, Duration::from_secs(120), "label");
    assert_ended_by_sigpipe(status, &stderr.join().unwrap());
    let status = edgeadapt().arg("--config").arg(&config).args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status prints JSON");
    let stored: u64 =
        status["samples"]["0"].as_array().map_or(0, |split| split.iter().filter_map(|n| n.as_u64()).sum());
    assert_eq!(stored, 3, "the labels were stored before the output failed: {status}");
}
