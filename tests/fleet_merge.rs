//! `fleet merge`: two devices at one site that labelled different classes pool their versions.
//! The merge is averaged on the fleet side, and each device computes its own γ on its own
//! traffic and judges the merge with its own gate, answering with the verdict.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, free_port, http, write_config};
use common::{repo, start_embedded_broker};
use edgeadapt::fleet::client::{BrokerOptions, FleetClient};

#[test]
fn devices_that_labelled_different_classes_each_judge_the_average_of_their_versions() {
    let url = format!("mqtt://127.0.0.1:{}", start_embedded_broker());
    let gate = "[gate]\nmax_seen_drop = 1.0\nmax_unseen_rate_drop = 1.0\nmax_reference_drop = 1.0\n";
    let start = |dir: &std::path::Path, device: &str| {
        let port = free_port();
        let extra = format!(
            "[adaptation]\nmethod = \"ft-tail+alg\"\n{gate}[mqtt]\nenabled = true\nbroker = \"{url}\"\n\
             fleet = \"merge\"\nmax_packet_bytes = 65536\n"
        );
        let config = write_config(dir, port, &extra);
        let text = std::fs::read_to_string(&config).unwrap().replace("\"test-device\"", &format!("\"{device}\""));
        std::fs::write(&config, text).unwrap();
        Daemon::start(&config, port, &dir.join("daemon.log"))
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (north, south) = (start(dir_a.path(), "north"), start(dir_b.path(), "south"));
    let images = repo().join("target/data/fonts36/target/adapt");
    for (daemon, classes) in [(&north, ["0", "1", "2"]), (&south, ["3", "4", "5"])] {
        for class in classes {
            for n in 0..6 {
                let bytes = std::fs::read(images.join(class).join(format!("{n}.png"))).unwrap();
                let response = http().post(daemon.url("/v1/label")).query("class", class).send(bytes.as_slice());
                assert_eq!(response.unwrap().status(), 200);
            }
        }
        // Unlabelled traffic of every class, for the device's own γ.
        for class in ["0", "3", "7", "A", "K", "Z"] {
            for n in 6..10 {
                let bytes = std::fs::read(images.join(class).join(format!("{n}.png"))).unwrap();
                assert_eq!(http().post(daemon.url("/v1/classify")).send(bytes.as_slice()).unwrap().status(), 200);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut fleet =
            FleetClient::connect(BrokerOptions::plain(url.clone(), "merge"), Duration::from_secs(30)).await.unwrap();
        for device in ["north", "south"] {
            let made = fleet.command(device, "adapt", serde_json::json!({}), Duration::from_secs(300)).await.unwrap();
            assert!(made.ok && made.result.as_ref().unwrap()["promoted"] == true, "{made:?}");
        }
    });
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .args(["fleet", "--broker", &url, "--fleet", "merge", "--max-packet-bytes", "65536"])
        .args(["merge", "--devices", "north,south", "--timeout", "120", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("merged north@1+south@1"), "{stderr}");
    let answers: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for device in ["north", "south"] {
        let verdict = &answers[device];
        assert_eq!(verdict["version"], 2, "{answers}");
        assert_eq!(verdict["method"], "merge of north@1+south@1", "{verdict}");
        assert!(verdict["promoted"].is_boolean(), "judged by the device's own gate: {verdict}");
        assert!(verdict["metrics"]["gate"]["seen_validation"].is_array(), "{verdict}");
    }
    // Each computed its own γ from its own traffic: the version's parameters say so.
    runtime.block_on(async {
        let mut fleet =
            FleetClient::connect(BrokerOptions::plain(url.clone(), "merge"), Duration::from_secs(30)).await.unwrap();
        for device in ["north", "south"] {
            let (weights, _) = fleet.fetch_weights(device, Some(2), Duration::from_secs(60)).await.unwrap();
            let notes = weights.params["notes"].to_string();
            assert!(notes.contains("by prior matching on this device's traffic"), "{device}: {notes}");
            assert_eq!(weights.params["unseen"].as_array().unwrap().len(), 30, "unseen by either device");
        }
    });
    north.stop();
    south.stop();
}
