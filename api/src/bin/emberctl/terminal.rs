//! Raw mode for the local terminal while an interactive `exec --tty --stdin` runs: keys go to
//! the guest's terminal as typed (no local echo, line editing or Ctrl-C handling), and the
//! saved settings come back when the guard is dropped.

use std::io;

pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin's terminal into raw mode.
    pub fn enable() -> io::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it before it is used.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios for tcgetattr to write.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is an initialised termios; cfmakeraw only edits it.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios read by tcsetattr.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` holds the settings tcgetattr returned; tcsetattr only reads it.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
