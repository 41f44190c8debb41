use std::io::IsTerminal;

use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEADAPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,edgeadapt=info,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let cli = edgeadapt::cli::Cli::parse();
    match edgeadapt::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
