//! The fleet interface's figures on loopback, against the embedded broker (rumqttd) and
//! Mosquitto when installed: raw publish throughput (QoS 1, event-sized messages), end-to-end
//! command latency through a running agent, time to publish and verify a weights set, and its
//! bytes on the wire in f16 against f32.
//!
//! `cargo bench --bench fleet` (after `tools/setup.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeadapt::fleet::client::{BrokerOptions, FleetClient};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Messages/s from one publisher to one subscriber, QoS 1 both ways, `count` messages of `size`.
async fn throughput(port: u16, count: usize, size: usize) -> f64 {
    let (sub, mut sub_loop) = AsyncClient::new(MqttOptions::new("bench-sub", "127.0.0.1", port), 1000);
    let (publisher, mut pub_loop) = AsyncClient::new(MqttOptions::new("bench-pub", "127.0.0.1", port), 1000);
    sub.subscribe("bench/throughput", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.unwrap() {
            break;
        }
    }
    let payload = vec![b'x'; size];
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..count {
            publisher.publish("bench/throughput", QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
        }
        publisher
    });
    let driver = tokio::spawn(async move {
        loop {
            if pub_loop.poll().await.is_err() {
                break;
            }
        }
    });
    let mut received = 0;
    while received < count {
        if let Event::Incoming(Packet::Publish(_)) = sub_loop.poll().await.unwrap() {
            received += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(sender.await);
    driver.abort();
    count as f64 / seconds
}

fn daemon_config(dir: &Path, http: u16, broker: &str) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"bench-device\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [adaptation]\nmethod = \"ft-tail+prior\"\n[mqtt]\nenabled = true\nbroker = \"{broker}\"\nfleet = \"bench\"\n",
            repo().join("models/efficientnet-lite0-fonts36").display(),
            dir.join("data").display()
        ),
    )
    .unwrap();
    config
}

struct Figures {
    throughput: f64,
    latency: (f64, f64),
    weights_seconds: f64,
    f16_bytes: usize,
    f32_bytes: usize,
}

fn measure(broker_port: u16) -> Figures {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let throughput = runtime.block_on(throughput(broker_port, 20_000, 400));

    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = daemon_config(dir.path(), http, &format!("mqtt://127.0.0.1:{broker_port}"));
    let child = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("EDGEADAPT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _daemon = Killed(child);
    wait_port(http);
    // Labels of two classes and some traffic, so that the device has a version to publish.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let data = repo().join("target/data/fonts36/target/adapt");
    assert!(data.is_dir(), "run tools/setup.sh first");
    for class in ["3", "K"] {
        for n in 0..20 {
            let bytes = std::fs::read(data.join(class).join(format!("{n}.png"))).unwrap();
            agent
                .post(format!("http://127.0.0.1:{http}/v1/label"))
                .query("class", class)
                .send(bytes.as_slice())
                .unwrap();
        }
    }
    let options = BrokerOptions::plain(format!("mqtt://127.0.0.1:{broker_port}"), "bench");
    runtime.block_on(async {
        let mut fleet = FleetClient::connect(options, Duration::from_secs(10)).await.unwrap();
        let timeout = Duration::from_secs(60);
        let response = fleet.command("bench-device", "adapt", serde_json::json!({}), timeout).await.unwrap();
        assert!(response.ok, "{response:?}");
        let mut latencies = Vec::new();
        for _ in 0..200 {
            let started = Instant::now();
            let response = fleet.command("bench-device", "status", serde_json::json!({}), timeout).await.unwrap();
            assert!(response.ok);
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let latency = (percentile(&mut latencies.clone(), 0.5), percentile(&mut latencies, 0.99));
        let started = Instant::now();
        let (manifest, payload) = fleet.fetch_weights("bench-device", None, timeout).await.unwrap();
        let weights_seconds = started.elapsed().as_secs_f64();
        let db = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
        let f32_bytes: usize = db
            .query_row("SELECT LENGTH(weights) FROM versions WHERE id = ?1", [manifest.version], |r| r.get::<_, i64>(0))
            .unwrap() as usize;
        Figures { throughput, latency, weights_seconds, f16_bytes: payload.len(), f32_bytes }
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut rows = Vec::new();
    let embedded = free_port();
    edgeadapt::fleet::broker::start(format!("127.0.0.1:{embedded}").parse().unwrap(), 256 * 1024).unwrap();
    rows.push(("embedded (rumqttd)", measure(embedded)));
    let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].iter().map(PathBuf::from).find(|p| p.is_file());
    let _broker = match mosquitto {
        Some(binary) => {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nset_tcp_nodelay true\n"),
            )
            .unwrap();
            let child =
                Command::new(binary).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            let broker = Killed(child);
            wait_port(port);
            rows.push(("Mosquitto", measure(port)));
            Some((broker, dir))
        }
        None => {
            println!("Mosquitto is not installed; its row is left out (apt-get install mosquitto)");
            None
        }
    };
    println!(
        "\n| broker | publish, QoS 1, 400 B (msg/s) | command round trip p50 / p99 (ms) | weights set: request to verified (s) | weights bytes f16 / f32 |"
    );
    println!("|---|---|---|---|---|");
    for (name, f) in rows {
        println!(
            "| {name} | {:.0} | {:.1} / {:.1} | {:.2} | {} / {} ({:.2}) |",
            f.throughput,
            f.latency.0,
            f.latency.1,
            f.weights_seconds,
            f.f16_bytes,
            f.f32_bytes,
            f.f16_bytes as f64 / f.f32_bytes as f64
        );
    }
}
