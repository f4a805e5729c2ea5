//! The network device: a receive and a transmit queue, the guest MAC in configuration
//! space, no offloads. Frames move whole between the rings and the backend (the TAP), each
//! with its 12-byte virtio-net header.
//!
//! Receive: a frame read from the backend waits in `rx_frame` until the guest offers a
//! buffer chain big enough; the backend is not read again meanwhile, so nothing is lost to
//! a full ring (the TAP's own queue holds the rest). Transmit: each chain is gathered into
//! one frame and written. Chains with descriptors of the wrong direction, outside guest
//! memory or too large are dropped and counted; the VMM keeps running.
//!
//! A TAP deleted while the VM runs (`ip link del`) leaves our descriptor detached: reads
//! and writes fail with `EBADFD` and epoll reports it as an error. The device then logs one
//! warning naming the TAP, stops reading and watching it, and drops (and counts in
//! `tx_dropped`) every frame the guest sends; the guest and the rest of the VM go on. A TAP
//! made again under the same name is a new interface this descriptor never reaches.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::Bytes;

use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::virtio::{
    read_config_bytes, SetupError, VirtioCommon, VirtioDevice, WholeChain, TYPE_NET,
    VIRTIO_F_VERSION_1,
};

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
pub(super) const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Largest frame handled: a 64 KiB packet plus Ethernet and virtio-net headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Where frames go to and come from: the TAP in production.
pub trait FrameBackend: AsRawFd + Send {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
}

impl FrameBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }
}

/// Errors while creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network-interfaces[{0}].host_dev_name: cannot open TAP {1}: {2}")]
    OpenTap(String, String, io::Error),
    #[error("network-interfaces[{0}]: {1}")]
    Setup(String, SetupError),
}

/// What an interface is made of, from the configuration.
#[derive(Debug, Clone)]
pub struct NetSpec {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: Option<[u8; 6]>,
}

/// Per-device counters, for metrics and tests.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub invalid_chains: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A virtio-net device over a frame backend.
pub struct Net<B: FrameBackend = Tap> {
    pub iface_id: String,
    /// The host interface the backend is, for snapshots.
    pub(super) host_dev_name: String,
    pub(super) backend: B,
    pub(super) config: [u8; 6],
    pub(super) common: VirtioCommon,
    rx_frame: Vec<u8>,
    pub(super) rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    pub counters: Arc<NetCounters>,
    /// The backend went away for good (see the module docs): it is read and written no more.
    pub(super) backend_lost: bool,
    /// Whether the backend's fd is on the event loop (taken off once it is lost).
    pub(super) backend_watched: bool,
}

impl Net<Tap> {
    /// Opens the TAP and builds the device.
    pub fn new(spec: &NetSpec) -> Result<Self, NetError> {
        let tap = Tap::open(&spec.host_dev_name)
            .map_err(|e| NetError::OpenTap(spec.iface_id.clone(), spec.host_dev_name.clone(), e))?;
        Self::with_backend(spec, tap)
    }
}

impl<B: FrameBackend> Net<B> {
    pub fn with_backend(spec: &NetSpec, backend: B) -> Result<Self, NetError> {
        let id = &spec.iface_id;
        let mut avail_features = VIRTIO_F_VERSION_1;
        if spec.guest_mac.is_some() {
            avail_features |= VIRTIO_NET_F_MAC;
        }
        Ok(Self {
            iface_id: id.clone(),
            host_dev_name: spec.host_dev_name.clone(),
            backend,
            config: spec.guest_mac.unwrap_or_default(),
            common: VirtioCommon::new(avail_features, 2, QUEUE_SIZE)
                .map_err(|e| NetError::Setup(id.clone(), e))?,
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0; MAX_FRAME],
            counters: Arc::new(NetCounters::default()),
            backend_lost: false,
            backend_watched: false,
        })
    }

    /// Whether the backend is gone for good (a deleted TAP).
    pub fn backend_lost(&self) -> bool {
        self.backend_lost
    }

    /// Notes a failed read or write: a detached TAP (`EBADFD`, or `ENODEV`/`ENXIO`) is
    /// gone for good and said so once; anything else (a TAP that is down, a full queue) only
    /// costs the frame.
    fn backend_failed(&mut self, error: &io::Error) {
        let gone = matches!(
            error.raw_os_error(),
            Some(libc::EBADFD | libc::ENODEV | libc::ENXIO)
        );
        if !gone || self.backend_lost {
            return;
        }
        self.backend_lost = true;
        self.rx_pending = None;
        crate::rpc::logger::log(
            api::requests::LogLevel::Warning,
            "net",
            &format!(
                "network-interfaces[{}]: TAP {} is gone ({error}); the guest's frames are \
                 dropped and counted in tx_dropped and none are received; the VM goes on. \
                 A TAP made again under that name is not reattached: restart or restore the \
                 VM to use it",
                self.iface_id, self.host_dev_name
            ),
        );
    }

    /// Moves frames from the backend into guest buffers; true when the guest should be told.
    pub fn process_rx(&mut self) -> bool {
        let Some(active) = &self.common.active else {
            return false;
        };
        if self.backend_lost {
            return false;
        }
        let mem = active.mem.clone();
        let mut used_any = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(len) if len >= VNET_HDR_LEN => len,
                    Ok(_) => {
                        bump(&self.counters.rx_dropped, 1);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // WouldBlock: drained. A TAP that is gone is noted and read no more;
                    // other errors are tried again on the next event rather than spun on.
                    Err(e) => {
                        self.backend_failed(&e);
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            let Some(chain) = self.common.queues[RX].pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            self.rx_pending = None;
            let head = chain.head_index();
            // No offloads were negotiated, so the guest gets a plain header whatever the
            // TAP filled in; without mergeable buffers every frame takes exactly one chain.
            self.rx_frame[..NUM_BUFFERS_OFFSET].fill(0);
            self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let written = match scatter(&mem, chain, &self.rx_frame[..len]) {
                Some(written) => {
                    bump(&self.counters.rx_frames, 1);
                    bump(&self.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
                    written
                }
                None => {
                    bump(&self.counters.rx_dropped, 1);
                    bump(&self.counters.invalid_chains, 1);
                    0
                }
            };
            if self.common.queues[RX]
                .add_used(mem.as_ref(), head, written)
                .is_err()
            {
                bump(&self.counters.invalid_chains, 1);
            }
            used_any = true;
        }
        used_any
    }

    /// Sends every frame the guest queued; true when the guest should be told.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = &self.common.active else {
            return false;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        while let Some(chain) = self.common.queues[TX].pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            match gather(&mem, chain, &mut self.tx_frame) {
                Some(_) if self.backend_lost => bump(&self.counters.tx_dropped, 1),
                Some(len) if len >= VNET_HDR_LEN => {
                    match self.backend.write_frame(&self.tx_frame[..len]) {
                        Ok(_) => {
                            bump(&self.counters.tx_frames, 1);
                            bump(&self.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                        }
                        // A full, down or vanished TAP drops the frame, as a congested or
                        // cut link would.
                        Err(e) => {
                            bump(&self.counters.tx_dropped, 1);
                            self.backend_failed(&e);
                        }
                    }
                }
                _ => {
                    bump(&self.counters.tx_dropped, 1);
                    bump(&self.counters.invalid_chains, 1);
                }
            }
            if self.common.queues[TX]
                .add_used(mem.as_ref(), head, 0)
                .is_err()
            {
                bump(&self.counters.invalid_chains, 1);
            }
            used_any = true;
        }
        used_any
    }
}

/// Copies `frame` into the chain's device-writable buffers; None if the chain has a
/// read-only buffer, lies outside memory, or is too small.
fn scatter(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Option<u32> {
    let mut done = 0;
    for desc in chain {
        if done == frame.len() {
            break;
        }
        if !desc.is_write_only() {
            return None;
        }
        let n = (desc.len() as usize).min(frame.len() - done);
        mem.write_slice(&frame[done..done + n], desc.addr()).ok()?;
        done += n;
    }
    (done == frame.len()).then_some(done as u32)
}

/// Collects the chain's driver-readable buffers into `frame`; None if the chain has a
/// writable buffer, lies outside memory, exceeds `frame`, or was cut short (a loop would
/// send its buffers again and again as one frame).
fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Option<usize> {
    let mut len = 0usize;
    let mut descriptors = WholeChain::new(chain);
    for desc in &mut descriptors {
        let n = desc.len() as usize;
        if desc.is_write_only() || len + n > frame.len() {
            return None;
        }
        mem.read_slice(&mut frame[len..len + n], desc.addr()).ok()?;
        len += n;
    }
    (!descriptors.was_cut()).then_some(len)
}

impl<B: FrameBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    /// The MAC; the host chooses it (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn reset_device(&mut self) {
        self.rx_pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{Active, Interrupt};
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    // The backend is a datagram socket (devices::virtio::test_support), which keeps frame
    // boundaries like a TAP.

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM_SIZE: usize = 0x40_0000;

    struct Rig {
        mem: Arc<GuestMemoryMmap>,
        net: Net<UnixDatagram>,
        peer: UnixDatagram,
    }

    fn rig() -> Rig {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let spec = NetSpec {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some([6, 0, 0, 0, 0, 1]),
        };
        let mut net = Net::with_backend(&spec, ours).unwrap();
        let mem =
            Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        net.common.active = Some(Active {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq)),
        });
        Rig { mem, net, peer }
    }

    /// Chains of (addr, len, device-writable) descriptors, one chain per inner slice.
    fn load_queue<'a>(
        mem: &'a GuestMemoryMmap,
        chains: &[&[(u64, u32, bool)]],
    ) -> MockSplitQueue<'a, GuestMemoryMmap> {
        let vq = MockSplitQueue::new(mem, 16);
        let mut raw = Vec::new();
        for chain in chains {
            let base = raw.len() as u16;
            for (i, &(addr, len, writable)) in chain.iter().enumerate() {
                let mut flags = if writable { F_WRITE } else { 0 };
                if i + 1 < chain.len() {
                    flags |= F_NEXT;
                }
                raw.push(RawDescriptor::from(Descriptor::new(
                    addr,
                    len,
                    flags,
                    base + i as u16 + 1,
                )));
            }
        }
        vq.add_desc_chains(&raw, 0).unwrap();
        vq
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn received_frame_lands_in_guest_buffers() {
        let mut r = rig();
        let vq = load_queue(&r.mem, &[&[(0x10_0000, 8, true), (0x20_0000, 2048, true)]]);
        r.net.common.queues[RX] = vq.create_queue().unwrap();
        r.peer.send(&frame(b"hello guest")).unwrap();
        assert!(r.net.process_rx());
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, VNET_HDR_LEN + 11);
        let mut got = [0u8; VNET_HDR_LEN + 11];
        r.mem
            .read_slice(&mut got[..8], GuestAddress(0x10_0000))
            .unwrap();
        r.mem
            .read_slice(&mut got[8..], GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(
            &got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN],
            &[1, 0],
            "num_buffers"
        );
        assert_eq!(&got[VNET_HDR_LEN..], b"hello guest");
        assert_eq!(r.net.counters.rx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn frame_waits_for_buffers_instead_of_being_lost() {
        let mut r = rig();
        let empty = MockSplitQueue::new(r.mem.as_ref(), 16);
        r.net.common.queues[RX] = empty.create_queue().unwrap();
        r.peer.send(&frame(b"early")).unwrap();
        assert!(!r.net.process_rx());
        let vq = load_queue(&r.mem, &[&[(0x10_0000, 2048, true)]]);
        r.net.common.queues[RX] = vq.create_queue().unwrap();
        assert!(r.net.process_rx());
        let mut got = [0u8; 5];
        r.mem
            .read_slice(&mut got, GuestAddress(0x10_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(&got, b"early");
        assert_eq!(r.net.counters.rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bad_receive_chains_drop_the_frame_and_keep_going() {
        let mut r = rig();
        let vq = load_queue(
            &r.mem,
            &[
                &[(0x10_0000, 16, true)],
                &[(0x20_0000, 2048, false)],
                &[(MEM_SIZE as u64, 2048, true)],
                &[(0x30_0000, 2048, true)],
            ],
        );
        r.net.common.queues[RX] = vq.create_queue().unwrap();
        for payload in [
            &b"too big for 16 bytes"[..],
            b"readonly",
            b"outside",
            b"fine",
        ] {
            r.peer.send(&frame(payload)).unwrap();
        }
        assert!(r.net.process_rx());
        assert_eq!(r.net.counters.rx_dropped.load(Ordering::Relaxed), 3);
        assert_eq!(r.net.counters.rx_frames.load(Ordering::Relaxed), 1);
        let mut got = [0u8; 4];
        r.mem
            .read_slice(&mut got, GuestAddress(0x30_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(&got, b"fine");
    }

    #[test]
    fn transmitted_chain_reaches_the_backend_whole() {
        let mut r = rig();
        let f = frame(b"hello host");
        r.mem.write_slice(&f[..6], GuestAddress(0x10_0000)).unwrap();
        r.mem.write_slice(&f[6..], GuestAddress(0x20_0000)).unwrap();
        let vq = load_queue(
            &r.mem,
            &[&[
                (0x10_0000, 6, false),
                (0x20_0000, (f.len() - 6) as u32, false),
            ]],
        );
        r.net.common.queues[TX] = vq.create_queue().unwrap();
        assert!(r.net.process_tx());
        let mut got = [0u8; 64];
        let n = r.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], f.as_slice());
        assert_eq!(vq.used().idx().load(), 1);
    }

    /// A TAP deleted under us: every read and write fails with EBADFD; counts the calls.
    struct Detached {
        fd: UnixDatagram,
        calls: u32,
    }

    impl AsRawFd for Detached {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.fd.as_raw_fd()
        }
    }

    impl FrameBackend for Detached {
        fn read_frame(&mut self, _: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            Err(io::Error::from_raw_os_error(libc::EBADFD))
        }
        fn write_frame(&mut self, _: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            Err(io::Error::from_raw_os_error(libc::EBADFD))
        }
    }

    #[test]
    fn a_deleted_tap_is_given_up_and_the_guests_frames_are_dropped() {
        let mut r = rig();
        let spec = NetSpec {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
        };
        let backend = Detached {
            fd: UnixDatagram::pair().unwrap().0,
            calls: 0,
        };
        let mut net = Net::with_backend(&spec, backend).unwrap();
        net.common.active = r.net.common.active.take();
        let f = frame(b"to nowhere");
        r.mem.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
        let chain: &[(u64, u32, bool)] = &[(0x10_0000, f.len() as u32, false)];
        let vq = load_queue(&r.mem, &[chain, chain, chain]);
        net.common.queues[TX] = vq.create_queue().unwrap();
        // The backend's error wakes the device: one read finds the TAP gone.
        assert!(!net.process_rx());
        assert!(net.backend_lost());
        assert_eq!(net.backend.calls, 1);
        // The guest's frames are completed (its ring does not fill up) and counted as
        // dropped without touching the dead descriptor again.
        assert!(net.process_tx());
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(net.counters.tx_dropped.load(Ordering::Relaxed), 3);
        assert!(!net.process_rx());
        assert_eq!(net.backend.calls, 1, "no reads or writes after the loss");
    }

    #[test]
    fn bad_transmit_chains_are_dropped() {
        let mut r = rig();
        let vq = load_queue(
            &r.mem,
            &[
                &[(0x10_0000, 64, true)],
                &[(0x10_0000, 4, false)],
                &[(MEM_SIZE as u64 - 8, 64, false)],
                &[(0x10_0000, MAX_FRAME as u32 + 1, false)],
            ],
        );
        r.net.common.queues[TX] = vq.create_queue().unwrap();
        assert!(r.net.process_tx());
        assert_eq!(r.net.counters.tx_dropped.load(Ordering::Relaxed), 4);
        assert_eq!(
            vq.used().idx().load(),
            4,
            "every chain is returned to the guest"
        );
        let mut got = [0u8; 8];
        assert!(r.peer.recv(&mut got).is_err(), "nothing was sent");
    }

    #[test]
    fn mac_is_in_config_space() {
        let r = rig();
        let mut mac = [0u8; 6];
        r.net.read_config(0, &mut mac);
        assert_eq!(mac, [6, 0, 0, 0, 0, 1]);
        assert_ne!(r.net.avail_features() & VIRTIO_NET_F_MAC, 0);
    }
}
