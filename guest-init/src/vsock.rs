//! A small safe wrapper over `AF_VSOCK` stream sockets: a listener bound to any CID and a
//! stream that implements `Read`, `Write` and `AsRawFd`. std has no vsock support; this is the
//! part of it the agent needs.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The host's CID.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid and the reserved fields must be 0.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for connections to any of this machine's CIDs.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) takes no pointers; `fd` is a bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: null address pointers are allowed: the peer's address is not needed.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(VsockStream { fd });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Connects to `port` on the machine with `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = address(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// A second handle on the same connection (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// Shuts both directions down, waking any thread blocked reading.
    pub fn shutdown(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) takes no pointers.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets or clears (`None`) the receive timeout.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let timeout = timeout.unwrap_or_default();
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: `tv` is a valid timeval whose size is passed along; it outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`, writable for the call.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        send_backing_off(buf, |chunk| {
            // SAFETY: the pointer and length describe `chunk`, readable for the call.
            // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
            let n =
                unsafe { libc::send(fd, chunk.as_ptr().cast(), chunk.len(), libc::MSG_NOSIGNAL) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How many times a send the guest kernel found no memory for is tried again.
const MEMORY_RETRIES: u32 = 20;
/// The longest pause between two such tries (they start at 1 ms and double).
const MAX_MEMORY_PAUSE: Duration = Duration::from_millis(200);
/// The smallest send a retry shrinks to.
const MIN_RETRY_SEND: usize = 4096;

/// Sends what `send` takes of `buf`. The guest kernel allocates a buffer per vsock packet
/// of up to 64 KiB, in one piece: an allocation that can fail when memory is fragmented,
/// with plenty of it free. ENOMEM or ENOBUFS then means "not now", not a broken
/// connection: the send is tried again after a pause that doubles (about 2.5 s in all),
/// each time with half the bytes, down to a page. What still fails is returned and said
/// on the console, as the connection then ends without an answer to the host.
pub fn send_backing_off(
    buf: &[u8],
    mut send: impl FnMut(&[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut len = buf.len();
    let mut pause = Duration::from_millis(1);
    for _ in 0..MEMORY_RETRIES {
        match send(&buf[..len]) {
            Err(e) if is_out_of_memory(&e) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_MEMORY_PAUSE);
                len = (len / 2).max(MIN_RETRY_SEND.min(buf.len()));
            }
            other => return other,
        }
    }
    let last = send(&buf[..len]);
    if let Err(e) = &last {
        if is_out_of_memory(e) {
            guest_init::report::console_line(&format!(
                "ember-init: agent: a vsock send of {len} bytes found no kernel memory \
                 {} times in a row: {e}",
                MEMORY_RETRIES + 1
            ));
        }
    }
    last
}

fn is_out_of_memory(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOMEM | libc::ENOBUFS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enomem() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOMEM)
    }

    #[test]
    fn a_send_without_kernel_memory_is_retried_smaller() {
        let buf = vec![0u8; 64 << 10];
        let mut tried = Vec::new();
        // The kernel finds memory only for packets of 16 KiB or less.
        let sent = send_backing_off(&buf, |chunk| {
            tried.push(chunk.len());
            if chunk.len() > 16 << 10 {
                Err(enomem())
            } else {
                Ok(chunk.len())
            }
        });
        assert_eq!(sent.unwrap(), 16 << 10);
        assert_eq!(tried, [64 << 10, 32 << 10, 16 << 10]);
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut calls = 0;
        let sent = send_backing_off(b"data", |_| {
            calls += 1;
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        });
        assert_eq!(sent.unwrap_err().raw_os_error(), Some(libc::EPIPE));
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_send_that_never_finds_memory_fails_in_the_end() {
        let mut calls = 0;
        let sent = send_backing_off(&[0u8; 100], |chunk| {
            calls += 1;
            assert_eq!(chunk.len(), 100, "never below the page floor or the buffer");
            Err(enomem())
        });
        assert_eq!(sent.unwrap_err().raw_os_error(), Some(libc::ENOMEM));
        assert_eq!(calls, MEMORY_RETRIES + 1);
    }
}
