//! Reporting a forbidden system call. The filters answer one with SECCOMP_RET_TRAP, so the
//! kernel sends SIGSYS to the thread that made it; the handler here writes one fixed line to
//! stderr naming the thread kind and the system call, counts it in [`SECCOMP_FAULTS`] and
//! ends the process with [`EXIT_SECCOMP_VIOLATION`].
//!
//! The handler is async-signal-safe, and it runs under the very filter that trapped, so it
//! makes only write(2) and exit_group(2), which every filter allows: the line is assembled
//! in a stack buffer, the name comes from a static table, and the thread kind from a
//! constant-initialised thread-local byte.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::syscall_names;
use super::{SeccompError, ThreadKind};

/// `ember`'s exit code when a thread made a system call its filter forbids.
pub const EXIT_SECCOMP_VIOLATION: i32 = 148;

/// Forbidden system calls seen by this process (at most one in practice: the first ends
/// the process). Metrics read it.
pub static SECCOMP_FAULTS: AtomicU64 = AtomicU64::new(0);

/// `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

thread_local! {
    /// The filter this thread runs under, as `ThreadKind as u8 + 1`; 0 for none.
    static THREAD_FILTER: Cell<u8> = const { Cell::new(0) };
}

/// Records which filter the calling thread runs under, for the report line.
pub(super) fn mark_thread(kind: ThreadKind) {
    THREAD_FILTER.with(|k| k.set(kind as u8 + 1));
}

/// The start of `siginfo_t` for SIGSYS on 64-bit Linux (`_sigsys` in the kernel's union,
/// which begins after three ints and padding); libc's `siginfo_t` does not expose it.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// Installs the SIGSYS handler for the whole process. Call once at startup, before any
/// filter is installed; calling again is harmless.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: sigaction is plain data; all-zero is a valid value (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction that outlives the call, and `on_sigsys` has the
    // three-argument signature SA_SIGINFO requires.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } < 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    SECCOMP_FAULTS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo; for SIGSYS its layout
    // starts as `SigsysInfo`.
    let (code, syscall) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code, info.syscall)
    };
    let mut line = Line::new();
    if code == SYS_SECCOMP {
        line.push(b"ember: seccomp: the ");
        line.push(thread_kind_name().as_bytes());
        line.push(b" thread made the forbidden system call ");
        line.push(syscall_name(syscall).as_bytes());
        line.push(b" (");
        line.push_number(syscall);
        line.push(b"); exiting with code ");
    } else {
        line.push(b"ember: SIGSYS sent from outside the seccomp filters; exiting with code ");
    }
    line.push_number(EXIT_SECCOMP_VIOLATION);
    line.push(b"\n");
    // SAFETY: write(2) reads `len` bytes of our stack buffer; _exit(2) ends the process
    // at once without running anything that might not be async-signal-safe.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP_VIOLATION);
    }
}

fn thread_kind_name() -> &'static str {
    match THREAD_FILTER.with(Cell::get) {
        1 => "VMM",
        2 => "vCPU",
        // A thread that traps without having installed a filter inherited one, and only the
        // API filter lets a thread create threads (its connection threads).
        _ => "API",
    }
}

/// The name of x86_64 system call `nr`, or "unknown".
pub fn syscall_name(nr: i32) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| syscall_names::X86_64.get(i))
        .filter(|name| !name.is_empty())
        .copied()
        .unwrap_or("unknown")
}

/// A fixed-size line built without allocating; what does not fit is cut.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut rest = n.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_table() {
        assert_eq!(syscall_name(libc::SYS_read as i32), "read");
        assert_eq!(syscall_name(libc::SYS_openat as i32), "openat");
        assert_eq!(syscall_name(libc::SYS_execve as i32), "execve");
        assert_eq!(syscall_name(libc::SYS_socket as i32), "socket");
        assert_eq!(syscall_name(libc::SYS_ioctl as i32), "ioctl");
        assert_eq!(syscall_name(400), "unknown");
        assert_eq!(syscall_name(-1), "unknown");
        assert_eq!(syscall_name(100_000), "unknown");
    }

    #[test]
    fn lines_hold_numbers_and_cut_what_does_not_fit() {
        let mut line = Line::new();
        line.push(b"nr ");
        line.push_number(0);
        line.push(b" ");
        line.push_number(i32::MIN);
        line.push(b" ");
        line.push_number(257);
        assert_eq!(&line.buf[..line.len], b"nr 0 -2147483648 257");
        line.push(&[b'x'; 400]);
        assert_eq!(line.len, line.buf.len());
    }
}
