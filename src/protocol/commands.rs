//! Commands from the fleet: parsing, validation and signature checks. Pure; the daemon runs
//! them. A command that fails here is answered with an error and changes nothing.

use base64::Engine;
use serde::Deserialize;
use sha2::Sha256;

use super::messages::{COMMAND_SCHEMA, CommandMessage};
use super::signing::{Authority, Signer};
use crate::protocol::VersionRef;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `force`: adapt even when the run would repeat the newest version.
    Adapt {
        method: Option<String>,
        force: bool,
    },
    Rollback {
        to: VersionRef,
    },
    Status,
    SetPolicy(PolicyUpdate),
    Label {
        class: String,
        name: String,
        image: Vec<u8>,
    },
    PublishWeights {
        version: Option<i64>,
    },
    /// An artefact about to arrive in chunks (or resuming): the device answers with the chunks
    /// it still needs.
    Offer(Box<super::transfer::TransferManifest>),
    /// Judge and record the version whose weights arrived as this transfer.
    Adopt {
        transfer: String,
    },
    /// Stage, shadow and serve the bundle that arrived as a transfer.
    Deploy(Box<DeployArgs>),
}

/// What `deploy` carries. The signed command names the archive's full sha256, so the bundle a
/// device unpacks is the one the operator signed for, whatever the chunks' manifest says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployArgs {
    pub transfer: String,
    pub sha256: String,
    /// The bundle's id (`name@hash`), checked after unpacking.
    pub bundle: String,
    /// The first minutes of service, in seconds, after which the new bundle is in service.
    #[serde(default = "default_probation_s")]
    pub probation_s: u64,
    #[serde(default)]
    pub health: super::health::Thresholds,
}

fn default_probation_s() -> u64 {
    300
}

/// The longest probation a deployment may ask for: a day.
pub const MAX_PROBATION_S: u64 = 86_400;

impl Command {
    /// The command's name as it appears in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Adapt { .. } => "adapt",
            Command::Rollback { .. } => "rollback",
            Command::Status => "status",
            Command::SetPolicy(_) => "set-policy",
            Command::Label { .. } => "label",
            Command::PublishWeights { .. } => "publish-weights",
            Command::Offer(_) => "offer",
            Command::Adopt { .. } => "adopt",
            Command::Deploy(_) => "deploy",
        }
    }
}

/// Changes to the adaptation policy; unset fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    pub method: Option<String>,
    pub after_new_labels: Option<usize>,
    pub every_minutes: Option<u64>,
}

/// Why a command is refused: its id (empty if it had none) and the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: String,
    pub error: String,
}

/// Longest id echoed back in a refusal (128 characters of up to 4 bytes).
const MAX_ID_BYTES: usize = 512;

/// `text` cut to at most `max` bytes on a character boundary, saying so.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Identifies a command by its name and a digest of its arguments, for idempotency: a retry
/// (the same payload, or the same command re-serialised) has the same fingerprint. Computed on
/// payloads that [`parse`] accepted.
pub fn fingerprint(payload: &[u8]) -> String {
    use sha2::Digest;
    let value: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    let command = value.get("command").and_then(|c| c.as_str()).unwrap_or("");
    // serde_json's maps are sorted, so the text is canonical.
    // Missing, null and empty arguments are the same command, as for signatures.
    let args = match value.get("args") {
        None | Some(serde_json::Value::Null) => "{}".to_string(),
        Some(args) => args.to_string(),
    };
    format!("{command}:{}", hex::encode(&Sha256::digest(args.as_bytes())[..16]))
}

/// Largest decoded image a `label` command may carry.
const MAX_LABEL_IMAGE: usize = 16 << 20;

/// What a device checks a command's signature against.
#[derive(Debug, Clone, Copy)]
pub struct Verify<'a> {
    pub authority: &'a Authority,
    /// This device's id, which a signed command must name.
    pub device: &'a str,
    pub now_ms: i64,
}

/// A parsed command, with who signed it (`None`: unsigned, on a device that trusts no key).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub id: String,
    pub command: Command,
    pub signed_by: Option<String>,
}

/// Parses a command payload. Where the device trusts a key, the command must carry a valid
/// signature naming this device, unexpired.
pub fn parse(payload: &[u8], verify: Option<&Verify<'_>>) -> Result<Parsed, Refusal> {
    // What comes back is cut: a refusal must never be bigger than the command (a response over
    // the broker's packet limit costs the device its connection).
    let refuse = |id: &str, error: String| Refusal { id: clip(id, MAX_ID_BYTES), error: clip(&error, 512) };
    let message: CommandMessage = serde_json::from_slice(payload).map_err(|e| {
        // Keep the id when the rest is malformed, so the sender gets its answer.
        let id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v["id"].as_str().map(String::from))
            .unwrap_or_default();
        refuse(&id, format!("malformed command: {e}"))
    })?;
    let id = message.id.clone();
    if message.schema != COMMAND_SCHEMA {
        let schema = clip(&message.schema, 64);
        return Err(refuse(&id, format!("unknown schema '{schema}', expected '{COMMAND_SCHEMA}'")));
    }
    if id.is_empty() || id.chars().count() > 128 {
        return Err(refuse(&id, "the command id must be 1 to 128 characters".into()));
    }
    let signed_by = match verify.filter(|v| v.authority.requires_signature()) {
        Some(v) => Some(
            v.authority
                .verify(&message, v.device, v.now_ms)
                .map_err(|why| refuse(&id, format!("unauthorised: {why}")))?,
        ),
        None => None,
    };
    let args = if message.args.is_null() { serde_json::json!({}) } else { message.args.clone() };
    let bad_args = |e: serde_json::Error| refuse(&id, format!("{}: bad arguments: {e}", clip(&message.command, 64)));
    let command = match message.command.as_str() {
        "adapt" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                method: Option<String>,
                #[serde(default)]
                force: bool,
            }
            // The method's name is the agent's to check: the protocol does not know the methods.
            let args: Args = serde_json::from_value(args).map_err(bad_args)?;
            Command::Adapt { method: args.method, force: args.force }
        }
        "rollback" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                to: serde_json::Value,
            }
            let args: Args = serde_json::from_value(args).map_err(bad_args)?;
            let text = match &args.to {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(refuse(&id, format!("rollback: `to` must be \"source\" or a number, not {other}")));
                }
            };
            Command::Rollback { to: text.parse().map_err(|e| refuse(&id, format!("rollback: {e}")))? }
        }
        "status" => Command::Status,
        "set-policy" => {
            let update: PolicyUpdate = serde_json::from_value(args).map_err(bad_args)?;
            if update.after_new_labels.is_some_and(|n| n > 1_000_000_000) {
                return Err(refuse(&id, "set-policy: after_new_labels must be at most 1000000000".into()));
            }
            // Ten years: a schedule beyond it is a mistake, not a policy.
            if update.every_minutes.is_some_and(|m| m > 5_256_000) {
                return Err(refuse(&id, "set-policy: every_minutes must be at most 5256000 (ten years)".into()));
            }
            Command::SetPolicy(update)
        }
        "label" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                class: String,
                image_base64: String,
                name: Option<String>,
            }
            let args: Args = serde_json::from_value(args).map_err(bad_args)?;
            if args.image_base64.len() > MAX_LABEL_IMAGE / 3 * 4 + 4 {
                return Err(refuse(&id, format!("label: the image exceeds {MAX_LABEL_IMAGE} bytes")));
            }
            let image = base64::engine::general_purpose::STANDARD
                .decode(args.image_base64.as_bytes())
                .map_err(|e| refuse(&id, format!("label: image_base64 is not base64: {e}")))?;
            Command::Label { class: args.class, name: args.name.unwrap_or_else(|| format!("command {id}")), image }
        }
        "publish-weights" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                version: Option<i64>,
            }
            let args: Args = serde_json::from_value(args).map_err(bad_args)?;
            Command::PublishWeights { version: args.version }
        }
        "offer" => Command::Offer(Box::new(serde_json::from_value(args).map_err(bad_args)?)),
        "adopt" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                transfer: String,
            }
            let args: Args = serde_json::from_value(args).map_err(bad_args)?;
            if args.transfer.len() != 32 || !args.transfer.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(refuse(&id, "adopt: `transfer` must be a transfer id (32 hex digits)".into()));
            }
            Command::Adopt { transfer: args.transfer }
        }
        "deploy" => {
            let args: DeployArgs = serde_json::from_value(args).map_err(bad_args)?;
            let hex = |text: &str, digits: usize| text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex(&args.transfer, 32) || !hex(&args.sha256, 64) || !args.sha256.starts_with(&args.transfer) {
                return Err(refuse(
                    &id,
                    "deploy: `transfer` must be a transfer id (32 hex digits) and `sha256` the archive's sha256 \
                     (64 hex digits), which begins with it"
                        .into(),
                ));
            }
            if args.probation_s > MAX_PROBATION_S {
                return Err(refuse(&id, format!("deploy: probation_s must be at most {MAX_PROBATION_S} (a day)")));
            }
            args.health.validate().map_err(|e| refuse(&id, format!("deploy: {e}")))?;
            Command::Deploy(Box::new(args))
        }
        other => {
            return Err(refuse(
                &id,
                format!(
                    "unknown command '{}' (adapt, rollback, status, set-policy, label, publish-weights, offer, adopt, deploy)",
                    clip(other, 64)
                ),
            ));
        }
    };
    Ok(Parsed { id, command, signed_by })
}

/// How the sender signs: with what, for which devices, until when.
#[derive(Debug, Clone)]
pub struct Signing<'a> {
    pub signer: &'a Signer,
    pub to: Vec<String>,
    pub expires_ms: i64,
}

/// Builds a command message, signed when `signing` is given.
pub fn build(id: &str, command: &str, args: serde_json::Value, signing: Option<&Signing<'_>>) -> CommandMessage {
    let mut message = CommandMessage {
        schema: COMMAND_SCHEMA.into(),
        id: id.into(),
        command: command.into(),
        args,
        to: vec![],
        expires_ms: None,
        signature: None,
    };
    if let Some(signing) = signing {
        message.to = signing.to.clone();
        message.expires_ms = Some(signing.expires_ms);
        message.signature = Some(signing.signer.sign(&message));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_has_the_same_fingerprint_and_another_command_does_not() {
        let a = br#"{"schema":"edgeadapt.command/1","id":"x","command":"rollback","args":{"to":"source","b":1}}"#;
        let reordered =
            br#"{"args":{"b":1,"to":"source"},"command":"rollback","id":"x","schema":"edgeadapt.command/1"}"#;
        let other = br#"{"schema":"edgeadapt.command/1","id":"x","command":"rollback","args":{"to":3}}"#;
        let status = br#"{"schema":"edgeadapt.command/1","id":"x","command":"status"}"#;
        assert_eq!(fingerprint(a), fingerprint(reordered));
        assert_ne!(fingerprint(a), fingerprint(other));
        assert_ne!(fingerprint(status), fingerprint(a));
        assert!(fingerprint(status).starts_with("status:"));
        let empty = br#"{"schema":"edgeadapt.command/1","id":"x","command":"status","args":{}}"#;
        let null = br#"{"schema":"edgeadapt.command/1","id":"x","command":"status","args":null}"#;
        assert_eq!(fingerprint(status), fingerprint(empty));
        assert_eq!(fingerprint(status), fingerprint(null));
    }

    #[test]
    fn refusals_are_never_much_bigger_than_a_normal_answer() {
        let huge = "z".repeat(262_000);
        for payload in [
            format!(r#"{{"schema":"{huge}","id":"k2","command":"status"}}"#),
            format!(r#"{{"schema":"edgeadapt.command/1","id":"{huge}","command":"status"}}"#),
            format!(r#"{{"schema":"edgeadapt.command/1","id":"k","command":"{huge}"}}"#),
            format!(r#"{{"schema":"edgeadapt.command/1","id":"{huge}","command":"status","args":7"#),
        ] {
            let refusal = parse(payload.as_bytes(), None).unwrap_err();
            assert!(
                refusal.id.len() <= 520 && refusal.error.len() <= 520,
                "{} {}",
                refusal.id.len(),
                refusal.error.len()
            );
        }
        let accented = format!(r#"{{"schema":"edgeadapt.command/1","id":"{}","command":"status"}}"#, "é".repeat(100));
        assert!(parse(accented.as_bytes(), None).is_ok(), "ids are counted in characters");
    }

    #[test]
    fn absurd_policies_are_refused() {
        for args in [
            serde_json::json!({ "every_minutes": u64::MAX }),
            serde_json::json!({ "after_new_labels": 10_000_000_000u64 }),
        ] {
            let message = build("p", "set-policy", args, None);
            assert!(parse(&payload(&message), None).is_err());
        }
    }

    fn payload(message: &CommandMessage) -> Vec<u8> {
        serde_json::to_vec(message).unwrap()
    }

    #[test]
    fn every_command_parses() {
        let cases = [
            (
                build("1", "adapt", serde_json::json!({ "method": "ft-tail+prior" }), None),
                Command::Adapt { method: Some("ft-tail+prior".into()), force: false },
            ),
            (
                build("1f", "adapt", serde_json::json!({ "force": true }), None),
                Command::Adapt { method: None, force: true },
            ),
            // Method names are the agent's to check.
            (
                build("1m", "adapt", serde_json::json!({ "method": "ft-taill" }), None),
                Command::Adapt { method: Some("ft-taill".into()), force: false },
            ),
            (
                build("2", "rollback", serde_json::json!({ "to": "source" }), None),
                Command::Rollback { to: VersionRef::Source },
            ),
            (build("3", "rollback", serde_json::json!({ "to": 4 }), None), Command::Rollback { to: VersionRef::Id(4) }),
            (build("4", "status", serde_json::Value::Null, None), Command::Status),
            (
                build("5", "set-policy", serde_json::json!({ "after_new_labels": 50 }), None),
                Command::SetPolicy(PolicyUpdate { after_new_labels: Some(50), ..PolicyUpdate::default() }),
            ),
            (
                build("6", "label", serde_json::json!({ "class": "A", "image_base64": "AAEC" }), None),
                Command::Label { class: "A".into(), name: "command 6".into(), image: vec![0, 1, 2] },
            ),
            (build("7", "publish-weights", serde_json::json!({}), None), Command::PublishWeights { version: None }),
        ];
        for (message, expected) in cases {
            let parsed = parse(&payload(&message), None).map(|p| (p.id, p.command, p.signed_by));
            assert_eq!(parsed, Ok((message.id.clone(), expected, None)));
        }
    }

    #[test]
    fn malformed_and_unknown_commands_are_refused_with_their_id() {
        let refusal = parse(br#"{"id": "9", "command": 3}"#, None).unwrap_err();
        assert_eq!(refusal.id, "9");
        assert!(refusal.error.contains("malformed"), "{}", refusal.error);
        assert_eq!(parse(b"\xff\x00", None).unwrap_err().id, "");
        let cases = [
            (build("a", "reboot", serde_json::json!({}), None), "unknown command"),
            (build("c", "adapt", serde_json::json!({ "lr": 1 }), None), "bad arguments"),
            (build("d", "rollback", serde_json::json!({ "to": "yesterday" }), None), "rollback"),
            (build("e", "label", serde_json::json!({ "class": "A", "image_base64": "***" }), None), "base64"),
            (build("", "status", serde_json::json!({}), None), "id"),
        ];
        for (message, phrase) in cases {
            let refusal = parse(&payload(&message), None).unwrap_err();
            assert_eq!(refusal.id, message.id);
            assert!(refusal.error.contains(phrase), "{}: {}", message.command, refusal.error);
        }
        let mut wrong_schema = build("f", "status", serde_json::json!({}), None);
        wrong_schema.schema = "edgeadapt.command/2".into();
        assert!(parse(&payload(&wrong_schema), None).unwrap_err().error.contains("schema"));
    }

    #[test]
    fn where_the_device_trusts_a_key_only_commands_it_signed_for_this_device_pass() {
        let signer = Signer::Hmac(b"fleet secret".to_vec());
        let authority =
            Authority { hmac_key: Some(b"fleet secret".to_vec()), max_validity_ms: 60_000, ..Default::default() };
        let now_ms = 1_800_000_000_000;
        let verify = Verify { authority: &authority, device: "orin-1", now_ms };
        let signing = Signing { signer: &signer, to: vec!["orin-1".into()], expires_ms: now_ms + 30_000 };
        let signed = build("1", "rollback", serde_json::json!({ "to": "source" }), Some(&signing));
        assert_eq!(parse(&payload(&signed), Some(&verify)).unwrap().signed_by.as_deref(), Some("fleet key"));
        assert_eq!(parse(&payload(&signed), None).unwrap().signed_by, None, "a device that trusts no key");
        let unsigned = build("2", "rollback", serde_json::json!({ "to": "source" }), None);
        assert!(
            parse(&payload(&unsigned), Some(&verify))
                .unwrap_err()
                .error
                .contains("unauthorised: the command is not signed")
        );
        let mut tampered = signed.clone();
        tampered.args = serde_json::json!({ "to": 3 });
        assert!(parse(&payload(&tampered), Some(&verify)).unwrap_err().error.contains("bad signature"));
        let elsewhere = Verify { device: "orin-2", ..verify };
        let refusal = parse(&payload(&signed), Some(&elsewhere)).unwrap_err();
        assert_eq!(refusal.id, "1");
        assert!(refusal.error.contains("not for this device (orin-2)"), "{}", refusal.error);
    }
}
