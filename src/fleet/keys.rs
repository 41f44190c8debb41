//! The keys a config names: what a device accepts commands from, and what an operator signs
//! them with (`protocol::signing` checks and signs; this reads the files).

use std::path::Path;

use crate::config::MqttConfig;
use crate::protocol::signing::{Authority, Signer, parse_operator_keys};

/// What commands must be signed with: the operator keys and the fleet key the config names
/// (neither: commands need no signature). A command may claim to live as long as the device
/// remembers command ids.
pub fn command_authority(mqtt: &MqttConfig) -> anyhow::Result<Authority> {
    let hmac_key = match &mqtt.command_key_file {
        Some(file) => Some(read_secret(file, "mqtt.command_key_file")?),
        None => None,
    };
    let operators = match &mqtt.operator_keys_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("mqtt.operator_keys_file {}: {e}", file.display()))?;
            let keys = parse_operator_keys(&text)
                .map_err(|e| anyhow::anyhow!("mqtt.operator_keys_file {}: {e}", file.display()))?;
            anyhow::ensure!(!keys.is_empty(), "mqtt.operator_keys_file {} holds no key", file.display());
            keys
        }
        None => vec![],
    };
    let max_validity_ms = i64::try_from(mqtt.command_ids_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX / 2);
    Ok(Authority { operators, hmac_key, max_validity_ms })
}

/// What `edgeadapt fleet` signs with: an operator key (`signing_key`), else the fleet's HMAC
/// key (`command_key`), else nothing.
pub fn signer(signing_key: Option<&Path>, command_key: Option<&Path>) -> anyhow::Result<Option<Signer>> {
    if let Some(file) = signing_key {
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        return Ok(Some(Signer::operator_from_pem(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?));
    }
    match command_key {
        Some(file) => Ok(Some(Signer::Hmac(read_secret(file, "the command key")?))),
        None => Ok(None),
    }
}

fn read_secret(file: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{what} {}: {e}", file.display()))?;
    Ok(bytes.trim_ascii().to_vec())
}
