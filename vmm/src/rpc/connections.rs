//! The API socket's open connections: at most [`MAX_CONNECTIONS`] are served at once, and
//! when all places are taken a new client takes the place of the connection that has kept
//! the server waiting longest (an idle keep-alive client, one dribbling a request, or one
//! that does not read its answers). A connection whose request the VMM thread is carrying
//! out is never closed this way, so no answer is lost; only when every connection is in
//! that state is a new client refused. Each request must also arrive whole within
//! [`REQUEST_TIMEOUT`] of the server starting to wait for it.
//!
//! So no number of idle or slow clients can keep a well-behaved one out, and Ember never
//! holds more than [`MAX_CONNECTIONS`] client sockets (plus those it is closing).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::lock;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a whole request (including the idle time before it
/// on a kept-alive connection), and to take an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// One served connection: its socket (to shut it down when it is evicted) and since when
/// it waits for its client, if it does.
struct Slot {
    id: u64,
    fd: RawFd,
    waiting_since: Option<Instant>,
}

/// The served connections.
#[derive(Default)]
pub struct Registry {
    next_id: u64,
    slots: Vec<Slot>,
}

/// A served connection's socket; dropping it ends its place in the registry first, then
/// closes the socket.
pub struct Admitted {
    pub stream: UnixStream,
    id: u64,
    registry: Arc<Mutex<Registry>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // Under the registry's lock, so that an eviction never shuts down an fd number
        // that was closed and reused; the socket closes after this returns.
        lock(&self.registry).slots.retain(|s| s.id != self.id);
    }
}

impl Admitted {
    /// The connection now waits for its client (true) or works for it (false).
    pub fn set_waiting(&self, waiting: bool) {
        let mut registry = lock(&self.registry);
        if let Some(slot) = registry.slots.iter_mut().find(|s| s.id == self.id) {
            slot.waiting_since = waiting.then(Instant::now);
        }
    }
}

/// Admits `stream`, making room by shutting down the connection that has waited longest
/// for its client when all places are taken; gives the stream back when every connection
/// is busy with a request.
pub fn admit(registry: &Arc<Mutex<Registry>>, stream: UnixStream) -> Result<Admitted, UnixStream> {
    let mut guard = lock(registry);
    if guard.slots.len() >= MAX_CONNECTIONS {
        let oldest = guard
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.waiting_since.map(|since| (since, i)))
            .min();
        let Some((_, index)) = oldest else {
            return Err(stream);
        };
        let evicted = guard.slots.swap_remove(index);
        // SAFETY: shutdown takes no pointers. The fd is open: its owner (an `Admitted`)
        // removes its slot under this lock before closing it, and the slot was still
        // here. Its thread then sees end of file or an error and ends.
        unsafe { libc::shutdown(evicted.fd, libc::SHUT_RDWR) };
    }
    let id = guard.next_id;
    guard.next_id += 1;
    guard.slots.push(Slot {
        id,
        fd: stream.as_raw_fd(),
        waiting_since: Some(Instant::now()),
    });
    drop(guard);
    Ok(Admitted {
        stream,
        id,
        registry: registry.clone(),
    })
}

/// A connection's socket with a deadline for the request being read: each read waits
/// at most until the deadline, so a client cannot stretch a request by sending a byte
/// now and then.
pub struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a UnixStream) -> Self {
        Self {
            stream,
            deadline: Instant::now() + REQUEST_TIMEOUT,
        }
    }

    /// The next request must arrive within [`REQUEST_TIMEOUT`] from now.
    pub fn restart(&mut self) {
        self.deadline = Instant::now() + REQUEST_TIMEOUT;
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn a_full_registry_evicts_the_connection_waiting_longest() {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let mut clients = Vec::new();
        let mut served = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (ours, theirs) = pair();
            served.push(admit(&registry, ours).map_err(|_| ()).unwrap());
            clients.push(theirs);
        }
        // The first connection works on a request: it is not evicted, the second is.
        served[0].set_waiting(false);
        let (ours, _theirs) = pair();
        let newest = admit(&registry, ours).map_err(|_| ()).unwrap();
        let mut byte = [0u8; 1];
        clients[1].set_nonblocking(true).unwrap();
        assert_eq!(clients[1].read(&mut byte).unwrap(), 0, "shut down");
        clients[0].set_nonblocking(true).unwrap();
        assert!(clients[0].read(&mut byte).is_err(), "still open");
        assert_eq!(lock(&registry).slots.len(), MAX_CONNECTIONS);
        drop(newest);
        assert_eq!(lock(&registry).slots.len(), MAX_CONNECTIONS - 1);
    }

    #[test]
    fn a_registry_of_busy_connections_refuses() {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let served: Vec<Admitted> = (0..MAX_CONNECTIONS)
            .map(|_| admit(&registry, pair().0).map_err(|_| ()).unwrap())
            .collect();
        served.iter().for_each(|s| s.set_waiting(false));
        assert!(admit(&registry, pair().0).is_err());
    }

    #[test]
    fn a_passed_deadline_times_reads_out() {
        let (ours, mut theirs) = pair();
        let mut stream = Deadline::new(&ours);
        stream.deadline = Instant::now();
        theirs.write_all(b"x").unwrap();
        let err = stream.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        stream.restart();
        assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 1);
    }
}
