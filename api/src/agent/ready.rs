//! Waiting for a VM's agent to come up. The agent announces itself once, by connecting to
//! the host's vsock port [`READY_PORT`], which the VMM's hybrid vsock turns into a
//! connection to the Unix socket `<uds_path>_1025`. [`wait_ready`] listens there first, then
//! pings, so that the announcement cannot slip between a failed ping and the listener.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_init::proto::{self, FrameKind, Ready, READY_PORT};

use super::{AgentClient, AgentError, Result};

/// How often the listener is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// A ping that takes longer than this is not an answer worth waiting for here.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The Unix socket the VMM connects to when the guest calls host port [`READY_PORT`].
pub fn ready_socket_path(uds_path: &Path) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{READY_PORT}"));
    PathBuf::from(path)
}

/// Waits until the agent of the VM with vsock socket `uds_path` is ready; returns the
/// guest's uptime in ms when the agent became ready.
pub fn wait_ready(uds_path: impl AsRef<Path>, timeout: Duration) -> Result<u64> {
    let uds_path = uds_path.as_ref();
    let deadline = Instant::now() + timeout;
    let listener = ReadyListener::bind(&ready_socket_path(uds_path))?;
    // An agent that was up before we listened has already made its call: ask it instead.
    // Its listener was up before it called, so if this fails, the call is still to come.
    let client = AgentClient::vsock(uds_path).with_timeout(timeout.min(PING_TIMEOUT));
    if let Ok(ping) = client.ping() {
        return Ok(ping.boot_ms);
    }
    loop {
        if let Some(boot_ms) = listener.try_accept(deadline)? {
            return Ok(boot_ms);
        }
        if Instant::now() >= deadline {
            return Err(AgentError::ReadyTimeout {
                path: uds_path.into(),
                timeout,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The listening socket; removed again when dropped.
struct ReadyListener {
    path: PathBuf,
    listener: UnixListener,
}

impl ReadyListener {
    fn bind(path: &Path) -> Result<Self> {
        let fail = |error| AgentError::ReadyListen {
            path: path.into(),
            error,
        };
        remove_stale_socket(path).map_err(fail)?;
        let listener = UnixListener::bind(path).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        Ok(Self {
            path: path.into(),
            listener,
        })
    }

    /// Takes a pending call, if any, and reads its READY frame.
    fn try_accept(&self, deadline: Instant) -> Result<Option<u64>> {
        match self.listener.accept() {
            Ok((stream, _)) => read_ready(stream, deadline).map(Some),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(AgentError::ReadyListen {
                path: self.path.clone(),
                error,
            }),
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket file left by an earlier wait is removed; anything else at the path is an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way; remove it",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_ready(mut stream: UnixStream, deadline: Instant) -> Result<u64> {
    const OP: &str = "the readiness call";
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(left)));
    setup.map_err(|error| AgentError::Connection { op: OP, error })?;
    let frame = match proto::read_frame(&mut stream) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(AgentError::Closed { op: OP }),
        Err(e) => {
            return Err(AgentError::Protocol {
                op: OP,
                detail: e.to_string(),
            })
        }
    };
    super::expect_kind(&frame, FrameKind::Ready, OP)?;
    let ready: Ready = super::parse(&frame, OP)?;
    Ok(ready.boot_ms)
}
