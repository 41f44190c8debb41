//! The agent commands: `run`, `label`, `adapt`, `rollback`, `status`. Each talks to the running
//! agent over its loopback endpoint, or works on the store directly when no agent runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use super::table::Table;
use crate::agent::client::{Client, Refused};
use crate::agent::lock::{self, DataLock, LockError};
use crate::agent::{Agent, AgentError, IngestError, Labelled, RunSummary, Status};
use crate::config::DeviceConfig;
use crate::protocol::VersionRef;

#[derive(Debug, Args)]
pub struct RunArgs {}

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// Image files (or folders of them) that show the class.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// The class they show, by name.
    #[arg(long)]
    pub class: String,
}

#[derive(Debug, Args)]
pub struct AdaptArgs {
    /// Method (default: the config's `adaptation.method`).
    #[arg(long)]
    pub method: Option<String>,
    /// Return once the run has started instead of waiting for its result.
    #[arg(long)]
    pub no_wait: bool,
    /// Adapt even with no labels since the newest version (which the run would repeat).
    #[arg(long)]
    pub force: bool,
    /// Cancel the run in progress instead (the served version does not change).
    #[arg(long, conflicts_with_all = ["method", "no_wait", "force"])]
    pub cancel: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// `source` or a version number.
    #[arg(long)]
    pub to: VersionRef,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How long a command waits for an agent that is starting, or for another command to finish.
const REACH_WAIT: Duration = Duration::from_secs(120);

/// The agent to talk to: the running one, or the store opened directly (holding the data
/// folder's lock, so no agent starts meanwhile).
enum Reached {
    Live(Client),
    Offline(DataLock, Box<Agent>),
}

/// Finds the running agent, or opens the agent on the store when none runs.
fn reach(config: &DeviceConfig, role: &str) -> anyhow::Result<Reached> {
    Ok(match access(config, role)? {
        Access::Live(client) => Reached::Live(client),
        Access::Locked(lock) => Reached::Offline(lock, Box::new(Agent::open(config)?)),
    })
}

/// The running agent, or the data folder's lock when none runs.
enum Access {
    Live(Client),
    Locked(DataLock),
}

/// Finds the running agent, or takes the data folder's lock when none runs. An agent that holds
/// the lock but does not answer yet is starting: wait for its endpoint rather than failing or
/// racing it.
fn access(config: &DeviceConfig, role: &str) -> anyhow::Result<Access> {
    if let Some(client) = Client::connect(config) {
        return Ok(Access::Live(client));
    }
    let data_dir = config.require_data_dir().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(data_dir).map_err(|e| crate::config::data_dir_error(data_dir, e))?;
    let lock = match lock::try_acquire(data_dir, role) {
        Err(LockError::Held { agent: true, holder, .. }) => {
            anyhow::ensure!(
                config.http.enabled,
                "{holder} is using {} and its HTTP endpoint is disabled (`http.enabled = false`); \
                 stop it to work on the store directly",
                data_dir.display()
            );
            eprintln!("{holder} is starting; waiting for its endpoint ({}) ...", config.http.listen);
            let started = Instant::now();
            while started.elapsed() < REACH_WAIT {
                if let Some(client) = Client::connect(config) {
                    return Ok(Access::Live(client));
                }
                match lock::holder(data_dir) {
                    Some(holder) if holder.is_agent() => std::thread::sleep(Duration::from_millis(200)),
                    // The agent went away (or never got the lock): take the store.
                    _ => return access(config, role),
                }
            }
            anyhow::bail!("{holder} did not answer on {} within {} s", config.http.listen, REACH_WAIT.as_secs());
        }
        Err(LockError::Held { .. }) => lock::acquire(data_dir, role, REACH_WAIT)?,
        other => other?,
    };
    // The agent may have started while this command waited for the lock.
    if let Some(client) = Client::connect(config) {
        return Ok(Access::Live(client));
    }
    Ok(Access::Locked(lock))
}

pub fn run(_args: RunArgs, config: DeviceConfig, config_path: PathBuf) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Bounded: HTTP requests, folder polls and housekeeping each hold at most a few.
        .max_blocking_threads(32)
        .enable_all()
        .build()?;
    runtime.block_on(crate::agent::daemon::run(config, Some(config_path)))?;
    Ok(0)
}

/// Why one file was not stored: what is wrong (without the file's name), and whether the class
/// itself is unknown, which refuses every file alike.
struct Refusal {
    problem: String,
    unknown_class: bool,
}

impl Refusal {
    fn other(problem: String) -> Refusal {
        Refusal { problem, unknown_class: false }
    }
}

pub fn label(args: LabelArgs, config: DeviceConfig) -> anyhow::Result<i32> {
    let files = crate::inference::collect_image_files(&args.images)?;
    anyhow::ensure!(!files.is_empty(), "no image files in {:?}", args.images);
    let (client, mut offline_agent) = match reach(&config, "label")? {
        Reached::Live(client) => (Some(client), None),
        Reached::Offline(lock, agent) => (None, Some((lock, agent))),
    };
    let bar = super::progress_bar(files.len(), "labelling");
    let mut refused = 0;
    for chunk in files.chunks(32) {
        let loaded: Vec<(PathBuf, std::io::Result<Vec<u8>>)> =
            chunk.iter().map(|f| (f.clone(), std::fs::read(f))).collect();
        let outcomes: Vec<Result<(), Refusal>> = match (&client, offline_agent.as_mut()) {
            (Some(client), _) => loaded
                .iter()
                .map(|(file, bytes)| {
                    let name = file.display().to_string();
                    let bytes = bytes.as_ref().map_err(|e| Refusal::other(e.to_string()))?;
                    client.label(bytes, &args.class, &name).map(|_| ()).map_err(|e| match e.downcast_ref::<Refused>() {
                        Some(refused) => Refusal {
                            // The agent's message starts with the name it was given; say it once.
                            problem: refused
                                .message
                                .strip_prefix(&format!("{name}: "))
                                .unwrap_or(&refused.message)
                                .into(),
                            unknown_class: refused.kind.as_deref() == Some("unknown_class"),
                        },
                        None => Refusal::other(format!(
                            "no answer from the agent at {} ({e}); it may have stopped after storing the label: \
                             label the file again (a stored one is reported as a duplicate)",
                            client.base()
                        )),
                    })
                })
                .collect(),
            (None, Some((_, agent))) => {
                let names: Vec<String> = loaded.iter().map(|(f, _)| f.display().to_string()).collect();
                let items: Vec<Labelled<'_>> = names
                    .iter()
                    .zip(&loaded)
                    .filter_map(|(name, (_, b))| {
                        b.as_ref().ok().map(|bytes| Labelled { what: name, bytes, class: &args.class })
                    })
                    .collect();
                let mut results = agent.ingest(&items, "cli").into_iter();
                loaded
                    .iter()
                    .map(|(_, bytes)| match bytes {
                        Ok(_) => results.next().expect("one result per item").map(|_| ()).map_err(|e| Refusal {
                            problem: e.problem(),
                            unknown_class: matches!(e, IngestError::UnknownClass { .. }),
                        }),
                        Err(e) => Err(Refusal::other(e.to_string())),
                    })
                    .collect()
            }
            (None, None) => unreachable!("either a client or the store"),
        };
        for ((file, _), outcome) in loaded.iter().zip(outcomes) {
            let Err(refusal) = outcome else { continue };
            if refusal.unknown_class {
                // Every file would be refused alike (and none was stored): say it once.
                bar.finish_and_clear();
                anyhow::bail!("{}; nothing was stored", refusal.problem);
            }
            refused += 1;
            bar.suspend(|| eprintln!("{}: refused: {}", file.display(), refusal.problem));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    println!("{} stored, {refused} refused (class '{}')", files.len() - refused, args.class);
    Ok(if refused > 0 { 1 } else { 0 })
}

pub fn adapt(args: AdaptArgs, config: DeviceConfig) -> anyhow::Result<i32> {
    if args.cancel {
        let client = Client::connect(&config).ok_or_else(|| anyhow::anyhow!("no agent is running"))?;
        let cancelled = client.cancel()?;
        println!("{}", if cancelled { "run cancelled" } else { "no run in progress" });
        return Ok(0);
    }
    let summary = match Client::connect(&config) {
        Some(client) => {
            let started = match client.start_adapt(args.method.as_deref(), args.force) {
                Ok(started) => started,
                Err(e) => match e.downcast_ref::<Refused>() {
                    Some(refused) if refused.kind.as_deref() == Some("nothing_new") => {
                        println!("{}", refused.message);
                        return Ok(0);
                    }
                    _ => return Err(e),
                },
            };
            println!("adaptation started on the agent at {} ({})", client.base(), started.method);
            if args.no_wait {
                return Ok(0);
            }
            let bar = super::progress_bar(started.steps, "adapting");
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let state = client.adapt_state()?;
                match state.running {
                    Some(progress) => bar.set_position(progress.step as u64),
                    None => {
                        bar.finish_and_clear();
                        break state.last.ok_or_else(|| anyhow::anyhow!("the run ended without a result"))?;
                    }
                }
            }
            .map_err(anyhow::Error::msg)?
        }
        None => {
            let Reached::Offline(_lock, mut agent) = reach(&config, "adapt")? else {
                anyhow::bail!("the agent started meanwhile; run `edgeadapt adapt` again to adapt on it");
            };
            let bar = super::progress_bar(0, "adapting");
            let summary = agent.adapt_now(args.method.as_deref(), args.force, &mut |step, steps| {
                bar.set_length(steps as u64);
                bar.set_position(step as u64);
            });
            bar.finish_and_clear();
            match summary {
                Err(AgentError::NothingNew(reason)) => {
                    println!("{reason}");
                    return Ok(0);
                }
                other => other?,
            }
        }
    };
    print_summary(&summary);
    Ok(if summary.promoted { 0 } else { 2 })
}

fn print_summary(summary: &RunSummary) {
    for line in summary_lines(summary) {
        println!("{line}");
    }
}

/// A run's report: the verdict, the gate's reasons, then each figure of the new version with the
/// source model's in brackets, so every line compares with the same baseline.
pub(super) fn summary_lines(summary: &RunSummary) -> Vec<String> {
    let verdict = if summary.promoted { "promoted" } else { "rejected" };
    let mut lines = vec![format!("version {} ({}) {verdict}", summary.version, summary.method)];
    lines.extend(summary.reasons.iter().map(|reason| format!("  - {reason}")));
    let gate = &summary.metrics["gate"];
    let percent = |value: Option<f64>| value.map_or("n/a".to_string(), |v| format!("{:.1} %", v * 100.0));
    // The gate's pairs are (new version, baseline); the seen validation pair's baseline is the
    // version served before the run, so its source figure is recorded beside it.
    let adapted = |key: &str| gate[key].as_array().and_then(|v| v.first()).and_then(|v| v.as_f64());
    let source = |key: &str| gate[key].as_array().and_then(|v| v.get(1)).and_then(|v| v.as_f64());
    let figures = [
        ("seen validation accuracy", adapted("seen_validation"), summary.metrics["source_seen_validation"].as_f64()),
        ("traffic predicted unseen", adapted("unseen_rate"), source("unseen_rate")),
        ("reference accuracy, unseen classes", adapted("reference_unseen"), source("reference_unseen")),
    ];
    lines.push("  new version [source model]:".into());
    for (name, new, source) in figures {
        lines.push(format!("  {name}: {} [{}]", percent(new), percent(source)));
    }
    lines.push(format!("  seconds: {:.1}", summary.metrics["seconds"].as_f64().unwrap_or(0.0)));
    lines
}

pub fn rollback(args: RollbackArgs, config: DeviceConfig) -> anyhow::Result<i32> {
    let serving = match reach(&config, "rollback")? {
        Reached::Live(client) => client.rollback(args.to)?,
        Reached::Offline(_lock, mut agent) => agent.rollback(args.to)?,
    };
    println!("serving version {serving}{}", if serving == 0 { " (source model)" } else { "" });
    Ok(0)
}

pub fn status(args: StatusArgs, config: DeviceConfig) -> anyhow::Result<i32> {
    // A stopped agent's status is read from its store; the model is not loaded.
    let (status, live) = match access(&config, "status")? {
        Access::Live(client) => (client.status()?, true),
        Access::Locked(_lock) => (crate::agent::stopped_status(&config)?, false),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status_text(&status, live));
    }
    Ok(0)
}

/// `status`'s report: the served version, the versions and samples tables, the counters.
pub(super) fn status_text(status: &Status, live: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "device {} · bundle {} · provider {} · {}",
        status.device_id,
        status.bundle_id,
        status.provider,
        if live { "agent running" } else { "agent not running (read from the store)" }
    );
    let _ =
        writeln!(out, "serving version {}{}", status.serving, if status.serving == 0 { " (source model)" } else { "" });
    if let Some(run) = &status.running {
        let _ = writeln!(out, "adaptation running: {} step {}/{}", run.method, run.step, run.steps);
    }
    let mut versions = Table::new(&["version", "parent", "status", "method", "created", "seen val.", "reasons"]);
    for v in &status.versions {
        let seen = v.metrics["gate"]["seen_validation"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|x| x.as_f64())
            .map_or("".into(), |x| format!("{:.1} %", x * 100.0));
        versions.row(vec![
            format!("{}{}", v.id, if v.id == status.serving { " *" } else { "" }),
            v.parent.map_or("".into(), |p| p.to_string()),
            format!("{:?}", v.status).to_lowercase(),
            v.method.clone(),
            format_time(v.created_ms),
            seen,
            v.reasons.join("; "),
        ]);
    }
    let _ = writeln!(out, "\n{}", versions.render());
    let mut samples = Table::new(&["class", "train", "validation"]);
    for (class, (train, validation)) in &status.samples {
        samples.row(vec![class.clone(), train.to_string(), validation.to_string()]);
    }
    if status.samples.is_empty() {
        let _ = writeln!(out, "no labelled samples yet");
    } else {
        let _ = writeln!(out, "{}", samples.render());
    }
    let _ = writeln!(
        out,
        "new labels since the last run: {} · last run: {} · unlabelled traffic kept: {} · undelivered events: {}",
        status.new_labels_since_last_run,
        status.last_run_ms.map_or("never".into(), format_time),
        status.traffic_samples,
        status.undelivered_events
    );
    let c = &status.classification;
    if c.classified + c.failed > 0 {
        let latency =
            c.latency_ms.map_or("".into(), |l| format!(" · latency p50 {:.1} ms, p99 {:.1} ms", l.p50, l.p99));
        let _ = writeln!(out, "classified {} ({} failed) since start{latency}", c.classified, c.failed);
    }
    out
}

fn format_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_report_puts_the_source_models_figure_in_brackets_on_every_line() {
        let summary = RunSummary {
            version: 2,
            promoted: true,
            method: "recommended".into(),
            reasons: vec![],
            metrics: serde_json::json!({
                // Seen validation: the gate's baseline is the served version 1 (0.70), not the source.
                "gate": { "seen_validation": [0.9, 0.7], "unseen_rate": [0.25, 0.3], "reference_unseen": null },
                "source_seen_validation": 0.5,
                "seconds": 1.25,
            }),
        };
        let lines = summary_lines(&summary);
        assert!(lines.contains(&"  seen validation accuracy: 90.0 % [50.0 %]".to_string()), "{lines:#?}");
        assert!(lines.contains(&"  traffic predicted unseen: 25.0 % [30.0 %]".to_string()), "{lines:#?}");
        assert!(lines.contains(&"  reference accuracy, unseen classes: n/a [n/a]".to_string()), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("[source model]")), "{lines:#?}");
    }
}
