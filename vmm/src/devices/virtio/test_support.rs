//! Test support shared by the unit tests and the integration tests in `vmm/tests/`: a split
//! ring laid out in guest memory as a driver would ([`Ring`]), a guest driver's view of a
//! virtio-mmio register window ([`MmioDriver`]), and a datagram socket as a network frame
//! backend. Not part of Ember's interface; hidden from its documentation.
//!
//! Compiled in every build (integration tests link the plain library), so nothing here may
//! use virtio-queue's `test-utils` mocks, which only test builds enable.

use std::io;
use std::os::unix::net::UnixDatagram;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{reg, MmioTransport};
use super::net::device::FrameBackend;
use super::{status, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// Descriptor flags (virtio spec 2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Offsets of a ring's parts from its base: each gets its own page, which holds a part of
/// a ring of up to 256 entries.
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
/// Guest memory a [`Ring`] takes from its base.
pub const RING_SPAN: u64 = 0x3000;

/// One entry of the used ring: the chain's head and the bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// A split virtqueue in guest memory, as the driver side sees it: descriptor table at
/// `base`, available ring one page up, used ring two pages up. Accessors panic on memory
/// errors: the ring lies where the test put it.
pub struct Ring<'m> {
    mem: &'m GuestMemoryMmap,
    base: u64,
    size: u16,
}

impl<'m> Ring<'m> {
    /// A ring of `size` entries (at most 256) at `base`. Nothing is written: fresh guest
    /// memory is zero, an empty ring, and a ring made again over the same memory (as after
    /// a restore) goes on from where it was.
    pub fn new(mem: &'m GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self { mem, base, size }
    }

    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn desc_table(&self) -> u64 {
        self.base
    }
    pub fn avail_ring(&self) -> u64 {
        self.base + AVAIL_OFFSET
    }
    pub fn used_ring(&self) -> u64 {
        self.base + USED_OFFSET
    }

    fn write<T: vm_memory::ByteValued>(&self, addr: u64, value: T) {
        self.mem
            .write_obj(value, GuestAddress(addr))
            .expect("the ring lies in guest memory");
    }

    fn read<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.mem
            .read_obj(GuestAddress(addr))
            .expect("the ring lies in guest memory")
    }

    /// Writes descriptor `id` (which may lie past the ring's size, for hostile tests that
    /// point at it).
    pub fn store(&self, id: u16, desc: Descriptor) {
        self.write(self.base + 16 * u64::from(id), RawDescriptor::from(desc));
    }

    /// Makes the chain starting at descriptor `head` available to the device.
    pub fn offer(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail_ring() + 4 + 2 * u64::from(idx % self.size);
        self.write(slot, head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        self.read(self.avail_ring() + 2)
    }

    /// Sets the available index as a driver would, however wrong the value.
    pub fn set_avail_idx(&self, idx: u16) {
        self.write(self.avail_ring() + 2, idx);
    }

    /// Sets the available ring's flags (`VRING_AVAIL_F_NO_INTERRUPT` is 1).
    pub fn set_avail_flags(&self, flags: u16) {
        self.write(self.avail_ring(), flags);
    }

    pub fn used_idx(&self) -> u16 {
        self.read(self.used_ring() + 2)
    }

    /// The used entry the device made as its `n`-th (counted from 0, modulo the ring size).
    pub fn used_elem(&self, n: u16) -> UsedElem {
        let at = self.used_ring() + 4 + 8 * u64::from(n % self.size);
        UsedElem {
            id: self.read(at),
            len: self.read(at + 4),
        }
    }

    /// The queue as the device holds it once the driver set it up.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("a valid ring size");
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc_table());
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail_ring());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_ring());
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }
}

/// A guest driver's side of one virtio-mmio register window: 32-bit register accesses
/// and the steps of the virtio handshake.
pub struct MmioDriver {
    pub transport: MmioTransport,
}

impl MmioDriver {
    pub fn new(transport: MmioTransport) -> Self {
        Self { transport }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Adds `bit` to the status register, as drivers do: read, or, write back.
    pub fn add_status(&mut self, bit: u32) {
        let now = self.status();
        self.write(reg::STATUS, now | bit);
    }

    /// ACKNOWLEDGE, DRIVER, the driver's features (both words), FEATURES_OK; returns the
    /// status register afterwards.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write(reg::STATUS, 0);
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        for word in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, word);
            self.write(reg::DRIVER_FEATURES, (features >> (32 * word)) as u32);
        }
        self.add_status(status::FEATURES_OK);
        self.status()
    }

    /// The device's offered features, both words.
    pub fn device_features(&mut self) -> u64 {
        let mut features = 0;
        for word in 0..2u32 {
            self.write(reg::DEVICE_FEATURES_SEL, word);
            features |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * word);
        }
        features
    }

    /// Programs queue `index` with `ring`'s size and addresses and marks it ready.
    pub fn setup_queue(&mut self, index: u32, ring: &Ring) {
        self.write(reg::QUEUE_SEL, index);
        self.write(reg::QUEUE_NUM, u32::from(ring.size()));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, ring.desc_table()),
            (reg::QUEUE_DRIVER_LOW, ring.avail_ring()),
            (reg::QUEUE_DEVICE_LOW, ring.used_ring()),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
    }

    /// The whole start-up of a modern driver accepting only VERSION_1: negotiation, each
    /// ring as its queue, DRIVER_OK. Returns the status register afterwards.
    pub fn start(&mut self, rings: &[&Ring]) -> u32 {
        self.negotiate(VIRTIO_F_VERSION_1);
        for (index, ring) in rings.iter().enumerate() {
            self.setup_queue(index as u32, ring);
        }
        self.add_status(status::DRIVER_OK);
        self.status()
    }

    pub fn notify(&mut self, queue: u32) {
        self.write(reg::QUEUE_NOTIFY, queue);
    }
}

/// A datagram socket keeps frame boundaries, like a TAP: the network device's backend in
/// tests, which need neither root nor a TAP.
impl FrameBackend for UnixDatagram {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.send(frame)
    }
}

/// Where the vsock test drivers put their receive buffers: buffer `id` at
/// `VSOCK_RX_BUFS + id * 8 KiB`, room for a header and 4 KiB of data.
pub const VSOCK_RX_BUFS: u64 = 0x10_0000;
const VSOCK_RX_STRIDE: u64 = 0x2000;
pub const VSOCK_RX_BUF_LEN: u32 = super::vsock::packet::HEADER_LEN as u32 + 4096;

/// Where the vsock test drivers put the packets they send: slot `n` at
/// `VSOCK_TX_BUFS + n * VSOCK_TX_SLOT`, the header first and the payload 256 bytes in.
pub const VSOCK_TX_BUFS: u64 = 0x40_0000;
pub const VSOCK_TX_SLOT: u64 = 0x1_1000;

/// The guest address of vsock transmit slot `slot`.
pub fn vsock_tx_buf(slot: u16) -> u64 {
    VSOCK_TX_BUFS + u64::from(slot) * VSOCK_TX_SLOT
}

/// Writes a packet into transmit slot `slot` and offers it on `ring` (a vsock transmit
/// queue) as Linux lays it out: the header in descriptor `2 * slot`, chained to the payload
/// in `2 * slot + 1` unless the payload is empty.
pub fn post_vsock_tx(
    mem: &GuestMemoryMmap,
    ring: &Ring,
    slot: u16,
    header: &super::vsock::packet::Header,
    payload: &[u8],
) {
    use super::vsock::packet::HEADER_LEN;
    let base = vsock_tx_buf(slot);
    mem.write_slice(&header.to_bytes(), GuestAddress(base))
        .expect("the transmit slot is in guest memory");
    mem.write_slice(payload, GuestAddress(base + 0x100))
        .expect("the transmit slot is in guest memory");
    let (head, data) = (slot * 2, slot * 2 + 1);
    let flags = if payload.is_empty() { 0 } else { F_NEXT };
    ring.store(head, Descriptor::new(base, HEADER_LEN as u32, flags, data));
    ring.store(
        data,
        Descriptor::new(base + 0x100, payload.len() as u32, 0, 0),
    );
    ring.offer(head);
}

/// Gives the device receive buffer `id` in `ring` (a vsock receive queue).
pub fn post_vsock_rx(ring: &Ring, id: u16) {
    let addr = VSOCK_RX_BUFS + u64::from(id) * VSOCK_RX_STRIDE;
    ring.store(id, Descriptor::new(addr, VSOCK_RX_BUF_LEN, F_WRITE, 0));
    ring.offer(id);
}

/// The packet the device put in the receive buffer that `elem` returned: its header and
/// data. Panics unless the used length is the header plus the data length it announces.
pub fn read_vsock_rx(
    mem: &GuestMemoryMmap,
    elem: UsedElem,
) -> (super::vsock::packet::Header, Vec<u8>) {
    use super::vsock::packet::{Header, HEADER_LEN};
    let addr = VSOCK_RX_BUFS + u64::from(elem.id) * VSOCK_RX_STRIDE;
    let mut raw = [0u8; HEADER_LEN];
    mem.read_slice(&mut raw, GuestAddress(addr))
        .expect("the receive buffer is in guest memory");
    let header = Header::from_bytes(&raw);
    assert_eq!(elem.len, HEADER_LEN as u32 + header.len, "used length");
    let mut data = vec![0u8; header.len as usize];
    mem.read_slice(&mut data, GuestAddress(addr + HEADER_LEN as u64))
        .expect("the receive buffer is in guest memory");
    (header, data)
}
