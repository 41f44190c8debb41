//! The on-site story of `edgeadapt demo`: an agent with its embedded MQTT broker starts on the
//! bundled model, local traffic comes in, staff label a few classes, the fleet asks for an
//! adaptation, held-out accuracy is compared before and after, the published weights and events
//! are shown as a fleet watcher saw them, and the fleet rolls the device back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::table::Table;
use crate::dataset::read_image_folder;
use crate::fleet::client::{BrokerOptions, FleetClient, FleetView};
use crate::inference::Prediction;
use crate::runtime::RuntimeOptions;

/// Classes the site labels.
const SEEN: [&str; 8] = ["0", "2", "4", "6", "A", "C", "E", "G"];
const DEVICE: &str = "demo-device";

struct Agent {
    child: Child,
    http: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The agent's `[runtime]` table: the demo's own, so that the story runs on the same providers.
#[derive(serde::Serialize)]
struct RuntimeSection<'a> {
    runtime: &'a RuntimeOptions,
}

fn start_agent(
    bundle: &Path,
    runtime: &RuntimeOptions,
    work: &Path,
    http_port: u16,
    mqtt_port: u16,
) -> anyhow::Result<Agent> {
    if work.exists() {
        // Only the demo's own earlier folder is cleared: one with its config, or an empty one.
        let ours = std::fs::read_to_string(work.join("config.toml"))
            .is_ok_and(|text| text.starts_with(&format!("device_id = \"{DEVICE}\"")));
        let empty = std::fs::read_dir(work).is_ok_and(|mut entries| entries.next().is_none());
        anyhow::ensure!(
            ours || empty,
            "{} exists and is not the demo's working folder; move it away or run the demo elsewhere",
            work.display()
        );
        std::fs::remove_dir_all(work)?;
    }
    std::fs::create_dir_all(work)?;
    let config = work.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"{DEVICE}\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [mqtt]\nenabled = true\nembedded_listen = \"127.0.0.1:{mqtt_port}\"\nfleet = \"demo\"\nmetrics_every_s = 1\n",
            std::fs::canonicalize(bundle)?.display(),
            work.join("data").display()
        ) + &toml::to_string(&RuntimeSection { runtime })?,
    )?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("EDGEADAPT_LOG", "warn,rumqttd=off")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let agent = Agent { child, http: format!("http://127.0.0.1:{http_port}") };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", http_port)).is_err()
    {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

/// Held-out accuracy on the seen and the unseen classes, through the agent's endpoint.
fn evaluate(http: &ureq::Agent, agent: &Agent, images: &[(String, PathBuf)], what: &str) -> anyhow::Result<[f64; 3]> {
    let bar = super::progress_bar(images.len(), what);
    let mut counts = [(0usize, 0usize); 2];
    for (class, path) in images {
        let bytes = std::fs::read(path)?;
        let prediction: Prediction = http
            .post(format!("{}/v1/classify", agent.http))
            .query("name", path.display().to_string())
            .send(bytes.as_slice())?
            .body_mut()
            .read_json()?;
        let group = usize::from(!SEEN.contains(&class.as_str()));
        counts[group].0 += usize::from(&prediction.class == class);
        counts[group].1 += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rate = |(c, t): (usize, usize)| 100.0 * c as f64 / t.max(1) as f64;
    let overall = 100.0 * (counts[0].0 + counts[1].0) as f64 / (counts[0].1 + counts[1].1).max(1) as f64;
    Ok([rate(counts[0]), rate(counts[1]), overall])
}

pub fn run(bundle: &Path, runtime: &RuntimeOptions, data: &Path, classes: &[String]) -> anyhow::Result<()> {
    println!("## On site: label, adapt, check, roll back\n");
    let (http_port, mqtt_port) = (free_port()?, free_port()?);
    let work = PathBuf::from("target/demo-agent");
    let agent = start_agent(bundle, runtime, &work, http_port, mqtt_port)?;
    println!(
        "agent `{DEVICE}` running on the bundled model, HTTP {} and embedded MQTT broker on 127.0.0.1:{mqtt_port}",
        agent.http
    );
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();

    // A fleet watcher, in the background, as an operator would run `edgeadapt fleet watch`.
    let options = BrokerOptions::plain(format!("mqtt://127.0.0.1:{mqtt_port}"), "demo");
    let watcher_options = options.clone();
    let (stop_watch, stopped) = std::sync::mpsc::channel::<()>();
    let watcher = std::thread::spawn(move || -> anyhow::Result<FleetView> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut client = FleetClient::connect(watcher_options, Duration::from_secs(10)).await?;
            let mut last = FleetView::default();
            loop {
                last = client.watch_more(last, Duration::from_millis(500)).await?;
                if stopped.try_recv().is_ok() {
                    return Ok(last);
                }
            }
        })
    });

    // Unlabelled local traffic: ten images of every class, labels unknown to the device.
    let adapt_images = read_image_folder(&data.join("target/adapt"), classes)?;
    let mut per_class: BTreeMap<usize, usize> = BTreeMap::new();
    let traffic: Vec<_> = adapt_images
        .iter()
        .filter(|i| {
            let n = per_class.entry(i.label).or_default();
            *n += 1;
            *n <= 10
        })
        .collect();
    let bar = super::progress_bar(traffic.len(), "traffic");
    for image in &traffic {
        let bytes = std::fs::read(&image.path)?;
        http.post(format!("{}/v1/classify", agent.http)).send(bytes.as_slice())?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let test: Vec<(String, PathBuf)> = read_image_folder(&data.join("target/test"), classes)?
        .into_iter()
        .map(|i| (classes[i.label].clone(), i.path))
        .collect();
    let before = evaluate(&http, &agent, &test, "held-out, source model")?;

    // On-site labelling of eight classes.
    let labelled: Vec<_> = adapt_images.iter().filter(|i| SEEN.contains(&classes[i.label].as_str())).collect();
    let bar = super::progress_bar(labelled.len(), "labelling");
    for image in &labelled {
        let bytes = std::fs::read(&image.path)?;
        let response = http
            .post(format!("{}/v1/label", agent.http))
            .query("class", &classes[image.label])
            .send(bytes.as_slice())?;
        anyhow::ensure!(response.status() == 200, "label refused: HTTP {}", response.status());
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{} traffic images classified, {} labels stored for classes {}",
        traffic.len(),
        labelled.len(),
        SEEN.join(" ")
    );

    // The fleet asks for an adaptation over MQTT and waits for the answer.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut fleet = runtime.block_on(FleetClient::connect(options, Duration::from_secs(10)))?;
    let started = Instant::now();
    let response = runtime.block_on(fleet.command(DEVICE, "adapt", serde_json::json!({}), Duration::from_secs(300)))?;
    anyhow::ensure!(response.ok, "adapt failed: {}", response.error.unwrap_or_default());
    let result = response.result.unwrap_or_default();
    println!(
        "`fleet adapt`: version {} {} after {:.1} s",
        result["version"],
        if result["promoted"] == true { "promoted by the safety gate" } else { "rejected by the safety gate" },
        started.elapsed().as_secs_f64()
    );
    let after = evaluate(&http, &agent, &test, "held-out, adapted")?;
    let mut table = Table::new(&["target/test (held out)", "source model", "adapted", "change"]);
    for (index, name) in
        ["seen classes (labelled on site)", "unseen classes (no labels)", "all classes"].iter().enumerate()
    {
        table.row(vec![
            name.to_string(),
            format!("{:.1}%", before[index]),
            format!("{:.1}%", after[index]),
            format!("{:+.1}", after[index] - before[index]),
        ]);
    }
    println!("\n{}\n", table.render());

    let (manifest, payload) = runtime.block_on(fleet.fetch_weights(DEVICE, None, Duration::from_secs(60)))?;
    println!(
        "published weights of version {}: {} tensors, {} bytes f16 in {} chunks, sha256 {}... verified",
        manifest.version,
        manifest.tensors.len(),
        payload.len(),
        manifest.chunks,
        &manifest.sha256[..12]
    );
    let response = runtime.block_on(fleet.command(
        DEVICE,
        "rollback",
        serde_json::json!({ "to": "source" }),
        Duration::from_secs(60),
    ))?;
    anyhow::ensure!(response.ok, "rollback failed: {}", response.error.unwrap_or_default());
    let rolled_back = evaluate(&http, &agent, &test, "held-out, after rollback")?;
    println!(
        "`fleet rollback --to source`: serving version {}; held-out accuracy {:.1}% again (source {:.1}%)\n",
        response.result.unwrap_or_default()["serving"],
        rolled_back[2],
        before[2]
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = stop_watch.send(());
    let view = watcher.join().map_err(|_| anyhow::anyhow!("the watcher failed"))??;
    println!("What the fleet watcher saw:\n\n{}", super::fleet::render(&view));
    if let Some(device) = view.devices.get(DEVICE) {
        println!("{} events received from {DEVICE}", device.events);
    }
    let _ = Command::new("kill").arg("-TERM").arg(agent.child.id().to_string()).status();
    Ok(())
}
