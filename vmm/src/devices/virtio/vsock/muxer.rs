//! Routes between the guest's packets and the host's Unix sockets: the listener that host
//! clients connect to, clients still sending their `CONNECT` line, and the connections.
//!
//! The muxer knows nothing of epoll: it is handed a [`Watcher`] to start and stop watching
//! host streams, and is told which stream an event was for by its token. Streams are watched
//! edge-triggered; each connection remembers whether its stream may be readable.
//!
//! Packets for the guest come out of [`Muxer::next_rx`] one receive buffer at a time: first
//! any RST owed to the guest, then connections with something to send, in turn. Limits keep
//! a hostile guest or host from making us hold more: at most [`MAX_CONNECTIONS`] clients
//! and connections, at most [`MAX_QUEUED_RESETS`] RSTs waiting, at most the advertised
//! credit of guest data per connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connection::{ConnKey, Connection, Outgoing, State, Verdict, DRAIN_TIMEOUT};
use super::handshake::{PendingClient, Progress};
use super::packet::{Header, Op, PacketError, TxPacket, TYPE_STREAM};
use super::{bump, unix, VsockCounters, VsockError, HOST_CID};

/// Most host clients and connections alive at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Abnormal connection ends (reset by the VMM, or by the guest before it shut the
/// connection down) a device logs before it only counts them (a hostile guest can cause any
/// number).
const MAX_LOGGED_ENDS: u32 = 16;
/// Most RSTs waiting for receive buffers; beyond, they are dropped (and counted).
pub const MAX_QUEUED_RESETS: usize = 256;
/// How long a host client may take to send its line and the guest to answer its REQUEST.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Host ports for host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Stream tokens start here; lower values are left for the device's own fds.
const FIRST_TOKEN: u32 = 16;

/// Starts and stops watching host streams: the event loop in production.
pub trait Watcher {
    /// Watches `fd` (readable, writable, hang-up; edge-triggered), reporting `token`.
    fn watch(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
    /// Stops watching `fd`; called before the stream is closed.
    fn unwatch(&mut self, fd: RawFd);
}

/// The host side of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    clients: HashMap<u32, PendingClient>,
    conns: HashMap<ConnKey, Connection>,
    /// Stream token to connection.
    tokens: HashMap<u32, ConnKey>,
    /// Connections that may have a packet for the guest, in turn.
    rx_ready: VecDeque<ConnKey>,
    /// RSTs owed to the guest for connections that are gone (or never were).
    resets: VecDeque<ConnKey>,
    next_port: u32,
    next_token: u32,
    counters: Arc<VsockCounters>,
    /// Abnormal connection ends logged so far.
    logged_ends: u32,
}

impl Muxer {
    /// Listens at `uds_path` for host clients.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        counters: Arc<VsockCounters>,
    ) -> Result<Self, VsockError> {
        Ok(Self {
            guest_cid,
            uds_path: uds_path.into(),
            listener: unix::listen(uds_path)?,
            clients: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            rx_ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            next_token: FIRST_TOKEN,
            counters,
            logged_ends: 0,
        })
    }

    /// Where host clients connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    fn live(&self) -> usize {
        self.clients.len() + self.conns.len()
    }

    /// Number of connections (host clients past their line, and guest connections).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Accepts every waiting host client.
    pub fn accept_clients(&mut self, watcher: &mut dyn Watcher, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: all taken. Anything else (out of fds): the level-triggered
                // listener brings us back.
                Err(_) => return,
            };
            if self.live() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                bump(&self.counters.refused, 1);
                continue;
            }
            let token = self.alloc_token();
            if watcher.watch(stream.as_raw_fd(), token).is_err() {
                bump(&self.counters.refused, 1);
                continue;
            }
            let client = PendingClient::new(stream, now + HANDSHAKE_TIMEOUT);
            self.clients.insert(token, client);
            self.client_event(token, watcher, now);
        }
    }

    /// A host stream (client or connection) has events.
    pub fn host_event(
        &mut self,
        token: u32,
        readable: bool,
        writable: bool,
        watcher: &mut dyn Watcher,
        now: Instant,
    ) {
        if self.clients.contains_key(&token) {
            self.client_event(token, watcher, now);
        } else if let Some(&key) = self.tokens.get(&token) {
            if let Some(conn) = self.conns.get_mut(&key) {
                let verdict = conn.on_host_event(readable, writable);
                self.settle(key, verdict, watcher);
            }
        }
    }

    fn client_event(&mut self, token: u32, watcher: &mut dyn Watcher, now: Instant) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        match client.read_line() {
            Progress::Waiting => {}
            Progress::Failed => {
                self.drop_client(token, watcher);
                bump(&self.counters.refused, 1);
            }
            Progress::Connect(guest_port) => {
                let Some(client) = self.clients.remove(&token) else {
                    return;
                };
                let Some(local_port) = self.alloc_port() else {
                    watcher.unwatch(client.stream.as_raw_fd());
                    bump(&self.counters.refused, 1);
                    return;
                };
                let key = ConnKey {
                    local_port,
                    peer_port: guest_port,
                };
                let conn =
                    Connection::host_initiated(key, token, client.stream, now + HANDSHAKE_TIMEOUT);
                self.insert(conn);
                self.settle(key, Verdict::Keep, watcher);
            }
        }
    }

    /// Handles a checked packet from the guest; `payload` is its data.
    pub fn guest_packet(&mut self, packet: &TxPacket, payload: &[u8], watcher: &mut dyn Watcher) {
        let header = &packet.header;
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        bump(&self.counters.tx_bytes, payload.len() as u64);
        match (packet.op, self.conns.get_mut(&key)) {
            (Op::Request, None) => self.guest_connect(key, header, watcher),
            // The guest reuses a live pair: both ends are confused, so both go.
            (Op::Request, Some(_)) => self.reset(
                key,
                "the guest sent a REQUEST for an open connection",
                watcher,
            ),
            (Op::Rst, None) => {}
            (_, None) => self.queue_reset(key),
            (op, Some(conn)) => {
                let verdict = conn.on_guest_packet(header, op, payload);
                self.settle(key, verdict, watcher);
            }
        }
    }

    /// A guest packet was refused; resets the connection it names when its addresses are good.
    pub fn guest_fault(&mut self, error: &PacketError, watcher: &mut dyn Watcher) {
        let Some(header) = error.reset_target() else {
            return;
        };
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if self.conns.contains_key(&key) {
            self.reset(key, "the guest sent a malformed packet on it", watcher);
        } else if header.op != Op::Rst.raw() {
            self.queue_reset(key);
        }
    }

    /// Bridges the guest's REQUEST to `<uds_path>_<port>`, or refuses it with a RST.
    fn guest_connect(&mut self, key: ConnKey, request: &Header, watcher: &mut dyn Watcher) {
        if self.live() >= MAX_CONNECTIONS {
            bump(&self.counters.refused, 1);
            return self.queue_reset(key);
        }
        let path = unix::service_path(&self.uds_path, key.local_port);
        let Ok(stream) = unix::connect(&path) else {
            bump(&self.counters.refused, 1);
            return self.queue_reset(key);
        };
        let token = self.alloc_token();
        if watcher.watch(stream.as_raw_fd(), token).is_err() {
            return self.queue_reset(key);
        }
        self.insert(Connection::guest_initiated(key, token, stream, request));
        self.settle(key, Verdict::Keep, watcher);
    }

    fn insert(&mut self, conn: Connection) {
        bump(&self.counters.connections, 1);
        self.tokens.insert(conn.token, conn.key);
        self.conns.insert(conn.key, conn);
    }

    /// Applies a connection's verdict, finishes it when both sides are done, and queues it
    /// for the receive queue when it has something for the guest.
    fn settle(&mut self, key: ConnKey, verdict: Verdict, watcher: &mut dyn Watcher) {
        match verdict {
            Verdict::Close => {
                match self
                    .conns
                    .get(&key)
                    .map(|c| (c.undelivered(), c.guest_shut_down()))
                {
                    Some((lost @ 1.., _)) => self.warn(
                        key,
                        &format!(
                            "the guest reset it and its host client went away; the guest's \
                             last {lost} bytes were dropped"
                        ),
                    ),
                    // A guest that closes its socket says SHUTDOWN first; a RST on a
                    // connection it had not shut down means its side failed, which the host
                    // client only sees as an end of stream.
                    Some((0, false)) => {
                        self.warn(key, "the guest reset it before shutting it down");
                    }
                    _ => {}
                }
                self.remove(key, watcher)
            }
            Verdict::Reset => self.reset(
                key,
                "the guest broke its credit or shutdown rules, or the host socket failed",
                watcher,
            ),
            Verdict::Keep => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                if conn.is_finished() {
                    self.reset(key, "", watcher);
                } else if conn.has_rx_work() && !conn.in_rx_queue {
                    conn.in_rx_queue = true;
                    self.rx_ready.push_back(key);
                }
            }
        }
    }

    /// Resets the connection a packet for the guest (`sent`) belonged to, which could not
    /// be delivered.
    pub fn abort(&mut self, sent: &Header, watcher: &mut dyn Watcher) {
        let key = ConnKey {
            local_port: sent.src_port,
            peer_port: sent.dst_port,
        };
        if sent.op != Op::Rst.raw() {
            self.reset(
                key,
                "a packet for the guest did not fit its receive buffer",
                watcher,
            );
        }
    }

    /// Drops a connection and owes the guest a RST for it. `why` is logged (a warning, for
    /// the first [`MAX_LOGGED_ENDS`] of the device) unless empty: a finished connection's
    /// RST is its normal end.
    fn reset(&mut self, key: ConnKey, why: &str, watcher: &mut dyn Watcher) {
        if !why.is_empty() && self.conns.contains_key(&key) {
            self.warn(key, &format!("reset by the VMM: {why}"));
        }
        self.remove(key, watcher);
        self.queue_reset(key);
    }

    /// Logs a warning about a live connection ending abnormally, for the first
    /// [`MAX_LOGGED_ENDS`] of the device (a hostile guest can cause any number).
    fn warn(&mut self, key: ConnKey, what: &str) {
        self.logged_ends = self.logged_ends.saturating_add(1);
        if self.logged_ends > MAX_LOGGED_ENDS {
            return;
        }
        let more = if self.logged_ends == MAX_LOGGED_ENDS {
            " (further ones are only counted in the metrics)"
        } else {
            ""
        };
        crate::rpc::logger::log(
            api::requests::LogLevel::Warning,
            "vsock",
            &format!(
                "{}: the connection of host port {} and guest port {} ended: {what}{more}",
                self.uds_path.display(),
                key.local_port,
                key.peer_port
            ),
        );
    }

    fn queue_reset(&mut self, key: ConnKey) {
        if self.resets.len() >= MAX_QUEUED_RESETS {
            bump(&self.counters.dropped_resets, 1);
            return;
        }
        self.resets.push_back(key);
    }

    /// Stops watching a connection's stream and closes it; its rx_ready entry goes stale.
    fn remove(&mut self, key: ConnKey, watcher: &mut dyn Watcher) {
        if let Some(conn) = self.conns.remove(&key) {
            watcher.unwatch(conn.raw_fd());
            self.tokens.remove(&conn.token);
        }
    }

    fn drop_client(&mut self, token: u32, watcher: &mut dyn Watcher) {
        if let Some(client) = self.clients.remove(&token) {
            watcher.unwatch(client.stream.as_raw_fd());
        }
    }

    /// True when a receive buffer would be used.
    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest, for a buffer with room for `room` payload bytes; the
    /// payload lands in `buf`. None when nobody has anything for such a buffer.
    pub fn next_rx(
        &mut self,
        room: usize,
        buf: &mut [u8],
        watcher: &mut dyn Watcher,
    ) -> Option<Header> {
        // Connections that had nothing for this buffer (too small for their data) wait for
        // the next one; putting them back at once would spin.
        let mut skipped = Vec::new();
        let header = self.next_rx_from_queue(room, buf, watcher, &mut skipped);
        for key in skipped {
            self.settle(key, Verdict::Keep, watcher);
        }
        header
    }

    fn next_rx_from_queue(
        &mut self,
        room: usize,
        buf: &mut [u8],
        watcher: &mut dyn Watcher,
        skipped: &mut Vec<ConnKey>,
    ) -> Option<Header> {
        loop {
            if let Some(key) = self.resets.pop_front() {
                bump(&self.counters.resets, 1);
                return Some(self.header(key, Op::Rst, 0, 0, (0, 0)));
            }
            let key = self.rx_ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            match conn.next_packet(room, buf) {
                Outgoing::Nothing => skipped.push(key),
                Outgoing::Reset => self.reset(key, "reading the host socket failed", watcher),
                Outgoing::Packet { op, flags, len } => {
                    let credit = conn.stamp();
                    let header = self.header(key, op, flags, len, credit);
                    self.settle(key, Verdict::Keep, watcher);
                    return Some(header);
                }
            }
        }
    }

    fn header(
        &self,
        key: ConnKey,
        op: Op,
        flags: u32,
        len: usize,
        (buf_alloc, fwd_cnt): (u32, u32),
    ) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            // At most MAX_PAYLOAD.
            len: len as u32,
            kind: TYPE_STREAM,
            op: op.raw(),
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Closes host clients and connections whose handshake ran out of time.
    pub fn sweep(&mut self, now: Instant, watcher: &mut dyn Watcher) {
        let late_clients: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(&t, _)| t)
            .collect();
        for token in late_clients {
            self.drop_client(token, watcher);
            bump(&self.counters.timeouts, 1);
        }
        let late: Vec<(ConnKey, State, usize)> = self
            .conns
            .values()
            .filter(|c| c.expired(now))
            .map(|c| (c.key, c.state(), c.undelivered()))
            .collect();
        for (key, state, undelivered) in late {
            if state == State::Draining {
                // The guest is gone already: no RST for it, only the loss to report.
                let secs = DRAIN_TIMEOUT.as_secs();
                self.warn(
                    key,
                    &format!(
                        "the guest reset it, and its host client read nothing for {secs} s; \
                         the guest's last {undelivered} bytes were dropped"
                    ),
                );
                self.remove(key, watcher);
            } else {
                self.reset(
                    key,
                    "the guest did not answer the connection request in time",
                    watcher,
                );
            }
            bump(&self.counters.timeouts, 1);
        }
    }

    /// True while something waits on a deadline (so the device keeps its timer running).
    pub fn has_deadlines(&self) -> bool {
        !self.clients.is_empty() || self.conns.values().any(|c| c.deadline.is_some())
    }

    /// Drops every client and connection without telling the guest (its driver was reset).
    pub fn teardown(&mut self, watcher: &mut dyn Watcher) {
        for (_, client) in self.clients.drain() {
            watcher.unwatch(client.stream.as_raw_fd());
        }
        for (_, conn) in self.conns.drain() {
            watcher.unwatch(conn.raw_fd());
        }
        self.tokens.clear();
        self.rx_ready.clear();
        self.resets.clear();
    }

    /// A host port no live connection uses.
    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// A stream token no live client or connection uses.
    fn alloc_token(&mut self) -> u32 {
        loop {
            let token = self.next_token;
            self.next_token = token.checked_add(1).unwrap_or(FIRST_TOKEN);
            if !self.clients.contains_key(&token) && !self.tokens.contains_key(&token) {
                return token;
            }
        }
    }
}
