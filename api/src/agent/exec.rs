//! Running commands in the guest: the [`Exec`] builder, a [`RunningExec`] to read output and
//! the exit from, and an [`ExecControl`] to send input and signals from any thread meanwhile.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_init::proto::{
    self, ExecRequest, ExecResponse, ExitStatus, FrameKind, Request, SignalRequest, DATA_CHUNK,
};

use super::{parse, AgentClient, AgentError, Result};

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    request: ExecRequest,
}

impl Exec {
    /// `argv[0]` is looked up in the guest's PATH unless it contains a `/`.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            request: ExecRequest {
                argv: argv.into_iter().map(Into::into).collect(),
                ..ExecRequest::default()
            },
        }
    }

    /// Adds a variable to the command's (otherwise minimal) environment.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// Lets [`ExecControl`] send input; without it stdin is /dev/null.
    pub fn stdin(mut self, forward: bool) -> Self {
        self.request.stdin = forward;
        self
    }

    /// Runs the command on a pseudo-terminal (output then comes as stdout only).
    pub fn tty(mut self, tty: bool) -> Self {
        self.request.tty = tty;
        self
    }

    /// Ends the command (SIGTERM, then SIGKILL after the kill grace) after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.request.timeout_ms = Some(millis(timeout));
        self
    }

    /// Time between SIGTERM and SIGKILL on timeout (default 2 s).
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.request.kill_grace_ms = Some(millis(grace));
        self
    }

    pub fn request(&self) -> &ExecRequest {
        &self.request
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Everything a finished command printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl AgentClient {
    /// Starts a command; read its output and exit with [`RunningExec::wait`].
    pub fn start(&self, exec: &Exec) -> Result<RunningExec> {
        const OP: &str = "exec";
        let request = Request::Exec(exec.request.clone());
        let mut conn = self.send_request(OP, &request)?;
        let started: ExecResponse = self.expect_response(&mut conn, OP)?;
        let ExecResponse::Started { pid } = started else {
            return Err(AgentError::Protocol {
                op: OP,
                detail: "the first answer to exec is not `started`".into(),
            });
        };
        // Output may pause for as long as the command likes.
        conn.set_read_timeout(None)
            .map_err(|error| AgentError::Connection { op: OP, error })?;
        let writer = conn
            .try_clone()
            .map_err(|error| AgentError::Connection { op: OP, error })?;
        Ok(RunningExec {
            conn,
            pid,
            control: ExecControl {
                conn: Arc::new(Mutex::new(writer)),
            },
            client: self.clone(),
        })
    }

    /// Runs a command, handing each output chunk to `sink` as it arrives. An error from
    /// `sink` abandons the command (the agent kills it) and is returned.
    pub fn exec(
        &self,
        exec: &Exec,
        sink: impl FnMut(OutputStream, &[u8]) -> io::Result<()>,
    ) -> Result<ExitStatus> {
        self.start(exec)?.wait(sink)
    }

    /// Runs a command and collects its output.
    pub fn exec_output(&self, exec: &Exec) -> Result<ProcessOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.exec(exec, |stream, data| {
            match stream {
                OutputStream::Stdout => stdout.extend_from_slice(data),
                OutputStream::Stderr => stderr.extend_from_slice(data),
            }
            Ok(())
        })?;
        Ok(ProcessOutput {
            status,
            stdout,
            stderr,
        })
    }
}

/// A command running in the guest. Dropping it before [`RunningExec::wait`] returns closes
/// the connection, and the agent kills the command's process group.
pub struct RunningExec {
    conn: UnixStream,
    pid: u32,
    control: ExecControl,
    client: AgentClient,
}

impl RunningExec {
    /// The command's pid in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle to send stdin and signals while [`RunningExec::wait`] runs elsewhere.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Reads output until the command exits.
    pub fn wait(
        mut self,
        mut sink: impl FnMut(OutputStream, &[u8]) -> io::Result<()>,
    ) -> Result<ExitStatus> {
        const OP: &str = "exec";
        loop {
            let frame = self.client.read_reply(&mut self.conn, OP)?;
            let stream = match frame.kind {
                FrameKind::Stdout => OutputStream::Stdout,
                FrameKind::Stderr => OutputStream::Stderr,
                FrameKind::Response => match parse(&frame, OP)? {
                    ExecResponse::Exit(status) => return Ok(status),
                    ExecResponse::Started { .. } => continue,
                },
                other => {
                    return Err(AgentError::Protocol {
                        op: OP,
                        detail: format!("unexpected {other} frame during exec"),
                    })
                }
            };
            sink(stream, &frame.payload).map_err(|error| AgentError::Local {
                what: "cannot pass on the command's output".into(),
                error,
            })?;
        }
    }
}

impl Drop for RunningExec {
    fn drop(&mut self) {
        // ExecControl clones may keep the socket open; shutting it down is what tells the
        // agent that nobody is listening any more.
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}

/// Sends STDIN and SIGNAL frames to a running command; cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub struct ExecControl {
    conn: Arc<Mutex<UnixStream>>,
}

impl ExecControl {
    fn send(&self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        proto::write_frame(&mut *conn, kind, payload).map_err(|error| AgentError::Connection {
            op: "exec input",
            error,
        })
    }

    /// Sends input (requires [`Exec::stdin`]); large buffers go in several frames.
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.send(FrameKind::Stdin, chunk)?;
        }
        Ok(())
    }

    /// Ends the input (on a tty: sends Ctrl-D).
    pub fn close_stdin(&self) -> Result<()> {
        self.send(FrameKind::Stdin, &[])
    }

    /// Sends a signal to the command's process group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let payload =
            serde_json::to_vec(&SignalRequest { signal }).map_err(|e| AgentError::Protocol {
                op: "signal",
                detail: e.to_string(),
            })?;
        self.send(FrameKind::Signal, &payload)
    }

    /// Copies `input` to the command's stdin, then closes it; returns the bytes sent.
    pub fn pipe_stdin(&self, mut input: impl Read) -> Result<u64> {
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut sent = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(AgentError::Local {
                        what: "cannot read the input for the command".into(),
                        error,
                    })
                }
            };
            self.send(FrameKind::Stdin, &buf[..n])?;
            sent += n as u64;
        }
        self.close_stdin()?;
        Ok(sent)
    }
}
