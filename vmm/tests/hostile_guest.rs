//! A hostile guest driver: each virtio device (block, net, vsock) is driven through its
//! virtio-mmio register window exactly as a guest driver would drive it (status handshake,
//! queue set-up, QueueNotify), on the device's real event loop, and fed crafted rings:
//! descriptors outside memory, loops, avail indices far ahead, bad queue set-ups, requests
//! past the end of a disk, malformed vsock packets, credit abuse and connection floods.
//!
//! Each case says what must happen (the device refuses to start with DEVICE_NEEDS_RESET;
//! or the bad chain is returned with its error status or with length 0; or it is ignored)
//! and then checks that the device still serves a well-formed request. A device that loops
//! forever trips the watchdog, which aborts the run with the name of the test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::mmio::{reg, MmioTransport, CONFIG_SPACE};
use vmm::devices::virtio::test_support::{
    post_vsock_rx, post_vsock_tx, read_vsock_rx, MmioDriver, Ring, UsedElem, F_INDIRECT, F_NEXT,
    F_WRITE,
};
use vmm::devices::virtio::{status, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm::devices::BusDevice;
use vmm::vstate::memory::{anonymous, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 16 << 20;
const NEEDS_RESET: u32 = status::DEVICE_NEEDS_RESET;
const RUNNING: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

fn guest_memory() -> Arc<GuestMemoryMmap> {
    Arc::new(anonymous(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Aborts the whole run if a test is still going after a generous minute: a device that
/// spins on a hostile ring would otherwise hang the suite without saying where.
struct Watchdog(Option<Sender<()>>);

impl Watchdog {
    fn arm(test: &'static str) -> Self {
        let (disarm, wait) = channel::<()>();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(Duration::from_secs(60)) {
                eprintln!("hostile_guest: {test} still runs after 60 s: a device loops or hangs");
                std::process::abort();
            }
        });
        Self(Some(disarm))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// A device behind its MMIO window, on its own event loop, as the VMM runs it.
struct Bench<D: VirtioDevice + MutEventSubscriber + 'static> {
    driver: MmioDriver,
    device: Arc<Mutex<D>>,
    em: EventManager<Arc<Mutex<D>>>,
    _watchdog: Watchdog,
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Bench<D> {
    fn new(test: &'static str, mem: &Arc<GuestMemoryMmap>, device: D) -> Self {
        let device = Arc::new(Mutex::new(device));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq));
        let transport = MmioTransport::new(device.clone(), mem.clone(), interrupt);
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(device.clone());
        Self {
            driver: MmioDriver::new(transport),
            device,
            em,
            _watchdog: Watchdog::arm(test),
        }
    }

    /// Runs the event loop until nothing is ready: every kick made so far is handled.
    fn settle(&mut self) {
        while self.em.run_with_timeout(0).unwrap() > 0 {}
    }

    /// Starts the device with `rings` as its queues; it must run.
    fn start(&mut self, rings: &[&Ring]) {
        assert_eq!(self.driver.start(rings), RUNNING, "a clean start");
        self.settle();
        assert!(self.device.lock().unwrap().is_activated());
    }

    fn activated(&self) -> bool {
        self.device.lock().unwrap().is_activated()
    }

    fn counter(&self, f: impl Fn(&MmioTransport) -> &AtomicU64) -> u64 {
        load(f(&self.driver.transport))
    }
}

/// The used entries the device made since `seen`, which moves past them.
fn take_used(ring: &Ring, seen: &mut u16) -> Vec<UsedElem> {
    let mut used = Vec::new();
    while *seen != ring.used_idx() {
        used.push(ring.used_elem(*seen));
        *seen = seen.wrapping_add(1);
    }
    used
}

/// Writes a chain of (address, length, device-writable) descriptors at ids `first..`,
/// linked in order; returns its head.
fn store_chain(ring: &Ring, first: u16, descs: &[(u64, u32, bool)]) -> u16 {
    for (i, &(addr, len, writable)) in descs.iter().enumerate() {
        let id = first + i as u16;
        let mut flags = if writable { F_WRITE } else { 0 };
        if i + 1 < descs.len() {
            flags |= F_NEXT;
        }
        ring.store(id, Descriptor::new(addr, len, flags, id + 1));
    }
    first
}

// ---------------------------------------------------------------------------------------
// virtio-blk

mod blk {
    use super::*;
    use vmm::devices::virtio::block::request::{S_IOERR, S_OK, S_UNSUPP};
    use vmm::devices::virtio::block::{Block, DriveSpec};

    pub const RING: u64 = 0x1_0000;
    pub const HEADER: u64 = 0x10_0000;
    pub const DATA: u64 = 0x20_0000;
    pub const STATUS: u64 = 0x30_0000;
    pub const SECTORS: u64 = 64;
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    /// What the status byte holds before the device answers.
    pub const UNTOUCHED: u8 = 0xff;

    /// A block device on a 64-sector image of known bytes, and the guest's one ring.
    pub struct Rig<'m> {
        pub bench: Bench<Block>,
        pub mem: &'m GuestMemoryMmap,
        pub ring: Ring<'m>,
        pub image: PathBuf,
        pub original: Vec<u8>,
        seen: u16,
        _dir: tempfile::TempDir,
    }

    pub fn image_bytes() -> Vec<u8> {
        (0..SECTORS * 512).map(|i| (i % 251) as u8).collect()
    }

    impl<'m> Rig<'m> {
        /// The device, not yet started by the driver; `size` is the ring's size.
        pub fn unstarted(
            test: &'static str,
            mem: &'m Arc<GuestMemoryMmap>,
            read_only: bool,
            size: u16,
        ) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("disk.img");
            let original = image_bytes();
            fs::write(&image, &original).unwrap();
            let spec = DriveSpec {
                drive_id: "hostile".into(),
                path: image.clone(),
                read_only,
                flush_to_disk: false,
            };
            Self {
                bench: Bench::new(test, mem, Block::new(&spec).unwrap()),
                mem,
                ring: Ring::new(mem, RING, size),
                image,
                original,
                seen: 0,
                _dir: dir,
            }
        }

        pub fn new(test: &'static str, mem: &'m Arc<GuestMemoryMmap>, read_only: bool) -> Self {
            let mut rig = Self::unstarted(test, mem, read_only, 16);
            rig.bench.start(&[&rig.ring]);
            rig
        }

        pub fn header(&self, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
            self.mem
                .write_obj(sector, GuestAddress(HEADER + 8))
                .unwrap();
        }

        /// Offers the chain at `head`, kicks, runs the device; returns the used entries
        /// the device made.
        pub fn kick_with(&mut self, head: u16) -> Vec<UsedElem> {
            self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
            self.ring.offer(head);
            self.kick()
        }

        pub fn kick(&mut self) -> Vec<UsedElem> {
            self.bench.driver.notify(0);
            self.bench.settle();
            self.take_used()
        }

        pub fn take_used(&mut self) -> Vec<UsedElem> {
            take_used(&self.ring, &mut self.seen)
        }

        /// Sends one chain; it must come back as exactly one used entry: (status byte,
        /// used length).
        pub fn request(&mut self, descs: &[(u64, u32, bool)]) -> (u8, u32) {
            let head = store_chain(&self.ring, 0, descs);
            let used = self.kick_with(head);
            assert_eq!(used.len(), 1, "one used entry for one chain: {used:?}");
            assert_eq!(used[0].id, u32::from(head));
            (self.status_byte(), used[0].len)
        }

        pub fn status_byte(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        pub fn invalid_requests(&self) -> u64 {
            load(&self.bench.device.lock().unwrap().counters.invalid_requests)
        }

        pub fn assert_image_untouched(&self, case: &str) {
            assert!(
                fs::read(&self.image).unwrap() == self.original,
                "{case}: the image changed"
            );
        }

        /// After a refused request: the image is as it was and the device still serves.
        pub fn assert_unharmed(&mut self, case: &str) {
            self.assert_image_untouched(case);
            self.assert_serves(case);
        }

        /// A well-formed read of sectors 2..4 succeeds and returns the image's bytes.
        pub fn assert_serves(&mut self, case: &str) {
            self.header(T_IN, 2);
            self.mem
                .write_slice(&[0u8; 1024], GuestAddress(DATA))
                .unwrap();
            let standard = [(HEADER, 16, false), (DATA, 1024, true), (STATUS, 1, true)];
            assert_eq!(self.request(&standard), (S_OK, 1025), "{case}: then a read");
            let mut got = vec![0u8; 1024];
            self.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
            assert!(
                got == self.original[1024..2048],
                "{case}: read bytes differ"
            );
        }
    }

    pub const OK: u8 = S_OK;
    pub const IOERR: u8 = S_IOERR;
    pub const UNSUPP: u8 = S_UNSUPP;
}

/// A descriptor chain of (address, length, device-writable).
type Chain = Vec<(u64, u32, bool)>;

#[test]
fn block_descriptors_outside_memory_or_with_overflowing_lengths_fail_cleanly() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::new("block_outside_memory", &mem, false);
    let header = (HEADER, 16, false);
    let status = (STATUS, 1, true);
    // (case, request type, chain, expected (status byte, used length)).
    let cases: Vec<(&str, u32, Chain, (u8, u32))> = vec![
        (
            "data past the end of memory",
            T_IN,
            vec![header, (MEM_SIZE + 0x1000, 512, true), status],
            (IOERR, 1),
        ),
        (
            "data straddling the end of memory",
            T_IN,
            vec![header, (MEM_SIZE - 256, 512, true), status],
            (IOERR, 1),
        ),
        (
            "write from data straddling the end of memory",
            T_OUT,
            vec![header, (MEM_SIZE - 256, 512, false), status],
            (IOERR, 1),
        ),
        (
            "data whose address + length overflows u64",
            T_IN,
            vec![header, (u64::MAX - 255, 512, true), status],
            (IOERR, 1),
        ),
        (
            "header outside memory",
            T_IN,
            vec![(u64::MAX - 7, 16, false), (DATA, 512, true), status],
            (IOERR, 1),
        ),
        (
            "status byte outside memory: nowhere to report",
            T_IN,
            vec![header, (DATA, 512, true), (MEM_SIZE, 1, true)],
            (UNTOUCHED, 0),
        ),
        // The chain's lengths add up past u32::MAX: virtio-queue ends the chain there,
        // so the device sees a chain cut short and must not take it for a whole request.
        (
            "a u32::MAX data length",
            T_IN,
            vec![header, (DATA, u32::MAX, true), status],
            (UNTOUCHED, 0),
        ),
        (
            "two data lengths whose sum overflows u32",
            T_IN,
            vec![
                header,
                (DATA, 0x8000_0000, true),
                (DATA, 0x8000_0000, true),
                status,
            ],
            (UNTOUCHED, 0),
        ),
    ];
    for (case, kind, chain, expected) in cases {
        let invalid = rig.invalid_requests();
        rig.header(kind, 0);
        assert_eq!(rig.request(&chain), expected, "{case}");
        assert_eq!(rig.invalid_requests(), invalid + 1, "{case}: counted");
        rig.assert_unharmed(case);
    }
}

#[test]
fn block_descriptor_loops_and_bad_indices_end_and_are_refused() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::new("block_loops", &mem, false);
    let ring_size = rig.ring.size();
    let data = |flags, next| Descriptor::new(DATA, 512, flags, next);
    let head = |next| Descriptor::new(HEADER, 16, F_NEXT, next);
    // (case, descriptors by id; the head is 0): every one is returned with length 0 and no status,
    // since a chain cut short has no status byte the device can trust.
    let cases: Vec<(&str, Vec<(u16, Descriptor)>)> = vec![
        (
            "a data descriptor that points at itself",
            vec![(0, head(1)), (1, data(F_NEXT | F_WRITE, 1))],
        ),
        (
            "a chain that points back at its head",
            vec![(0, head(1)), (1, data(F_NEXT | F_WRITE, 0))],
        ),
        ("a next index past the ring", vec![(0, head(ring_size + 3))]),
        (
            "a next index of u16::MAX",
            vec![(0, head(1)), (1, data(F_NEXT | F_WRITE, u16::MAX))],
        ),
    ];
    for (case, descs) in cases {
        for (id, desc) in descs {
            rig.ring.store(id, desc);
        }
        rig.header(T_IN, 0);
        let used = rig.kick_with(0);
        assert_eq!(used.len(), 1, "{case}: {used:?}");
        assert_eq!((used[0].id, used[0].len), (0, 0), "{case}");
        assert_eq!(rig.status_byte(), UNTOUCHED, "{case}");
        rig.assert_unharmed(case);
    }

    // A head index past the ring names no descriptor: there is nothing to return, so no
    // used entry is made (the used ring only takes ids inside the ring), and it is counted.
    let invalid = rig.invalid_requests();
    let used = rig.kick_with(ring_size + 5);
    assert!(used.is_empty(), "{used:?}");
    assert!(rig.invalid_requests() > invalid);
    rig.assert_serves("a head past the ring");
}

#[test]
fn block_indirect_tables_that_were_not_negotiated_cannot_hang_or_escape() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::new("block_indirect", &mem, false);
    const TABLE: u64 = 0x40_0000;
    let table_desc = |i: u16, d: Descriptor| {
        mem.write_obj(
            virtio_queue::desc::RawDescriptor::from(d),
            GuestAddress(TABLE + 16 * u64::from(i)),
        )
        .unwrap();
    };
    // (case, table address, table length in bytes, table entries written at the address):
    // each chain is refused with length 0, nothing is read or written, and no loop hangs.
    type Case<'a> = (&'a str, u64, u32, Vec<(u16, Descriptor)>);
    let cases: Vec<Case> = vec![
        (
            "a table whose entries loop",
            TABLE,
            32,
            vec![
                (0, Descriptor::new(HEADER, 16, F_NEXT, 1)),
                (1, Descriptor::new(DATA, 512, F_NEXT | F_WRITE, 0)),
            ],
        ),
        ("an empty table", TABLE, 0, vec![]),
        ("a table length not a multiple of 16", TABLE, 24, vec![]),
        ("a table outside memory", MEM_SIZE + 0x1000, 64, vec![]),
        (
            "a 65535-entry table reaching past the end of memory",
            MEM_SIZE - 32,
            0xffff * 16,
            vec![],
        ),
        (
            "a table that nests another table",
            TABLE,
            32,
            vec![(0, Descriptor::new(TABLE, 32, F_INDIRECT, 0))],
        ),
    ];
    for (case, addr, len, entries) in cases {
        for (i, d) in entries {
            table_desc(i, d);
        }
        rig.ring.store(0, Descriptor::new(addr, len, F_INDIRECT, 0));
        rig.header(T_IN, 0);
        let used = rig.kick_with(0);
        assert_eq!(used.len(), 1, "{case}: {used:?}");
        assert_eq!((used[0].id, used[0].len), (0, 0), "{case}");
        assert_eq!(rig.status_byte(), UNTOUCHED, "{case}");
        rig.assert_unharmed(case);
    }
}

#[test]
fn block_avail_index_far_ahead_is_ignored_until_it_is_sane_again() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::new("block_avail_jump", &mem, false);
    rig.assert_serves("before");
    let invalid = rig.invalid_requests();
    // The driver claims 1000 new requests in a 16-entry ring.
    let sane = rig.ring.avail_idx();
    rig.ring.set_avail_idx(sane.wrapping_add(1000));
    assert!(
        rig.kick().is_empty(),
        "nothing is served from a broken ring"
    );
    assert!(rig.invalid_requests() > invalid, "counted");
    // Far behind is as wrong as far ahead (the 16-bit distance is what counts).
    rig.ring.set_avail_idx(sane.wrapping_sub(1));
    assert!(rig.kick().is_empty());
    // The driver puts its index right: service goes on from where it was.
    rig.ring.set_avail_idx(sane);
    rig.assert_serves("after");
}

#[test]
fn block_ring_indices_wrap_around_at_65536() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::unstarted("block_wrap", &mem, false, 256);
    rig.bench.start(&[&rig.ring]);
    rig.header(T_FLUSH, 0);
    let flush = [(HEADER, 16, false), (STATUS, 1, true)];
    // 257 rounds of 256 flushes: the indices pass 65535 and go on from 0.
    let mut served = 0u32;
    for _ in 0..257 {
        store_chain(&rig.ring, 0, &flush);
        for _ in 0..256 {
            rig.ring.offer(0);
        }
        let used = rig.kick();
        assert_eq!(used.len(), 256);
        assert!(used.iter().all(|u| (u.id, u.len) == (0, 1)));
        served += 256;
    }
    assert_eq!(served, 257 * 256);
    assert_eq!(rig.ring.used_idx(), 256, "the used index wrapped");
    assert_eq!(rig.invalid_requests(), 0);
    rig.assert_serves("after the wrap");
}

/// Writes the queue registers of queue 0 one by one: (QUEUE_NUM, desc, avail, used).
fn program_queue(driver: &mut MmioDriver, num: u32, desc: u64, avail: u64, used: u64) {
    driver.write(reg::QUEUE_SEL, 0);
    driver.write(reg::QUEUE_NUM, num);
    for (low, addr) in [
        (reg::QUEUE_DESC_LOW, desc),
        (reg::QUEUE_DRIVER_LOW, avail),
        (reg::QUEUE_DEVICE_LOW, used),
    ] {
        driver.write(low, addr as u32);
        driver.write(low + 4, (addr >> 32) as u32);
    }
    driver.write(reg::QUEUE_READY, 1);
}

#[test]
fn bad_queue_configurations_are_refused_with_needs_reset() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::unstarted("bad_queue_config", &mem, false, 16);
    let (desc, avail, used) = (RING, RING + 0x1000, RING + 0x2000);
    // (case, QUEUE_NUM, desc, avail, used); every one leaves the device stopped with
    // DEVICE_NEEDS_RESET, and a reset and a clean start then work.
    let cases: Vec<(&str, u32, u64, u64, u64)> = vec![
        ("size 0", 0, desc, avail, used),
        ("size not a power of two", 12, desc, avail, used),
        ("size above the maximum", 512, desc, avail, used),
        (
            "size that is 16 in its low 16 bits only",
            0x1_0010,
            desc,
            avail,
            used,
        ),
        ("descriptor table outside memory", 16, MEM_SIZE, avail, used),
        (
            "available ring outside memory",
            16,
            desc,
            MEM_SIZE + 0x1000,
            used,
        ),
        (
            "used ring straddling the end of memory",
            16,
            desc,
            avail,
            MEM_SIZE - 64,
        ),
        (
            "descriptor table at a 64-bit address",
            16,
            1 << 40,
            avail,
            used,
        ),
        ("misaligned descriptor table", 16, desc + 1, avail, used),
        ("misaligned used ring", 16, desc, avail, used + 2),
        ("no addresses at all", 16, 0, 0, 0),
    ];
    for (case, num, d, a, u) in cases {
        rig.bench.driver.negotiate(VIRTIO_F_VERSION_1);
        program_queue(&mut rig.bench.driver, num, d, a, u);
        rig.bench.driver.add_status(status::DRIVER_OK);
        rig.bench.settle();
        let now = rig.bench.driver.status();
        assert_eq!(now & status::DRIVER_OK, 0, "{case}: not started ({now:#x})");
        assert_ne!(now & NEEDS_RESET, 0, "{case}: needs a reset ({now:#x})");
        assert!(!rig.bench.activated(), "{case}");
        // Kicks of a device that did not start do nothing.
        rig.bench.driver.notify(0);
        rig.bench.settle();
        let ring = Ring::new(&mem, RING, 16);
        rig.bench.start(&[&ring]);
        rig.assert_serves(case);
    }
}

#[test]
fn handshake_steps_out_of_order_are_ignored() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::unstarted("handshake_order", &mem, false, 16);
    let ring = Ring::new(&mem, RING, 16);
    let d = &mut rig.bench.driver;
    let out_of_sequence = |d: &MmioDriver| load(&d.transport.counters.out_of_sequence);

    // DRIVER_OK straight after DRIVER, before FEATURES_OK: refused, nothing starts.
    d.add_status(status::ACKNOWLEDGE);
    d.add_status(status::DRIVER);
    d.setup_queue(0, &ring);
    assert_eq!(
        d.read(reg::QUEUE_READY),
        0,
        "queue set-up before FEATURES_OK"
    );
    d.add_status(status::DRIVER_OK);
    assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert!(!rig.bench.activated(), "DRIVER_OK before FEATURES_OK");

    // Features the device does not offer, or without VERSION_1: no FEATURES_OK.
    let d = &mut rig.bench.driver;
    assert_eq!(
        d.negotiate(VIRTIO_F_VERSION_1 | 1 << 40) & status::FEATURES_OK,
        0
    );
    assert_eq!(d.negotiate(0) & status::FEATURES_OK, 0, "a legacy driver");
    // Two status bits at once, or a bit taken away, are refused too.
    d.write(reg::STATUS, 0);
    d.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(d.status(), 0);

    // Features written after FEATURES_OK do not change what the device accepted.
    d.negotiate(VIRTIO_F_VERSION_1);
    let before = out_of_sequence(d);
    d.write(reg::DRIVER_FEATURES_SEL, 0);
    d.write(reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(out_of_sequence(d), before + 1);
    let acked = rig.bench.device.lock().unwrap().common().acked_features;
    assert_eq!(acked, VIRTIO_F_VERSION_1);

    // A request queued and kicked before DRIVER_OK is not served then, and is served
    // exactly once after DRIVER_OK.
    rig.bench.driver.setup_queue(0, &ring);
    rig.header(T_IN, 2);
    let head = store_chain(
        &rig.ring,
        0,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert!(rig.kick_with(head).is_empty(), "served before DRIVER_OK");
    // Kicks of queues the device does not have are ignored and counted.
    let bad = rig.bench.counter(|t| &t.counters.bad_access);
    rig.bench.driver.notify(7);
    rig.bench.driver.notify(u32::MAX);
    assert_eq!(rig.bench.counter(|t| &t.counters.bad_access), bad + 2);
    rig.bench.driver.add_status(status::DRIVER_OK);
    rig.bench.settle();
    assert_eq!(rig.bench.driver.status(), RUNNING);
    let used = rig.take_used();
    assert_eq!(used, [UsedElem { id: 0, len: 513 }]);
    assert_eq!(rig.status_byte(), OK);

    // Queue registers written while running are ignored: the device keeps its rings.
    let before = rig.bench.counter(|t| &t.counters.out_of_sequence);
    program_queue(&mut rig.bench.driver, 16, MEM_SIZE, MEM_SIZE, MEM_SIZE);
    assert!(rig.bench.counter(|t| &t.counters.out_of_sequence) >= before + 7);
    rig.assert_serves("after queue writes while running");
    // FAILED from the driver sticks until a reset.
    rig.bench.driver.add_status(status::FAILED);
    assert_ne!(rig.bench.driver.status() & status::FAILED, 0);
}

#[test]
fn register_and_config_accesses_of_any_width_or_offset_are_harmless() {
    use blk::*;
    let mem = guest_memory();
    let mut rig = Rig::new("config_widths", &mem, false);
    let capacity = SECTORS.to_le_bytes();
    let t = &mut rig.bench.driver.transport;
    // Configuration space reads of every width at every offset: the capacity's bytes
    // where they are, zeros past its end (the window ends at 0x1000).
    for width in [1usize, 2, 3, 4, 8, 16] {
        for offset in (0..12).chain([0xef0, 0xf00 - width as u64]) {
            let mut data = vec![0xaau8; width];
            t.read(CONFIG_SPACE + offset, &mut data);
            let expected: Vec<u8> = (0..width as u64)
                .map(|i| capacity.get((offset + i) as usize).copied().unwrap_or(0))
                .collect();
            assert_eq!(data, expected, "config read of {width} at {offset:#x}");
        }
    }
    // Writes to the read-only configuration space change nothing.
    t.write(CONFIG_SPACE, &[0xff; 8]);
    t.write(CONFIG_SPACE + 3, &[0xff; 3]);
    t.write(CONFIG_SPACE + 0xeff, &[0xff]);
    let mut data = [0u8; 8];
    t.read(CONFIG_SPACE, &mut data);
    assert_eq!(data, capacity);
    // Register accesses that are not 32-bit and aligned read zero and do nothing.
    let bad = load(&t.counters.bad_access);
    for (offset, width) in [
        (reg::MAGIC, 1),
        (reg::STATUS, 2),
        (reg::STATUS, 8),
        (0x71, 4),
    ] {
        let mut data = vec![0xaau8; width];
        t.read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0), "read {width} at {offset:#x}");
        t.write(offset, &vec![0u8; width]);
    }
    assert_eq!(load(&t.counters.bad_access), bad + 8);
    // Writes to read-only or unknown registers are ignored.
    rig.bench.driver.write(reg::MAGIC, 0);
    rig.bench.driver.write(reg::QUEUE_NUM_MAX, 0);
    rig.bench.driver.write(0x0c8, 1);
    assert_eq!(rig.bench.driver.read(reg::MAGIC), 0x7472_6976);
    assert_eq!(rig.bench.driver.status(), RUNNING);
    rig.assert_serves("after odd accesses");
}

#[test]
fn block_requests_past_the_end_read_only_writes_and_bad_status_descriptors() {
    use blk::*;
    let status = (STATUS, 1, true);
    let header = (HEADER, 16, false);
    // (case, read-only drive, type, sector, chain, expected (status byte, used length))
    type Case<'a> = (&'a str, bool, u32, u64, Chain, (u8, u32));
    let cases: Vec<Case> = vec![
        (
            "read at the capacity",
            false,
            T_IN,
            SECTORS,
            vec![header, (DATA, 512, true), status],
            (IOERR, 1),
        ),
        (
            "read over the last sector",
            false,
            T_IN,
            SECTORS - 1,
            vec![header, (DATA, 1024, true), status],
            (IOERR, 1),
        ),
        (
            "write over the last sector",
            false,
            T_OUT,
            SECTORS - 1,
            vec![header, (DATA, 1024, false), status],
            (IOERR, 1),
        ),
        (
            "sector u64::MAX",
            false,
            T_OUT,
            u64::MAX,
            vec![header, (DATA, 512, false), status],
            (IOERR, 1),
        ),
        (
            "sector whose byte offset overflows u64",
            false,
            T_IN,
            u64::MAX >> 8,
            vec![header, (DATA, 512, true), status],
            (IOERR, 1),
        ),
        (
            "a partial sector",
            false,
            T_OUT,
            0,
            vec![header, (DATA, 100, false), status],
            (IOERR, 1),
        ),
        (
            "a write to a read-only drive",
            true,
            T_OUT,
            0,
            vec![header, (DATA, 512, false), status],
            (IOERR, 1),
        ),
        (
            "a flush of a read-only drive",
            true,
            T_FLUSH,
            0,
            vec![header, status],
            (OK, 1),
        ),
        (
            "unknown request type",
            false,
            77,
            0,
            vec![header, (DATA, 512, true), status],
            (UNSUPP, 1),
        ),
        (
            "discard (not offered)",
            false,
            11,
            0,
            vec![header, (DATA, 16, false), status],
            (UNSUPP, 1),
        ),
        (
            "read-only status descriptor",
            false,
            T_OUT,
            0,
            vec![header, (DATA, 512, false), (STATUS, 1, false)],
            (UNTOUCHED, 0),
        ),
        (
            "empty status descriptor",
            false,
            T_OUT,
            0,
            vec![header, (DATA, 512, false), (STATUS, 0, true)],
            (UNTOUCHED, 0),
        ),
        (
            "no status descriptor on a write",
            false,
            T_OUT,
            0,
            vec![header, (DATA, 512, false)],
            (UNTOUCHED, 0),
        ),
        (
            "a header alone",
            false,
            T_OUT,
            0,
            vec![header],
            (UNTOUCHED, 0),
        ),
        (
            "a header in a writable descriptor",
            false,
            T_OUT,
            0,
            vec![(HEADER, 16, true), (DATA, 512, false), status],
            (IOERR, 1),
        ),
        (
            "a header of 15 bytes",
            false,
            T_OUT,
            0,
            vec![(HEADER, 15, false), (DATA, 512, false), status],
            (IOERR, 1),
        ),
        (
            "a read into a driver-readable buffer",
            false,
            T_IN,
            0,
            vec![header, (DATA, 512, false), status],
            (IOERR, 1),
        ),
        (
            "a GET_ID without a buffer",
            false,
            T_GET_ID,
            0,
            vec![header, status],
            (IOERR, 1),
        ),
        (
            "a zero-length data buffer",
            false,
            T_OUT,
            0,
            vec![header, (DATA, 0, false), status],
            (IOERR, 1),
        ),
    ];
    for (case, read_only, kind, sector, chain, expected) in cases {
        let mem = guest_memory();
        let mut rig = Rig::new("block_semantics", &mem, read_only);
        rig.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .unwrap();
        rig.header(kind, sector);
        assert_eq!(rig.request(&chain), expected, "{case}");
        rig.assert_unharmed(case);
    }
}

// ---------------------------------------------------------------------------------------
// virtio-net, on a datagram socket standing in for the TAP (no root needed)

mod nic {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    pub use vmm::devices::virtio::net::device::{MAX_FRAME, RX, TX};
    use vmm::devices::virtio::net::tap::VNET_HDR_LEN;
    use vmm::devices::virtio::net::{Net, NetSpec};

    pub const RX_RING: u64 = 0x1_0000;
    pub const TX_RING: u64 = 0x2_0000;
    pub const BUF: u64 = 0x10_0000;
    pub const HDR: usize = VNET_HDR_LEN;

    pub struct Rig<'m> {
        pub bench: Bench<Net<UnixDatagram>>,
        pub mem: &'m GuestMemoryMmap,
        pub rx: Ring<'m>,
        pub tx: Ring<'m>,
        pub peer: UnixDatagram,
        seen: [u16; 2],
    }

    pub fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HDR];
        f.extend_from_slice(payload);
        f
    }

    impl<'m> Rig<'m> {
        pub fn new(test: &'static str, mem: &'m Arc<GuestMemoryMmap>) -> Self {
            let (ours, peer) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            peer.set_nonblocking(true).unwrap();
            let spec = NetSpec {
                iface_id: "eth0".into(),
                host_dev_name: "unused".into(),
                guest_mac: Some([6, 0, 0, 0, 0, 1]),
            };
            let net = Net::with_backend(&spec, ours).unwrap();
            let mut bench = Bench::new(test, mem, net);
            let (rx, tx) = (Ring::new(mem, RX_RING, 16), Ring::new(mem, TX_RING, 16));
            bench.start(&[&rx, &tx]);
            Self {
                bench,
                mem,
                rx,
                tx,
                peer,
                seen: [0; 2],
            }
        }

        /// Offers the chain stored at `head` on `queue`, kicks, runs; the used entries.
        pub fn kick_with(&mut self, queue: usize, head: u16) -> Vec<UsedElem> {
            if queue == RX { &self.rx } else { &self.tx }.offer(head);
            self.kick(queue)
        }

        pub fn kick(&mut self, queue: usize) -> Vec<UsedElem> {
            self.bench.driver.notify(queue as u32);
            self.bench.settle();
            let ring = if queue == RX { &self.rx } else { &self.tx };
            take_used(ring, &mut self.seen[queue])
        }

        /// What the host side got, frame by frame.
        pub fn sent_frames(&self) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME + 16];
            while let Ok(n) = self.peer.recv(&mut buf) {
                frames.push(buf[..n].to_vec());
            }
            frames
        }

        /// A well-formed frame goes out whole, and one comes in whole.
        pub fn assert_serves(&mut self, case: &str) {
            let out = frame(b"guest to host");
            self.mem.write_slice(&out, GuestAddress(BUF)).unwrap();
            let head = store_chain(&self.tx, 0, &[(BUF, out.len() as u32, false)]);
            assert_eq!(self.kick_with(TX, head).len(), 1, "{case}");
            assert_eq!(self.sent_frames(), [out], "{case}: the good frame went out");
            let inbound = frame(b"host to guest");
            self.peer.send(&inbound).unwrap();
            let head = store_chain(&self.rx, 0, &[(BUF, 2048, true)]);
            let used = self.kick_with(RX, head);
            assert_eq!(used.len(), 1, "{case}: {used:?}");
            assert_eq!(used[0].len as usize, inbound.len(), "{case}");
            let mut got = vec![0u8; inbound.len()];
            self.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
            assert_eq!(&got[HDR..], b"host to guest", "{case}");
        }

        pub fn counters(&self) -> Arc<vmm::devices::virtio::net::NetCounters> {
            self.bench.device.lock().unwrap().counters.clone()
        }
    }
}

#[test]
fn net_hostile_transmit_chains_are_returned_and_nothing_is_sent() {
    use nic::*;
    let mem = guest_memory();
    let mut rig = Rig::new("net_tx", &mem);
    let big = MAX_FRAME as u32 + 1;
    let f = |addr, len, flags, next| Descriptor::new(addr, len, flags, next);
    let cases: Vec<(&str, Vec<(u16, Descriptor)>)> = vec![
        (
            "a device-writable buffer",
            vec![(0, f(BUF, 64, F_WRITE, 0))],
        ),
        (
            "a buffer past the end of memory",
            vec![(0, f(MEM_SIZE, 64, 0, 0))],
        ),
        (
            "a buffer straddling the end of memory",
            vec![(0, f(MEM_SIZE - 8, 64, 0, 0))],
        ),
        (
            "an address that overflows u64",
            vec![(0, f(u64::MAX - 8, 64, 0, 0))],
        ),
        ("a frame over the largest", vec![(0, f(BUF, big, 0, 0))]),
        (
            "a frame shorter than its header",
            vec![(0, f(BUF, HDR as u32 - 1, 0, 0))],
        ),
        (
            "a buffer that points at itself",
            vec![(0, f(BUF, 64, F_NEXT, 0))],
        ),
        (
            "a next index past the ring",
            vec![(0, f(BUF, 64, F_NEXT, 300))],
        ),
        (
            "lengths whose sum overflows u32",
            vec![
                (0, f(BUF, 0x8000_0000, F_NEXT, 1)),
                (1, f(BUF, 0x8000_0000, 0, 0)),
            ],
        ),
    ];
    for (case, descs) in cases {
        let dropped = load(&rig.counters().tx_dropped);
        for (id, d) in descs {
            rig.tx.store(id, d);
        }
        let used = rig.kick_with(TX, 0);
        assert_eq!(used, [UsedElem { id: 0, len: 0 }], "{case}: returned");
        assert!(rig.sent_frames().is_empty(), "{case}: nothing sent");
        assert_eq!(load(&rig.counters().tx_dropped), dropped + 1, "{case}");
        rig.assert_serves(case);
    }
    // An avail index far ahead: nothing is taken, and service goes on once it is sane.
    let sane = rig.tx.avail_idx();
    rig.tx.set_avail_idx(sane.wrapping_add(1000));
    assert!(rig.kick(TX).is_empty());
    rig.tx.set_avail_idx(sane);
    rig.assert_serves("an avail index far ahead");
}

#[test]
fn net_hostile_receive_buffers_drop_the_frame_and_the_next_one_arrives() {
    use nic::*;
    let mem = guest_memory();
    let mut rig = Rig::new("net_rx", &mem);
    let f = |addr, len, flags, next| Descriptor::new(addr, len, flags, next);
    let cases: Vec<(&str, Vec<(u16, Descriptor)>)> = vec![
        ("a driver-readable buffer", vec![(0, f(BUF, 2048, 0, 0))]),
        (
            "a buffer past the end of memory",
            vec![(0, f(MEM_SIZE, 2048, F_WRITE, 0))],
        ),
        (
            "a buffer straddling the end of memory",
            vec![(0, f(MEM_SIZE - 8, 2048, F_WRITE, 0))],
        ),
        (
            "a buffer too small for the frame",
            vec![(0, f(BUF, 16, F_WRITE, 0))],
        ),
        ("an empty buffer", vec![(0, f(BUF, 0, F_WRITE, 0))]),
        (
            "a small buffer that points at itself",
            vec![(0, f(BUF, 4, F_WRITE | F_NEXT, 0))],
        ),
    ];
    for (case, descs) in cases {
        let dropped = load(&rig.counters().rx_dropped);
        rig.peer.send(&frame(&[0x77; 100])).unwrap();
        for (id, d) in descs {
            rig.rx.store(id, d);
        }
        let used = rig.kick_with(RX, 0);
        assert_eq!(used, [UsedElem { id: 0, len: 0 }], "{case}: returned empty");
        assert_eq!(load(&rig.counters().rx_dropped), dropped + 1, "{case}");
        rig.assert_serves(case);
    }
    // The MAC reads back from config space whatever the width.
    let mut mac = [0u8; 8];
    rig.bench.driver.transport.read(CONFIG_SPACE, &mut mac);
    assert_eq!(mac, [6, 0, 0, 0, 0, 1, 0, 0]);
}

// ---------------------------------------------------------------------------------------
// virtio-vsock

mod vs {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    pub use vmm::devices::virtio::vsock::packet::{Header, Op, MAX_PAYLOAD, TYPE_STREAM};
    pub use vmm::devices::virtio::vsock::{Vsock, VsockCounters, VsockSpec, HOST_CID, RX, TX};

    pub const GUEST_CID: u64 = 3;
    pub const RX_RING: u64 = 0x1_0000;
    pub const TX_RING: u64 = 0x2_0000;
    pub const EV_RING: u64 = 0x3_0000;
    pub use vmm::devices::virtio::test_support::VSOCK_TX_BUFS as TX_BUFS;
    pub const SIZE: u16 = 256;
    pub const GUEST_BUF_ALLOC: u32 = 64 * 1024;

    pub struct Rig<'m> {
        pub bench: Bench<Vsock>,
        pub mem: &'m GuestMemoryMmap,
        pub rx: Ring<'m>,
        pub tx: Ring<'m>,
        pub uds: PathBuf,
        pub counters: Arc<VsockCounters>,
        rx_seen: u16,
        tx_seen: u16,
        _dir: tempfile::TempDir,
    }

    pub fn header(src_port: u32, dst_port: u32, op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op: op.raw(),
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    impl<'m> Rig<'m> {
        pub fn new(test: &'static str, mem: &'m Arc<GuestMemoryMmap>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let spec = VsockSpec {
                guest_cid: GUEST_CID,
                uds_path: uds.clone(),
            };
            let device = Vsock::new(&spec).unwrap();
            let counters = device.counters.clone();
            let mut bench = Bench::new(test, mem, device);
            let rx = Ring::new(mem, RX_RING, SIZE);
            let tx = Ring::new(mem, TX_RING, SIZE);
            let ev = Ring::new(mem, EV_RING, SIZE);
            bench.start(&[&rx, &tx, &ev]);
            for id in 0..SIZE {
                post_vsock_rx(&rx, id);
            }
            let mut rig = Self {
                bench,
                mem,
                rx,
                tx,
                uds,
                counters,
                rx_seen: 0,
                tx_seen: 0,
                _dir: dir,
            };
            rig.bench.driver.notify(RX as u32);
            rig.bench.settle();
            rig
        }

        /// A host service listening at `<uds>_<port>`.
        pub fn listen(&self, port: u32) -> UnixListener {
            let path = vmm::devices::virtio::vsock::unix::service_path(&self.uds, port);
            UnixListener::bind(path).unwrap()
        }

        /// Queues packets (header, payload) on the transmit ring, kicks, and runs the
        /// device; every chain must come back.
        pub fn send(&mut self, packets: &[(Header, Vec<u8>)]) {
            assert!(packets.len() <= usize::from(SIZE / 2));
            for (slot, (h, payload)) in packets.iter().enumerate() {
                post_vsock_tx(self.mem, &self.tx, slot as u16, h, payload);
            }
            self.kick_tx(packets.len());
        }

        /// Kicks the transmit queue; `chains` chains must come back, with length 0.
        pub fn kick_tx(&mut self, chains: usize) {
            self.bench.driver.notify(TX as u32);
            self.bench.settle();
            let mut back = 0;
            while self.tx_seen != self.tx.used_idx() {
                assert_eq!(self.tx.used_elem(self.tx_seen).len, 0, "tx used length");
                self.tx_seen = self.tx_seen.wrapping_add(1);
                back += 1;
            }
            assert_eq!(back, chains, "every transmit chain comes back");
        }

        /// Runs the device until `done` holds on what the guest received (with a
        /// generous deadline); returns every packet received meanwhile.
        pub fn receive_until(
            &mut self,
            what: &str,
            mut done: impl FnMut(&[(Header, Vec<u8>)]) -> bool,
        ) -> Vec<(Header, Vec<u8>)> {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut got = Vec::new();
            loop {
                got.extend(self.take_rx());
                if done(&got) {
                    return got;
                }
                assert!(Instant::now() < deadline, "never happened: {what}: {got:?}");
                self.bench.em.run_with_timeout(10).unwrap();
            }
        }

        /// Takes what the device put in the receive ring and posts the buffers again.
        pub fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut got = Vec::new();
            while self.rx_seen != self.rx.used_idx() {
                let elem = self.rx.used_elem(self.rx_seen);
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let (h, data) = read_vsock_rx(self.mem, elem);
                assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID), "{h:?}");
                got.push((h, data));
                self.rx.offer(elem.id as u16);
            }
            if !got.is_empty() {
                self.bench.driver.notify(RX as u32);
                self.bench.settle();
            }
            got
        }

        /// A fresh guest connection to host port `port`, whose listener must accept it:
        /// the guest gets a RESPONSE.
        pub fn assert_connects(&mut self, case: &str, guest_port: u32, listener: &UnixListener) {
            self.send(&[(header(guest_port, 1025, Op::Request, 0), vec![])]);
            let got = self.receive_until(case, |got| {
                got.iter().any(|(h, _)| h.dst_port == guest_port)
            });
            let answer = got.iter().find(|(h, _)| h.dst_port == guest_port).unwrap();
            assert_eq!(
                Op::from_raw(answer.0.op),
                Some(Op::Response),
                "{case}: {got:?}"
            );
            let (stream, _) = listener.accept().unwrap();
            drop(stream);
        }

        pub fn host_connect(&self, port: u32) -> UnixStream {
            let mut client = UnixStream::connect(&self.uds).unwrap();
            client
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            client
        }
    }

    /// The ops of the packets addressed to `guest_port`.
    pub fn ops_for(got: &[(Header, Vec<u8>)], guest_port: u32) -> Vec<Option<Op>> {
        got.iter()
            .filter(|(h, _)| h.dst_port == guest_port)
            .map(|(h, _)| Op::from_raw(h.op))
            .collect()
    }
}

#[test]
fn vsock_malformed_packets_are_dropped_or_reset_and_the_device_goes_on() {
    use vs::*;
    let mem = guest_memory();
    let mut rig = Rig::new("vsock_malformed", &mem);
    let listener = rig.listen(1025);
    rig.assert_connects("before", 4999, &listener);
    let rw = |port, len| header(port, 1025, Op::Rw, len);
    let with = |mut h: Header, f: &dyn Fn(&mut Header)| {
        f(&mut h);
        h
    };
    // (case, header, payload bytes in the chain, whether the guest gets a RST for it)
    let cases: Vec<(&str, Header, usize, bool)> = vec![
        ("len larger than the buffers", rw(5001, 100), 10, true),
        (
            "len over the 64 KiB maximum",
            rw(5002, MAX_PAYLOAD as u32 + 1),
            0,
            true,
        ),
        ("len u32::MAX", rw(5003, u32::MAX), 0, true),
        ("unknown op", with(rw(5004, 0), &|h| h.op = 99), 0, true),
        ("op 0", with(rw(5005, 0), &|h| h.op = 0), 0, true),
        (
            "seqpacket type",
            with(rw(5006, 0), &|h| h.kind = 2),
            0,
            true,
        ),
        (
            "unknown type",
            with(rw(5007, 0), &|h| h.kind = 0xffff),
            0,
            true,
        ),
        (
            "a REQUEST with a payload",
            header(5008, 1025, Op::Request, 4),
            4,
            true,
        ),
        ("data on no connection", rw(5009, 4), 4, true),
        (
            "another guest's source cid",
            with(rw(5010, 0), &|h| h.src_cid = 4),
            0,
            false,
        ),
        (
            "the host's cid as source",
            with(rw(5011, 0), &|h| h.src_cid = HOST_CID),
            0,
            false,
        ),
        (
            "a destination that is not the host",
            with(rw(5012, 0), &|h| h.dst_cid = 7),
            0,
            false,
        ),
        (
            "a destination cid of u64::MAX",
            with(rw(5013, 0), &|h| h.dst_cid = u64::MAX),
            0,
            false,
        ),
        (
            "a RST on no connection",
            header(5014, 1025, Op::Rst, 0),
            0,
            false,
        ),
    ];
    for (case, h, payload, reset) in &cases {
        let invalid = load(&rig.counters.invalid_packets);
        rig.send(&[(*h, vec![0x42; *payload])]);
        // The answer (or its absence) shows once a packet sent after it is answered.
        rig.send(&[(header(h.src_port + 1000, 1, Op::Request, 0), vec![])]);
        let got = rig.receive_until(case, |got| {
            got.iter().any(|(g, _)| g.dst_port == h.src_port + 1000)
        });
        let expected = if *reset { vec![Some(Op::Rst)] } else { vec![] };
        assert_eq!(ops_for(&got, h.src_port), expected, "{case}: {got:?}");
        let counted = load(&rig.counters.invalid_packets) - invalid;
        let bad_header = !matches!(*case, "data on no connection" | "a RST on no connection");
        assert_eq!(counted, u64::from(bad_header), "{case}: counted");
    }

    // Chains the device cannot read at all: dropped, counted, nothing back to the guest.
    let chains: Vec<(&str, Vec<(u16, Descriptor)>)> = vec![
        (
            "a header of 40 bytes",
            vec![(0, Descriptor::new(TX_BUFS, 40, 0, 0))],
        ),
        (
            "an empty chain",
            vec![(0, Descriptor::new(TX_BUFS, 0, 0, 0))],
        ),
        (
            "a header split with 4 bytes missing",
            vec![
                (0, Descriptor::new(TX_BUFS, 20, F_NEXT, 1)),
                (1, Descriptor::new(TX_BUFS + 20, 20, 0, 0)),
            ],
        ),
        (
            "a device-writable header",
            vec![(0, Descriptor::new(TX_BUFS, 44, F_WRITE, 0))],
        ),
        (
            "a header past the end of memory",
            vec![(0, Descriptor::new(MEM_SIZE - 20, 44, 0, 0))],
        ),
        (
            "a header whose address overflows",
            vec![(0, Descriptor::new(u64::MAX - 10, 44, 0, 0))],
        ),
        (
            "a chain that loops",
            vec![
                (0, Descriptor::new(TX_BUFS, 8, F_NEXT, 1)),
                (1, Descriptor::new(TX_BUFS + 8, 8, F_NEXT, 0)),
            ],
        ),
        (
            "a next index past the ring",
            vec![(0, Descriptor::new(TX_BUFS, 44, F_NEXT, 999))],
        ),
    ];
    let good = header(6000, 1025, Op::Rw, 0);
    mem.write_slice(&good.to_bytes(), GuestAddress(TX_BUFS))
        .unwrap();
    for (case, descs) in chains {
        let before = load(&rig.counters.invalid_chains) + load(&rig.counters.invalid_packets);
        for (id, d) in descs {
            rig.tx.store(id, d);
        }
        rig.tx.offer(0);
        rig.kick_tx(1);
        let after = load(&rig.counters.invalid_chains) + load(&rig.counters.invalid_packets);
        assert_eq!(after, before + 1, "{case}: counted");
        assert!(
            ops_for(&rig.take_rx(), 6000).is_empty(),
            "{case}: a chain that cannot be read is not answered"
        );
    }

    // An avail index far ahead on the transmit queue is ignored.
    let sane = rig.tx.avail_idx();
    rig.tx.set_avail_idx(sane.wrapping_add(1000));
    rig.kick_tx(0);
    rig.tx.set_avail_idx(sane);
    rig.assert_connects("after", 7000, &listener);
}

#[test]
fn vsock_guest_that_overruns_the_hosts_credit_is_reset_and_others_go_on() {
    use vs::*;
    let mem = guest_memory();
    let mut rig = Rig::new("vsock_credit", &mem);
    let listener = rig.listen(1025);
    rig.send(&[(header(5000, 1025, Op::Request, 0), vec![])]);
    let got = rig.receive_until("response", |got| !got.is_empty());
    assert_eq!(ops_for(&got, 5000), [Some(Op::Response)]);
    let host_buf_alloc = got[0].0.buf_alloc;
    // The host end never reads. The guest ignores the credit it was given and sends
    // 64 KiB packets until it is reset: the device must not buffer without bound.
    let (_host_end, _) = listener.accept().unwrap();
    let chunk = vec![0x55u8; MAX_PAYLOAD];
    let mut sent = 0u64;
    let mut reset = false;
    while !reset {
        assert!(
            sent < 64 * MAX_PAYLOAD as u64,
            "sent {sent} bytes on a {host_buf_alloc}-byte credit without a reset"
        );
        rig.send(&[(
            header(5000, 1025, Op::Rw, chunk.len() as u32),
            chunk.clone(),
        )]);
        sent += chunk.len() as u64;
        reset = ops_for(&rig.take_rx(), 5000).contains(&Some(Op::Rst));
    }
    assert!(
        sent > u64::from(host_buf_alloc),
        "reset only past the credit"
    );
    // The device still serves other connections.
    rig.assert_connects("after the overrun", 5001, &listener);
}

#[test]
fn vsock_connection_request_flood_gets_one_answer_each_within_the_limit() {
    use vmm::devices::virtio::vsock::muxer::MAX_CONNECTIONS;
    use vs::*;
    let mem = guest_memory();
    let mut rig = Rig::new("vsock_flood", &mem);
    let listener = rig.listen(1025);
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    const FLOOD: u32 = 300;
    let mut got = Vec::new();
    for batch in (0..FLOOD).collect::<Vec<_>>().chunks(64) {
        let packets: Vec<(Header, Vec<u8>)> = batch
            .iter()
            .map(|i| (header(10_000 + i, 1025, Op::Request, 0), vec![]))
            .collect();
        rig.send(&packets);
        let last = 10_000 + batch[batch.len() - 1];
        got.extend(rig.receive_until("answers to the batch", |got| {
            got.iter().any(|(h, _)| h.dst_port == last)
        }));
        // The host service keeps up, so that its backlog is never what refuses.
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
    }
    let mut responses = 0;
    for i in 0..FLOOD {
        let ops = ops_for(&got, 10_000 + i);
        assert_eq!(ops.len(), 1, "one answer for request {i}: {ops:?}");
        if ops[0] == Some(Op::Response) {
            responses += 1;
        } else {
            assert_eq!(ops[0], Some(Op::Rst), "request {i}");
        }
    }
    assert_eq!(responses, MAX_CONNECTIONS, "connections up to the limit");
    // The guest closes them all; then it can connect again.
    for batch in (0..MAX_CONNECTIONS as u32).collect::<Vec<_>>().chunks(64) {
        let packets: Vec<(Header, Vec<u8>)> = batch
            .iter()
            .map(|i| (header(10_000 + i, 1025, Op::Rst, 0), vec![]))
            .collect();
        rig.send(&packets);
    }
    drop(accepted);
    listener.set_nonblocking(false).unwrap();
    rig.assert_connects("after the flood", 20_000, &listener);
}

#[test]
fn vsock_host_client_flood_is_capped_and_a_later_client_is_served() {
    use vmm::devices::virtio::vsock::muxer::MAX_CONNECTIONS;
    use vs::*;
    let mem = guest_memory();
    let mut rig = Rig::new("vsock_host_flood", &mem);
    // 300 clients connect to the device's socket and say nothing.
    let mut silent = Vec::new();
    while silent.len() < 300 {
        for _ in 0..50 {
            silent.push(std::os::unix::net::UnixStream::connect(&rig.uds).unwrap());
        }
        rig.bench.settle();
    }
    rig.bench.settle();
    let mut closed = 0;
    for c in &mut silent {
        c.set_nonblocking(true).unwrap();
        if matches!(std::io::Read::read(c, &mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        300 - MAX_CONNECTIONS,
        "clients beyond the limit are closed"
    );
    assert!(
        rig.take_rx().is_empty(),
        "the guest heard nothing of silent clients"
    );
    drop(silent);
    rig.bench.settle();
    // A client that says what it wants now reaches the guest's listener.
    let mut client = rig.host_connect(1024);
    let got = rig.receive_until("the request", |got| !got.is_empty());
    let request = got[0].0;
    assert_eq!(
        (Op::from_raw(request.op), request.dst_port),
        (Some(Op::Request), 1024)
    );
    rig.send(&[(header(1024, request.src_port, Op::Response, 0), vec![])]);
    let mut line = [0u8; 3];
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut read = 0;
    while read < 3 {
        rig.bench.settle();
        read += std::io::Read::read(&mut client, &mut line[read..]).unwrap();
    }
    assert_eq!(&line, b"OK ");
}
