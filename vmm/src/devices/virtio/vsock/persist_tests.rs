//! Snapshot tests of the vsock device: the device saved from a running world, its process
//! "gone" (device and event loop dropped, so every host socket closes), and restored from
//! the state file's bytes onto the same guest rings, as a restore into a new process is. The
//! guest driver answers the transport reset as Linux does: it resets its connected sockets,
//! keeps its listeners, re-posts the event buffer and kicks the event queue.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::super::device::{EVENT_LEN, RESET_ACK_TIMEOUT};
use super::super::persist::{VsockArgs, VsockState, VsockStateError};
use super::*;
use crate::devices::virtio::persist::VirtioArgs;
use crate::snapshot::{decode, encode, Persist};

/// Event buffers, 16 bytes apart, above the transmit slots.
const EV_BUFS: u64 = 0xc0_0000;

fn event_buffer(id: u16) -> u64 {
    EV_BUFS + u64::from(id) * 16
}

impl Guest<'_> {
    /// Offers event buffer `id`: `len` bytes at `addr` with descriptor `flags`.
    fn post_event_buffer(&self, id: u16, addr: u64, len: u32, flags: u16) {
        self.ev.store(id, Descriptor::new(addr, len, flags, 0));
        self.ev.offer(id);
    }

    fn post_event_buffers(&self, count: u16) {
        (0..count).for_each(|id| self.post_event_buffer(id, event_buffer(id), EVENT_LEN, F_WRITE));
    }

    /// Handles the events the device wrote since `seen`, as Linux does: a transport reset
    /// drops every connected socket (returned) and keeps the listeners; each buffer is
    /// re-posted, then the event queue is kicked. Returns the event ids too.
    fn take_events(&mut self, seen: &mut u16) -> (Vec<u32>, Vec<SockKey>) {
        let (mut ids, mut dropped) = (Vec::new(), Vec::new());
        while *seen != self.ev.used_idx() {
            let elem = self.ev.used_elem(*seen);
            *seen = seen.wrapping_add(1);
            let id = elem.id as u16;
            if elem.len == EVENT_LEN {
                let event: u32 = self.mem.read_obj(GuestAddress(event_buffer(id))).unwrap();
                ids.push(event);
                if event == 0 {
                    let connected: Vec<SockKey> = self.sockets.keys().copied().collect();
                    for key in &connected {
                        self.sockets.remove(key);
                    }
                    dropped.extend(connected);
                }
            }
            self.post_event_buffer(id, event_buffer(id), EVENT_LEN, F_WRITE);
        }
        self.kick(EVQ);
        (ids, dropped)
    }
}

fn round_trip(state: &VsockState) -> VsockState {
    let bytes = encode(state, 0).unwrap();
    decode(&bytes, Path::new("t")).unwrap().1
}

fn restore_args(mem: &Arc<GuestMemoryMmap>, uds_path: PathBuf, cid: Option<u64>) -> VsockArgs {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    VsockArgs {
        virtio: VirtioArgs {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq)),
        },
        uds_path,
        guest_cid: cid,
    }
}

/// Saves the world's device, ends its "process", and restores the device from the saved
/// bytes at a new socket path onto the same guest; runs the new event loop once.
fn restore_world<'m>(
    w: World<'m>,
    mem: &'m Arc<GuestMemoryMmap>,
    name: &str,
) -> (World<'m>, VsockState) {
    let saved = w.vsock.lock().unwrap().save().unwrap();
    let World {
        mut guest,
        em,
        vsock,
        ..
    } = w;
    drop(em);
    drop(vsock);
    let state = round_trip(&saved);
    assert_eq!(state, saved);
    let uds = temp_dir(name).join("v.sock");
    let device = Vsock::restore(restore_args(mem, uds.clone(), None), &state).unwrap();
    // The new process registers new kick fds for the same queues.
    guest.kicks = device
        .common
        .queue_events
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    let vsock = Arc::new(Mutex::new(device));
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(vsock.clone());
    let mut world = World {
        guest,
        em,
        vsock,
        uds,
    };
    world.step();
    (world, saved)
}

fn reset_pending(w: &World) -> bool {
    w.vsock.lock().unwrap().transport_reset_pending()
}

#[test]
fn a_restored_device_resets_the_guests_connections_and_keeps_its_listeners() {
    let mem = guest_memory();
    let mut w = World::new("snap-a", &mem);
    w.guest.post_event_buffers(4);
    w.guest.listening.insert(1024);
    let mut old_client = w.host_connect(1024);
    let old_port = ok_line(&mut w, &mut old_client);
    let listener = UnixListener::bind(super::super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5000, 1025);
    w.run_until("guest connection", |w| {
        w.guest.sockets[&(5000, 1025)].established
    });
    let (mut old_host, _) = listener.accept().unwrap();
    old_host.set_nonblocking(true).unwrap();
    assert_eq!(w.connections(), 2);

    let (mut w, saved) = restore_world(w, &mem, "snap-a2");
    assert!(saved.virtio.activated);
    assert_eq!(saved.guest_cid, GUEST_CID);
    // The old process's sockets are gone, and the host ends see it.
    let mut sink = Vec::new();
    assert!(drain(&mut old_client, &mut sink), "host client closed");
    assert!(drain(&mut old_host, &mut sink), "host service closed");
    assert_eq!(w.connections(), 0);
    // The reset is in the guest's first event buffer, at once.
    assert_eq!(w.guest.ev.used_idx(), 1);
    let elem = w.guest.ev.used_elem(0);
    assert_eq!((elem.id, elem.len), (0, EVENT_LEN));
    assert_eq!(w.counters().transport_resets.load(Ordering::Relaxed), 1);

    // A host client connecting now waits until the guest has handled the reset.
    let logged = w.guest.log.len();
    let mut client = UnixStream::connect(&w.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    client.set_nonblocking(true).unwrap();
    for _ in 0..10 {
        w.step();
    }
    assert_eq!(w.guest.log.len(), logged, "nothing reaches the guest yet");
    assert!(reset_pending(&w));

    let mut seen = 0;
    let (events, mut dropped) = w.guest.take_events(&mut seen);
    assert_eq!(events, vec![0], "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    dropped.sort();
    assert_eq!(dropped, vec![(1024, old_port), (5000, 1025)]);
    // The listener survived: the new client gets its connection, and data flows.
    let port = ok_line(&mut w, &mut client);
    assert!(!reset_pending(&w));
    client.write_all(b"after restore").unwrap();
    w.run_until("data after restore", |w| {
        w.guest
            .sockets
            .get(&(1024, port))
            .is_some_and(|s| s.received == b"after restore")
    });
    // The guest can connect out again too.
    let listener = UnixListener::bind(super::super::unix::service_path(&w.uds, 1025)).unwrap();
    w.guest.connect(5001, 1025);
    w.run_until("new guest connection", |w| {
        w.guest.sockets[&(5001, 1025)].established
    });
    drop(listener);
    // Saving the restored device gives the saved state back, at its new path.
    let again = w.vsock.lock().unwrap().save().unwrap();
    assert_eq!(again.uds_path, w.uds);
    assert_eq!(again.virtio.avail_features, saved.virtio.avail_features);
    assert_eq!(again.virtio.acked_features, saved.virtio.acked_features);
}

#[test]
fn the_reset_waits_for_an_event_buffer_and_then_for_the_guest() {
    let mem = guest_memory();
    let mut w = World::new("snap-nobuf", &mem);
    w.guest.listening.insert(1024);
    let (mut w, _) = restore_world(w, &mem, "snap-nobuf2");
    assert_eq!(w.guest.ev.used_idx(), 0, "no buffer, no event");
    assert!(reset_pending(&w));
    // The guest offers a buffer: the event goes into it, and the kick that offered it is
    // not taken for the guest having handled the event.
    w.guest.post_event_buffers(1);
    w.guest.kick(EVQ);
    w.step();
    assert_eq!(w.guest.ev.used_idx(), 1);
    assert!(reset_pending(&w));
    let mut client = w.host_connect(1024);
    for _ in 0..10 {
        w.step();
    }
    assert!(w.guest.log.is_empty(), "the REQUEST waits");
    let mut seen = 0;
    assert_eq!(w.guest.take_events(&mut seen).0, vec![0]);
    ok_line(&mut w, &mut client);
    assert!(!reset_pending(&w));
}

#[test]
fn unusable_event_buffers_are_skipped() {
    let mem = guest_memory();
    let w = World::new("snap-badbuf", &mem);
    let read_only = (event_buffer(0), EVENT_LEN, 0);
    let too_small = (event_buffer(1), 2, F_WRITE);
    let outside = (MEM_SIZE as u64 - 2, EVENT_LEN, F_WRITE);
    let good = (event_buffer(3), EVENT_LEN, F_WRITE);
    for (id, (addr, len, flags)) in [read_only, too_small, outside, good]
        .into_iter()
        .enumerate()
    {
        w.guest.post_event_buffer(id as u16, addr, len, flags);
    }
    mem.write_obj(0xffff_ffffu32, GuestAddress(event_buffer(3)))
        .unwrap();
    let (w, _) = restore_world(w, &mem, "snap-badbuf2");
    assert_eq!(w.guest.ev.used_idx(), 4);
    let lens: Vec<(u32, u32)> = (0..4)
        .map(|i| {
            let e = w.guest.ev.used_elem(i);
            (e.id, e.len)
        })
        .collect();
    assert_eq!(lens, vec![(0, 0), (1, 0), (2, 0), (3, EVENT_LEN)]);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(event_buffer(3))).unwrap(),
        0
    );
    // The restored device counts afresh.
    assert_eq!(w.counters().invalid_chains.load(Ordering::Relaxed), 3);
}

#[test]
fn a_guest_that_never_answers_is_waited_for_a_bounded_time_once_it_runs() {
    let mem = guest_memory();
    let w = World::new("snap-silent", &mem);
    let (w, _) = restore_world(w, &mem, "snap-silent2");
    let mut device = w.vsock.lock().unwrap();
    let t0 = Instant::now();
    // A restored VM that stays paused never kicks: the wait does not run out.
    device.expire_reset_wait(t0 + 100 * RESET_ACK_TIMEOUT);
    assert!(device.transport_reset_pending());
    // Once it runs (any kick), it has RESET_ACK_TIMEOUT to handle the reset.
    device.guest_kicked(TX, t0);
    device.guest_kicked(RX, t0 + RESET_ACK_TIMEOUT / 2);
    device.expire_reset_wait(t0 + RESET_ACK_TIMEOUT - Duration::from_millis(1));
    assert!(device.rx_held());
    device.expire_reset_wait(t0 + RESET_ACK_TIMEOUT);
    assert!(!device.rx_held(), "receive traffic moves");
    // The reset itself is still owed, and goes into the first buffer the guest offers; the
    // guest's acknowledgment then clears it.
    assert!(device.transport_reset_pending());
    w.guest.post_event_buffers(1);
    assert!(device.process_evq());
    assert_eq!(w.guest.ev.used_idx(), 1);
    assert!(!device.rx_held());
    device.guest_kicked(EVQ, t0 + 2 * RESET_ACK_TIMEOUT);
    assert!(!device.transport_reset_pending());
}

#[test]
fn a_delivered_reset_the_guest_never_acknowledges_is_given_up_on() {
    let mem = guest_memory();
    let w = World::new("snap-noack", &mem);
    w.guest.post_event_buffers(2);
    let (w, _) = restore_world(w, &mem, "snap-noack2");
    assert_eq!(w.guest.ev.used_idx(), 1, "delivered");
    let mut device = w.vsock.lock().unwrap();
    let t0 = Instant::now();
    device.guest_kicked(TX, t0);
    assert!(device.rx_held());
    device.expire_reset_wait(t0 + RESET_ACK_TIMEOUT);
    assert!(!device.rx_held());
    assert!(!device.transport_reset_pending());
}

#[test]
fn a_device_reset_by_its_driver_owes_no_transport_reset() {
    let mem = guest_memory();
    let w = World::new("snap-drvreset", &mem);
    let (w, _) = restore_world(w, &mem, "snap-drvreset2");
    let mut device = w.vsock.lock().unwrap();
    assert!(device.transport_reset_pending());
    device.reset();
    assert!(!device.transport_reset_pending());
}

#[test]
fn a_device_the_guest_never_started_round_trips_without_a_reset() {
    let mem = guest_memory();
    let dir = temp_dir("snap-idle");
    let spec = VsockSpec {
        guest_cid: 9,
        uds_path: dir.join("a.sock"),
    };
    let saved = round_trip(&Vsock::new(&spec).unwrap().save().unwrap());
    assert!(!saved.virtio.activated);
    let device = Vsock::restore(restore_args(&mem, dir.join("b.sock"), None), &saved).unwrap();
    assert!(!device.is_activated());
    assert!(!device.transport_reset_pending());
    assert_eq!(
        device.save().unwrap(),
        VsockState {
            uds_path: dir.join("b.sock"),
            ..saved
        }
    );
}

#[test]
fn the_cid_can_be_changed_and_reaches_config_space() {
    let mem = guest_memory();
    let w = World::new("snap-cid", &mem);
    let saved = round_trip(&w.vsock.lock().unwrap().save().unwrap());
    let path = temp_dir("snap-cid2").join("v.sock");
    let device = Vsock::restore(restore_args(&mem, path.clone(), Some(42)), &saved).unwrap();
    let mut cid = [0u8; 8];
    device.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 42);
    assert_eq!(device.guest_cid(), 42);
    assert_eq!(device.save().unwrap().guest_cid, 42);
    assert!(
        device.transport_reset_pending(),
        "the guest learns it on the reset"
    );
    drop(device);
    // Without an override the saved CID stays (Firecracker's behaviour).
    let device = Vsock::restore(restore_args(&mem, path, None), &saved).unwrap();
    assert_eq!(device.guest_cid(), GUEST_CID);
}

#[test]
fn bad_cids_paths_and_states_are_refused() {
    let mem = guest_memory();
    let w = World::new("snap-bad", &mem);
    let saved = w.vsock.lock().unwrap().save().unwrap();
    let dir = temp_dir("snap-bad2");
    let path = dir.join("v.sock");
    for cid in [0, 2, u64::from(u32::MAX), 1 << 40] {
        let err = Vsock::restore(restore_args(&mem, path.clone(), Some(cid)), &saved)
            .err()
            .unwrap();
        assert!(matches!(err, VsockStateError::Cid(c) if c == cid), "{err}");
        assert_eq!(
            err.to_string(),
            format!("vsock guest CID {cid} is out of range; use 3 to 4294967294")
        );
        let damaged = VsockState {
            guest_cid: cid,
            ..saved.clone()
        };
        let err = Vsock::restore(restore_args(&mem, path.clone(), Some(5)), &damaged)
            .err()
            .unwrap();
        assert!(
            matches!(err, VsockStateError::SavedCid(c) if c == cid),
            "{err}"
        );
    }
    let err = Vsock::restore(restore_args(&mem, dir.join("no/such/v.sock"), None), &saved)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("vsock.uds_path: the directory of"),
        "{err}"
    );
    // A damaged queue is refused, and the socket the restore bound is removed again.
    let mut damaged = saved.clone();
    damaged.virtio.queues[EVQ].size = 100;
    let err = Vsock::restore(restore_args(&mem, path.clone(), None), &damaged)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "the vsock device: queue 2 has size 100, which is not a power of two from 1 to 256; \
         the snapshot state is damaged"
    );
    assert!(!path.exists());
    let mut damaged = saved;
    damaged.virtio.queues[RX].desc_table = MEM_SIZE as u64;
    let err = Vsock::restore(restore_args(&mem, path, None), &damaged)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("lies outside guest memory"),
        "{err}"
    );
}
