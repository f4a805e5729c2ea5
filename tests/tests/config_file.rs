//! `ember --no-api --config-file` with the config file's `logger` and `metrics` sections:
//! the same controller and loop as with the API socket, so the log file gets the actions and
//! the metrics file gets its last line once the guest has powered off, written by the VMM
//! thread under its seccomp filter. The body runs where KVM can boot stock guests
//! (`testbed::vm_test`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{Artifacts, GuestSpec};

/// The artifacts; an `EMBER_BIN` given when this test was built also holds inside the
/// nested test bed, whose jobs start with a clean environment.
fn artifacts() -> Artifacts {
    if std::env::var_os("EMBER_BIN").is_none() {
        if let Some(bin) = option_env!("EMBER_BIN") {
            std::env::set_var("EMBER_BIN", bin);
        }
    }
    Artifacts::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// Log lines start with `<seconds>.<milliseconds>`; the time of the first line holding
/// `text`, in milliseconds.
fn logged_at_ms(log: &str, text: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(text))
        .unwrap_or_else(|| panic!("{text:?} not in the log:\n{log}"));
    let (secs, millis) = line.split_once(' ').unwrap().0.split_once('.').unwrap();
    secs.parse::<u64>().unwrap() * 1000 + millis.parse::<u64>().unwrap()
}

#[test]
fn no_api_logs_and_writes_a_last_metrics_line() {
    let Some(dir) = testbed::vm_test(
        "no_api_logs_and_writes_a_last_metrics_line",
        Duration::from_secs(900),
    ) else {
        return;
    };
    let art = artifacts();
    let (log, metrics) = (dir.join("ember.log"), dir.join("metrics.json"));
    // The standard guest powers off right after its ready line.
    let mut config: Value = serde_json::from_str(&GuestSpec::standard(&art).config_json()).unwrap();
    config["logger"] = json!({"log_path": log, "level": "Info", "show_level": true});
    config["metrics"] = json!({"metrics_path": metrics});
    let vm_json = dir.join("vm.json");
    fs::write(&vm_json, config.to_string()).unwrap();

    let mut child = Command::new(&art.ember)
        .arg("--no-api")
        .arg("--config-file")
        .arg(&vm_json)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("vm.out")).unwrap())
        .stderr(fs::File::create(dir.join("vm.err")).unwrap())
        .spawn()
        .unwrap();
    let status = testbed::wait_with_timeout(&mut child, Duration::from_secs(600));
    let read = |path: &Path| fs::read_to_string(path).unwrap_or_default();
    let context = format!(
        "--- console\n{}\n--- stderr\n{}\n--- log\n{}",
        read(&dir.join("vm.out")),
        read(&dir.join("vm.err")),
        read(&log)
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{context}");
    assert!(
        testbed::parse_ready_line(&read(&dir.join("vm.out"))).is_some(),
        "{context}"
    );

    let text = read(&log);
    for line in [
        "[Info] PutLogger: done",
        "[Info] PutMetrics: done",
        "[Info] PutBootSource: done",
        "[Info] InstanceStart: done",
    ] {
        assert!(text.contains(line), "{line:?} not in the log\n{context}");
    }
    let ended_ms = logged_at_ms(&text, "the VM ended: GuestStopped");

    let lines: Vec<Value> = read(&metrics)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no metrics line\n{context}"));
    assert!(
        last["utc_timestamp_ms"].as_u64().unwrap() >= ended_ms,
        "the last metrics line was written before the VM ended:\n{last}\n{context}"
    );
    assert!(last["vcpu_exits"]["io_out"].as_u64().unwrap() > 0, "{last}");
    assert!(last["boot_time_us"].as_u64().unwrap() > 0, "{last}");
    // No API, and the VMM thread wrote it under its seccomp filter without a fault.
    assert_eq!(last["api"]["requests"], 0, "{last}");
    assert_eq!(last["seccomp"]["faults"], 0, "{last}");
}
