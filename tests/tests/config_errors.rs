//! Bad command lines and configurations: each must fail before any guest runs, with exit
//! code 2 and one clear line on stderr naming the field or file, and never a panic. These
//! fail before KVM is touched, so they run on the host itself.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use testbed::{Artifacts, GuestSpec};

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = testbed::repo_root()
            .join("target/testbed/config-errors")
            .join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

/// Runs `ember` with `args`; returns (exit code, stderr).
fn ember(args: &[&str]) -> (i32, String) {
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&art.ember).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `ember --no-api --config-file` on `json` and checks the failure.
fn expect_config_error(name: &str, json: &str, expected: &[&str]) {
    let scratch = Scratch::new(&format!("{name}-config"));
    let config = scratch.file("vm.json", json.as_bytes());
    let (code, stderr) = ember(&["--no-api", "--config-file", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{name}: exit code; stderr: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one line expected: {stderr}"
    );
    assert!(stderr.starts_with("ember: "), "{name}: {stderr}");
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    for part in expected {
        assert!(stderr.contains(part), "{name}: {part:?} not in {stderr:?}");
    }
}

fn config_with(kernel: &Path, vcpus: i64, mem: i64) -> String {
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let spec = GuestSpec {
        kernel: kernel.into(),
        ..GuestSpec::standard(&art)
    };
    spec.config_json()
        .replace("\"vcpu_count\":1", &format!("\"vcpu_count\":{vcpus}"))
        .replace("\"mem_size_mib\":128", &format!("\"mem_size_mib\":{mem}"))
}

fn vmlinux() -> PathBuf {
    Artifacts::locate()
        .unwrap_or_else(|e| panic!("{e}"))
        .vmlinux
}

#[test]
fn missing_kernel_is_named() {
    expect_config_error(
        "missing-kernel",
        &config_with(Path::new("/nonexistent/vmlinux"), 1, 128),
        &[
            "boot-source.kernel_image_path",
            "/nonexistent/vmlinux",
            "No such file",
        ],
    );
}

#[test]
fn unreadable_kernel_is_named() {
    let scratch = Scratch::new("unreadable-kernel");
    // A directory opens but cannot be read, even by root.
    let dir = scratch.0.join("kernel-dir");
    fs::create_dir_all(&dir).unwrap();
    expect_config_error(
        "unreadable-kernel",
        &config_with(&dir, 1, 128),
        &["boot-source.kernel_image_path", "cannot read", "kernel-dir"],
    );
}

#[test]
fn a_file_that_is_no_kernel_is_named() {
    let scratch = Scratch::new("not-a-kernel");
    let bogus = scratch.file("bogus", b"#!/bin/sh\necho I am not a kernel\n");
    expect_config_error(
        "not-a-kernel",
        &config_with(&bogus, 1, 128),
        &[
            "boot-source.kernel_image_path",
            "neither an ELF vmlinux nor a bzImage",
        ],
    );
}

#[test]
fn vcpu_counts_out_of_range_are_refused() {
    for n in [0, 33] {
        expect_config_error(
            "vcpus",
            &config_with(&vmlinux(), n, 128),
            &["machine-config.vcpu_count", &n.to_string(), "1 to 32"],
        );
    }
    expect_config_error(
        "vcpus-negative",
        &config_with(&vmlinux(), -1, 128),
        &["machine-config.vcpu_count", "invalid value"],
    );
}

#[test]
fn zero_and_absurd_memory_are_refused() {
    expect_config_error(
        "mem-zero",
        &config_with(&vmlinux(), 1, 0),
        &["machine-config.mem_size_mib", "0 MiB"],
    );
    expect_config_error(
        "mem-absurd",
        &config_with(&vmlinux(), 1, 1 << 40),
        &[
            "machine-config.mem_size_mib",
            "more than this host can back",
        ],
    );
}

#[test]
fn unknown_fields_are_named() {
    let good = config_with(&vmlinux(), 1, 128);
    let json = good.replacen("\"vcpu_count\"", "\"vcpus\":2,\"vcpu_count\"", 1);
    expect_config_error(
        "unknown-field",
        &json,
        &["machine-config.vcpus", "unknown field"],
    );
    let json = good.replacen('{', "{\"bogus-section\":{},", 1);
    expect_config_error("unknown-section", &json, &["unknown field `bogus-section`"]);
}

#[test]
fn malformed_json_is_located() {
    expect_config_error(
        "malformed",
        "{\"boot-source\": {\"kernel_image_path\": \"/k\",}}",
        &["config file", "line 1 column"],
    );
    expect_config_error("empty", "", &["config file", "EOF"]);
}

#[test]
fn missing_initrd_is_named() {
    let json = config_with(&vmlinux(), 1, 128);
    let art = Artifacts::locate().unwrap();
    let json = json.replace(art.initramfs.to_str().unwrap(), "/nonexistent/initrd.cpio");
    expect_config_error(
        "missing-initrd",
        &json,
        &["boot-source.initrd_path", "/nonexistent/initrd.cpio"],
    );
}

#[test]
fn sections_not_supported_yet_are_refused_clearly() {
    let json = config_with(&vmlinux(), 1, 128).replacen(
        '{',
        "{\"balloon\":{\"amount_mib\":16,\"deflate_on_oom\":false},",
        1,
    );
    expect_config_error(
        "balloon",
        &json,
        &["balloon", "not supported by this version"],
    );
    let json = config_with(&vmlinux(), 1, 128).replacen(
        '{',
        "{\"mmds-config\":{\"network_interfaces\":[\"eth0\"]},",
        1,
    );
    expect_config_error(
        "mmds",
        &json,
        &["mmds-config: not supported by this version"],
    );
}

#[test]
fn logger_and_metrics_sections_are_checked_like_their_api_bodies() {
    let with = |section: &str| config_with(&vmlinux(), 1, 128).replacen('{', section, 1);
    expect_config_error(
        "logger-unknown-field",
        &with(r#"{"logger":{"log_path":"/tmp/x.log","colour":true},"#),
        &["logger.colour: unknown field `colour`, expected one of `log_path`"],
    );
    expect_config_error(
        "logger-level",
        &with(r#"{"logger":{"level":"Loud"},"#),
        &["logger.level: unknown level \"Loud\"; use Off, Error, Warning, Info, Debug or Trace"],
    );
    expect_config_error(
        "metrics-missing-path",
        &with(r#"{"metrics":{},"#),
        &["metrics: missing field `metrics_path`"],
    );
    expect_config_error(
        "logger-dir",
        &with(r#"{"logger":{"log_path":"/nonexistent/dir/ember.log"},"#),
        &["logger.log_path: cannot open /nonexistent/dir/ember.log for writing: No such file"],
    );
    expect_config_error(
        "metrics-dir",
        &with(r#"{"metrics":{"metrics_path":"/nonexistent/dir/m.json"},"#),
        &["metrics.metrics_path: cannot open /nonexistent/dir/m.json for writing: No such file"],
    );
}

/// The logger and metrics of the config file are set before the rest is checked: a
/// refusal after them is reported once on stderr, and also lands in the log file, and the
/// metrics file gets its last line.
#[test]
fn a_refusal_after_logger_and_metrics_reaches_both_files() {
    let scratch = Scratch::new("logged-refusal");
    let (log, metrics) = (scratch.0.join("ember.log"), scratch.0.join("metrics.json"));
    let sections = format!(
        r#"{{"logger":{{"log_path":{log:?},"level":"Info","show_level":true}},"metrics":{{"metrics_path":{metrics:?}}},"#
    );
    let json = config_with(Path::new("/nonexistent/vmlinux"), 1, 128).replacen('{', &sections, 1);
    expect_config_error(
        "logged-refusal",
        &json,
        &["boot-source.kernel_image_path", "/nonexistent/vmlinux"],
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("[Info] PutMetrics: done"), "{text}");
    assert!(
        text.contains("[Error] boot-source.kernel_image_path: cannot open /nonexistent/vmlinux"),
        "{text}"
    );
    let lines = fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    let line: serde_json::Value = serde_json::from_str(lines.trim()).unwrap();
    assert_eq!(line["api"]["requests"], 0, "{line}");
}

#[test]
fn missing_config_file_and_flags_are_reported() {
    let (code, stderr) = ember(&["--no-api", "--config-file", "/nonexistent/vm.json"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("cannot read config file /nonexistent/vm.json"),
        "{stderr}"
    );
    let (code, stderr) = ember(&["--no-api"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--config-file"), "{stderr}");
    let (code, stderr) = ember(&["--config-file", "/x.json"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--no-api"), "{stderr}");
}

#[test]
fn missing_drive_image_is_named_before_boot() {
    let json = config_with(&vmlinux(), 1, 128).replacen(
        '{',
        r#"{"drives":[{"drive_id":"data","path_on_host":"/nonexistent/data.img","is_root_device":false}],"#,
        1,
    );
    expect_config_error(
        "missing-drive",
        &json,
        &[
            "drives[data].path_on_host",
            "/nonexistent/data.img",
            "No such file",
        ],
    );
}

#[test]
fn invalid_drive_and_interface_entries_are_named() {
    let base = config_with(&vmlinux(), 1, 128);
    let json = base.replacen(
        '{',
        r#"{"drives":[{"drive_id":"a b","path_on_host":"/x","is_root_device":false}],"#,
        1,
    );
    expect_config_error("bad-drive-id", &json, &["drives[0].drive_id"]);
    let json = base.replacen(
        '{',
        r#"{"network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"zz"}],"#,
        1,
    );
    expect_config_error("bad-mac", &json, &["network-interfaces[0].guest_mac"]);
}

#[test]
fn vsock_socket_in_a_missing_directory_is_refused_before_boot() {
    let json = config_with(&vmlinux(), 1, 128).replacen(
        '{',
        "{\"vsock\":{\"guest_cid\":3,\"uds_path\":\"/nonexistent/dir/v.sock\"},",
        1,
    );
    expect_config_error(
        "vsock",
        &json,
        &[
            "vsock.uds_path",
            "/nonexistent/dir/v.sock",
            "does not exist",
        ],
    );
}

#[test]
fn vsock_reserved_cids_are_refused() {
    for cid in [0, 1, 2] {
        let json = config_with(&vmlinux(), 1, 128).replacen(
            '{',
            &format!("{{\"vsock\":{{\"guest_cid\":{cid},\"uds_path\":\"/tmp/v.sock\"}},"),
            1,
        );
        expect_config_error(&format!("vsock-cid-{cid}"), &json, &["vsock.guest_cid"]);
    }
}
