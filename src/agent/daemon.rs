//! `edgeadapt run`: the agent as a long-running service. A loopback HTTP endpoint, a watched
//! folder and a labelling inbox feed the agent core; the adaptation policy starts runs; one run
//! at a time trains on its own thread while classification goes on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::folders::{Folders, Poller};
use super::listen::{self, Listener};
use super::shared::{Origin, Shared, StartError};
use super::{Agent, console, policy};
use crate::config::DeviceConfig;
use crate::protocol::events::Event;

/// How long the agent waits at start for a CLI command working on the store offline.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// How often the policy is checked and traffic written out.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Runs the daemon until SIGINT or SIGTERM. `ready` is called once the endpoint listens.
pub async fn run(config: DeviceConfig, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    raise_open_files_limit();
    let data_dir = config.require_data_dir().map_err(anyhow::Error::msg)?.to_path_buf();
    std::fs::create_dir_all(&data_dir).map_err(|e| crate::config::data_dir_error(&data_dir, e))?;
    // A CLI command that opened the store while no agent ran (after a crash, say) is given
    // time to finish rather than making the agent fail to start.
    let _lock = tokio::task::spawn_blocking({
        let data_dir = data_dir.clone();
        move || super::lock::acquire(&data_dir, super::lock::AGENT, LOCK_WAIT)
    })
    .await??;
    let embedded_port =
        if config.mqtt.enabled { start_embedded_broker(&config, config_path.as_deref())? } else { None };
    let agent = open_agent_announcing(&config, embedded_port).await?;
    let shared = Arc::new(Shared::new(agent, config.clone()));
    {
        let mut agent = shared.lock();
        let serving = agent.serving();
        agent.store().push_event(&Event::AgentStarted {
            device_id: config.device_id.clone(),
            serving,
            pid: std::process::id(),
        })?;
    }
    let folders = Folders::new(&config, &data_dir);
    folders.create()?;
    tracing::info!(
        watch = %folders.watch.display(), inbox = %folders.inbox.display(), store = %data_dir.display(),
        "agent running"
    );
    let mut tasks = tokio::task::JoinSet::new();
    // Registered before the port opens, so that a SIGHUP from a client that saw the port
    // reloads the config instead of ending the process.
    if let Some(path) = config_path.clone() {
        tasks.spawn(reload_on_hangup(Arc::clone(&shared), path));
    }
    let auth = console_auth(&config, &data_dir)?;
    if config.http.enabled {
        let address = config.http.address().map_err(anyhow::Error::msg)?;
        let listener = bind(address, Listener::Http, config_path.as_deref()).await?;
        tracing::info!(%address, "HTTP endpoint listening");
        let mut app = super::http::router(Arc::clone(&shared), &config.http);
        if let Some(auth) = &auth {
            app = app.merge(console::router(Arc::clone(&shared), auth.clone(), console::Listener::Loopback));
        }
        tasks.spawn(super::http::serve(listener, app, config.http.clone(), None));
    }
    if let (Some(auth), Some(address)) = (&auth, config.console.site_address().map_err(anyhow::Error::msg)?) {
        let tls = console_tls(&config, &data_dir)?;
        let listener = bind(address, Listener::Console, config_path.as_deref()).await?;
        let app = console::router(Arc::clone(&shared), auth.clone(), console::Listener::Site);
        tasks.spawn(super::http::serve(listener, app, config.http.clone(), Some(tls)));
    }
    // Samples a deployment left to read again with the new bundle (the agent stopped first).
    shared.spawn_reextraction();
    tasks.spawn(poll_folders(Arc::clone(&shared), folders));
    tasks.spawn(housekeeping(Arc::clone(&shared)));
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
        if let Err(error) = agent.flush_traffic().and_then(|()| agent.flush_images()) {
            tracing::warn!(%error, "cannot store traffic");
        }
        let uptime = shared_for_exit.started.elapsed().as_secs();
        agent.store().push_event(&Event::AgentStopped { uptime_s: uptime, cancelled_run: cancelled })
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

async fn bind(
    address: std::net::SocketAddr,
    which: Listener,
    config_path: Option<&Path>,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| {
        let free = listen::nearby_free(address);
        anyhow::anyhow!(listen::listen_error(which, address, config_path, &e, free))
    })
}

/// The console's users and lockout, when the console is on; a site-network listener needs at
/// least one user.
fn console_auth(config: &DeviceConfig, data_dir: &Path) -> anyhow::Result<Option<console::Auth>> {
    let settings = &config.console;
    if !settings.enabled {
        return Ok(None);
    }
    let file = settings.users_file(data_dir);
    let users = console::users::Users::load(&file).map_err(anyhow::Error::msg)?;
    if settings.listen.is_some() && users.is_empty() {
        anyhow::bail!(
            "`console.listen` serves the console to the site network, which needs sign-in, and {} has no users; \
             add one with `edgeadapt console add-user NAME`, or remove `console.listen`",
            file.display()
        );
    }
    Ok(Some(console::Auth::new(users, settings.lockout_failures, settings.lockout_minutes)))
}

/// The console's TLS acceptor: the operator's certificate or a self-signed one, whose
/// fingerprint is logged for staff to compare with the browser's.
fn console_tls(config: &DeviceConfig, data_dir: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let settings = &config.console;
    let configured = settings.tls_cert.as_deref().zip(settings.tls_key.as_deref());
    let names = vec![config.device_id.clone()];
    let (cert, key) = console::tls::ensure_identity(configured, data_dir, &names).map_err(anyhow::Error::msg)?;
    let server = console::tls::server_config(&cert, &key).map_err(anyhow::Error::msg)?;
    let fingerprint = console::tls::fingerprint(&cert).map_err(anyhow::Error::msg)?;
    tracing::info!(listen = ?settings.listen, %fingerprint, "console listening on the site network (TLS)");
    Ok(tokio_rustls::TlsAcceptor::from(server))
}

/// Starts the embedded broker if the config asks for one; its port. `config_path` is named
/// when the port is taken.
fn start_embedded_broker(config: &DeviceConfig, config_path: Option<&Path>) -> anyhow::Result<Option<u16>> {
    let mqtt = &config.mqtt;
    if mqtt.broker != "embedded" {
        return Ok(None);
    }
    let address = crate::config::listen_address(&mqtt.embedded_listen, "127.0.0.1:1883").map_err(anyhow::Error::msg)?;
    crate::fleet::broker::start(address, mqtt.max_packet_bytes).map_err(|error| match error
        .downcast_ref::<crate::fleet::broker::ListenError>(
    ) {
        Some(taken) => {
            let free = listen::nearby_free(address);
            anyhow::anyhow!(listen::listen_error(Listener::EmbeddedBroker, address, config_path, &taken.source, free))
        }
        None => error,
    })?;
    tracing::info!(%address, "embedded MQTT broker listening");
    Ok(Some(address.port()))
}

/// Opens the agent (the model's warm-up included) while, with MQTT on, a retained status tells
/// the fleet that the device is starting and for how long it has been warming up.
async fn open_agent_announcing(config: &DeviceConfig, embedded_port: Option<u16>) -> anyhow::Result<Agent> {
    use crate::fleet::connect::{StartProgress, announce_start};
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
    let authority = Arc::new(crate::fleet::keys::command_authority(&mqtt)?);
    let (outgoing, outgoing_rx) = tokio::sync::mpsc::channel(256);
    // Commands and chunks waiting for the agent: at most 64 packets' worth of memory.
    let (incoming, incoming_rx) = tokio::sync::mpsc::channel(64);
    tasks.spawn(super::commands::handle_commands(
        Arc::clone(shared),
        incoming_rx,
        outgoing,
        authority,
        config.device_id.clone(),
    ));
    Ok(tokio::spawn(crate::fleet::link::run(
        Arc::clone(shared) as Arc<dyn crate::fleet::port::AgentPort>,
        mqtt,
        config.device_id.clone(),
        embedded_port,
        outgoing_rx,
        incoming,
        stop,
    )))
}

/// Hands memory that was freed back to the system. glibc keeps what a burst (a flood of
/// requests, an adaptation run over every labelled sample) freed in its arenas, so without this
/// the resident size at rest would follow the largest burst so far rather than what is in use.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lifts the soft limit on open files to the hard one (at most 65536): the HTTP connection
/// limit, not the default 1024 descriptors, should decide when clients are turned away.
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit write and read a valid rlimit struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max.min(65_536).max(limit.rlim_cur);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// SIGHUP: read the config file again and take what can change while running; name the rest.
/// The handler is installed when this is called, before the returned future first runs.
fn reload_on_hangup(shared: Arc<Shared>, path: PathBuf) -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let Ok(mut hangup) = hangup else { return };
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
            if let Err(error) = super::console::recent::keep_recent_images(&shared) {
                tracing::warn!(%error, "cannot keep recent images");
            }
            if flush {
                let mut agent = shared.lock();
                agent.flush_traffic()?;
                let mqtt = &shared.config.mqtt;
                let days = mqtt.command_ids_days.min(100_000) as i64;
                agent.store().prune_commands(mqtt.command_ids_kept, days * 86_400_000)?;
                agent.store().trim_outbox(mqtt.outbox_limit)?;
                drop(agent);
                return_freed_memory();
            }
            if watchdog {
                // Taking the lock shows the agent is not stuck; it is released before the run
                // lock is taken (start_run takes them in the other order).
                drop(shared.lock());
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            if let Err(error) = shared.check_probation() {
                tracing::warn!(%error, "cannot end the new bundle's probation");
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
                Some(policy::Trigger::NewLabels(_)) => shared.start_run(None, true, Origin::NewLabels).map(|_| ()),
                Some(policy::Trigger::Schedule) => shared.start_run(None, true, Origin::Schedule).map(|_| ()),
                None => Ok(()),
            }
        })
        .await;
        match result {
            Ok(Ok(())) | Ok(Err(StartError::Busy(_) | StartError::Deploying(_))) => {}
            Ok(Err(error)) => tracing::warn!(%error, "policy run did not start"),
            Err(error) => tracing::error!(%error, "housekeeping task failed"),
        }
    }
}

/// Reads the folders when a file is ready (a file event) and at every `watch.poll_ms` besides.
async fn poll_folders(shared: Arc<Shared>, folders: Folders) {
    let mut ticker = tokio::time::interval(folders.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poller = Some(Poller::new(folders.clone()));
    // The watcher lives as long as this task; without events the channel never wakes.
    let (_watcher, mut woken) = match super::folders::events::watch(&folders) {
        Some((watcher, woken)) => (Some(watcher), woken),
        None => (None, tokio::sync::mpsc::channel(1).1),
    };
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = woken.recv() => {}
        }
        let shared = Arc::clone(&shared);
        let mut current = poller.take().unwrap_or_else(|| Poller::new(folders.clone()));
        let result = tokio::task::spawn_blocking(move || {
            let outcome = current.poll(&shared.agent);
            (current, outcome)
        })
        .await;
        match result {
            Ok((current, outcome)) => {
                poller = Some(current);
                if let Err(error) = outcome {
                    tracing::warn!(error = format!("{error:#}"), "folder poll failed");
                }
            }
            Err(error) => tracing::error!(%error, "folder task failed"),
        }
    }
}
