//! `edgeadapt run`: the agent as a long-running service. A loopback HTTP endpoint, a watched
//! folder and a labelling inbox feed the agent core; the adaptation policy starts runs; one run
//! at a time trains on its own thread while classification goes on.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::{Agent, AgentError, IngestError, Labelled, RunProgress, RunSummary, VersionRef, event, execute, policy};
use crate::adapt::train::{AdaptError, Cancel};
use crate::config::{AfterClassify, DeviceConfig};

/// Images classified together from the watched folder, and labelled together from the inbox.
const FOLDER_BATCH: usize = 32;
/// How often the policy is checked and traffic written out.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The state the daemon's tasks share.
pub struct Shared {
    pub agent: Mutex<Agent>,
    run: Mutex<Option<ActiveRun>>,
    /// The last finished run: its number and result.
    last_run: Mutex<Option<(u64, Result<RunSummary, String>)>>,
    runs_started: std::sync::atomic::AtomicU64,
    config: DeviceConfig,
    started: Instant,
}

struct ActiveRun {
    cancel: Cancel,
    progress: RunProgress,
}

/// Where a run request came from, for events.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Command,
    NewLabels,
    Schedule,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("an adaptation run is already in progress ({0})")]
    Busy(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl From<crate::store::StoreError> for StartError {
    fn from(error: crate::store::StoreError) -> StartError {
        StartError::Agent(error.into())
    }
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Agent> {
        // A panic while holding the lock leaves the agent usable: every change it makes is a
        // committed transaction or nothing.
        self.agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn status(&self) -> Result<super::Status, AgentError> {
        let mut status = self.lock().status()?;
        status.running = self.run.lock().expect("run lock").as_ref().map(|r| r.progress.clone());
        Ok(status)
    }

    /// Starts a run on its own thread; returns its number once it is planned.
    pub fn start_run(self: &Arc<Self>, method: Option<&str>, origin: Origin) -> Result<(u64, RunProgress), StartError> {
        let mut slot = self.run.lock().expect("run lock");
        if let Some(active) = slot.as_ref() {
            return Err(StartError::Busy(active.progress.method.clone()));
        }
        let plan = {
            let mut agent = self.lock();
            let plan = agent.prepare_run(method);
            match plan {
                Ok(plan) => {
                    agent.store().push_event(&event(
                        "adaptation.started",
                        serde_json::json!({
                            "method": plan.method_name, "origin": origin, "seen_classes": plan.seen,
                            "samples": plan.sample_set,
                        }),
                    ))?;
                    plan
                }
                Err(error) => {
                    // A policy-started run that cannot start must not retry at once.
                    let origin = serde_json::to_value(origin).ok().and_then(|v| v.as_str().map(String::from));
                    agent.record_refused_run(origin.as_deref().unwrap_or("command"), &error)?;
                    return Err(error.into());
                }
            }
        };
        let cancel = Cancel::default();
        let progress = RunProgress { method: plan.method_name.clone(), step: 0, steps: plan.planned_steps() };
        let id = self.runs_started.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        *slot = Some(ActiveRun { cancel: cancel.clone(), progress: progress.clone() });
        drop(slot);
        let shared = Arc::clone(self);
        std::thread::Builder::new()
            .name("adaptation".into())
            .spawn(move || {
                let mut reported = 0;
                let outcome = execute(&plan, &cancel, &mut |step, steps| {
                    if let Some(active) = shared.run.lock().expect("run lock").as_mut() {
                        active.progress.step = step;
                    }
                    // A progress event every tenth of the run.
                    let tenth = (step * 10) / steps.max(1);
                    if tenth > reported {
                        reported = tenth;
                        let payload = serde_json::json!({ "method": plan.method_name, "step": step, "steps": steps });
                        if let Err(error) = shared.lock().store().push_event(&event("adaptation.progress", payload)) {
                            tracing::warn!(%error, "cannot record progress");
                        }
                    }
                });
                let result = shared.lock().commit_run(&plan, outcome);
                match &result {
                    Ok(summary) if summary.promoted => tracing::info!(version = summary.version, "version promoted"),
                    Ok(summary) => {
                        tracing::warn!(version = summary.version, reasons = ?summary.reasons, "version rejected")
                    }
                    Err(error) => tracing::warn!(%error, "adaptation ended without a version"),
                }
                *shared.last_run.lock().expect("last run lock") = Some((id, result.map_err(|e| e.to_string())));
                *shared.run.lock().expect("run lock") = None;
            })
            .expect("threads can be spawned");
        Ok((id, progress))
    }

    /// Waits for run `id` to finish and returns its result.
    pub async fn wait_for_run(&self, id: u64) -> Result<RunSummary, String> {
        loop {
            if let Some((last, result)) = self.last_run.lock().expect("last run lock").as_ref()
                && *last >= id
            {
                return if *last == id { result.clone() } else { Err("the run's result was superseded".into()) };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a fleet command; a `publish-weights` also returns the set to publish.
    pub async fn execute(
        self: &Arc<Self>,
        command: crate::fleet::commands::Command,
    ) -> (Result<serde_json::Value, String>, Option<crate::fleet::link::LinkMessage>) {
        use crate::fleet::commands::Command;
        let shared = Arc::clone(self);
        let max_packet = self.config.mqtt.max_packet_bytes;
        match command {
            Command::Adapt { method } => {
                let started =
                    tokio::task::spawn_blocking(move || shared.start_run(method.as_deref(), Origin::Command)).await;
                match started {
                    Ok(Ok((id, _))) => {
                        let result = self.wait_for_run(id).await;
                        (result.map(|summary| serde_json::to_value(summary).expect("summaries serialise")), None)
                    }
                    Ok(Err(error)) => (Err(error.to_string()), None),
                    Err(error) => (Err(error.to_string()), None),
                }
            }
            Command::PublishWeights { version } => {
                let outcome = tokio::task::spawn_blocking(move || {
                    let agent = shared.lock();
                    let version = version.unwrap_or(agent.serving());
                    agent.weights_set(version, max_packet).map(|set| (version, set))
                })
                .await;
                match outcome {
                    Ok(Ok((version, (manifest, chunks)))) => {
                        let bytes: usize = chunks.iter().map(Vec::len).sum();
                        let result = serde_json::json!({ "version": version, "chunks": chunks.len(), "bytes": bytes });
                        (Ok(result), Some(crate::fleet::link::LinkMessage::Weights { version, manifest, chunks }))
                    }
                    Ok(Err(error)) => (Err(error.to_string()), None),
                    Err(error) => (Err(error.to_string()), None),
                }
            }
            other => {
                let outcome = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
                    let json = |v: serde_json::Result<serde_json::Value>| v.map_err(|e| e.to_string());
                    match other {
                        Command::Rollback { to } => {
                            let serving = shared.lock().rollback(to).map_err(|e| e.to_string())?;
                            Ok(serde_json::json!({ "serving": serving }))
                        }
                        Command::Status => json(serde_json::to_value(shared.status().map_err(|e| e.to_string())?)),
                        Command::SetPolicy(update) => {
                            json(serde_json::to_value(shared.lock().set_policy(&update).map_err(|e| e.to_string())?))
                        }
                        Command::Label { class, name, image } => {
                            let item = Labelled { what: &name, bytes: &image, class: &class };
                            let result = shared.lock().ingest(&[item], "mqtt").remove(0);
                            json(serde_json::to_value(result.map_err(|e| e.to_string())?))
                        }
                        Command::Adapt { .. } | Command::PublishWeights { .. } => unreachable!("handled above"),
                    }
                })
                .await;
                (outcome.unwrap_or_else(|e| Err(e.to_string())), None)
            }
        }
    }

    pub fn cancel_run(&self) -> bool {
        match self.run.lock().expect("run lock").as_ref() {
            Some(active) => {
                active.cancel.cancel();
                true
            }
            None => false,
        }
    }

    fn is_running(&self) -> bool {
        self.run.lock().expect("run lock").is_some()
    }
}

/// Runs the daemon until SIGINT or SIGTERM. `ready` is called once the endpoint listens.
pub async fn run(config: DeviceConfig, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let data_dir = config.require_data_dir().map_err(anyhow::Error::msg)?.to_path_buf();
    std::fs::create_dir_all(&data_dir)?;
    let _lock = lock_data_dir(&data_dir)?;
    let embedded_port = if config.mqtt.enabled { start_embedded_broker(&config)? } else { None };
    let agent = open_agent_announcing(&config, embedded_port).await?;
    let shared = Arc::new(Shared {
        agent: Mutex::new(agent),
        run: Mutex::new(None),
        last_run: Mutex::new(None),
        runs_started: std::sync::atomic::AtomicU64::new(0),
        config: config.clone(),
        started: Instant::now(),
    });
    {
        let mut agent = shared.lock();
        let serving = agent.serving();
        agent.store().push_event(&event(
            "agent.started",
            serde_json::json!({ "device_id": config.device_id, "serving": serving, "pid": std::process::id() }),
        ))?;
    }
    let folders = Folders::new(&config, &data_dir);
    folders.create()?;
    tracing::info!(
        watch = %folders.watch.display(), inbox = %folders.inbox.display(), store = %data_dir.display(),
        "agent running"
    );
    let mut tasks = tokio::task::JoinSet::new();
    if config.http.enabled {
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (key `http.listen`): {e}", config.http.listen))?;
        tracing::info!(address = %config.http.listen, "HTTP endpoint listening");
        let app = router(Arc::clone(&shared));
        tasks.spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "HTTP endpoint stopped");
            }
        });
    }
    tasks.spawn(poll_folders(Arc::clone(&shared), folders));
    tasks.spawn(housekeeping(Arc::clone(&shared)));
    if let Some(path) = config_path {
        tasks.spawn(reload_on_hangup(Arc::clone(&shared), path));
    }
    let (stop_link, link_stopped) = tokio::sync::watch::channel(false);
    let link = if config.mqtt.enabled {
        Some(start_link(&shared, &config, embedded_port, link_stopped, &mut tasks)?)
    } else {
        None
    };
    // Under systemd (Type=notify): ready now, and the watchdog is fed by housekeeping, which
    // takes the agent's lock each second, so a stuck agent stops feeding it.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    shutdown_signal().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping");
    tasks.abort_all();
    let cancelled = shared.cancel_run();
    while shared.is_running() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shared_for_exit = Arc::clone(&shared);
    tokio::task::spawn_blocking(move || {
        let mut agent = shared_for_exit.lock();
        if let Err(error) = agent.flush_traffic() {
            tracing::warn!(%error, "cannot store traffic");
        }
        let uptime = shared_for_exit.started.elapsed().as_secs();
        agent
            .store()
            .push_event(&event("agent.stopped", serde_json::json!({ "uptime_s": uptime, "cancelled_run": cancelled })))
    })
    .await??;
    if let Some(link) = link {
        let _ = stop_link.send(true);
        match tokio::time::timeout(Duration::from_secs(5), link).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "fleet link failed"),
            Err(_) => tracing::warn!("fleet link did not stop within 5 s"),
            _ => {}
        }
    }
    Ok(())
}

/// Starts the embedded broker if the config asks for one; its port.
fn start_embedded_broker(config: &DeviceConfig) -> anyhow::Result<Option<u16>> {
    let mqtt = &config.mqtt;
    if mqtt.broker != "embedded" {
        return Ok(None);
    }
    let address: std::net::SocketAddr = mqtt.embedded_listen.parse()?;
    crate::fleet::broker::start(address, mqtt.max_packet_bytes)?;
    tracing::info!(%address, "embedded MQTT broker listening");
    Ok(Some(address.port()))
}

/// Opens the agent (the model's warm-up included) while, with MQTT on, a retained status tells
/// the fleet that the device is starting and for how long it has been warming up.
async fn open_agent_announcing(config: &DeviceConfig, embedded_port: Option<u16>) -> anyhow::Result<Agent> {
    use crate::fleet::link::{StartProgress, announce_start};
    let (progress, watcher) = tokio::sync::watch::channel(StartProgress::WarmingUp(0));
    let announcer = config
        .mqtt
        .enabled
        .then(|| tokio::spawn(announce_start(config.mqtt.clone(), config.device_id.clone(), embedded_port, watcher)));
    let opened = {
        let config = config.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            // Under systemd the status shows the time so far, and the start timeout is extended so
            // that the service manager waits for the warm-up.
            let warming_up = |elapsed: Duration| {
                super::log_warmup(elapsed);
                let status = format!("warming up the model ({} s)", elapsed.as_secs());
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::Status(&status),
                    sd_notify::NotifyState::ExtendTimeoutUsec(30_000_000),
                ]);
                let _ = progress.send(StartProgress::WarmingUp(elapsed.as_secs()));
            };
            Agent::open_with_progress(&config, &warming_up)
        })
        .await?
    };
    let _ = progress.send(match &opened {
        Ok(_) => StartProgress::Ready,
        Err(error) => StartProgress::Failed(error.to_string()),
    });
    if let Some(announcer) = announcer {
        let _ = tokio::time::timeout(Duration::from_secs(5), announcer).await;
    }
    Ok(opened?)
}

/// Starts the broker link and the command handler.
fn start_link(
    shared: &Arc<Shared>,
    config: &DeviceConfig,
    embedded_port: Option<u16>,
    stop: tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mqtt = config.mqtt.clone();
    let key = match &mqtt.command_key_file {
        Some(file) => Some(
            std::fs::read(file)
                .map_err(|e| anyhow::anyhow!("mqtt.command_key_file {}: {e}", file.display()))?
                .trim_ascii()
                .to_vec(),
        ),
        None => None,
    };
    let (outgoing, outgoing_rx) = tokio::sync::mpsc::channel(256);
    let (incoming, incoming_rx) = tokio::sync::mpsc::channel(256);
    tasks.spawn(handle_commands(Arc::clone(shared), incoming_rx, outgoing, key, config.device_id.clone()));
    Ok(tokio::spawn(crate::fleet::link::run(
        Arc::clone(shared),
        mqtt,
        config.device_id.clone(),
        embedded_port,
        outgoing_rx,
        incoming,
        stop,
    )))
}

/// Runs each command as it arrives (several may run at once) and sends its response. A repeated
/// command id gets the stored response and runs nothing.
async fn handle_commands(
    shared: Arc<Shared>,
    mut incoming: tokio::sync::mpsc::Receiver<Vec<u8>>,
    outgoing: tokio::sync::mpsc::Sender<crate::fleet::link::LinkMessage>,
    key: Option<Vec<u8>>,
    device: String,
) {
    use crate::fleet::link::LinkMessage;
    use crate::fleet::messages::{response_error, response_ok};
    {
        // Commands a crash cut short are answered now, so a retry learns what happened.
        let shared = Arc::clone(&shared);
        let device = device.clone();
        let _ = tokio::task::spawn_blocking(move || -> Result<(), crate::store::StoreError> {
            let mut agent = shared.lock();
            for id in agent.store().unanswered_commands()? {
                let response =
                    response_error(&device, &id, "interrupted by a restart of the agent; send it again with a new id");
                agent.store().answer_command(&id, &serde_json::to_string(&response).expect("responses serialise"))?;
            }
            Ok(())
        })
        .await;
    }
    while let Some(payload) = incoming.recv().await {
        let shared = Arc::clone(&shared);
        let outgoing = outgoing.clone();
        let key = key.clone();
        let device = device.clone();
        tokio::spawn(async move {
            let (id, command) = match crate::fleet::commands::parse(&payload, key.as_deref()) {
                Ok(parsed) => parsed,
                Err(refusal) => {
                    tracing::warn!(id = %refusal.id, error = %refusal.error, "command refused");
                    let response = response_error(&device, &refusal.id, &refusal.error);
                    let _ = outgoing.send(LinkMessage::Response(response)).await;
                    return;
                }
            };
            let name = command.name();
            let claimed = {
                let shared = Arc::clone(&shared);
                let id = id.clone();
                tokio::task::spawn_blocking(move || shared.lock().store().claim_command(&id, name)).await
            };
            match claimed {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(Some(stored)))) => {
                    if let Ok(response) = serde_json::from_str(&stored) {
                        let _ = outgoing.send(LinkMessage::Response(response)).await;
                    }
                    return;
                }
                Ok(Ok(Some(None))) => return,
                Ok(Err(error)) => {
                    let _ = outgoing.send(LinkMessage::Response(response_error(&device, &id, error))).await;
                    return;
                }
                Err(_) => return,
            }
            tracing::info!(%id, command = name, "fleet command");
            let (result, weights) = shared.execute(command).await;
            let response = match result {
                Ok(value) => response_ok(&device, &id, value),
                Err(error) => response_error(&device, &id, error),
            };
            {
                let shared = Arc::clone(&shared);
                let (id, text) = (id.clone(), serde_json::to_string(&response).expect("responses serialise"));
                let _ = tokio::task::spawn_blocking(move || shared.lock().store().answer_command(&id, &text)).await;
            }
            if let Some(weights) = weights {
                let _ = outgoing.send(weights).await;
            }
            let _ = outgoing.send(LinkMessage::Response(response)).await;
        });
    }
}

/// Holds an exclusive lock on the data folder for the life of the process, so a second agent
/// (or an offline CLI command) cannot work on the same store at the same time.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    let path = data_dir.join("agent.lock");
    let file = File::options().create(true).truncate(false).write(true).open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{}: another edgeadapt agent is using this data folder; talk to it instead (is its HTTP endpoint disabled?)",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// SIGHUP: read the config file again and take what can change while running; name the rest.
async fn reload_on_hangup(shared: Arc<Shared>, path: PathBuf) {
    #[cfg(unix)]
    {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hangup.recv().await.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
            let shared = Arc::clone(&shared);
            let path = path.clone();
            let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let new = DeviceConfig::load(&path)?;
                Ok(shared.lock().reload(&new)?)
            })
            .await;
            match outcome {
                Ok(Ok((applied, restart))) => tracing::info!(?applied, needs_restart = ?restart, "config reloaded"),
                Ok(Err(error)) => tracing::error!(%error, "config not reloaded; the running one stays"),
                Err(error) => tracing::error!(%error, "config reload failed"),
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }
    #[cfg(not(unix))]
    let _ = (shared, path);
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await.ok();
}

/// Starts policy runs and writes out traffic.
async fn housekeeping(shared: Arc<Shared>) {
    let watchdog = sd_notify::watchdog_enabled().is_some();
    let mut ticker = tokio::time::interval(HOUSEKEEPING);
    let mut flushed = Instant::now();
    loop {
        ticker.tick().await;
        let shared = Arc::clone(&shared);
        let flush = flushed.elapsed() >= Duration::from_secs(10);
        if flush {
            flushed = Instant::now();
        }
        let result = tokio::task::spawn_blocking(move || -> Result<(), StartError> {
            if flush {
                shared.lock().flush_traffic()?;
            }
            if watchdog {
                // Taking the lock shows the agent is not stuck; it is released before the run
                // lock is taken (start_run takes them in the other order).
                drop(shared.lock());
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            if shared.is_running() {
                return Ok(());
            }
            let (new_labels, last_run, policy) = {
                let agent = shared.lock();
                (agent.new_labels()?, agent.last_run_ms()?, agent.policy()?)
            };
            let minutes = match last_run {
                Some(at) => ((crate::store::now_ms() - at).max(0) / 60_000) as u64,
                None => shared.started.elapsed().as_secs() / 60,
            };
            match policy::due(&policy, new_labels, minutes) {
                Some(policy::Trigger::NewLabels(_)) => shared.start_run(None, Origin::NewLabels).map(|_| ()),
                Some(policy::Trigger::Schedule) => shared.start_run(None, Origin::Schedule).map(|_| ()),
                None => Ok(()),
            }
        })
        .await;
        match result {
            Ok(Ok(())) | Ok(Err(StartError::Busy(_))) => {}
            Ok(Err(error)) => tracing::warn!(%error, "policy run did not start"),
            Err(error) => tracing::error!(%error, "housekeeping task failed"),
        }
    }
}

/// The watched folder and the labelling inbox, with where their files go afterwards.
#[derive(Debug, Clone)]
pub struct Folders {
    pub watch: PathBuf,
    pub classified: PathBuf,
    pub inbox: PathBuf,
    pub processed: PathBuf,
    pub rejected: PathBuf,
    pub results_log: PathBuf,
    after: AfterClassify,
    poll: Duration,
}

impl Folders {
    pub fn new(config: &DeviceConfig, data_dir: &Path) -> Folders {
        Folders {
            watch: config.watch.folder.clone().unwrap_or_else(|| data_dir.join("watch")),
            classified: data_dir.join("classified"),
            inbox: config.labelling.inbox.clone().unwrap_or_else(|| data_dir.join("inbox")),
            processed: data_dir.join("processed"),
            rejected: data_dir.join("rejected"),
            results_log: data_dir.join("classifications.jsonl"),
            after: config.watch.after,
            poll: Duration::from_millis(config.watch.poll_ms),
        }
    }

    fn create(&self) -> std::io::Result<()> {
        for dir in [&self.watch, &self.classified, &self.inbox, &self.processed, &self.rejected] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }
}

async fn poll_folders(shared: Arc<Shared>, folders: Folders) {
    let mut ticker = tokio::time::interval(folders.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let shared = Arc::clone(&shared);
        let folders = folders.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            classify_watched(&shared, &folders)?;
            ingest_inbox(&shared, &folders)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "folder poll failed"),
            Err(error) => tracing::error!(%error, "folder task failed"),
        }
    }
}

/// Files ready to take: writers are expected to write elsewhere (or under a hidden or `.tmp`
/// name) and rename into the folder, so a half-written file is never picked up.
fn ready_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_file() && !name.starts_with('.') && !name.ends_with(".tmp") && !name.ends_with(".part") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Serialize)]
struct ResultLine<'a> {
    at_ms: i64,
    file: &'a str,
    version: i64,
    #[serde(flatten)]
    outcome: serde_json::Value,
}

fn classify_watched(shared: &Shared, folders: &Folders) -> anyhow::Result<()> {
    let files = ready_files(&folders.watch)?;
    for chunk in files.chunks(FOLDER_BATCH) {
        let mut loaded = Vec::new();
        for path in chunk {
            match std::fs::read(path) {
                Ok(bytes) => loaded.push((path.clone(), bytes)),
                Err(error) => tracing::warn!(file = %path.display(), %error, "cannot read"),
            }
        }
        let names: Vec<String> = loaded.iter().map(|(p, _)| p.display().to_string()).collect();
        let images: Vec<(&str, &[u8])> =
            names.iter().zip(&loaded).map(|(name, (_, bytes))| (name.as_str(), bytes.as_slice())).collect();
        let (results, version) = {
            let mut agent = shared.lock();
            (agent.classify(&images, 3), agent.serving())
        };
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&folders.results_log)?;
        for ((path, _), result) in loaded.iter().zip(results) {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("image");
            let outcome = match &result {
                Ok(prediction) => serde_json::json!({ "prediction": prediction }),
                Err(error) => serde_json::json!({ "error": error }),
            };
            let line = ResultLine { at_ms: crate::store::now_ms(), file: file_name, version, outcome };
            use std::io::Write;
            writeln!(log, "{}", serde_json::to_string(&line)?)?;
            match &result {
                Ok(prediction) => tracing::debug!(file = file_name, class = %prediction.class,
                    confidence = prediction.confidence, version, "classified"),
                Err(error) => tracing::warn!(file = file_name, %error, "cannot classify"),
            }
            let target = if result.is_ok() { folders.classified.clone() } else { folders.classified.join("failed") };
            match (folders.after, result.is_ok()) {
                (AfterClassify::Delete, true) => std::fs::remove_file(path)?,
                _ => {
                    move_file(path, &target)?;
                }
            }
        }
    }
    Ok(())
}

fn ingest_inbox(shared: &Shared, folders: &Folders) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(&folders.inbox)? {
        let class_dir = entry?.path();
        if !class_dir.is_dir() {
            continue;
        }
        let class = class_dir.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        let files = ready_files(&class_dir)?;
        for chunk in files.chunks(FOLDER_BATCH) {
            let loaded: Vec<(PathBuf, std::io::Result<Vec<u8>>)> =
                chunk.iter().map(|p| (p.clone(), std::fs::read(p))).collect();
            let names: Vec<String> = loaded.iter().map(|(p, _)| p.display().to_string()).collect();
            let items: Vec<Labelled<'_>> = names
                .iter()
                .zip(&loaded)
                .filter_map(|(name, (_, bytes))| {
                    bytes.as_ref().ok().map(|bytes| Labelled { what: name, bytes, class: &class })
                })
                .collect();
            let mut results = shared.lock().ingest(&items, "inbox").into_iter();
            for (path, bytes) in &loaded {
                let outcome = match bytes {
                    Ok(_) => results.next().expect("one result per item"),
                    Err(error) => {
                        Err(IngestError::Failed { what: path.display().to_string(), problem: error.to_string() })
                    }
                };
                settle_inbox_file(shared, folders, &class, path, outcome)?;
            }
        }
    }
    Ok(())
}

/// Moves an inbox file once its outcome is durable. A file stored before a crash but not yet
/// moved comes back as a duplicate of the same class, which counts as processed.
fn settle_inbox_file(
    shared: &Shared,
    folders: &Folders,
    class: &str,
    path: &Path,
    outcome: Result<super::Ingested, IngestError>,
) -> anyhow::Result<()> {
    match outcome {
        Ok(_) => move_file(path, &folders.processed.join(class)),
        Err(IngestError::Duplicate { class: stored, .. }) if stored == class => {
            move_file(path, &folders.processed.join(class))
        }
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "label refused");
            let target = folders.rejected.join(class);
            let moved = move_file(path, &target)?;
            let reason = moved.with_file_name(format!(
                "{}.reason.txt",
                moved.file_name().and_then(|n| n.to_str()).unwrap_or("sample")
            ));
            std::fs::write(&reason, format!("{error}\n"))?;
            shared.lock().store().push_event(&event(
                "sample.rejected",
                serde_json::json!({ "file": path.display().to_string(), "class": class, "error": error }),
            ))?;
            Ok(moved)
        }
    }
    .map(|_| ())
}

/// Moves `path` into `dir`, adding a number to the name if it is taken.
fn move_file(path: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| anyhow::anyhow!("{}: no file name", path.display()))?;
    let mut target = dir.join(name);
    let mut n = 1;
    while target.exists() {
        target = dir.join(format!("{n}-{}", name.to_string_lossy()));
        n += 1;
    }
    std::fs::rename(path, &target)?;
    Ok(target)
}

// ---- HTTP endpoint ----

type SharedState = State<Arc<Shared>>;

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(ErrorBody { error: message.to_string(), detail: None })).into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status", get(http_status))
        .route("/v1/classify", post(http_classify))
        .route("/v1/label", post(http_label))
        .route("/v1/adapt", post(http_adapt).get(http_adapt_state))
        .route("/v1/adapt/cancel", post(http_cancel))
        .route("/v1/rollback", post(http_rollback))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(shared)
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("request failed: {e}")))
}

async fn http_status(State(shared): SharedState) -> Response {
    match blocking(move || shared.status()).await {
        Ok(Ok(status)) => axum::Json(status).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct ClassifyQuery {
    top: Option<usize>,
    name: Option<String>,
}

async fn http_classify(State(shared): SharedState, Query(query): Query<ClassifyQuery>, body: Bytes) -> Response {
    let result = blocking(move || {
        let name = query.name.unwrap_or_else(|| "request body".into());
        shared.lock().classify(&[(name.as_str(), &body)], query.top.unwrap_or(3).clamp(1, 100)).remove(0)
    })
    .await;
    match result {
        Ok(Ok(prediction)) => axum::Json(prediction).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct LabelQuery {
    class: Option<String>,
    name: Option<String>,
}

async fn http_label(State(shared): SharedState, Query(query): Query<LabelQuery>, body: Bytes) -> Response {
    let Some(class) = query.class else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter `class`");
    };
    let result = blocking(move || {
        let name = query.name.unwrap_or_else(|| "request body".into());
        let item = Labelled { what: &name, bytes: &body, class: &class };
        shared.lock().ingest(&[item], "http").remove(0)
    })
    .await;
    match result {
        Ok(Ok(ingested)) => axum::Json(ingested).into_response(),
        Ok(Err(e)) => {
            let status = match e {
                IngestError::Duplicate { .. } => StatusCode::CONFLICT,
                IngestError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            let detail = serde_json::to_value(&e).ok();
            (status, axum::Json(ErrorBody { error: e.to_string(), detail })).into_response()
        }
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct AdaptQuery {
    method: Option<String>,
}

async fn http_adapt(State(shared): SharedState, Query(query): Query<AdaptQuery>) -> Response {
    match blocking(move || shared.start_run(query.method.as_deref(), Origin::Command)).await {
        Ok(Ok((_, progress))) => (StatusCode::ACCEPTED, axum::Json(progress)).into_response(),
        Ok(Err(e @ StartError::Busy(_))) => error(StatusCode::CONFLICT, e),
        Ok(Err(StartError::Agent(e @ AgentError::Adapt(_) | e @ AgentError::Input(_)))) => {
            error(StatusCode::BAD_REQUEST, e)
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(response) => response,
    }
}

/// The run in progress and the last finished one.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunState {
    pub running: Option<RunProgress>,
    pub last: Option<Result<RunSummary, String>>,
}

async fn http_adapt_state(State(shared): SharedState) -> Response {
    let running = shared.run.lock().expect("run lock").as_ref().map(|r| r.progress.clone());
    let last = shared.last_run.lock().expect("last run lock").as_ref().map(|(_, result)| result.clone());
    axum::Json(RunState { running, last }).into_response()
}

async fn http_cancel(State(shared): SharedState) -> Response {
    axum::Json(serde_json::json!({ "cancelled": shared.cancel_run() })).into_response()
}

#[derive(Deserialize)]
struct RollbackQuery {
    to: Option<String>,
}

async fn http_rollback(State(shared): SharedState, Query(query): Query<RollbackQuery>) -> Response {
    let to = match query.to.as_deref().unwrap_or("source").parse::<VersionRef>() {
        Ok(to) => to,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match blocking(move || shared.lock().rollback(to)).await {
        Ok(Ok(serving)) => axum::Json(serde_json::json!({ "serving": serving })).into_response(),
        Ok(Err(e @ AgentError::Store(crate::store::StoreError::NoSuchVersion(_)))) => error(StatusCode::NOT_FOUND, e),
        Ok(Err(e @ AgentError::Store(crate::store::StoreError::Rejected { .. }))) => error(StatusCode::CONFLICT, e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(response) => response,
    }
}

/// Whether an error ended a run by cancellation (for messages).
pub fn is_cancelled(error: &AgentError) -> bool {
    matches!(error, AgentError::Adapt(AdaptError::Cancelled { .. }))
}
