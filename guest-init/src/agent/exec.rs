//! `exec`: starts a command in its own session and process group, with pipes or a pty,
//! streams it (see `session`), enforces the timeout and reports how it ended.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_init::proto::{
    ErrorCode, ExecRequest, ExecResponse, ExitStatus, FrameKind, DEFAULT_KILL_GRACE_MS,
};

use super::session::{ChildIo, ExecThreads, FrameSink, Group, StdinTarget};
use super::{pty, Connection, Failure};
use crate::reaper::{self, Reaper, Watch};

/// The search path commands get unless the request sets PATH.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the request to the end; a failure before the command started is returned (and
/// answered by the caller), later ones are handled on the connection.
pub fn run<C: Connection>(
    reaper: &'static Reaper,
    conn: &mut C,
    request: ExecRequest,
) -> Result<(), Failure> {
    check(&request)?;
    let dup = |conn: &C| {
        conn.try_clone()
            .map_err(|e| Failure::io("cannot duplicate the connection", &e))
    };
    let (writer, reader, hangup) = (dup(conn)?, dup(conn)?, dup(conn)?);
    let (watch, io) = spawn(reaper, &request)?;
    let group = Group {
        pid: watch.pid(),
        reaper,
    };
    let sink = Arc::new(FrameSink::new(writer));
    let pid = watch.pid().unsigned_abs();
    let threads = sink
        .json(FrameKind::Response, &ExecResponse::Started { pid })
        .and_then(|()| ExecThreads::start(io, reader, hangup, &sink, group));
    let threads = match threads {
        Ok(threads) => threads,
        Err(e) => {
            group.kill();
            sink.shutdown();
            watch.wait();
            return Err(Failure::io("cannot stream the command", &e));
        }
    };
    let status = wait_for_exit(&watch, group, &request);
    threads.finish(&sink, status);
    Ok(())
}

fn check(request: &ExecRequest) -> Result<(), Failure> {
    if request.argv.is_empty() || request.argv[0].is_empty() {
        return Err(Failure::invalid("exec needs a non-empty argv"));
    }
    if let Some(cwd) = &request.cwd {
        if !cwd.starts_with('/') {
            return Err(Failure::invalid(format!(
                "cwd {cwd:?} is not an absolute path"
            )));
        }
        let is_dir = std::fs::metadata(cwd).map(|m| m.is_dir());
        match is_dir {
            Ok(true) => {}
            Ok(false) => return Err(Failure::invalid(format!("cwd {cwd} is not a directory"))),
            Err(e) => return Err(Failure::io(format_args!("cannot use cwd {cwd}"), &e)),
        }
    }
    Ok(())
}

/// Waits for the exit; past the timeout, SIGTERM to the group, then SIGKILL after the grace.
fn wait_for_exit(watch: &Watch<'_>, group: Group, request: &ExecRequest) -> ExitStatus {
    let Some(timeout) = request.timeout_ms else {
        return status_of(watch.wait(), false);
    };
    if let Some(raw) = watch.wait_until(Instant::now() + Duration::from_millis(timeout)) {
        return status_of(raw, false);
    }
    group.signal(libc::SIGTERM);
    let grace = request.kill_grace_ms.unwrap_or(DEFAULT_KILL_GRACE_MS);
    let raw = match watch.wait_until(Instant::now() + Duration::from_millis(grace)) {
        Some(raw) => raw,
        None => {
            group.kill();
            watch.wait()
        }
    };
    status_of(raw, true)
}

fn status_of(raw: reaper::RawStatus, timed_out: bool) -> ExitStatus {
    let (code, signal) = reaper::decode(raw);
    ExitStatus {
        code,
        signal,
        timed_out,
    }
}

/// Starts the command with the reaper; returns its watch and the parent's stdio ends.
fn spawn<'r>(reaper: &'r Reaper, request: &ExecRequest) -> Result<(Watch<'r>, ChildIo), Failure> {
    let program = &request.argv[0];
    let mut command = Command::new(program);
    command
        .args(&request.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env(
            "TERM",
            if request.tty {
                "xterm-256color"
            } else {
                "dumb"
            },
        )
        .envs(&request.env);
    if let Some(cwd) = &request.cwd {
        command.current_dir(cwd);
    }
    let tty = request.tty;
    let master = if tty {
        Some(attach_tty(&mut command)?)
    } else {
        attach_pipes(&mut command, request.stdin);
        None
    };
    // SAFETY: the hook runs in the child between fork and exec and only makes async-signal-
    // safe system calls (sigprocmask, signal, setsid, ioctl) on the child's own state.
    unsafe { command.pre_exec(move || lead_new_session(tty)) };
    let spawned = reaper.spawn(&mut command);
    // Dropping the command closes the parent's copies of the terminal's slave end, so that
    // the master sees the terminal close when the command's side does.
    drop(command);
    let (child, watch) = spawned.map_err(|e| spawn_failure(program, &e))?;
    let io = match master {
        Some(master) => tty_io(master, request.stdin),
        None => pipe_io(child),
    };
    match io {
        Ok(io) => Ok((watch, io)),
        Err(e) => {
            reaper.signal_group(watch.pid(), libc::SIGKILL);
            Err(Failure::io("cannot set up the command's stdio", &e))
        }
    }
}

/// In the child: a new session (so the command leads its own process group), and the
/// terminal on stdin as its controlling terminal.
fn lead_new_session(tty: bool) -> io::Result<()> {
    reaper::restore_default_signals()?;
    // SAFETY: setsid takes no arguments and has no memory effects.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY takes an integer argument; stdin is the pty's slave end.
    if tty && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn attach_tty(command: &mut Command) -> Result<File, Failure> {
    let pty = pty::open().map_err(|e| Failure::io("cannot open a pseudo-terminal", &e))?;
    let slave = |pty: &pty::Pty| {
        pty.slave
            .try_clone()
            .map(Stdio::from)
            .map_err(|e| Failure::io("cannot duplicate the terminal", &e))
    };
    command
        .stdin(slave(&pty)?)
        .stdout(slave(&pty)?)
        .stderr(slave(&pty)?);
    Ok(pty.master)
}

fn attach_pipes(command: &mut Command, stdin: bool) {
    command
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
}

fn tty_io(master: File, stdin: bool) -> io::Result<ChildIo> {
    let stdin = if stdin {
        StdinTarget::Tty(master.try_clone()?)
    } else {
        StdinTarget::Ignored
    };
    Ok(ChildIo {
        stdin,
        outputs: vec![(FrameKind::Stdout, master)],
    })
}

fn pipe_io(mut child: Child) -> io::Result<ChildIo> {
    let file = |fd: Option<OwnedFd>| fd.map(File::from).ok_or(io::ErrorKind::BrokenPipe);
    let stdin = match child.stdin.take() {
        Some(pipe) => StdinTarget::Pipe(File::from(OwnedFd::from(pipe))),
        None => StdinTarget::Ignored,
    };
    let stdout = file(child.stdout.take().map(OwnedFd::from))?;
    let stderr = file(child.stderr.take().map(OwnedFd::from))?;
    Ok(ChildIo {
        stdin,
        outputs: vec![(FrameKind::Stdout, stdout), (FrameKind::Stderr, stderr)],
    })
}

fn spawn_failure(program: &str, error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::NotFound => Failure::new(
            ErrorCode::NotFound,
            format!("cannot run {program}: no such program (PATH is searched unless it has a /)"),
        ),
        // std refuses arguments and variables with NUL bytes before forking.
        io::ErrorKind::InvalidInput => Failure::invalid(format!("cannot run {program}: {error}")),
        _ => Failure::io(format_args!("cannot run {program}"), error),
    }
}
