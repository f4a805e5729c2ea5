//! Pseudo-terminals for `exec` with `tty`: the master stays with the agent, the slave becomes
//! the command's stdin, stdout, stderr and controlling terminal. Both ends are opened
//! close-on-exec from the start (TIOCGPTPEER, Linux 4.13+), so a command spawned at the same
//! moment by another connection never inherits them; an inherited slave would keep this
//! terminal open after its command exits.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Rows and columns a new terminal reports (the protocol has no window size yet).
const ROWS: u16 = 24;
const COLUMNS: u16 = 80;

pub struct Pty {
    pub master: File,
    pub slave: File,
}

/// Opens a new pseudo-terminal pair.
pub fn open() -> io::Result<Pty> {
    // std opens with O_CLOEXEC; O_NOCTTY keeps the agent itself from acquiring the terminal.
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags by value and returns a new descriptor.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let slave = unsafe { File::from_raw_fd(fd) };
    set_window_size(&master)?;
    Ok(Pty { master, slave })
}

fn set_window_size(master: &File) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: ROWS,
        ws_col: COLUMNS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, valid for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_written_to_the_slave_come_out_of_the_master() {
        let Pty {
            mut master,
            mut slave,
        } = open().unwrap();
        slave.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 64];
        let n = master.read(&mut buf).unwrap();
        // The line discipline turns \n into \r\n by default.
        assert_eq!(&buf[..n], b"hello\r\n");
    }

    #[test]
    fn both_ends_are_close_on_exec() {
        let pty = open().unwrap();
        for file in [&pty.master, &pty.slave] {
            // SAFETY: F_GETFD only queries the descriptor.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }
}
