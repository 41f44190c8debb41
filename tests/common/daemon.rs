//! Starting and stopping the agent daemon (`edgeadapt run`) for integration tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
    pub port: u16,
}

/// A port nothing listens on now, never handed out before in this test process: the system may
/// give a just-closed port again, and two tests running at once (or one test's HTTP port and its
/// broker's) would then race for it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Writes a config for a daemon on `port` with its data in `dir/data`.
pub fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let config = dir.join("config.toml");
    let text = format!(
        "device_id = \"test-device\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [watch]\npoll_ms = 50\n{extra}",
        super::repo().join("models/efficientnet-lite0-fonts36").display(),
        dir.join("data").display(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

impl Daemon {
    /// Starts `edgeadapt run` and waits until its endpoint answers.
    pub fn start(config: &Path, port: u16, log: &Path) -> Daemon {
        Daemon::start_with_env(config, port, log, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(config: &Path, port: u16, log: &Path, env: &[(&str, &OsStr)]) -> Daemon {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("EDGEADAPT_LOG", "warn,edgeadapt=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, config: config.to_path_buf(), port };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let what = format!("the daemon to listen on port {}", self.port);
        super::wait_until(Duration::from_secs(60), &what, || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the daemon exited during start-up: {status}");
            }
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok().map(drop)
        });
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Runs an `edgeadapt` command against this daemon's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_edgeadapt")).arg("--config").arg(&self.config).args(args).output().unwrap()
    }

    /// SIGTERM, then wait for a clean exit (a daemon that hangs is killed when `self` drops).
    pub fn stop(mut self) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
        let exit = super::wait_until(Duration::from_secs(60), "the daemon to exit on SIGTERM", || {
            self.child.try_wait().unwrap()
        });
        assert!(exit.success(), "the daemon exited with {exit} on SIGTERM");
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that hands back error statuses as responses.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}
