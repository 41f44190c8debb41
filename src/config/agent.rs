//! The device agent's config sections: local endpoints, labelling, adaptation policy and the
//! safety gate. Defaults suit a CPU box; `device-config/default.toml` documents every key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Loopback address of the local endpoint (classification, labelling, commands).
    pub listen: String,
    pub enabled: bool,
    /// Open connections; more are answered 503 with Retry-After and closed.
    pub max_connections: usize,
    /// Requests handled at once; more are answered 503 with Retry-After, before their body is read.
    pub max_requests: usize,
    /// Largest request body (an image to classify or label); larger gets 413.
    pub max_body_bytes: u64,
    /// A connection that does not send a request's headers within this time, or stays idle this
    /// long between requests, is closed.
    pub header_timeout_s: u64,
    /// A request not answered within this time gets 503.
    pub request_timeout_s: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8470".into(),
            enabled: true,
            max_connections: 128,
            max_requests: 8,
            max_body_bytes: 16 << 20,
            header_timeout_s: 10,
            request_timeout_s: 120,
        }
    }
}

impl HttpConfig {
    /// The address to listen on.
    pub fn address(&self) -> Result<std::net::SocketAddr, String> {
        listen_address(&self.listen, "127.0.0.1:8470")
    }
}

/// A listening address from the config: an IP address with a port, `localhost` standing for
/// 127.0.0.1. The error quotes the text and gives `example`.
pub fn listen_address(text: &str, example: &str) -> Result<std::net::SocketAddr, String> {
    let trimmed = text.trim();
    let resolved = match trimmed.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => trimmed.to_string(),
    };
    resolved.parse().map_err(|_| format!("\"{text}\" is not an IP address with a port, e.g. \"{example}\""))
}

/// The on-site console: a page on the device where staff label recent traffic, adapt, judge
/// and roll back (docs/console.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub enabled: bool,
    /// Recent classified images kept for labelling, at most (0: none).
    pub keep_images: usize,
    /// Bytes of recent classified images kept, at most.
    pub keep_image_bytes: u64,
    /// An address for the site network (e.g. "0.0.0.0:8443"), served over TLS with sign-in
    /// only. Unset: the console is on the loopback endpoint (`http.listen`) alone.
    pub listen: Option<String>,
    /// The certificate chain and key (PEM) for `listen`. Unset: a self-signed pair is made at
    /// first start in `<data_dir>/console/`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Console users and their password hashes (`edgeadapt console add-user`). Unset:
    /// `<data_dir>/console/users.toml`.
    pub users_file: Option<PathBuf>,
    /// Failed sign-ins of one user name, within `lockout_minutes`, that lock it for that long.
    pub lockout_failures: usize,
    pub lockout_minutes: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            keep_images: 500,
            keep_image_bytes: 64 << 20,
            listen: None,
            tls_cert: None,
            tls_key: None,
            users_file: None,
            lockout_failures: 5,
            lockout_minutes: 15,
        }
    }
}

impl ConsoleConfig {
    /// The users file: as configured, or in the data folder.
    pub fn users_file(&self, data_dir: &std::path::Path) -> PathBuf {
        self.users_file.clone().unwrap_or_else(|| data_dir.join("console/users.toml"))
    }

    /// The site-network address, if one is set.
    pub fn site_address(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let Some(text) = &self.listen else { return Ok(None) };
        listen_address(text, "0.0.0.0:8443").map(Some)
    }
}

/// What happens to an image in the watched folder once it is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterClassify {
    /// Move it to `<data_dir>/classified/`.
    Move,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Folder whose images are classified as they appear. Unset: `<data_dir>/watch`.
    pub folder: Option<PathBuf>,
    pub poll_ms: u64,
    pub after: AfterClassify,
    /// Split tensors of this many recent classified images are kept as unlabelled traffic for
    /// calibration and the unseen-health estimate.
    pub keep_traffic: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { folder: None, poll_ms: 250, after: AfterClassify::Move, keep_traffic: 2000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabellingConfig {
    /// Folder with one subfolder per class whose files are ingested as labelled samples.
    /// Unset: `<data_dir>/inbox`.
    pub inbox: Option<PathBuf>,
    /// Every n-th sample of a class is held out for the safety gate's validation.
    pub validation_every: usize,
    /// Keep the encoded image with each sample (to extract features again for a new trunk).
    pub keep_images: bool,
    /// Recorded with each sample.
    pub site: Option<String>,
}

impl Default for LabellingConfig {
    fn default() -> Self {
        LabellingConfig { inbox: None, validation_every: 5, keep_images: true, site: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptationConfig {
    /// Method name, as `edgeadapt bench` takes it.
    pub method: String,
    /// Start a run after this many new labels (0: never).
    pub after_new_labels: usize,
    /// Start a run this often when there are new labels (0: never).
    pub every_minutes: u64,
    /// Training samples a class needs before it counts as seen.
    pub min_samples_per_class: usize,
    pub seed: u64,
}

impl Default for AdaptationConfig {
    fn default() -> Self {
        AdaptationConfig {
            method: "recommended".into(),
            after_new_labels: 0,
            every_minutes: 0,
            min_samples_per_class: 3,
            seed: 0,
        }
    }
}

/// The fleet link over MQTT (docs/mqtt.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    /// `embedded` (start a broker in the agent, on `embedded_listen`), `mqtt://HOST:PORT` or
    /// `mqtts://HOST:PORT` (TLS).
    pub broker: String,
    pub embedded_listen: String,
    /// Topic level above the device: `edgeadapt/v1/<fleet>/<device_id>/...`.
    pub fleet: String,
    /// MQTT client id (default: the device id).
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// File holding the password (kept out of the config).
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that signed the broker's certificate; required for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// File holding the fleet's shared HMAC command key; when set, commands may be signed with
    /// it (and must be signed, with it or an operator key).
    pub command_key_file: Option<PathBuf>,
    /// Operator public keys this device trusts, one `ed25519 BASE64 NAME` per line
    /// (`edgeadapt fleet keygen` writes one); when set, commands must be signed.
    pub operator_keys_file: Option<PathBuf>,
    /// The operator's private key (PEM), for `edgeadapt fleet` on an operator's machine; a
    /// device never needs it.
    pub signing_key_file: Option<PathBuf>,
    pub keep_alive_s: u64,
    pub metrics_every_s: u64,
    /// Largest MQTT packet the broker accepts; weights are chunked to fit.
    pub max_packet_bytes: usize,
    /// Bytes of artefacts (bundles, weights sets) kept while they arrive; the oldest transfer
    /// makes room for a new one.
    pub max_transfer_bytes: u64,
    /// Undelivered events kept while the broker is unreachable; beyond it the oldest are dropped
    /// and the drop is reported.
    pub outbox_limit: usize,
    /// Answered command ids remembered for idempotency: at least this many, and every one
    /// younger than `command_ids_days`; older ones are forgotten.
    pub command_ids_kept: usize,
    pub command_ids_days: u64,
    /// Reconnect delay: doubles from the minimum to the maximum, with random jitter.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            broker: "embedded".into(),
            embedded_listen: "127.0.0.1:1883".into(),
            fleet: "default".into(),
            client_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            command_key_file: None,
            operator_keys_file: None,
            signing_key_file: None,
            keep_alive_s: 30,
            metrics_every_s: 30,
            max_packet_bytes: crate::protocol::weights::DEFAULT_MAX_PACKET_BYTES,
            max_transfer_bytes: 512 << 20,
            outbox_limit: 100_000,
            command_ids_kept: 10_000,
            command_ids_days: 7,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listening_address_takes_localhost_and_names_the_text_it_refuses() {
        assert_eq!(listen_address(" localhost:8470 ", "x").unwrap(), "127.0.0.1:8470".parse().unwrap());
        assert_eq!(listen_address("[::1]:1883", "x").unwrap(), "[::1]:1883".parse().unwrap());
        let error = listen_address("example.org:80", "0.0.0.0:8443").unwrap_err();
        assert_eq!(error, "\"example.org:80\" is not an IP address with a port, e.g. \"0.0.0.0:8443\"");
        let console = ConsoleConfig { listen: Some("localhost:8443".into()), ..ConsoleConfig::default() };
        assert_eq!(console.site_address().unwrap(), Some("127.0.0.1:8443".parse().unwrap()));
    }
}
