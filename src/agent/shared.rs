//! The agent as the daemon's tasks share it: behind a lock, with at most one adaptation run on
//! its own thread (planned and committed under the lock, trained without it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Agent, AgentError, RunProgress, RunSummary, execute};
use crate::adapt::train::{AdaptError, Cancel};
use crate::config::DeviceConfig;
use crate::protocol::events::Event;

/// The state the daemon's tasks share.
pub struct Shared {
    pub agent: Mutex<Agent>,
    run: Mutex<Option<ActiveRun>>,
    /// The last finished run: its number and result.
    last_run: Mutex<Option<(u64, Result<RunSummary, String>)>>,
    runs_started: std::sync::atomic::AtomicU64,
    pub(super) config: DeviceConfig,
    pub(super) started: Instant,
    /// The fleet link's state, while there is a link.
    pub(super) link: Mutex<Option<crate::fleet::port::LinkHealth>>,
    /// The transfer being deployed, while a deployment is staged and shadowed.
    deploying: Mutex<Option<String>>,
}

/// Held while a deployment stages its bundle: no other deployment or adaptation run starts.
pub(super) struct Deploying<'a>(&'a Mutex<Option<String>>);

impl Drop for Deploying<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

struct ActiveRun {
    cancel: Cancel,
    progress: RunProgress,
}

/// Where a run request came from, for events.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Origin {
    Command,
    Console,
    NewLabels,
    Schedule,
    /// A deployed bundle adapting with the samples read again.
    Deploy,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Command => "command",
            Origin::Console => "console",
            Origin::NewLabels => "new_labels",
            Origin::Schedule => "schedule",
            Origin::Deploy => "deploy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("an adaptation run is already in progress ({0})")]
    Busy(String),
    #[error("a new bundle is being deployed (transfer {0}); runs start again once it serves or is refused")]
    Deploying(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl From<crate::store::StoreError> for StartError {
    fn from(error: crate::store::StoreError) -> StartError {
        StartError::Agent(error.into())
    }
}

/// Whether an error ended a run by cancellation (for messages).
pub fn is_cancelled(error: &AgentError) -> bool {
    matches!(error, AgentError::Adapt(AdaptError::Cancelled { .. }))
}

impl Shared {
    pub fn new(agent: Agent, config: DeviceConfig) -> Shared {
        Shared {
            agent: Mutex::new(agent),
            run: Mutex::new(None),
            last_run: Mutex::new(None),
            runs_started: std::sync::atomic::AtomicU64::new(0),
            config,
            started: Instant::now(),
            link: Mutex::new(None),
            deploying: Mutex::new(None),
        }
    }

    /// Claims the deployment slot for `transfer`; refused while a run or another deployment
    /// is in progress.
    pub(super) fn begin_deployment(&self, transfer: &str) -> Result<Deploying<'_>, String> {
        let run = self.run.lock().expect("run lock");
        if let Some(active) = run.as_ref() {
            return Err(format!(
                "deploy: a {} run is in progress; send deploy again when it ends (the transfer is kept)",
                active.progress.method
            ));
        }
        let mut slot = self.deploying.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(other) = slot.as_ref() {
            return Err(format!("deploy: transfer {other} is being deployed; send deploy again when it ends"));
        }
        *slot = Some(transfer.to_string());
        Ok(Deploying(&self.deploying))
    }

    /// The fleet link's state (`None` without a link).
    pub fn link_health(&self) -> Option<crate::fleet::port::LinkHealth> {
        self.link.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Agent> {
        // A panic while holding the lock leaves the agent usable: every change it makes is a
        // committed transaction or nothing.
        self.agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The run in progress.
    pub fn run_progress(&self) -> Option<RunProgress> {
        self.run.lock().expect("run lock").as_ref().map(|r| r.progress.clone())
    }

    /// The last finished run's result.
    pub fn last_result(&self) -> Option<Result<RunSummary, String>> {
        self.last_run.lock().expect("last run lock").as_ref().map(|(_, result)| result.clone())
    }

    pub fn status(&self) -> Result<super::Status, AgentError> {
        let mut status = self.lock().status()?;
        status.running = self.run.lock().expect("run lock").as_ref().map(|r| r.progress.clone());
        Ok(status)
    }

    /// Starts a run on its own thread; returns its number once it is planned. `force` as in
    /// [`super::Agent::prepare_run`].
    pub fn start_run(
        self: &Arc<Self>,
        method: Option<&str>,
        force: bool,
        origin: Origin,
    ) -> Result<(u64, RunProgress), StartError> {
        self.start_run_by(method, force, origin, None)
    }

    /// [`Shared::start_run`], recording who started it (a console user).
    pub fn start_run_by(
        self: &Arc<Self>,
        method: Option<&str>,
        force: bool,
        origin: Origin,
        user: Option<&str>,
    ) -> Result<(u64, RunProgress), StartError> {
        let mut slot = self.run.lock().expect("run lock");
        if let Some(active) = slot.as_ref() {
            return Err(StartError::Busy(active.progress.method.clone()));
        }
        if let Some(transfer) = self.deploying.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            return Err(StartError::Deploying(transfer.clone()));
        }
        let plan = {
            let mut agent = self.lock();
            let plan = agent.prepare_run(method, force);
            match plan {
                Ok(plan) => {
                    agent.store().push_event(&plan.started_event(origin.as_str(), user))?;
                    plan
                }
                // Nothing was tried: no failed run to record.
                Err(error @ AgentError::NothingNew(_)) => return Err(error.into()),
                Err(error) => {
                    // A policy-started run that cannot start must not retry at once.
                    agent.record_refused_run(origin.as_str(), &error)?;
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
                        let event = Event::AdaptationProgress { method: plan.method_name.clone(), step, steps };
                        if let Err(error) = shared.lock().store().push_event(&event) {
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

    pub fn cancel_run(&self) -> bool {
        match self.run.lock().expect("run lock").as_ref() {
            Some(active) => {
                active.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub(super) fn is_running(&self) -> bool {
        self.run.lock().expect("run lock").is_some()
    }
}
