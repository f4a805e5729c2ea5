//! The moving parts of a running exec: a [`FrameSink`] that threads share to write frames, the
//! output pump (command output -> STDOUT/STDERR frames), and the input thread (STDIN and
//! SIGNAL frames -> the command). Either thread that sees the host go away kills the command's
//! process group.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use guest_init::proto::{
    self, ErrorCode, ExecResponse, ExitStatus, FrameKind, SignalRequest, DATA_CHUNK,
};
use serde::Serialize;

use super::{Connection, THREAD_STACK};
use crate::reaper::Reaper;

/// After the command exits, how many rounds of reads may still drain its pipes: enough for
/// everything it wrote, and a bound when a background process keeps writing.
const MAX_DRAIN_ROUNDS: u32 = 64;
/// The terminal's end-of-file character (VEOF, Ctrl-D) in a fresh pty.
const TTY_EOF: u8 = 0x04;

/// Frames written by several threads; after an ERROR frame nothing more goes out.
pub struct FrameSink<C> {
    state: Mutex<SinkState<C>>,
}

struct SinkState<C> {
    conn: C,
    closed: bool,
}

impl<C: Connection> FrameSink<C> {
    pub fn new(conn: C) -> Self {
        Self {
            state: Mutex::new(SinkState {
                conn,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState<C>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn send(&self, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        if state.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        proto::write_frame(&mut state.conn, kind, payload)
    }

    pub fn json(&self, kind: FrameKind, value: &impl Serialize) -> io::Result<()> {
        let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
        self.send(kind, &payload)
    }

    /// Sends the final ERROR frame (unless the exchange is already over).
    pub fn fail(&self, code: ErrorCode, message: String) {
        let mut state = self.lock();
        if !state.closed {
            state.closed = true;
            let _ = proto::write_error(&mut state.conn, code, message);
        }
    }

    /// Ends the exchange and wakes the input thread.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.conn.shutdown();
    }
}

/// The command's process group, signalled through the reaper (which knows whether the
/// leader has been reaped, so a reused pid is never signalled).
#[derive(Clone, Copy)]
pub struct Group {
    pub pid: libc::pid_t,
    pub reaper: &'static Reaper,
}

impl Group {
    pub fn signal(&self, signal: libc::c_int) {
        self.reaper.signal_group(self.pid, signal);
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }
}

/// The parent's ends of the command's stdio.
pub struct ChildIo {
    pub stdin: StdinTarget,
    pub outputs: Vec<(FrameKind, File)>,
}

/// Where STDIN frames go.
pub enum StdinTarget {
    /// `stdin` was false: STDIN frames are dropped.
    Ignored,
    Pipe(File),
    Tty(File),
    /// The command closed its end, or the host sent end of input.
    Closed,
}

impl StdinTarget {
    fn forward(&mut self, data: &[u8]) {
        let close = match self {
            // End of input: closing the pipe is how the command sees it.
            StdinTarget::Pipe(_) if data.is_empty() => true,
            StdinTarget::Tty(tty) if data.is_empty() => tty.write_all(&[TTY_EOF]).is_err(),
            StdinTarget::Pipe(file) | StdinTarget::Tty(file) => file.write_all(data).is_err(),
            StdinTarget::Ignored | StdinTarget::Closed => false,
        };
        if close {
            *self = StdinTarget::Closed;
        }
    }
}

/// The two threads of a running exec.
pub struct ExecThreads {
    waker: UnixStream,
    pump: JoinHandle<()>,
    input: JoinHandle<()>,
}

impl ExecThreads {
    /// Starts the pump and the input thread. `reader` and `hangup` are handles on the
    /// connection: the input thread reads frames from the first, the pump watches the second
    /// for the host hanging up.
    pub fn start<C: Connection>(
        io: ChildIo,
        reader: C,
        hangup: C,
        sink: &Arc<FrameSink<C>>,
        group: Group,
    ) -> io::Result<Self> {
        let (waker, woken) = UnixStream::pair()?;
        let pump_sink = Arc::clone(sink);
        let outputs = io.outputs;
        let pump = spawn("exec-output", move || {
            pump_output(outputs, &woken, &hangup, &pump_sink, group)
        })?;
        let input_sink = Arc::clone(sink);
        let stdin = io.stdin;
        let input = spawn("exec-input", move || {
            forward_input(reader, stdin, &input_sink, group)
        })?;
        Ok(Self { waker, pump, input })
    }

    /// After the command exited: lets the pump drain what the command left in its pipes,
    /// sends the exit status after the last output frame, ends the exchange (which stops the
    /// input thread) and waits for both threads.
    pub fn finish<C: Connection>(self, sink: &FrameSink<C>, status: ExitStatus) {
        let _ = (&self.waker).write_all(&[1]);
        let _ = self.pump.join();
        let _ = sink.json(FrameKind::Response, &ExecResponse::Exit(status));
        sink.shutdown();
        let _ = self.input.join();
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(body)
}

/// STDIN and SIGNAL frames until the host hangs up (or the exchange is shut down).
fn forward_input<C: Connection>(
    mut reader: C,
    mut stdin: StdinTarget,
    sink: &FrameSink<C>,
    group: Group,
) {
    loop {
        let frame = match proto::read_frame(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => return group.kill(),
            Err(e) if e.is_disconnect() => return group.kill(),
            Err(e) => return abort(sink, group, e.code(), e.to_string()),
        };
        match frame.kind {
            FrameKind::Stdin => stdin.forward(&frame.payload),
            FrameKind::Signal => match frame.json::<SignalRequest>() {
                Ok(SignalRequest { signal }) if (1..=64).contains(&signal) => group.signal(signal),
                Ok(SignalRequest { signal }) => {
                    let message = format!("signal {signal} is not a signal number (1 to 64)");
                    return abort(sink, group, ErrorCode::Invalid, message);
                }
                Err(e) => return abort(sink, group, e.code(), e.to_string()),
            },
            other => {
                let message =
                    format!("a {other} frame cannot follow an exec request; send STDIN or SIGNAL");
                return abort(sink, group, ErrorCode::Protocol, message);
            }
        }
    }
}

fn abort<C: Connection>(sink: &FrameSink<C>, group: Group, code: ErrorCode, message: String) {
    sink.fail(code, message);
    group.kill();
}

/// Copies output to frames until every output is closed, the host hangs up, or the command
/// has exited (`woken` readable) and what it left in the pipes is drained.
fn pump_output<C: Connection>(
    mut outputs: Vec<(FrameKind, File)>,
    woken: &UnixStream,
    hangup: &C,
    sink: &FrameSink<C>,
    group: Group,
) {
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut exited = false;
    let mut drain_rounds = 0;
    while !outputs.is_empty() && drain_rounds <= MAX_DRAIN_ROUNDS {
        let mut fds: Vec<libc::pollfd> = outputs
            .iter()
            .map(|(_, file)| poll_entry(file, libc::POLLIN))
            .collect();
        if !exited {
            fds.push(poll_entry(woken, libc::POLLIN));
            fds.push(poll_entry(hangup, libc::POLLRDHUP));
        }
        match poll(&mut fds, if exited { 0 } else { -1 }) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !exited && fds[outputs.len() + 1].revents != 0 {
            return group.kill();
        }
        exited = exited || fds[outputs.len()].revents != 0;
        if read_ready(&mut outputs, &fds, &mut buf, sink).is_err() {
            return group.kill();
        }
        drain_rounds += u32::from(exited);
    }
}

/// Reads once from each ready output and forwards it; closed outputs are dropped. An error
/// means the host can no longer be written to.
fn read_ready<C: Connection>(
    outputs: &mut Vec<(FrameKind, File)>,
    fds: &[libc::pollfd],
    buf: &mut [u8],
    sink: &FrameSink<C>,
) -> io::Result<()> {
    for index in (0..outputs.len()).rev() {
        if fds[index].revents == 0 {
            continue;
        }
        let (kind, file) = &mut outputs[index];
        match file.read(buf) {
            Ok(0) => {
                outputs.remove(index);
            }
            Ok(n) => sink.send(*kind, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EIO is how a pty says its last user closed it; other errors end the output too.
            Err(_) => {
                outputs.remove(index);
            }
        }
    }
    Ok(())
}

fn poll_entry(fd: &impl AsRawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// poll(2), retried on EINTR; returns the number of ready entries.
fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `fds`, valid and writable for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
