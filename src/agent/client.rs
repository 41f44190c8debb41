//! Talking to a running agent over its loopback HTTP endpoint, for the CLI commands.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::http::{ErrorBody, RunState};
use super::{Ingested, RunProgress, Status};
use crate::config::DeviceConfig;
use crate::inference::Prediction;
use crate::protocol::VersionRef;

/// How long a command keeps asking a busy agent.
const BUSY_WAIT: Duration = Duration::from_secs(60);

pub struct Client {
    base: String,
    http: ureq::Agent,
}

/// A request the agent answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("agent at {base}: {message} (HTTP {status})")]
pub struct Refused {
    pub base: String,
    pub status: u16,
    pub message: String,
    /// The refusal's `kind` where the agent gave one (`detail.kind`, e.g. `unknown_class`).
    pub kind: Option<String>,
}

impl Client {
    /// A client for the agent `config` describes, if it is running with its endpoint enabled.
    pub fn connect(config: &DeviceConfig) -> Option<Client> {
        if !config.http.enabled {
            return None;
        }
        let address: SocketAddr = config.http.address().ok()?;
        TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Some(Client { base: format!("http://{address}"), http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request again while the agent answers 503 (its queue is full), as its
    /// Retry-After says, for up to [`BUSY_WAIT`]. Only for requests that are safe to repeat.
    fn patiently(
        &self,
        send: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let started = std::time::Instant::now();
        loop {
            let response = send()?;
            if response.status() != 503 || started.elapsed() >= BUSY_WAIT {
                return Ok(response);
            }
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 10);
            std::thread::sleep(Duration::from_secs(wait));
        }
    }

    fn read<T: DeserializeOwned>(&self, response: ureq::http::Response<ureq::Body>) -> anyhow::Result<T> {
        let status = response.status();
        let mut body = response.into_body();
        if status.is_success() {
            return Ok(body.read_json()?);
        }
        let (message, kind) = match body.read_json::<ErrorBody>() {
            Ok(body) => {
                let kind = body.detail.as_ref().and_then(|d| d["kind"].as_str()).map(str::to_string);
                (body.error, kind)
            }
            Err(e) => (e.to_string(), None),
        };
        Err(Refused { base: self.base.clone(), status: status.as_u16(), message, kind }.into())
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        self.read(self.patiently(|| self.http.get(format!("{}/v1/status", self.base)).call())?)
    }

    /// Labels are safe to send again: a stored one is recognised by its content.
    pub fn label(&self, bytes: &[u8], class: &str, name: &str) -> anyhow::Result<Ingested> {
        let response = self.patiently(|| {
            self.http
                .post(format!("{}/v1/label", self.base))
                .query("class", class)
                .query("name", name)
                .header("content-type", "application/octet-stream")
                .send(bytes)
        })?;
        self.read(response)
    }

    pub fn classify(&self, bytes: &[u8], name: &str) -> anyhow::Result<Prediction> {
        let response = self.patiently(|| {
            self.http
                .post(format!("{}/v1/classify", self.base))
                .query("name", name)
                .header("content-type", "application/octet-stream")
                .send(bytes)
        })?;
        self.read(response)
    }

    /// Starts a run; a refusal because it would repeat the newest version has kind `nothing_new`.
    pub fn start_adapt(&self, method: Option<&str>, force: bool) -> anyhow::Result<RunProgress> {
        let mut request = self.http.post(format!("{}/v1/adapt", self.base));
        if let Some(method) = method {
            request = request.query("method", method);
        }
        if force {
            request = request.query("force", "true");
        }
        self.read(request.send_empty()?)
    }

    pub fn adapt_state(&self) -> anyhow::Result<RunState> {
        self.read(self.http.get(format!("{}/v1/adapt", self.base)).call()?)
    }

    pub fn cancel(&self) -> anyhow::Result<bool> {
        let value: serde_json::Value =
            self.read(self.http.post(format!("{}/v1/adapt/cancel", self.base)).send_empty()?)?;
        Ok(value["cancelled"].as_bool().unwrap_or(false))
    }

    pub fn rollback(&self, to: VersionRef) -> anyhow::Result<i64> {
        let to = match to {
            VersionRef::Source => "source".to_string(),
            VersionRef::Id(id) => id.to_string(),
        };
        let response = self.http.post(format!("{}/v1/rollback", self.base)).query("to", &to).send_empty()?;
        let value: serde_json::Value = self.read(response)?;
        value["serving"].as_i64().ok_or_else(|| anyhow::anyhow!("agent at {}: malformed rollback answer", self.base))
    }
}
