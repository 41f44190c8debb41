//! A test that cannot run here is listed, with its reason, at the end of `tools/test.sh`.

mod common;

use std::process::Command;

fn summary(list: &std::path::Path) -> String {
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/skip-summary.sh"))
        .arg(list)
        .output()
        .expect("bash runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_skipped_test_is_listed_once_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("skipped-tests.txt");
    assert_eq!(summary(&list), "No test was skipped.\n");
    for _ in 0..2 {
        let list = list.clone();
        std::thread::Builder::new()
            .name("broker::with_mosquitto".into())
            .spawn(move || common::skipped_to(&list, "mosquitto is not installed"))
            .unwrap()
            .join()
            .unwrap();
    }
    assert_eq!(
        summary(&list),
        "Skipped on this machine: 1 test(s), which passed without running:\n  \
         skip_summary::broker::with_mosquitto: mosquitto is not installed\n"
    );
}
