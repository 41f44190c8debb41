//! `edgeadapt fleet simulate`: a fleet of simulated devices for load tests.

use std::time::Duration;

use clap::Args;

use crate::fleet::client::BrokerOptions;
use crate::fleet::simulate::{SimReport, SimulateOptions, simulate};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Simulated devices, each with its own connection.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Their ids are PREFIX-0000, PREFIX-0001, ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Seconds to run.
    #[arg(long = "for", value_name = "SECONDS", default_value_t = 60)]
    pub seconds: u64,
    /// Seconds between each device's metrics (the agent's mqtt.metrics_every_s).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub metrics_every: u64,
    /// Seconds between each device's events.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub events_every: u64,
    /// Devices that connect per second at the start.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub connects_per_s: u32,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(broker: BrokerOptions, args: SimulateArgs) -> anyhow::Result<i32> {
    anyhow::ensure!((1..=100_000).contains(&args.devices), "--devices must be 1 to 100000");
    anyhow::ensure!(
        args.metrics_every >= 1 && args.events_every >= 1,
        "--metrics-every and --events-every must be at least 1"
    );
    let options = SimulateOptions {
        devices: args.devices,
        prefix: args.prefix,
        metrics_every: Duration::from_secs(args.metrics_every),
        events_every: Duration::from_secs(args.events_every),
        duration: Duration::from_secs(args.seconds),
        connects_per_s: args.connects_per_s,
    };
    let report = simulate(&broker, &options, &mut |report| eprintln!("{}", line(report))).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", line(&report));
    }
    Ok(0)
}

fn line(report: &SimReport) -> String {
    let rate = |n: u64| n as f64 / report.seconds.max(0.001);
    format!(
        "{:.0} s: {} of {} devices connected; they published {:.0} messages/s and received {:.0}/s ({} commands); \
         the watcher saw {:.0} messages/s, {:.0} ms behind at the median, {:.0} ms at the 99th percentile, {:.0} ms at most",
        report.seconds,
        report.connected,
        report.devices,
        rate(report.published),
        rate(report.received),
        report.commands,
        rate(report.watcher_messages),
        report.watcher_lag_ms_p50,
        report.watcher_lag_ms_p99,
        report.watcher_lag_ms_max
    )
}
