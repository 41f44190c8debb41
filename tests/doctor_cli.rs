//! `edgeadapt doctor`: a healthy default set-up passes; a missing library, a damaged bundle and
//! a corrupt store each fail with a fix, and the exit code says so.

mod common;

use std::process::Command;

use common::{copy_dir, repo};

fn doctor(config: &std::path::Path) -> (i32, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("--config")
        .arg(config)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let checks = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.code().unwrap(), checks)
}

fn level<'a>(checks: &'a serde_json::Value, name: &str) -> &'a str {
    checks.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name} check"))["level"]
        .as_str()
        .unwrap()
}

#[test]
fn a_healthy_device_passes_and_each_fault_fails_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    copy_dir(&repo().join("models/efficientnet-lite0-fonts36"), &bundle);
    let config = dir.path().join("config.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "device_id = \"doc\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n{extra}",
                bundle.display(),
                dir.path().join("data").display()
            ),
        )
        .unwrap()
    };
    write("");
    let (code, checks) = doctor(&config);
    assert_eq!(code, 0, "{checks:#}");
    for name in ["ONNX Runtime", "execution providers", "GPU", "bundle", "store", "disk space", "clock", "MQTT broker"]
    {
        assert_eq!(level(&checks, name), "ok", "{name}: {checks:#}");
    }

    // A damaged bundle file and a corrupt store.
    let head = bundle.join("head.safetensors");
    let mut bytes = std::fs::read(&head).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&head, bytes).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/store.db"), b"this is not a database").unwrap();
    let (code, checks) = doctor(&config);
    assert_eq!(code, 1);
    assert_eq!(level(&checks, "bundle"), "fail");
    assert_eq!(level(&checks, "store"), "fail");
    let bundle_check = checks.as_array().unwrap().iter().find(|c| c["name"] == "bundle").unwrap();
    assert!(bundle_check["detail"].as_str().unwrap().contains("checksum"), "{bundle_check}");
    assert!(!bundle_check["fix"].as_str().unwrap().is_empty());

    // A library that is not there, and an unreachable broker.
    write(&format!(
        "[runtime]\nort_library = \"{}\"\n[mqtt]\nenabled = true\nbroker = \"mqtt://127.0.0.1:{}\"\n",
        dir.path().join("missing.so").display(),
        common::daemon::free_port()
    ));
    let (code, checks) = doctor(&config);
    assert_eq!(code, 1);
    assert_eq!(level(&checks, "ONNX Runtime"), "fail");
    assert_eq!(level(&checks, "execution providers"), "fail");
    assert_eq!(level(&checks, "MQTT broker"), "fail");
    assert_eq!(level(&checks, "Fleet command keys"), "warn", "commands need no signature: {checks:#}");

    // An operator keys file that is not one.
    let keys = dir.path().join("operator-keys");
    std::fs::write(&keys, "ed25519 not-base64 ana\n").unwrap();
    write(&format!("[mqtt]\nenabled = true\noperator_keys_file = \"{}\"\n", keys.display()));
    let (_, checks) = doctor(&config);
    assert_eq!(level(&checks, "Fleet command keys"), "fail");
    let check = checks.as_array().unwrap().iter().find(|c| c["name"] == "Fleet command keys").unwrap();
    assert!(check["detail"].as_str().unwrap().contains("line 1: the key is not base64"), "{check}");
}
