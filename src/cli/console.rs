//! `edgeadapt console`: the on-site console's users and its TLS fingerprint.

use std::io::BufRead;

use clap::{Args, Subcommand};

use crate::agent::console::{tls, users::Users};
use crate::config::DeviceConfig;

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    #[command(subcommand)]
    pub command: ConsoleCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConsoleCommand {
    /// Add a console user, or change a user's password. The password is read from standard
    /// input (one line), so it never appears in the shell's history or the process list.
    AddUser {
        /// Letters, digits, '.', '-' or '_'.
        name: String,
    },
    /// Remove a console user.
    RemoveUser {
        /// The user to remove.
        name: String,
    },
    /// List the console's users, and the address and TLS fingerprint of the site listener.
    Show,
}

pub fn run(args: ConsoleArgs, config: DeviceConfig) -> anyhow::Result<i32> {
    let data_dir = config.require_data_dir().map_err(anyhow::Error::msg)?.to_path_buf();
    let file = config.console.users_file(&data_dir);
    let mut users = Users::load(&file).map_err(anyhow::Error::msg)?;
    match args.command {
        ConsoleCommand::AddUser { name } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("password for '{name}' (at least 10 characters), then Enter:");
            }
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']);
            users.set_password(&name, password).map_err(anyhow::Error::msg)?;
            users.save(&file).map_err(anyhow::Error::msg)?;
            println!(
                "user '{name}' can sign in to the console ({}); a running agent takes it at its next start",
                file.display()
            );
        }
        ConsoleCommand::RemoveUser { name } => {
            let before = users.users.len();
            users.users.retain(|u| u.name != name);
            if users.users.len() == before {
                anyhow::bail!("no console user '{name}' in {}", file.display());
            }
            users.save(&file).map_err(anyhow::Error::msg)?;
            println!("user '{name}' removed; a running agent forgets it at its next start");
        }
        ConsoleCommand::Show => {
            let names: Vec<&str> = users.users.iter().map(|u| u.name.as_str()).collect();
            println!("users ({}): {}", file.display(), if names.is_empty() { "none".into() } else { names.join(", ") });
            match &config.console.listen {
                None => println!("site network: off (the console is on the loopback endpoint only)"),
                Some(listen) => {
                    let cert = match &config.console.tls_cert {
                        Some(cert) => cert.clone(),
                        None => tls::generated_paths(&data_dir).0,
                    };
                    let fingerprint = tls::fingerprint(&cert)
                        .unwrap_or_else(|e| format!("unknown until the agent has started once ({e})"));
                    println!("site network: https://{listen}/console/");
                    println!("certificate SHA-256 fingerprint: {fingerprint}");
                }
            }
        }
    }
    Ok(0)
}
