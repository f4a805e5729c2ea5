//! Hostile API clients against a real `ember --api-sock` process: garbage, malformed and
//! oversized HTTP, bodies that are not what the path wants, pipelining, clients that hang
//! up mid-request, a slow-loris client, and hundreds of idle connections. Each bad request
//! gets a 4xx with a `{"fault_message": ...}` body or its connection closed, and the API
//! still answers a normal request afterwards. No guest boots, so these run on the host.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::http::Connection;
use serde_json::Value;
use support::Ember;

/// Generous: only a server that never answers reaches it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The server's limit on connections served at once (vmm::rpc::connections).
const MAX_CONNECTIONS: usize = 32;

fn scratch(name: &str) -> PathBuf {
    let dir = testbed::repo_root()
        .join("target/testbed/hostile-api")
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(name: &str) -> Ember {
    let ember = testbed::ember_binary().unwrap_or_else(|e| panic!("{e}"));
    Ember::start(&ember, &scratch(name), &[], None)
}

fn connect(vm: &Ember) -> UnixStream {
    let stream = UnixStream::connect(&vm.sock).unwrap();
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    stream
}

/// What came back for a request.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A response: status and body.
    Response(u16, String),
    /// The connection closed without a response.
    Closed,
}

/// Reads one response, or sees the connection close.
fn read_answer(conn: &mut Connection<UnixStream>) -> Answer {
    match conn.read_response() {
        Ok((status, body)) => Answer::Response(status, String::from_utf8_lossy(&body).into()),
        Err(e) if e.is_disconnect() => Answer::Closed,
        Err(e) => panic!("not an HTTP response: {e}"),
    }
}

/// Sends `bytes` (from a thread, since the server may stop reading), then half-closes if
/// `hang_up`; returns the answer.
fn exchange(vm: &Ember, bytes: Vec<u8>, hang_up: bool) -> Answer {
    let stream = connect(vm);
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // The server may close before taking everything: that is its answer to judge.
        let _ = writer.write_all(&bytes);
        if hang_up {
            let _ = writer.shutdown(std::net::Shutdown::Write);
        }
    });
    let answer = read_answer(&mut Connection::new(stream));
    sender.join().unwrap();
    answer
}

/// The answer must be `status` with Firecracker's fault body.
fn assert_fault(case: &str, answer: &Answer, status: u16) {
    let Answer::Response(got, body) = answer else {
        panic!("{case}: no response, the connection closed");
    };
    assert_eq!(*got, status, "{case}: {body}");
    let fault: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{case}: the body is not JSON ({e}): {body}"));
    let message = fault["fault_message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{case}: no fault_message in {body}");
}

/// A normal request still gets its normal answer.
fn assert_serves(vm: &Ember, case: &str) {
    let request = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec();
    match exchange(vm, request, false) {
        Answer::Response(200, body) => assert!(body.contains("\"app_name\""), "{case}: {body}"),
        other => panic!("{case}: then GET / got {other:?}\n{}", vm.logs()),
    }
}

/// A request with a body and its Content-Length.
fn with_body(method: &str, path: &str, body: &str) -> Vec<u8> {
    with_raw_body(method, path, body.as_bytes())
}

fn with_raw_body(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// Bytes from a fixed seed, every value possible.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Fault(u16),
    Closed,
}

#[test]
fn garbage_and_malformed_requests_get_a_fault_or_are_closed_and_the_api_goes_on() {
    let vm = start("garbage");
    let mut huge_header = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge_header.extend(b"\r\n\r\n");
    let many_headers: String = (0..100).map(|i| format!("X-{i}: {i}\r\n")).collect();
    // (case, bytes, hang up after sending, what must come back)
    let cases: Vec<(&str, Vec<u8>, bool, Expect)> = vec![
        ("random bytes", random_bytes(4096), true, Expect::Fault(400)),
        ("random bytes ending a head", [random_bytes(300), b"\r\n\r\n".to_vec()].concat(), false, Expect::Fault(400)),
        ("a request line without a version", b"GET /\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a request line of one word", b"HELLO\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("HTTP/2's preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a 1 MiB header", huge_header, false, Expect::Fault(400)),
        ("100 headers", format!("GET / HTTP/1.1\r\n{many_headers}\r\n").into_bytes(), false, Expect::Fault(400)),
        ("a header without a colon", b"GET / HTTP/1.1\r\nNoColon\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a NUL in the path", b"GET /\0 HTTP/1.1\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a head cut off by a hang-up", b"PUT /machine-config HTTP/1.1\r\nContent-Le".to_vec(), true, Expect::Fault(400)),
        ("a body shorter than its Content-Length, then a hang-up", b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu".to_vec(), true, Expect::Closed),
        ("a Content-Length of 10 GiB", b"PUT /machine-config HTTP/1.1\r\nContent-Length: 10737418240\r\n\r\n{}".to_vec(), false, Expect::Fault(400)),
        ("a Content-Length past u64", b"PUT /machine-config HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a negative Content-Length", b"PUT /machine-config HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("two different Content-Lengths", b"PUT /machine-config HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(), false, Expect::Fault(400)),
        ("a chunked body", b"PUT /machine-config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a body that is not JSON", with_body("PUT", "/machine-config", "vcpu_count=2"), false, Expect::Fault(400)),
        ("a body of random bytes", with_raw_body("PUT", "/boot-source", &random_bytes(64)), false, Expect::Fault(400)),
        ("JSON that is an array", with_body("PUT", "/machine-config", "[1, 2]"), false, Expect::Fault(400)),
        ("a field of the wrong type", with_body("PUT", "/machine-config", r#"{"vcpu_count": "two", "mem_size_mib": 128}"#), false, Expect::Fault(400)),
        ("an unknown field", with_body("PATCH", "/machine-config", r#"{"vcpus": 2}"#), false, Expect::Fault(400)),
        ("an unknown action", with_body("PUT", "/actions", r#"{"action_type": "Explode"}"#), false, Expect::Fault(400)),
        ("deeply nested JSON", with_body("PUT", "/machine-config", &format!("{}{}", "[".repeat(5000), "]".repeat(5000))), false, Expect::Fault(400)),
        ("an unknown path", b"GET /no/such/thing HTTP/1.1\r\n\r\n".to_vec(), false, Expect::Fault(404)),
        ("an unknown method", b"BREW / HTTP/1.1\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a known path with the wrong method", b"DELETE /machine-config HTTP/1.1\r\n\r\n".to_vec(), false, Expect::Fault(400)),
        ("a hang-up mid request line", b"GET /mach".to_vec(), true, Expect::Fault(400)),
        ("a hang-up before a byte", Vec::new(), true, Expect::Closed),
    ];
    for (case, bytes, hang_up, expect) in cases {
        let answer = exchange(&vm, bytes, hang_up);
        match expect {
            Expect::Fault(status) => assert_fault(case, &answer, status),
            Expect::Closed => assert_eq!(answer, Answer::Closed, "{case}"),
        }
        assert_serves(&vm, case);
    }
    // Nothing above configured anything.
    let config = vm.call("GET", "/machine-config", None);
    assert!(config.body.contains("\"vcpu_count\":1"), "{config:?}");
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let vm = start("pipelined");
    let mut requests = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    requests.extend(with_body(
        "PATCH",
        "/machine-config",
        r#"{"vcpu_count": 2}"#,
    ));
    requests.extend(b"GET /machine-config HTTP/1.1\r\n\r\nNOT HTTP\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    let stream = connect(&vm);
    let mut writer = stream.try_clone().unwrap();
    writer.write_all(&requests).unwrap();
    let mut conn = Connection::new(stream);
    let answers: Vec<Answer> = (0..5).map(|_| read_answer(&mut conn)).collect();
    assert!(
        matches!(&answers[0], Answer::Response(200, b) if b.contains("app_name")),
        "{answers:?}"
    );
    assert_eq!(answers[1], Answer::Response(204, String::new()));
    assert!(
        matches!(&answers[2], Answer::Response(200, b) if b.contains("\"vcpu_count\":2")),
        "{answers:?}"
    );
    assert_fault("the garbage after them", &answers[3], 400);
    assert_eq!(
        answers[4],
        Answer::Closed,
        "a malformed request ends the connection"
    );
    assert_serves(&vm, "after pipelining");
}

/// Writes `bytes` of a request one at a time, calling `between` after each byte but the
/// last; returns the answer to the whole request.
fn dribble(vm: &Ember, bytes: &[u8], mut between: impl FnMut(usize)) -> Answer {
    let stream = connect(vm);
    let mut writer = stream.try_clone().unwrap();
    for (i, byte) in bytes.iter().enumerate() {
        writer.write_all(&[*byte]).unwrap();
        if i + 1 < bytes.len() {
            between(i);
        }
    }
    read_answer(&mut Connection::new(stream))
}

#[test]
fn a_slow_loris_client_does_not_hold_up_others_and_is_served_in_the_end() {
    let vm = start("slow-loris");
    // One client connects and sends nothing at all the whole time.
    let mut silent = connect(&vm);
    // Another sends its request a byte at a time; between its bytes, other clients are
    // served, each while both slow connections are open and their requests incomplete.
    let request = b"GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut served = 0;
    let answer = dribble(&vm, request, |i| {
        if i % 8 == 0 {
            assert_serves(&vm, &format!("with {i} bytes of a slow request sent"));
            served += 1;
        }
    });
    assert!(served >= 8);
    assert!(
        matches!(&answer, Answer::Response(200, b) if b.contains("firecracker_version")),
        "{answer:?}"
    );
    // The silent client's connection is still there, and a request on it is answered.
    silent
        .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut Connection::new(silent.try_clone().unwrap()));
    assert!(matches!(answer, Answer::Response(200, _)), "{answer:?}");
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
}

/// Ember's open file descriptors.
fn open_fds(vm: &Ember) -> usize {
    fs::read_dir(format!("/proc/{}/fd", vm.pid()))
        .unwrap()
        .count()
}

#[test]
fn hundreds_of_idle_connections_neither_stop_service_nor_exhaust_fds() {
    const IDLE: usize = 200;
    let vm = start("idle-flood");
    let baseline = open_fds(&vm);
    // Idle in every way: connected only, half a request line, a head without its body.
    let partials: [&[u8]; 3] = [
        b"",
        b"GET /machine-con",
        b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{",
    ];
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let mut stream = connect(&vm);
        stream.write_all(partials[i % 3]).unwrap();
        idle.push(stream);
    }
    // All are open on our side; Ember serves new clients at once.
    for round in 0..5 {
        assert_serves(&vm, &format!("round {round} with {IDLE} idle connections"));
    }
    let fds = open_fds(&vm);
    assert!(
        fds <= baseline + MAX_CONNECTIONS + 4,
        "{fds} fds open, {baseline} before the idle clients"
    );
    // The idle connections beyond the limit were closed, oldest first, to make room.
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let closed = |idle: &mut [UnixStream]| {
        let mut count = 0;
        for stream in idle {
            stream.set_nonblocking(true).unwrap();
            if matches!(stream.read(&mut [0u8; 1]), Ok(0)) {
                count += 1;
            }
        }
        count
    };
    let mut count = closed(&mut idle);
    while count < IDLE - MAX_CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "only {count} idle connections closed"
        );
        std::thread::sleep(Duration::from_millis(50));
        count = closed(&mut idle);
    }
    assert!(count <= IDLE, "{count}");
    drop(idle);
    assert_serves(&vm, "after the idle clients left");
}
