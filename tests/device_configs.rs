//! Every shipped device config parses and validates.

use edgeadapt::config::DeviceConfig;
use edgeadapt::runtime::ProviderKind;

#[test]
fn every_shipped_device_config_is_valid() {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            DeviceConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 5, "expected the default and the four example configs, found {checked}");
}

#[test]
fn the_default_config_runs_the_bundled_model_on_the_cpu() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-config/default.toml");
    let config = DeviceConfig::load(&path).unwrap();
    assert_eq!(config.runtime.providers, vec![ProviderKind::Cpu]);
    assert!(config.bundle.join("manifest.toml").is_file(), "{}", config.bundle.display());
}

#[test]
fn each_example_device_has_its_providers_and_a_secured_fleet_link() {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-config");
    let cases = [
        ("jetson-agx-orin.toml", vec![ProviderKind::Tensorrt, ProviderKind::Cuda], true),
        ("jetson-orin-nano.toml", vec![ProviderKind::Tensorrt, ProviderKind::Cuda], true),
        ("x86-cuda.toml", vec![ProviderKind::Tensorrt, ProviderKind::Cuda, ProviderKind::Cpu], false),
        ("cpu-only.toml", vec![ProviderKind::Cpu], false),
    ];
    for (file, providers, require_gpu) in cases {
        let config = DeviceConfig::load(&folder.join(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.runtime.providers, providers, "{file}");
        assert_eq!(config.runtime.require_gpu, require_gpu, "{file}");
        assert!(config.mqtt.enabled && config.mqtt.broker.starts_with("mqtts://"), "{file}");
        assert!(config.mqtt.client_cert.is_some() && config.mqtt.operator_keys_file.is_some(), "{file}");
        assert!(config.data_dir.as_deref() == Some(std::path::Path::new("/var/lib/edgeadapt")), "{file}");
        // Engines must survive restarts and be writable under the service's ReadWritePaths.
        let cache = config.runtime.tensorrt.cache_dir.as_deref().expect("an engine cache folder");
        assert!(cache.starts_with("/var/lib/edgeadapt"), "{file}: {}", cache.display());
    }
}
