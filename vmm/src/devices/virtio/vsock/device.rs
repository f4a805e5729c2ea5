//! The vsock device: configuration space (the guest's cid), features (VERSION_1 only: no
//! SEQPACKET), three queues (receive, transmit, event), and the queue loops. The loops are
//! free of epoll: host streams are (un)watched through the [`Watcher`] they are given, so
//! unit tests drive them with MockSplitQueue rings.
//!
//! The event queue is set up but never used: it carries transport resets after a snapshot
//! restore, which Ember does not do yet.

use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{Muxer, Watcher};
use super::packet::{self, Segments, MAX_PAYLOAD};
use super::{bump, VsockCounters, VsockError, VsockSpec, QUEUE_SIZE, RX, TX};
use crate::devices::virtio::{
    read_config_bytes, VirtioCommon, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// A virtio-vsock device bridged to host Unix sockets.
pub struct Vsock {
    pub(super) common: VirtioCommon,
    guest_cid: u64,
    config: [u8; 8],
    pub(super) muxer: Muxer,
    segments: Segments,
    /// One packet's payload, either way.
    payload: Vec<u8>,
    /// Ticks while handshakes wait on deadlines.
    pub(super) timer: TimerFd,
    pub(super) timer_armed: bool,
    /// The driver reset the device: drop every connection on the VMM thread.
    pub(super) teardown_pending: bool,
    pub counters: Arc<VsockCounters>,
}

impl Vsock {
    /// Builds the device and starts listening at `spec.uds_path`.
    pub fn new(spec: &VsockSpec) -> Result<Self, VsockError> {
        let counters = Arc::new(VsockCounters::default());
        let muxer = Muxer::new(spec.guest_cid, &spec.uds_path, counters.clone())?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        set_nonblocking(&timer).map_err(VsockError::Timer)?;
        Ok(Self {
            common: VirtioCommon::new(VIRTIO_F_VERSION_1, 3, QUEUE_SIZE)
                .map_err(VsockError::Setup)?,
            guest_cid: spec.guest_cid,
            config: spec.guest_cid.to_le_bytes(),
            muxer,
            segments: Segments::default(),
            payload: vec![0; MAX_PAYLOAD],
            timer,
            timer_armed: false,
            teardown_pending: false,
            counters,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Takes every packet the guest queued; true when the guest should be told.
    pub fn process_tx(&mut self, watcher: &mut dyn Watcher) -> bool {
        let Some(active) = &self.common.active else {
            return false;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        while let Some(chain) = self.common.queues[TX].pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            let parsed = packet::parse_tx(
                &mut self.segments,
                &mem,
                chain,
                self.guest_cid,
                &mut self.payload,
            );
            // The device never writes into transmit buffers.
            if self.common.queues[TX]
                .add_used(mem.as_ref(), head, 0)
                .is_err()
            {
                bump(&self.counters.invalid_chains, 1);
            }
            used_any = true;
            bump(&self.counters.tx_packets, 1);
            match parsed {
                Ok(pkt) => {
                    let payload = self.payload.get(..pkt.payload_len).unwrap_or_default();
                    self.muxer.guest_packet(&pkt, payload, watcher);
                }
                Err(error) => {
                    let counter = if error.is_chain_fault() {
                        &self.counters.invalid_chains
                    } else {
                        &self.counters.invalid_packets
                    };
                    bump(counter, 1);
                    self.muxer.guest_fault(&error, watcher);
                }
            }
        }
        used_any
    }

    /// Fills receive buffers with what the host side has for the guest; true when the guest
    /// should be told.
    pub fn process_rx(&mut self, watcher: &mut dyn Watcher) -> bool {
        let Some(active) = &self.common.active else {
            return false;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        while self.muxer.has_rx_work() {
            let Some(chain) = self.common.queues[RX].pop_descriptor_chain(mem.as_ref()) else {
                // No buffers: the guest's next rx kick brings us back.
                break;
            };
            let head = chain.head_index();
            let used_len = match packet::load_rx(&mut self.segments, &mem, chain) {
                Ok(room) => match self.muxer.next_rx(room, &mut self.payload, watcher) {
                    Some(header) => self.write_rx(&mem, &header, watcher),
                    None => {
                        // Nothing for this buffer after all: leave it to the guest.
                        self.common.queues[RX].go_to_previous_position();
                        break;
                    }
                },
                Err(_) => {
                    bump(&self.counters.invalid_chains, 1);
                    0
                }
            };
            if self.common.queues[RX]
                .add_used(mem.as_ref(), head, used_len)
                .is_err()
            {
                bump(&self.counters.invalid_chains, 1);
            }
            used_any = true;
        }
        used_any
    }

    /// Writes one packet into the buffer loaded last; returns the used length.
    fn write_rx(
        &mut self,
        mem: &vm_memory::GuestMemoryMmap,
        header: &packet::Header,
        watcher: &mut dyn Watcher,
    ) -> u32 {
        let payload = self.payload.get(..header.len as usize).unwrap_or_default();
        match packet::write_rx(&self.segments, mem, header, payload) {
            Ok(len) => {
                bump(&self.counters.rx_packets, 1);
                bump(&self.counters.rx_bytes, payload.len() as u64);
                len
            }
            // The buffers were checked when loaded, so this needs a guest that changed its
            // memory meanwhile; its stream lost bytes and cannot go on.
            Err(_) => {
                bump(&self.counters.invalid_chains, 1);
                self.muxer.abort(header, watcher);
                0
            }
        }
    }
}

/// The timer is read only after epoll reported it, but a disarm in between would make a
/// blocking read wait forever.
fn set_nonblocking(timer: &TimerFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own; no pointers.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    /// `guest_cid`, a little-endian u64 (virtio spec 5.10.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// Runs on a vCPU thread, which cannot touch the event loop: the connections are
    /// dropped on the VMM thread's next event for the device.
    fn reset_device(&mut self) {
        self.teardown_pending = true;
    }
}
