//! The agent through the real VMM: a guest booted from the ext4 root with a vsock device,
//! ember-init's agent reached over Firecracker-style hybrid vsock, driven by the `api`
//! client and by `emberctl`. Each test boots one VM and runs its checks in order; the
//! bodies run where KVM can boot stock guests (`testbed::vm_test`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::agent::{AgentClient, Exec, OutputStream};
use testbed::{Artifacts, GuestSpec};

const GUEST_MEM_MIB: u32 = 1024;

/// A running VM with the agent ready, shut down (or killed) when dropped.
struct AgentVm {
    dir: PathBuf,
    uds: PathBuf,
    ember: Option<Child>,
    art: Artifacts,
}

impl AgentVm {
    fn boot(dir: &Path) -> Self {
        let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
        let root = art.private_rootfs(dir).unwrap_or_else(|e| panic!("{e}"));
        let uds = dir.join("v.sock");
        let mut spec = GuestSpec::with_agent(&art, &root, &uds);
        spec.mem_mib = GUEST_MEM_MIB;
        let config = dir.join("vm.json");
        fs::write(&config, spec.config_json()).unwrap();
        let ember = Command::new(&art.ember)
            .args(["--no-api", "--config-file"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("vm.out")).unwrap())
            .stderr(fs::File::create(dir.join("vm.err")).unwrap())
            .spawn()
            .unwrap();
        let vm = Self {
            dir: dir.to_path_buf(),
            uds,
            ember: Some(ember),
            art,
        };
        // emberctl's wait-ready: the readiness the agent announces over guest-initiated vsock.
        let ready = vm.emberctl(&["wait-ready", "--timeout", "600"]);
        assert_eq!(ready.0, 0, "wait-ready: {ready:?}\n{}", vm.console());
        let boot_ms: u64 = ready.1.trim().parse().unwrap();
        assert!(boot_ms > 0, "boot_ms");
        vm
    }

    fn client(&self) -> AgentClient {
        AgentClient::vsock(&self.uds).with_timeout(Duration::from_secs(300))
    }

    /// Runs emberctl against this VM: (exit code, stdout, stderr).
    fn emberctl(&self, args: &[&str]) -> (i32, String, String) {
        let (sub, rest) = args.split_first().unwrap();
        let out = Command::new(&self.art.emberctl)
            .arg(sub)
            .arg("--vsock")
            .arg(&self.uds)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn console(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- guest console\n{}\n--- ember stderr\n{}",
            read("vm.out"),
            read("vm.err")
        )
    }

    /// Runs `sh -c script` in the guest and returns its stdout; panics unless it exits 0.
    fn sh(&self, script: &str) -> String {
        let out = self
            .client()
            .exec_output(&Exec::new(["sh", "-c", script]))
            .unwrap();
        assert_eq!(
            out.status.code,
            Some(0),
            "{script}: {out:?}\n{}",
            self.console()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Asks the guest to power off and waits for ember to exit with 0.
    fn shutdown(mut self) {
        let (code, _, err) = self.emberctl(&["shutdown"]);
        assert_eq!(code, 0, "shutdown: {err}");
        let mut ember = self.ember.take().unwrap();
        let status = testbed::wait_with_timeout(&mut ember, Duration::from_secs(120));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "ember's exit after shutdown\n{}",
            self.console()
        );
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        if let Some(mut ember) = self.ember.take() {
            let _ = ember.kill();
            let _ = ember.wait();
        }
    }
}

/// `1\n2\n...n\n`, the output of `seq 1 n`, checked as it streams in.
struct SeqChecker {
    next: u64,
    line: Vec<u8>,
}

impl SeqChecker {
    fn new() -> Self {
        Self {
            next: 1,
            line: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                let got = std::str::from_utf8(&self.line).unwrap();
                assert_eq!(got, self.next.to_string(), "line {} of seq", self.next);
                self.next += 1;
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
    }
}

#[test]
fn exec_streams_stdin_signals_and_concurrency() {
    let Some(dir) = testbed::vm_test(
        "exec_streams_stdin_signals_and_concurrency",
        Duration::from_secs(1500),
    ) else {
        return;
    };
    let vm = AgentVm::boot(&dir);
    let client = vm.client();
    let pong = client.ping().unwrap();
    assert_eq!(pong.protocol, 1);

    // Round trip, exit codes, environment and working directory.
    let out = client
        .exec_output(
            &Exec::new([
                "sh",
                "-c",
                "echo \"$GREETING from $(pwd)\"; echo oops >&2; exit 3",
            ])
            .env("GREETING", "hello")
            .cwd("/tmp"),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from /tmp\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.status.code, Some(3));

    // ~110 MiB across both streams at once: nothing lost, order kept per stream.
    const LINES: u64 = 7_000_000;
    let mut stdout_seq = SeqChecker::new();
    let mut stderr_seq = SeqChecker::new();
    let status = client
        .exec(
            &Exec::new([
                "sh",
                "-c",
                &format!("seq 1 {LINES} & seq 1 {LINES} >&2; wait"),
            ]),
            |stream, data| {
                match stream {
                    OutputStream::Stdout => stdout_seq.feed(data),
                    OutputStream::Stderr => stderr_seq.feed(data),
                }
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(stdout_seq.next, LINES + 1, "stdout lines");
    assert_eq!(stderr_seq.next, LINES + 1, "stderr lines");

    // stdin piped through: 8 MiB in, its checksum out.
    let input: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    let running = client
        .start(&Exec::new(["sh", "-c", "cat | md5sum"]).stdin(true))
        .unwrap();
    let control = running.control();
    let feeder = {
        let input = input.clone();
        std::thread::spawn(move || control.pipe_stdin(&input[..]).unwrap())
    };
    let mut stdout = Vec::new();
    let status = running
        .wait(|stream, data| {
            if stream == OutputStream::Stdout {
                stdout.extend_from_slice(data);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(feeder.join().unwrap(), input.len() as u64);
    assert_eq!(status.code, Some(0));
    let guest_md5 = String::from_utf8(stdout).unwrap();
    assert_eq!(
        guest_md5.split_whitespace().next(),
        Some(md5_hex(&input).as_str())
    );

    // A timeout ends the process with SIGTERM and says so.
    let out = client
        .exec_output(&Exec::new(["sleep", "1000"]).timeout(Duration::from_secs(1)))
        .unwrap();
    assert_eq!((out.status.signal, out.status.timed_out), (Some(15), true));

    // A process that ignores SIGTERM is killed after the grace period.
    let out = client
        .exec_output(
            &Exec::new(["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
                .timeout(Duration::from_secs(1))
                .kill_grace(Duration::from_secs(1)),
        )
        .unwrap();
    assert_eq!((out.status.signal, out.status.timed_out), (Some(9), true));

    // A signal sent by the host reaches the running process.
    let running = client.start(&Exec::new(["sleep", "1000"])).unwrap();
    running.control().signal(9).unwrap();
    let status = running.wait(|_, _| Ok(())).unwrap();
    assert_eq!(status.signal, Some(9));

    // 64 commands at once, each on its own connection.
    let client = Arc::new(client);
    let workers: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || {
                let out = client
                    .exec_output(&Exec::new(["sh", "-c", &format!("sleep 1; echo {i}")]))
                    .unwrap();
                assert_eq!(out.status.code, Some(0));
                String::from_utf8(out.stdout).unwrap()
            })
        })
        .collect();
    for (i, worker) in workers.into_iter().enumerate() {
        assert_eq!(worker.join().unwrap(), format!("{i}\n"));
    }

    // emberctl exec streams both outputs and exits with the guest's status.
    let (code, stdout, stderr) = vm.emberctl(&[
        "exec",
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 7",
    ]);
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (7, "to-stdout\n", "to-stderr\n")
    );
    vm.shutdown();
}

#[test]
fn files_move_both_ways_intact() {
    let Some(dir) = testbed::vm_test("files_move_both_ways_intact", Duration::from_secs(600))
    else {
        return;
    };
    let vm = AgentVm::boot(&dir);
    let client = vm.client();

    // 256 MiB of pseudo-random bytes up, checked in the guest, and back down.
    let size = 256usize << 20;
    let local = dir.join("upload.bin");
    let mut data = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    fs::write(&local, &data).unwrap();
    let want = md5_hex(&data);
    drop(data);
    let written = client
        .write_file(
            "/tmp/big.bin",
            fs::File::open(&local).unwrap(),
            Default::default(),
            |_| {},
        )
        .unwrap_or_else(|e| panic!("upload: {e}\n{}", vm.console()));
    assert_eq!(written, size as u64);
    let guest_sum = vm.sh("md5sum /tmp/big.bin");
    assert_eq!(guest_sum.split_whitespace().next(), Some(want.as_str()));
    let mut back = Vec::with_capacity(size);
    client
        .read_file("/tmp/big.bin", &mut back, |_, _| {})
        .unwrap_or_else(|e| panic!("download: {e}\n{}", vm.console()));
    assert_eq!(back.len(), size);
    assert_eq!(md5_hex(&back), want);
    drop(back);

    // stat, list, mkdir, remove.
    client.mkdir("/tmp/a/b/c", true, Some(0o750)).unwrap();
    let stat = client.stat("/tmp/a/b/c").unwrap();
    assert_eq!(stat.mode & 0o777, 0o750);
    client
        .write_file("/tmp/a/b/c/f.txt", &b"hi"[..], Default::default(), |_| {})
        .unwrap();
    let names: Vec<String> = client
        .list("/tmp/a/b/c")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["f.txt"]);
    assert_eq!(client.stat("/tmp/a/b/c/f.txt").unwrap().size, 2);
    client.remove("/tmp/a", true).unwrap();
    assert!(client.stat("/tmp/a").is_err(), "removed");

    // A full filesystem: the agent's own error comes back (not a broken connection), no
    // partial file is left, and the agent goes on serving.
    vm.sh("mkdir -p /mnt/small && mount -t tmpfs -o size=1m small /mnt/small");
    let err = client
        .write_file(
            "/mnt/small/too-big.bin",
            &vec![7u8; 8 << 20][..],
            Default::default(),
            |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(vm.sh("ls -A /mnt/small"), "");
    assert_eq!(vm.sh("echo still here"), "still here\n");

    // emberctl cp, both ways.
    let small = dir.join("small.txt");
    fs::write(&small, "carried by emberctl\n").unwrap();
    let (code, _, err) = vm.emberctl(&["cp", small.to_str().unwrap(), "vm:/root/small.txt"]);
    assert_eq!(code, 0, "cp up: {err}");
    let fetched = dir.join("fetched.txt");
    let (code, _, err) = vm.emberctl(&["cp", "vm:/root/small.txt", fetched.to_str().unwrap()]);
    assert_eq!(code, 0, "cp down: {err}");
    assert_eq!(
        fs::read_to_string(&fetched).unwrap(),
        "carried by emberctl\n"
    );
    vm.shutdown();
}

#[test]
fn bad_frames_and_hangups_leave_the_agent_healthy() {
    let Some(dir) = testbed::vm_test(
        "bad_frames_and_hangups_leave_the_agent_healthy",
        Duration::from_secs(900),
    ) else {
        return;
    };
    let vm = AgentVm::boot(&dir);

    // Header: length, kind, version, reserved. Each is answered with an ERROR frame (kind 3)
    // and the connection is closed.
    let frames: [&[u8]; 4] = [
        &[5, 0, 0, 0, 1, 9, 0, 0, b'{', b'}', 0, 0, 0], // unknown version
        &[0, 0, 0x20, 0, 1, 1, 0, 0],                   // 2 MiB: over the cap
        &[2, 0, 0, 0, 42, 1, 0, 0, b'{', b'}'],         // unknown kind
        &[4, 0, 0, 0, 1, 1, 0, 0, b'n', b'o', b'p', b'e'], // not JSON
    ];
    for frame in frames {
        let mut conn = api::agent::connect_vsock(&vm.uds, api::agent::AGENT_PORT).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        conn.write_all(frame).unwrap();
        let mut reply = Vec::new();
        let _ = conn.read_to_end(&mut reply);
        assert!(reply.len() >= 8, "a reply to {frame:?}: {reply:?}");
        assert_eq!(reply[4], 3, "an ERROR frame for {frame:?}");
    }
    assert_eq!(vm.client().ping().unwrap().protocol, 1);

    // A host that hangs up mid-stream: the command is killed, the agent carries on.
    let running = vm.client().start(&Exec::new(["yes", "endless"])).unwrap();
    let mut seen = 0usize;
    let started = Instant::now();
    let _ = running.wait(|_, data| {
        seen += data.len();
        if seen > 1 << 20 {
            Err(std::io::Error::other("enough"))
        } else {
            Ok(())
        }
    });
    assert!(seen > 1 << 20, "output before the hang-up");
    let mut left = String::new();
    while started.elapsed() < Duration::from_secs(120) {
        left = vm.sh("ps | grep -c '[y]es endless' || true");
        if left.trim() == "0" {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(left.trim(), "0", "the hung-up command was killed");
    assert_eq!(vm.client().ping().unwrap().protocol, 1);
    vm.shutdown();
}

fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    writer.join().unwrap();
    child.wait().unwrap();
    out.split_whitespace().next().unwrap().to_string()
}
