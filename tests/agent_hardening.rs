//! Hostile and careless input against the real daemon and CLI: links planted in the agent's
//! folders, a damaged store, a rollback without a target, folder loops, a CLI command holding
//! the data folder when the agent starts, and an endpoint flooded with requests and slow
//! connections. Every destructive case works only on folders the test created.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port, http, write_config};
use common::repo;

fn image(class: &str, n: usize) -> PathBuf {
    let path = repo().join("target/data/fonts36/target/adapt").join(class).join(format!("{n}.png"));
    assert!(path.is_file(), "run tools/setup.sh first: {} is missing", path.display());
    path
}

/// A test config whose `[http]` table also holds `keys`.
fn config_with_http(dir: &Path, port: u16, keys: &str) -> PathBuf {
    let config = write_config(dir, port, "");
    let text = std::fs::read_to_string(&config).unwrap().replace("[http]\n", &format!("[http]\n{keys}"));
    std::fs::write(&config, text).unwrap();
    config
}

/// Runs an `edgeadapt` command with `config`, without a daemon.
fn edgeadapt(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgeadapt")).arg("--config").arg(config).args(args).output().unwrap()
}

/// Waits until `done` holds, or fails with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    common::wait_until(limit, what, || done().then_some(()));
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Drops a real image into `inbox/<class>/` (staged and renamed in) and waits until the agent
/// has moved it to `processed/<class>/`: one full poll of the inbox has happened since.
fn label_through_inbox(data: &Path, class: &str, n: usize) {
    let name = format!("probe-{n}.png");
    let stage = data.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::create_dir_all(data.join("inbox").join(class)).unwrap();
    std::fs::copy(image(class, n), stage.join(&name)).unwrap();
    std::fs::rename(stage.join(&name), data.join("inbox").join(class).join(&name)).unwrap();
    let processed = data.join("processed").join(class).join(&name);
    wait_for(&format!("{} to be processed", processed.display()), Duration::from_secs(60), || processed.exists());
}

#[cfg(unix)]
#[test]
fn links_in_the_inbox_and_watched_folder_never_reach_outside() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let data = dir.path().join("data");
    // Something outside the agent's folders that must stay exactly as it is.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(image("A", 0), outside.join("photo.png")).unwrap();
    std::fs::write(outside.join("passwd"), b"root:x:0:0").unwrap();
    let before = files_in(&outside);

    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    // A class folder that is a link to the outside folder, and file links into it.
    symlink(&outside, data.join("inbox/C")).unwrap();
    std::fs::create_dir_all(data.join("inbox/B")).unwrap();
    symlink(outside.join("photo.png"), data.join("inbox/B/linked.png")).unwrap();
    symlink(outside.join("photo.png"), data.join("watch/linked.png")).unwrap();
    // Two full polls after the links appeared.
    label_through_inbox(&data, "A", 1);
    label_through_inbox(&data, "A", 2);

    assert_eq!(files_in(&outside), before, "nothing outside the agent's folders moved");
    assert_eq!(std::fs::read(outside.join("passwd")).unwrap(), b"root:x:0:0");
    assert!(data.join("inbox/C").is_symlink(), "the linked class folder is left alone");
    // The file links themselves were moved aside with a reason; their target is untouched.
    let rejected = data.join("rejected/B/linked.png");
    assert!(rejected.is_symlink(), "the inbox link is moved to rejected/");
    let reason = std::fs::read_to_string(data.join("rejected/B/linked.png.reason.txt")).unwrap();
    assert!(reason.contains("link"), "{reason}");
    wait_for("the watched link to be moved aside", Duration::from_secs(30), || {
        data.join("classified/failed/linked.png").is_symlink()
    });
    let status: serde_json::Value =
        http().get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap();
    let samples = status["samples"].to_string();
    assert!(!samples.contains("\"C\""), "nothing was stored as class C: {samples}");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("links are not followed"), "{log}");
    daemon.stop();
}

#[test]
fn rollback_needs_a_target_in_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let agent = http();
    let no_target = agent.post(daemon.url("/v1/rollback")).send_empty().unwrap();
    assert_eq!(no_target.status(), 400);
    let mut in_body = agent.post(daemon.url("/v1/rollback")).send("to=source").unwrap();
    assert_eq!(in_body.status(), 400);
    let error: serde_json::Value = in_body.body_mut().read_json().unwrap();
    assert!(error["error"].as_str().unwrap().contains("query"), "{error}");
    let mut fine = agent.post(daemon.url("/v1/rollback?to=source")).send_empty().unwrap();
    assert_eq!(fine.status(), 200);
    assert_eq!(fine.body_mut().read_json::<serde_json::Value>().unwrap()["serving"], 0);
    daemon.stop();
}

#[test]
fn framework_errors_are_json_like_the_documented_ones() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_with_http(dir.path(), port, "max_body_bytes = 2048\n");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let agent = http();
    let cases: Vec<(u16, ureq::http::Response<ureq::Body>)> = vec![
        (400, agent.post(daemon.url("/v1/classify?top=many")).send(&b"x"[..]).unwrap()),
        (405, agent.get(daemon.url("/v1/label")).call().unwrap()),
        (404, agent.get(daemon.url("/v2/nothing")).call().unwrap()),
        (413, agent.post(daemon.url("/v1/classify")).send(&vec![0u8; 4096][..]).unwrap()),
    ];
    for (status, mut response) in cases {
        assert_eq!(response.status(), status);
        let body: serde_json::Value = response.body_mut().read_json().unwrap();
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{status}: {body}");
    }
    daemon.stop();
}

#[test]
fn a_damaged_or_empty_store_is_refused_with_a_way_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let data = dir.path().join("data");
    // A real store first, with a label in it.
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let mut stored = http().post(daemon.url("/v1/label?class=A")).send(std::fs::read(image("A", 0)).unwrap()).unwrap();
    assert_eq!(stored.status(), 200, "{:?}", stored.body_mut().read_to_string());
    daemon.stop();
    let store = data.join("store.db");
    let good = std::fs::read(&store).unwrap();

    let run = |args: &[&str]| edgeadapt(&config, args);
    // Random bytes over every page but the first (the header and schema), then an empty file.
    let mut damaged = good.clone();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for byte in &mut damaged[4096..] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    for (what, bytes) in [("random bytes", damaged), ("an empty file", Vec::new())] {
        std::fs::write(&store, &bytes).unwrap();
        let started = run(&["run"]);
        let stderr = String::from_utf8_lossy(&started.stderr);
        assert!(!started.status.success(), "{what}: the agent started on a damaged store");
        assert!(stderr.contains("damaged") && stderr.contains("backup"), "{what}: {stderr}");
        let labelled = run(&["label", image("B", 0).to_str().unwrap(), "--class", "B"]);
        assert!(!labelled.status.success(), "{what}: a label was stored in a damaged store");
        let doctor = run(&["doctor", "--before-start"]);
        assert_eq!(doctor.status.code(), Some(1), "{what}: {}", String::from_utf8_lossy(&doctor.stdout));
        assert_eq!(std::fs::read(&store).unwrap(), bytes, "{what}: the file is left as it was, for recovery");
    }
    // With the store moved aside the agent starts a new one.
    std::fs::rename(&store, data.join("broken.db")).unwrap();
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    daemon.stop();
    assert!(store.metadata().unwrap().len() > 0);
}

#[cfg(unix)]
#[test]
fn folder_loops_end_and_each_image_is_classified_once() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::copy(image("A", 0), root.join("a/one.png")).unwrap();
    std::fs::copy(image("B", 0), root.join("a/b/two.png")).unwrap();
    symlink(&root, root.join("a/b/up")).unwrap();
    symlink(root.join("a"), root.join("a/b/again")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args(["classify", "--json"])
        .arg(&root)
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("classify did not finish on a folder with loops");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "each image once: {stdout}");
}

#[cfg(unix)]
#[test]
fn the_agent_waits_for_a_command_that_holds_the_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let held = edgeadapt::agent::lock::try_acquire(&data, "label").unwrap();
    let log = dir.path().join("daemon.log");
    let starting = std::thread::spawn({
        let (config, log) = (config.clone(), log.clone());
        move || Daemon::start(&config, port, &log)
    });
    wait_for("the agent to say whom it waits for", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("edgeadapt label")
    });
    drop(held);
    let daemon = starting.join().unwrap();
    assert!(edgeadapt::agent::lock::holder(&data).unwrap().is_agent());
    // And a command that finds the agent running talks to it rather than to the store.
    let output = daemon.cli(&["status", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    daemon.stop();
}

#[test]
fn a_flood_of_requests_gets_answers_or_busy_and_slow_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = config_with_http(dir.path(), port, "max_connections = 8\nmax_requests = 4\nheader_timeout_s = 1\n");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let bytes = std::fs::read(image("C", 0)).unwrap();
    let url = daemon.url("/v1/classify");
    let workers: Vec<_> = (0..24)
        .map(|_| {
            let (url, bytes) = (url.clone(), bytes.clone());
            std::thread::spawn(move || {
                let agent = http();
                (0..10)
                    .map(|_| match agent.post(&url).send(bytes.as_slice()) {
                        Ok(response) => {
                            let retry = response.headers().get("retry-after").is_some();
                            (response.status().as_u16(), retry)
                        }
                        Err(error) => panic!("a request got no answer: {error}"),
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<(u16, bool)> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(answers.iter().all(|(s, _)| matches!(s, 200 | 503)), "{answers:?}");
    assert!(answers.iter().filter(|(s, _)| *s == 503).all(|(_, retry)| *retry), "503 carries Retry-After");
    assert!(answers.iter().any(|(s, _)| *s == 200), "some requests were answered");

    // Connections that dribble a header are closed after the header timeout, and at most
    // max_connections are held open at once.
    let slow: Vec<TcpStream> = (0..40)
        .filter_map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream.write_all(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(stream)
        })
        .collect();
    for mut stream in slow {
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buffer = [0u8; 256];
        // The server closes: end of file (or a reset), well before the read timeout.
        let started = Instant::now();
        let _ = stream.read(&mut buffer);
        assert!(started.elapsed() < Duration::from_secs(20), "a slow connection stayed open");
    }
    let mut fine = http().get(daemon.url("/v1/status")).call().unwrap();
    assert_eq!(fine.status(), 200, "{:?}", fine.body_mut().read_to_string());

    // Requests that take every place in the queue and never send their body: the agent's state
    // is still answered, and the places are given back with 408 after the timeout.
    let holders: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream.write_all(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").unwrap();
            stream
        })
        .collect();
    let mut status = http().get(daemon.url("/v1/status")).call().unwrap();
    assert_eq!(status.status(), 200, "{:?}", status.body_mut().read_to_string());
    for mut stream in holders {
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408") || answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    // A declared body over the limit is refused before it is sent.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(
            b"POST /v1/label?class=A HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    daemon.stop();
}

#[test]
fn a_half_written_file_is_retried_and_a_broken_one_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let data = dir.path().join("data");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let whole = std::fs::read(image("D", 0)).unwrap();
    // The first half appears in the watched folder, as a writer that does not rename would do.
    let slow = data.join("watch/slow.png");
    std::fs::write(&slow, &whole[..whole.len() / 2]).unwrap();
    // A later image classified means a poll has passed over the half-written one.
    std::fs::copy(image("E", 0), data.join("stage-probe.png")).unwrap();
    std::fs::rename(data.join("stage-probe.png"), data.join("watch/probe.png")).unwrap();
    wait_for("the probe to be classified", Duration::from_secs(30), || data.join("classified/probe.png").exists());
    assert!(slow.exists(), "a file modified a moment ago is not failed for good");
    std::fs::OpenOptions::new().append(true).open(&slow).unwrap().write_all(&whole[whole.len() / 2..]).unwrap();
    wait_for("the completed file to be classified", Duration::from_secs(30), || {
        data.join("classified/slow.png").exists()
    });

    // A broken image labelled over HTTP: the message names it once.
    let mut refused =
        http().post(daemon.url("/v1/label?class=A&name=bomb.png")).send(&b"\x89PNG\r\n\x1a\nxx"[..]).unwrap();
    assert_eq!(refused.status(), 400);
    let error: serde_json::Value = refused.body_mut().read_json().unwrap();
    let text = error["error"].as_str().unwrap();
    assert_eq!(text.matches("bomb.png").count(), 1, "{text}");
    daemon.stop();
}

#[test]
fn a_data_folder_that_is_a_file_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    std::fs::write(dir.path().join("data"), b"not a folder").unwrap();
    let run = |args: &[&str]| edgeadapt(&config, args);
    let started = run(&["run"]);
    let stderr = String::from_utf8_lossy(&started.stderr);
    assert!(!started.status.success());
    assert!(stderr.contains("data_dir") && stderr.contains(&dir.path().join("data").display().to_string()), "{stderr}");
    let doctor = run(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    for name in ["store", "disk space"] {
        let check = checks.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        assert_eq!(check["level"], "fail", "{check}");
    }
    assert_eq!(std::fs::read(dir.path().join("data")).unwrap(), b"not a folder");
}

/// Runs `edgeadapt run` until it exits on its own, or fails after `limit`; its stderr.
fn run_until_it_exits(config: &Path, limit: Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("EDGEADAPT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit within {limit:?} although its port is taken");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap())
}

#[test]
fn a_taken_mqtt_port_names_the_key_to_change_and_the_way_out() {
    // As Debian's Mosquitto holds 1883: another program listens on the embedded broker's port.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!("[mqtt]\nenabled = true\nbroker = \"embedded\"\nembedded_listen = \"{taken}\"\n");
    let config = write_config(dir.path(), free_port(), &mqtt);
    let (status, stderr) = run_until_it_exits(&config, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{stderr}");
    for wanted in ["mqtt.embedded_listen", &config.display().to_string(), &taken.to_string(), "Address already in use"]
    {
        assert!(stderr.contains(wanted), "names {wanted}: {stderr}");
    }
    assert!(stderr.contains(&format!("broker = \"mqtt://{taken}\"")), "suggests using that broker: {stderr}");
    drop(holder);
}

#[test]
fn a_taken_http_port_names_the_key_to_change() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_http(dir.path(), taken.port(), "");
    let (status, stderr) = run_until_it_exits(&config, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{stderr}");
    for wanted in ["http.listen", &config.display().to_string(), &taken.to_string(), "Address already in use"] {
        assert!(stderr.contains(wanted), "names {wanted}: {stderr}");
    }
    drop(holder);
}

#[cfg(unix)]
#[test]
fn links_planted_in_the_data_folder_are_never_followed_and_jam_nothing() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let data = dir.path().join("data");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("log.txt"), b"precious").unwrap();
    std::fs::write(outside.join("lock.txt"), b"precious").unwrap();
    std::fs::create_dir_all(data.join("processed")).unwrap();
    symlink(&outside, data.join("processed/E")).unwrap();
    symlink(outside.join("log.txt"), data.join("classifications.jsonl")).unwrap();
    symlink(outside.join("lock.txt"), data.join("agent.lock")).unwrap();
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    // A file whose destination is a link stays where it is; the classes after it go on.
    std::fs::create_dir_all(data.join("inbox/E")).unwrap();
    std::fs::copy(image("E", 3), data.join("inbox/E/e.png")).unwrap();
    label_through_inbox(&data, "F", 1);
    // A watched image with a 251-byte name, twice: the second is numbered within 255 bytes.
    let long = format!("{}.png", "q".repeat(251));
    for n in 0..2 {
        std::fs::copy(image("M", n), data.join("stage.png")).unwrap();
        std::fs::rename(data.join("stage.png"), data.join("watch").join(&long)).unwrap();
        wait_for("the long-named image to be classified", Duration::from_secs(30), || {
            files_in(&data.join("classified")).iter().filter(|n| n.ends_with("q.png")).count() == n + 1
        });
    }
    assert!(data.join("inbox/E/e.png").exists(), "not moved through the link");
    assert_eq!(files_in(&outside), vec!["lock.txt".to_string(), "log.txt".to_string()]);
    assert_eq!(std::fs::read(outside.join("log.txt")).unwrap(), b"precious");
    assert_eq!(std::fs::read(outside.join("lock.txt")).unwrap(), b"precious");
    assert!(!data.join("classifications.jsonl").is_symlink() && !data.join("agent.lock").is_symlink());
    daemon.stop();
}
