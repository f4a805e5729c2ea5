#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use api::client::ApiClient;
use api::requests::VersionInfo;

use super::*;

/// A served socket whose "VMM thread" answers GetVersion and refuses everything else.
struct Served {
    _dir: tempfile::TempDir,
    path: PathBuf,
    counters: Arc<ApiCounters>,
    seen: Receiver<VmmAction>,
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let (tx, rx) = channel::<ApiRequest>();
    let (seen_tx, seen) = channel();
    let counters = Arc::new(ApiCounters::default());
    let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    spawn(bind(&path).unwrap(), tx, wake, counters.clone()).unwrap();
    std::thread::spawn(move || {
        for request in rx {
            let answer = match request.action {
                VmmAction::GetVersion => Ok(VmmData::Version(VersionInfo {
                    firecracker_version: "9.9.9".into(),
                })),
                _ => Err(Fault("InstanceStart: the VM is already running".into())),
            };
            let _ = seen_tx.send(request.action);
            let _ = request.reply.send(answer);
        }
    });
    Served {
        _dir: dir,
        path,
        counters,
        seen,
    }
}

fn raw_exchange(path: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn answers_and_faults_reach_the_client() {
    let served = serve();
    let client = ApiClient::new(&served.path);
    let version = client.request("GET", "/version", None).unwrap();
    assert_eq!(version.status, 200);
    assert_eq!(version.body, r#"{"firecracker_version":"9.9.9"}"#);
    let start = client
        .request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        )
        .unwrap();
    assert_eq!(start.status, 400);
    assert_eq!(
        start.fault_message(),
        "InstanceStart: the VM is already running"
    );
    let unknown = client.request("GET", "/balloon", None).unwrap();
    assert_eq!(
        (unknown.status, unknown.fault_message().as_str()),
        (404, "no API resource at /balloon")
    );
    assert_eq!(served.counters.failures.load(Ordering::Relaxed), 1);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let served = serve();
    let two = b"GET /version HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(&served.path, two);
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
}

#[test]
fn a_body_over_the_cap_is_refused_and_the_connection_closed() {
    let served = serve();
    let head = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        api::http::MAX_BODY_BYTES + 1
    );
    let out = raw_exchange(&served.path, head.as_bytes());
    assert!(out.starts_with("HTTP/1.1 400 Bad Request"), "{out}");
    assert!(out.contains("Connection: close"), "{out}");
    assert!(
        out.ends_with(r#"{"fault_message":"the body is 65537 bytes; the limit is 65536 bytes"}"#),
        "{out}"
    );
}

#[test]
fn malformed_http_is_a_400() {
    let served = serve();
    let out = raw_exchange(&served.path, b"NOT HTTP AT ALL\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400 Bad Request"), "{out}");
    assert!(out.contains("malformed HTTP"), "{out}");
}

#[test]
fn a_client_hanging_up_mid_body_disturbs_nothing() {
    let served = serve();
    let out = raw_exchange(
        &served.path,
        b"PUT /actions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"action_",
    );
    assert_eq!(out, "", "nothing is written to a client that left");
    assert!(served.seen.try_recv().is_err(), "no action reached the VMM");
    let client = ApiClient::new(&served.path);
    assert_eq!(client.request("GET", "/version", None).unwrap().status, 200);
    assert_eq!(served.seen.recv().unwrap(), VmmAction::GetVersion);
}

#[test]
fn a_stale_socket_is_replaced_but_a_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    drop(bind(&path).unwrap());
    assert!(bind(&path).is_ok());
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let err = bind(&file).unwrap_err().to_string();
    assert!(err.contains("exists and is not a socket"), "{err}");
}
