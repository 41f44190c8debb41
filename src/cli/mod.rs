//! Command-line interface: argument types and dispatch. Each command lives in its own file.

mod agent;
mod bench;
mod classify;
mod console;
mod demo;
mod doctor;
mod fleet;
mod fleet_deploy;
mod fleet_share;
mod fleet_simulate;
mod import;
pub mod pipe;
mod reference;
mod story;
mod table;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::config::{DeviceConfig, search};
use crate::model::Bundle;
use crate::runtime::RuntimeOptions;

/// Default bundle when neither --bundle nor a config names one.
pub const DEFAULT_BUNDLE: &str = "models/efficientnet-lite0-fonts36";

#[derive(Debug, Parser)]
#[command(name = "edgeadapt", version, about = "Classify images with an ONNX model and adapt it on device")]
pub struct Cli {
    /// Device config (TOML): the bundle, runtime, agent and MQTT settings. Without it, the first
    /// found of $EDGEADAPT_CONFIG, ~/.config/edgeadapt/config.toml ($XDG_CONFIG_HOME),
    /// /etc/edgeadapt/config.toml and ./device-config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log more: `-v` what the command does (info), `-vv` details (debug). Without it, commands
    /// log only warnings and errors; `run` logs info. `EDGEADAPT_LOG` (e.g. `debug`) overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log filter when `EDGEADAPT_LOG` does not set one: a command speaks through its
    /// output and logs only what went wrong; the agent, a service, logs what it does.
    pub fn log_filter(&self) -> &'static str {
        let agent = matches!(self.command, Command::Run(_));
        match (self.verbose, agent) {
            (0, false) => "warn,rumqttd=off",
            (0, true) | (1, _) => "warn,edgeadapt=info,rumqttd=off",
            _ => "info,edgeadapt=debug,rumqttd=warn",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Classify image files or folders.
    Classify(classify::ClassifyArgs),
    /// Benchmark adaptation methods on an image-folder data set with partial target labels.
    Bench(bench::BenchArgs),
    /// Turn a single-file ONNX classifier into a bundle.
    ImportOnnx(Box<import::ImportArgs>),
    /// Write a bundle out as one ONNX model (trunk + tail + head).
    ExportOnnx(import::ExportArgs),
    /// Store source-domain reference samples in a bundle (for label-free health estimates).
    AddReference(reference::ReferenceArgs),
    /// Classify the bundled benchmark samples with the bundled model and print a report.
    Demo(demo::DemoArgs),
    /// Run the device agent: watched folder, labelling inbox, local HTTP endpoint, adaptation policy.
    Run(agent::RunArgs),
    /// Store labelled images of one class (through the running agent, or in its store).
    Label(agent::LabelArgs),
    /// Adapt now with the stored labels; the safety gate decides whether the result is served.
    Adapt(agent::AdaptArgs),
    /// Serve the source model or an earlier version.
    Rollback(agent::RollbackArgs),
    /// Versions, labelled samples, the last run and classification counters.
    Status(agent::StatusArgs),
    /// Watch and command devices over MQTT.
    Fleet(fleet::FleetArgs),
    /// Check the runtime, providers, GPU, bundle, store, disk, clock, TLS files and broker.
    Doctor(doctor::DoctorArgs),
    /// The on-site console's users and its TLS fingerprint.
    Console(console::ConsoleArgs),
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let found = search::search(&search::Inputs::current(cli.config.clone()), Path::exists);
    let config = match &found {
        Ok(found) => Some(load_config(found)?),
        Err(_) => None,
    };
    // The agent commands need a config; the others fall back to their defaults without one.
    let required = || match (&found, &config) {
        (Ok(found), Some(config)) => Ok((config.clone(), found.path.clone())),
        (Err(not_found), _) => Err(anyhow::anyhow!("{not_found}")),
        (Ok(_), None) => unreachable!("a found config is loaded"),
    };
    match cli.command {
        Command::Classify(args) => classify::run(args, config.as_ref()),
        Command::Bench(args) => bench::run(args, config.as_ref()),
        Command::ImportOnnx(args) => import::run_import(*args, config.as_ref()),
        Command::ExportOnnx(args) => import::run_export(args, config.as_ref()),
        Command::AddReference(args) => reference::run(args, config.as_ref()),
        Command::Demo(args) => demo::run(args, config.as_ref()),
        Command::Run(args) => {
            let (config, path) = required()?;
            agent::run(args, config, path)
        }
        Command::Label(args) => agent::label(args, required()?.0),
        Command::Adapt(args) => agent::adapt(args, required()?.0),
        Command::Rollback(args) => agent::rollback(args, required()?.0),
        Command::Status(args) => agent::status(args, required()?.0),
        Command::Fleet(args) => fleet::run(args, config.as_ref()),
        Command::Doctor(args) => doctor::run(args, required()?.0),
        Command::Console(args) => console::run(args, required()?.0),
    }
}

/// Loads the config the search found; one named by the environment says so when it fails.
fn load_config(found: &search::Found) -> anyhow::Result<DeviceConfig> {
    DeviceConfig::load(&found.path).map_err(|error| match found.origin {
        search::Origin::Variable => anyhow::anyhow!("{error} (the config {} names)", search::CONFIG_VAR),
        _ => error.into(),
    })
}

/// The bundle folder and runtime options from flags, config and defaults, in that order.
fn bundle_and_runtime(bundle: Option<PathBuf>, config: Option<&DeviceConfig>) -> (PathBuf, RuntimeOptions) {
    let runtime = config.map(|c| c.runtime.clone()).unwrap_or_default();
    let bundle = bundle
        .or_else(|| config.map(crate::agent::deploy::served_bundle_folder))
        .or_else(|| std::env::var_os("EDGEADAPT_BUNDLE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUNDLE));
    (bundle, runtime)
}

fn load_bundle(dir: &std::path::Path) -> anyhow::Result<Bundle> {
    Bundle::load(dir).map_err(|e| anyhow::anyhow!("cannot load bundle {}: {e}", dir.display()))
}

fn progress_bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}}, {{per_sec}}]"
    ))
    .expect("static template");
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
