//! Hostile peers at run time, against one booted guest (agent, virtio-net on a TAP, vsock):
//! the TAP deleted while the guest sends through it, host clients that vanish mid-exec and
//! mid-upload, and a flood of vsock connections. After each step ember still runs, the agent
//! answers, and nothing is left behind (processes, temporary files, threads, descriptors).
//! Malformed agent frames and a hang-up during streamed output are covered in `agent.rs`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use api::agent::{AgentClient, Exec};
use serde_json::{json, Value};
use support::{sh, wait_until, Ember};
use testbed::GuestSpec;

const TAP: &str = "htap0";
/// Host connections the flood opens at once: more than ember serves (256).
const FLOOD: usize = 300;

/// A network namespace with the TAP in it, deleted when dropped.
struct Netns(String);

impl Netns {
    fn with_tap() -> Self {
        let ns = Self(format!("ember-hostile-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        for args in [
            &["tuntap", "add", "dev", TAP, "mode", "tap"][..],
            &["addr", "add", "172.16.0.1/24", "dev", TAP],
            &["link", "set", TAP, "up"],
        ] {
            ip(&[&["netns", "exec", &ns.0, "ip"][..], args].concat());
        }
        ns
    }

    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.0]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hostile_peers() {
    let Some(dir) = testbed::vm_test("hostile_peers", Duration::from_secs(1800)) else {
        return;
    };
    let art = support::artifacts();
    let netns = Netns::with_tap();
    let root = art.private_rootfs(&dir).unwrap_or_else(|e| panic!("{e}"));
    let uds = dir.join("v.sock");
    let mut spec = GuestSpec::with_agent(&art, &root, &uds);
    spec.boot_args = format!(
        "ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off {}",
        spec.boot_args
    );
    spec.nets.push(json!(
        {"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:ac:10:00:02"}
    ));
    let mut config: Value = serde_json::from_str(&spec.config_json()).unwrap();
    let metrics = dir.join("metrics.json");
    config["metrics"] = json!({"metrics_path": metrics});
    let (mut vm, agent) = support::boot_wrapped(&dir, &config.to_string(), &uds, &netns.wrapper());

    tap_deleted_under_traffic(&mut vm, &agent, &netns, &metrics);
    client_gone_mid_exec(&mut vm, &agent);
    client_gone_mid_upload(&mut vm, &agent);
    connection_flood(&mut vm, &agent, &uds);

    assert!(
        !fs::read_to_string(vm.dir.join("vm.err"))
            .unwrap()
            .contains("panick"),
        "{}",
        vm.logs()
    );
    agent.shutdown().unwrap();
    assert_eq!(
        vm.wait_exit(Duration::from_secs(300)),
        Some(0),
        "{}",
        vm.logs()
    );
}

/// The TAP is deleted while the guest pings through it: ember logs one warning naming it,
/// drops and counts the guest's frames, does not spin on the dead descriptor, and the agent
/// goes on answering.
fn tap_deleted_under_traffic(vm: &mut Ember, agent: &AgentClient, netns: &Netns, metrics: &Path) {
    sh(agent, "ping -c 2 -W 10 172.16.0.1");
    sh(
        agent,
        "setsid sh -c 'echo $$ > /tmp/pinger.pid; while :; do ping -c 1 -W 1 172.16.0.1; \
         sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
    );
    let sent_before = tx_counts(vm, metrics);
    assert!(sent_before.0 > 0, "frames sent before: {sent_before:?}");
    let vmm_cpu_before = vmm_thread_cpu_over(vm, Duration::from_secs(5));

    ip(&["netns", "exec", &netns.0, "ip", "link", "del", TAP]);
    let warning = format!("TAP {TAP} is gone");
    wait_until(
        "ember's warning about the TAP",
        Duration::from_secs(120),
        || {
            fs::read_to_string(vm.dir.join("vm.err"))
                .unwrap()
                .contains(&warning)
        },
    );
    let dropped_then = tx_counts(vm, metrics).1;
    wait_until(
        "the guest's frames to be dropped and counted",
        Duration::from_secs(120),
        || tx_counts(vm, metrics).1 > dropped_then,
    );
    // A VMM thread woken again and again by the dead descriptor's error state would use a
    // whole CPU; one that stopped watching it is as idle as before.
    let vmm_cpu_after = vmm_thread_cpu_over(vm, Duration::from_secs(5));
    assert!(
        vmm_cpu_after < 0.5,
        "the VMM thread used {:.0}% of a CPU after the TAP went ({:.0}% before)",
        vmm_cpu_after * 100.0,
        vmm_cpu_before * 100.0
    );
    let log = fs::read_to_string(vm.dir.join("vm.err")).unwrap();
    assert_eq!(log.matches(&warning).count(), 1, "one warning:\n{log}");
    assert!(vm.is_running(), "{}", vm.logs());
    assert_eq!(sh(agent, "echo alive"), "alive\n");
    sh(agent, "kill -9 -$(cat /tmp/pinger.pid)");
}

/// (tx_frames, tx_dropped) of eth0 from a metrics line written now.
fn tx_counts(vm: &Ember, metrics: &Path) -> (u64, u64) {
    vm.ok("PUT", "/actions", json!({"action_type": "FlushMetrics"}));
    let text = fs::read_to_string(metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let eth0 = &line["devices"]["net"]["eth0"];
    (
        eth0["tx_frames"].as_u64().unwrap(),
        eth0["tx_dropped"].as_u64().unwrap(),
    )
}

/// The share of one CPU that ember's VMM thread (the event loop: its main thread) used over
/// `window`.
fn vmm_thread_cpu_over(vm: &Ember, window: Duration) -> f64 {
    let pid = vm.pid();
    let ticks = || {
        let stat = fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap();
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the state.
        fields[10] + fields[11]
    };
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (before, start) = (ticks(), Instant::now());
    std::thread::sleep(window);
    (ticks() - before) as f64 / hz / start.elapsed().as_secs_f64()
}

/// The host hangs up on a long, silent command: its whole group is killed and reaped.
fn client_gone_mid_exec(vm: &mut Ember, agent: &AgentClient) {
    let running = agent
        .start(&Exec::new(["sh", "-c", "sleep 1001 & sleep 1002; wait"]))
        .unwrap();
    // Processes whose whole command line is `sleep 1001` or `sleep 1002` (not the shell,
    // whose command line names them too).
    let sleepers = || {
        sh(
            agent,
            "for p in /proc/[0-9]*; do tr '\\000' ' ' < $p/cmdline 2>/dev/null; echo; done \
             | grep -cx 'sleep 100[12] ' || true",
        )
        .trim()
        .to_string()
    };
    wait_until("the command to run", Duration::from_secs(120), || {
        sleepers() == "2"
    });
    drop(running);
    wait_until(
        "the command's group to be killed",
        Duration::from_secs(120),
        || sleepers() == "0",
    );
    wait_until("no zombies in the guest", Duration::from_secs(60), || {
        sh(
            agent,
            "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l",
        )
        .trim()
            == "0"
    });
    assert!(vm.is_running(), "{}", vm.logs());
}

/// Yields `limit` bytes, then fails, as a host process that dies mid-upload.
struct BreaksOff {
    left: usize,
}

impl Read for BreaksOff {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("the uploading process died"));
        }
        let n = buf.len().min(self.left);
        buf[..n].fill(0xab);
        self.left -= n;
        Ok(n)
    }
}

/// The host goes away mid-upload: the earlier file stays as it was, the temporary file is
/// removed, and the next upload works.
fn client_gone_mid_upload(vm: &mut Ember, agent: &AgentClient) {
    let put = |data: &[u8]| {
        agent
            .write_file("/tmp/up/f.bin", data, Default::default(), |_| {})
            .unwrap()
    };
    sh(agent, "mkdir -p /tmp/up");
    put(b"old\n");
    let err = agent
        .write_file(
            "/tmp/up/f.bin",
            BreaksOff { left: 16 << 20 },
            Default::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("died"), "{err}");
    wait_until("the temporary file to go", Duration::from_secs(120), || {
        sh(agent, "ls -A /tmp/up") == "f.bin\n"
    });
    assert_eq!(sh(agent, "cat /tmp/up/f.bin"), "old\n");
    assert_eq!(put(b"new\n"), 4);
    assert_eq!(sh(agent, "cat /tmp/up/f.bin"), "new\n");
    assert!(vm.is_running(), "{}", vm.logs());
}

/// How a flood connection's handshake ended.
#[derive(Debug, Default)]
struct FloodOutcome {
    accepted: usize,
    refused: usize,
    hung: usize,
}

/// `FLOOD` host clients ask for the agent's port at once and hold on. Those ember serves get
/// `OK`; the rest are refused (closed before any reply), none hangs; ember stays within its
/// descriptors; once they go, the agent answers and no guest threads or host descriptors
/// are left.
fn connection_flood(vm: &mut Ember, agent: &AgentClient, uds: &Path) {
    let pid = vm.pid();
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let guest_threads = || {
        sh(agent, "ls /proc/1/task | wc -l")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let (fds_before, threads_before) = (fds(), guest_threads());

    let mut streams = Vec::new();
    for _ in 0..FLOOD {
        let mut s = UnixStream::connect(uds).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        streams.push(s);
    }
    let mut outcome = FloodOutcome::default();
    for s in &mut streams {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut reply = [0u8; 3];
        match s.read(&mut reply) {
            Ok(n) if reply[..n].starts_with(b"OK") => outcome.accepted += 1,
            Ok(0) => outcome.refused += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => outcome.refused += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => outcome.hung += 1,
            other => panic!("a flood client read {other:?}"),
        }
    }
    let limit = limit_nofile(pid);
    let fds_during = fds();
    eprintln!(
        "flood of {FLOOD}: {outcome:?}; ember fds {fds_before} -> {fds_during} (limit {limit})"
    );
    assert_eq!(outcome.hung, 0, "{outcome:?}");
    assert!(
        outcome.accepted > 0 && outcome.accepted <= 256,
        "{outcome:?}"
    );
    assert!(outcome.refused >= FLOOD - 256, "{outcome:?}");
    assert!(fds_during < limit, "{fds_during} fds, limit {limit}");
    assert!(vm.is_running(), "{}", vm.logs());
    // A request now is answered or refused at once (ember's table may be full), never left
    // hanging.
    let during = AgentClient::vsock(uds)
        .with_timeout(Duration::from_secs(120))
        .ping();
    eprintln!("ping during the flood: {during:?}");
    if let Err(e) = during {
        let e = e.to_string();
        assert!(e.contains("closed the connection without a reply"), "{e}");
    }

    drop(streams);
    wait_until(
        "the agent to answer after the flood",
        Duration::from_secs(300),
        || agent.ping().is_ok(),
    );
    wait_until(
        "the guest's agent threads to end",
        Duration::from_secs(120),
        || guest_threads() <= threads_before,
    );
    wait_until(
        "ember's descriptors to be closed",
        Duration::from_secs(120),
        || fds() <= fds_before,
    );
    assert!(vm.is_running(), "{}", vm.logs());
}

/// The soft limit on open files of process `pid`.
fn limit_nofile(pid: u32) -> usize {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}
