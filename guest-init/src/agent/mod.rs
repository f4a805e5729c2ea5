//! The guest agent: serves the protocol of `guest_init::proto` on any stream listener (vsock in
//! a guest, a Unix socket in host tests), one thread per connection and one request per
//! connection. This module owns the accept loop, the first-frame checks and the dispatch of
//! requests; `exec` and `files` carry the operations out.

mod exec;
mod files;
mod guest;
mod pty;
mod session;

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest_init::proto::{
    self, Empty, ErrorCode, FrameKind, PingResponse, Request, PROTOCOL_VERSION,
};
use guest_init::report;
use serde::Serialize;

use crate::reaper::Reaper;
use crate::vsock::{VsockListener, VsockStream};

pub use exec::DEFAULT_PATH;
pub use guest::start_in_guest;

/// How long a new connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `shutdown`/`reboot` waits for the host to read the answer and hang up.
const HANGUP_WAIT: Duration = Duration::from_secs(1);
/// Unexpected I/O failures said on the console so far (the first 20 are).
static IO_FAILURES_SAID: AtomicU32 = AtomicU32::new(0);
/// Connection threads only parse, copy and wait; they need little stack.
const THREAD_STACK: usize = 256 << 10;

/// What the host may ask the whole guest to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

/// Carries out a power request (given only when the agent runs as PID 1).
pub type PowerHandler = Box<dyn Fn(PowerAction) + Send + Sync>;

/// The agent's state, shared by every connection.
pub struct Agent {
    reaper: &'static Reaper,
    ready_ms: u64,
    power: Option<PowerHandler>,
}

impl Agent {
    pub fn new(reaper: &'static Reaper, power: Option<PowerHandler>) -> Self {
        Self {
            reaper,
            ready_ms: report::boot_time().as_millis() as u64,
            power,
        }
    }
}

/// A connection the agent can serve.
pub trait Connection: Read + Write + AsRawFd + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts both directions down (waking readers); errors are of no interest.
    fn shutdown(&self);
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Connection for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        VsockStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = VsockStream::shutdown(self);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        VsockStream::set_read_timeout(self, timeout)
    }
}

/// A listener the agent can serve.
pub trait Listener: Send + 'static {
    type Conn: Connection;
    fn accept(&self) -> io::Result<Self::Conn>;
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn accept(&self) -> io::Result<UnixStream> {
        UnixListener::accept(self).map(|(stream, _)| stream)
    }
}

impl Listener for VsockListener {
    type Conn = VsockStream;
    fn accept(&self) -> io::Result<VsockStream> {
        VsockListener::accept(self)
    }
}

/// Accepts connections forever, each served on its own thread.
pub fn serve<L: Listener>(listener: L, agent: Arc<Agent>) {
    let mut reported = false;
    loop {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or memory: say so once, then back off instead of spinning.
                if !reported {
                    say!("ember-init: agent: cannot accept a connection: {e}");
                    reported = true;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let agent = Arc::clone(&agent);
        let _ = std::thread::Builder::new()
            .name("agent-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || handle(&agent, conn));
    }
}

/// Why a request failed: becomes the ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    /// The operating system's error number, for failures that come from one.
    pub os_error: Option<i32>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            os_error: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    /// `what` failed with `error`; the code follows the error's kind.
    pub fn io(what: impl Display, error: &io::Error) -> Self {
        Self {
            os_error: error.raw_os_error(),
            ..Self::new(code_for(error), format!("{what}: {error}"))
        }
    }

    /// An I/O failure that is not the host hanging up: worth a console line, as the host
    /// may never get the ERROR frame (a failed send leaves the stream mid-frame).
    fn is_unexpected_io(&self) -> bool {
        self.code == ErrorCode::Io
            && !matches!(
                self.os_error,
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ESHUTDOWN)
            )
    }
}

/// The error code for an operating-system error.
fn code_for(error: &io::Error) -> ErrorCode {
    match error.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::Permission,
        io::ErrorKind::AlreadyExists => ErrorCode::Exists,
        _ => match error.raw_os_error() {
            Some(libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EINVAL) => {
                ErrorCode::Invalid
            }
            Some(libc::EPERM | libc::EROFS) => ErrorCode::Permission,
            _ => ErrorCode::Io,
        },
    }
}

fn handle<C: Connection>(agent: &Agent, mut conn: C) {
    let request = match first_request(&mut conn) {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(failure) => return reply_error(&mut conn, &failure),
    };
    let what = request.op();
    if let Err(failure) = respond(agent, &mut conn, request) {
        if failure.is_unexpected_io() && IO_FAILURES_SAID.fetch_add(1, Ordering::Relaxed) < 20 {
            say!("ember-init: agent: {what} failed: {}", failure.message);
        }
        reply_error(&mut conn, &failure);
    }
}

/// Reads and checks the REQUEST frame; `None` when the host hung up without one.
fn first_request<C: Connection>(conn: &mut C) -> Result<Option<Request>, Failure> {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let frame = match proto::read_frame(conn) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Ok(None),
        Err(proto::ProtoError::Io(e)) if is_timeout(&e) => {
            let secs = REQUEST_TIMEOUT.as_secs();
            return Err(Failure::new(
                ErrorCode::Protocol,
                format!("no request within {secs} s of connecting"),
            ));
        }
        Err(e) => return Err(Failure::new(e.code(), e.to_string())),
    };
    let _ = conn.set_read_timeout(None);
    if frame.kind != FrameKind::Request {
        return Err(Failure::new(
            ErrorCode::Protocol,
            format!(
                "a connection must start with a REQUEST frame, not {}",
                frame.kind
            ),
        ));
    }
    frame
        .json()
        .map(Some)
        .map_err(|e| Failure::invalid(e.to_string()))
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn respond<C: Connection>(agent: &Agent, conn: &mut C, request: Request) -> Result<(), Failure> {
    match request {
        Request::Ping {} => send_response(conn, &ping(agent)),
        Request::Exec(exec) => exec::run(agent.reaper, conn, exec),
        Request::WriteFile(write) => files::write_file(conn, &write),
        Request::ReadFile(read) => files::read_file(conn, &read.path),
        Request::Stat(stat) => send_response(conn, &files::stat(&stat.path)?),
        Request::List(list) => files::list(conn, &list.path),
        Request::Mkdir(mkdir) => {
            files::mkdir(&mkdir)?;
            send_response(conn, &Empty {})
        }
        Request::Remove(remove) => {
            files::remove(&remove)?;
            send_response(conn, &Empty {})
        }
        Request::Shutdown {} => power(agent, conn, PowerAction::PowerOff),
        Request::Reboot {} => power(agent, conn, PowerAction::Reboot),
    }
}

fn ping(agent: &Agent) -> PingResponse {
    PingResponse {
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_ms: report::boot_time().as_millis() as u64,
        boot_ms: agent.ready_ms,
    }
}

/// Answers, lets the host read the answer, then hands the action to PID 1.
fn power<C: Connection>(agent: &Agent, conn: &mut C, action: PowerAction) -> Result<(), Failure> {
    let Some(handler) = &agent.power else {
        return Err(Failure::invalid(
            "shutdown and reboot work only when ember-init runs as PID 1 in a guest",
        ));
    };
    send_response(conn, &Empty {})?;
    let _ = conn.set_read_timeout(Some(HANGUP_WAIT));
    let _ = io::copy(conn, &mut io::sink());
    handler(action);
    Ok(())
}

/// Sends one RESPONSE frame.
fn send_response<C: Write>(conn: &mut C, value: &impl Serialize) -> Result<(), Failure> {
    proto::write_json(conn, FrameKind::Response, value)
        .map_err(|e| Failure::io("cannot send the response", &e))
}

/// Sends the ERROR frame; a host that is gone cannot be told.
fn reply_error<C: Write>(conn: &mut C, failure: &Failure) {
    let _ = proto::write_error(conn, failure.code, failure.message.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_follow_the_os_error() {
        let code = |errno| code_for(&io::Error::from_raw_os_error(errno));
        assert_eq!(code(libc::ENOENT), ErrorCode::NotFound);
        assert_eq!(code(libc::EACCES), ErrorCode::Permission);
        assert_eq!(code(libc::EPERM), ErrorCode::Permission);
        assert_eq!(code(libc::EEXIST), ErrorCode::Exists);
        assert_eq!(code(libc::ENOTDIR), ErrorCode::Invalid);
        assert_eq!(code(libc::ENOTEMPTY), ErrorCode::Invalid);
        assert_eq!(code(libc::ENOSPC), ErrorCode::Io);
    }

    #[test]
    fn failure_messages_name_what_failed() {
        let f = Failure::io(
            "cannot open /x",
            &io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(f.code, ErrorCode::NotFound);
        assert!(f.message.starts_with("cannot open /x: "), "{}", f.message);
    }
}
