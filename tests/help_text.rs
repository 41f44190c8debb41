//! `--help` describes every option and argument of every command: the commands are read from
//! the binary's own help (so a new command is checked without editing this test), recursively
//! for commands with subcommands (`fleet`).

use std::process::Command;

fn help(path: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_edgeadapt")).args(path).arg("--help").output().unwrap();
    assert!(
        output.status.success(),
        "edgeadapt {} --help: {}",
        path.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The lines of a help section (`Commands:`, `Options:`, `Arguments:`), up to the next blank line.
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    text.lines().skip_while(|l| *l != title).skip(1).take_while(|l| !l.trim().is_empty()).collect()
}

/// The subcommands a help text lists, without clap's own `help`.
fn subcommands(text: &str) -> Vec<String> {
    section(text, "Commands:")
        .iter()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(String::from)
        .collect()
}

/// Options and arguments listed without a description: a line that starts an entry (`-x`, `--x`,
/// `<X>` or `[X]`) and holds nothing after the flag and its value name.
fn undescribed(text: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for title in ["Options:", "Arguments:"] {
        let lines = section(text, title);
        for (i, line) in lines.iter().enumerate() {
            let entry = line.trim_start();
            if !(entry.starts_with('-') || entry.starts_with('<') || entry.starts_with('[')) {
                continue;
            }
            // clap separates the flag from its description by at least two spaces; a long
            // description may also start on the next, further indented line.
            let described = entry.contains("  ")
                || lines.get(i + 1).is_some_and(|next| {
                    let indent = |l: &str| l.len() - l.trim_start().len();
                    indent(next) > indent(line) && !next.trim().is_empty()
                });
            if !described {
                missing.push(entry.to_string());
            }
        }
    }
    missing
}

#[test]
fn every_option_of_every_command_has_a_description() {
    let mut pending: Vec<Vec<String>> = vec![vec![]];
    let mut checked = Vec::new();
    let mut missing = Vec::new();
    while let Some(path) = pending.pop() {
        let words: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&words);
        for option in undescribed(&text) {
            missing.push(format!("edgeadapt {} {option}", words.join(" ")));
        }
        for sub in subcommands(&text) {
            let mut next = path.clone();
            next.push(sub);
            pending.push(next);
        }
        checked.push(words.join(" "));
    }
    // The listing was read: the top level, every command, and fleet's subcommands.
    for command in ["adapt", "classify", "fleet", "fleet set-policy", "fleet status", "fleet watch", "status"] {
        assert!(checked.iter().any(|c| c == command), "{command} not checked; checked: {checked:?}");
    }
    assert!(missing.is_empty(), "options without a description:\n{}", missing.join("\n"));
}

#[test]
fn fleet_watch_offers_for_but_no_timeout_which_only_commands_that_wait_for_an_answer_take() {
    let watch = help(&["fleet", "watch"]);
    assert!(watch.contains("--for <SECONDS>"), "{watch}");
    assert!(!watch.contains("--timeout"), "{watch}");
    for command in ["adapt", "rollback", "status", "set-policy", "weights"] {
        assert!(help(&["fleet", command]).contains("--timeout <SECONDS>"), "fleet {command}");
    }
}

#[test]
fn an_option_line_without_a_description_is_found() {
    let text = "Usage: x\n\nArguments:\n  <PATH>...  Files\n  [OUT]\n\nOptions:\n      --device <DEVICE>\n      --json             Print JSON\n      --long <X>\n          Described on the next line\n  -h, --help             Print help\n";
    assert_eq!(undescribed(text), vec!["--device <DEVICE>", "[OUT]"]);
}
