//! `emberctl clone` and the signals that stop it, on the real emberctl binary with stand-ins
//! for ember: no VM is involved, only emberctl's handling of the processes it starts. A
//! stand-in is this test binary run again (`stand_in` below, through a small shell script
//! that takes ember's command line): it answers on its API socket like an ember with nothing
//! configured, then either never answers `PUT /snapshot/load` (so emberctl is still cloning
//! when the test signals it) or accepts it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long anything that should happen promptly may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);
/// Set in a stand-in: `hang` (never answer the load) or `load` (accept it).
const MODE_ENV: &str = "EMBERCTL_TEST_STAND_IN_MODE";
/// Set in a stand-in: the API socket emberctl gave it.
const SOCK_ENV: &str = "EMBERCTL_TEST_STAND_IN_SOCK";

/// A stand-in for ember when run with [`MODE_ENV`] set; nothing otherwise.
#[test]
fn stand_in() {
    let Ok(mode) = std::env::var(MODE_ENV) else {
        return;
    };
    let sock = PathBuf::from(std::env::var(SOCK_ENV).unwrap());
    let dir = sock.parent().unwrap().to_path_buf();
    // The signals blocked as the program started (inherited by this thread, which has not
    // started any), for the test to check.
    write_atomically(
        &dir.join("blocked-signals"),
        &blocked_signals("thread-self"),
    );
    // Whatever becomes of the test, a stand-in does not stay for long.
    std::thread::spawn(|| {
        std::thread::sleep(PATIENCE * 2);
        std::process::exit(0);
    });
    let listener = UnixListener::bind(&sock).unwrap();
    write_atomically(&dir.join("stand-in.pid"), &std::process::id().to_string());
    for stream in listener.incoming() {
        let mut stream = stream.unwrap();
        let method = read_request(&mut stream);
        if method == "PUT" {
            write_atomically(&dir.join("loading"), "");
            if mode == "hang" {
                std::thread::sleep(PATIENCE * 4);
            }
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        } else {
            let body = r#"{"id":"anonymous-instance","state":"Not started"}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body.as_bytes()).unwrap();
        }
    }
}

/// Reads one request (head and `Content-Length` body); returns its method.
fn read_request(stream: &mut UnixStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the request ended inside its head");
        bytes.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse().unwrap());
    while bytes.len() < head_end + length {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the request ended inside its body");
        bytes.extend_from_slice(&buf[..n]);
    }
    head.split(' ').next().unwrap().to_string()
}

fn write_atomically(path: &Path, contents: &str) {
    let temp = path.with_extension("new");
    fs::write(&temp, contents).unwrap();
    fs::rename(&temp, path).unwrap();
}

/// A directory with a snapshot (any two files: stand-ins do not read them) and the script
/// emberctl runs as ember, which starts a stand-in in `mode`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(mode: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("s.state"), "state").unwrap();
        fs::write(dir.path().join("s.mem"), "memory").unwrap();
        let me = std::env::current_exe().unwrap();
        // emberctl runs `ember --api-sock PATH`.
        let script = format!(
            "#!/bin/sh\nexec env {MODE_ENV}={mode} {SOCK_ENV}=\"$2\" '{}' \
             --exact stand_in --nocapture --test-threads=1\n",
            me.display()
        );
        let ember = dir.path().join("ember");
        fs::write(&ember, script).unwrap();
        fs::set_permissions(&ember, fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn clone_dir(&self, index: u32) -> PathBuf {
        self.path("clones").join(format!("clone-{index}"))
    }

    fn emberctl_clone(&self, count: u32) -> Child {
        Command::new(env!("CARGO_BIN_EXE_emberctl"))
            .arg("clone")
            .args([self.path("s.state"), self.path("s.mem")])
            .args(["-n", &count.to_string(), "--timeout", "60"])
            .arg("--dir")
            .arg(self.path("clones"))
            .arg("--ember")
            .arg(self.path("ember"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until `count` stand-ins run and clone 0 is loading; their pids.
    fn wait_until_cloning(&self, emberctl: &mut Child, count: u32) -> Vec<u32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = emberctl.try_wait().unwrap() {
                let mut stderr = String::new();
                emberctl
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                panic!("emberctl ended ({status}) before cloning got going: {stderr}");
            }
            let pids: Vec<u32> = (0..count)
                .filter_map(|i| fs::read_to_string(self.clone_dir(i).join("stand-in.pid")).ok())
                .map(|pid| pid.parse().unwrap())
                .collect();
            if pids.len() == count as usize && self.clone_dir(0).join("loading").exists() {
                return pids;
            }
            assert!(Instant::now() < deadline, "the stand-ins did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The process's state letter from `/proc/PID/status` (`S` sleeping, `Z` zombie, ...), or
/// `None` once the process is gone.
fn process_state(pid: u32) -> Option<char> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("State:"))?;
    line["State:".len()..].trim().chars().next()
}

/// The signals a thread blocks, from `/proc/{task}/status`.
fn blocked_signals(task: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{task}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    line["SigBlk:".len()..].trim().to_string()
}

fn send(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill takes plain integers; `pid` is a positive pid of a process this test
    // started or saw started, and is not yet reaped.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

/// Signals emberctl while it waits for clone 0 to load, with 3 clones started: every
/// stand-in is gone, stderr names each, and emberctl exits with 128 plus the signal.
fn stops_every_clone_on(signal: libc::c_int, name: &str, code: i32) {
    let setup = Setup::new("hang");
    let mut emberctl = setup.emberctl_clone(3);
    let pids = setup.wait_until_cloning(&mut emberctl, 3);
    for index in 0..3 {
        // emberctl blocks the stop signals for itself; its clones must not inherit that.
        let blocked = fs::read_to_string(setup.clone_dir(index).join("blocked-signals"));
        assert_eq!(blocked.unwrap(), "0000000000000000", "clone {index}");
    }
    send(emberctl.id(), signal);
    let Output { status, stderr, .. } = emberctl.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stderr);
    assert_eq!(status.code(), Some(code), "{stderr}");
    let stopped: Vec<String> = pids
        .iter()
        .enumerate()
        .map(|(i, pid)| format!("clone {i} (pid {pid})"))
        .collect();
    let expected = format!(
        "emberctl clone: {name} before cloning finished; stopped the clones started: {}\n",
        stopped.join(", ")
    );
    assert_eq!(stderr, expected);
    for pid in pids {
        // emberctl killed and reaped them before it exited.
        assert_eq!(process_state(pid), None, "stand-in {pid} is still there");
    }
}

#[test]
fn sigint_while_cloning_stops_every_clone_started() {
    stops_every_clone_on(libc::SIGINT, "SIGINT", 130);
}

#[test]
fn sigterm_while_cloning_stops_every_clone_started() {
    stops_every_clone_on(libc::SIGTERM, "SIGTERM", 143);
}

#[test]
fn sighup_while_cloning_stops_every_clone_started() {
    stops_every_clone_on(libc::SIGHUP, "SIGHUP", 129);
}

#[test]
fn clones_that_loaded_are_left_running() {
    let setup = Setup::new("load");
    let Output {
        status,
        stdout,
        stderr,
    } = setup.emberctl_clone(2).wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    for index in 0..2 {
        let pid: u32 = fs::read_to_string(setup.clone_dir(index).join("stand-in.pid"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            stdout.contains(&format!("clone {index}: pid {pid}, ")),
            "{stdout}"
        );
        let state = process_state(pid);
        assert!(
            matches!(state, Some(s) if s != 'Z'),
            "stand-in {pid}: {state:?}"
        );
        send(pid, libc::SIGKILL);
    }
}
