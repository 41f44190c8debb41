//! A closed stdout or stderr (`edgeadapt classify --json DIR | head -1`) ends a command the way
//! it ends Unix tools: quietly, as if killed by SIGPIPE (the shell reports 141), with no panic
//! message.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe fails with EPIPE and `println!` panics.
//! Restoring the signal's default instead would end the process on the spot, before destructors
//! run (the demo's agent child would be left running), and would end the daemon when its log
//! reader goes away. So the panic is kept but silenced, the main thread unwinds (destructors
//! run) to `main`, and only then does the process end by SIGPIPE. Log lines that cannot be
//! written are dropped (`main` turns off tracing's report of them, which would itself panic).

use std::any::Any;

/// Whether a panic message is the one `print!`/`eprint!` panic with on a closed pipe.
pub fn is_closed_output(message: &str) -> bool {
    message.starts_with("failed printing to std") && message.ends_with(&format!("(os error {})", libc::EPIPE))
}

/// Whether a panic payload (from `catch_unwind`) is a write to a closed stdout or stderr.
pub fn is_closed_output_payload(payload: &(dyn Any + Send)) -> bool {
    let message =
        payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
    message.is_some_and(is_closed_output)
}

/// Silences the panic of a write to a closed stdout or stderr. On the main thread it unwinds
/// to `main` (which then calls [`die_of_sigpipe`]); on any other thread the process ends now,
/// since nothing may be waiting to hand that thread's panic on.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.payload_as_str().is_some_and(is_closed_output) {
            return default(info);
        }
        if std::thread::current().name() != Some("main") {
            die_of_sigpipe();
        }
    }));
}

/// Ends the process as SIGPIPE ends Unix tools; exit status 141 where the signal is blocked.
pub fn die_of_sigpipe() -> ! {
    // SAFETY: setting a signal's disposition to its default and raising it in this process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(128 + libc::SIGPIPE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_print_to_a_closed_pipe_counts() {
        let epipe = format!("(os error {})", libc::EPIPE);
        assert!(is_closed_output(&format!("failed printing to stdout: Broken pipe {epipe}")));
        assert!(is_closed_output(&format!("failed printing to stderr: Broken pipe {epipe}")));
        assert!(!is_closed_output(&format!(
            "failed printing to stdout: No space left on device (os error {})",
            libc::ENOSPC
        )));
        assert!(!is_closed_output(&format!("index out of bounds: the len is 3 but the index is 32 {epipe}")));
    }

    #[test]
    fn payloads_of_both_kinds_are_recognised() {
        let message = format!("failed printing to stdout: Broken pipe (os error {})", libc::EPIPE);
        let formatted: Box<dyn Any + Send> = Box::new(message.clone());
        let fixed: Box<dyn Any + Send> = Box::new(&*message.leak());
        let other: Box<dyn Any + Send> = Box::new(7_u32);
        assert!(is_closed_output_payload(formatted.as_ref()));
        assert!(is_closed_output_payload(fixed.as_ref()));
        assert!(!is_closed_output_payload(other.as_ref()));
    }
}
