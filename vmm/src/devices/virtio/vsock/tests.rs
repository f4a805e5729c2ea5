//! End-to-end tests: the device on a real event loop with real Unix sockets in a temporary
//! directory, and rings built from virtio-queue's mock parts driven by a small "guest
//! driver" that speaks the
//! vsock protocol as Linux does (respecting the host's credit, advertising its own, sending
//! credit updates as it consumes). Also muxer tests without an event loop, for timeouts and
//! limits, with a watcher that only records.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::connection::DRAIN_TIMEOUT;
use super::muxer::{Muxer, Watcher, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
use super::packet::{Header, Op, HEADER_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Vsock, VsockCounters, VsockSpec, EVQ, HOST_CID, QUEUE_SIZE, RX, TX};
use crate::devices::virtio::test_support::{
    post_vsock_rx, post_vsock_tx, read_vsock_rx, vsock_tx_buf, Ring,
};
use crate::devices::virtio::{Interrupt, VirtioDevice};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const F_WRITE: u16 = 2;
/// Ring placement and buffers, as a driver would lay them out.
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const EV_RING: u64 = 0x8000;
const TX_SLOTS: u16 = 64;
/// The guest's receive buffer per socket, small to exercise the host's credit checks.
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// FNV-1a, 64 bits: the checksum of a byte stream.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A reproducible byte stream of `len` bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One guest socket as the guest driver sees it. Keyed by (guest port, host port).
#[derive(Debug, Default)]
struct GuestSocket {
    established: bool,
    reset: bool,
    peer_shutdown: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the host.
    sent: u32,
    /// Bytes received and consumed; advertised as fwd_cnt.
    received: Vec<u8>,
    advertised_fwd_cnt: u32,
    /// Bytes still to send, then (optionally) SHUTDOWN with these flags.
    outbox: VecDeque<u8>,
    shutdown_when_sent: Option<u32>,
}

impl GuestSocket {
    fn fwd_cnt(&self) -> u32 {
        self.received.len() as u32
    }
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.sent.wrapping_sub(self.peer_fwd_cnt))
    }
}

type SockKey = (u32, u32);

/// The guest's virtio-vsock driver.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    rx: Ring<'m>,
    tx: Ring<'m>,
    ev: Ring<'m>,
    rx_seen: u16,
    tx_seen: u16,
    tx_free: Vec<u16>,
    kicks: Vec<EventFd>,
    listening: HashSet<u32>,
    sockets: HashMap<SockKey, GuestSocket>,
    /// RSTs for sockets the guest does not have (refused requests).
    stray_resets: Vec<SockKey>,
    control: VecDeque<(SockKey, Op, u32)>,
    /// Every packet received, for assertions.
    log: Vec<Header>,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Self {
        Self {
            mem,
            rx: Ring::new(mem, RX_RING, QUEUE_SIZE),
            tx: Ring::new(mem, TX_RING, QUEUE_SIZE),
            ev: Ring::new(mem, EV_RING, QUEUE_SIZE),
            rx_seen: 0,
            tx_seen: 0,
            tx_free: (0..TX_SLOTS).rev().collect(),
            kicks: Vec::new(),
            listening: HashSet::new(),
            sockets: HashMap::new(),
            stray_resets: Vec::new(),
            control: VecDeque::new(),
            log: Vec::new(),
        }
    }

    fn kick(&self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
    }

    fn post_rx(&self, id: u16) {
        post_vsock_rx(&self.rx, id);
    }

    fn post_all_rx(&self) {
        (0..QUEUE_SIZE).for_each(|id| self.post_rx(id));
        self.kick(RX);
    }

    /// Queues a packet on the transmit ring (header and payload in separate descriptors,
    /// as Linux does); false when no slot is free.
    fn send(&mut self, h: &Header, payload: &[u8]) -> bool {
        self.reclaim_tx();
        let Some(slot) = self.tx_free.pop() else {
            return false;
        };
        post_vsock_tx(self.mem, &self.tx, slot, h, payload);
        true
    }

    fn reclaim_tx(&mut self) {
        while self.tx_seen != self.tx.used_idx() {
            let elem = self.tx.used_elem(self.tx_seen);
            self.tx_free.push(elem.id as u16 / 2);
            self.tx_seen = self.tx_seen.wrapping_add(1);
        }
    }

    fn header(&self, (port, host_port): SockKey, op: Op, flags: u32, len: usize) -> Header {
        let fwd_cnt = self
            .sockets
            .get(&(port, host_port))
            .map_or(0, GuestSocket::fwd_cnt);
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: port,
            dst_port: host_port,
            len: len as u32,
            kind: TYPE_STREAM,
            op: op.raw(),
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Sends a packet now, recording the credit it advertises.
    fn send_op(&mut self, key: SockKey, op: Op, flags: u32, payload: &[u8]) -> bool {
        let h = self.header(key, op, flags, payload.len());
        let sent = self.send(&h, payload);
        if let (true, Some(s)) = (sent, self.sockets.get_mut(&key)) {
            s.advertised_fwd_cnt = h.fwd_cnt;
            s.sent = s.sent.wrapping_add(payload.len() as u32);
        }
        sent
    }

    fn connect(&mut self, port: u32, host_port: u32) {
        self.sockets
            .insert((port, host_port), GuestSocket::default());
        assert!(self.send_op((port, host_port), Op::Request, 0, &[]));
        self.kick(TX);
    }

    /// Takes what the device put in the receive ring, reposts the buffers, answers, sends.
    fn pump(&mut self) {
        let mut reposted = false;
        while self.rx_seen != self.rx.used_idx() {
            let elem = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let (h, data) = read_vsock_rx(self.mem, elem);
            self.on_packet(h, data);
            self.post_rx(elem.id as u16);
            reposted = true;
        }
        if reposted {
            self.kick(RX);
        }
        if self.flush_control() | self.send_data() {
            self.kick(TX);
        }
    }

    fn on_packet(&mut self, h: Header, data: Vec<u8>) {
        assert_eq!(
            (h.src_cid, h.dst_cid, h.kind),
            (HOST_CID, GUEST_CID, TYPE_STREAM),
            "{h:?}"
        );
        self.log.push(h);
        let key = (h.dst_port, h.src_port);
        let op = Op::from_raw(h.op).unwrap();
        if op == Op::Request {
            if self.listening.contains(&h.dst_port) {
                let s = self.sockets.entry(key).or_default();
                s.established = true;
                self.control.push_back((key, Op::Response, 0));
            } else {
                self.control.push_back((key, Op::Rst, 0));
            }
        }
        let Some(s) = self.sockets.get_mut(&key) else {
            if op == Op::Rst {
                self.stray_resets.push(key);
            }
            return;
        };
        s.peer_buf_alloc = h.buf_alloc;
        s.peer_fwd_cnt = h.fwd_cnt;
        match op {
            Op::Response => s.established = true,
            Op::Rst => s.reset = true,
            Op::Shutdown => s.peer_shutdown |= h.flags,
            Op::Rw => {
                s.received.extend_from_slice(&data);
                let in_flight = s.fwd_cnt().wrapping_sub(s.advertised_fwd_cnt);
                assert!(
                    in_flight <= GUEST_BUF_ALLOC,
                    "the host overran the guest's credit: {in_flight}"
                );
                // Like Linux: tell the host once a good part of the buffer was consumed.
                if in_flight >= GUEST_BUF_ALLOC / 2 {
                    self.control.push_back((key, Op::CreditUpdate, 0));
                }
            }
            Op::CreditRequest => self.control.push_back((key, Op::CreditUpdate, 0)),
            Op::Request | Op::CreditUpdate => {}
        }
    }

    fn flush_control(&mut self) -> bool {
        let mut sent = false;
        while let Some(&(key, op, flags)) = self.control.front() {
            if !self.send_op(key, op, flags, &[]) {
                break;
            }
            self.control.pop_front();
            sent = true;
        }
        sent
    }

    /// Sends queued socket data within the host's credit, 64 KiB at most per packet.
    fn send_data(&mut self) -> bool {
        let mut sent = false;
        let keys: Vec<SockKey> = self.sockets.keys().copied().collect();
        for key in keys {
            loop {
                let s = &self.sockets[&key];
                if !s.established || s.reset {
                    break;
                }
                let n = s.outbox.len().min(s.credit() as usize).min(64 * 1024);
                if n == 0 {
                    if let Some(flags) = s.shutdown_when_sent.filter(|_| s.outbox.is_empty()) {
                        if self.send_op(key, Op::Shutdown, flags, &[]) {
                            self.sockets.get_mut(&key).unwrap().shutdown_when_sent = None;
                            sent = true;
                        }
                    }
                    break;
                }
                let chunk: Vec<u8> = s.outbox.iter().take(n).copied().collect();
                if !self.send_op(key, Op::Rw, 0, &chunk) {
                    break;
                }
                self.sockets.get_mut(&key).unwrap().outbox.drain(..n);
                sent = true;
            }
        }
        sent
    }
}

/// The device on an event loop, with the guest driving its rings.
struct World<'m> {
    guest: Guest<'m>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    vsock: Arc<Mutex<Vsock>>,
    uds: PathBuf,
}

impl<'m> World<'m> {
    fn new(name: &str, mem: &'m Arc<GuestMemoryMmap>) -> Self {
        let mut world = Self::without_rx_buffers(name, mem);
        world.guest.post_all_rx();
        world.step();
        world
    }

    fn without_rx_buffers(name: &str, mem: &'m Arc<GuestMemoryMmap>) -> Self {
        let uds = temp_dir(name).join("v.sock");
        let spec = VsockSpec {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        };
        let mut guest = Guest::new(mem);
        let mut device = Vsock::new(&spec).unwrap();
        for (i, vq) in [&guest.rx, &guest.tx, &guest.ev].into_iter().enumerate() {
            device.common.queues[i] = vq.create_queue();
        }
        guest.kicks = device
            .common
            .queue_events
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
        // As the driver's FEATURES_OK would have it.
        device.common.acked_features = device.avail_features();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        device
            .activate(mem.clone(), Arc::new(Interrupt::new(irq)))
            .unwrap();
        let vsock = Arc::new(Mutex::new(device));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(vsock.clone());
        let mut world = Self {
            guest,
            em,
            vsock,
            uds,
        };
        world.step();
        world
    }

    fn step(&mut self) {
        self.em.run_with_timeout(5).unwrap();
        self.guest.pump();
    }

    /// Steps until `done`. The deadline only keeps a broken device from hanging the run;
    /// a passing test takes a fraction of it.
    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(self) {
            assert!(Instant::now() < deadline, "never happened: {what}");
            self.step();
        }
    }

    fn counters(&self) -> Arc<VsockCounters> {
        self.vsock.lock().unwrap().counters.clone()
    }

    fn connections(&self) -> usize {
        self.vsock.lock().unwrap().muxer.connection_count()
    }

    /// A host client that asks for guest port `port`.
    fn host_connect(&self, port: u32) -> UnixStream {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        client.set_nonblocking(true).unwrap();
        client
    }
}

fn guest_memory() -> Arc<GuestMemoryMmap> {
    Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// Appends what a non-blocking stream has; true at EOF.
fn drain(stream: &mut UnixStream, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Reads the `OK <port>\n` line a host client gets; returns the port.
fn ok_line(world: &mut World, client: &mut UnixStream) -> u32 {
    let mut got = Vec::new();
    world.run_until("OK line", |_| {
        drain(client, &mut got);
        got.contains(&b'\n')
    });
    let line = std::str::from_utf8(&got).unwrap();
    let port = line
        .strip_prefix("OK ")
        .and_then(|l| l.strip_suffix('\n'))
        .unwrap();
    port.parse().unwrap()
}

#[test]
fn config_space_holds_the_guest_cid() {
    let mem = guest_memory();
    let world = World::new("config", &mem);
    let device = world.vsock.lock().unwrap();
    let mut cid = [0u8; 8];
    device.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    assert_eq!(device.device_type(), crate::devices::virtio::TYPE_VSOCK);
    assert_eq!(device.queues().len(), 3);
}

#[test]
fn host_initiated_connection_carries_data_and_closes() {
    let mem = guest_memory();
    let mut w = World::new("host-init", &mem);
    w.guest.listening.insert(1024);
    let mut client = w.host_connect(1024);
    let port = ok_line(&mut w, &mut client);
    assert!(port >= 1 << 30, "host ports are allocated high");
    let request = w.guest.log[0];
    assert_eq!(
        (Op::from_raw(request.op), request.dst_port, request.src_port),
        (Some(Op::Request), 1024, port)
    );
    client.write_all(b"ping").unwrap();
    w.run_until("ping", |w| {
        w.guest.sockets[&(1024, port)].received == b"ping"
    });
    w.guest
        .sockets
        .get_mut(&(1024, port))
        .unwrap()
        .outbox
        .extend(b"pong");
    w.guest.pump();
    let mut got = Vec::new();
    w.run_until("pong", |_| {
        drain(&mut client, &mut got);
        got == b"pong"
    });
    drop(client);
    w.run_until("host shutdown", |w| {
        w.guest.sockets[&(1024, port)].peer_shutdown == SHUTDOWN_SEND
    });
    w.guest
        .control
        .push_back(((1024, port), Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND));
    w.guest.pump();
    w.run_until("final reset", |w| w.guest.sockets[&(1024, port)].reset);
    assert_eq!(w.connections(), 0);
}

#[test]
fn host_initiated_without_guest_listener_closes_the_client() {
    let mem = guest_memory();
    let mut w = World::new("host-refused", &mem);
    let mut client = w.host_connect(4000);
    let mut got = Vec::new();
    w.run_until("client closed", |_| drain(&mut client, &mut got));
    assert!(got.is_empty(), "no OK line: {got:?}");
    assert_eq!(w.connections(), 0);
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mem = guest_memory();
    let mut w = World::new("bad-line", &mem);
    for line in [&b"HELLO 1024\n"[..], b"CONNECT 99999999999\n", &[b'9'; 40]] {
        let mut client = UnixStream::connect(&w.uds).unwrap();
        client.write_all(line).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        w.run_until("client closed", |_| drain(&mut client, &mut got));
        assert!(got.is_empty());
    }
    assert_eq!(
        w.counters()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert!(w.guest.log.is_empty(), "the guest heard nothing");
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mem = guest_memory();
    let mut w = World::new("guest-init", &mem);
    let listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5000, 1025);
    w.run_until("response", |w| w.guest.sockets[&(5000, 1025)].established);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    w.guest
        .sockets
        .get_mut(&(5000, 1025))
        .unwrap()
        .outbox
        .extend(b"hello host");
    let mut got = Vec::new();
    w.run_until("guest data", |_| {
        drain(&mut host, &mut got);
        got == b"hello host"
    });
    host.write_all(b"hello guest").unwrap();
    w.run_until("host data", |w| {
        w.guest.sockets[&(5000, 1025)].received == b"hello guest"
    });
}

#[test]
fn guest_request_without_host_listener_gets_rst() {
    let mem = guest_memory();
    let mut w = World::new("guest-refused", &mem);
    w.guest.connect(5000, 1025);
    w.run_until("reset", |w| w.guest.sockets[&(5000, 1025)].reset);
    assert!(!w.guest.sockets[&(5000, 1025)].established);
    assert_eq!(w.connections(), 0);
}

/// Moves `size` bytes each way over one connection at once; checks order and content.
fn bulk(w: &mut World, key: SockKey, mut host: UnixStream, size: usize) {
    let to_guest = pattern(1, size);
    let to_host = pattern(2, size);
    let (want_at_guest, want_at_host) = (checksum(&to_guest), checksum(&to_host));
    host.set_nonblocking(false).unwrap();
    let mut reader = host.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        host.write_all(&to_guest).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        got
    });
    let s = w.guest.sockets.get_mut(&key).unwrap();
    s.outbox.extend(&to_host);
    s.shutdown_when_sent = Some(SHUTDOWN_SEND);
    w.guest.pump();
    w.run_until("both directions done", |w| w.guest.sockets[&key].reset);
    writer.join().unwrap();
    let at_host = reader.join().unwrap();
    let s = &w.guest.sockets[&key];
    assert_eq!(
        s.peer_shutdown, SHUTDOWN_SEND,
        "host EOF came before the final RST"
    );
    assert_eq!(
        (s.received.len(), checksum(&s.received)),
        (size, want_at_guest)
    );
    assert_eq!((at_host.len(), checksum(&at_host)), (size, want_at_host));
    assert_eq!(w.connections(), 0);
}

#[test]
fn megabytes_both_ways_over_a_guest_initiated_connection() {
    let mem = guest_memory();
    let mut w = World::new("bulk-guest", &mem);
    let listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5000, 1025);
    w.run_until("response", |w| w.guest.sockets[&(5000, 1025)].established);
    let (host, _) = listener.accept().unwrap();
    bulk(&mut w, (5000, 1025), host, 6 << 20);
    let counters = w.counters();
    assert_eq!(
        counters
            .invalid_chains
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn megabytes_both_ways_over_a_host_initiated_connection() {
    let mem = guest_memory();
    let mut w = World::new("bulk-host", &mem);
    w.guest.listening.insert(1024);
    let mut client = w.host_connect(1024);
    let port = ok_line(&mut w, &mut client);
    bulk(&mut w, (1024, port), client, 3 << 20);
}

#[test]
fn many_concurrent_connections_both_ways() {
    const N: u32 = 64;
    let mem = guest_memory();
    let mut w = World::new("many", &mem);
    w.guest.listening.insert(1024);
    let listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut clients: Vec<UnixStream> = (0..N).map(|_| w.host_connect(1024)).collect();
    for i in 0..N {
        w.guest.connect(6000 + i, 1025);
    }
    let mut accepted = Vec::new();
    w.run_until("all connected", |w| {
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).unwrap();
            accepted.push(s);
        }
        accepted.len() == N as usize
            && w.guest.sockets.values().filter(|s| s.established).count() == 2 * N as usize
    });
    assert_eq!(w.connections(), 2 * N as usize);
    // Each stream gets its own message both ways.
    for (i, c) in clients.iter_mut().chain(accepted.iter_mut()).enumerate() {
        c.write_all(format!("host {i};").as_bytes()).unwrap();
    }
    let keys: Vec<SockKey> = w.guest.sockets.keys().copied().collect();
    for key in &keys {
        let msg = format!("guest {}:{};", key.0, key.1);
        w.guest
            .sockets
            .get_mut(key)
            .unwrap()
            .outbox
            .extend(msg.as_bytes());
    }
    w.guest.pump();
    w.run_until("every guest socket heard from its host", |w| {
        w.guest.sockets.values().all(|s| s.received.ends_with(b";"))
    });
    let from_hosts: HashSet<Vec<u8>> = w
        .guest
        .sockets
        .values()
        .map(|s| s.received.clone())
        .collect();
    assert_eq!(
        from_hosts.len(),
        2 * N as usize,
        "no two sockets got the same stream"
    );
    let mut at_hosts = vec![Vec::new(); 2 * N as usize];
    let mut streams: Vec<&mut UnixStream> = clients.iter_mut().chain(accepted.iter_mut()).collect();
    w.run_until("every host stream heard from its guest socket", |_| {
        streams
            .iter_mut()
            .zip(at_hosts.iter_mut())
            .for_each(|(s, got)| {
                drain(s, got);
            });
        at_hosts.iter().all(|g| g.ends_with(b";"))
    });
    let host_ports: HashSet<u32> = keys.iter().filter(|k| k.0 == 1024).map(|k| k.1).collect();
    assert_eq!(host_ports.len(), N as usize, "host ports are unique");
    let mut to_1025 = HashSet::new();
    for (i, got) in at_hosts.iter().enumerate() {
        let text = String::from_utf8(got.clone()).unwrap();
        if i < N as usize {
            // A host client: its OK line names the port its guest socket talks to.
            let (ok, message) = text.split_once('\n').unwrap();
            let port: u32 = ok.strip_prefix("OK ").unwrap().parse().unwrap();
            assert_eq!(message, format!("guest 1024:{port};"), "client {i}");
        } else {
            to_1025.insert(text);
        }
    }
    let expected: HashSet<String> = (0..N)
        .map(|i| format!("guest {}:1025;", 6000 + i))
        .collect();
    assert_eq!(to_1025, expected);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mem = guest_memory();
    let mut w = World::new("credit", &mem);
    let listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5000, 1025);
    w.run_until("response", |w| w.guest.sockets[&(5000, 1025)].established);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    // The guest consumes nothing for a while (no pumps): the host may send only what the
    // guest's buffer holds, however much it writes.
    let data = pattern(3, 200 * 1024);
    let mut written = 0;
    for _ in 0..50 {
        if let Ok(n) = host.write(&data[written..]) {
            written += n;
        }
        w.em.run_with_timeout(5).unwrap();
    }
    assert!(
        written > GUEST_BUF_ALLOC as usize,
        "the host wrote more than the credit"
    );
    let delivered = w.guest.rx.used_idx().wrapping_sub(w.guest.rx_seen);
    assert_eq!(
        u32::from(delivered) * 4096,
        GUEST_BUF_ALLOC,
        "exactly the guest's buffer"
    );
    w.run_until("everything arrives", |w| {
        if written < data.len() {
            if let Ok(n) = host.write(&data[written..]) {
                written += n;
            }
        }
        w.guest.sockets[&(5000, 1025)].received.len() == data.len()
    });
    assert_eq!(w.guest.sockets[&(5000, 1025)].received, data);
}

#[test]
fn control_packets_wait_for_receive_buffers() {
    let mem = guest_memory();
    let mut w = World::without_rx_buffers("starved", &mem);
    let listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5000, 1025);
    for _ in 0..20 {
        w.step();
    }
    assert!(
        !w.guest.sockets[&(5000, 1025)].established,
        "no buffer for the RESPONSE"
    );
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"early bytes").unwrap();
    w.guest.post_all_rx();
    w.run_until("response and data", |w| {
        w.guest.sockets[&(5000, 1025)].received == b"early bytes"
    });
    assert!(w.guest.sockets[&(5000, 1025)].established);
}

#[test]
fn guest_overrunning_host_credit_is_reset() {
    let mem = guest_memory();
    let mut w = World::new("overrun", &mem);
    let _listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5000, 1025);
    w.run_until("response", |w| w.guest.sockets[&(5000, 1025)].established);
    // The host never reads; the guest ignores credit and keeps sending.
    let chunk = vec![0x55u8; 64 * 1024];
    w.run_until("reset", |w| {
        w.guest.send_op((5000, 1025), Op::Rw, 0, &chunk);
        w.guest.kick(TX);
        w.guest.sockets[&(5000, 1025)].reset
    });
    assert_eq!(w.connections(), 0);
}

/// A guest that resets after sending while its host client reads slowly: `(world, host
/// stream, the bytes the guest sent)`, with the guest's last bytes still in the device.
fn guest_resets_with_bytes_in_flight<'m>(
    name: &str,
    mem: &'m Arc<GuestMemoryMmap>,
) -> (World<'m>, UnixStream, Vec<u8>) {
    let mut w = World::new(name, mem);
    let listener = UnixListener::bind(super::unix::service_path(&w.uds, 1025)).unwrap();
    let key = (5000, 1025);
    w.guest.connect(key.0, key.1);
    w.run_until("response", |w| w.guest.sockets[&key].established);
    let (host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    // Far more than the host socket and our credit hold: the guest runs out of credit.
    let data = pattern(9, 4 << 20);
    w.guest.sockets.get_mut(&key).unwrap().outbox.extend(&data);
    w.run_until("guest out of credit", |w| {
        w.guest.sockets[&key].credit() == 0
    });
    let sent = w.guest.sockets[&key].sent as usize;
    assert!(sent < data.len());
    // It closes (SHUTDOWN), then resets: a Linux guest does that when our RST is late.
    w.guest
        .send_op(key, Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    w.guest.send_op(key, Op::Rst, 0, &[]);
    w.guest.kick(TX);
    w.step();
    (w, host, data[..sent].to_vec())
}

#[test]
fn a_guest_reset_after_sending_still_delivers_every_byte_it_sent() {
    let mem = guest_memory();
    let (mut w, mut host, sent) = guest_resets_with_bytes_in_flight("drain", &mem);
    assert_eq!(w.connections(), 1, "draining");
    let mut got = Vec::new();
    w.run_until("host EOF", |_| drain(&mut host, &mut got));
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "bytes differ");
    assert_eq!(w.connections(), 0);
    assert!(
        !w.guest.sockets[&(5000, 1025)].reset,
        "no RST back to the guest"
    );
}

/// Lets every stream be closed: for a muxer whose watches are not the test's concern.
struct IgnoringWatcher;

impl Watcher for IgnoringWatcher {
    fn watch(&mut self, _: RawFd, _: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn unwatch(&mut self, _: RawFd) {}
}

#[test]
fn a_host_client_that_never_reads_a_reset_connection_loses_it_after_a_while() {
    let mem = guest_memory();
    let (w, mut host, _) = guest_resets_with_bytes_in_flight("drain-timeout", &mem);
    let mut device = w.vsock.lock().unwrap();
    let start = Instant::now();
    device.muxer.sweep(start, &mut IgnoringWatcher);
    assert_eq!(device.muxer.connection_count(), 1, "not yet");
    device
        .muxer
        .sweep(start + DRAIN_TIMEOUT, &mut IgnoringWatcher);
    assert_eq!(device.muxer.connection_count(), 0);
    assert!(
        !device.muxer.has_rx_work(),
        "no RST for a guest that is gone"
    );
    assert!(!device.muxer.has_deadlines());
    drop(device);
    let mut got = Vec::new();
    while !drain(&mut host, &mut got) {}
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_the_device_goes_on() {
    let mem = guest_memory();
    let mut w = World::new("hostile", &mem);
    let mut h = w.guest.header((5000, 1025), Op::Rw, 0, 0);
    h.src_cid = 9;
    w.guest.send(&h, &[]);
    let mut h = w.guest.header((5001, 1025), Op::Rw, 0, 0);
    h.op = 42;
    w.guest.send(&h, &[]);
    let h = w.guest.header((5002, 1025), Op::Rw, 0, 3);
    w.guest.send(&h, b"abc");
    let mut h = w.guest.header((5003, 1025), Op::Rw, 0, 0);
    h.kind = 2;
    w.guest.send(&h, &[]);
    // A header in a device-writable descriptor.
    let h = w.guest.header((5004, 1025), Op::Request, 0, 0);
    w.mem_write_header_writable(&h);
    w.guest.kick(TX);
    w.run_until("resets", |w| w.guest.stray_resets.len() == 3);
    let mut ports: Vec<u32> = w.guest.stray_resets.iter().map(|k| k.0).collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        [5001, 5002, 5003],
        "bad op, unknown connection, bad type"
    );
    let c = w.counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((load(&c.invalid_packets), load(&c.invalid_chains)), (3, 1));
    // Still working.
    w.guest.connect(5005, 1025);
    w.run_until("refused", |w| w.guest.sockets[&(5005, 1025)].reset);
}

impl World<'_> {
    fn mem_write_header_writable(&mut self, h: &Header) {
        let slot = self.guest.tx_free.pop().unwrap();
        let base = vsock_tx_buf(slot);
        self.guest
            .mem
            .write_slice(&h.to_bytes(), GuestAddress(base))
            .unwrap();
        let d = Descriptor::new(base, HEADER_LEN as u32, F_WRITE, 0);
        self.guest.tx.store(slot * 2, d);
        self.guest.tx.offer(slot * 2);
    }
}

#[test]
fn device_reset_drops_every_connection() {
    let mem = guest_memory();
    let mut w = World::new("reset", &mem);
    w.guest.listening.insert(1024);
    let mut client = w.host_connect(1024);
    ok_line(&mut w, &mut client);
    assert_eq!(w.connections(), 1);
    w.vsock.lock().unwrap().reset();
    // The next event for the device (here a host write) tears down.
    client.write_all(b"x").unwrap();
    let mut got = Vec::new();
    w.run_until("client closed", |_| drain(&mut client, &mut got));
    assert_eq!(w.connections(), 0);
}

/// Records which fds are watched, instead of an event loop.
#[derive(Default)]
struct RecordingWatcher {
    watched: HashMap<RawFd, u32>,
}

impl Watcher for RecordingWatcher {
    fn watch(&mut self, fd: RawFd, token: u32) -> std::io::Result<()> {
        assert!(
            self.watched.insert(fd, token).is_none(),
            "fd {fd} watched twice"
        );
        Ok(())
    }
    fn unwatch(&mut self, fd: RawFd) {
        assert!(
            self.watched.remove(&fd).is_some(),
            "fd {fd} was not watched"
        );
    }
}

fn muxer(name: &str) -> (Muxer, PathBuf) {
    let uds = temp_dir(name).join("v.sock");
    let m = Muxer::new(GUEST_CID, &uds, Arc::new(VsockCounters::default())).unwrap();
    (m, uds)
}

#[test]
fn silent_clients_and_unanswered_requests_time_out() {
    let (mut m, uds) = muxer("timeouts");
    let mut watcher = RecordingWatcher::default();
    let start = Instant::now();
    let mut silent = UnixStream::connect(&uds).unwrap();
    let mut asking = UnixStream::connect(&uds).unwrap();
    asking.write_all(b"CONNECT 1024\n").unwrap();
    m.accept_clients(&mut watcher, start);
    assert_eq!((watcher.watched.len(), m.connection_count()), (2, 1));
    assert!(m.has_deadlines());
    m.sweep(
        start + HANDSHAKE_TIMEOUT - Duration::from_millis(1),
        &mut watcher,
    );
    assert_eq!(watcher.watched.len(), 2, "not yet");
    m.sweep(start + HANDSHAKE_TIMEOUT, &mut watcher);
    assert!(watcher.watched.is_empty(), "both closed");
    assert!(!m.has_deadlines());
    let mut buf = [0u8; 8];
    assert_eq!(silent.read(&mut buf).unwrap(), 0);
    assert_eq!(asking.read(&mut buf).unwrap(), 0);
    // The guest is told to forget the request it may have half-accepted.
    let mut payload = vec![0u8; 16];
    let first = m.next_rx(0, &mut payload, &mut watcher).unwrap();
    assert_eq!(Op::from_raw(first.op), Some(Op::Rst));
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let (mut m, uds) = muxer("limit");
    let mut watcher = RecordingWatcher::default();
    let now = Instant::now();
    // In batches, so that no connect waits on a full backlog.
    let mut clients = Vec::new();
    while clients.len() < MAX_CONNECTIONS + 3 {
        for _ in 0..(MAX_CONNECTIONS + 3 - clients.len()).min(64) {
            clients.push(UnixStream::connect(&uds).unwrap());
        }
        m.accept_clients(&mut watcher, now);
    }
    assert_eq!(watcher.watched.len(), MAX_CONNECTIONS);
    let mut refused = 0;
    for mut c in clients {
        c.set_nonblocking(true).unwrap();
        if matches!(c.read(&mut [0u8; 1]), Ok(0)) {
            refused += 1;
        }
    }
    assert_eq!(refused, 3);
    // The guest's requests are refused too, with a RST each.
    let request = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 7,
        dst_port: 1025,
        kind: TYPE_STREAM,
        op: Op::Request.raw(),
        ..Header::default()
    };
    let packet = super::packet::TxPacket {
        header: request,
        op: Op::Request,
        payload_len: 0,
    };
    m.guest_packet(&packet, &[], &mut watcher);
    let mut payload = vec![0u8; 16];
    let rst = m.next_rx(0, &mut payload, &mut watcher).unwrap();
    assert_eq!(
        (Op::from_raw(rst.op), rst.dst_port, rst.src_port),
        (Some(Op::Rst), 7, 1025)
    );
    m.teardown(&mut watcher);
    assert!(watcher.watched.is_empty());
}

#[test]
fn event_queue_kicks_are_consumed() {
    let mem = guest_memory();
    let mut w = World::new("evq", &mem);
    w.guest.kick(EVQ);
    w.step();
    // A level-triggered eventfd left unread would make every later run return at once.
    assert_eq!(w.em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn an_unusable_socket_path_is_a_config_error_naming_the_field() {
    let dir = temp_dir("bad-path");
    let cases = [
        dir.join("missing/v.sock"),
        dir.clone(),
        dir.join("x".repeat(120)),
    ];
    for uds_path in cases {
        let spec = VsockSpec {
            guest_cid: GUEST_CID,
            uds_path: uds_path.clone(),
        };
        let err = Vsock::new(&spec).err().unwrap();
        assert!(err.is_config_error(), "{err}");
        assert!(err.to_string().starts_with("vsock.uds_path: "), "{err}");
    }
}

#[path = "persist_tests.rs"]
mod persist;
