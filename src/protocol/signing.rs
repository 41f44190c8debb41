//! Who may command a device. Operators sign with an Ed25519 key and a device holds only the
//! public keys it trusts, so a stolen device cannot sign; fleets that started with one shared
//! HMAC key can keep it. Either way the signature covers the devices the command is for and
//! when it expires, so a captured command works on no other device and not later (and within
//! its lifetime a repeat is answered from the device's memory of command ids, never run again).

use base64::Engine;
use hmac::{Hmac, Mac};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::Sha256;

use super::messages::{COMMAND_SCHEMA, CommandMessage};

/// How a signature names its kind.
pub const ED25519_PREFIX: &str = "ed25519:";
pub const HMAC_PREFIX: &str = "hmac-sha256:";

/// Clocks differ: an expiry is checked this much leniently, both ways.
pub const CLOCK_SKEW_MS: i64 = 120_000;

/// The text a signature covers: a compact JSON array of the schema, the id, the command, its
/// arguments (keys sorted, `{}` when there are none), the devices it is for and its expiry.
/// JSON, so that no field's content can pass for another field.
pub fn signed_text(message: &CommandMessage) -> String {
    let args = if message.args.is_null() { serde_json::json!({}) } else { message.args.clone() };
    serde_json::json!([COMMAND_SCHEMA, message.id, message.command, args, message.to, message.expires_ms]).to_string()
}

/// What signs commands on the operator's side.
#[derive(Clone)]
pub enum Signer {
    /// An operator's Ed25519 key (PKCS#8).
    Operator(std::sync::Arc<Ed25519KeyPair>),
    /// The fleet's shared HMAC-SHA256 key.
    Hmac(Vec<u8>),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Operator(pair) => write!(f, "Signer::Operator({})", public_key_line(pair, "")),
            Signer::Hmac(_) => f.write_str("Signer::Hmac(..)"),
        }
    }
}

impl Signer {
    /// An operator key from its PEM (`PRIVATE KEY`, PKCS#8, as `fleet keygen` or
    /// `openssl genpkey -algorithm ed25519` write it).
    pub fn operator_from_pem(text: &str) -> Result<Signer, String> {
        let block = pem::parse(text).map_err(|e| format!("not a PEM private key: {e}"))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(format!("a PEM '{}' block, expected 'PRIVATE KEY' (PKCS#8 Ed25519)", block.tag()));
        }
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(Signer::Operator(std::sync::Arc::new(pair)))
    }

    /// The signature of `message` as the `signature` field carries it.
    pub fn sign(&self, message: &CommandMessage) -> String {
        let text = signed_text(message);
        match self {
            Signer::Operator(pair) => {
                let signature = pair.sign(text.as_bytes());
                format!("{ED25519_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(signature.as_ref()))
            }
            Signer::Hmac(key) => format!("{HMAC_PREFIX}{}", hex::encode(hmac(key, &text))),
        }
    }
}

fn hmac(key: &[u8], text: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(text.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A new operator key: the private key as PEM (PKCS#8) and the public key's line for a
/// device's `mqtt.operator_keys_file`.
pub fn generate_operator_key(name: &str) -> Result<(String, String), String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| format!("cannot generate a key: {e}"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
    let private = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    Ok((private, public_key_line(&pair, name)))
}

/// `ed25519 BASE64 NAME`, the line a device trusts the key by.
pub fn public_key_line(pair: &Ed25519KeyPair, name: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref());
    format!("ed25519 {key} {name}").trim_end().to_string()
}

/// An operator's public key a device trusts.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorKey {
    pub name: String,
    pub key: [u8; 32],
}

/// Reads an operator keys file: one `ed25519 BASE64 [NAME]` per line; blank lines and lines
/// starting with `#` are skipped. A key without a name is named by its first characters.
pub fn parse_operator_keys(text: &str) -> Result<Vec<OperatorKey>, String> {
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, char::is_whitespace);
        let (kind, encoded) = (fields.next().unwrap_or(""), fields.next().unwrap_or("").trim());
        let at = number + 1;
        if kind != "ed25519" {
            return Err(format!("line {at}: '{kind}' is not a key type this agent knows (ed25519)"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("line {at}: the key is not base64: {e}"))?;
        let key: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("line {at}: an Ed25519 key is 32 bytes, not {}", b.len()))?;
        let name = fields.next().map(str::trim).filter(|n| !n.is_empty());
        let name = name.map_or_else(|| format!("key {}", &encoded[..encoded.len().min(8)]), str::to_string);
        keys.push(OperatorKey { name, key });
    }
    Ok(keys)
}

/// What a device accepts commands from.
#[derive(Debug, Clone, Default)]
pub struct Authority {
    pub operators: Vec<OperatorKey>,
    pub hmac_key: Option<Vec<u8>>,
    /// The longest lifetime a command may claim: the device's memory of command ids, so a
    /// repeat within a command's lifetime is always recognised.
    pub max_validity_ms: i64,
}

impl Authority {
    /// Whether commands must be signed at all.
    pub fn requires_signature(&self) -> bool {
        !self.operators.is_empty() || self.hmac_key.is_some()
    }

    /// Who signed `message` (an operator key's name, or `fleet key`), if it is signed by a key
    /// this device trusts, for this device and not expired at `now_ms`; else why not.
    pub fn verify(&self, message: &CommandMessage, device: &str, now_ms: i64) -> Result<String, String> {
        let Some(signature) = message.signature.as_deref() else {
            return Err("the command is not signed".into());
        };
        let text = signed_text(message);
        let signer = if let Some(encoded) = signature.strip_prefix(ED25519_PREFIX) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| "bad signature: not base64".to_string())?;
            self.operators
                .iter()
                .find(|k| UnparsedPublicKey::new(&ED25519, &k.key).verify(text.as_bytes(), &bytes).is_ok())
                .map(|k| k.name.clone())
                .ok_or_else(|| {
                    if self.operators.is_empty() {
                        "an operator signature, but this device trusts no operator key (mqtt.operator_keys_file)"
                            .to_string()
                    } else {
                        "bad signature: no operator key this device trusts signed this command".to_string()
                    }
                })?
        } else if let Some(encoded) = signature.strip_prefix(HMAC_PREFIX) {
            let Some(key) = &self.hmac_key else {
                return Err("an HMAC signature, but this device has no fleet key (mqtt.command_key_file)".into());
            };
            let given = hex::decode(encoded).map_err(|_| "bad signature: not hex".to_string())?;
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(text.as_bytes());
            mac.verify_slice(&given).map_err(|_| "bad signature".to_string())?;
            "fleet key".to_string()
        } else {
            return Err(format!(
                "bad signature: it must start with '{ED25519_PREFIX}' or '{HMAC_PREFIX}' (signatures without \
                 the device binding and expiry are no longer accepted)"
            ));
        };
        // Checked after the signature, so that only a genuine command learns why it was refused.
        if !message.to.iter().any(|to| to == device) {
            let to = super::commands::clip(&message.to.join(", "), 200);
            return Err(format!("the command is for [{to}], not for this device ({device})"));
        }
        let Some(expires_ms) = message.expires_ms else {
            return Err("a signed command must carry expires_ms".into());
        };
        if now_ms > expires_ms + CLOCK_SKEW_MS {
            return Err(format!("the command expired {} s ago", (now_ms - expires_ms) / 1000));
        }
        if expires_ms - now_ms > self.max_validity_ms + CLOCK_SKEW_MS {
            return Err(format!(
                "the command claims to be valid for {} s, more than this device's limit of {} s \
                 (how long it remembers command ids)",
                (expires_ms - now_ms) / 1000,
                self.max_validity_ms / 1000
            ));
        }
        Ok(signer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn message(to: &[&str], expires_ms: Option<i64>) -> CommandMessage {
        CommandMessage {
            schema: COMMAND_SCHEMA.into(),
            id: "cmd-1".into(),
            command: "status".into(),
            args: serde_json::Value::Null,
            to: to.iter().map(|s| s.to_string()).collect(),
            expires_ms,
            signature: None,
        }
    }

    fn operator() -> (Signer, OperatorKey) {
        let (private, public) = generate_operator_key("ana").unwrap();
        (Signer::operator_from_pem(&private).unwrap(), parse_operator_keys(&public).unwrap().remove(0))
    }

    fn authority(operators: Vec<OperatorKey>, hmac_key: Option<&[u8]>) -> Authority {
        Authority { operators, hmac_key: hmac_key.map(<[u8]>::to_vec), max_validity_ms: 7 * 86_400_000 }
    }

    #[test]
    fn an_operator_signature_names_its_key_and_another_key_is_refused() {
        let (signer, key) = operator();
        let (_, stranger) = operator();
        let mut signed = message(&["orin-1"], Some(NOW + 600_000));
        signed.signature = Some(signer.sign(&signed));
        assert_eq!(authority(vec![key.clone()], None).verify(&signed, "orin-1", NOW), Ok("ana".into()));
        let refused = authority(vec![stranger], None).verify(&signed, "orin-1", NOW).unwrap_err();
        assert!(refused.contains("no operator key this device trusts"), "{refused}");
        let refused = authority(vec![], Some(b"k")).verify(&signed, "orin-1", NOW).unwrap_err();
        assert!(refused.contains("trusts no operator key"), "{refused}");
    }

    #[test]
    fn the_binding_and_expiry_are_signed_and_checked() {
        let (signer, key) = operator();
        let trust = authority(vec![key], None);
        let mut signed = message(&["orin-1", "orin-2"], Some(NOW + 600_000));
        signed.signature = Some(signer.sign(&signed));
        assert!(trust.verify(&signed, "orin-2", NOW).is_ok(), "a device set");
        let elsewhere = trust.verify(&signed, "orin-3", NOW).unwrap_err();
        assert!(elsewhere.contains("not for this device (orin-3)"), "{elsewhere}");
        let later = trust.verify(&signed, "orin-1", NOW + 600_000 + CLOCK_SKEW_MS + 1000).unwrap_err();
        assert!(later.contains("expired"), "{later}");
        assert!(trust.verify(&signed, "orin-1", NOW + 600_000 + CLOCK_SKEW_MS / 2).is_ok(), "within the skew");
        // Widening the binding or the lifetime breaks the signature.
        let mut widened = signed.clone();
        widened.to.push("orin-3".into());
        assert!(trust.verify(&widened, "orin-3", NOW).unwrap_err().contains("bad signature"));
        let mut extended = signed.clone();
        extended.expires_ms = Some(NOW + 700_000);
        assert!(trust.verify(&extended, "orin-1", NOW).unwrap_err().contains("bad signature"));
        let mut forever = message(&["orin-1"], Some(NOW + 30 * 86_400_000));
        forever.signature = Some(signer.sign(&forever));
        assert!(trust.verify(&forever, "orin-1", NOW).unwrap_err().contains("more than this device's limit"));
        let mut open = message(&["orin-1"], None);
        open.signature = Some(signer.sign(&open));
        assert!(trust.verify(&open, "orin-1", NOW).unwrap_err().contains("expires_ms"));
    }

    #[test]
    fn the_fleet_hmac_key_signs_the_same_binding() {
        let signer = Signer::Hmac(b"fleet-secret".to_vec());
        let mut signed = message(&["orin-1"], Some(NOW + 600_000));
        signed.signature = Some(signer.sign(&signed));
        let trust = authority(vec![], Some(b"fleet-secret"));
        assert_eq!(trust.verify(&signed, "orin-1", NOW), Ok("fleet key".into()));
        assert!(trust.verify(&signed, "orin-2", NOW).is_err());
        let wrong = authority(vec![], Some(b"other")).verify(&signed, "orin-1", NOW).unwrap_err();
        assert_eq!(wrong, "bad signature");
        let mut legacy = signed.clone();
        legacy.signature = Some(hex::encode(hmac(b"fleet-secret", "cmd-1\nstatus\n{}")));
        assert!(trust.verify(&legacy, "orin-1", NOW).unwrap_err().contains("no longer accepted"));
    }

    /// The known answers docs/mqtt.md gives for other clients (computed there with Python's
    /// `cryptography` and `hmac`); the key is RFC 8032's first test key.
    #[test]
    fn signatures_match_the_documented_known_answers() {
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
        let operator = Signer::operator_from_pem(pem).unwrap();
        let Signer::Operator(pair) = &operator else { unreachable!() };
        assert_eq!(public_key_line(pair, "rfc8032"), "ed25519 11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo= rfc8032");
        let fleet = Signer::Hmac(b"fleet-secret".to_vec());
        let mut set_policy = message(&["orin-0001"], Some(1_767_225_600_000));
        set_policy.id = "cmd-42".into();
        set_policy.command = "set-policy".into();
        set_policy.args = serde_json::json!({ "method": "recommended", "every_minutes": 60 });
        assert_eq!(
            signed_text(&set_policy),
            r#"["edgeadapt.command/1","cmd-42","set-policy",{"every_minutes":60,"method":"recommended"},["orin-0001"],1767225600000]"#
        );
        assert_eq!(
            operator.sign(&set_policy),
            "ed25519:fgAtYUH5rjkdST1evMwTdFMfsiK7Bi1vvmD/NXazjoT6iIIup1lvxXvG1lj8+/Ec+Cs5pldLuPmR/W6mdmofCg=="
        );
        assert_eq!(
            fleet.sign(&set_policy),
            "hmac-sha256:fab86172642df89630f7f48d6ae126db95b06ef9193ef68054b58391b7ed0c61"
        );
        let mut status = message(&["orin-0001"], Some(1_767_225_600_000));
        status.id = "cmd-43".into();
        assert_eq!(signed_text(&status), r#"["edgeadapt.command/1","cmd-43","status",{},["orin-0001"],1767225600000]"#);
        assert_eq!(
            operator.sign(&status),
            "ed25519:ftD1Vke0VwOpNIWe/vkaIwWJcEigTjAcW4bGDOVx31+byycWrijmU6vABGzqAICazjkWSaaeNCeo7mktK4xRDQ=="
        );
        assert_eq!(fleet.sign(&status), "hmac-sha256:19c2200c47c34420ee9b4681e15510986e3cb150f71bfd3264bc3964454d7f31");
    }

    #[test]
    fn operator_keys_files_are_read_line_by_line_with_errors_that_name_the_line() {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let text = format!("# operators\n\ned25519 {key} ana (laptop)\ned25519 {key}\n");
        let keys = parse_operator_keys(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].name, "ana (laptop)");
        assert!(keys[1].name.starts_with("key "));
        assert!(parse_operator_keys("rsa AAAA x").unwrap_err().starts_with("line 1: 'rsa'"));
        assert!(parse_operator_keys("ed25519 !!!").unwrap_err().contains("not base64"));
        assert!(parse_operator_keys("ed25519 AAAA").unwrap_err().contains("32 bytes, not 3"));
    }

    #[test]
    fn a_private_key_must_be_an_ed25519_pkcs8_pem() {
        assert!(Signer::operator_from_pem("hello").unwrap_err().contains("not a PEM"));
        let certificate = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(Signer::operator_from_pem(&certificate).unwrap_err().contains("'CERTIFICATE'"));
        let junk = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        assert!(Signer::operator_from_pem(&junk).unwrap_err().contains("not an Ed25519"));
    }
}
