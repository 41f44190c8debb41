//! `edgeadapt doctor`: checks what a field device needs, each with a fix when it fails. The
//! checks only read: the store is opened read-only and the broker check connects under a
//! separate client id without a Last Will, so a running agent is not disturbed.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::DeviceConfig;
use crate::runtime::ProviderKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// What to do about a warning or failure.
    pub fix: String,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, level: Level::Ok, detail: detail.into(), fix: String::new() }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, level: Level::Warn, detail: detail.into(), fix: fix.into() }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, level: Level::Fail, detail: detail.into(), fix: fix.into() }
}

/// Whether a failed check keeps the agent from starting: the agent works offline and with a
/// wrong clock (the outbox waits), but not without its runtime, bundle, store or disk.
pub fn blocks_start(check: &Check) -> bool {
    check.level == Level::Fail && !matches!(check.name, "MQTT broker" | "clock")
}

/// Free-space thresholds for the data folder.
const DISK_WARN_BYTES: u64 = 1 << 30;
const DISK_FAIL_BYTES: u64 = 100 << 20;
/// No clock on a working device is earlier than this (2025-01-01).
const CLOCK_FLOOR_MS: i64 = 1_735_689_600_000;

pub fn run(config: &DeviceConfig) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(onnx_runtime(config));
    let runtime_loaded = checks[0].level != Level::Fail;
    checks.push(providers(config, runtime_loaded));
    checks.push(gpu_visibility(config));
    checks.extend(tensorrt(config));
    checks.push(bundle(config));
    checks.extend(store(config));
    checks.push(disk_space(config));
    checks.push(clock(config));
    checks.extend(tls_files(config));
    checks.extend(command_keys(config));
    checks.push(broker(config));
    checks
}

fn onnx_runtime(config: &DeviceConfig) -> Check {
    match crate::runtime::init(config.runtime.ort_library.as_deref()) {
        Ok(runtime) => ok(
            "ONNX Runtime",
            format!("{} from {} ({})", runtime.version, runtime.library.path.display(), runtime.library.source),
        ),
        Err(error) => fail(
            "ONNX Runtime",
            error.to_string(),
            "run `python3 tools/fetch-onnxruntime.py`, or point `runtime.ort_library` / ORT_DYLIB_PATH at the library \
             (JetPack's build on Jetson)",
        ),
    }
}

fn providers(config: &DeviceConfig, runtime_loaded: bool) -> Check {
    if !runtime_loaded {
        return fail("execution providers", "not checked: ONNX Runtime did not load", "fix ONNX Runtime first");
    }
    let wanted = &config.runtime.providers;
    let missing: Vec<ProviderKind> = wanted.iter().copied().filter(|&k| !crate::runtime::is_available(k)).collect();
    let present: Vec<String> =
        wanted.iter().filter(|k| !missing.contains(k)).map(|k| k.to_string()).collect::<Vec<_>>();
    let detail = format!("configured {:?}; in this build: {}", names(wanted), present.join(", "));
    if missing.is_empty() {
        return ok("execution providers", detail);
    }
    let fix = "use an ONNX Runtime build with these providers (JetPack's on Jetson; the onnxruntime-gpu build on x86 \
               with CUDA), or remove them from `runtime.providers`";
    let gpu_left = wanted.iter().any(|k| k.is_gpu() && !missing.contains(k));
    if config.runtime.require_gpu && !gpu_left {
        fail("execution providers", format!("{detail}; missing {:?} and `require_gpu` is set", names(&missing)), fix)
    } else {
        warn("execution providers", format!("{detail}; missing {:?}: the next one is used", names(&missing)), fix)
    }
}

fn names(kinds: &[ProviderKind]) -> Vec<&'static str> {
    kinds.iter().map(|k| k.name()).collect()
}

fn gpu_visibility(config: &DeviceConfig) -> Check {
    let wants_gpu = config.runtime.providers.iter().any(|k| k.is_gpu());
    if !wants_gpu {
        return ok("GPU", "not used (CPU providers only)");
    }
    let fix = "install the NVIDIA driver (JetPack on Jetson) and give the service user access to /dev/nvidia* \
               (the `video` and `render` groups on Jetson)";
    let not_usable = |detail: String| {
        if config.runtime.require_gpu {
            fail("GPU", detail, fix)
        } else {
            warn("GPU", format!("{detail}: the CPU fallback will run"), fix)
        }
    };
    match crate::runtime::gpu::cuda_driver() {
        Ok(driver) => match driver.devices.iter().find(|d| d.ordinal == config.runtime.gpu_device) {
            Some(device) => ok(
                "GPU",
                format!(
                    "{} (compute capability {}, {} MiB), CUDA driver {}",
                    device.name, device.compute_capability, device.memory_mib, driver.cuda_version
                ),
            ),
            None => not_usable(format!(
                "`runtime.gpu_device` = {} but the CUDA driver sees {} device(s)",
                config.runtime.gpu_device,
                driver.devices.len()
            )),
        },
        Err(problem) => not_usable(problem),
    }
}

fn tensorrt(config: &DeviceConfig) -> Option<Check> {
    if !config.runtime.providers.contains(&ProviderKind::Tensorrt) {
        return None;
    }
    let cache = match &config.runtime.tensorrt.cache_dir {
        Some(dir) => format!("engine cache {}", dir.display()),
        None => "no engine cache (set `data_dir` or `runtime.tensorrt.cache_dir`): engines are rebuilt at every start"
            .to_string(),
    };
    Some(match crate::runtime::gpu::tensorrt_version() {
        Ok(version) if config.runtime.tensorrt.cache_dir.is_some() => ok("TensorRT", format!("{version}; {cache}")),
        Ok(version) => {
            warn("TensorRT", format!("{version}; {cache}"), "set `data_dir` or `runtime.tensorrt.cache_dir`")
        }
        Err(problem) => warn(
            "TensorRT",
            problem,
            "install TensorRT 10 (JetPack 6 ships it; on x86 the `tensorrt` packages from NVIDIA) and make libnvinfer \
             findable (ldconfig or LD_LIBRARY_PATH), or remove `tensorrt` from `runtime.providers`",
        ),
    })
}

/// The bundle the agent serves: a deployed one (`fleet deploy`) or the configured one.
fn bundle(config: &DeviceConfig) -> Check {
    let dir = crate::agent::deploy::served_bundle_folder(config);
    let deployed = if dir == config.bundle { "" } else { ", deployed by the fleet" };
    match crate::model::Bundle::load(&dir) {
        Ok(bundle) => ok(
            "bundle",
            format!(
                "{}: {} classes, every file's sha256 matches ({}{deployed})",
                bundle.manifest.name,
                bundle.head.num_classes(),
                dir.display()
            ),
        ),
        Err(error) => fail("bundle", error.to_string(), "reinstall the bundle, or fix `bundle` in the config"),
    }
}

fn store(config: &DeviceConfig) -> Vec<Check> {
    let Some(data_dir) = config.data_dir.as_deref() else {
        return vec![warn("store", "`data_dir` is not set", "set `data_dir` to use the agent")];
    };
    if let Some(problem) = unusable_folder(data_dir) {
        return vec![fail("store", format!("data_dir {}: {problem}", data_dir.display()), DATA_DIR_FIX)];
    }
    let path = crate::agent::store_path(data_dir);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![ok("store", format!("{} does not exist yet; the agent creates it", path.display()))];
        }
        Ok(metadata) if metadata.is_file() && metadata.len() == 0 => {
            return vec![fail("store", format!("{}: empty file (0 bytes)", path.display()), DAMAGED_FIX)];
        }
        Ok(metadata) if metadata.is_symlink() => {
            return vec![fail(
                "store",
                format!("{}: a link (the agent never follows links)", path.display()),
                "replace the link with the database file itself",
            )];
        }
        Ok(metadata) if !metadata.is_file() => {
            return vec![fail(
                "store",
                format!("{}: not a file", path.display()),
                "move it out of the data folder; the agent then starts a new store",
            )];
        }
        Ok(_) if !writable(&path) => {
            return vec![fail(
                "store",
                format!("{}: not writable by this user", path.display()),
                "give the agent's user write access to the store and its folder (`chown -R edgeadapt: DATA_DIR`)",
            )];
        }
        _ => {}
    }
    let opened = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY);
    let result = opened.and_then(|conn| {
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        let version: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let samples: i64 = conn.query_row("SELECT COUNT(*) FROM samples", [], |row| row.get(0)).unwrap_or(0);
        let versions: i64 = conn.query_row("SELECT COUNT(*) FROM versions", [], |row| row.get(0)).unwrap_or(0);
        Ok((integrity, version, samples, versions))
    });
    let known = crate::store::MIGRATIONS.len() as u32;
    vec![match result {
        Ok((integrity, version, samples, versions)) if integrity == "ok" && version <= known => ok(
            "store",
            format!("{}: schema {version}, integrity ok, {samples} samples, {versions} versions", path.display()),
        ),
        Ok((integrity, version, ..)) if integrity == "ok" => fail(
            "store",
            format!("schema {version} is newer than this build's {known}"),
            "upgrade edgeadapt to the version that wrote this store",
        ),
        Ok((integrity, ..)) => fail("store", format!("integrity check: {integrity}"), DAMAGED_FIX),
        Err(error) => match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                fail("store", format!("{}: {error}", path.display()), DAMAGED_FIX)
            }
            _ => fail("store", format!("{}: {error}", path.display()), "check the file's permissions and the disk"),
        },
    }]
}

const DAMAGED_FIX: &str = "stop the agent, move store.db (with any -wal and -shm files) aside, then restore it from a \
                           backup or salvage it with `sqlite3 BROKEN.db .recover | sqlite3 store.db`";
const DATA_DIR_FIX: &str = "point `data_dir` at a folder the agent's user can write (it is created if missing)";

/// Why `dir` cannot be the data folder, if it cannot: it exists but is not a folder, or it is
/// not writable. A missing folder is fine (the agent creates it).
fn unusable_folder(dir: &Path) -> Option<String> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(e.to_string()),
        Ok(metadata) if !metadata.is_dir() => Some("exists but is not a folder".into()),
        Ok(_) if !writable(dir) => Some("not writable by this user".into()),
        Ok(_) => None,
    }
}

/// Whether this process may write `path` (the kernel's answer, root and ACLs included).
#[cfg(unix)]
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: c_path is a valid NUL-terminated string.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
}

#[cfg(not(unix))]
fn writable(_path: &Path) -> bool {
    true
}

fn disk_space(config: &DeviceConfig) -> Check {
    let Some(data_dir) = config.data_dir.as_deref() else {
        return ok("disk space", "no data folder configured");
    };
    if let Some(problem) = unusable_folder(data_dir) {
        return fail("disk space", format!("data_dir {}: {problem}", data_dir.display()), DATA_DIR_FIX);
    }
    let mut probe = data_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match free_bytes(&probe) {
        Some(free) => {
            let detail = format!("{:.1} GiB free at {}", free as f64 / (1u64 << 30) as f64, probe.display());
            let fix = "free space or move `data_dir` to a larger volume";
            if free < DISK_FAIL_BYTES {
                fail("disk space", detail, fix)
            } else if free < DISK_WARN_BYTES {
                warn("disk space", detail, fix)
            } else {
                ok("disk space", detail)
            }
        }
        None => warn("disk space", format!("cannot read free space at {}", probe.display()), "check the mount"),
    }
}

#[cfg(unix)]
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a writable statvfs.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (result == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_bytes(_path: &Path) -> Option<u64> {
    None
}

/// The clock must be plausible and not behind what the store already recorded: timestamps order
/// versions and events, and TLS certificates are checked against it.
fn clock(config: &DeviceConfig) -> Check {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let fix = "enable time synchronisation (systemd-timesyncd or chrony); devices without a battery-backed clock \
               need it before the agent starts";
    if now < CLOCK_FLOOR_MS {
        return fail("clock", format!("system time {now} ms is before 2025"), fix);
    }
    let newest = config
        .data_dir
        .as_deref()
        .map(crate::agent::store_path)
        // Never through a link: opening a database makes files beside it.
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .and_then(|path| {
            let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
            conn.query_row("SELECT MAX(at_ms) FROM events", [], |row| row.get::<_, Option<i64>>(0)).ok().flatten()
        });
    match newest {
        Some(newest) if newest > now + 60_000 => fail(
            "clock",
            format!("the store's newest event is {:.0} s in the future", (newest - now) as f64 / 1000.0),
            fix,
        ),
        _ => ok("clock", humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
    }
}

fn tls_files(config: &DeviceConfig) -> Vec<Check> {
    if !config.mqtt.enabled {
        return Vec::new();
    }
    let mut checks = Vec::new();
    let files = [
        ("mqtt.ca_file", config.mqtt.ca_file.as_deref(), "CERTIFICATE"),
        ("mqtt.client_cert", config.mqtt.client_cert.as_deref(), "CERTIFICATE"),
        ("mqtt.client_key", config.mqtt.client_key.as_deref(), "PRIVATE KEY"),
        ("mqtt.password_file", config.mqtt.password_file.as_deref(), ""),
        ("mqtt.command_key_file", config.mqtt.command_key_file.as_deref(), ""),
    ];
    for (key, path, pem) in files {
        let Some(path) = path else { continue };
        let check = match std::fs::read_to_string(path) {
            Ok(text) if pem.is_empty() || text.contains(&format!("{pem}-----")) => {
                ok("TLS and secret files", format!("{key}: {} readable", path.display()))
            }
            Ok(_) => fail(
                "TLS and secret files",
                format!("{key}: {} has no PEM {pem}", path.display()),
                "point the key at the PEM file",
            ),
            Err(error) => fail(
                "TLS and secret files",
                format!("{key}: {}: {error}", path.display()),
                "install the file and let the service user read it",
            ),
        };
        checks.push(check);
    }
    checks
}

/// Who may command this device: the keys it trusts, read as the agent reads them.
fn command_keys(config: &DeviceConfig) -> Vec<Check> {
    const NAME: &str = "Fleet command keys";
    if !config.mqtt.enabled {
        return Vec::new();
    }
    let mut checks = vec![match crate::fleet::keys::command_authority(&config.mqtt) {
        Err(error) => fail(NAME, format!("{error:#}"), "fix the key file (edgeadapt fleet keygen writes one)"),
        Ok(authority) if !authority.requires_signature() => warn(
            NAME,
            "commands need no signature: any client the broker lets publish on `cmd` can command this device",
            "trust operator keys: mqtt.operator_keys_file (edgeadapt fleet keygen)",
        ),
        Ok(authority) => {
            let mut trusted: Vec<String> =
                authority.operators.iter().map(|k| format!("operator key '{}'", k.name)).collect();
            if authority.hmac_key.is_some() {
                trusted.push("the fleet's HMAC key".into());
            }
            ok(NAME, format!("commands must be signed by {}", trusted.join(", ")))
        }
    }];
    if let Some(file) = &config.mqtt.signing_key_file {
        checks.push(warn(
            NAME,
            format!("mqtt.signing_key_file ({}) is set: an operator's private key on a device", file.display()),
            "keep the private key on the operator's machine; a device needs only mqtt.operator_keys_file",
        ));
    }
    checks
}

fn broker(config: &DeviceConfig) -> Check {
    if !config.mqtt.enabled {
        return ok("MQTT broker", "the fleet link is off (`mqtt.enabled = false`)");
    }
    if config.mqtt.broker == "embedded" {
        return ok("MQTT broker", format!("embedded, started by the agent on {}", config.mqtt.embedded_listen));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail("MQTT broker", error.to_string(), "-"),
    };
    let outcome = runtime.block_on(async {
        let mut options = crate::fleet::connect::options(&config.mqtt, &config.device_id, None, false)?;
        options.set_client_id(format!("{}-doctor", options.client_id()));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(anyhow::anyhow!("{error}")),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?;
        let _ = client.disconnect().await;
        connected
    });
    match outcome {
        Ok(()) => ok("MQTT broker", format!("{}: connected (TLS and credentials accepted)", config.mqtt.broker)),
        Err(error) => fail(
            "MQTT broker",
            format!("{}: {error}", config.mqtt.broker),
            "check the address, the firewall, the CA and client certificates, and the credentials",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_make_the_agent_unusable_block_its_start() {
        for name in ["ONNX Runtime", "bundle", "store", "disk space"] {
            assert!(blocks_start(&fail(name, "", "")), "{name}");
            assert!(!blocks_start(&warn(name, "", "")), "{name}");
        }
        for name in ["MQTT broker", "clock"] {
            assert!(!blocks_start(&fail(name, "", "")), "{name}");
        }
    }

    #[test]
    fn a_data_folder_that_is_a_file_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(unusable_folder(&file).as_deref(), Some("exists but is not a folder"));
        assert_eq!(unusable_folder(&dir.path().join("missing")), None);
        assert_eq!(unusable_folder(dir.path()), None);
    }
}
