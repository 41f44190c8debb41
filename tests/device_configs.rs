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
    assert!(checked >= 3, "expected the default and the example configs, found {checked}");
}

#[test]
fn the_default_config_runs_the_bundled_model_on_the_cpu() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-config/default.toml");
    let config = DeviceConfig::load(&path).unwrap();
    assert_eq!(config.runtime.providers, vec![ProviderKind::Cpu]);
    assert!(config.bundle.join("manifest.toml").is_file(), "{}", config.bundle.display());
}
