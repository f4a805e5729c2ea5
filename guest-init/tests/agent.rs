//! The real agent on the host: each test starts `ember-init --agent-unix` on a socket of its
//! own and drives it with the host client (`api::agent`), or with raw frames where the test
//! is about malformed input.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::agent::{AgentClient, AgentError, ErrorCode, Exec, FileKind, OutputStream, WriteOptions};
use guest_init::proto::{self, ErrorBody, FrameKind, HEADER_LEN, MAX_PAYLOAD};

/// How long anything that should happen promptly may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// An `ember-init --agent-unix` process, killed when dropped.
struct Agent {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Agent {
    fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ember-agent-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_ember-init"))
            .arg("--agent-unix")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Self { child, dir, socket };
        let deadline = Instant::now() + PATIENCE;
        while agent.client().ping().is_err() {
            assert!(Instant::now() < deadline, "the agent did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn client(&self) -> AgentClient {
        AgentClient::unix(&self.socket)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn raw(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn sh(script: &str) -> Exec {
    Exec::new(["sh", "-c", script])
}

/// True once the process is gone (or a zombie about to be reaped by someone else).
fn gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while !gone(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Deterministic bytes that do not compress to a pattern a bug could mimic.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, 64 bit.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn ping_reports_the_protocol() {
    let agent = Agent::start("ping");
    let pong = agent.client().ping().unwrap();
    assert_eq!(pong.protocol, 1);
    assert_eq!(pong.version, env!("CARGO_PKG_VERSION"));
    assert!(pong.uptime_ms >= pong.boot_ms);
}

#[test]
fn exec_round_trip_with_env_and_cwd() {
    let agent = Agent::start("exec");
    let exec = sh("echo out; echo err >&2; echo \"$FOO|$HOME|$PATH|$(pwd)\"; exit 3")
        .env("FOO", "bar")
        .cwd(agent.dir.to_string_lossy());
    let out = agent.client().exec_output(&exec).unwrap();
    let expected = format!(
        "out\nbar|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|{}\n",
        agent.dir.display()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.status.code, out.status.signal), (Some(3), None));
    assert!(!out.status.timed_out);
}

#[test]
fn exec_without_stdin_reads_dev_null() {
    let agent = Agent::start("nostdin");
    let out = agent
        .client()
        .exec_output(&Exec::new(["wc", "-c"]))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    assert!(out.status.success());
}

#[test]
fn large_interleaved_output_keeps_order_per_stream() {
    let agent = Agent::start("bigout");
    // Both streams written at once, about 11 MiB each.
    let count = 1_500_000;
    let exec = sh(&format!("seq 1 {count} >&2 & seq 1 {count}; wait"));
    let (mut stdout, mut stderr, mut chunks) = (Vec::new(), Vec::new(), 0);
    let status = agent
        .client()
        .exec(&exec, |stream, data| {
            chunks += 1;
            match stream {
                OutputStream::Stdout => stdout.extend_from_slice(data),
                OutputStream::Stderr => stderr.extend_from_slice(data),
            }
            Ok(())
        })
        .unwrap();
    assert!(status.success());
    let expected: String = (1..=count).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 10 << 20);
    assert!(stdout == expected.as_bytes(), "stdout differs");
    assert!(stderr == expected.as_bytes(), "stderr differs");
    assert!(
        chunks > 2 * expected.len() / (64 << 10),
        "output came in frames of at most 64 KiB"
    );
}

#[test]
fn stdin_is_piped_through() {
    let agent = Agent::start("stdin");
    let input = pseudo_random(3 << 20, 7);
    let running = agent
        .client()
        .start(&Exec::new(["cat"]).stdin(true))
        .unwrap();
    let control = running.control();
    let feed = {
        let input = input.clone();
        std::thread::spawn(move || control.pipe_stdin(&input[..]).unwrap())
    };
    let mut echoed = Vec::new();
    let status = running
        .wait(|_, data| {
            echoed.extend_from_slice(data);
            Ok(())
        })
        .unwrap();
    assert_eq!(feed.join().unwrap(), input.len() as u64);
    assert!(status.success());
    assert_eq!(fnv(&echoed), fnv(&input));
    assert!(echoed == input);
}

#[test]
fn timeout_reports_the_signal() {
    let agent = Agent::start("timeout");
    let exec = Exec::new(["sleep", "1000"]).timeout(Duration::from_millis(200));
    let status = agent.client().exec_output(&exec).unwrap().status;
    assert_eq!((status.code, status.signal), (None, Some(libc_sigterm())));
    assert!(status.timed_out);
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace() {
    let agent = Agent::start("ignoreterm");
    // The timeout leaves the shell ample time to set its trap even on a loaded machine.
    let exec = sh("trap '' TERM; echo armed; while :; do sleep 0.05; done")
        .timeout(Duration::from_millis(2000))
        .kill_grace(Duration::from_millis(300));
    let out = agent.client().exec_output(&exec).unwrap();
    assert_eq!(out.stdout, b"armed\n");
    assert_eq!(out.status.signal, Some(9));
    assert!(out.status.timed_out);
}

#[test]
fn a_command_that_handles_sigterm_reports_its_code_and_the_timeout() {
    let agent = Agent::start("trapterm");
    let exec = sh("trap 'exit 7' TERM; sleep 1000 & wait").timeout(Duration::from_millis(2000));
    let status = agent.client().exec_output(&exec).unwrap().status;
    assert_eq!(
        (status.code, status.signal, status.timed_out),
        (Some(7), None, true)
    );
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn signal_frames_reach_the_process_group() {
    let agent = Agent::start("signal");
    // The background sleep is not the leader: only a signal to the group ends it.
    let running = agent
        .client()
        .start(&sh("sleep 1000 & echo $!; wait"))
        .unwrap();
    let control = running.control();
    let mut output = String::new();
    let status = running
        .wait(|_, data| {
            output.push_str(&String::from_utf8_lossy(data));
            control.signal(libc_sigterm()).map_err(io::Error::other)
        })
        .unwrap();
    assert_eq!(
        (status.signal, status.timed_out),
        (Some(libc_sigterm()), false)
    );
    let background: u32 = output.trim().parse().unwrap();
    assert!(
        wait_gone(background),
        "the signal missed the background child"
    );
}

#[test]
fn sixty_four_concurrent_execs() {
    let agent = Agent::start("concurrent");
    let client = agent.client();
    let workers: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || {
                let exec = Exec::new([
                    "sh",
                    "-c",
                    "echo out-$1; echo err-$1 >&2; exit $(($1 % 7))",
                    "sh",
                    &i.to_string(),
                ]);
                (i, client.exec_output(&exec).unwrap())
            })
        })
        .collect();
    for worker in workers {
        let (i, out) = worker.join().unwrap();
        assert_eq!(out.stdout, format!("out-{i}\n").as_bytes());
        assert_eq!(out.stderr, format!("err-{i}\n").as_bytes());
        assert_eq!(out.status.code, Some(i % 7));
    }
    assert!(client.ping().is_ok());
}

#[test]
fn large_file_round_trip() {
    let agent = Agent::start("bigfile");
    let client = agent.client();
    let data = pseudo_random((20 << 20) + 12345, 42);
    let remote = agent.path("deep/dir/blob.bin");
    let mut last_progress = 0;
    let options = WriteOptions {
        mode: Some(0o600),
        mkdirs: true,
    };
    let written = client
        .write_file(&remote, &data[..], options, |sent| last_progress = sent)
        .unwrap();
    assert_eq!(
        (written, last_progress),
        (data.len() as u64, data.len() as u64)
    );
    assert_eq!(fnv(&fs::read(&remote).unwrap()), fnv(&data));
    let stat = client.stat(&remote).unwrap();
    assert_eq!(
        (stat.kind, stat.size, stat.mode),
        (FileKind::File, data.len() as u64, 0o600)
    );
    let mut back = Vec::new();
    let mut seen = (0, 0);
    let download = client
        .read_file(&remote, &mut back, |got, size| seen = (got, size))
        .unwrap();
    assert_eq!(
        (download.bytes, download.size, download.mode),
        (data.len() as u64, data.len() as u64, 0o600)
    );
    assert_eq!(seen, (data.len() as u64, data.len() as u64));
    assert_eq!(fnv(&back), fnv(&data));
    assert!(back == data);
}

#[test]
fn an_upload_replaces_a_file_whole() {
    let agent = Agent::start("replace");
    let client = agent.client();
    let remote = agent.path("config");
    fs::write(&remote, b"old contents that are longer").unwrap();
    client
        .write_file(&remote, &b"new"[..], WriteOptions::default(), |_| {})
        .unwrap();
    assert_eq!(fs::read(&remote).unwrap(), b"new");
    assert_eq!(
        fs::metadata(&remote).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // An upload that breaks off leaves the file as it was, and no temp file.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk gone"));
            }
            self.0 -= 1;
            buf.fill(b'x');
            Ok(buf.len())
        }
    }
    let err = client
        .write_file(&remote, Failing(3), WriteOptions::default(), |_| {})
        .unwrap_err();
    assert!(matches!(err, AgentError::Local { .. }), "{err}");
    // The agent notices the hang-up and removes its temp file.
    let deadline = Instant::now() + PATIENCE;
    while fs::read_dir(&agent.dir).unwrap().count() > 2 {
        assert!(Instant::now() < deadline, "temp file left behind");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fs::read(&remote).unwrap(), b"new");
}

#[test]
fn stat_list_mkdir_remove() {
    let agent = Agent::start("fileops");
    let client = agent.client();
    let top = agent.path("top");
    client.mkdir(&format!("{top}/a/b"), true, None).unwrap();
    client
        .mkdir(&format!("{top}/c"), false, Some(0o700))
        .unwrap();
    fs::write(format!("{top}/file"), b"12345").unwrap();
    std::os::unix::fs::symlink("file", format!("{top}/link")).unwrap();
    let entries = client.list(&top).unwrap();
    let names: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        [
            ("a", FileKind::Dir),
            ("c", FileKind::Dir),
            ("file", FileKind::File),
            ("link", FileKind::Symlink)
        ]
    );
    assert_eq!(entries[1].mode, 0o700);
    assert_eq!(entries[2].size, 5);
    let stat = client.stat(&format!("{top}/file")).unwrap();
    assert_eq!((stat.kind, stat.size), (FileKind::File, 5));
    assert!(stat.mtime > 1_600_000_000);
    let code = |e: AgentError| e.code();
    assert_eq!(
        code(client.mkdir(&format!("{top}/c"), false, None).unwrap_err()),
        Some(ErrorCode::Exists)
    );
    assert_eq!(
        code(client.stat(&format!("{top}/nope")).unwrap_err()),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(client.remove(&format!("{top}/a"), false).unwrap_err()),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        code(client.stat("relative/path").unwrap_err()),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        code(client.read_file(&top, io::sink(), |_, _| {}).unwrap_err()),
        Some(ErrorCode::Invalid)
    );
    client.remove(&format!("{top}/link"), false).unwrap();
    assert!(
        Path::new(&format!("{top}/file")).exists(),
        "removing a link keeps its target"
    );
    client.remove(&top, true).unwrap();
    assert!(!Path::new(&top).exists());
}

#[test]
fn tty_exec_gets_a_terminal_and_input() {
    let agent = Agent::start("tty");
    let exec = sh("test -t 0 && test -t 1 && tty && read line && echo \"got $line\"")
        .tty(true)
        .stdin(true);
    let running = agent.client().start(&exec).unwrap();
    running.control().write_stdin(b"hello\n").unwrap();
    let mut output = Vec::new();
    let status = running
        .wait(|stream, data| {
            assert_eq!(stream, OutputStream::Stdout, "a tty has one stream");
            output.extend_from_slice(data);
            Ok(())
        })
        .unwrap();
    let text = String::from_utf8_lossy(&output);
    assert!(status.success(), "{status:?}: {text}");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("got hello"), "{text}");
}

#[test]
fn failed_starts_are_errors() {
    let agent = Agent::start("spawnfail");
    let client = agent.client();
    let code = |exec: Exec| client.exec_output(&exec).unwrap_err().code();
    assert_eq!(
        code(Exec::new(["no-such-program-ember"])),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(Exec::new(Vec::<String>::new())),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        code(Exec::new(["true"]).cwd(agent.path("missing"))),
        Some(ErrorCode::NotFound)
    );
    let relative = Exec::new(["true"]).cwd("relative");
    assert_eq!(code(relative), Some(ErrorCode::Invalid));
    let nul = Exec::new(["true"]).env("NUL\0KEY", "x");
    assert_eq!(code(nul), Some(ErrorCode::Invalid));
    let not_executable = agent.path("script");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    assert_eq!(
        code(Exec::new([not_executable])),
        Some(ErrorCode::Permission)
    );
    assert_eq!(
        client.shutdown().unwrap_err().code(),
        Some(ErrorCode::Invalid),
        "not PID 1"
    );
}

/// Sends raw bytes, returns the ERROR frame the agent answers with, and checks that the
/// agent then closes the connection.
fn error_for(agent: &Agent, bytes: &[u8], half_close: bool) -> ErrorBody {
    let mut stream = agent.raw();
    stream.write_all(bytes).unwrap();
    if half_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let frame = proto::read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(frame.kind, FrameKind::Error);
    assert!(
        proto::read_frame(&mut stream).unwrap().is_none(),
        "the agent closes after ERROR"
    );
    frame.json().unwrap()
}

fn header(len: u32, kind: u8, version: u8, reserved: u16) -> Vec<u8> {
    let mut bytes = len.to_le_bytes().to_vec();
    bytes.extend([kind, version]);
    bytes.extend(reserved.to_le_bytes());
    bytes
}

fn request_frame(json: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    proto::write_frame(&mut bytes, FrameKind::Request, json.as_bytes()).unwrap();
    bytes
}

#[test]
fn malformed_frames_get_an_error_and_the_agent_keeps_serving() {
    let agent = Agent::start("malformed");
    let cases: [(&str, Vec<u8>, bool, ErrorCode); 8] = [
        (
            "version",
            header(0, 1, 2, 0),
            false,
            ErrorCode::UnsupportedVersion,
        ),
        ("reserved", header(0, 1, 1, 1), false, ErrorCode::Protocol),
        ("kind", header(0, 42, 1, 0), false, ErrorCode::Protocol),
        // Only the header is sent: the answer must not wait for 4 GiB of payload.
        (
            "oversized",
            header(u32::MAX, 1, 1, 0),
            false,
            ErrorCode::Protocol,
        ),
        ("short header", vec![1, 0, 0], true, ErrorCode::Protocol),
        (
            "not a request",
            header(0, FrameKind::Stdin as u8, 1, 0),
            false,
            ErrorCode::Protocol,
        ),
        (
            "bad json",
            request_frame("{\"op\":"),
            false,
            ErrorCode::Invalid,
        ),
        (
            "unknown op",
            request_frame("{\"op\":\"format\"}"),
            false,
            ErrorCode::Invalid,
        ),
    ];
    for (name, bytes, half_close, code) in cases {
        let body = error_for(&agent, &bytes, half_close);
        assert_eq!(body.code, code, "{name}: {}", body.message);
        assert!(
            agent.client().ping().is_ok(),
            "the agent still serves after {name}"
        );
    }
    let oversized = error_for(&agent, &header(MAX_PAYLOAD as u32 + 1, 1, 1, 0), false);
    assert!(
        oversized.message.contains("exceeds"),
        "{}",
        oversized.message
    );
    assert_eq!(HEADER_LEN, 8);
}

#[test]
fn a_bad_frame_during_exec_ends_it_with_an_error() {
    let agent = Agent::start("badexecframe");
    let mut stream = agent.raw();
    stream
        .write_all(&request_frame(r#"{"op":"exec","argv":["sleep","1000"]}"#))
        .unwrap();
    let started = proto::read_frame(&mut stream).unwrap().unwrap();
    let pid: serde_json::Value = started.json().unwrap();
    let pid = pid["started"]["pid"].as_u64().unwrap() as u32;
    proto::write_frame(&mut stream, FrameKind::Data, b"nonsense").unwrap();
    let error = proto::read_frame(&mut stream).unwrap().unwrap();
    assert_eq!(error.kind, FrameKind::Error);
    assert_eq!(error.json::<ErrorBody>().unwrap().code, ErrorCode::Protocol);
    assert!(wait_gone(pid), "the command was killed");
    assert!(
        proto::read_frame(&mut stream).unwrap().is_none(),
        "nothing after ERROR"
    );
}

#[test]
fn host_disconnect_kills_a_silent_command_and_its_children() {
    let agent = Agent::start("hangup");
    let running = agent
        .client()
        .start(&sh("sleep 1000 & echo $!; wait"))
        .unwrap();
    let leader = running.pid();
    let mut grandchild = String::new();
    let err = running
        .wait(|_, data| {
            grandchild.push_str(&String::from_utf8_lossy(data));
            Err(io::Error::other("enough"))
        })
        .unwrap_err();
    assert!(matches!(err, AgentError::Local { .. }), "{err}");
    let grandchild: u32 = grandchild.trim().parse().unwrap();
    assert!(wait_gone(leader), "the command outlived the connection");
    assert!(
        wait_gone(grandchild),
        "its background child outlived the connection"
    );
    assert!(agent.client().ping().is_ok());
}

#[test]
fn host_disconnect_mid_stream_kills_a_chatty_command() {
    let agent = Agent::start("hangupstream");
    let running = agent.client().start(&Exec::new(["yes", "ember"])).unwrap();
    let pid = running.pid();
    let mut received = 0;
    let _ = running.wait(|_, data| {
        received += data.len();
        if received > 1 << 20 {
            return Err(io::Error::other("enough"));
        }
        Ok(())
    });
    assert!(wait_gone(pid), "yes kept running");
    let out = agent
        .client()
        .exec_output(&Exec::new(["echo", "still here"]))
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
}

/// The pids of zombie processes whose parent is `parent`.
fn zombie_children(parent: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str()) {
            zombies.push(pid);
        }
    }
    zombies
}

#[test]
fn orphans_are_reaped_without_stealing_exit_statuses() {
    // The standalone agent is a child subreaper: the background children below are orphaned
    // to it, as they would be to PID 1 in a guest, and its one reaper must collect them while
    // each command still gets its own status.
    let agent = Agent::start("orphans");
    let client = agent.client();
    let workers: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || {
                let script = "for n in 1 2 3; do (sleep 0.0$n; exit 9) & done; exit $1";
                let exec = Exec::new(["sh", "-c", script, "sh", &i.to_string()]);
                (i, client.exec_output(&exec).unwrap().status)
            })
        })
        .collect();
    for worker in workers {
        let (i, status) = worker.join().unwrap();
        assert_eq!((status.code, status.signal), (Some(i), None));
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let zombies = zombie_children(agent.child.id());
        if zombies.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "unreaped orphans: {zombies:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
