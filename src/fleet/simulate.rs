//! `fleet simulate`: N simulated devices (`sim_device`) on one broker, each with its own MQTT
//! connection, retained status and Last Will, metrics every few seconds, a stream of events,
//! and answers to `status`, `offer` (with its chunks) and `deploy`. A watcher in the same
//! process measures how far behind the fleet's messages it is. For load tests of a broker,
//! `fleet watch` and `fleet deploy`; no model is loaded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

use super::client::{BrokerOptions, FleetClient};
use super::sim_device::SimDevice;
use crate::protocol::broker_address::BrokerAddress;
use crate::protocol::topics::{self, DeviceTopics};

#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub devices: usize,
    pub prefix: String,
    pub metrics_every: Duration,
    pub events_every: Duration,
    pub duration: Duration,
    /// Devices connecting per second at the start, so a thousand do not storm the broker.
    pub connects_per_s: u32,
}

/// What the simulation measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SimReport {
    pub devices: usize,
    pub connected: u64,
    pub seconds: f64,
    pub published: u64,
    pub received: u64,
    pub commands: u64,
    pub watcher_messages: u64,
    pub watcher_lag_ms_p50: f64,
    pub watcher_lag_ms_p99: f64,
    pub watcher_lag_ms_max: f64,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    published: AtomicU64,
    received: AtomicU64,
    commands: AtomicU64,
}

/// Runs the simulated fleet and a watcher for `options.duration`; `tick` gets the counts
/// about every five seconds.
pub async fn simulate(
    broker: &BrokerOptions,
    options: &SimulateOptions,
    tick: &mut dyn FnMut(&SimReport),
) -> anyhow::Result<SimReport> {
    let (host, port) = match BrokerAddress::parse(&broker.url).map_err(anyhow::Error::msg)? {
        BrokerAddress::Tcp { host, port } => (host, port),
        BrokerAddress::Embedded => ("127.0.0.1".into(), 1883),
        BrokerAddress::Tls { .. } => anyhow::bail!("fleet simulate speaks plain mqtt:// only"),
    };
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut watcher = FleetClient::connect(broker.clone(), Duration::from_secs(30)).await?;
    for leaf in ["status", "metrics", "events"] {
        watcher.subscribe(topics::fleet_filter(&broker.fleet, leaf)).await?;
    }
    let gap = Duration::from_secs_f64(1.0 / options.connects_per_s.max(1) as f64);
    // Devices start while the watcher already reads, so it is never behind by the start itself.
    tasks.spawn({
        let (options, counters, fleet, max_packet) =
            (options.clone(), Arc::clone(&counters), broker.fleet.clone(), broker.max_packet_bytes);
        async move {
            let mut devices = tokio::task::JoinSet::new();
            for n in 0..options.devices {
                let name = format!("{}-{n:04}", options.prefix);
                let device = SimDevice::new(&name, &fleet, max_packet);
                devices.spawn(run_device(
                    device,
                    host.clone(),
                    port,
                    options.clone(),
                    Arc::clone(&counters),
                    max_packet,
                ));
                tokio::time::sleep(gap).await;
            }
            while devices.join_next().await.is_some() {}
        }
    });
    let mut lags: Vec<f64> = Vec::new();
    let mut reported = Instant::now();
    let deadline = started + options.duration;
    while Instant::now() < deadline {
        if let Some(publish) = watcher.next_publish(Duration::from_millis(200)).await? {
            let value: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap_or_default();
            // Retained messages from before this run say nothing about lag.
            if let Some(at) = value["at_ms"].as_i64().filter(|_| !publish.retain) {
                lags.push((crate::store::now_ms() - at).max(0) as f64);
            }
        }
        if reported.elapsed() >= Duration::from_secs(5) {
            tick(&report(options, &counters, started, &mut lags.clone()));
            reported = Instant::now();
        }
    }
    tasks.abort_all();
    Ok(report(options, &counters, started, &mut lags))
}

fn report(options: &SimulateOptions, counters: &Counters, started: Instant, lags: &mut [f64]) -> SimReport {
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| if lags.is_empty() { 0.0 } else { lags[((lags.len() - 1) as f64 * q).round() as usize] };
    SimReport {
        devices: options.devices,
        connected: counters.connected.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        published: counters.published.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        commands: counters.commands.load(Ordering::Relaxed),
        watcher_messages: lags.len() as u64,
        watcher_lag_ms_p50: at(0.5),
        watcher_lag_ms_p99: at(0.99),
        watcher_lag_ms_max: lags.last().copied().unwrap_or(0.0),
    }
}

async fn run_device(
    mut device: SimDevice,
    host: String,
    port: u16,
    options: SimulateOptions,
    counters: Arc<Counters>,
    max_packet: usize,
) {
    let topics = DeviceTopics::new(&device.status(false, "", 0).fleet, &device.name);
    let mut mqtt = MqttOptions::new(format!("edgeadapt-sim-{}", device.name), host, port);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_max_packet_size(max_packet + 4096, max_packet + 4096);
    let will = serde_json::to_vec(&device.status(false, "connection lost", 0)).expect("statuses serialise");
    mqtt.set_last_will(LastWill::new(topics.status(), will, QoS::AtLeastOnce, true));
    let (client, mut eventloop) = AsyncClient::new(mqtt, 256);
    let publish = |topic: String, payload: Vec<u8>, retain: bool| {
        counters.published.fetch_add(1, Ordering::Relaxed);
        let client = client.clone();
        async move { client.publish(topic, QoS::AtLeastOnce, retain, payload).await }
    };
    // Spread the devices' timers over the period, as real devices started at different times.
    let offset = Duration::from_millis(rand::random::<u64>() % options.metrics_every.as_millis().max(1) as u64);
    let mut metrics = tokio::time::interval_at(tokio::time::Instant::now() + offset, options.metrics_every);
    let mut events = tokio::time::interval_at(tokio::time::Instant::now() + offset, options.events_every);
    let mut seconds = tokio::time::interval(Duration::from_secs(1));
    let mut probations: Vec<(i64, String, String)> = Vec::new();
    loop {
        tokio::select! {
            polled = eventloop.poll() => match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = client.subscribe(topics.commands(), QoS::AtLeastOnce).await;
                    let _ = client.subscribe(topics.inbound_filter(), QoS::AtLeastOnce).await;
                    let status = device.status(true, "started", crate::store::now_ms());
                    let _ = publish(topics.status(), json(&status), true).await;
                }
                Ok(Event::Incoming(Packet::Publish(message))) => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    if let Some((transfer, index)) = topics.parse_inbound(&message.topic) {
                        let _ = device.on_chunk(&transfer, index, &message.payload);
                    } else if message.topic == topics.commands() {
                        counters.commands.fetch_add(1, Ordering::Relaxed);
                        let reply = device.on_command(&message.payload, crate::store::now_ms());
                        for event in &reply.events {
                            let _ = publish(topics.events(), json(event), false).await;
                        }
                        let _ = publish(topics.responses(), json(&reply.response), false).await;
                        probations.extend(reply.in_service_at);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            },
            _ = metrics.tick() => {
                let now = crate::store::now_ms();
                let _ = publish(topics.metrics(), json(&device.metrics(now)), true).await;
            }
            _ = seconds.tick(), if !probations.is_empty() => {
                let now = crate::store::now_ms();
                let ended: Vec<_> = probations.iter().filter(|(at, ..)| *at <= now).cloned().collect();
                probations.retain(|(at, ..)| *at > now);
                for (_, transfer, bundle) in ended {
                    let event = device.in_service(&transfer, &bundle, now);
                    let _ = publish(topics.events(), json(&event), false).await;
                }
            }
            _ = events.tick() => {
                let payload = serde_json::json!({ "id": 1, "class": "A", "split": "train", "origin": "simulated" });
                let event = device.event("sample.ingested", payload, crate::store::now_ms());
                let _ = publish(topics.events(), json(&event), false).await;
            }
        }
    }
}

fn json(message: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(message).expect("messages serialise")
}
