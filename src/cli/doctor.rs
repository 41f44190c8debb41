//! `edgeadapt doctor`: a table of device checks with a fix for each failure.

use clap::Args;

use super::table::Table;
use crate::config::DeviceConfig;
use crate::doctor::{self, Level};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 only for failures that make the agent unusable (the systemd unit's check before
    /// it starts the agent; an unreachable broker or a wrong clock does not stop it).
    #[arg(long)]
    pub before_start: bool,
}

/// Exit code 0 when nothing failed (warnings allowed), 1 otherwise.
pub fn run(args: DoctorArgs, config: DeviceConfig) -> anyhow::Result<i32> {
    let checks = doctor::run(&config);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        let mut table = Table::new(&["check", "result", "detail", "fix"]);
        for check in &checks {
            let result = match check.level {
                Level::Ok => "ok",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            let one_line = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
            table.row(vec![check.name.into(), result.into(), one_line(&check.detail), one_line(&check.fix)]);
        }
        println!("device {} · config valid\n\n{}", config.device_id, table.render());
    }
    let blocking = |c: &&doctor::Check| c.level == Level::Fail && (!args.before_start || doctor::blocks_start(c));
    Ok(if checks.iter().any(|c| blocking(&c)) { 1 } else { 0 })
}
