use std::io::{IsTerminal, Write};

use clap::Parser;
use edgeadapt::cli::pipe;

fn main() {
    let cli = edgeadapt::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEADAPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_filter()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // A log line that cannot be written (stderr closed) is dropped; reporting it would
        // panic on the same closed stderr.
        .log_internal_errors(false)
        .init();
    pipe::install_hook();
    // A closed stdout or stderr unwinds to here (destructors run), then ends as SIGPIPE would.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| edgeadapt::cli::run(cli))) {
        Ok(Ok(code)) => std::process::exit(code),
        Ok(Err(error)) => {
            let _ = writeln!(std::io::stderr(), "error: {error}");
            std::process::exit(1);
        }
        Err(panic) if pipe::is_closed_output_payload(panic.as_ref()) => pipe::die_of_sigpipe(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
