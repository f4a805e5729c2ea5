//! The signals that ask emberctl to stop (SIGINT from Ctrl-C, SIGTERM, SIGHUP from a closed
//! terminal), taken on a thread of their own so that a command can finish what it must
//! (`clone` stops the clones it started) before it exits.
//!
//! The signals are blocked in the calling thread, and so in every thread it starts later,
//! and one thread waits for them with sigwait(2): no signal handler runs, so the code that
//! reacts may lock, print and wait for processes. A program started from emberctl would
//! inherit the blocked signals through exec (std's `Command` keeps the mask), so that
//! `kill PID` or a Ctrl-C in its own terminal could not stop it: [`unblock_in_child`]
//! unblocks them in the child before exec.

use std::io;
use std::os::raw::c_int;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The signals that ask emberctl to stop.
const STOP_SIGNALS: [c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// From now on, a stop signal to emberctl runs `on_signal` with its number on a thread of its
/// own instead of ending emberctl; `on_signal` should end emberctl itself, as later stop
/// signals stay blocked. Call it before any other thread starts: a thread that started
/// earlier would still be ended by the signal.
pub fn on_stop_signal(on_signal: impl FnOnce(c_int) + Send + 'static) -> io::Result<()> {
    let set = stop_signal_set()?;
    // SAFETY: `set` is an initialised signal set that outlives the call; the old mask is not
    // asked for (null).
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if blocked != 0 {
        return Err(io::Error::from_raw_os_error(blocked));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal: c_int = 0;
            // SAFETY: `set` and `signal` are valid for the call; sigwait writes only `signal`.
            // It fails only for a set with invalid signals (EINVAL), which this one is not;
            // on any failure, wait again.
            while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
            on_signal(signal);
        })?;
    Ok(())
}

/// Makes `command`'s child unblock the stop signals before it runs its program, so that it
/// does not inherit emberctl's mask (see the module docs).
pub fn unblock_in_child(command: &mut Command) -> io::Result<()> {
    let set = stop_signal_set()?;
    let unblock = move || {
        // SAFETY: pthread_sigmask is async-signal-safe, so it may run between fork and exec;
        // `set` is an initialised signal set copied into this closure; the old mask is not
        // asked for (null).
        match unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) } {
            0 => Ok(()),
            error => Err(io::Error::from_raw_os_error(error)),
        }
    };
    // SAFETY: `unblock` allocates nothing, takes no lock and calls only pthread_sigmask, which
    // is async-signal-safe: what a closure run in the child of a fork may do.
    unsafe { command.pre_exec(unblock) };
    Ok(())
}

/// The signal's name, for messages.
pub fn name(signal: c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

fn stop_signal_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, and sigemptyset below initialises it completely.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this function.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for signal in STOP_SIGNALS {
        // SAFETY: as above; `signal` is a valid signal number.
        if unsafe { libc::sigaddset(&mut set, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}
