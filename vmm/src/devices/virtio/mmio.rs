//! The virtio-mmio transport (virtio 1.x, section 4.2.2), modern interface only: a 4 KiB
//! register window per device, announced to the guest on the kernel command line as
//! `virtio_mmio.device=4K@<base>:<irq>`.
//!
//! Every register access comes from the guest, so nothing here trusts it: accesses of the
//! wrong width, writes out of sequence (queue set-up after DRIVER_OK, features after
//! FEATURES_OK) and bad queue selections are ignored and counted; a driver that accepts
//! features without VERSION_1 never gets FEATURES_OK; a queue size or ring address the queue
//! cannot take, and a device that cannot start, report DEVICE_NEEDS_RESET, and such a
//! device stays stopped until the driver resets it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::QueueT;

use super::{status, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::lock;
use crate::devices::BusDevice;

/// Size of each device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION_MODERN: u32 = 2;
/// "EMBR", little endian: the vendor id Ember reports.
const VENDOR_ID: u32 = 0x5242_4d45;
/// Where the device's configuration space starts in the window.
pub const CONFIG_SPACE: u64 = 0x100;

/// Register offsets in the window (virtio spec 4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Guest accesses the transport ignored, by kind.
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub bad_access: AtomicU64,
    pub out_of_sequence: AtomicU64,
    /// Queue sizes or ring addresses the queue could not take.
    pub bad_queue_config: AtomicU64,
    pub activate_failures: AtomicU64,
}

/// One device's MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    pub counters: TransportCounters,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Self {
            device,
            mem,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            counters: TransportCounters::default(),
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn read_register(&self, offset: u64) -> u32 {
        let device = lock(&self.device);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION_MODERN,
            reg::DEVICE_ID => device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => device.avail_features() as u32,
                1 => (device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected(&*device, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected(&*device, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn selected(&self, device: &dyn VirtioDevice, f: impl Fn(&virtio_queue::Queue) -> u32) -> u32 {
        device.queues().get(self.queue_sel as usize).map_or(0, f)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    /// Applies a queue register write to the selected queue; `f` says whether the queue
    /// took the value. A value it cannot take (a size that is zero, not a power of two or
    /// over the maximum, a misaligned ring) would leave the device using other rings than
    /// the driver's: the device then needs a reset and will not start.
    fn with_selected_queue(&mut self, f: impl FnOnce(&mut virtio_queue::Queue) -> bool) {
        if !self.queue_setup_allowed() {
            Self::count(&self.counters.out_of_sequence);
            return;
        }
        let mut device = lock(&self.device);
        let taken = match device.queues_mut().get_mut(self.queue_sel as usize) {
            Some(queue) => f(queue),
            None => return Self::count(&self.counters.bad_access),
        };
        drop(device);
        if !taken {
            Self::count(&self.counters.bad_queue_config);
            self.needs_reset();
        }
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver (virtio spec 2.1.2).
    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        // A lost interrupt only delays the driver's look at the status.
        let _ = self.interrupt.signal_config_change();
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // The driver writes each ring address in two halves.
        let high = matches!(
            offset,
            reg::QUEUE_DESC_HIGH | reg::QUEUE_DRIVER_HIGH | reg::QUEUE_DEVICE_HIGH
        );
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.with_selected_queue(|q| {
                u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok())
            }),
            reg::QUEUE_READY => self.with_selected_queue(|q| {
                q.set_ready(value == 1);
                true
            }),
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => self.with_selected_queue(|q| {
                let addr = half(q.desc_table(), value, high);
                q.try_set_desc_table_address(addr).is_ok()
            }),
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => self.with_selected_queue(|q| {
                let addr = half(q.avail_ring(), value, high);
                q.try_set_avail_ring_address(addr).is_ok()
            }),
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => self.with_selected_queue(|q| {
                let addr = half(q.used_ring(), value, high);
                q.try_set_used_ring_address(addr).is_ok()
            }),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            _ => Self::count(&self.counters.bad_access),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER;
        if !negotiating {
            Self::count(&self.counters.out_of_sequence);
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return Self::count(&self.counters.bad_access),
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
    }

    /// A kick that was not caught by the queue's ioeventfd (none registered): forward it.
    fn notify_queue(&self, queue: u32) {
        let device = lock(&self.device);
        match device.queue_events().get(queue as usize) {
            Some(evt) => {
                let _ = evt.write(1);
            }
            None => Self::count(&self.counters.bad_access),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        // The driver adds one bit at a time, in order (virtio spec 3.1.1).
        let added = value & !self.status;
        if value & self.status != self.status || added.count_ones() != 1 {
            return Self::count(&self.counters.out_of_sequence);
        }
        let ok = match added {
            status::ACKNOWLEDGE => self.status == 0,
            status::DRIVER => self.status == status::ACKNOWLEDGE,
            status::FEATURES_OK => {
                self.status == status::ACKNOWLEDGE | status::DRIVER && self.accept_features()
            }
            // A device that needs a reset (a queue set-up it refused) stays stopped.
            status::DRIVER_OK => {
                self.status & (status::FEATURES_OK | status::DEVICE_NEEDS_RESET)
                    == status::FEATURES_OK
                    && self.activate()
            }
            _ => false,
        };
        if ok {
            self.status = value;
        } else {
            Self::count(&self.counters.out_of_sequence);
        }
    }

    /// Accepts the driver's features if they are a subset of the offer with VERSION_1.
    fn accept_features(&mut self) -> bool {
        let mut device = lock(&self.device);
        let offered = device.avail_features();
        if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return false;
        }
        device.set_acked_features(self.driver_features);
        true
    }

    fn activate(&mut self) -> bool {
        let mut device = lock(&self.device);
        // virtio-queue takes an available ring at address 0 for one never set and yields
        // nothing from it: a queue the driver made ready without addresses is unusable.
        let valid = device
            .queues()
            .iter()
            .all(|q| !q.ready() || (q.is_valid(self.mem.as_ref()) && q.avail_ring() != 0));
        let started = valid
            && device
                .activate(self.mem.clone(), self.interrupt.clone())
                .is_ok();
        drop(device);
        if !started {
            Self::count(&self.counters.activate_failures);
            self.needs_reset();
        }
        started
    }

    fn reset(&mut self) {
        let mut device = lock(&self.device);
        device.reset();
        device.queues_mut().iter_mut().for_each(|q| q.reset());
        drop(device);
        self.interrupt.clear();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

/// `addr` with its low or (`high`) high 32 bits replaced by `value`.
fn half(addr: u64, value: u32, high: bool) -> vm_memory::GuestAddress {
    let value = u64::from(value);
    vm_memory::GuestAddress(if high {
        (addr & 0xffff_ffff) | value << 32
    } else {
        (addr & !0xffff_ffff) | value
    })
}

#[path = "mmio_persist.rs"]
mod persist;
pub use persist::{MmioStateError, MmioTransportArgs, MmioTransportState};

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            Self::count(&self.counters.bad_access);
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Self::count(&self.counters.bad_access);
        };
        if offset % 4 != 0 {
            return Self::count(&self.counters.bad_access);
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{Block, DriveSpec};
    use crate::devices::virtio::test_support::MmioDriver;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Rig {
        driver: MmioDriver,
        block: Arc<Mutex<Block>>,
    }

    fn rig(name: &str) -> Rig {
        let path = std::env::temp_dir().join(format!("ember-mmio-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let spec = DriveSpec {
            drive_id: "d".into(),
            path,
            read_only: false,
            flush_to_disk: false,
        };
        let block = Arc::new(Mutex::new(Block::new(&spec).unwrap()));
        let mem =
            Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Rig {
            driver: MmioDriver::new(MmioTransport::new(block.clone(), mem, interrupt)),
            block,
        }
    }

    impl Rig {
        fn read(&mut self, offset: u64) -> u32 {
            self.driver.read(offset)
        }
        fn write(&mut self, offset: u64, value: u32) {
            self.driver.write(offset, value);
        }
        fn negotiate(&mut self, features_high: u32) {
            self.driver.negotiate(u64::from(features_high) << 32);
        }
        /// Queue 0 with 16 entries, its parts a page apart from `desc` (which may lie
        /// outside guest memory).
        fn setup_queue(&mut self, desc: u32) {
            self.write(reg::QUEUE_SEL, 0);
            self.write(reg::QUEUE_NUM, 16);
            self.write(reg::QUEUE_DESC_LOW, desc);
            self.write(reg::QUEUE_DRIVER_LOW, desc + 0x1000);
            self.write(reg::QUEUE_DEVICE_LOW, desc + 0x2000);
            self.write(reg::QUEUE_READY, 1);
        }
        fn out_of_sequence(&self) -> u64 {
            self.driver
                .transport
                .counters
                .out_of_sequence
                .load(Ordering::Relaxed)
        }
        fn bad_access(&self) -> u64 {
            self.driver
                .transport
                .counters
                .bad_access
                .load(Ordering::Relaxed)
        }
    }

    const ALL_BUT_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    #[test]
    fn identity_registers() {
        let mut r = rig("identity");
        assert_eq!(r.read(reg::MAGIC), MAGIC);
        assert_eq!(r.read(reg::VERSION), 2);
        assert_eq!(r.read(reg::DEVICE_ID), crate::devices::virtio::TYPE_BLOCK);
        r.write(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r.read(reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        assert_eq!(r.read(reg::QUEUE_NUM_MAX), 256);
        let mut narrow = [0xffu8; 2];
        r.driver.transport.read(reg::MAGIC, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        assert_eq!(r.bad_access(), 1);
    }

    #[test]
    fn full_handshake_activates_the_device() {
        let mut r = rig("handshake");
        r.negotiate(1);
        assert_eq!(r.read(reg::STATUS), ALL_BUT_OK);
        r.setup_queue(0x1_0000);
        r.write(reg::STATUS, ALL_BUT_OK | status::DRIVER_OK);
        assert_eq!(r.read(reg::STATUS), ALL_BUT_OK | status::DRIVER_OK);
        assert!(r.block.lock().unwrap().is_activated());
        assert_eq!(r.out_of_sequence(), 0);
    }

    #[test]
    fn legacy_or_unoffered_features_are_refused() {
        let mut r = rig("legacy");
        r.negotiate(0);
        assert_eq!(r.read(reg::STATUS) & status::FEATURES_OK, 0, "no VERSION_1");
        let mut r = rig("unoffered");
        r.negotiate(1 | 1 << 7);
        assert_eq!(
            r.read(reg::STATUS) & status::FEATURES_OK,
            0,
            "bit 39 is not offered"
        );
    }

    #[test]
    fn out_of_order_steps_are_ignored() {
        let mut r = rig("order");
        r.write(reg::STATUS, status::DRIVER);
        assert_eq!(r.read(reg::STATUS), 0, "DRIVER before ACKNOWLEDGE");
        r.setup_queue(0x1_0000);
        assert_eq!(
            r.read(reg::QUEUE_READY),
            0,
            "queue set-up before FEATURES_OK"
        );
        r.write(reg::STATUS, status::ACKNOWLEDGE);
        r.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(
            !r.block.lock().unwrap().is_activated(),
            "activation before FEATURES_OK"
        );
        assert!(r.out_of_sequence() >= 3);
    }

    #[test]
    fn queue_changes_after_driver_ok_are_ignored() {
        let mut r = rig("after-ok");
        r.negotiate(1);
        r.setup_queue(0x1_0000);
        r.write(reg::STATUS, ALL_BUT_OK | status::DRIVER_OK);
        let before = r.out_of_sequence();
        r.write(reg::QUEUE_DESC_LOW, 0xdead_0000);
        r.write(reg::DRIVER_FEATURES, 0);
        assert_eq!(r.out_of_sequence(), before + 2);
    }

    #[test]
    fn rings_outside_memory_need_a_reset() {
        let mut r = rig("bad-rings");
        r.negotiate(1);
        r.setup_queue(0xfff0_0000);
        r.write(reg::STATUS, ALL_BUT_OK | status::DRIVER_OK);
        assert_eq!(r.read(reg::STATUS), ALL_BUT_OK | status::DEVICE_NEEDS_RESET);
        assert!(!r.block.lock().unwrap().is_activated());
        assert_eq!(r.read(reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    }

    const INT_CONFIG: u32 = crate::devices::virtio::INT_CONFIG_CHANGE;

    #[test]
    fn reset_returns_everything_to_the_start() {
        let mut r = rig("reset");
        r.negotiate(1);
        r.setup_queue(0x1_0000);
        r.write(reg::STATUS, ALL_BUT_OK | status::DRIVER_OK);
        r.write(reg::STATUS, 0);
        assert_eq!(r.read(reg::STATUS), 0);
        assert_eq!(r.read(reg::QUEUE_READY), 0);
        assert!(!r.block.lock().unwrap().is_activated());
        // And the device can be brought up again.
        r.negotiate(1);
        r.setup_queue(0x1_0000);
        r.write(reg::STATUS, ALL_BUT_OK | status::DRIVER_OK);
        assert!(r.block.lock().unwrap().is_activated());
    }

    #[test]
    fn failed_sticks_and_bad_queue_selectors_are_harmless() {
        let mut r = rig("failed");
        r.write(reg::QUEUE_SEL, 7);
        assert_eq!(r.read(reg::QUEUE_NUM_MAX), 0);
        r.write(reg::STATUS, status::ACKNOWLEDGE);
        r.write(reg::STATUS, status::ACKNOWLEDGE | status::FAILED);
        assert_ne!(r.read(reg::STATUS) & status::FAILED, 0);
        r.write(reg::QUEUE_NOTIFY, 9);
        r.write(0x0c8, 1);
        assert!(r.bad_access() >= 2);
    }
}
