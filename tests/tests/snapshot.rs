//! Snapshots through real boots: a guest with a process counting in a loop and a file in its
//! tmpfs is paused, saved with `emberctl snapshot create` (on the VMM thread, under its
//! seccomp filter), and its ember killed; a fresh `ember --api-sock` refuses a truncated and
//! a bit-flipped state file and a memory file of the wrong size, staying "Not started", then
//! loads the snapshot with a new vsock socket and resumes it: the agent answers again, the
//! counter goes on from where it was in the same process, and the file is intact. With dirty
//! page tracking, a Diff snapshot merged onto its base (`emberctl snapshot merge`) is byte
//! for byte a Full snapshot of the same moment, and restores. The bodies run where KVM can
//! boot stock guests (`testbed::vm_test`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api::agent::AgentClient;
use serde_json::{json, Value};
use support::{
    agent_after_restore, artifacts, boot_with_config, counter, emberctl_offline, load_body, sh,
    start_counter, wait_until, Ember,
};
use testbed::{Artifacts, GuestSpec};

/// Boots a guest with the agent (tracking dirty pages when `track_dirty`), starts the
/// counter and writes a file; returns the VM, its agent and the file's checksum.
fn boot_and_prepare(
    dir: &Path,
    art: &Artifacts,
    track_dirty: bool,
) -> (Ember, AgentClient, String) {
    let root = art.private_rootfs(dir).unwrap();
    let uds = dir.join("v.sock");
    let spec = GuestSpec::with_agent(art, &root, &uds);
    let mut config: Value = serde_json::from_str(&spec.config_json()).unwrap();
    config["machine-config"]["track_dirty_pages"] = json!(track_dirty);
    let (vm, agent) = boot_with_config(dir, &config.to_string(), &uds);
    start_counter(&agent);
    let sum = sh(
        &agent,
        "head -c 1000000 /dev/urandom > /tmp/data && md5sum /tmp/data",
    );
    wait_until("the counter", Duration::from_secs(300), || {
        sh(&agent, "cat /tmp/count 2>/dev/null || echo 0")
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            > 5
    });
    (vm, agent, sum)
}

/// A damaged copy of the state file: `damage` changes its bytes.
fn damaged(state: &Path, name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = fs::read(state).unwrap();
    damage(&mut bytes);
    let path = state.with_file_name(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// Damaged snapshots are refused before anything runs; the ember stays fresh.
fn damaged_snapshots_are_refused(vm: &Ember, state: &Path, mem: &Path, uds: &Path) {
    let truncated = damaged(state, "truncated.state", |b| b.truncate(b.len() - 10));
    let message = vm.refused(
        "PUT",
        "/snapshot/load",
        load_body(&truncated, mem, uds, None),
    );
    assert!(message.contains("is truncated"), "{message}");
    let flipped = damaged(state, "flipped.state", |b| {
        let middle = b.len() / 2;
        b[middle] ^= 0x10;
    });
    let message = vm.refused("PUT", "/snapshot/load", load_body(&flipped, mem, uds, None));
    assert!(message.contains("is corrupt"), "{message}");
    let short_mem = mem.with_file_name("short.mem");
    fs::write(&short_mem, b"not a memory file").unwrap();
    let message = vm.refused(
        "PUT",
        "/snapshot/load",
        load_body(state, &short_mem, uds, None),
    );
    assert!(message.contains("pass the memory file saved"), "{message}");
    // A memory file of the right size tagged for another state file: one from another
    // snapshot, or left by a save interrupted between its two renames.
    let tag = api::memfile::pair_tag(&fs::File::open(mem).unwrap()).unwrap();
    let tag = tag.expect("the memory file carries no state file tag");
    let other_mem = mem.with_file_name("other.mem");
    fs::copy(mem, &other_mem).unwrap();
    api::memfile::set_pair_tag(&fs::File::open(&other_mem).unwrap(), tag ^ 1).unwrap();
    let message = vm.refused(
        "PUT",
        "/snapshot/load",
        load_body(state, &other_mem, uds, None),
    );
    assert!(
        message.contains("was written with another state file"),
        "{message}"
    );
    fs::remove_file(&other_mem).unwrap();
    assert_eq!(vm.state(), "Not started");
    assert!(!uds.exists(), "a refused load left its vsock socket behind");
}

#[test]
fn a_restored_guest_goes_on_where_it_was() {
    let Some(dir) = testbed::vm_test(
        "a_restored_guest_goes_on_where_it_was",
        Duration::from_secs(2400),
    ) else {
        return;
    };
    let art = artifacts();
    let (mut first, agent, sum) = boot_and_prepare(&dir, &art, false);
    let pid = sh(&agent, "cat /tmp/loop.pid");
    let running = first.refused(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("x.state"), "mem_file_path": dir.join("x.mem")}),
    );
    assert!(running.contains("pause it first"), "{running}");

    let (code, _, err) = first.emberctl(&["pause"]);
    assert_eq!(code, 0, "{err}");
    a_full_disk_leaves_the_vm_paused_and_resumable(&first, &agent, &dir);

    let before = counter(&agent);
    let (code, _, err) = first.emberctl(&["pause"]);
    assert_eq!(code, 0, "{err}");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let (code, out, err) = first.emberctl(&[
        "snapshot",
        "create",
        state.to_str().unwrap(),
        mem.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", first.logs());
    assert_eq!(fs::metadata(&mem).unwrap().len(), 128 << 20);
    assert_eq!(first.state(), "Paused", "create leaves the VM paused");
    first.kill();

    let uds = dir.join("v2.sock");
    loading_paused_keeps_the_guest_still(&dir, &state, &mem);
    let mut second = Ember::spawn(&dir.join("second"), &[]);
    damaged_snapshots_are_refused(&second, &state, &mem, &uds);
    let (code, out, err) = second.emberctl(&[
        "snapshot",
        "load",
        state.to_str().unwrap(),
        mem.to_str().unwrap(),
        "--resume",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", second.logs());
    assert_eq!(second.state(), "Running");
    let again = second.refused("PUT", "/snapshot/load", load_body(&state, &mem, &uds, None));
    assert!(again.contains("fresh ember process"), "{again}");
    // Merging a diff in place onto the memory file this VM runs from would change its
    // memory under it: refused, the file untouched.
    let diff = dir.join("zeros.mem");
    fs::File::create(&diff).unwrap().set_len(128 << 20).unwrap();
    let (code, out, err) = second.emberctl(&[
        "snapshot",
        "merge",
        "--base",
        mem.to_str().unwrap(),
        "--diff",
        diff.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("is in use by a VM loaded from it"), "{err}");

    // Restored before the filters went on: every thread runs filtered, as after a boot.
    let modes = second.seccomp_modes();
    assert!(
        modes.iter().any(|(n, _)| n == "ember_vcpu0") && modes.iter().all(|(_, m)| m == "2"),
        "{modes:?}"
    );
    let agent = agent_after_restore(&uds, || second.logs());
    let after = counter(&agent);
    assert!(
        after >= before,
        "the counter went back: {before} -> {after}"
    );
    wait_until("the counter to go on", Duration::from_secs(120), || {
        counter(&agent) > after
    });
    assert_eq!(sh(&agent, "cat /tmp/loop.pid"), pid);
    assert_eq!(
        sh(&agent, "kill -0 $(cat /tmp/loop.pid) && echo alive"),
        "alive\n"
    );
    assert_eq!(sh(&agent, "md5sum /tmp/data"), sum);
    let (code, _, err) = second.emberctl(&["ctrl-alt-del"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        second.wait_exit(Duration::from_secs(300)),
        Some(0),
        "{}",
        second.logs()
    );
}

/// Snapshot create into a 8 MiB tmpfs fails for want of space: the previous file there is
/// intact, no temporary file is left, the VM is still paused, and it resumes and runs.
fn a_full_disk_leaves_the_vm_paused_and_resumable(vm: &Ember, agent: &AgentClient, dir: &Path) {
    let small = dir.join("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "ember-snapshot-test"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "cannot mount a small tmpfs (root is needed)"
    );
    let (state, mem) = (small.join("vm.state"), small.join("vm.mem"));
    fs::write(&mem, b"an older snapshot").unwrap();
    let message = vm.refused(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}),
    );
    let entries: Vec<_> = fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let older = fs::read(&mem).unwrap();
    let _ = Command::new("umount").arg(&small).status();
    assert_eq!(older, b"an older snapshot");
    assert!(
        message.contains("No space left on device") && message.contains("intact"),
        "{message}"
    );
    assert!(message.contains("the VM is still paused"), "{message}");
    assert_eq!(entries, ["vm.mem"], "only the older file is left");
    assert_eq!(vm.state(), "Paused");
    let diff = vm.refused(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": state, "mem_file_path": mem}),
    );
    assert!(
        diff.contains("needs dirty page tracking") && diff.contains("enable track_dirty_pages"),
        "{diff}"
    );
    let (code, _, err) = vm.emberctl(&["resume"]);
    assert_eq!(code, 0, "{err}");
    let now = counter(agent);
    wait_until("the counter after resume", Duration::from_secs(120), || {
        counter(agent) > now
    });
}

/// Loaded without `resume_vm`, the VM is paused and its guest does not run; its machine
/// configuration is the snapshot's. The ember is then killed before the guest ever ran, so
/// its disk is as the snapshot left it.
fn loading_paused_keeps_the_guest_still(dir: &Path, state: &Path, mem: &Path) {
    let mut paused = Ember::spawn(&dir.join("paused"), &[]);
    let uds = dir.join("v-paused.sock");
    let mut body = load_body(state, mem, &uds, None);
    body["resume_vm"] = json!(false);
    body.as_object_mut().unwrap().remove("mem_backend");
    body["mem_file_path"] = json!(mem);
    let r = paused.call("PUT", "/snapshot/load", Some(body));
    assert_eq!(r.status, 204, "{r:?}\n{}", paused.logs());
    assert_eq!(paused.state(), "Paused");
    let config: Value = serde_json::from_str(&paused.call("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 128, "{config}");
    // The restored devices, the vsock socket at its override; no boot source.
    assert_eq!(config["vsock"]["uds_path"], json!(uds), "{config}");
    assert!(config.get("boot-source").is_none(), "{config}");
    let agent = AgentClient::vsock(&uds).with_timeout(Duration::from_secs(5));
    assert!(agent.ping().is_err(), "a paused guest answered");
    paused.kill();
}

/// The first offset where files `a` and `b` differ, if any (sizes included).
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::Read;
    /// As many bytes as fit in `buf`, fewer only at the end of the file.
    fn fill(file: &mut fs::File, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..]).unwrap() {
                0 => break,
                got => n += got,
            }
        }
        n
    }
    let (mut fa, mut fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let (na, nb) = (fill(&mut fa, &mut ba), fill(&mut fb, &mut bb));
        if na != nb || ba[..na] != bb[..nb] {
            let same = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Some(offset + same as u64);
        }
        if na == 0 {
            return None;
        }
        offset += na as u64;
    }
}

fn create_snapshot(vm: &Ember, state: &Path, mem: &Path, diff: bool) {
    let mut args = vec![
        "snapshot",
        "create",
        state.to_str().unwrap(),
        mem.to_str().unwrap(),
    ];
    if diff {
        args.push("--diff");
    }
    let (code, out, err) = vm.emberctl(&args);
    assert_eq!(code, 0, "{out}{err}\n{}", vm.logs());
}

/// With dirty page tracking: full snapshot A, the guest runs and writes, then a Diff B and a
/// Full C of the same paused moment. B alone is refused at load; B merged onto a copy of A's
/// memory is byte for byte C's memory, and it restores: the guest goes on with both files.
#[test]
fn a_merged_diff_is_the_full_memory() {
    let Some(dir) = testbed::vm_test(
        "a_merged_diff_is_the_full_memory",
        Duration::from_secs(2400),
    ) else {
        return;
    };
    let art = artifacts();
    let (mut first, agent, sum) = boot_and_prepare(&dir, &art, true);
    let path = |name: &str| dir.join(name);
    let (code, _, err) = first.emberctl(&["pause"]);
    assert_eq!(code, 0, "{err}");
    create_snapshot(&first, &path("a.state"), &path("a.mem"), false);
    let (code, _, err) = first.emberctl(&["resume"]);
    assert_eq!(code, 0, "{err}");

    let more = sh(
        &agent,
        "head -c 3000000 /dev/urandom > /tmp/more && md5sum /tmp/more",
    );
    let now = counter(&agent);
    wait_until(
        "the counter after the full snapshot",
        Duration::from_secs(120),
        || counter(&agent) > now + 3,
    );
    let (code, _, err) = first.emberctl(&["pause"]);
    assert_eq!(code, 0, "{err}");
    // Let the devices settle (a closing vsock stream) before the two snapshots.
    std::thread::sleep(Duration::from_secs(2));
    create_snapshot(&first, &path("b.state"), &path("b.mem"), true);
    create_snapshot(&first, &path("c.state"), &path("c.mem"), false);
    first.kill();

    let b_meta = fs::metadata(path("b.mem")).unwrap();
    assert_eq!(b_meta.len(), 128 << 20);
    let b_bytes = std::os::unix::fs::MetadataExt::blocks(&b_meta) * 512;
    assert!(
        b_bytes > 0 && b_bytes < 64 << 20,
        "the diff holds {b_bytes} bytes of data"
    );

    let uds = dir.join("v-diff.sock");
    let fresh = Ember::spawn(&dir.join("unmerged"), &[]);
    let message = fresh.refused(
        "PUT",
        "/snapshot/load",
        load_body(&path("b.state"), &path("b.mem"), &uds, None),
    );
    assert!(
        message.contains("is a Diff snapshot") && message.contains("emberctl snapshot merge"),
        "{message}"
    );
    assert_eq!(fresh.state(), "Not started");
    drop(fresh);

    let merged = path("merged.mem");
    fs::copy(path("a.mem"), &merged).unwrap();
    let (code, out, err) = emberctl_offline(
        &art,
        &[
            "snapshot",
            "merge",
            "--base",
            merged.to_str().unwrap(),
            "--diff",
            path("b.mem").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("merged "), "{out}");
    assert_eq!(
        first_difference(&merged, &path("c.mem")),
        None,
        "the merged memory differs from the full snapshot's"
    );
    let (code, _, err) = emberctl_offline(
        &art,
        &[
            "snapshot",
            "merge",
            "--base",
            path("a.state").to_str().unwrap(),
            "--diff",
            path("b.mem").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not snapshots of the same VM"), "{err}");

    let mut second = Ember::spawn(&dir.join("merged"), &[]);
    let mut body = load_body(&path("b.state"), &merged, &uds, None);
    body["track_dirty_pages"] = json!(true);
    let r = second.call("PUT", "/snapshot/load", Some(body));
    assert_eq!(r.status, 204, "{r:?}\n{}", second.logs());
    let agent = agent_after_restore(&uds, || second.logs());
    assert_eq!(sh(&agent, "md5sum /tmp/data"), sum);
    assert_eq!(sh(&agent, "md5sum /tmp/more"), more);
    let after = counter(&agent);
    wait_until("the counter to go on", Duration::from_secs(120), || {
        counter(&agent) > after
    });
    // The restored VM tracks dirty pages too: a Diff of it is taken.
    let (code, _, err) = second.emberctl(&["pause"]);
    assert_eq!(code, 0, "{err}");
    create_snapshot(&second, &path("d.state"), &path("d.mem"), true);
    let (code, _, err) = second.emberctl(&["resume"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = second.emberctl(&["ctrl-alt-del"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        second.wait_exit(Duration::from_secs(300)),
        Some(0),
        "{}",
        second.logs()
    );
}
