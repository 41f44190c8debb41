//! Where commands find their config without `--config`, through the real binary started in a
//! folder that is not the checkout: `EDGEADAPT_CONFIG`, then the user's config folder (then the
//! system's and the checkout's); with none, the error names every place looked. Commands that
//! need no config still run without one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::daemon::{free_port, write_config};
use common::{fixture, repo};

const SYSTEM_CONFIG: &str = "/etc/edgeadapt/config.toml";

/// A folder to run in, with its own (empty) home and XDG config folder.
struct Place {
    dir: tempfile::TempDir,
}

impl Place {
    fn new() -> Place {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("xdg")).unwrap();
        Place { dir }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// `edgeadapt ARGS` in this folder, with `EDGEADAPT_CONFIG` set to `config_var` or unset.
    fn edgeadapt(&self, config_var: Option<&Path>, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_edgeadapt"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("HOME", self.path("home"))
            .env("XDG_CONFIG_HOME", self.path("xdg"))
            // The ONNX Runtime cache stays where the test's own home has it.
            .env("EDGEADAPT_CACHE", ort_cache())
            .env("EDGEADAPT_LOG", "warn");
        match config_var {
            Some(path) => command.env("EDGEADAPT_CONFIG", path),
            None => command.env_remove("EDGEADAPT_CONFIG"),
        };
        command.output().unwrap()
    }
}

/// The edgeadapt cache of the test's own environment (`tools/fetch-onnxruntime.py` fills it).
fn ort_cache() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("EDGEADAPT_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("edgeadapt")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/edgeadapt")))
        .expect("HOME is set")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn device_id(output: &Output) -> String {
    assert!(output.status.success(), "status runs: {}", text(&output.stderr));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status prints JSON");
    status["device_id"].as_str().unwrap().to_string()
}

#[test]
fn without_a_config_anywhere_the_error_names_every_place_looked() {
    if Path::new(SYSTEM_CONFIG).exists() {
        common::skipped(&format!("this machine has {SYSTEM_CONFIG}, which the search would find"));
        return;
    }
    let place = Place::new();
    let output = place.edgeadapt(None, &["status"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let user = place.path("xdg/edgeadapt/config.toml");
    for named in
        ["--config", "EDGEADAPT_CONFIG", &user.display().to_string(), SYSTEM_CONFIG, "./device-config/default.toml"]
    {
        assert!(stderr.contains(named), "names {named}: {stderr}");
    }
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[test]
fn the_user_config_folder_is_found_and_the_variable_comes_before_it() {
    let place = Place::new();
    let user_dir = place.path("xdg/edgeadapt");
    std::fs::create_dir_all(&user_dir).unwrap();
    write_config(&user_dir, free_port(), "");
    assert_eq!(device_id(&place.edgeadapt(None, &["status", "--json"])), "test-device");

    let named_dir = place.path("named");
    std::fs::create_dir_all(&named_dir).unwrap();
    let named = write_config(&named_dir, free_port(), "");
    let text_of = std::fs::read_to_string(&named).unwrap().replace("test-device", "named-device");
    std::fs::write(&named, text_of).unwrap();
    assert_eq!(device_id(&place.edgeadapt(Some(&named), &["status", "--json"])), "named-device");
    // The flag comes before both.
    let flagged = place
        .edgeadapt(Some(&named), &["--config", user_dir.join("config.toml").to_str().unwrap(), "status", "--json"]);
    assert_eq!(device_id(&flagged), "test-device");
}

#[test]
fn a_variable_that_names_a_missing_file_is_an_error_not_a_fall_through() {
    let place = Place::new();
    let user_dir = place.path("xdg/edgeadapt");
    std::fs::create_dir_all(&user_dir).unwrap();
    write_config(&user_dir, free_port(), "");
    let missing = place.path("no-such-config.toml");
    let output = place.edgeadapt(Some(&missing), &["status"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()) && stderr.contains("EDGEADAPT_CONFIG"), "{stderr}");
}

#[test]
fn classify_needs_no_config() {
    if Path::new(SYSTEM_CONFIG).exists() {
        common::skipped(&format!("this machine has {SYSTEM_CONFIG}, which the search would find"));
        return;
    }
    let place = Place::new();
    let bundle = repo().join("models/efficientnet-lite0-fonts36");
    let image = fixture("images/ok_gray.png");
    let output =
        place.edgeadapt(None, &["classify", "--json", "--bundle", bundle.to_str().unwrap(), image.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).lines().count(), 1);
}
