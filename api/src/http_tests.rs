#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Cursor;

use super::*;

/// A stream that reads from fixed input and records what is written.
struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn conn(input: &[u8]) -> Connection<Pipe> {
    Connection::new(Pipe {
        input: Cursor::new(input.to_vec()),
        output: Vec::new(),
    })
}

#[test]
fn keep_alive_requests_are_read_in_turn() {
    let mut c = conn(
        b"PUT /actions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /vm/config?x=1 HTTP/1.1\r\n\r\n",
    );
    let first = c.read_request().unwrap();
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("PUT", "/actions")
    );
    assert_eq!(first.body, b"{}");
    assert!(!first.close);
    let second = c.read_request().unwrap();
    assert_eq!(
        (second.method.as_str(), second.path.as_str()),
        ("GET", "/vm/config")
    );
    assert!(second.body.is_empty());
    assert!(matches!(c.read_request(), Err(HttpError::Closed)));
}

#[test]
fn connection_close_is_noticed() {
    let mut c = conn(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(c.read_request().unwrap().close);
    let mut c = conn(b"GET / HTTP/1.0\r\n\r\n");
    assert!(c.read_request().unwrap().close);
}

#[test]
fn body_over_the_cap_is_refused_before_reading_it() {
    let head = format!(
        "PUT /drives/a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    let err = conn(head.as_bytes()).read_request().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the body is 65537 bytes; the limit is 65536 bytes"
    );
    assert!(!err.is_disconnect());
}

#[test]
fn malformed_requests_are_refused() {
    let cases: [(&[u8], &str); 5] = [
        (b"GARBAGE\r\n\r\n", "malformed HTTP: "),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", "malformed HTTP: "),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
            "malformed HTTP: Content-Length \"ten\" is not a number",
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "malformed HTTP: Transfer-Encoding is not supported; send Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "malformed HTTP: conflicting Content-Length",
        ),
    ];
    for (input, expected) in cases {
        let err = conn(input).read_request().unwrap_err();
        assert!(!err.is_disconnect(), "{expected}");
        assert!(err.to_string().starts_with(expected), "{expected}: {err}");
    }
}

#[test]
fn oversized_head_is_refused() {
    let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
    input.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
    let err = conn(&input).read_request().unwrap_err();
    assert!(matches!(err, HttpError::HeadTooLarge), "{err}");
}

#[test]
fn client_hanging_up_mid_body_is_a_disconnect() {
    let err = conn(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kern")
        .read_request()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the peer closed the connection 6 bytes into a 100-byte body"
    );
    assert!(err.is_disconnect());
    let err = conn(b"PUT /boot-source HTTP/1.1\r\nContent-Le")
        .read_request()
        .unwrap_err();
    assert!(err.to_string().contains("inside a message head"), "{err}");
}

#[test]
fn responses_round_trip_through_the_client_parser() {
    let mut wire = Vec::new();
    Response::fault(400, "boot-source: missing")
        .write_to(&mut wire, false)
        .unwrap();
    Response::no_content().write_to(&mut wire, true).unwrap();
    let text = String::from_utf8(wire.clone()).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("HTTP/1.1 204 No Content\r\n"), "{text}");
    let mut c = conn(&wire);
    let (status, body) = c.read_response().unwrap();
    assert_eq!(status, 400);
    assert_eq!(body, br#"{"fault_message":"boot-source: missing"}"#);
    assert_eq!(c.read_response().unwrap(), (204, Vec::new()));
}

#[test]
fn requests_written_by_the_client_parse() {
    let mut wire = Vec::new();
    write_request(&mut wire, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).unwrap();
    let request = conn(&wire).read_request().unwrap();
    assert_eq!(request.method, "PATCH");
    assert_eq!(request.body, br#"{"state":"Paused"}"#);
}
