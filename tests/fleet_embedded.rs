//! The fleet interface against the agent's embedded broker: commands with responses (label,
//! adapt, rollback, status, set-policy), idempotent command ids, refusals, every event delivered,
//! the retained status, weights published on promotion and rebuilt into a bundle, and every
//! message matching the examples in docs/mqtt.md.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::daemon::{Daemon, free_port, http, write_config};
use common::{repo, start_embedded_broker};
use edgeadapt::fleet::client::{BrokerOptions, FleetClient};
use edgeadapt::inference::{Classifier, Prediction, predict};
use edgeadapt::model::Bundle;
use edgeadapt::runtime::RuntimeOptions;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

type Messages = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Records every message under the fleet's topics, from a thread of its own.
fn collect(port: u16) -> Messages {
    let messages: Messages = Arc::default();
    let sink = Arc::clone(&messages);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let mut options = MqttOptions::new("collector", "127.0.0.1", port);
            options.set_max_packet_size(1 << 24, 1 << 24);
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            loop {
                match eventloop.poll().await {
                    // Subscribe on every connect: a request queued before a failed first
                    // connect is dropped with the clean session.
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client.subscribe("edgeadapt/v1/#", QoS::AtLeastOnce).await.unwrap();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push((p.topic, p.payload.to_vec())),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    });
    messages
}

/// The retained message a new subscriber to `topic` gets first.
async fn retained(port: u16, topic: &str) -> serde_json::Value {
    static CLIENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut options = MqttOptions::new(format!("late-watcher-{id}"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let wait = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Packet::ConnAck(_)) => client.subscribe(topic, QoS::AtLeastOnce).await.unwrap(),
                Event::Incoming(Packet::Publish(p)) if p.retain => return json(&p.payload),
                _ => {}
            }
        }
    });
    let message = wait.await.unwrap_or_else(|_| panic!("no retained message on {topic}"));
    let _ = client.disconnect().await;
    message
}

fn wait_for(messages: &Messages, what: &str, check: impl Fn(&[(String, Vec<u8>)]) -> bool) {
    common::wait_until(Duration::from_secs(60), what, || check(&messages.lock().unwrap()).then_some(()));
}

/// [`wait_for`] inside the test's runtime: it sleeps without blocking the tasks it waits on.
async fn wait_for_async(messages: &Messages, what: &str, check: impl Fn(&[(String, Vec<u8>)]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !check(&messages.lock().unwrap()) {
        assert!(std::time::Instant::now() < deadline, "timed out after 30 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The JSON examples of docs/mqtt.md, by the leaf they are headed with (`status`, `events`, ...).
fn documented_examples() -> BTreeMap<String, Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(repo().join("docs/mqtt.md")).unwrap();
    let mut examples: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(leaf) = line.strip_prefix("```json leaf=") {
            let block: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            let value: serde_json::Value = serde_json::from_str(&block.join("\n"))
                .unwrap_or_else(|e| panic!("docs/mqtt.md example for {leaf} is not JSON: {e}"));
            examples.entry(leaf.trim().to_string()).or_default().push(value);
        }
    }
    examples
}

fn keys(value: &serde_json::Value) -> BTreeSet<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn commands_events_status_and_weights_over_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (http_port, mqtt_port) = (free_port(), free_port());
    let extra = format!(
        "[adaptation]\nmethod = \"ft-tail+prior\"\n[mqtt]\nenabled = true\nembedded_listen = \"127.0.0.1:{mqtt_port}\"\n\
         fleet = \"test-fleet\"\nmetrics_every_s = 1\nmax_packet_bytes = 65536\n"
    );
    let config = write_config(dir.path(), http_port, &extra);
    let daemon = Daemon::start(&config, http_port, &dir.path().join("daemon.log"));
    let messages = collect(mqtt_port);
    let status_topic = "edgeadapt/v1/test-fleet/test-device/status";
    wait_for(&messages, "the online status", |m| m.iter().any(|(t, p)| t == status_topic && json(p)["online"] == true));
    // The recorder is subscribed from here on (it has the retained status); events are not
    // retained, so only those recorded later can be expected.
    let recording_since = edgeadapt::store::now_ms();

    let fonts36 = repo().join("target/data/fonts36");
    assert!(fonts36.is_dir(), "run tools/setup.sh first");
    // Unlabelled traffic of every class through the HTTP endpoint.
    let agent = http();
    let bundle = Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).unwrap();
    for class in &bundle.head.classes {
        for n in 0..3 {
            let bytes = std::fs::read(fonts36.join("target/adapt").join(class).join(format!("{n}.png"))).unwrap();
            assert_eq!(agent.post(daemon.url("/v1/classify")).send(bytes.as_slice()).unwrap().status(), 200);
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let options = BrokerOptions::plain(format!("mqtt://127.0.0.1:{mqtt_port}"), "test-fleet");
    let timeout = Duration::from_secs(120);
    runtime.block_on(async {
        let mut fleet = FleetClient::connect(options, Duration::from_secs(10)).await.unwrap();
        // Labels over MQTT.
        for class in ["2", "Q"] {
            for n in 0..15 {
                let bytes = std::fs::read(fonts36.join("target/adapt").join(class).join(format!("{n}.png"))).unwrap();
                let image_base64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                let args = serde_json::json!({ "class": class, "image_base64": image_base64 });
                let response = fleet.command("test-device", "label", args, timeout).await.unwrap();
                assert!(response.ok, "{response:?}");
            }
        }
        let duplicate = std::fs::read(fonts36.join("target/adapt/2/0.png")).unwrap();
        let args = serde_json::json!({ "class": "2", "image_base64": base64::engine::general_purpose::STANDARD.encode(&duplicate) });
        let response = fleet.command("test-device", "label", args, timeout).await.unwrap();
        assert!(!response.ok && response.error.as_deref().unwrap().contains("already stored"), "{response:?}");

        // Adapt, then the same command id again: the same answer, and no second run.
        let response =
            fleet.command_with_id("test-device", "adapt-1", "adapt", serde_json::json!({}), timeout).await.unwrap();
        assert!(response.ok, "{response:?}");
        let result = response.result.clone().unwrap();
        assert_eq!(result["version"], 1);
        assert_eq!(result["promoted"], true, "{result}");
        let again =
            fleet.command_with_id("test-device", "adapt-1", "adapt", serde_json::json!({}), timeout).await.unwrap();
        assert_eq!(again, response);
        // A watcher that starts now gets the labels and this result at once: metrics are
        // retained and name the last adaptation.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = retained(mqtt_port, "edgeadapt/v1/test-fleet/test-device/metrics").await;
            if metrics["last_adaptation"]["version"] == 1 {
                assert_eq!(metrics["last_adaptation"]["promoted"], true, "{metrics}");
                assert_eq!(metrics["samples"]["Q"][0].as_u64().unwrap() + metrics["samples"]["Q"][1].as_u64().unwrap(), 15);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no retained metrics with the last adaptation: {metrics}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The same id for a different command is refused, not answered with the adapt result.
        let reused = fleet
            .command_with_id("test-device", "adapt-1", "rollback", serde_json::json!({ "to": "source" }), timeout)
            .await
            .unwrap();
        assert!(!reused.ok && reused.error.as_deref().unwrap().contains("different command"), "{reused:?}");
        // A command over the broker's packet limit is refused before it is sent; the connection
        // (and the next command) survive.
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 300 * 1024]);
        let oversized =
            fleet.command("test-device", "label", serde_json::json!({ "class": "2", "image_base64": big }), timeout).await;
        assert!(oversized.unwrap_err().to_string().contains("packet limit"));
        let status = fleet.command("test-device", "status", serde_json::json!({}), timeout).await.unwrap();
        assert_eq!(status.result.as_ref().unwrap()["versions"].as_array().unwrap().len(), 2);

        // Refusals change nothing.
        for (command, args, phrase) in [
            ("rollback", serde_json::json!({ "to": 7 }), "does not exist"),
            ("adapt", serde_json::json!({ "method": "nonsense" }), "adapt"),
            ("reboot", serde_json::json!({}), "unknown command"),
            ("set-policy", serde_json::json!({ "after_new_labels": "many" }), "bad arguments"),
        ] {
            let response = fleet.command("test-device", command, args, timeout).await.unwrap();
            assert!(!response.ok, "{command}: {response:?}");
            assert!(response.error.as_deref().unwrap().contains(phrase), "{command}: {response:?}");
        }
        let response =
            fleet.command("test-device", "set-policy", serde_json::json!({ "every_minutes": 600 }), timeout).await.unwrap();
        assert_eq!(response.result.unwrap()["every_minutes"], 600);

        // The promoted weights, fetched again on request, rebuild a bundle that classifies like
        // the device (f16 weights, so logits differ slightly).
        let (manifest, payload) = fleet.fetch_weights("test-device", None, timeout).await.unwrap();
        assert_eq!((manifest.version, manifest.dtype.as_str()), (1, "f16"));
        assert!(manifest.chunks > 1, "64 KiB packets split the weights");
        use edgeadapt::output::Overwrite;
        let rebuild = |out: &std::path::Path, overwrite| {
            edgeadapt::fleet::rebuild::bundle_from_weights(&bundle, &manifest, &payload, out, overwrite)
        };
        let out = dir.path().join("rebuilt");
        rebuild(&out, Overwrite::Refuse).unwrap();
        // An existing output is never replaced without being asked, and a folder that is not a
        // bundle never is.
        assert!(rebuild(&out, Overwrite::Refuse).unwrap_err().contains("already exists"));
        let precious = dir.path().join("precious");
        std::fs::create_dir(&precious).unwrap();
        std::fs::write(precious.join("notes.txt"), b"keep").unwrap();
        assert!(rebuild(&precious, Overwrite::Replace).unwrap_err().contains("not a bundle"));
        assert_eq!(std::fs::read(precious.join("notes.txt")).unwrap(), b"keep");
        rebuild(&out, Overwrite::Replace).unwrap();
        let rebuilt = Bundle::load(&out).unwrap();
        let mut classifier = Classifier::open(rebuilt, &RuntimeOptions::default()).unwrap();
        let probes: Vec<_> = ["2", "Q", "5", "X"]
            .iter()
            .flat_map(|c| {
                let test = fonts36.join("target/test").join(c);
                (0..10).map(move |n| test.join(format!("{n}.png")))
            })
            .collect();
        let inputs = edgeadapt::inference::prepare_files(&probes, &classifier.bundle.manifest.input, &Default::default());
        let inputs: Vec<_> = inputs.into_iter().map(|i| i.unwrap()).collect();
        let batch = edgeadapt::imaging::stack(&inputs.iter().map(|i| i.view()).collect::<Vec<_>>());
        let local = predict(classifier.logits(batch.view()).unwrap().view(), &classifier.bundle.head.classes, 1);
        let mut same = 0;
        for (probe, mine) in probes.iter().zip(&local) {
            let bytes = std::fs::read(probe).unwrap();
            let served: Prediction =
                agent.post(daemon.url("/v1/classify")).send(bytes.as_slice()).unwrap().body_mut().read_json().unwrap();
            same += usize::from(served.class == mine.class);
        }
        assert!(same >= probes.len() - 1, "{same} of {} predictions agree", probes.len());
    });

    // The fleet CLI speaks as the local commands do: tables and sentences, JSON on request.
    let fleet_cli = |args: &[&str]| {
        let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .args(["fleet", "--broker", &broker, "--fleet", "test-fleet", "--config"])
            .arg(&config)
            .args(args)
            .env("EDGEADAPT_LOG", "warn")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let text = fleet_cli(&["status", "--device", "test-device"]);
    assert!(text.contains("serving version 1\n") && text.contains("| version |"), "{text}");
    let status: serde_json::Value =
        serde_json::from_str(&fleet_cli(&["status", "--device", "test-device", "--json"])).unwrap();
    assert_eq!(status["serving"], 1);
    assert_eq!(fleet_cli(&["rollback", "--device", "test-device", "--to", "1"]), "test-device serves version 1\n");

    // A command too malformed to have an id is answered with an empty id.
    runtime.block_on(async {
        let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("raw", "127.0.0.1", mqtt_port), 10);
        client.publish("edgeadapt/v1/test-fleet/test-device/cmd", QoS::AtLeastOnce, false, "not json").await.unwrap();
        // Driven until the broker has taken the command; the device's answer is awaited below.
        let taken = tokio::time::timeout(Duration::from_secs(10), async {
            while !matches!(
                eventloop.poll().await.expect("the raw client's connection"),
                Event::Incoming(Packet::PubAck(_))
            ) {}
        });
        taken.await.expect("the broker did not acknowledge the malformed command within 10 s");
    });
    wait_for(&messages, "the refusal", |m| {
        m.iter().any(|(t, p)| t.ends_with("/response") && json(p)["id"] == "" && json(p)["ok"] == false)
    });

    // Every event in the store was delivered, and the status names the served version.
    wait_for(&messages, "metrics", |m| m.iter().filter(|(t, _)| t.ends_with("/metrics")).count() >= 2);
    let db = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
    let stored: Vec<i64> = {
        let mut statement = db.prepare("SELECT id FROM events WHERE at_ms > ?1 ORDER BY id").unwrap();
        statement.query_map([recording_since], |row| row.get(0)).unwrap().map(|r| r.unwrap()).collect()
    };
    wait_for(&messages, "every stored event", |m| {
        let received: BTreeSet<i64> =
            m.iter().filter(|(t, _)| t.ends_with("/events")).map(|(_, p)| json(p)["id"].as_i64().unwrap()).collect();
        stored.iter().all(|id| received.contains(id))
    });
    assert!(stored.len() > 30, "only {} events recorded", stored.len());
    let undelivered: i64 = db.query_row("SELECT COUNT(*) FROM events WHERE delivered = 0", [], |r| r.get(0)).unwrap();
    assert!(undelivered <= 2, "{undelivered} events still undelivered");

    daemon.stop();
    let status_topic = status_topic.to_string();
    wait_for(&messages, "the offline status", |m| {
        m.iter().any(|(t, p)| *t == status_topic && json(p)["online"] == false && json(p)["reason"] == "shutdown")
    });

    // Every message matches the documented example for its leaf: the same fields.
    let examples = documented_examples();
    let messages = messages.lock().unwrap();
    let mut checked = BTreeSet::new();
    for (topic, payload) in messages.iter() {
        let (_, leaf) = edgeadapt::protocol::topics::parse("test-fleet", topic).unwrap();
        let leaf = if leaf.contains("/chunk/") {
            continue;
        } else if leaf.ends_with("/manifest") {
            "weights-manifest".to_string()
        } else {
            leaf
        };
        if leaf == "cmd" {
            continue;
        }
        let message = json(payload);
        let documented = examples.get(&leaf).unwrap_or_else(|| panic!("docs/mqtt.md has no example for {leaf}"));
        let fits = documented.iter().any(|example| {
            let required: BTreeSet<String> = keys(example);
            let got = keys(&message);
            // Optional fields are absent rather than null; every field sent must be documented.
            got.is_subset(&required) && got.len() + 3 >= required.len()
        });
        assert!(
            fits,
            "{leaf} message has fields {:?}, docs/mqtt.md documents {:?}",
            keys(&message),
            documented.iter().map(keys).collect::<Vec<_>>()
        );
        checked.insert(leaf);
    }
    for leaf in ["status", "metrics", "events", "response", "weights-manifest"] {
        assert!(checked.contains(leaf), "no {leaf} message was seen");
    }
}

/// While the model warms up, the device's retained status says it is starting and for how long;
/// a failed start says why; neither is followed by a Last Will.
#[test]
fn a_starting_agent_shows_its_warm_up_on_the_status_topic() {
    use edgeadapt::config::MqttConfig;
    use edgeadapt::fleet::connect::{StartProgress, announce_start};

    let port = start_embedded_broker();
    let messages = collect(port);
    let config = MqttConfig {
        enabled: true,
        broker: format!("mqtt://127.0.0.1:{port}"),
        fleet: "warm".into(),
        ..MqttConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        for (device, outcome) in
            [("starts", StartProgress::Ready), ("fails", StartProgress::Failed("no bundle".into()))]
        {
            let (progress, watcher) = tokio::sync::watch::channel(StartProgress::WarmingUp(0));
            let announcer = tokio::spawn(announce_start(config.clone(), device.into(), None, watcher));
            let topic = format!("edgeadapt/v1/warm/{device}/status");
            let first = format!("the starting status from {device}");
            wait_for_async(&messages, &first, |m| m.iter().any(|(t, _)| *t == topic)).await;
            // Refreshed at most every five seconds of warm-up: 1 and 3 publish nothing. A watch
            // channel keeps only its newest value, so each one is left a moment to be seen.
            for seconds in [1, 3] {
                progress.send(StartProgress::WarmingUp(seconds)).unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            progress.send(StartProgress::WarmingUp(6)).unwrap();
            let refreshed = format!("the 6 s status from {device}");
            wait_for_async(&messages, &refreshed, |m| {
                m.iter().any(|(t, p)| *t == topic && json(p)["reason"] == "starting: warming up the model (6 s)")
            })
            .await;
            progress.send(outcome).unwrap();
            let finished = tokio::time::timeout(Duration::from_secs(10), announcer).await;
            finished.unwrap_or_else(|_| panic!("the announcer for {device} did not return within 10 s")).unwrap();
        }
    });
    let reasons = |all: &[(String, Vec<u8>)], device: &str| -> Vec<String> {
        let topic = format!("edgeadapt/v1/warm/{device}/status");
        let statuses: Vec<serde_json::Value> = all.iter().filter(|(t, _)| *t == topic).map(|(_, p)| json(p)).collect();
        for status in &statuses {
            assert_eq!(status["online"], false, "{status}");
            let documented = &documented_examples()["status"][1];
            assert_eq!(keys(status), keys(documented), "{status}");
        }
        statuses.iter().map(|s| s["reason"].as_str().unwrap().to_string()).collect()
    };
    wait_for(&messages, "the failed start", |all| reasons(all, "fails").len() == 3);
    // The broker publishes a Last Will a moment after it sees a connection close (rumqttd waits on
    // a timer), so Wills of connections closed within that moment may come out in either order.
    // Canaries that close without a DISCONNECT, one after the other's Will arrived: once the
    // second one's Will is here, a Will of either announcer would have come before it.
    for canary in ["canary-1", "canary-2"] {
        let will_topic = format!("edgeadapt/v1/warm/{canary}/will");
        runtime.block_on(async {
            let mut options = MqttOptions::new(canary, "127.0.0.1", port);
            options.set_last_will(LastWill::new(&will_topic, "gone", QoS::AtLeastOnce, false));
            let (_client, mut eventloop) = AsyncClient::new(options, 10);
            let connected = tokio::time::timeout(Duration::from_secs(10), async {
                while !matches!(
                    eventloop.poll().await.expect("the canary's connection"),
                    Event::Incoming(Packet::ConnAck(_))
                ) {}
            });
            connected.await.expect("the canary was not accepted within 10 s");
            // Dropping the event loop closes the connection without a DISCONNECT.
        });
        wait_for(&messages, &format!("the Last Will of {canary}"), |all| all.iter().any(|(t, _)| *t == will_topic));
    }
    let all = messages.lock().unwrap();
    assert_eq!(
        reasons(&all, "starts"),
        vec!["starting: warming up the model (0 s)", "starting: warming up the model (6 s)"]
    );
    assert_eq!(
        reasons(&all, "fails"),
        vec!["starting: warming up the model (0 s)", "starting: warming up the model (6 s)", "start failed: no bundle"]
    );
}

/// Operator keys end to end: `fleet keygen` makes the pair, the device trusts the public key,
/// a command signed with the private key runs (and its label records the key's name), the
/// `fleet` command line signs with `--signing-key`, and an unsigned command or one from a key
/// the device does not trust is refused and changes nothing.
#[test]
fn commands_signed_with_an_operator_key_run_and_others_are_refused() {
    use edgeadapt::protocol::signing::Signer;

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let keygen = |out: &std::path::Path, name: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .args(["fleet", "keygen", "--out", out.to_str().unwrap(), "--name", name])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    keygen(&keys, "ana");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("operator.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is readable by its owner only");
    }
    let stranger = dir.path().join("stranger");
    keygen(&stranger, "mallory");

    let (http_port, mqtt_port) = (free_port(), free_port());
    let extra = format!(
        "[mqtt]\nenabled = true\nembedded_listen = \"127.0.0.1:{mqtt_port}\"\nfleet = \"signed\"\n\
         operator_keys_file = \"{}\"\n",
        keys.join("operator.pub").display()
    );
    let config = write_config(dir.path(), http_port, &extra);
    let daemon = Daemon::start(&config, http_port, &dir.path().join("daemon.log"));
    let signer = |folder: &std::path::Path| {
        Signer::operator_from_pem(&std::fs::read_to_string(folder.join("operator.key")).unwrap()).unwrap()
    };
    let url = format!("mqtt://127.0.0.1:{mqtt_port}");
    let image = std::fs::read(repo().join("target/data/fonts36/target/adapt/A/0.png")).unwrap();
    let label = serde_json::json!({
        "class": "A",
        "image_base64": base64::engine::general_purpose::STANDARD.encode(&image),
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let connect = |signer: Option<Signer>| {
            let options = BrokerOptions { signer, ..BrokerOptions::plain(url.clone(), "signed") };
            FleetClient::connect(options, Duration::from_secs(30))
        };
        let wait = Duration::from_secs(60);
        let mut unsigned = connect(None).await.unwrap();
        let refused = unsigned.command("test-device", "label", label.clone(), wait).await.unwrap();
        assert!(!refused.ok);
        assert_eq!(refused.error.as_deref(), Some("unauthorised: the command is not signed"));
        let mut mallory = connect(Some(signer(&stranger))).await.unwrap();
        let refused = mallory.command("test-device", "label", label.clone(), wait).await.unwrap();
        assert!(refused.error.unwrap().contains("no operator key this device trusts"));

        let mut ana = connect(Some(signer(&keys))).await.unwrap();
        let accepted = ana.command("test-device", "label", label.clone(), wait).await.unwrap();
        assert!(accepted.ok, "{accepted:?}");
    });
    let db = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
    let labelled_by: Vec<Option<String>> = db
        .prepare("SELECT labelled_by FROM samples ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(labelled_by, vec![Some("ana".to_string())], "one sample, by the key that signed its command");

    // The command line signs with --signing-key; without a key it is refused.
    let fleet_status = |key: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"));
        command.args(["fleet", "--broker", &url, "--fleet", "signed", "status", "--device", "test-device"]);
        command.args(["--timeout", "60", "--json"]);
        if let Some(key) = key {
            command.arg("--signing-key").arg(key);
        }
        command.output().unwrap()
    };
    let signed = fleet_status(Some(&keys.join("operator.key")));
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    let status: serde_json::Value = serde_json::from_slice(&signed.stdout).unwrap();
    assert_eq!(status["device_id"], "test-device");
    let refused = fleet_status(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unauthorised: the command is not signed"));
    daemon.stop();
}

/// An artefact sent in chunks over the broker: a forged chunk is refused on arrival and a
/// missing one stays missing, the chunks held survive the agent's restart, and the resumed send
/// completes by sending only what is missing.
#[test]
fn an_artefact_arrives_in_verified_chunks_and_resumes_after_a_restart() {
    use edgeadapt::protocol::topics::DeviceTopics;
    use edgeadapt::protocol::transfer::{ArtefactKind, make};

    let dir = tempfile::tempdir().unwrap();
    // A broker of the test's own, which stays up while the agent restarts.
    let (http_port, mqtt_port) = (free_port(), start_embedded_broker());
    let extra = format!(
        "[mqtt]\nenabled = true\nbroker = \"mqtt://127.0.0.1:{mqtt_port}\"\nfleet = \"artefacts\"\n\
         max_packet_bytes = 65536\nreconnect_min_ms = 100\n"
    );
    let config = write_config(dir.path(), http_port, &extra);
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start(&config, http_port, &log);
    let payload: Vec<u8> = (0..600_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (manifest, chunks) = make(ArtefactKind::Bundle, "bundle-x", &payload, 65536, serde_json::Value::Null);
    assert_eq!(chunks.len(), 10);
    let url = format!("mqtt://127.0.0.1:{mqtt_port}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let missing = |answer: &serde_json::Value| -> Vec<u64> {
        answer["missing"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect()
    };
    runtime.block_on(async {
        let mut fleet = FleetClient::connect(BrokerOptions::plain(url.clone(), "artefacts"), Duration::from_secs(30))
            .await
            .unwrap();
        let first = offer(&mut fleet, &manifest).await;
        assert_eq!(missing(&first).len(), 10);
        // Chunk 0 forged, chunk 2 lost on the way, the rest as they should be.
        let topics = DeviceTopics::new("artefacts", "test-device");
        let mut sent = Vec::new();
        for (index, chunk) in chunks.iter().enumerate().filter(|(i, _)| *i != 2) {
            let mut bytes = chunk.to_vec();
            if index == 0 {
                bytes[100] ^= 0x5a;
            }
            sent.push((topics.inbound_chunk(&manifest.transfer, index), bytes));
        }
        publish_all(mqtt_port, sent).await;
        let second = offer(&mut fleet, &manifest).await;
        assert_eq!(missing(&second), vec![0, 2], "{second}");
        assert_eq!(second["complete"], false);
    });
    assert!(!common::log_lines(&log, "chunk refused").is_empty(), "the forged chunk is logged");
    daemon.stop();

    let daemon = Daemon::start(&config, http_port, &log);
    runtime.block_on(async {
        let mut fleet = FleetClient::connect(BrokerOptions::plain(url.clone(), "artefacts"), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(missing(&offer(&mut fleet, &manifest).await), vec![0, 2], "the chunks held survive a restart");
        let mut seen = Vec::new();
        let done = fleet
            .send_artefact("test-device", &manifest, &chunks, Duration::from_secs(30), &mut |received, total| {
                seen.push((received, total))
            })
            .await
            .unwrap();
        assert_eq!(done["complete"], true, "{done}");
        assert_eq!(seen.first(), Some(&(8, 10)), "the resumed send starts from what the device holds");
        assert_eq!(seen.last(), Some(&(10, 10)));
    });
    daemon.stop();
}

/// Publishes each `(topic, payload)` at QoS 1 from a client of its own and waits for the
/// broker's acknowledgement of every one.
async fn publish_all(port: u16, messages: Vec<(String, Vec<u8>)>) {
    let mut options = MqttOptions::new(format!("raw-{}", rand::random::<u32>()), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let count = messages.len();
    for (topic, payload) in messages {
        client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        while acked < count {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await
    .expect("the broker acknowledged every chunk");
}

/// Offers `manifest` to the test device and returns its answer.
async fn offer(
    fleet: &mut FleetClient,
    manifest: &edgeadapt::protocol::transfer::TransferManifest,
) -> serde_json::Value {
    let args = serde_json::to_value(manifest).unwrap();
    let response = fleet.command("test-device", "offer", args, Duration::from_secs(30)).await.unwrap();
    assert!(response.ok, "{response:?}");
    response.result.unwrap()
}

/// `fleet adopt`: a version one device made reaches another through the broker, and the
/// receiver judges it with its own gate on its own samples, records it as its own version and
/// answers with the verdict; a receiver that does not answer is reported as failed.
#[test]
fn a_version_made_on_one_device_is_adopted_by_another_through_its_own_gate() {
    let broker = start_embedded_broker();
    let url = format!("mqtt://127.0.0.1:{broker}");
    let gate = "[gate]\nmax_seen_drop = 1.0\nmax_unseen_rate_drop = 1.0\nmax_reference_drop = 1.0\n";
    let start = |dir: &std::path::Path, device: &str| {
        let port = free_port();
        let extra = format!(
            "[adaptation]\nmethod = \"ft-tail+alg\"\n{gate}[mqtt]\nenabled = true\nbroker = \"{url}\"\n\
             fleet = \"adopt\"\nmax_packet_bytes = 65536\n"
        );
        let config = write_config(dir, port, &extra);
        let text = std::fs::read_to_string(&config).unwrap().replace("\"test-device\"", &format!("\"{device}\""));
        std::fs::write(&config, text).unwrap();
        Daemon::start(&config, port, &dir.join("daemon.log"))
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (maker, receiver) = (start(dir_a.path(), "maker"), start(dir_b.path(), "receiver"));
    let fonts36 = repo().join("target/data/fonts36/target/adapt");
    let agent = http();
    for daemon in [&maker, &receiver] {
        for class in ["0", "1", "2"] {
            for n in 0..6 {
                let bytes = std::fs::read(fonts36.join(class).join(format!("{n}.png"))).unwrap();
                let response = agent.post(daemon.url("/v1/label")).query("class", class).send(bytes.as_slice());
                assert_eq!(response.unwrap().status(), 200);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut fleet =
            FleetClient::connect(BrokerOptions::plain(url.clone(), "adopt"), Duration::from_secs(30)).await.unwrap();
        let made = fleet.command("maker", "adapt", serde_json::json!({}), Duration::from_secs(300)).await.unwrap();
        assert!(made.ok && made.result.as_ref().unwrap()["promoted"] == true, "{made:?}");
    });
    let adopt = |to: &str, timeout: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .args(["fleet", "--broker", &url, "--fleet", "adopt", "--max-packet-bytes", "65536"])
            .args(["adopt", "--from", "maker@1", "--to", to])
            .args(["--timeout", timeout, "--json"])
            .output()
            .unwrap()
    };
    let output = adopt("receiver", "120");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let answers: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let verdict = &answers["receiver"];
    assert_eq!(verdict["promoted"], true, "{answers}");
    assert_eq!(verdict["version"], 1, "the receiver's own first version");
    assert!(verdict["method"].as_str().unwrap().starts_with("adopted maker@1 (ft-tail+alg)"), "{verdict}");
    assert!(
        verdict["metrics"]["gate"]["seen_validation"].is_array(),
        "judged on the receiver's own validation samples"
    );
    let status =
        agent.get(receiver.url("/v1/status")).call().unwrap().body_mut().read_json::<serde_json::Value>().unwrap();
    assert_eq!(status["serving"], 1);

    eprintln!("adopting took the receiver {} s (decoding and its gate)", verdict["metrics"]["seconds"]);
    // A device that does not answer fails clearly.
    let missing = adopt("nobody", "3");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nobody: adopt failed"), "{missing:?}");
    maker.stop();
    receiver.stop();
}
