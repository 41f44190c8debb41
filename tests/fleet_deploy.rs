//! `fleet deploy` against devices on the embedded broker: a bundle that fails its health check
//! on the canary never reaches another device; a healthy one is shadowed, switched to, passes
//! its probation and survives a restart; an agent killed during the probation comes back on
//! the bundle it served before; a deploy command whose sha256 is not the transfer's is refused.
//! Against Mosquitto with a 256 KiB packet limit: a 15 MB bundle resumes a transfer cut short,
//! past a forged chunk, and a canary's failure stops the rollout.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, free_port, http, write_config};
use common::{mosquitto_binary, renamed_bundle, repo, start_embedded_broker, wait_until};
use edgeadapt::model::Bundle;
use serde_json::Value;

/// Starts device `name` on the broker at `url`, in fleet "deploy", in `dir`.
fn device(dir: &Path, name: &str, url: &str) -> Daemon {
    let port = free_port();
    let extra = format!(
        "[mqtt]\nenabled = true\nbroker = \"{url}\"\nfleet = \"deploy\"\nmax_packet_bytes = 262144\n\
         reconnect_min_ms = 100\n"
    );
    let config = write_config(dir, port, &extra);
    let text = std::fs::read_to_string(&config).unwrap().replace("\"test-device\"", &format!("\"{name}\""));
    std::fs::write(&config, text).unwrap();
    Daemon::start(&config, port, &dir.join("daemon.log"))
}

/// Labels 24 fonts36 images (4 of each of 6 classes) on the device, with their images kept:
/// what a new bundle is shadowed on.
fn label(daemon: &Daemon) {
    let images = repo().join("target/data/fonts36/target/adapt");
    for class in ["0", "1", "2", "3", "4", "5"] {
        for n in 0..4 {
            let bytes = std::fs::read(images.join(class).join(format!("{n}.png"))).unwrap();
            let response = http().post(daemon.url("/v1/label")).query("class", class).send(bytes.as_slice());
            assert_eq!(response.unwrap().status(), 200);
        }
    }
}

fn status(daemon: &Daemon) -> Value {
    http().get(daemon.url("/v1/status")).call().unwrap().body_mut().read_json().unwrap()
}

fn fleet_deploy(url: &str, bundle: &Path, devices: &str, extra: &[&str]) -> (std::process::Output, Value) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args(["fleet", "--broker", url, "--fleet", "deploy", "deploy", "--bundle"])
        .arg(bundle)
        .args(["--devices", devices, "--probation", "2", "--timeout", "300", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let summary = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, summary)
}

#[test]
fn a_bundle_that_fails_on_the_canary_reaches_no_other_device_and_a_healthy_one_serves_everywhere() {
    let url = format!("mqtt://127.0.0.1:{}", start_embedded_broker());
    let (dir_a, dir_b, bundles) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (canary, second) = (device(dir_a.path(), "canary", &url), device(dir_b.path(), "second", &url));
    label(&canary);
    label(&second);
    let source_id = status(&canary)["bundle"].clone();

    // Classes shifted by one: every file's checksum is right, the model is not.
    let broken = renamed_bundle(bundles.path(), "fonts36-broken", 1);
    let (output, summary) = fleet_deploy(&url, &broken, "canary,second", &["--canary", "1"]);
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(summary["devices"]["canary"]["outcome"], "failed", "{summary}");
    let reason = summary["devices"]["canary"]["detail"].as_str().unwrap();
    assert!(reason.contains("health check") && reason.contains("agrees with the served model"), "{reason}");
    assert_eq!(summary["devices"]["second"]["outcome"], "skipped", "{summary}");
    assert!(summary["stopped"].as_str().unwrap().contains("canary canary failed"));
    assert_eq!(status(&canary)["bundle"], source_id, "the canary still serves its bundle");
    let folders = std::fs::read_dir(dir_a.path().join("data/bundles")).unwrap().count();
    assert_eq!(folders, 0, "the refused bundle is not kept");
    assert!(!dir_b.path().join("data/bundles").exists(), "the second device never got it");

    let healthy = renamed_bundle(bundles.path(), "fonts36-v2", 0);
    let (output, summary) = fleet_deploy(&url, &healthy, "canary,second", &[]);
    assert!(output.status.success(), "{}\n{summary}", String::from_utf8_lossy(&output.stderr));
    for name in ["canary", "second"] {
        assert_eq!(summary["devices"][name]["outcome"], "in_service", "{summary}");
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("canary: switched after shadowing on"), "progress is shown: {stderr}");
    let healthy_id = Bundle::load(&healthy).unwrap().id();
    for daemon in [&canary, &second] {
        let now = status(daemon);
        assert_eq!(now["bundle"], "fonts36-v2");
        assert_eq!(now["bundle_id"], healthy_id.as_str(), "the status names the exact bundle served");
        // Its source, or already the version its adaptation with the re-read samples made.
        let served = &now["serving"];
        assert!(now["versions"].as_array().unwrap().iter().any(|v| &v["id"] == served), "{now}");
        // The labels survive: their kept images are read again with the new trunk.
        wait_until(Duration::from_secs(120), "the samples to be read again with the new bundle", || {
            (status(daemon)["samples"].as_object().map(|m| m.len()) == Some(6)).then_some(())
        });
    }
    // Deploying it again sends nothing: both devices' statuses name the bundle.
    let (output, summary) = fleet_deploy(&url, &healthy, "canary,second", &[]);
    assert!(output.status.success(), "{}\n{summary}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in ["canary", "second"] {
        assert_eq!(summary["devices"][name]["outcome"], "in_service", "{summary}");
        assert!(stderr.contains(&format!("{name}: already serves {healthy_id}; nothing sent")), "{stderr}");
    }
    assert!(!stderr.contains(" holds "), "no chunk is offered: {stderr}");
    let doctor = canary.cli(&["doctor"]);
    assert!(String::from_utf8_lossy(&doctor.stdout).contains("deployed by the fleet"), "{doctor:?}");
    canary.stop();
    let log = dir_a.path().join("daemon.log");
    let canary = Daemon::start(&dir_a.path().join("config.toml"), http_port(dir_a.path()), &log);
    assert_eq!(status(&canary)["bundle"], "fonts36-v2", "a restart after the probation keeps the new bundle");
    canary.stop();
    second.stop();
}

/// The HTTP port in the config written for `dir`.
fn http_port(dir: &Path) -> u16 {
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let listen = text.lines().find(|l| l.starts_with("listen = ")).unwrap();
    listen.trim_end_matches('"').rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn an_agent_killed_during_the_probation_comes_back_on_the_bundle_it_served_before() {
    let url = format!("mqtt://127.0.0.1:{}", start_embedded_broker());
    let (dir, bundles) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let daemon = device(dir.path(), "solo", &url);
    label(&daemon);
    let source_id = status(&daemon)["bundle"].as_str().unwrap().to_string();
    let healthy = renamed_bundle(bundles.path(), "fonts36-v2", 0);
    let new_id = Bundle::load(&healthy).unwrap().id();
    // A power loss mid-unpack left a half folder behind: it is never used, and does not block.
    let leftover = dir.path().join("data/bundles").join(format!("{}.partial", new_id.replace('@', "-")));
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("trunk.onnx"), b"half").unwrap();

    let mut rollout = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args(["fleet", "--broker", &url, "--fleet", "deploy", "deploy", "--bundle"])
        .arg(&healthy)
        .args(["--devices", "solo", "--probation", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(300), "the device to switch to the new bundle", || {
        (status(&daemon)["bundle"] == "fonts36-v2").then_some(())
    });
    daemon.kill();
    let _ = rollout.kill();
    let _ = rollout.wait();

    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start(&dir.path().join("config.toml"), http_port(dir.path()), &log);
    assert_eq!(status(&daemon)["bundle"], source_id.as_str(), "switched back at start");
    assert!(!common::log_lines(&log, "switching back to the previous bundle").is_empty());

    // A deploy whose signed sha256 is not the offered archive's is refused before unpacking.
    use edgeadapt::fleet::client::{BrokerOptions, FleetClient};
    use edgeadapt::protocol::transfer::{ArtefactKind, make};
    let packed = edgeadapt::deploy::archive::pack(&healthy).unwrap();
    let (manifest, chunks) = make(ArtefactKind::Bundle, &new_id, &packed, 262144, Value::Null);
    let mut forged_sha = manifest.sha256.clone();
    forged_sha.replace_range(63.., if forged_sha.ends_with('0') { "1" } else { "0" });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let options = BrokerOptions::plain(url.clone(), "deploy");
        let mut fleet = FleetClient::connect(options, Duration::from_secs(30)).await.unwrap();
        let timeout = Duration::from_secs(60);
        fleet.send_artefact("solo", &manifest, &chunks, timeout, &mut |_, _| {}).await.unwrap();
        let args = serde_json::json!({ "transfer": manifest.transfer, "sha256": forged_sha, "bundle": new_id });
        let answer = fleet.command("solo", "deploy", args, timeout).await.unwrap();
        assert!(!answer.ok);
        assert!(answer.error.unwrap().contains("not the one the deploy command was signed for"));
    });
    assert_eq!(status(&daemon)["bundle"], source_id.as_str());
    daemon.stop();
}

#[test]
fn over_mosquitto_a_resumed_transfer_past_a_forged_chunk_reaches_the_canary_whose_failure_stops_the_rollout() {
    use edgeadapt::fleet::client::{BrokerOptions, FleetClient};
    use edgeadapt::protocol::topics::DeviceTopics;
    use edgeadapt::protocol::transfer::{ArtefactKind, make};
    let Some(binary) = mosquitto_binary() else {
        assert!(std::env::var_os("CI").is_none(), "CI must install mosquitto (see .ci/run)");
        common::skipped("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    let limit = 262_144;
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size {limit}\nuser root\n"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
    let mut broker = std::process::Command::new(binary).arg("-c").arg(&conf).stderr(log).spawn().unwrap();
    wait_until(Duration::from_secs(20), "mosquitto to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let url = format!("mqtt://127.0.0.1:{port}");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let (canary, second) = (device(&dir_a, "canary", &url), device(&dir_b, "second", &url));
    label(&canary);
    label(&second);

    // Half the broken bundle reached the canary before the link broke, one chunk forged.
    let broken = renamed_bundle(dir.path(), "fonts36-broken", 5);
    let id = Bundle::load(&broken).unwrap().id();
    let packed = edgeadapt::deploy::archive::pack(&broken).unwrap();
    let (manifest, chunks) = make(ArtefactKind::Bundle, &id, &packed, limit, serde_json::json!({ "bundle": id }));
    assert!(chunks.len() > 50, "a 15 MB bundle in chunks under the packet limit");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut fleet =
            FleetClient::connect(BrokerOptions::plain(url.clone(), "deploy"), Duration::from_secs(30)).await.unwrap();
        let args = serde_json::to_value(&manifest).unwrap();
        assert!(fleet.command("canary", "offer", args, Duration::from_secs(30)).await.unwrap().ok);
    });
    let topics = DeviceTopics::new("deploy", "canary");
    let mut options = rumqttc::MqttOptions::new("half-sender", "127.0.0.1", port);
    options.set_max_packet_size(limit, limit);
    let (client, mut connection) = rumqttc::Client::new(options, 64);
    for (index, chunk) in chunks.iter().enumerate().take(chunks.len() / 2) {
        let mut bytes = chunk.to_vec();
        if index == 3 {
            bytes[1000] ^= 0xff;
        }
        client
            .publish(topics.inbound_chunk(&manifest.transfer, index), rumqttc::QoS::AtLeastOnce, false, bytes)
            .unwrap();
    }
    let mut acked = 0;
    for event in connection.iter() {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event.unwrap() {
            acked += 1;
            if acked == chunks.len() / 2 {
                break;
            }
        }
    }
    wait_until(Duration::from_secs(30), "the canary to refuse the forged chunk", || {
        common::log_lines(&dir_a.join("daemon.log"), "chunk refused").into_iter().next()
    });

    let (output, summary) = fleet_deploy(&url, &broken, "canary,second", &["--max-packet-bytes", &limit.to_string()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let held = format!("canary: holds {} of {} chunks", chunks.len() / 2 - 1, chunks.len());
    assert!(stderr.contains(&held), "the transfer resumes from what the canary holds ({held}): {stderr}");
    assert_eq!(summary["devices"]["canary"]["outcome"], "failed", "{summary}");
    assert_eq!(summary["devices"]["second"]["outcome"], "skipped", "{summary}");
    assert!(!stderr.contains("second: holds"), "not a chunk went to the second device: {stderr}");

    let healthy = renamed_bundle(dir.path(), "fonts36-v2", 0);
    let (output, summary) = fleet_deploy(&url, &healthy, "canary,second", &["--max-packet-bytes", &limit.to_string()]);
    assert!(output.status.success(), "{}\n{summary}", String::from_utf8_lossy(&output.stderr));
    for daemon in [&canary, &second] {
        assert_eq!(status(daemon)["bundle"], "fonts36-v2");
    }
    canary.stop();
    second.stop();
    let _ = broker.kill();
    let _ = broker.wait();
}

/// `fleet simulate` stands in for devices: five of them connect, report, and take a bundle
/// with `fleet deploy`, which ends with all five in service; the simulator's report counts
/// what went through the broker and the watcher's lag.
#[test]
fn a_simulated_fleet_reports_and_takes_a_deployment() {
    let url = format!("mqtt://127.0.0.1:{}", start_embedded_broker());
    let dir = tempfile::tempdir().unwrap();
    let simulator = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args(["fleet", "--broker", &url, "--fleet", "deploy", "simulate", "--devices", "5", "--for", "25"])
        .args(["--metrics-every", "1", "--events-every", "1", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bundle = renamed_bundle(dir.path(), "fonts36-v2", 0);
    let devices = "sim-0000,sim-0001,sim-0002,sim-0003,sim-0004";
    let (output, summary) = fleet_deploy(&url, &bundle, devices, &["--canary", "2"]);
    assert!(output.status.success(), "{}\n{summary}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(summary["devices"].as_object().unwrap().len(), 5);
    assert!(summary["devices"].as_object().unwrap().values().all(|o| o["outcome"] == "in_service"), "{summary}");
    let report = simulator.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["connected"], 5, "{report}");
    assert!(report["commands"].as_u64().unwrap() >= 15, "two offers and a deploy each: {report}");
    assert!(report["watcher_messages"].as_u64().unwrap() > 100, "{report}");
}
