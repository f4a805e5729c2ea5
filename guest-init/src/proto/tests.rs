//! Codec and message tests: every way a frame can be malformed, and the JSON shapes the
//! protocol documents.

use std::io::{self, Cursor, Read};

use super::*;

fn frame_bytes(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, kind, payload).unwrap();
    out
}

fn raw_header(len: u32, kind: u8, version: u8, reserved: u16) -> Vec<u8> {
    let mut h = len.to_le_bytes().to_vec();
    h.push(kind);
    h.push(version);
    h.extend_from_slice(&reserved.to_le_bytes());
    h
}

/// A reader that hands out its bytes one at a time, then `tail` forever: catches code that
/// assumes one read fills a buffer, and code that reads past an oversized header.
struct Trickle {
    bytes: Vec<u8>,
    pos: usize,
    tail: Option<u8>,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(b) = self.bytes.get(self.pos) {
            self.pos += 1;
            buf[0] = *b;
            return Ok(1);
        }
        match self.tail {
            Some(b) => {
                buf.fill(b);
                Ok(buf.len())
            }
            None => Ok(0),
        }
    }
}

#[test]
fn round_trip_every_kind() {
    for value in 1..=9u8 {
        let kind = FrameKind::from_wire(value).unwrap();
        let bytes = frame_bytes(kind, b"payload");
        assert_eq!(bytes.len(), HEADER_LEN + 7);
        assert_eq!(&bytes[..8], &[7, 0, 0, 0, value, 1, 0, 0]);
        let frame = read_frame(&mut Cursor::new(bytes)).unwrap().unwrap();
        assert_eq!(frame.kind, kind);
        assert_eq!(frame.payload, b"payload");
    }
}

#[test]
fn reads_frames_delivered_one_byte_at_a_time() {
    let mut bytes = frame_bytes(FrameKind::Stdout, b"abc");
    bytes.extend(frame_bytes(FrameKind::Data, b""));
    let mut reader = Trickle {
        bytes,
        pos: 0,
        tail: None,
    };
    let first = read_frame(&mut reader).unwrap().unwrap();
    assert_eq!(
        (first.kind, first.payload.as_slice()),
        (FrameKind::Stdout, &b"abc"[..])
    );
    let second = read_frame(&mut reader).unwrap().unwrap();
    assert_eq!((second.kind, second.payload.len()), (FrameKind::Data, 0));
    assert!(read_frame(&mut reader).unwrap().is_none());
}

#[test]
fn clean_end_between_frames_is_none() {
    assert!(read_frame(&mut Cursor::new(Vec::new())).unwrap().is_none());
}

#[test]
fn short_header_is_truncated() {
    let err = read_frame(&mut Cursor::new(vec![1, 0, 0])).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::Truncated {
                got: 3,
                expected: 8
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Protocol);
    assert!(err.is_disconnect());
}

#[test]
fn short_payload_is_truncated() {
    let mut bytes = frame_bytes(FrameKind::Data, b"0123456789");
    bytes.truncate(HEADER_LEN + 4);
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::Truncated {
                got: 12,
                expected: 18
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_version_is_unsupported() {
    let err = read_frame(&mut Cursor::new(raw_header(0, 1, 2, 0))).unwrap_err();
    assert!(matches!(err, ProtoError::UnsupportedVersion(2)), "{err}");
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    let err = read_frame(&mut Cursor::new(raw_header(0, 1, 0, 0))).unwrap_err();
    assert!(matches!(err, ProtoError::UnsupportedVersion(0)), "{err}");
}

#[test]
fn version_is_checked_before_the_rest() {
    // A future version may define new kinds and lengths; it must hear about the version.
    let err = read_frame(&mut Cursor::new(raw_header(u32::MAX, 200, 7, 9))).unwrap_err();
    assert!(matches!(err, ProtoError::UnsupportedVersion(7)), "{err}");
}

#[test]
fn nonzero_reserved_is_a_protocol_error() {
    let err = read_frame(&mut Cursor::new(raw_header(0, 1, 1, 0x0100))).unwrap_err();
    assert!(matches!(err, ProtoError::Reserved(0x0100)), "{err}");
    assert_eq!(err.code(), ErrorCode::Protocol);
    assert!(!err.is_disconnect());
}

#[test]
fn unknown_kinds_are_protocol_errors() {
    for kind in [0u8, 10, 255] {
        let err = read_frame(&mut Cursor::new(raw_header(0, kind, 1, 0))).unwrap_err();
        assert!(
            matches!(err, ProtoError::UnknownKind(k) if k == kind),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::Protocol);
    }
}

#[test]
fn oversized_length_fails_before_reading_or_allocating() {
    // The reader would supply endless payload bytes: a decoder that allocated and read `len`
    // bytes would succeed (or run out of memory) instead of failing on the header.
    for len in [MAX_PAYLOAD as u32 + 1, u32::MAX] {
        let mut reader = Trickle {
            bytes: raw_header(len, 8, 1, 0),
            pos: 0,
            tail: Some(0xAA),
        };
        let err = read_frame(&mut reader).unwrap_err();
        assert!(matches!(err, ProtoError::TooLarge(l) if l == len), "{err}");
        assert_eq!(reader.pos, HEADER_LEN, "read past the header");
        assert_eq!(err.code(), ErrorCode::Protocol);
    }
}

#[test]
fn payload_at_the_cap_is_accepted() {
    let payload = vec![7u8; MAX_PAYLOAD];
    let frame = read_frame(&mut Cursor::new(frame_bytes(FrameKind::Data, &payload)))
        .unwrap()
        .unwrap();
    assert_eq!(frame.payload.len(), MAX_PAYLOAD);
}

#[test]
fn writing_an_oversized_payload_is_refused() {
    let mut out = Vec::new();
    let err = write_frame(&mut out, FrameKind::Data, &vec![0; MAX_PAYLOAD + 1]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(out.is_empty());
}

fn parse_request(json: &str) -> Result<Request, ProtoError> {
    Frame {
        kind: FrameKind::Request,
        payload: json.as_bytes().to_vec(),
    }
    .json()
}

#[test]
fn bad_json_is_invalid() {
    for text in ["", "{", "not json", "[1,2]", "{\"op\":1}", "\u{0}"] {
        let err = parse_request(text).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Invalid, "{text:?}: {err}");
    }
}

#[test]
fn unknown_op_is_invalid() {
    let err = parse_request(r#"{"op":"format_disk"}"#).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Invalid);
    assert!(
        parse_request(r#"{"path":"/"}"#).is_err(),
        "a request without op"
    );
}

#[test]
fn unknown_fields_are_rejected() {
    for text in [
        r#"{"op":"ping","extra":1}"#,
        r#"{"op":"exec","argv":["true"],"shell":true}"#,
        r#"{"op":"stat","path":"/","follow":true}"#,
        r#"{"op":"shutdown","now":true}"#,
    ] {
        let err = parse_request(text).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Invalid, "{text}");
    }
}

#[test]
fn requests_parse_with_defaults() {
    assert_eq!(parse_request(r#"{"op":"ping"}"#).unwrap(), Request::Ping {});
    let Request::Exec(exec) = parse_request(r#"{"op":"exec","argv":["ls","-l"]}"#).unwrap() else {
        panic!("not an exec");
    };
    assert_eq!(exec.argv, ["ls", "-l"]);
    assert!(!exec.stdin && !exec.tty && exec.env.is_empty());
    assert_eq!(
        (exec.timeout_ms, exec.kill_grace_ms, exec.cwd),
        (None, None, None)
    );
    let write = parse_request(r#"{"op":"write_file","path":"/x","mode":493}"#).unwrap();
    assert_eq!(
        write,
        Request::WriteFile(WriteFileRequest {
            path: "/x".into(),
            mode: Some(0o755),
            mkdirs: false
        })
    );
}

#[test]
fn requests_serialize_to_the_documented_shape() {
    let json = |r: &Request| serde_json::to_string(r).unwrap();
    assert_eq!(json(&Request::Ping {}), r#"{"op":"ping"}"#);
    assert_eq!(json(&Request::Reboot {}), r#"{"op":"reboot"}"#);
    let exec = Request::Exec(ExecRequest {
        argv: vec!["true".into()],
        timeout_ms: Some(5),
        ..Default::default()
    });
    assert_eq!(
        json(&exec),
        r#"{"op":"exec","argv":["true"],"stdin":false,"timeout_ms":5,"tty":false}"#
    );
    let all = [
        exec,
        Request::Stat(PathRequest { path: "/".into() }),
        Request::Remove(RemoveRequest {
            path: "/a".into(),
            recursive: true,
        }),
    ];
    for request in all {
        assert_eq!(parse_request(&json(&request)).unwrap(), request);
    }
}

#[test]
fn exec_responses_have_the_documented_shape() {
    let started = serde_json::to_string(&ExecResponse::Started { pid: 42 }).unwrap();
    assert_eq!(started, r#"{"started":{"pid":42}}"#);
    let code = ExecResponse::Exit(ExitStatus {
        code: Some(3),
        ..Default::default()
    });
    assert_eq!(
        serde_json::to_string(&code).unwrap(),
        r#"{"exit":{"code":3,"timed_out":false}}"#
    );
    let parsed: ExecResponse =
        serde_json::from_str(r#"{"exit":{"signal":9,"timed_out":true}}"#).unwrap();
    assert_eq!(
        parsed,
        ExecResponse::Exit(ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true
        })
    );
}

#[test]
fn shell_codes() {
    let code = |code, signal| ExitStatus {
        code,
        signal,
        timed_out: false,
    };
    assert_eq!(code(Some(0), None).shell_code(), 0);
    assert!(code(Some(0), None).success());
    assert_eq!(code(Some(7), None).shell_code(), 7);
    assert_eq!(code(None, Some(9)).shell_code(), 137);
    assert!(!code(None, Some(15)).success());
}

#[test]
fn error_bodies_round_trip_and_tolerate_new_codes() {
    let mut out = Vec::new();
    write_error(&mut out, ErrorCode::NotFound, "no such file /x").unwrap();
    let frame = read_frame(&mut Cursor::new(out)).unwrap().unwrap();
    assert_eq!(frame.kind, FrameKind::Error);
    assert_eq!(
        std::str::from_utf8(&frame.payload).unwrap(),
        r#"{"code":"not_found","message":"no such file /x"}"#
    );
    let newer: ErrorBody = serde_json::from_str(r#"{"code":"quota","message":"m"}"#).unwrap();
    assert_eq!(newer.code, ErrorCode::Unknown);
    assert_eq!(
        ErrorCode::UnsupportedVersion.to_string(),
        "unsupported_version"
    );
}

/// Found by the agent_frame fuzz target: a peer's exit status with a huge signal number
/// overflowed `128 + signal`.
#[test]
fn shell_code_of_a_hostile_signal_does_not_overflow() {
    let frame = Frame {
        kind: FrameKind::Response,
        payload: br#"{"exit":{"signal":2147483647}}"#.to_vec(),
    };
    let ExecResponse::Exit(status) = frame.json::<ExecResponse>().unwrap() else {
        panic!("an exit response");
    };
    assert_eq!(status.shell_code(), i32::MAX);
    let normal = ExitStatus {
        code: None,
        signal: Some(9),
        timed_out: false,
    };
    assert_eq!(normal.shell_code(), 137);
}
