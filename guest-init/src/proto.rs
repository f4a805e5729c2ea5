//! The agent's wire protocol, version 1: framing, limits and the messages. Both ends use this
//! module: the agent inside ember-init and the host client in `api::agent`. This comment is the
//! authoritative description of the protocol.
//!
//! # Transport
//! A byte stream: an `AF_VSOCK` stream in the guest, a Unix stream socket in host tests. The
//! agent listens on vsock port [`AGENT_PORT`] (1024, any CID). The host reaches it through the
//! VMM's hybrid vsock: connect to the VM's vsock Unix socket (`uds_path`), write
//! `CONNECT 1024\n`, read one line `OK <port>\n`; from then on the stream is the agent
//! connection. One request per connection; any number of connections at once.
//!
//! # Frames
//! An 8-byte header, then the payload:
//!
//! | bytes | field | value |
//! |---|---|---|
//! | 0..4 | `len` | payload length, `u32` little-endian, at most [`MAX_PAYLOAD`] (1 MiB) |
//! | 4 | `kind` | see below |
//! | 5 | `version` | [`PROTOCOL_VERSION`] (1) |
//! | 6..8 | `reserved` | 0 |
//!
//! Data frames are chunked at [`DATA_CHUNK`] (64 KiB) by default. A frame with a bad version,
//! nonzero reserved bits, an unknown kind or `len > MAX_PAYLOAD` is answered with one ERROR
//! frame (code `unsupported_version` for the version, `protocol` otherwise) and the connection
//! is closed. The length is checked before anything is allocated.
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | REQUEST | host -> guest | JSON [`Request`]; the first frame of every connection |
//! | 2 | RESPONSE | guest -> host | JSON, shape depends on the request |
//! | 3 | ERROR | guest -> host | JSON [`ErrorBody`] `{"code", "message"}`; always the last frame |
//! | 4 | STDIN | host -> guest | raw bytes; an empty STDIN frame is end of input |
//! | 5 | STDOUT | guest -> host | raw bytes |
//! | 6 | STDERR | guest -> host | raw bytes |
//! | 7 | SIGNAL | host -> guest | JSON [`SignalRequest`] `{"signal": N}` |
//! | 8 | DATA | both | raw file bytes; an empty DATA frame is end of file |
//! | 9 | READY | guest -> host | JSON [`Ready`], on the readiness connection only |
//!
//! Error codes ([`ErrorCode`]): `protocol`, `unsupported_version`, `invalid`, `not_found`,
//! `permission`, `exists`, `io`, `too_large`. Besides malformed headers, these are protocol
//! errors: a first frame that is not a REQUEST, no request within 30 s of connecting, and a
//! frame of the wrong kind later (anything but STDIN and SIGNAL during an exec, anything but
//! DATA during an upload). A protocol error during an exec also kills the command's group.
//!
//! # Requests
//! A JSON object whose `"op"` names the operation. Unknown fields and unknown ops are rejected
//! (ERROR `invalid`), as is malformed JSON. Paths must be absolute.
//!
//! - `{"op":"ping"}` -> RESPONSE [`PingResponse`]
//!   `{"protocol":1,"version":"<crate version>","uptime_ms":N,"boot_ms":N}`: `uptime_ms` is
//!   the machine's uptime (`CLOCK_BOOTTIME`), `boot_ms` the uptime at which the agent became
//!   ready (the value its READY frame carries).
//! - `{"op":"exec", ...}` ([`ExecRequest`]): `argv` (non-empty), `env` (optional object, added
//!   to a clean environment `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
//!   `HOME=/root`, `TERM=xterm-256color` with a tty, `TERM=dumb` without), `cwd` (optional,
//!   absolute), `stdin` (default false: stdin is /dev/null), `timeout_ms` (optional), `tty`
//!   (default false), `kill_grace_ms` (default 2000).
//!   The agent answers RESPONSE `{"started":{"pid":N}}`, then STDOUT and STDERR frames as the
//!   output comes (order kept within each stream; with a tty there is only STDOUT), then a
//!   final RESPONSE `{"exit":{"code":N,"timed_out":false}}` or
//!   `{"exit":{"signal":N,"timed_out":B}}` ([`ExecResponse`], [`ExitStatus`]). The host may
//!   send STDIN frames (when `stdin` is true; otherwise they are dropped) and SIGNAL frames
//!   (signal 1 to 64, else ERROR `invalid`) at any time. The command runs in its own session and process group; signals go to the
//!   group. On timeout the group gets SIGTERM, then SIGKILL after `kill_grace_ms`; a command
//!   that traps SIGTERM and exits by itself reports its code with `"timed_out":true`. Closing
//!   (or half-closing) the connection before the exit kills the group with SIGKILL. A command
//!   that cannot be started gives ERROR `not_found` or `permission` (or `io`) instead of
//!   `started`. Once the command exits, output still buffered in its pipes is sent; output
//!   from background processes that keep the pipes open past that point is not waited for.
//!   With a tty, an empty STDIN frame sends the terminal's end-of-file character (Ctrl-D), and
//!   stdin is the terminal even when `stdin` is false.
//! - `{"op":"write_file","path":P,"mode":M,"mkdirs":B}` ([`WriteFileRequest`], `mode`
//!   default 0o644, `mkdirs` default false) -> the host sends DATA frames and an empty DATA
//!   frame; the agent writes a temporary file in P's directory, fsyncs it, renames it over P
//!   and answers RESPONSE `{"written":N}`; P only ever names a whole upload. An upload that
//!   breaks off (the host hangs up or resets before the empty DATA frame) or fails leaves P
//!   as it was, the earlier file or none, and the temporary file is removed. Only a guest
//!   that stops mid-upload (a crash, a power cut) can leave the temporary
//!   `.NAME.ember-<pid>-<n>.tmp` behind in P's directory; it never takes P's name. When
//!   writing fails, the agent still reads the DATA frames to the end, then answers ERROR.
//! - `{"op":"read_file","path":P}` -> RESPONSE `{"size":N,"mode":M}`, DATA frames, an empty
//!   DATA frame (or an ERROR frame if reading fails midway). `size` is what stat said; the
//!   DATA frames carry whatever the file holds when read (files in /proc say 0).
//! - `{"op":"stat","path":P}` -> RESPONSE [`FileStat`]
//!   `{"kind":"file|dir|symlink|other","size":N,"mode":M,"mtime":secs}` (symlinks are not
//!   followed; `mode` holds the permission bits).
//! - `{"op":"list","path":P}` -> RESPONSE `{"entries":[{"name","kind","size","mode"},...]}`
//!   sorted by name; ERROR `too_large` when the listing would exceed [`MAX_PAYLOAD`]. Names
//!   that are not UTF-8 are shown lossily.
//! - `{"op":"mkdir","path":P,"parents":B,"mode":M}` (`mode` optional, default 0o755 less
//!   the umask; a given mode is applied exactly) -> RESPONSE `{}`. Modes above 0o7777 are
//!   `invalid` here and in `write_file`.
//! - `{"op":"remove","path":P,"recursive":B}` -> RESPONSE `{}`; `/` is refused.
//! - `{"op":"shutdown"}` / `{"op":"reboot"}` -> RESPONSE `{}`, then the agent waits (up to a
//!   second) for the host to close the connection, syncs and ends the VM. Only when the agent
//!   runs as PID 1; otherwise ERROR `invalid`. On Ember both end the VM: the guest resets and
//!   the VMM exits on a reset.
//!
//! # Readiness
//! Once its vsock listener is up, the agent (as PID 1) connects once to CID 2 (the host), port
//! [`READY_PORT`] (1025), sends one READY frame `{"protocol":1,"version":"..","boot_ms":N}`
//! (`boot_ms`: `CLOCK_BOOTTIME` in ms) and closes. Through the hybrid vsock this reaches a
//! listener on `<uds_path>_1025` on the host. When nobody listens the connection fails, which
//! the agent logs in one console line and otherwise ignores.

use std::fmt;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

mod messages;

pub use messages::*;

/// The protocol version this module speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The host vsock port the agent announces readiness to.
pub const READY_PORT: u32 = 1025;
/// The size of a frame header.
pub const HEADER_LEN: usize = 8;
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The default size of STDOUT, STDERR, STDIN and DATA chunks.
pub const DATA_CHUNK: usize = 64 << 10;
/// The grace period between SIGTERM and SIGKILL when an exec times out.
pub const DEFAULT_KILL_GRACE_MS: u64 = 2000;
/// The file mode `write_file` uses when the request gives none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
    Error = 3,
    Stdin = 4,
    Stdout = 5,
    Stderr = 6,
    Signal = 7,
    Data = 8,
    Ready = 9,
}

impl FrameKind {
    /// The kind with this wire value, if any.
    pub fn from_wire(value: u8) -> Option<Self> {
        use FrameKind::*;
        [
            Request, Response, Error, Stdin, Stdout, Stderr, Signal, Data, Ready,
        ]
        .into_iter()
        .find(|k| *k as u8 == value)
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            FrameKind::Request => "REQUEST",
            FrameKind::Response => "RESPONSE",
            FrameKind::Error => "ERROR",
            FrameKind::Stdin => "STDIN",
            FrameKind::Stdout => "STDOUT",
            FrameKind::Stderr => "STDERR",
            FrameKind::Signal => "SIGNAL",
            FrameKind::Data => "DATA",
            FrameKind::Ready => "READY",
        };
        f.write_str(name)
    }
}

/// A frame that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection error: {0}")]
    Io(io::Error),
    #[error("the connection closed inside a frame (after {got} of {expected} bytes)")]
    Truncated { got: usize, expected: usize },
    #[error("frame uses protocol version {0}; this side speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion(u8),
    #[error("frame header has nonzero reserved bits {0:#06x}")]
    Reserved(u16),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(u32),
    #[error("malformed {kind} frame: {error}")]
    Json {
        kind: FrameKind,
        error: serde_json::Error,
    },
}

impl ProtoError {
    /// The error code the agent answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            ProtoError::Json { .. } => ErrorCode::Invalid,
            _ => ErrorCode::Protocol,
        }
    }

    /// True when the peer went away (nothing can be answered).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ProtoError::Io(_) | ProtoError::Truncated { .. })
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: FrameKind,
}

impl Header {
    /// The wire form of a header for `len` payload bytes.
    pub fn encode(kind: FrameKind, len: u32) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        bytes[4] = kind as u8;
        bytes[5] = PROTOCOL_VERSION;
        bytes
    }

    /// Checks a header: version first (so a newer peer learns what we speak), then the
    /// reserved bits, the kind and the length.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if bytes[5] != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion(bytes[5]));
        }
        let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
        if reserved != 0 {
            return Err(ProtoError::Reserved(reserved));
        }
        let kind = FrameKind::from_wire(bytes[4]).ok_or(ProtoError::UnknownKind(bytes[4]))?;
        if len as usize > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(len));
        }
        Ok(Self { len, kind })
    }
}

/// One frame read off a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Parses the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|error| ProtoError::Json {
            kind: self.kind,
            error,
        })
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream (the peer closed between frames).
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(reader, &mut header)? {
        0 => return Ok(None),
        HEADER_LEN => {}
        got => {
            return Err(ProtoError::Truncated {
                got,
                expected: HEADER_LEN,
            })
        }
    }
    let header = Header::decode(&header)?;
    // The length was checked against MAX_PAYLOAD by decode: this allocation is bounded.
    let mut payload = vec![0u8; header.len as usize];
    let got = read_full(reader, &mut payload)?;
    if got < payload.len() {
        return Err(ProtoError::Truncated {
            got: HEADER_LEN + got,
            expected: HEADER_LEN + payload.len(),
        });
    }
    Ok(Some(Frame {
        kind: header.kind,
        payload,
    }))
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, ProtoError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    Ok(filled)
}

/// Writes one frame with a single `write_all`, so frames from threads that share a locked
/// writer never interleave.
pub fn write_frame(writer: &mut impl Write, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len as usize <= MAX_PAYLOAD)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {kind} payload of {} bytes exceeds the frame limit of {MAX_PAYLOAD} bytes",
                    payload.len()
                ),
            )
        })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&Header::encode(kind, len));
    frame.extend_from_slice(payload);
    writer.write_all(&frame)
}

/// Serializes `value` and writes it as one frame.
pub fn write_json(
    writer: &mut impl Write,
    kind: FrameKind,
    value: &impl Serialize,
) -> io::Result<()> {
    let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(writer, kind, &payload)
}

/// Writes an ERROR frame.
pub fn write_error(
    writer: &mut impl Write,
    code: ErrorCode,
    message: impl Into<String>,
) -> io::Result<()> {
    let body = ErrorBody {
        code,
        message: message.into(),
    };
    write_json(writer, FrameKind::Error, &body)
}

#[cfg(test)]
mod tests;
