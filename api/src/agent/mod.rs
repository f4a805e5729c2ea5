//! The host's client for ember-init's guest agent (protocol: `guest_init::proto`). An
//! [`AgentClient`] names where the agent is (the VM's hybrid-vsock Unix socket, or a plain
//! Unix socket for `ember-init --agent-unix`) and opens one connection per request, so one
//! client can be used from many threads at once.
//!
//! ```no_run
//! use api::agent::{AgentClient, Exec};
//! # fn main() -> Result<(), api::agent::AgentError> {
//! let agent = AgentClient::vsock("/tmp/vm.vsock");
//! let out = agent.exec_output(&Exec::new(["uname", "-r"]))?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok(())
//! # }
//! ```

mod exec;
mod ready;
mod transfer;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_init::proto::{self, ErrorBody, Frame, FrameKind, ProtoError, Request};
use serde::de::DeserializeOwned;

pub use exec::{Exec, ExecControl, OutputStream, ProcessOutput, RunningExec};
pub use guest_init::proto::{
    DirEntry, Empty, ErrorCode, ExitStatus, FileKind, FileStat, PingResponse, AGENT_PORT,
    PROTOCOL_VERSION, READY_PORT,
};
pub use ready::{ready_socket_path, wait_ready};
pub use transfer::{Download, WriteOptions};

/// How long connecting and each reply may take unless [`AgentClient::with_timeout`] says
/// otherwise. Exec output is not bounded by it: a command may be silent for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest hybrid-vsock reply line accepted (`OK <port>\n` is short).
const MAX_HANDSHAKE_LINE: usize = 64;

/// Everything that can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot connect to the VM's vsock socket {path}: {error}; is the VM running with a \
         vsock device whose uds_path is this socket?"
    )]
    ConnectVsock { path: PathBuf, error: io::Error },
    #[error(
        "the VM's vsock socket {path} did not connect to guest port {port} ({reply}); is \
         the guest up with ember-init's agent listening? (`emberctl wait-ready` waits for it)"
    )]
    Handshake {
        path: PathBuf,
        port: u32,
        /// What the VMM answered, in words.
        reply: String,
    },
    #[error(
        "cannot connect to the agent socket {path}: {error}; is `ember-init --agent-unix` \
         serving there?"
    )]
    ConnectUnix { path: PathBuf, error: io::Error },
    #[error("lost the connection to the agent during {op}: {error}")]
    Connection { op: &'static str, error: io::Error },
    #[error(
        "the agent did not answer {op} within {timeout:?}; is the guest overloaded or stopped?"
    )]
    Timeout { op: &'static str, timeout: Duration },
    #[error("the agent closed the connection during {op} without an answer")]
    Closed { op: &'static str },
    #[error("the agent's answer to {op} is malformed: {detail}")]
    Protocol { op: &'static str, detail: String },
    #[error("the agent refused {op} ({code}): {message}")]
    Remote {
        op: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("{what}: {error}")]
    Local { what: String, error: io::Error },
    #[error("cannot listen for the agent's READY call on {path}: {error}")]
    ReadyListen { path: PathBuf, error: io::Error },
    #[error(
        "the agent behind {path} was not ready within {timeout:?}; is the VM running, with a \
         vsock device and ember-init as its init?"
    )]
    ReadyTimeout { path: PathBuf, timeout: Duration },
}

impl AgentError {
    /// The agent's error code, when the agent refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn connection(op: &'static str, error: io::Error, timeout: Duration) -> Self {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout { op, timeout },
            _ => Self::Connection { op, error },
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A VM's hybrid-vsock Unix socket and the guest port.
    Vsock { uds_path: PathBuf, port: u32 },
    /// A Unix socket served by `ember-init --agent-unix`.
    Unix(PathBuf),
}

/// A handle on one agent; every request opens its own connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    timeout: Duration,
}

impl AgentClient {
    /// The agent of the VM whose vsock device has `uds_path`, on [`AGENT_PORT`].
    pub fn vsock(uds_path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Vsock {
            uds_path: uds_path.into(),
            port: AGENT_PORT,
        })
    }

    /// An agent served on a plain Unix socket (`ember-init --agent-unix PATH`).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Bounds connecting and waiting for each answer (exec output excepted).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Opens a connection to the agent (the hybrid-vsock handshake included).
    pub fn connect(&self) -> Result<UnixStream> {
        match &self.endpoint {
            Endpoint::Vsock { uds_path, port } => vsock_handshake(uds_path, *port, self.timeout),
            Endpoint::Unix(path) => connect_unix(path),
        }
    }

    /// Checks that the agent answers; tells its version, uptime and boot time.
    pub fn ping(&self) -> Result<PingResponse> {
        self.call("ping", &Request::Ping {})
    }

    pub fn stat(&self, path: &str) -> Result<FileStat> {
        let request = Request::Stat(proto::PathRequest { path: path.into() });
        self.call("stat", &request)
    }

    /// The entries of a directory, sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let request = Request::List(proto::PathRequest { path: path.into() });
        let listing: proto::ListResponse = self.call("list", &request)?;
        Ok(listing.entries)
    }

    pub fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<()> {
        let request = Request::Mkdir(proto::MkdirRequest {
            path: path.into(),
            parents,
            mode,
        });
        self.call::<Empty>("mkdir", &request).map(drop)
    }

    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let request = Request::Remove(proto::RemoveRequest {
            path: path.into(),
            recursive,
        });
        self.call::<Empty>("remove", &request).map(drop)
    }

    /// Asks the guest to power off; on Ember this ends the VM.
    pub fn shutdown(&self) -> Result<()> {
        self.call::<Empty>("shutdown", &Request::Shutdown {})
            .map(drop)
    }

    /// Asks the guest to reboot; on Ember (no reboot support) this ends the VM too.
    pub fn reboot(&self) -> Result<()> {
        self.call::<Empty>("reboot", &Request::Reboot {}).map(drop)
    }

    /// Sends a request and reads its single RESPONSE.
    fn call<T: DeserializeOwned>(&self, op: &'static str, request: &Request) -> Result<T> {
        let mut conn = self.send_request(op, request)?;
        self.expect_response(&mut conn, op)
    }

    /// Connects and sends the request; answers are read within the client's timeout.
    fn send_request(&self, op: &'static str, request: &Request) -> Result<UnixStream> {
        let mut conn = self.connect()?;
        conn.set_read_timeout(Some(self.timeout))
            .map_err(|e| AgentError::Connection { op, error: e })?;
        proto::write_json(&mut conn, FrameKind::Request, request)
            .map_err(|e| AgentError::connection(op, e, self.timeout))?;
        Ok(conn)
    }

    /// Reads a frame; an ERROR frame becomes [`AgentError::Remote`].
    fn read_reply(&self, conn: &mut impl Read, op: &'static str) -> Result<Frame> {
        let frame = match proto::read_frame(conn) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(AgentError::Closed { op }),
            Err(ProtoError::Io(e)) => return Err(AgentError::connection(op, e, self.timeout)),
            Err(e) => {
                return Err(AgentError::Protocol {
                    op,
                    detail: e.to_string(),
                })
            }
        };
        if frame.kind != FrameKind::Error {
            return Ok(frame);
        }
        let body: ErrorBody = parse(&frame, op)?;
        Err(AgentError::Remote {
            op,
            code: body.code,
            message: body.message,
        })
    }

    /// Reads a RESPONSE frame and parses it.
    fn expect_response<T: DeserializeOwned>(
        &self,
        conn: &mut impl Read,
        op: &'static str,
    ) -> Result<T> {
        let frame = self.read_reply(conn, op)?;
        expect_kind(&frame, FrameKind::Response, op)?;
        parse(&frame, op)
    }

    /// After a failed send: the agent may have said why before closing; prefer its reason.
    fn failure_after_send(
        &self,
        conn: &mut UnixStream,
        op: &'static str,
        error: io::Error,
    ) -> AgentError {
        match self.read_reply(conn, op) {
            Err(remote @ AgentError::Remote { .. }) => remote,
            _ => AgentError::connection(op, error, self.timeout),
        }
    }
}

fn expect_kind(frame: &Frame, kind: FrameKind, op: &'static str) -> Result<()> {
    if frame.kind == kind {
        return Ok(());
    }
    Err(AgentError::Protocol {
        op,
        detail: format!("expected a {kind} frame, got {}", frame.kind),
    })
}

fn parse<T: DeserializeOwned>(frame: &Frame, op: &'static str) -> Result<T> {
    frame.json().map_err(|e| AgentError::Protocol {
        op,
        detail: e.to_string(),
    })
}

/// Connects to a VM's hybrid-vsock socket and asks for guest `port`: writes
/// `CONNECT <port>\n` and expects `OK <host port>\n`. The stream then reaches the guest.
pub fn connect_vsock(uds_path: impl AsRef<Path>, port: u32) -> Result<UnixStream> {
    vsock_handshake(uds_path.as_ref(), port, DEFAULT_TIMEOUT)
}

fn vsock_handshake(uds_path: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let connect_error = |error| AgentError::ConnectVsock {
        path: uds_path.into(),
        error,
    };
    let mut stream = UnixStream::connect(uds_path).map_err(connect_error)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_error)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(connect_error)?;
    let line = read_line(&mut stream);
    let accepted = line.as_ref().is_ok_and(|line| {
        line.strip_prefix("OK ")
            .is_some_and(|p| p.trim_end().parse::<u32>().is_ok())
    });
    if !accepted {
        let reply = match line {
            Ok(line) if line.is_empty() => "it closed the connection without a reply".into(),
            Ok(line) => format!("it replied {line:?}"),
            Err(e) => format!("no reply: {e}"),
        };
        return Err(AgentError::Handshake {
            path: uds_path.into(),
            port,
            reply,
        });
    }
    stream.set_read_timeout(None).map_err(connect_error)?;
    Ok(stream)
}

/// Reads one line byte by byte, so nothing after it (the agent's frames) is consumed.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_HANDSHAKE_LINE {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Connects to an agent served on a plain Unix socket.
pub fn connect_unix(path: impl AsRef<Path>) -> Result<UnixStream> {
    let path = path.as_ref();
    UnixStream::connect(path).map_err(|error| AgentError::ConnectUnix {
        path: path.into(),
        error,
    })
}

#[cfg(test)]
mod tests;
