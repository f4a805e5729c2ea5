//! Snapshot chains and clones through real boots. A guest with a counting process, and one
//! doing port and MMIO I/O without pause, is saved, restored into a fresh ember, saved again
//! from there and restored again, three times: the same processes go on, the block device
//! answers and a file written in every cycle is still there. Then one
//! snapshot is loaded 20 times by `emberctl clone`: every clone answers through its own
//! vsock socket with its own CID, runs its own exec and keeps its own memory. The bodies run
//! where KVM can boot stock guests (`testbed::vm_test`).
//!
//! A clone's CID is checked from the host: Ember drops every packet whose source CID is not
//! the device's (see the vsock muxer), so a guest that still used the CID it was saved with
//! could not answer a single request. Its agent answering proves the guest took the new CID
//! from configuration space when it handled the transport reset.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api::agent::AgentClient;
use serde_json::Value;
use support::{
    agent_after_restore, artifacts, boot_with_agent, counter, load_body, sh, start_counter,
    wait_until, Ember,
};
use testbed::GuestSpec;

/// Clones in the clone test: 20 guests of 128 MiB.
const CLONES: usize = 20;

#[test]
fn three_snapshot_restore_cycles_in_a_row() {
    let Some(dir) = testbed::vm_test(
        "three_snapshot_restore_cycles_in_a_row",
        Duration::from_secs(3600),
    ) else {
        return;
    };
    let art = artifacts();
    let root = art.private_rootfs(&dir).unwrap();
    let uds = dir.join("v0.sock");
    let spec = GuestSpec::with_agent(&art, &root, &uds);
    let (mut vm, mut agent) = boot_with_agent(&dir, &spec, &uds);
    start_counter(&agent);
    // Port and MMIO I/O all the time (console output, block reads), so that the vCPUs are
    // paused right after such exits, whose instruction KVM finishes only on the next entry.
    sh(
        &agent,
        "setsid sh -c 'echo $$ > /tmp/io.pid; while :; do dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null; echo -n . > /dev/console; done' </dev/null >/dev/null 2>&1 &",
    );
    wait_until("the counter", Duration::from_secs(300), || {
        counter(&agent) > 5
    });
    let pid = sh(&agent, "cat /tmp/loop.pid");
    let io_pid = sh(&agent, "cat /tmp/io.pid");
    sh(&agent, "echo cycle 0 > /tmp/cycle-0");
    let mut last = counter(&agent);
    for cycle in 1..=3u64 {
        let (state, mem) = (
            dir.join(format!("c{cycle}.state")),
            dir.join(format!("c{cycle}.mem")),
        );
        vm.snapshot(&state, &mem);
        vm.kill();
        // Each cycle's guest gets a new socket and CID, as a clone would.
        let uds = dir.join(format!("v{cycle}.sock"));
        vm = Ember::spawn(&dir.join(format!("cycle-{cycle}")), &[]);
        vm.ok(
            "PUT",
            "/snapshot/load",
            load_body(&state, &mem, &uds, Some(10 + cycle)),
        );
        assert_eq!(vm.state(), "Running");
        agent = agent_after_restore(&uds, || vm.logs());
        let now = counter(&agent);
        assert!(
            now >= last,
            "cycle {cycle}: the counter went back: {last} -> {now}"
        );
        wait_until("the counter to go on", Duration::from_secs(120), || {
            counter(&agent) > now
        });
        assert_eq!(sh(&agent, "cat /tmp/loop.pid"), pid, "cycle {cycle}");
        let io_pid = io_pid.trim();
        sh(&agent, &format!("kill -0 {io_pid}"));
        // The block device still answers: no interrupt or request was lost in the cycle.
        sh(
            &agent,
            "dd if=/dev/vda of=/dev/null bs=4k count=256 iflag=direct 2>/dev/null",
        );
        let files = sh(&agent, "cat /tmp/cycle-*");
        let expected: String = (0..cycle).map(|c| format!("cycle {c}\n")).collect();
        assert_eq!(files, expected, "cycle {cycle}");
        sh(&agent, &format!("echo cycle {cycle} > /tmp/cycle-{cycle}"));
        last = counter(&agent);
    }
    assert!(
        sh(&agent, "cat /tmp/cycle-3") == "cycle 3\n" && counter(&agent) >= last,
        "the last cycle's guest"
    );
}

/// 20 guests of 128 MiB from one snapshot share its pages; what each writes is its own.
/// (A short name: the job directory holds the clones' Unix sockets, whose paths are short.)
#[test]
fn twenty_clones() {
    let Some(dir) = testbed::vm_test_with_memory("twenty_clones", Duration::from_secs(3600), 4096)
    else {
        return;
    };
    let art = artifacts();
    let root = art.private_rootfs(&dir).unwrap();
    let uds = dir.join("v.sock");
    let mut spec = GuestSpec::with_agent(&art, &root, &uds);
    // Every clone runs on the same root image: read-only, so none can damage it.
    spec.drives = vec![testbed::drive("rootfs", &root, true, true)];
    let (mut vm, agent) = boot_with_agent(&dir, &spec, &uds);
    sh(&agent, "echo from the snapshot > /tmp/base");
    let (state, mem) = (dir.join("base.state"), dir.join("base.mem"));
    vm.snapshot(&state, &mem);
    vm.kill();

    let clones = clone(&art.emberctl, &art.ember, &state, &mem, &dir.join("c"));
    assert_eq!(clones.len(), CLONES, "{clones:?}");
    let cids: HashSet<u64> = clones
        .iter()
        .map(|c| c["guest_cid"].as_u64().unwrap())
        .collect();
    let expected: HashSet<u64> = (100..100 + CLONES as u64).collect();
    assert_eq!(cids, expected, "distinct CIDs from --first-cid on");
    let pids: HashSet<u64> = clones.iter().map(|c| c["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), CLONES, "one process each");

    let agents: Vec<AgentClient> = clones
        .iter()
        .map(|c| {
            let uds = PathBuf::from(c["vsock_uds"].as_str().unwrap());
            let console = PathBuf::from(c["console"].as_str().unwrap());
            agent_after_restore(&uds, || clone_logs(&console))
        })
        .collect();
    for (i, agent) in agents.iter().enumerate() {
        let out = sh(
            agent,
            &format!("echo {i} > /tmp/me && cat /tmp/me /tmp/base"),
        );
        assert_eq!(out, format!("{i}\nfrom the snapshot\n"), "clone {i}");
    }
    // Written in every clone at the same guest path: each kept its own.
    for (i, agent) in agents.iter().enumerate() {
        assert_eq!(sh(agent, "cat /tmp/me"), format!("{i}\n"), "clone {i}");
    }
    for clone in &clones {
        let pid = clone["pid"].as_u64().unwrap().to_string();
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
}

/// Runs `emberctl clone --json` for CLONES clones with CIDs from 100; returns its list.
fn clone(emberctl: &Path, ember: &Path, state: &Path, mem: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(emberctl)
        .arg("clone")
        .args([state, mem])
        .args([
            "-n",
            &CLONES.to_string(),
            "--first-cid",
            "100",
            "--timeout",
            "600",
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--ember")
        .arg(ember)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "emberctl clone failed: {stderr}");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap().clone();
    for (i, c) in list.iter().enumerate() {
        assert_eq!(c["index"], i, "{c}");
        let sock = PathBuf::from(c["api_sock"].as_str().unwrap());
        assert_eq!(sock, dir.join(format!("clone-{i}/api.sock")));
    }
    list
}

fn clone_logs(console: &Path) -> String {
    let log = console.with_file_name("ember.log");
    format!(
        "--- {}\n{}\n--- {}\n{}",
        console.display(),
        fs::read_to_string(console).unwrap_or_default(),
        log.display(),
        fs::read_to_string(&log).unwrap_or_default()
    )
}

/// A guest saved the moment its agent is ready, with PID 1 still writing its ready line to
/// the serial console and starting its threads (not idle, as the tests above save it),
/// restores whole: PID 1 and its agent go on. Three times, from three boots. (PID 1 used to
/// write the boot-timer port after the agent's READY; restored between the two in the test
/// bed, that user-mode port write faulted and PID 1 died: see `signal_boot_complete` in
/// guest-init.)
#[test]
fn saved_as_ready() {
    let Some(dir) = testbed::vm_test("saved_as_ready", Duration::from_secs(1800)) else {
        return;
    };
    let art = artifacts();
    let root = art.private_rootfs(&dir).unwrap();
    for round in 0..3 {
        let run = dir.join(format!("r{round}"));
        fs::create_dir_all(&run).unwrap();
        let uds = run.join("v.sock");
        let mut spec = GuestSpec::with_agent(&art, &root, &uds);
        // A fatal signal in the restored guest shows its registers in the failure report.
        spec.boot_args = spec.boot_args.replace(" quiet", " print-fatal-signals=1");
        // Returns as soon as the agent has announced itself.
        let (mut vm, _) = boot_with_agent(&run, &spec, &uds);
        let (state, mem) = (run.join("s.state"), run.join("s.mem"));
        vm.snapshot(&state, &mem);
        let first_logs = vm.logs();
        vm.kill();
        let restored_uds = run.join("w.sock");
        let restored = Ember::spawn(&run.join("restored"), &[]);
        restored.ok(
            "PUT",
            "/snapshot/load",
            load_body(&state, &mem, &restored_uds, None),
        );
        let agent = agent_after_restore(&restored_uds, || {
            format!("{first_logs}\n=== restored\n{}", restored.logs())
        });
        for _ in 0..3 {
            assert_eq!(
                sh(&agent, "cat /proc/1/comm; echo alive"),
                "init\nalive\n",
                "round {round}\n{first_logs}\n=== restored\n{}",
                restored.logs()
            );
        }
    }
}

/// An ember killed (SIGKILL) while it writes a snapshot over an earlier one leaves a whole
/// pair at the paths: it loads and its guest answers, as saved first (or second, if the
/// save finished first; then, if it answered, it must be the second). The kill is sent as
/// soon as the new memory file's temporary file exists.
#[test]
fn killed_while_saving() {
    let Some(dir) = testbed::vm_test("killed_while_saving", Duration::from_secs(1800)) else {
        return;
    };
    let art = artifacts();
    let root = art.private_rootfs(&dir).unwrap();
    let uds = dir.join("v.sock");
    let mut spec = GuestSpec::with_agent(&art, &root, &uds);
    // A big guest, so that writing its memory takes a while.
    spec.mem_mib = 1024;
    let (mut vm, agent) = boot_with_agent(&dir, &spec, &uds);
    sh(&agent, "echo first > /tmp/first");
    let (state, mem) = (dir.join("s.state"), dir.join("s.mem"));
    vm.snapshot(&state, &mem);
    vm.ok("PATCH", "/vm", serde_json::json!({"state": "Resumed"}));
    sh(&agent, "echo second > /tmp/second");
    vm.ok("PATCH", "/vm", serde_json::json!({"state": "Paused"}));
    let sock = vm.sock.clone();
    let body = serde_json::json!({
        "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem,
    });
    let saving = std::thread::spawn(move || {
        api::client::ApiClient::new(&sock)
            .with_timeout(Duration::from_secs(600))
            .request("PUT", "/snapshot/create", Some(&body.to_string()))
    });
    let temporary = |name: &str| {
        fs::read_dir(&dir).unwrap().flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".{name}."))
        })
    };
    wait_until("the new memory file", Duration::from_secs(300), || {
        temporary("s.mem")
    });
    vm.kill();
    // The request ends without an answer, or with one if the save won the race; either
    // way the pair at the paths must be whole, and a save that answered is the one there.
    let saved = saving.join().unwrap().is_ok_and(|r| r.is_success());
    let restored_uds = dir.join("w.sock");
    let restored = Ember::spawn(&dir.join("restored"), &[]);
    restored.ok(
        "PUT",
        "/snapshot/load",
        load_body(&state, &mem, &restored_uds, None),
    );
    let agent = agent_after_restore(&restored_uds, || restored.logs());
    assert_eq!(sh(&agent, "cat /tmp/first"), "first\n");
    let second = sh(&agent, "cat /tmp/second 2>/dev/null || echo absent");
    if saved {
        assert_eq!(
            second, "second\n",
            "the save answered, so its pair is there"
        );
    } else {
        assert!(
            second == "absent\n" || second == "second\n",
            "a guest that is neither snapshot: {second:?}"
        );
    }
}
