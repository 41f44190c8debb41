//! `edgeadapt fleet ...`: the operator's commands over MQTT.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::table::Table;
use crate::config::DeviceConfig;
use crate::fleet::client::{BrokerOptions, FleetClient, FleetView};

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub command: FleetCommand,
}

/// How to reach the broker; unset values come from the config's `[mqtt]` table.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// mqtt://HOST:PORT or mqtts://HOST:PORT (default: the config's broker; the embedded one
    /// listens on mqtt.embedded_listen).
    #[arg(long, global = true)]
    pub broker: Option<String>,
    /// The fleet's topic level, `edgeadapt/v1/<FLEET>/<device>/...` (default: the config's
    /// mqtt.fleet).
    #[arg(long, global = true)]
    pub fleet: Option<String>,
    /// User name for the broker (default: the config's mqtt.username).
    #[arg(long, global = true)]
    pub username: Option<String>,
    /// File holding the broker password (default: the config's mqtt.password_file).
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) for mqtts://.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM) for mutual TLS.
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The fleet's shared HMAC key, to sign commands (default: the config's
    /// mqtt.command_key_file); `--signing-key` takes precedence.
    #[arg(long, global = true, value_name = "FILE")]
    pub command_key_file: Option<PathBuf>,
    /// An operator's private key (PEM, from `fleet keygen`), to sign commands (default: the
    /// config's mqtt.signing_key_file).
    #[arg(long, global = true, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The broker's packet limit: larger commands are refused here and artefacts are chunked
    /// to fit (default: the config's mqtt.max_packet_bytes, else 262144).
    #[arg(long, global = true, value_name = "BYTES")]
    pub max_packet_bytes: Option<usize>,
    /// How long a signed command stays valid, in seconds.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 600)]
    pub expires_in: u64,
}

/// How long a command waits for the device's answer (`watch` has `--for` instead).
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Seconds to wait for the device's response.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub timeout: u64,
    /// Print the device's answer as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Make an operator key: OUT/operator.key (private, PEM, mode 0600; keep it on the
    /// operator's machine) and OUT/operator.pub (a line for devices' mqtt.operator_keys_file).
    Keygen {
        /// The folder to write the two files to.
        #[arg(long)]
        out: PathBuf,
        /// The name devices record as the signer of this key's commands.
        #[arg(long, default_value = "operator")]
        name: String,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// A live table of the fleet's devices.
    Watch {
        /// Stop after this many seconds and print the table once.
        #[arg(long = "for", value_name = "SECONDS")]
        seconds: Option<u64>,
    },
    /// Adapt a device now and wait for the result.
    Adapt {
        /// The device's id (its config's device_id).
        #[arg(long)]
        device: String,
        /// Method (default: the device's policy method).
        #[arg(long)]
        method: Option<String>,
        /// Adapt even with no labels since the device's newest version (which the run would repeat).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Serve the source model or an earlier version on a device.
    Rollback {
        /// The device's id (its config's device_id).
        #[arg(long)]
        device: String,
        /// `source` or a version number.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A device's full status.
    Status {
        /// The device's id (default: the config's device_id).
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change a device's adaptation policy; options left out keep their value. The change holds
    /// across the device's restarts.
    SetPolicy {
        /// The device's id (its config's device_id).
        #[arg(long)]
        device: String,
        /// Method for the runs the policy starts.
        #[arg(long)]
        method: Option<String>,
        /// Start a run after this many new labels (0: never).
        #[arg(long, value_name = "N")]
        after_new_labels: Option<usize>,
        /// Start a run this often when there are new labels (0: never).
        #[arg(long, value_name = "MINUTES")]
        every_minutes: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Give other devices (running the same bundle) a version one device made: each judges it
    /// with its own gate on its own samples and traffic, promotes or rejects it, and answers.
    Adopt {
        /// DEVICE or DEVICE@VERSION (default: the version it serves).
        #[arg(long, value_name = "DEVICE[@VERSION]")]
        from: String,
        /// The receiving devices, separated by commas.
        #[arg(long, value_name = "DEVICES", value_delimiter = ',', required = true)]
        to: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Roll a new source bundle out: each device gets it in verified chunks, checks it, shadows
    /// it next to the served model and switches only if it is healthy; canaries first, and
    /// the rollout stops after --max-failures failed devices.
    Deploy(super::fleet_deploy::DeployArgs),
    /// Simulated devices (status, metrics, events; answers to status, offer and deploy),
    /// without a model, for load tests of the broker, `fleet watch` and `fleet deploy`.
    Simulate(super::fleet_simulate::SimulateArgs),
    /// Pool what devices at one site learned: average the versions they serve (same bundle,
    /// same method), then give the merge to each of them (or --to) to recalibrate on its own
    /// traffic and judge with its own gate, as `adopt` does.
    Merge {
        /// The devices whose served versions are averaged, separated by commas.
        #[arg(long, value_name = "DEVICES", value_delimiter = ',', required = true)]
        devices: Vec<String>,
        /// The devices that receive the merge (default: the same devices).
        #[arg(long, value_name = "DEVICES", value_delimiter = ',')]
        to: Option<Vec<String>>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Fetch a version's weights from a device and rebuild a standalone bundle from them.
    Weights {
        /// The device's id (its config's device_id).
        #[arg(long)]
        device: String,
        /// Default: the version the device serves.
        #[arg(long)]
        version: Option<i64>,
        /// The source bundle the device runs (default: the config's).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Where to write the rebuilt bundle; must not exist yet, or be empty.
        #[arg(long)]
        out: PathBuf,
        /// Replace the bundle at `--out` (a folder that is not a bundle is never replaced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// The device `fleet status` asks: `--device`, else the config's `device_id`.
fn status_device(device: Option<String>, config: Option<&DeviceConfig>) -> anyhow::Result<String> {
    device.or_else(|| config.map(|c| c.device_id.clone())).ok_or_else(|| {
        anyhow::anyhow!(
            "which device? give --device ID, or a config whose device_id to use (--config FILE, or one of the \
             places `edgeadapt --help` lists under --config)"
        )
    })
}

fn broker_options(args: &BrokerArgs, config: Option<&DeviceConfig>) -> anyhow::Result<BrokerOptions> {
    let mqtt = config.map(|c| c.mqtt.clone()).unwrap_or_default();
    let url = match &args.broker {
        Some(url) => url.clone(),
        None if mqtt.broker == "embedded" => format!("mqtt://{}", mqtt.embedded_listen),
        None => mqtt.broker.clone(),
    };
    let signer = crate::fleet::keys::signer(
        args.signing_key.as_deref().or(mqtt.signing_key_file.as_deref()),
        args.command_key_file.as_deref().or(mqtt.command_key_file.as_deref()),
    )?;
    anyhow::ensure!(
        (1..=7 * 86_400).contains(&args.expires_in),
        "--expires-in must be 1 to 604800 seconds (a week), not {}",
        args.expires_in
    );
    Ok(BrokerOptions {
        url,
        fleet: args.fleet.clone().unwrap_or(mqtt.fleet),
        username: args.username.clone().or(mqtt.username),
        password_file: args.password_file.clone().or(mqtt.password_file),
        ca_file: args.ca.clone().or(mqtt.ca_file),
        client_cert: args.cert.clone().or(mqtt.client_cert),
        client_key: args.key.clone().or(mqtt.client_key),
        signer,
        command_validity: Duration::from_secs(args.expires_in),
        max_packet_bytes: args.max_packet_bytes.unwrap_or(mqtt.max_packet_bytes).max(2048),
    })
}

pub fn run(mut args: FleetArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    if let FleetCommand::Keygen { out, name, force } = &args.command {
        return keygen(out, name, *force);
    }
    let options = broker_options(&args.broker, config)?;
    // Before connecting: a missing device is the user's to fix, whatever the broker's state.
    if let FleetCommand::Status { device, .. } = &mut args.command {
        *device = Some(status_device(device.take(), config)?);
    }
    if let FleetCommand::Simulate(simulate) = args.command {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(super::fleet_simulate::run(options, simulate));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut client = FleetClient::connect(options, Duration::from_secs(10)).await?;
        let (device, command, command_args, wait) = match args.command {
            FleetCommand::Keygen { .. } | FleetCommand::Simulate(_) => unreachable!("run before connecting"),
            FleetCommand::Watch { seconds } => {
                let live = std::io::stdout().is_terminal() && seconds.is_none();
                let view = client
                    .watch(seconds.map(Duration::from_secs), |view| {
                        if live {
                            print!("\x1b[2J\x1b[H{}", render(view));
                        }
                    })
                    .await?;
                if !live {
                    print!("{}", render(&view));
                }
                return Ok(0);
            }
            FleetCommand::Adopt { from, to, wait } => {
                return super::fleet_share::adopt(&mut client, &from, &to, &wait).await;
            }
            FleetCommand::Merge { devices, to, wait } => {
                let to = to.unwrap_or_else(|| devices.clone());
                return super::fleet_share::merge(&mut client, &devices, &to, &wait).await;
            }
            FleetCommand::Deploy(args) => return super::fleet_deploy::deploy(&mut client, args).await,
            FleetCommand::Weights { device, version, bundle, out, force, wait } => {
                let timeout = Duration::from_secs(wait.timeout);
                let overwrite = crate::output::Overwrite::from_force(force);
                crate::output::check_dir(&out, overwrite)?;
                let bundle_dir =
                    bundle.or_else(|| config.map(|c| c.bundle.clone())).unwrap_or_else(|| super::DEFAULT_BUNDLE.into());
                let source = super::load_bundle(&bundle_dir)?;
                let (manifest, payload) = client.fetch_weights(&device, version, timeout).await?;
                crate::fleet::rebuild::bundle_from_weights(&source, &manifest, &payload, &out, overwrite)
                    .map_err(anyhow::Error::msg)?;
                if wait.json {
                    let written = serde_json::json!({ "manifest": manifest, "bundle": out });
                    println!("{}", serde_json::to_string_pretty(&written)?);
                } else {
                    println!(
                        "version {} of {device} ({}, {} f16 bytes in {} chunks, sha256 verified) -> {}",
                        manifest.version,
                        manifest.method,
                        manifest.total_bytes,
                        manifest.chunks,
                        out.display()
                    );
                }
                return Ok(0);
            }
            FleetCommand::Adapt { device, method, force, wait } => {
                let mut args = serde_json::Map::new();
                if let Some(method) = method {
                    args.insert("method".into(), method.into());
                }
                if force {
                    args.insert("force".into(), true.into());
                }
                (device, "adapt", serde_json::Value::Object(args), wait)
            }
            FleetCommand::Rollback { device, to, wait } => {
                let to = to.parse::<i64>().map_or(serde_json::json!(to), |n| serde_json::json!(n));
                (device, "rollback", serde_json::json!({ "to": to }), wait)
            }
            FleetCommand::Status { device, wait } => {
                (status_device(device, config)?, "status", serde_json::json!({}), wait)
            }
            FleetCommand::SetPolicy { device, method, after_new_labels, every_minutes, wait } => {
                let update = crate::protocol::commands::PolicyUpdate { method, after_new_labels, every_minutes };
                (device, "set-policy", serde_json::to_value(update)?, wait)
            }
        };
        let timeout = Duration::from_secs(wait.timeout);
        let response = client.command(&device, command, command_args, timeout).await?;
        if response.ok {
            let result = response.result.unwrap_or_default();
            if wait.json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", answer_text(&device, command, result)?);
            }
            Ok(0)
        } else {
            eprintln!("{device}: {command} failed: {}", response.error.unwrap_or_default());
            Ok(1)
        }
    })
}

/// `fleet keygen`: a new operator key pair in `out`.
fn keygen(out: &std::path::Path, name: &str, force: bool) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !name.is_empty() && !name.contains(['\n', '\r']),
        "--name must be a non-empty single line, not {name:?}"
    );
    let (private, public) = crate::protocol::signing::generate_operator_key(name).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let overwrite = crate::output::Overwrite::from_force(force);
    let (key, public_file) = (out.join("operator.key"), out.join("operator.pub"));
    crate::output::check_file(&key, overwrite)?;
    crate::output::check_file(&public_file, overwrite)?;
    crate::output::write_file_with(&key, overwrite, |staged| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        file.open(staged)?.write_all(private.as_bytes())
    })?;
    crate::output::write_file(&public_file, format!("{public}\n").as_bytes(), overwrite)?;
    println!("wrote {} (private: keep it on this machine) and {}", key.display(), public_file.display());
    println!("devices trust it with this line in their mqtt.operator_keys_file:\n{public}");
    Ok(0)
}

/// A device's answer as the local command would print it (`status`'s tables, `adapt`'s report,
/// `rollback`'s sentence).
fn answer_text(device: &str, command: &str, result: serde_json::Value) -> anyhow::Result<String> {
    let text = match command {
        "status" => super::agent::status_text(&serde_json::from_value(result)?, true),
        "adapt" => super::agent::summary_lines(&serde_json::from_value(result)?).join("\n") + "\n",
        "rollback" => {
            let serving = result["serving"].as_i64().unwrap_or_default();
            format!("{device} serves version {serving}{}\n", if serving == 0 { " (source model)" } else { "" })
        }
        _ => match result.as_object() {
            Some(fields) => {
                let pairs: Vec<String> = fields.iter().map(|(key, value)| format!("{key} = {value}")).collect();
                format!("{device} {command}: {}\n", pairs.join(", "))
            }
            None => format!("{device} {command}: {result}\n"),
        },
    };
    Ok(text)
}

pub(super) fn render(view: &FleetView) -> String {
    let mut table = Table::new(&[
        "device",
        "online",
        "version",
        "provider",
        "labels per class",
        "last adaptation",
        "seen val.",
        "unseen rate (src)",
        "deployment",
        "alerts",
    ]);
    for (device, state) in &view.devices {
        let online = state
            .status
            .as_ref()
            .map_or("?".into(), |s| if s.online { "yes".into() } else { format!("no ({})", s.reason) });
        let version = state.metrics.as_ref().map(|m| m.serving).or(state.status.as_ref().and_then(|s| s.version));
        let provider = state.status.as_ref().and_then(|s| s.provider.clone()).unwrap_or_default();
        let labels = state.metrics.as_ref().map_or(String::new(), |m| {
            let mut parts: Vec<String> = m.samples.iter().map(|(c, (t, v))| format!("{c}:{}", t + v)).collect();
            if parts.len() > 6 {
                let more = parts.len() - 6;
                parts.truncate(6);
                parts.push(format!("+{more}"));
            }
            parts.join(" ")
        });
        let (last, seen, unseen) = match &state.last_adaptation {
            Some(result) => {
                let verdict = if result.promoted { "promoted" } else { "rejected" };
                let gate = &result.gate;
                let pair = |key: &str| match gate[key].as_array() {
                    Some(v) if v.len() == 2 => format!(
                        "{:.1} ({:.1})",
                        v[0].as_f64().unwrap_or(0.0) * 100.0,
                        v[1].as_f64().unwrap_or(0.0) * 100.0
                    ),
                    _ => "-".into(),
                };
                (format!("v{} {verdict}", result.version), pair("seen_validation"), pair("unseen_rate"))
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        table.row(vec![
            device.clone(),
            online,
            version.map_or("?".into(), |v| v.to_string()),
            provider,
            labels,
            last,
            seen,
            unseen,
            state.deployment.as_ref().map_or("-".into(), |(bundle, step)| format!("{bundle} {step}")),
            state.alerts.join("; "),
        ]);
    }
    if view.devices.is_empty() { "no devices seen yet\n".into() } else { table.render() + "\n" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_status_asks_the_given_device_else_the_configs_and_says_what_to_give_without_either() {
        let config = DeviceConfig::parse("device_id = \"dev-1\"\nbundle = \"m\"\n", std::path::Path::new(".")).unwrap();
        assert_eq!(status_device(Some("other".into()), Some(&config)).unwrap(), "other");
        assert_eq!(status_device(None, Some(&config)).unwrap(), "dev-1");
        let error = status_device(None, None).unwrap_err().to_string();
        assert!(error.contains("--device ID") && error.contains("--config"), "{error}");
    }
}
