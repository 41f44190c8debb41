//! Which device config a command uses when `--config` is not given. The places, in order:
//!
//! 1. `--config FILE`;
//! 2. the `EDGEADAPT_CONFIG` environment variable;
//! 3. the user's config folder: `$XDG_CONFIG_HOME/edgeadapt/config.toml`, or
//!    `~/.config/edgeadapt/config.toml` where `XDG_CONFIG_HOME` is unset (or not absolute);
//! 4. the system's: `/etc/edgeadapt/config.toml`;
//! 5. the checkout's `device-config/default.toml`, relative to the current folder.
//!
//! A place that is named (the flag, the variable) is used whether or not the file is there, so a
//! mistyped name is an error rather than a silent fall-through to another config; the folders
//! are used only where the file exists. The decision is [`search`], a pure function of the
//! flag, the environment and which files exist.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The variable that names a config file.
pub const CONFIG_VAR: &str = "EDGEADAPT_CONFIG";
/// The system-wide config.
pub const SYSTEM_CONFIG: &str = "/etc/edgeadapt/config.toml";
/// The checkout's default config, relative to the current folder.
pub const CHECKOUT_CONFIG: &str = "device-config/default.toml";

/// What the search looks at: the flag and the environment, read once by [`Inputs::current`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub flag: Option<PathBuf>,
    pub config_var: Option<OsString>,
    pub xdg_config_home: Option<OsString>,
    pub home: Option<OsString>,
}

impl Inputs {
    pub fn current(flag: Option<PathBuf>) -> Inputs {
        Inputs {
            flag,
            config_var: std::env::var_os(CONFIG_VAR),
            xdg_config_home: std::env::var_os("XDG_CONFIG_HOME"),
            home: std::env::var_os("HOME"),
        }
    }
}

/// Where a config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Variable,
    User,
    System,
    Checkout,
}

/// The config file a command uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub path: PathBuf,
    pub origin: Origin,
}

/// No config anywhere: every place looked, for the message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "no device config: not given with --config, {CONFIG_VAR} is not set, and there is none at {}; \
     pass --config FILE, set {CONFIG_VAR}=FILE, or copy one of the checkout's device-config/*.toml \
     to one of those places (README, \"Commands\")",
    looked_at(.looked)
)]
pub struct NotFound {
    pub looked: Vec<PathBuf>,
}

fn looked_at(paths: &[PathBuf]) -> String {
    // A relative place is in the current folder: say so.
    let names: Vec<String> = paths
        .iter()
        .map(|p| if p.is_relative() { format!("./{}", p.display()) } else { p.display().to_string() })
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// The user's config file: under `XDG_CONFIG_HOME` where it is set to an absolute path (the XDG
/// spec ignores a relative one), else under `~/.config`; none without either.
pub fn user_config(inputs: &Inputs) -> Option<PathBuf> {
    let nonempty = |v: &Option<OsString>| v.as_ref().filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = nonempty(&inputs.xdg_config_home)
        .filter(|p| p.is_absolute())
        .or_else(|| nonempty(&inputs.home).map(|home| home.join(".config")))?;
    Some(base.join("edgeadapt").join("config.toml"))
}

/// The config to use, given the flag, the environment and which files exist.
pub fn search(inputs: &Inputs, exists: impl Fn(&Path) -> bool) -> Result<Found, NotFound> {
    if let Some(path) = &inputs.flag {
        return Ok(Found { path: path.clone(), origin: Origin::Flag });
    }
    if let Some(path) = inputs.config_var.as_ref().filter(|v| !v.is_empty()) {
        return Ok(Found { path: PathBuf::from(path), origin: Origin::Variable });
    }
    let places = user_config(inputs)
        .map(|path| (path, Origin::User))
        .into_iter()
        .chain([(PathBuf::from(SYSTEM_CONFIG), Origin::System), (PathBuf::from(CHECKOUT_CONFIG), Origin::Checkout)]);
    let mut looked = Vec::new();
    for (path, origin) in places {
        if exists(&path) {
            return Ok(Found { path, origin });
        }
        looked.push(path);
    }
    Err(NotFound { looked })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(flag: Option<&str>, var: Option<&str>, xdg: Option<&str>, home: Option<&str>) -> Inputs {
        Inputs {
            flag: flag.map(PathBuf::from),
            config_var: var.map(OsString::from),
            xdg_config_home: xdg.map(OsString::from),
            home: home.map(OsString::from),
        }
    }

    fn found(path: &str, origin: Origin) -> Result<Found, NotFound> {
        Ok(Found { path: PathBuf::from(path), origin })
    }

    /// Every file exists: each place wins over all the ones after it.
    #[test]
    fn the_first_place_in_the_order_wins() {
        let all = |_: &Path| true;
        let full = inputs(Some("flag.toml"), Some("/var.toml"), Some("/xdg"), Some("/home/u"));
        assert_eq!(search(&full, all), found("flag.toml", Origin::Flag));
        let no_flag = Inputs { flag: None, ..full.clone() };
        assert_eq!(search(&no_flag, all), found("/var.toml", Origin::Variable));
        let no_var = Inputs { config_var: None, ..no_flag.clone() };
        assert_eq!(search(&no_var, all), found("/xdg/edgeadapt/config.toml", Origin::User));
        let no_user = |p: &Path| !p.starts_with("/xdg");
        assert_eq!(search(&no_var, no_user), found(SYSTEM_CONFIG, Origin::System));
        let checkout_only = |p: &Path| p == Path::new(CHECKOUT_CONFIG);
        assert_eq!(search(&no_var, checkout_only), found(CHECKOUT_CONFIG, Origin::Checkout));
    }

    #[test]
    fn a_named_config_is_used_even_where_it_is_missing() {
        let none = |_: &Path| false;
        assert_eq!(search(&inputs(Some("typo.toml"), None, None, None), none), found("typo.toml", Origin::Flag));
        assert_eq!(search(&inputs(None, Some("/typo.toml"), None, None), none), found("/typo.toml", Origin::Variable));
        // An empty variable counts as unset.
        let checkout = |p: &Path| p == Path::new(CHECKOUT_CONFIG);
        assert_eq!(search(&inputs(None, Some(""), None, None), checkout), found(CHECKOUT_CONFIG, Origin::Checkout));
    }

    #[test]
    fn the_user_folder_is_xdg_config_home_else_dot_config_in_home() {
        let user = |xdg, home| user_config(&inputs(None, None, xdg, home));
        assert_eq!(user(Some("/xdg"), Some("/home/u")), Some(PathBuf::from("/xdg/edgeadapt/config.toml")));
        assert_eq!(user(None, Some("/home/u")), Some(PathBuf::from("/home/u/.config/edgeadapt/config.toml")));
        // A relative or empty XDG_CONFIG_HOME is ignored, as the XDG spec says.
        assert_eq!(user(Some("rel"), Some("/home/u")), Some(PathBuf::from("/home/u/.config/edgeadapt/config.toml")));
        assert_eq!(user(Some(""), Some("/home/u")), Some(PathBuf::from("/home/u/.config/edgeadapt/config.toml")));
        assert_eq!(user(None, None), None);
    }

    #[test]
    fn nothing_found_names_every_place_looked() {
        let error = search(&inputs(None, None, None, Some("/home/u")), |_| false).unwrap_err();
        assert_eq!(
            error.looked,
            [PathBuf::from("/home/u/.config/edgeadapt/config.toml"), SYSTEM_CONFIG.into(), CHECKOUT_CONFIG.into()]
        );
        let message = error.to_string();
        for place in ["--config", CONFIG_VAR, "/home/u/.config/edgeadapt/config.toml", SYSTEM_CONFIG, CHECKOUT_CONFIG] {
            assert!(message.contains(place), "{place} in: {message}");
        }
        // Without a home folder, the user's place is left out rather than guessed.
        let error = search(&inputs(None, None, None, None), |_| false).unwrap_err();
        assert_eq!(error.looked, [PathBuf::from(SYSTEM_CONFIG), PathBuf::from(CHECKOUT_CONFIG)]);
    }
}
