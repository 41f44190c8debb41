//! The device config: one typed TOML file, validated in one place.
//!
//! Relative paths in the file are taken relative to the file's own folder, so a config works
//! the same whichever directory the agent is started from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::output::lexical;
use crate::runtime::RuntimeOptions;

mod agent;
pub mod search;

pub use crate::adapt::gate::GateConfig;
pub use agent::{
    AdaptationConfig, AfterClassify, ConsoleConfig, HttpConfig, LabellingConfig, MqttConfig, WatchConfig,
    listen_address,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Identifies the device to the fleet.
    pub device_id: String,
    /// Model bundle folder.
    pub bundle: PathBuf,
    /// The agent's store and working folders. Required by the agent commands.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub runtime: RuntimeOptions,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub watch: WatchConfig,
    #[serde(default)]
    pub labelling: LabellingConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub adaptation: AdaptationConfig,
    #[serde(default)]
    pub gate: GateConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
}

/// A config error; the message names the file and, where known, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: {problem}")]
    Parse { file: PathBuf, problem: String },
    #[error("{file}: key `{key}`: {problem}")]
    Invalid { file: PathBuf, key: String, problem: String },
}

impl DeviceConfig {
    pub fn load(file: &Path) -> Result<DeviceConfig, ConfigError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| ConfigError::Io { file: file.to_path_buf(), source })?;
        let base = file.parent().unwrap_or(Path::new("."));
        DeviceConfig::parse(&text, base).map_err(|error| match error {
            ParseError::Syntax(problem) => ConfigError::Parse { file: file.to_path_buf(), problem },
            ParseError::Invalid { key, problem } => ConfigError::Invalid { file: file.to_path_buf(), key, problem },
        })
    }

    /// Parses and validates config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<DeviceConfig, ParseError> {
        let mut config: DeviceConfig = toml::from_str(text).map_err(|e| ParseError::Syntax(e.to_string()))?;
        config.validate()?;
        config.bundle = resolve(base, &config.bundle);
        config.runtime.ort_library = config.runtime.ort_library.as_deref().map(|p| resolve(base, p));
        config.runtime.tensorrt.cache_dir = config.runtime.tensorrt.cache_dir.as_deref().map(|p| resolve(base, p));
        config.runtime.profile_dir = config.runtime.profile_dir.as_deref().map(|p| resolve(base, p));
        config.data_dir = config.data_dir.as_deref().map(|p| resolve(base, p));
        if config.runtime.tensorrt.cache_dir.is_none() {
            config.runtime.tensorrt.cache_dir = config.data_dir.as_ref().map(|d| d.join("tensorrt"));
        }
        config.watch.folder = config.watch.folder.as_deref().map(|p| resolve(base, p));
        config.labelling.inbox = config.labelling.inbox.as_deref().map(|p| resolve(base, p));
        for path in [
            &mut config.mqtt.password_file,
            &mut config.mqtt.ca_file,
            &mut config.mqtt.client_cert,
            &mut config.mqtt.client_key,
            &mut config.mqtt.command_key_file,
            &mut config.mqtt.operator_keys_file,
            &mut config.mqtt.signing_key_file,
            &mut config.console.tls_cert,
            &mut config.console.tls_key,
            &mut config.console.users_file,
        ] {
            *path = path.as_deref().map(|p| resolve(base, p));
        }
        config.validate_folders()?;
        Ok(config)
    }

    /// The watched folder and the inbox have their files moved away, so neither may be the data
    /// folder, hold it, be one of the folders the agent moves files into, or be the other.
    fn validate_folders(&self) -> Result<(), ParseError> {
        let Some(data_dir) = self.data_dir.as_deref() else { return Ok(()) };
        let data_dir = lexical(data_dir);
        let watch = self.watch.folder.as_deref().map(lexical);
        let inbox = self.labelling.inbox.as_deref().map(lexical);
        let owned = ["classified", "processed", "rejected", "tensorrt", "console"].map(|name| data_dir.join(name));
        for (key, folder) in [("watch.folder", &watch), ("labelling.inbox", &inbox)] {
            let Some(folder) = folder else { continue };
            let problem = if data_dir.starts_with(folder) {
                Some("is the data folder or holds it: the agent would move its own store away".to_string())
            } else {
                owned
                    .iter()
                    .find(|o| folder.starts_with(o))
                    .map(|inside| format!("lies in {}, where the agent moves files to", inside.display()))
            };
            if let Some(problem) = problem {
                return Err(ParseError::Invalid {
                    key: key.into(),
                    problem: format!("{}: {problem}", folder.display()),
                });
            }
        }
        if let (Some(watch), Some(inbox)) = (&watch, &inbox)
            && (watch.starts_with(inbox) || inbox.starts_with(watch))
        {
            return Err(ParseError::Invalid {
                key: "watch.folder".into(),
                problem: "the watched folder and the labelling inbox must be apart (neither inside the other)".into(),
            });
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ParseError> {
        let invalid = |key: &str, problem: &str| ParseError::Invalid { key: key.into(), problem: problem.into() };
        let id_ok = !self.device_id.is_empty()
            && self.device_id.len() <= 64
            && self.device_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(invalid(
                "device_id",
                "must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_' (it becomes an MQTT topic level)",
            ));
        }
        if self.bundle.as_os_str().is_empty() {
            return Err(invalid("bundle", "is empty"));
        }
        crate::runtime::providers::plan(&self.runtime.providers, |_| true, self.runtime.require_gpu)
            .map_err(|e| ParseError::Invalid { key: "runtime.providers".into(), problem: e.to_string() })?;
        if self.runtime.gpu_device < 0 {
            return Err(invalid("runtime.gpu_device", "must be >= 0"));
        }
        if self.runtime.intra_threads > 256 {
            return Err(invalid("runtime.intra_threads", "must be at most 256 (0 = one per core)"));
        }
        if !(1..=1024).contains(&self.runtime.gpu_batch) {
            return Err(invalid("runtime.gpu_batch", "must be between 1 and 1024"));
        }
        if self.data_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(invalid("data_dir", "is empty"));
        }
        match self.http.address() {
            Ok(address) if address.ip().is_loopback() => {}
            Ok(_) => {
                return Err(invalid(
                    "http.listen",
                    "must be a loopback address (127.0.0.1, localhost or [::1]): the local endpoint has no \
                     authentication; remote control goes through MQTT",
                ));
            }
            Err(problem) => return Err(invalid("http.listen", &problem)),
        }
        let limits = [
            ("http.max_connections", self.http.max_connections as u64, 1, 100_000),
            ("http.max_requests", self.http.max_requests as u64, 1, 10_000),
            ("http.max_body_bytes", self.http.max_body_bytes, 1024, 1 << 30),
            ("http.header_timeout_s", self.http.header_timeout_s, 1, 3600),
            ("http.request_timeout_s", self.http.request_timeout_s, 1, 86_400),
            ("console.keep_images", self.console.keep_images as u64, 0, 100_000),
            ("console.keep_image_bytes", self.console.keep_image_bytes, 0, 16 << 30),
            ("console.lockout_failures", self.console.lockout_failures as u64, 1, 1000),
            ("console.lockout_minutes", self.console.lockout_minutes, 1, 7 * 24 * 60),
        ];
        for (key, value, low, high) in limits {
            if !(low..=high).contains(&value) {
                return Err(invalid(key, &format!("must be between {low} and {high}")));
            }
        }
        if let Err(problem) = self.console.site_address() {
            return Err(invalid("console.listen", &problem));
        }
        if self.console.tls_cert.is_some() != self.console.tls_key.is_some() {
            return Err(invalid(
                "console.tls_cert",
                "set both `tls_cert` and `tls_key`, or neither (a self-signed pair)",
            ));
        }
        if self.watch.poll_ms < 10 || self.watch.poll_ms > 60_000 {
            return Err(invalid("watch.poll_ms", "must be between 10 and 60000"));
        }
        if self.labelling.validation_every < 2 {
            return Err(invalid(
                "labelling.validation_every",
                "must be at least 2 (every n-th sample of a class is held out for the safety gate)",
            ));
        }
        if let Err(problem) = self.adaptation.method.parse::<crate::adapt::method::Method>() {
            return Err(invalid("adaptation.method", &problem));
        }
        if self.adaptation.min_samples_per_class == 0 {
            return Err(invalid("adaptation.min_samples_per_class", "must be at least 1"));
        }
        let gate = [
            ("gate.max_seen_drop", self.gate.max_seen_drop),
            ("gate.max_unseen_rate_drop", self.gate.max_unseen_rate_drop),
            ("gate.max_reference_drop", self.gate.max_reference_drop),
        ];
        for (key, value) in gate {
            if !(0.0..=1.0).contains(&value) {
                return Err(invalid(key, "must be a fraction between 0 and 1 (0.02 = 2 points)"));
            }
        }
        self.validate_mqtt()
    }

    fn validate_mqtt(&self) -> Result<(), ParseError> {
        let invalid = |key: &str, problem: &str| ParseError::Invalid { key: key.into(), problem: problem.into() };
        let mqtt = &self.mqtt;
        if !crate::protocol::topics::valid_level(&mqtt.fleet) {
            return Err(invalid("mqtt.fleet", "must be 1-64 characters of A-Z, a-z, 0-9, '-', '_' or '.'"));
        }
        match crate::protocol::broker_address::BrokerAddress::parse(&mqtt.broker) {
            Ok(crate::protocol::broker_address::BrokerAddress::Tls { .. }) if mqtt.ca_file.is_none() => {
                return Err(invalid("mqtt.ca_file", "is required for an mqtts:// broker"));
            }
            Ok(_) => {}
            Err(problem) => return Err(invalid("mqtt.broker", &problem)),
        }
        if mqtt.broker == "embedded" {
            match agent::listen_address(&mqtt.embedded_listen, "127.0.0.1:1883") {
                Ok(address) if address.ip().is_loopback() => {}
                _ => {
                    return Err(invalid(
                        "mqtt.embedded_listen",
                        "must be a loopback address with a port: the embedded broker has no TLS or ACLs",
                    ));
                }
            }
        }
        if mqtt.client_cert.is_some() != mqtt.client_key.is_some() {
            return Err(invalid("mqtt.client_key", "client_cert and client_key go together (mutual TLS)"));
        }
        if mqtt.max_packet_bytes < 4096 {
            return Err(invalid("mqtt.max_packet_bytes", "must be at least 4096"));
        }
        if mqtt.keep_alive_s < 5 || mqtt.metrics_every_s == 0 || mqtt.outbox_limit == 0 {
            return Err(invalid("mqtt", "keep_alive_s must be >= 5, metrics_every_s and outbox_limit >= 1"));
        }
        if mqtt.reconnect_min_ms == 0 || mqtt.reconnect_max_ms < mqtt.reconnect_min_ms {
            return Err(invalid("mqtt.reconnect_max_ms", "needs 0 < reconnect_min_ms <= reconnect_max_ms"));
        }
        Ok(())
    }

    /// What a running agent can take from `new` on SIGHUP (the gate, the adaptation policy and
    /// labelling settings) and which changed sections need a restart. Pure.
    pub fn reload_plan(&self, new: &DeviceConfig) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut applied = Vec::new();
        let mut restart = Vec::new();
        let mut changed = |name: &'static str, differs: bool, live: bool| {
            if differs {
                if live { applied.push(name) } else { restart.push(name) }
            }
        };
        changed("gate", self.gate != new.gate, true);
        changed("adaptation", self.adaptation != new.adaptation, true);
        changed("labelling", self.labelling != new.labelling, true);
        changed("device_id", self.device_id != new.device_id, false);
        changed("bundle", self.bundle != new.bundle, false);
        changed("data_dir", self.data_dir != new.data_dir, false);
        changed("runtime", self.runtime != new.runtime, false);
        changed("http", self.http != new.http, false);
        changed("watch", self.watch != new.watch, false);
        changed("console", self.console != new.console, false);
        changed("mqtt", self.mqtt != new.mqtt, false);
        (applied, restart)
    }

    /// The data folder, or an error naming the key for commands that need one.
    pub fn require_data_dir(&self) -> Result<&Path, String> {
        self.data_dir
            .as_deref()
            .ok_or_else(|| "key `data_dir` is not set; the agent needs a folder for its store".to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Syntax(String),
    Invalid { key: String, problem: String },
}

/// Why the data folder cannot be created or used, naming it and the key.
pub fn data_dir_error(data_dir: &Path, error: std::io::Error) -> anyhow::Error {
    let problem = if data_dir.exists() && !data_dir.is_dir() {
        "exists but is not a folder".to_string()
    } else {
        error.to_string()
    };
    anyhow::anyhow!("data_dir {} (key `data_dir`): {problem}", data_dir.display())
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() { path.to_path_buf() } else { base.join(path) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ProviderKind;

    const MINIMAL: &str = "device_id = \"dev-1\"\nbundle = \"../models/m\"\n";

    #[test]
    fn defaults_run_on_the_cpu_and_paths_are_relative_to_the_file() {
        let config = DeviceConfig::parse(MINIMAL, Path::new("/etc/edgeadapt")).unwrap();
        assert_eq!(config.bundle, PathBuf::from("/etc/edgeadapt/../models/m"));
        assert_eq!(config.runtime.providers, vec![ProviderKind::Cpu]);
        assert!(!config.runtime.require_gpu);
    }

    #[test]
    fn gpu_settings_parse() {
        let text = format!(
            "{MINIMAL}[runtime]\nproviders = [\"tensorrt\", \"cuda\", \"cpu\"]\nrequire_gpu = false\ngpu_device = 1\n\
             ort_library = \"/usr/lib/libonnxruntime.so\"\n[runtime.tensorrt]\nfp16 = false\ncache_dir = \"trt\"\n"
        );
        let config = DeviceConfig::parse(&text, Path::new("/cfg")).unwrap();
        assert_eq!(config.runtime.providers, vec![ProviderKind::Tensorrt, ProviderKind::Cuda, ProviderKind::Cpu]);
        assert_eq!(config.runtime.gpu_device, 1);
        assert_eq!(config.runtime.tensorrt.cache_dir, Some(PathBuf::from("/cfg/trt")));
        assert!(!config.runtime.tensorrt.fp16);
        assert_eq!(config.runtime.gpu_batch, 32);
        // Without its own folder the engine cache lives in the data directory.
        let config = DeviceConfig::parse(&format!("{MINIMAL}data_dir = \"/var/lib/e\"\n"), Path::new("/cfg")).unwrap();
        assert_eq!(config.runtime.tensorrt.cache_dir, Some(PathBuf::from("/var/lib/e/tensorrt")));
    }

    #[test]
    fn unknown_keys_and_providers_are_named() {
        let error =
            DeviceConfig::parse(&format!("{MINIMAL}[runtime]\nprovider = [\"cpu\"]\n"), Path::new(".")).unwrap_err();
        let ParseError::Syntax(text) = error else { panic!("{error:?}") };
        assert!(text.contains("provider"), "{text}");
        let error =
            DeviceConfig::parse(&format!("{MINIMAL}[runtime]\nproviders = [\"gpu\"]\n"), Path::new(".")).unwrap_err();
        let ParseError::Syntax(text) = error else { panic!("{error:?}") };
        assert!(text.contains("gpu") && text.contains("tensorrt"), "{text}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            ("device_id = \"a b\"\nbundle = \"m\"\n", "device_id"),
            ("device_id = \"a\"\nbundle = \"\"\n", "bundle"),
            ("device_id = \"a\"\nbundle = \"m\"\n[runtime]\nproviders = []\n", "runtime.providers"),
            (
                "device_id = \"a\"\nbundle = \"m\"\n[runtime]\nproviders = [\"cpu\"]\nrequire_gpu = true\n",
                "runtime.providers",
            ),
            ("device_id = \"a\"\nbundle = \"m\"\n[runtime]\ngpu_device = -1\n", "runtime.gpu_device"),
            ("device_id = \"a\"\nbundle = \"m\"\n[runtime]\ngpu_batch = 0\n", "runtime.gpu_batch"),
            ("device_id = \"a\"\nbundle = \"m\"\n[http]\nlisten = \"0.0.0.0:80\"\n", "http.listen"),
            ("device_id = \"a\"\nbundle = \"m\"\n[http]\nlisten = \"localhost\"\n", "http.listen"),
            ("device_id = \"a\"\nbundle = \"m\"\n[labelling]\nvalidation_every = 1\n", "labelling.validation_every"),
            ("device_id = \"a\"\nbundle = \"m\"\n[adaptation]\nmethod = \"ft-tial\"\n", "adaptation.method"),
            ("device_id = \"a\"\nbundle = \"m\"\n[gate]\nmax_seen_drop = 2.0\n", "gate.max_seen_drop"),
            ("device_id = \"a\"\nbundle = \"m\"\n[watch]\npoll_ms = 0\n", "watch.poll_ms"),
            ("device_id = \"a\"\nbundle = \"m\"\ndata_dir = \"d\"\n[watch]\nfolder = \"d\"\n", "watch.folder"),
            ("device_id = \"a\"\nbundle = \"m\"\ndata_dir = \"d/x\"\n[watch]\nfolder = \"d/./\"\n", "watch.folder"),
            (
                "device_id = \"a\"\nbundle = \"m\"\ndata_dir = \"d\"\n[labelling]\ninbox = \"d/processed/x\"\n",
                "labelling.inbox",
            ),
            (
                "device_id = \"a\"\nbundle = \"m\"\ndata_dir = \"d\"\n[watch]\nfolder = \"w\"\n[labelling]\ninbox = \"w/in\"\n",
                "watch.folder",
            ),
        ];
        for (text, key) in cases {
            match DeviceConfig::parse(text, Path::new(".")) {
                Err(ParseError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn reload_applies_policy_sections_and_names_those_that_need_a_restart() {
        let old = DeviceConfig::parse(MINIMAL, Path::new(".")).unwrap();
        let text = format!("{MINIMAL}[gate]\nmax_seen_drop = 0.05\n[http]\nlisten = \"127.0.0.1:9000\"\n");
        let new = DeviceConfig::parse(&text, Path::new(".")).unwrap();
        assert_eq!(old.reload_plan(&new), (vec!["gate"], vec!["http"]));
        assert_eq!(old.reload_plan(&old), (vec![], vec![]));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "device_id = 3\n").unwrap();
        let text = DeviceConfig::load(&file).unwrap_err().to_string();
        assert!(text.contains("bad.toml") && text.contains("device_id"), "{text}");
    }
}
