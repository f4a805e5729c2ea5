//! The vsock device: configuration space (the guest's cid), features (VERSION_1 only: no
//! SEQPACKET), three queues (receive, transmit, event), and the queue loops. The loops are
//! free of epoll: host streams are (un)watched through the [`Watcher`] they are given, so
//! unit tests drive them with MockSplitQueue rings.
//!
//! The event queue carries one event: the transport reset a device restored from a snapshot
//! owes the guest (virtio spec 5.10.6.6). The host ends of the guest's connections did not
//! survive the restore, so the guest must drop its connected sockets; Linux does so on the
//! event, re-reads its CID from configuration space, and keeps its listening sockets. The
//! event goes into the first event buffer the guest offers (Linux keeps several posted; if
//! none is, it waits for the guest's next event-queue kick).
//!
//! Until the guest has handled the event, receive traffic waits: a host client that connects
//! right after a restore would otherwise have its REQUEST reach the guest before the event,
//! and the guest's new socket would be reset with the old ones. Linux handles events and
//! then re-posts the buffer and kicks the event queue, and that kick ends the wait. A guest
//! that never does is not waited for more than [`RESET_ACK_TIMEOUT`] after it was first seen
//! running (a kick on any queue); a restored VM that stays paused is not running, so its
//! wait does not run out meanwhile. A reset not delivered by then is still delivered when
//! the guest offers a buffer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{Muxer, Watcher};
use super::packet::{self, Segments, MAX_PAYLOAD};
use super::{bump, VsockCounters, VsockError, VsockSpec, EVQ, QUEUE_SIZE, RX, TX};
use crate::devices::virtio::{
    read_config_bytes, VirtioCommon, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of an event (`struct virtio_vsock_event`, an le32 id); Linux ignores an event
/// whose used length is anything else.
pub(super) const EVENT_LEN: u32 = 4;
/// How long receive traffic waits, once the guest runs, for it to handle a transport reset.
pub const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// A restored device's transport reset, until the guest has handled it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PendingReset {
    /// In an event buffer; until then it waits for one.
    pub(super) delivered: bool,
    /// When the guest was first seen running after the restore: the wait for its
    /// acknowledgment ends [`RESET_ACK_TIMEOUT`] later.
    pub(super) guest_seen: Option<Instant>,
    /// The wait ran out: receive traffic moves, though the reset may still be owed.
    pub(super) released: bool,
}

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
    /// Set on a restored running device until the guest has handled the reset.
    pub(super) transport_reset: Option<PendingReset>,
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
            transport_reset: None,
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
    /// should be told. Nothing moves while a transport reset waits for the guest.
    pub fn process_rx(&mut self, watcher: &mut dyn Watcher) -> bool {
        let Some(active) = &self.common.active else {
            return false;
        };
        if self.rx_held() {
            return false;
        }
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
        mem: &crate::vstate::memory::GuestMemoryMmap,
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

impl Vsock {
    /// Gives the guest the transport reset it is owed, in its next usable event buffer;
    /// true when the guest should be told. Unusable buffers (read-only, too small, outside
    /// memory) are returned empty and counted.
    pub fn process_evq(&mut self) -> bool {
        let owed = self.transport_reset.is_some_and(|r| !r.delivered);
        let Some(active) = self.common.active.as_ref().filter(|_| owed) else {
            return false;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        while let Some(chain) = self.common.queues[EVQ].pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            let written = write_event(&mem, chain, EVENT_TRANSPORT_RESET);
            let len = if written { EVENT_LEN } else { 0 };
            if self.common.queues[EVQ]
                .add_used(mem.as_ref(), head, len)
                .is_err()
            {
                bump(&self.counters.invalid_chains, 1);
            }
            used_any = true;
            if written {
                bump(&self.counters.transport_resets, 1);
                if let Some(reset) = &mut self.transport_reset {
                    reset.delivered = true;
                }
                break;
            }
            bump(&self.counters.invalid_chains, 1);
        }
        used_any
    }

    /// The guest kicked `queue` (at `now`): it runs. A kick of the event queue after the
    /// reset was delivered is Linux saying it handled the event, which ends the wait.
    pub(super) fn guest_kicked(&mut self, queue: usize, now: Instant) {
        let Some(reset) = &mut self.transport_reset else {
            return;
        };
        if queue == EVQ && reset.delivered {
            self.transport_reset = None;
        } else {
            reset.guest_seen.get_or_insert(now);
        }
    }

    /// Stops holding receive traffic for a guest that has run for [`RESET_ACK_TIMEOUT`]
    /// without handling the reset (or without offering an event buffer for it; the reset
    /// stays owed then).
    pub(super) fn expire_reset_wait(&mut self, now: Instant) {
        let Some(reset) = &mut self.transport_reset else {
            return;
        };
        let expired = reset
            .guest_seen
            .is_some_and(|seen| now >= seen + RESET_ACK_TIMEOUT);
        if !expired {
            return;
        }
        if reset.delivered {
            self.transport_reset = None;
        } else {
            reset.released = true;
        }
    }

    /// True while receive traffic waits for the guest to handle a transport reset.
    pub fn rx_held(&self) -> bool {
        self.transport_reset.is_some_and(|r| !r.released)
    }

    /// True while the wait for the guest to handle a reset needs the timer.
    pub(super) fn reset_wait_running(&self) -> bool {
        self.transport_reset
            .is_some_and(|r| r.guest_seen.is_some() && !r.released)
    }

    /// True while a transport reset is owed to the guest or not yet handled by it.
    pub fn transport_reset_pending(&self) -> bool {
        self.transport_reset.is_some()
    }
}

/// Writes an event with `id` into the chain's first buffer, which must be device-writable
/// and large enough (Linux posts one 4-byte buffer per event); false when it is not.
fn write_event(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, id: u32) -> bool {
    let mut descriptors = chain;
    let Some(desc) = descriptors.next() else {
        return false;
    };
    desc.is_write_only()
        && desc.len() >= EVENT_LEN
        && mem.write_obj(id.to_le(), desc.addr()).is_ok()
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
    /// dropped on the VMM thread's next event for the device. A transport reset still owed
    /// goes too: a driver starting afresh has no connections and reads the CID anew.
    fn reset_device(&mut self) {
        self.teardown_pending = true;
        self.transport_reset = None;
    }
}
