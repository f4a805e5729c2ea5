//! One bridged connection: a guest stream socket on one side, a host Unix stream on the
//! other, and the state machine between them.
//!
//! Lifecycle:
//! - host-initiated: `Connecting` (a REQUEST waits for the guest, with a deadline) →
//!   `Established` on the guest's RESPONSE, which writes `OK <host port>\n` to the host;
//!   a RST instead closes the host socket.
//! - guest-initiated: `Established` at once (the host socket connected), RESPONSE queued.
//! - established: bytes move both ways under credit; the guest's SHUTDOWN half-closes the
//!   host socket (SEND) or stops reading it (RCV); host EOF sends SHUTDOWN to the guest. When
//!   neither side will send any more and the guest's bytes are out, the connection is
//!   finished and the guest gets a RST, which ends its socket for good.
//!
//! Guest bytes that the host socket cannot take yet wait in `host_bound`, which a guest that
//! honours our credit never fills beyond [`BUF_ALLOC`]; one that overruns it is reset. Host
//! bytes are read only when the guest has credit and a receive buffer, so they never pile up
//! here: the host socket's own buffer holds them.
//!
//! A guest RST ends the guest side at once, but bytes the guest sent before it were accepted
//! under our credit and must still reach the host: a Linux guest resets a closed socket by
//! itself when our RST is late (its close timeout), which happens when the host client reads
//! slowly. Such a connection drains: nothing more goes to the guest, its buffered bytes are
//! written out as the host socket takes them, and then the host socket is closed. A host
//! client that reads nothing for [`DRAIN_TIMEOUT`] loses them, and that is logged.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::credit::{Credit, BUF_ALLOC};
use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// How long a connection the guest reset may wait for its host client to read more of what
/// the guest sent before the reset.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection's identity: our (host) port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest reset it; its last bytes are still being written to the host.
    Draining,
}

/// What the muxer must do with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Send the guest a RST and drop the connection.
    Reset,
    /// Drop the connection without telling the guest (the guest reset it, or it drained).
    Close,
}

/// The next packet a connection has for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    Nothing,
    /// A packet; an RW packet's payload is in the caller's buffer.
    Packet {
        op: Op,
        flags: u32,
        len: usize,
    },
    Reset,
}

/// Bytes on their way to the host socket. The first `reply` bytes are our `OK` line, not
/// guest data, so they do not count against the guest's credit.
#[derive(Debug, Default)]
struct HostBound {
    bytes: VecDeque<u8>,
    reply: usize,
}

impl HostBound {
    fn guest_bytes(&self) -> usize {
        self.bytes.len() - self.reply
    }

    /// Drops `n` written bytes; returns how many of them were guest data.
    fn consume(&mut self, n: usize) -> usize {
        self.bytes.drain(..n);
        let ours = n.min(self.reply);
        self.reply -= ours;
        if self.bytes.is_empty() && self.bytes.capacity() > BUF_ALLOC as usize / 4 {
            // Idle connections should not keep a large buffer.
            self.bytes = VecDeque::new();
        }
        n - ours
    }
}

/// One bridged connection.
#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    /// The host stream's id on the event loop.
    pub token: u32,
    stream: UnixStream,
    state: State,
    credit: Credit,
    host_bound: HostBound,
    /// Control packets owed to the guest.
    request_pending: bool,
    response_pending: bool,
    credit_requested: bool,
    shutdown_sent: bool,
    /// The host stream may have bytes (edge-triggered: set on events, cleared on WouldBlock).
    readable: bool,
    host_eof: bool,
    host_write_shut: bool,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    /// When a host-initiated connection gives up waiting for the guest.
    pub deadline: Option<Instant>,
    /// Whether the muxer has it queued for the receive queue.
    pub in_rx_queue: bool,
}

impl Connection {
    fn new(key: ConnKey, token: u32, stream: UnixStream, state: State) -> Self {
        Self {
            key,
            token,
            stream,
            state,
            credit: Credit::default(),
            host_bound: HostBound::default(),
            request_pending: false,
            response_pending: false,
            credit_requested: false,
            shutdown_sent: false,
            // Bytes may be waiting already (sent after the CONNECT line, or before the
            // stream was watched), and an edge-triggered watch reports only new ones.
            readable: true,
            host_eof: false,
            host_write_shut: false,
            guest_shut_send: false,
            guest_shut_recv: false,
            deadline: None,
            in_rx_queue: false,
        }
    }

    /// A host client asked for guest port `key.peer_port`; the REQUEST is owed.
    pub fn host_initiated(key: ConnKey, token: u32, stream: UnixStream, deadline: Instant) -> Self {
        let mut conn = Self::new(key, token, stream, State::Connecting);
        conn.request_pending = true;
        conn.deadline = Some(deadline);
        conn
    }

    /// The guest's REQUEST reached a host listener; the RESPONSE is owed.
    pub fn guest_initiated(key: ConnKey, token: u32, stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(key, token, stream, State::Established);
        conn.credit.update_peer(request.buf_alloc, request.fwd_cnt);
        conn.response_pending = true;
        conn
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Handles a packet the guest sent on this connection (REQUEST is the muxer's).
    pub fn on_guest_packet(&mut self, header: &Header, op: Op, payload: &[u8]) -> Verdict {
        self.credit.update_peer(header.buf_alloc, header.fwd_cnt);
        match (self.state, op) {
            (State::Draining, _) => Verdict::Keep,
            (State::Established, Op::Rst) if self.host_bound.guest_bytes() > 0 => self.drain(),
            (_, Op::Rst) => Verdict::Close,
            (State::Connecting, Op::Response) => self.accept(),
            (State::Connecting, _) => Verdict::Reset,
            (State::Established, Op::Request | Op::Response) => Verdict::Reset,
            (State::Established, Op::Rw) => self.guest_data(payload),
            (State::Established, Op::CreditUpdate) => Verdict::Keep,
            (State::Established, Op::CreditRequest) => {
                self.credit_requested = true;
                Verdict::Keep
            }
            (State::Established, Op::Shutdown) => self.guest_shutdown(header.flags),
        }
    }

    /// The guest reset the connection with bytes of its own still on their way to the host:
    /// they go out first (see the module docs).
    fn drain(&mut self) -> Verdict {
        self.state = State::Draining;
        self.deadline = Some(Instant::now() + DRAIN_TIMEOUT);
        self.flush()
    }

    /// The guest accepted a host-initiated connection: tell the host client.
    fn accept(&mut self) -> Verdict {
        self.state = State::Established;
        self.deadline = None;
        let reply = format!("OK {}\n", self.key.local_port);
        self.host_bound.reply = reply.len();
        self.host_bound.bytes.extend(reply.as_bytes());
        self.flush()
    }

    /// Guest data for the host: written now if possible, else buffered within our credit.
    fn guest_data(&mut self, payload: &[u8]) -> Verdict {
        if self.guest_shut_send {
            return Verdict::Reset;
        }
        if self.host_bound.guest_bytes() + payload.len() > BUF_ALLOC as usize {
            // The guest sent more than we gave it credit for.
            return Verdict::Reset;
        }
        let mut rest = payload;
        if self.host_bound.bytes.is_empty() {
            match write_some(&self.stream, rest) {
                Ok(n) => {
                    self.credit.record_forwarded(n as u32);
                    rest = &rest[n..];
                }
                Err(_) => return Verdict::Reset,
            }
        }
        self.host_bound.bytes.extend(rest);
        Verdict::Keep
    }

    fn guest_shutdown(&mut self, flags: u32) -> Verdict {
        // Reserved flag bits are ignored, as the spec asks of a receiver.
        self.guest_shut_recv |= flags & SHUTDOWN_RCV != 0;
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.flush()
    }

    /// Writes buffered bytes to the host; half-closes it once the guest has said it will
    /// send no more and everything it sent is out.
    fn flush(&mut self) -> Verdict {
        while !self.host_bound.bytes.is_empty() {
            let (front, _) = self.host_bound.bytes.as_slices();
            match write_some(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    let guest = self.host_bound.consume(n);
                    self.credit.record_forwarded(guest as u32);
                    if self.state == State::Draining {
                        // The client is reading: its time runs from its last read.
                        self.deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                    }
                }
                // The guest reset a draining connection already: it is owed no RST.
                Err(_) if self.state == State::Draining => return Verdict::Close,
                Err(_) => return Verdict::Reset,
            }
        }
        if self.state == State::Draining && self.host_bound.bytes.is_empty() {
            return Verdict::Close;
        }
        if self.host_bound.bytes.is_empty() && self.guest_shut_send && !self.host_write_shut {
            // A host peer that is gone shows up on the next read; nothing to do here.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        Verdict::Keep
    }

    /// The host stream is readable and/or writable (or hung up, which both report).
    pub fn on_host_event(&mut self, readable: bool, writable: bool) -> Verdict {
        self.readable |= readable;
        if writable && matches!(self.state, State::Established | State::Draining) {
            return self.flush();
        }
        Verdict::Keep
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_shut_recv
            && self.credit.peer_credit() > 0
    }

    /// True when [`Self::next_packet`] may have something for the guest.
    pub fn has_rx_work(&self) -> bool {
        if self.state == State::Draining {
            return false;
        }
        if self.request_pending {
            return true;
        }
        self.state == State::Established
            && (self.response_pending
                || self.can_send_data()
                || (self.host_eof && !self.shutdown_sent)
                || self.credit_requested
                || self.credit.update_due())
    }

    /// The next packet for the guest, with room for `room` payload bytes in `buf`.
    pub fn next_packet(&mut self, room: usize, buf: &mut [u8]) -> Outgoing {
        if std::mem::take(&mut self.request_pending) {
            return packet(Op::Request, 0, 0);
        }
        if self.state != State::Established {
            return Outgoing::Nothing;
        }
        if std::mem::take(&mut self.response_pending) {
            return packet(Op::Response, 0, 0);
        }
        let max = room.min(buf.len()).min(self.credit.peer_credit() as usize);
        if self.can_send_data() && max > 0 {
            match read_some(&self.stream, &mut buf[..max]) {
                Ok(Some(0)) => self.host_eof = true,
                Ok(Some(n)) => {
                    self.credit.record_sent(n as u32);
                    return packet(Op::Rw, 0, n);
                }
                Ok(None) => self.readable = false,
                Err(_) => return Outgoing::Reset,
            }
        }
        if self.host_eof && !self.shutdown_sent {
            self.shutdown_sent = true;
            return packet(Op::Shutdown, SHUTDOWN_SEND, 0);
        }
        if self.credit_requested || self.credit.update_due() {
            return packet(Op::CreditUpdate, 0, 0);
        }
        Outgoing::Nothing
    }

    /// The credit fields for a packet to the guest; any packet answers a CREDIT_REQUEST.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.credit_requested = false;
        self.credit.stamp()
    }

    /// Neither side will send more and the guest's bytes are all out: time for the RST.
    pub fn is_finished(&self) -> bool {
        self.state == State::Established
            && self.guest_shut_send
            && self.host_write_shut
            && (self.host_eof || self.guest_shut_recv)
    }

    /// True when the guest has shut down both directions (how a closing guest socket ends),
    /// or had not accepted the connection yet (a RST then is a refusal).
    pub fn guest_shut_down(&self) -> bool {
        self.state == State::Connecting || (self.guest_shut_send && self.guest_shut_recv)
    }

    /// Guest bytes still waiting for the host socket.
    pub fn undelivered(&self) -> usize {
        self.host_bound.guest_bytes()
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

fn packet(op: Op, flags: u32, len: usize) -> Outgoing {
    Outgoing::Packet { op, flags, len }
}

/// Writes what the stream takes now: Ok(0) when it would block.
fn write_some(mut stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        return match stream.write(data) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other,
        };
    }
}

/// Reads what the stream has: Ok(None) when it would block, Ok(Some(0)) at EOF.
fn read_some(mut stream: &UnixStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        return match stream.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::credit::UPDATE_THRESHOLD;
    use crate::devices::virtio::vsock::HOST_CID;

    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 1024,
    };

    fn pair() -> (UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        (ours, theirs)
    }

    fn guest(op: Op, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            kind: 1,
            op: op.raw(),
            flags,
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    fn established() -> (Connection, UnixStream) {
        let (ours, theirs) = pair();
        let mut c = Connection::guest_initiated(KEY, 7, ours, &guest(Op::Request, 0, 65536, 0));
        let mut buf = [0u8; 16];
        assert_eq!(c.next_packet(16, &mut buf), packet(Op::Response, 0, 0));
        (c, theirs)
    }

    fn read_all(mut s: &UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn host_initiated_handshake_then_ok_line_then_data() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::host_initiated(KEY, 7, ours, Instant::now());
        let mut buf = [0u8; 64];
        assert!(c.has_rx_work());
        assert_eq!(c.next_packet(64, &mut buf), packet(Op::Request, 0, 0));
        theirs.write_all(b"early").unwrap();
        assert_eq!(
            c.next_packet(64, &mut buf),
            Outgoing::Nothing,
            "no data before RESPONSE"
        );
        assert!(!c.has_rx_work());
        let response = guest(Op::Response, 0, 4096, 0);
        assert_eq!(
            c.on_guest_packet(&response, Op::Response, &[]),
            Verdict::Keep
        );
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.deadline, None);
        assert_eq!(read_all(&theirs), format!("OK {}\n", 1u32 << 30).as_bytes());
        assert_eq!(c.next_packet(64, &mut buf), packet(Op::Rw, 0, 5));
        assert_eq!(&buf[..5], b"early");
        assert_eq!(
            c.on_guest_packet(&guest(Op::Rw, 0, 4096, 0), Op::Rw, b"hi"),
            Verdict::Keep
        );
        assert_eq!(read_all(&theirs), b"hi");
    }

    #[test]
    fn connecting_accepts_only_response_or_rst() {
        for (op, verdict) in [
            (Op::Rst, Verdict::Close),
            (Op::Rw, Verdict::Reset),
            (Op::Shutdown, Verdict::Reset),
            (Op::Request, Verdict::Reset),
            (Op::CreditRequest, Verdict::Reset),
        ] {
            let (ours, _theirs) = pair();
            let mut c = Connection::host_initiated(KEY, 7, ours, Instant::now());
            assert_eq!(
                c.on_guest_packet(&guest(op, 0, 0, 0), op, &[]),
                verdict,
                "{op:?}"
            );
        }
        let (ours, _theirs) = pair();
        let mut c = Connection::host_initiated(KEY, 7, ours, Instant::now());
        assert!(!c.expired(Instant::now() - std::time::Duration::from_secs(1)));
        assert!(c.expired(Instant::now()));
        c.on_guest_packet(&guest(Op::Response, 0, 0, 0), Op::Response, &[]);
        assert!(!c.expired(Instant::now() + std::time::Duration::from_secs(3600)));
    }

    #[test]
    fn established_refuses_a_second_handshake() {
        let (mut c, _theirs) = established();
        for op in [Op::Request, Op::Response] {
            assert_eq!(
                c.on_guest_packet(&guest(op, 0, 0, 0), op, &[]),
                Verdict::Reset
            );
        }
    }

    #[test]
    fn host_data_never_exceeds_guest_credit() {
        let (mut c, mut theirs) = established();
        c.on_guest_packet(&guest(Op::CreditUpdate, 0, 100, 0), Op::CreditUpdate, &[]);
        theirs.write_all(&[1u8; 1000]).unwrap();
        let mut buf = [0u8; 4096];
        assert_eq!(c.next_packet(4096, &mut buf), packet(Op::Rw, 0, 100));
        assert!(!c.has_rx_work(), "no credit, so the host is not read");
        assert_eq!(c.next_packet(4096, &mut buf), Outgoing::Nothing);
        c.on_guest_packet(&guest(Op::CreditUpdate, 0, 100, 60), Op::CreditUpdate, &[]);
        assert_eq!(c.next_packet(4096, &mut buf), packet(Op::Rw, 0, 60));
        assert_eq!(
            c.next_packet(30, &mut buf),
            Outgoing::Nothing,
            "credit used up"
        );
        c.on_guest_packet(
            &guest(Op::CreditUpdate, 0, 1 << 20, 160),
            Op::CreditUpdate,
            &[],
        );
        assert_eq!(
            c.next_packet(30, &mut buf),
            packet(Op::Rw, 0, 30),
            "room caps too"
        );
    }

    #[test]
    fn guest_data_beyond_our_credit_resets() {
        let (mut c, theirs) = established();
        // The host does not read, so guest data piles up until the socket buffer is full.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        let verdict = loop {
            let v = c.on_guest_packet(&guest(Op::Rw, 0, 65536, 0), Op::Rw, &chunk);
            if v != Verdict::Keep {
                break v;
            }
            sent += chunk.len();
            assert!(sent < 64 << 20, "never reset");
        };
        assert_eq!(verdict, Verdict::Reset);
        assert!(c.host_bound.guest_bytes() <= BUF_ALLOC as usize);
        drop(theirs);
    }

    #[test]
    fn buffered_guest_data_flushes_in_order_and_frees_credit() {
        let (mut c, theirs) = established();
        let mut expected = Vec::new();
        let mut i = 0u32;
        // Fill the socket and some of our buffer.
        while c.host_bound.bytes.len() < 100_000 {
            let chunk: Vec<u8> = (0..4096u32).map(|j| (i * 31 + j) as u8).collect();
            assert_eq!(
                c.on_guest_packet(&guest(Op::Rw, 0, 65536, 0), Op::Rw, &chunk),
                Verdict::Keep
            );
            expected.extend_from_slice(&chunk);
            i += 1;
        }
        let mut got = Vec::new();
        while got.len() < expected.len() {
            got.extend(read_all(&theirs));
            assert_eq!(c.on_host_event(false, true), Verdict::Keep);
        }
        assert_eq!(got, expected);
        assert!(c.credit.update_due() || expected.len() < UPDATE_THRESHOLD as usize);
        let mut buf = [0u8; 16];
        assert_eq!(c.next_packet(16, &mut buf), packet(Op::CreditUpdate, 0, 0));
        let (buf_alloc, fwd) = c.stamp();
        assert_eq!((buf_alloc, fwd as usize), (BUF_ALLOC, expected.len()));
    }

    #[test]
    fn credit_request_is_answered() {
        let (mut c, _theirs) = established();
        c.on_guest_packet(&guest(Op::CreditRequest, 0, 0, 0), Op::CreditRequest, &[]);
        assert!(c.has_rx_work());
        let mut buf = [0u8; 16];
        assert_eq!(c.next_packet(16, &mut buf), packet(Op::CreditUpdate, 0, 0));
        c.stamp();
        assert!(!c.has_rx_work());
    }

    #[test]
    fn guest_half_close_shuts_the_host_write_side_after_flushing() {
        let (mut c, theirs) = established();
        c.on_guest_packet(&guest(Op::Rw, 0, 4096, 0), Op::Rw, b"last words");
        c.on_guest_packet(
            &guest(Op::Shutdown, SHUTDOWN_SEND, 4096, 0),
            Op::Shutdown,
            &[],
        );
        assert_eq!(read_all(&theirs), b"last words", "then EOF");
        assert!(!c.is_finished(), "the host may still answer");
        assert_eq!(
            c.on_guest_packet(&guest(Op::Rw, 0, 4096, 0), Op::Rw, b"more"),
            Verdict::Reset,
            "data after SHUTDOWN(SEND)"
        );
        (&theirs).write_all(b"answer").unwrap();
        theirs.shutdown(Shutdown::Write).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(c.next_packet(64, &mut buf), packet(Op::Rw, 0, 6));
        assert_eq!(
            c.next_packet(64, &mut buf),
            packet(Op::Shutdown, SHUTDOWN_SEND, 0)
        );
        assert!(c.is_finished());
    }

    #[test]
    fn host_eof_sends_shutdown_and_guest_close_finishes() {
        let (mut c, theirs) = established();
        drop(theirs);
        let mut buf = [0u8; 64];
        assert_eq!(
            c.next_packet(64, &mut buf),
            packet(Op::Shutdown, SHUTDOWN_SEND, 0)
        );
        assert!(!c.has_rx_work());
        assert!(!c.is_finished());
        c.on_guest_packet(
            &guest(Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0),
            Op::Shutdown,
            &[],
        );
        assert!(c.is_finished());
    }

    #[test]
    fn guest_full_close_stops_reading_the_host() {
        let (mut c, mut theirs) = established();
        theirs.write_all(b"unwanted").unwrap();
        c.on_guest_packet(
            &guest(Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND | 0xf0, 4096, 0),
            Op::Shutdown,
            &[],
        );
        assert!(c.is_finished());
        assert!(!c.has_rx_work());
    }

    #[test]
    fn a_guest_reset_still_delivers_what_the_guest_sent_before_it() {
        let (mut c, theirs) = established();
        // The host client is slow: the socket fills and the rest waits in our buffer.
        let mut expected = Vec::new();
        let mut i = 0u32;
        while c.undelivered() < 100_000 {
            let chunk: Vec<u8> = (0..4096u32).map(|j| (i * 7 + j) as u8).collect();
            let v = c.on_guest_packet(&guest(Op::Rw, 0, 65536, 0), Op::Rw, &chunk);
            assert_eq!(v, Verdict::Keep);
            expected.extend_from_slice(&chunk);
            i += 1;
        }
        // The guest closes, and resets before our RST comes (its close timeout).
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        c.on_guest_packet(&guest(Op::Shutdown, both, 65536, 0), Op::Shutdown, &[]);
        assert_eq!(
            c.on_guest_packet(&guest(Op::Rst, 0, 0, 0), Op::Rst, &[]),
            Verdict::Keep,
            "bytes are still owed to the host"
        );
        assert_eq!(c.state(), State::Draining);
        assert!(c.deadline.is_some(), "draining is bounded");
        assert!(!c.has_rx_work(), "nothing more for the guest");
        let mut buf = [0u8; 64];
        assert_eq!(c.next_packet(64, &mut buf), Outgoing::Nothing);
        assert_eq!(
            c.on_guest_packet(&guest(Op::Rw, 0, 65536, 0), Op::Rw, b"late"),
            Verdict::Keep,
            "packets after the reset are ignored"
        );
        let mut got = Vec::new();
        let verdict = loop {
            got.extend(read_all(&theirs));
            let v = c.on_host_event(false, true);
            if v != Verdict::Keep {
                break v;
            }
        };
        assert_eq!(verdict, Verdict::Close, "drained, then closed");
        drop(c);
        got.extend(read_all(&theirs));
        assert_eq!(got, expected);
    }

    #[test]
    fn a_draining_connection_times_out_from_the_last_read_and_closes_if_its_client_goes() {
        let (mut c, mut theirs) = established();
        while c.undelivered() < 100_000 {
            let v = c.on_guest_packet(&guest(Op::Rw, 0, 65536, 0), Op::Rw, &[3u8; 4096]);
            assert_eq!(v, Verdict::Keep);
        }
        c.on_guest_packet(&guest(Op::Rst, 0, 0, 0), Op::Rst, &[]);
        assert_eq!(c.state(), State::Draining);
        let first_deadline = c.deadline.unwrap();
        // The client reads a little: its time runs from then.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut buf = [0u8; 4096];
        assert_eq!(theirs.read(&mut buf).unwrap(), 4096);
        assert_eq!(c.on_host_event(false, true), Verdict::Keep);
        assert!(c.deadline.unwrap() > first_deadline);
        // The client goes away: the rest cannot be delivered, and the guest is owed no RST.
        drop(theirs);
        assert_eq!(c.on_host_event(true, true), Verdict::Close);
        assert!(c.undelivered() > 0);
    }

    #[test]
    fn a_guest_reset_with_nothing_buffered_closes_at_once() {
        let (mut c, theirs) = established();
        c.on_guest_packet(&guest(Op::Rw, 0, 4096, 0), Op::Rw, b"delivered");
        assert!(!c.guest_shut_down());
        assert_eq!(
            c.on_guest_packet(&guest(Op::Rst, 0, 0, 0), Op::Rst, &[]),
            Verdict::Close
        );
        assert_eq!(read_all(&theirs), b"delivered");
    }

    #[test]
    fn host_write_failure_resets() {
        let (mut c, theirs) = established();
        drop(theirs);
        assert_eq!(
            c.on_guest_packet(&guest(Op::Rw, 0, 4096, 0), Op::Rw, b"x"),
            Verdict::Reset
        );
    }
}
