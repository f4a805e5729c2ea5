//! The one owner of `waitpid(-1)` in ember-init. As PID 1, init must reap every orphan in the
//! guest; the agent must learn how its own commands ended. Both go through [`Reaper`]: it
//! collects every exited child, hands the status of a registered child to whoever waits for
//! it, and throws the rest away.
//!
//! Children are started with [`Reaper::spawn`], which holds the table lock from before the
//! fork until the pid is registered. [`Reaper::reap`] calls `waitpid` only under that same
//! lock, so no child can be reaped between its fork and its registration, and every status
//! it collects for an unregistered pid belongs to somebody else (an orphan). The lock also
//! keeps std's `Command::spawn` safe: when the exec fails, std reaps that child itself and
//! would panic if we had taken it first.
//!
//! The thread that calls `reap` is woken by SIGCHLD (see `supervise` in main.rs).

use std::collections::BTreeMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A raw wait status, as `waitpid` fills it.
pub type RawStatus = i32;

/// Registered children: `None` while running, the status once reaped.
type Table = BTreeMap<libc::pid_t, Option<RawStatus>>;

pub struct Reaper {
    table: Mutex<Table>,
    exited: Condvar,
}

/// Whether children remain after a call to [`Reaper::reap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remaining {
    Some,
    None,
}

impl Reaper {
    pub const fn new() -> Self {
        Self {
            table: Mutex::new(BTreeMap::new()),
            exited: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts `command` and registers the child; its status comes through the [`Watch`].
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, Watch<'_>)> {
        let mut table = self.lock();
        let child = command.spawn()?;
        let pid = child_pid(&child)?;
        table.insert(pid, None);
        Ok((child, Watch { reaper: self, pid }))
    }

    /// Collects every child that has exited, without blocking.
    pub fn reap(&self) -> Remaining {
        let mut table = self.lock();
        let mut delivered = false;
        let remaining = loop {
            let mut status = 0;
            // SAFETY: waitpid writes only to `status`, a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                delivered |= record(&mut table, pid, status);
                continue;
            }
            if pid == 0 {
                break Remaining::Some;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break Remaining::None;
            }
        };
        drop(table);
        if delivered {
            self.exited.notify_all();
        }
        remaining
    }

    /// Sends `signal` to the process group led by `pid`, but only while that leader is
    /// registered and not yet reaped: once reaped, its pid (and group id) may be reused.
    pub fn signal_group(&self, pid: libc::pid_t, signal: libc::c_int) -> bool {
        let table = self.lock();
        if !matches!(table.get(&pid), Some(None)) {
            return false;
        }
        // SAFETY: kill has no memory effects; the group is ours (see above).
        unsafe { libc::kill(-pid, signal) == 0 }
    }

    /// Sends SIGKILL to the process group of every registered child still running.
    pub fn kill_all_groups(&self) {
        let table = self.lock();
        for (pid, _) in table.iter().filter(|(_, status)| status.is_none()) {
            // SAFETY: as in signal_group; the lock is held, so none of these is reaped yet.
            unsafe { libc::kill(-*pid, libc::SIGKILL) };
        }
    }
}

/// Marks a registered child as exited; true if it was registered.
fn record(table: &mut Table, pid: libc::pid_t, status: RawStatus) -> bool {
    match table.get_mut(&pid) {
        Some(slot) => {
            *slot = Some(status);
            true
        }
        None => false,
    }
}

fn child_pid(child: &Child) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::other(format!("child pid {} out of range", child.id())))
}

/// A registered child: wait for its status here. Dropping the watch unregisters the child.
pub struct Watch<'a> {
    reaper: &'a Reaper,
    pid: libc::pid_t,
}

impl Watch<'_> {
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Blocks until the child has been reaped.
    pub fn wait(&self) -> RawStatus {
        let mut table = self.reaper.lock();
        loop {
            if let Some(Some(status)) = table.get(&self.pid) {
                return *status;
            }
            table = self
                .reaper
                .exited
                .wait(table)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Like [`Watch::wait`], giving up at `deadline`.
    pub fn wait_until(&self, deadline: Instant) -> Option<RawStatus> {
        let mut table = self.reaper.lock();
        loop {
            if let Some(Some(status)) = table.get(&self.pid) {
                return Some(*status);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            table = self
                .reaper
                .exited
                .wait_timeout(table, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.reaper.lock().remove(&self.pid);
    }
}

/// For a `pre_exec` hook: gives the child an empty signal mask and SIGPIPE's default action.
/// ember-init blocks the signals it waits for, and Rust ignores SIGPIPE; both would otherwise
/// be inherited by every command.
pub fn restore_default_signals() -> io::Result<()> {
    // SAFETY: sigemptyset initialises the set before sigprocmask reads it; signal() has no
    // memory effects. All three are async-signal-safe, as a pre_exec hook requires.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    Ok(())
}

/// Splits a raw wait status into (exit code, signal).
pub fn decode(status: RawStatus) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn record_delivers_only_to_registered_pids() {
        let mut table = Table::new();
        table.insert(10, None);
        assert!(record(&mut table, 10, 7 << 8));
        assert!(!record(&mut table, 11, 0), "an orphan is not kept");
        assert_eq!(table.get(&10), Some(&Some(7 << 8)));
        assert!(!table.contains_key(&11));
    }

    #[test]
    fn decode_exit_and_signal() {
        assert_eq!(decode(3 << 8), (Some(3), None));
        assert_eq!(decode(libc::SIGKILL), (None, Some(libc::SIGKILL)));
    }

    #[test]
    fn watch_sees_a_status_delivered_by_another_thread() {
        static REAPER: Reaper = Reaper::new();
        REAPER.lock().insert(4242, None);
        let watch = Watch {
            reaper: &REAPER,
            pid: 4242,
        };
        assert_eq!(watch.wait_until(Instant::now()), None);
        assert!(
            !REAPER.signal_group(31337, libc::SIGKILL),
            "unregistered pid"
        );
        let deliver = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            assert!(record(&mut REAPER.lock(), 4242, 5 << 8));
            REAPER.exited.notify_all();
        });
        assert_eq!(watch.wait(), 5 << 8);
        assert!(!REAPER.signal_group(4242, libc::SIGKILL), "reaped pid");
        deliver.join().unwrap();
        drop(watch);
        assert!(REAPER.lock().is_empty(), "dropping the watch unregisters");
    }
}
