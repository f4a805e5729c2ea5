//! Client tests against fake peers: a fake hybrid-vsock socket (the VMM's side of the
//! handshake plus a scripted agent) and a fake READY call. The real agent is tested in
//! guest-init's integration tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_init::proto::{self, FrameKind, PingResponse, Ready, Request};

use super::*;

/// A directory for one test, removed when the test ends.
fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn ping_reply(boot_ms: u64) -> PingResponse {
    PingResponse {
        protocol: 1,
        version: "test".into(),
        uptime_ms: boot_ms + 5,
        boot_ms,
    }
}

/// A fake VMM vsock socket: answers each handshake with `reply`; when that is an OK, plays
/// an agent that answers one ping. Serves `connections` connections, then returns what the
/// clients asked for.
fn fake_vmm(path: &Path, reply: &'static str, connections: usize) -> JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut asked = Vec::new();
        for _ in 0..connections {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            asked.push(line);
            let mut stream = stream;
            stream.write_all(reply.as_bytes()).unwrap();
            if reply.starts_with("OK") {
                let frame = proto::read_frame(&mut reader).unwrap().unwrap();
                assert_eq!(frame.json::<Request>().unwrap(), Request::Ping {});
                proto::write_json(&mut stream, FrameKind::Response, &ping_reply(77)).unwrap();
            }
        }
        asked
    })
}

#[test]
fn vsock_handshake_then_ping() {
    let dir = temp_dir();
    let uds = dir.path().join("vm.vsock");
    let vmm = fake_vmm(&uds, "OK 1073741824\n", 1);
    let ping = AgentClient::vsock(&uds).ping().unwrap();
    assert_eq!(ping, ping_reply(77));
    assert_eq!(vmm.join().unwrap(), ["CONNECT 1024\n"]);
}

#[test]
fn refused_handshake_names_the_socket_and_the_reply() {
    let dir = temp_dir();
    let uds = dir.path().join("vm.vsock");
    let vmm = fake_vmm(&uds, "", 1);
    let err = AgentClient::vsock(&uds).ping().unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, AgentError::Handshake { port: 1024, .. }),
        "{message}"
    );
    assert!(message.contains(&uds.display().to_string()), "{message}");
    assert!(message.contains("wait-ready"), "{message}");
    assert!(message.contains("without a reply"), "{message}");
    vmm.join().unwrap();
}

#[test]
fn missing_socket_says_the_vm_may_not_run() {
    let dir = temp_dir();
    let err = connect_vsock(dir.path().join("nope.vsock"), 1024).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, AgentError::ConnectVsock { .. }), "{message}");
    assert!(
        message.contains("nope.vsock") && message.contains("VM running"),
        "{message}"
    );
    let err = connect_unix(dir.path().join("nope.sock")).unwrap_err();
    assert!(matches!(err, AgentError::ConnectUnix { .. }), "{err}");
}

#[test]
fn an_agent_that_never_answers_times_out() {
    let dir = temp_dir();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (done, wait_done) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let _ = wait_done.recv();
        drop(stream);
    });
    let client = AgentClient::unix(&path).with_timeout(Duration::from_millis(50));
    let err = client.ping().unwrap_err();
    assert!(
        matches!(err, AgentError::Timeout { op: "ping", .. }),
        "{err}"
    );
    done.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn ready_socket_path_appends_the_port() {
    assert_eq!(
        ready_socket_path(Path::new("/run/vm/v.sock")),
        PathBuf::from("/run/vm/v.sock_1025")
    );
}

/// Plays the VMM forwarding the guest's READY call, after `delay`.
fn send_ready(uds: &Path, boot_ms: u64, delay: Duration) -> JoinHandle<()> {
    let ready_path = ready_socket_path(uds);
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match UnixStream::connect(&ready_path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => panic!("no ready listener: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let ready = Ready {
            protocol: 1,
            version: "test".into(),
            boot_ms,
        };
        proto::write_json(&mut stream, FrameKind::Ready, &ready).unwrap();
    })
}

#[test]
fn wait_ready_takes_the_ready_call_and_removes_a_stale_socket() {
    let dir = temp_dir();
    let uds = dir.path().join("vm.vsock");
    // A stale socket from an earlier run is in the way.
    drop(UnixListener::bind(ready_socket_path(&uds)).unwrap());
    let vm = send_ready(&uds, 123, Duration::from_millis(50));
    assert_eq!(wait_ready(&uds, Duration::from_secs(10)).unwrap(), 123);
    vm.join().unwrap();
    assert!(!ready_socket_path(&uds).exists(), "the listener cleans up");
}

#[test]
fn wait_ready_asks_an_agent_that_is_already_up() {
    let dir = temp_dir();
    let uds = dir.path().join("vm.vsock");
    let vmm = fake_vmm(&uds, "OK 5\n", 1);
    assert_eq!(wait_ready(&uds, Duration::from_secs(10)).unwrap(), 77);
    vmm.join().unwrap();
}

#[test]
fn wait_ready_times_out_and_refuses_to_delete_other_files() {
    let dir = temp_dir();
    let uds = dir.path().join("vm.vsock");
    let err = wait_ready(&uds, Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, AgentError::ReadyTimeout { .. }), "{err}");
    std::fs::write(ready_socket_path(&uds), b"precious").unwrap();
    let err = wait_ready(&uds, Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, AgentError::ReadyListen { .. }), "{err}");
    assert_eq!(std::fs::read(ready_socket_path(&uds)).unwrap(), b"precious");
}

#[test]
fn exec_builder_fills_the_request() {
    let exec = Exec::new(["ls", "-l"])
        .env("A", "1")
        .cwd("/tmp")
        .stdin(true)
        .tty(true)
        .timeout(Duration::from_millis(1500))
        .kill_grace(Duration::from_secs(1));
    let request = exec.request();
    assert_eq!(request.argv, ["ls", "-l"]);
    assert_eq!(request.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(request.cwd.as_deref(), Some("/tmp"));
    assert!(request.stdin && request.tty);
    assert_eq!(
        (request.timeout_ms, request.kill_grace_ms),
        (Some(1500), Some(1000))
    );
}
