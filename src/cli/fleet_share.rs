//! `edgeadapt fleet adopt` and `fleet merge`: sharing what devices learned.

use std::time::Duration;

use super::fleet::WaitArgs;
use crate::fleet::client::FleetClient;

/// `fleet adopt`: fetches the version from its device, sends it to each receiver and prints
/// each one's verdict. Fails when any receiver could not judge it.
pub(super) async fn adopt(client: &mut FleetClient, from: &str, to: &[String], wait: &WaitArgs) -> anyhow::Result<i32> {
    let (source, version) = match from.split_once('@') {
        Some((device, version)) => {
            let version =
                version.parse::<i64>().map_err(|_| anyhow::anyhow!("--from {from}: the version must be a number"))?;
            (device, Some(version))
        }
        None => (from, None),
    };
    let timeout = Duration::from_secs(wait.timeout);
    let (weights, payload) = client.fetch_weights(source, version, timeout).await?;
    let name = format!("{}@{}", weights.device, weights.version);
    deliver(client, &name, &weights, &payload, to, wait).await
}

/// `fleet merge`: fetches the version each device serves, averages them and gives the merge to
/// each receiver, printing each one's verdict. Fails when any receiver could not judge it.
pub(super) async fn merge(
    client: &mut FleetClient,
    devices: &[String],
    to: &[String],
    wait: &WaitArgs,
) -> anyhow::Result<i32> {
    let timeout = Duration::from_secs(wait.timeout);
    let mut sets = Vec::new();
    for device in devices {
        let set = client.fetch_weights(device, None, timeout).await?;
        eprintln!(
            "{device}: serves version {} ({}); its unseen classes: {}",
            set.0.version, set.0.method, set.0.params["unseen"]
        );
        sets.push(set);
    }
    let (merged, payload) = crate::fleet::merge::merge(&sets).map_err(anyhow::Error::msg)?;
    eprintln!("merged {} ({} bytes); unseen by all of them: {}", merged.device, payload.len(), merged.params["unseen"]);
    let name = format!("merge of {}", merged.device);
    deliver(client, &name, &merged, &payload, to, wait).await
}

/// Sends a weights set to each receiver as a transfer, then `adopt`; prints each verdict.
async fn deliver(
    client: &mut FleetClient,
    name: &str,
    weights: &crate::protocol::messages::WeightsManifest,
    payload: &[u8],
    to: &[String],
    wait: &WaitArgs,
) -> anyhow::Result<i32> {
    use crate::protocol::transfer::{ArtefactKind, make};
    let timeout = Duration::from_secs(wait.timeout);
    let meta = serde_json::to_value(weights)?;
    let (manifest, chunks) = make(ArtefactKind::Weights, name, payload, client.options.max_packet_bytes, meta);
    let mut answers = serde_json::Map::new();
    let mut failed = 0;
    for device in to {
        let started = std::time::Instant::now();
        let sent = client.send_artefact(device, &manifest, &chunks, timeout, &mut |_, _| {}).await;
        let answer = match sent {
            Ok(_) => {
                client.command(device, "adopt", serde_json::json!({ "transfer": manifest.transfer }), timeout).await
            }
            Err(error) => Err(error),
        };
        let seconds = started.elapsed().as_secs_f64();
        match answer {
            Ok(response) if response.ok => {
                let result = response.result.unwrap_or_default();
                if !wait.json {
                    let verdict = if result["promoted"] == true { "promoted" } else { "rejected" };
                    let reasons: Vec<&str> =
                        result["reasons"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
                    let why = if reasons.is_empty() { String::new() } else { format!(": {}", reasons.join("; ")) };
                    println!("{device}: {name} {verdict} as version {} in {seconds:.1} s{why}", result["version"]);
                }
                answers.insert(device.clone(), result);
            }
            Ok(response) => {
                failed += 1;
                eprintln!("{device}: adopt failed: {}", response.error.unwrap_or_default());
            }
            Err(error) => {
                failed += 1;
                eprintln!("{device}: adopt failed: {error:#}");
            }
        }
    }
    if wait.json {
        println!("{}", serde_json::to_string_pretty(&answers)?);
    }
    Ok(if failed == 0 { 0 } else { 1 })
}
