//! `edgeadapt fleet deploy`: roll a new source bundle out, canaries first.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::deploy::health::Thresholds;
use crate::deploy::rollout::Outcome;
use crate::fleet::client::FleetClient;
use crate::fleet::deploy::DeployOptions;

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The bundle folder to ship (as `import-onnx` writes it).
    #[arg(long)]
    pub bundle: PathBuf,
    /// The devices, separated by commas, in rollout order.
    #[arg(long, value_name = "DEVICES", value_delimiter = ',', required = true)]
    pub devices: Vec<String>,
    /// The first devices to get it, alone; if one of them fails, no other device gets it.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub canary: usize,
    /// Stop the rollout once this many devices have failed.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub max_failures: usize,
    /// Devices deployed to at once after the canaries.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub parallel: usize,
    /// Seconds of service each device watches the new bundle for before it counts as in
    /// service (it switches back by itself if the bundle fails meanwhile).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub probation: u64,
    /// The share of shadowed images on which the new bundle must agree with the served model.
    #[arg(long, value_name = "FRACTION", default_value_t = Thresholds::default().min_agreement)]
    pub min_agreement: f64,
    /// How much lower the new bundle's accuracy on labelled images may be (0.05: 5 points).
    #[arg(long, value_name = "FRACTION", default_value_t = Thresholds::default().max_accuracy_drop)]
    pub max_accuracy_drop: f64,
    /// Seconds a device may take to answer, and to unpack, warm up and shadow the bundle.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
    /// Print every device's outcome as JSON at the end instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the rollout, printing each device's steps; fails unless every device is in service.
pub async fn deploy(client: &mut FleetClient, args: DeployArgs) -> anyhow::Result<i32> {
    let health = Thresholds {
        min_agreement: args.min_agreement,
        max_accuracy_drop: args.max_accuracy_drop,
        ..Thresholds::default()
    };
    health.validate().map_err(|e| anyhow::anyhow!("{}", e.replace("health.", "--").replace('_', "-")))?;
    anyhow::ensure!(
        args.probation <= crate::protocol::commands::MAX_PROBATION_S,
        "--probation must be at most {} seconds (a day)",
        crate::protocol::commands::MAX_PROBATION_S
    );
    let options = DeployOptions {
        devices: args.devices,
        canaries: args.canary,
        parallel: args.parallel,
        max_failures: args.max_failures,
        probation_s: args.probation,
        health,
        timeout: Duration::from_secs(args.timeout),
    };
    let json = args.json;
    let mut report = |device: &str, line: &str| {
        if device.is_empty() {
            eprintln!("{line}");
        } else {
            eprintln!("{device}: {line}");
        }
    };
    let rollout = client.deploy(&args.bundle, &options, &mut report).await?;
    let outcomes = rollout.outcomes();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = outcomes
            .iter()
            .map(|(device, outcome)| (device.clone(), serde_json::to_value(outcome).expect("outcomes serialise")))
            .collect();
        let summary = serde_json::json!({ "devices": map, "stopped": rollout.stopped() });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let count = |want: fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| want(o)).count();
        println!(
            "{} in service, {} failed, {} skipped{}",
            count(|o| *o == Outcome::InService),
            count(|o| matches!(o, Outcome::Failed(_))),
            count(|o| *o == Outcome::Skipped),
            rollout.stopped().map(|why| format!("; stopped: {why}")).unwrap_or_default()
        );
    }
    Ok(if outcomes.iter().all(|(_, o)| *o == Outcome::InService) { 0 } else { 1 })
}
