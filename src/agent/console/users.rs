//! Console users: names with Argon2id password hashes in a TOML file the operator keeps
//! (`edgeadapt console add-user`), and the lockout that stops password guessing.

use std::collections::HashMap;
use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// An Argon2id PHC string (`$argon2id$v=19$...`).
    pub password_hash: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Users {
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
}

impl Users {
    /// Reads `file`; a missing file is no users. Every hash must parse, so a typo is found at
    /// start rather than at the first sign-in.
    pub fn load(file: &Path) -> Result<Users, String> {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Users::default()),
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        let users: Users = toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        for user in &users.users {
            valid_name(&user.name).map_err(|e| format!("{}: {e}", file.display()))?;
            PasswordHash::new(&user.password_hash).map_err(|e| {
                format!("{}: user '{}': the password hash is not a PHC string: {e}", file.display(), user.name)
            })?;
        }
        Ok(users)
    }

    /// Writes the file whole (temporary file, then rename), readable by its owner only.
    pub fn save(&self, file: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let staged = file.with_extension("toml.new");
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&staged, text).map_err(|e| format!("{}: {e}", staged.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", staged.display()))?;
        }
        std::fs::rename(&staged, file).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Adds `name`, or changes its password.
    pub fn set_password(&mut self, name: &str, password: &str) -> Result<(), String> {
        valid_name(name)?;
        if password.chars().count() < 10 {
            return Err("the password must have at least 10 characters".into());
        }
        let hash = hash_password(password)?;
        match self.users.iter_mut().find(|u| u.name == name) {
            Some(user) => user.password_hash = hash,
            None => self.users.push(User { name: name.to_string(), password_hash: hash }),
        }
        Ok(())
    }

    /// Whether `password` is `name`'s. An unknown name costs the same time as a wrong
    /// password, so the answer's timing does not tell which names exist.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        let stand_in;
        let (hash, known) = match self.users.iter().find(|u| u.name == name) {
            Some(user) => (user.password_hash.as_str(), true),
            None => {
                stand_in = hash_password("a stand-in for unknown names").unwrap_or_default();
                (stand_in.as_str(), false)
            }
        };
        let Ok(parsed) = PasswordHash::new(hash) else { return false };
        Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok() && known
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// User names: letters, digits, `.`, `-`, `_`, at most 64; they appear in events and logs.
pub fn valid_name(name: &str) -> Result<(), String> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if fine { Ok(()) } else { Err(format!("user name '{name}': use 1-64 letters, digits, '.', '-' or '_'")) }
}

/// Failed sign-ins per user name: after `max_failures` within `window_ms` the name is locked
/// for `window_ms` from the last failure, whatever the password. Pure: the caller brings the time.
#[derive(Debug, Clone)]
pub struct Lockout {
    failures: HashMap<String, Vec<i64>>,
    max_failures: usize,
    window_ms: i64,
}

impl Lockout {
    pub fn new(max_failures: usize, window_ms: i64) -> Lockout {
        Lockout { failures: HashMap::new(), max_failures: max_failures.max(1), window_ms }
    }

    /// `Err(seconds)` while `name` is locked: how long until it may try again.
    pub fn check(&mut self, name: &str, now_ms: i64) -> Result<(), u64> {
        let window = self.window_ms;
        let Some(times) = self.failures.get_mut(name) else { return Ok(()) };
        times.retain(|&t| now_ms - t < window);
        if times.len() >= self.max_failures {
            let last = *times.iter().max().expect("not empty");
            return Err(((last + window - now_ms).max(0) as u64).div_ceil(1000));
        }
        Ok(())
    }

    pub fn failed(&mut self, name: &str, now_ms: i64) {
        // Bounded: at most this many names are tracked; the oldest entries go first.
        const NAMES: usize = 10_000;
        if self.failures.len() >= NAMES && !self.failures.contains_key(name) {
            let oldest = self
                .failures
                .iter()
                .min_by_key(|(_, times)| times.iter().max().copied().unwrap_or(i64::MIN))
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                self.failures.remove(&oldest);
            }
        }
        let times = self.failures.entry(name.to_string()).or_default();
        times.push(now_ms);
        if times.len() > self.max_failures {
            times.remove(0);
        }
    }

    pub fn succeeded(&mut self, name: &str) {
        self.failures.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    #[test]
    fn a_password_set_verifies_and_others_do_not() {
        let mut users = Users::default();
        users.set_password("ana", "correct horse battery").unwrap();
        assert!(users.users[0].password_hash.starts_with("$argon2id$"));
        assert!(users.verify("ana", "correct horse battery"));
        assert!(!users.verify("ana", "correct horse battery!"));
        assert!(!users.verify("ben", "correct horse battery"), "unknown name");
        assert!(users.set_password("ana", "short").unwrap_err().contains("10 characters"));
        assert!(users.set_password("a b", "long enough password").unwrap_err().contains("user name"));
    }

    #[test]
    fn users_survive_a_round_trip_through_their_file_and_bad_hashes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("console/users.toml");
        assert!(Users::load(&file).unwrap().is_empty(), "no file, no users");
        let mut users = Users::default();
        users.set_password("ana", "correct horse battery").unwrap();
        users.save(&file).unwrap();
        let loaded = Users::load(&file).unwrap();
        assert!(loaded.verify("ana", "correct horse battery"));
        std::fs::write(&file, "[[user]]\nname = \"ben\"\npassword_hash = \"plain\"\n").unwrap();
        let error = Users::load(&file).unwrap_err();
        assert!(error.contains("ben") && error.contains("PHC"), "{error}");
    }

    #[test]
    fn repeated_failures_lock_a_name_for_the_window_and_success_clears_them() {
        let mut lockout = Lockout::new(3, 15 * MINUTE);
        for minute in 0..3 {
            assert!(lockout.check("ana", minute * MINUTE).is_ok());
            lockout.failed("ana", minute * MINUTE);
        }
        assert_eq!(lockout.check("ana", 3 * MINUTE), Err(14 * 60), "locked 15 minutes from the last failure");
        assert!(lockout.check("ben", 3 * MINUTE).is_ok(), "other names are not affected");
        assert!(lockout.check("ana", 17 * MINUTE).is_ok(), "the window has passed");
        lockout.failed("ana", 18 * MINUTE);
        lockout.succeeded("ana");
        lockout.failed("ana", 19 * MINUTE);
        lockout.failed("ana", 19 * MINUTE);
        assert!(lockout.check("ana", 19 * MINUTE).is_ok(), "a success starts the count again");
    }
}
