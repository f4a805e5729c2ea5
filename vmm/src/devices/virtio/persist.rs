//! Snapshot state that every virtio device has: the features offered and accepted, each
//! queue's registers and ring positions, and whether the driver started the device.
//!
//! A device is restored by building it anew from its saved configuration (the disk, the
//! TAP, the socket path) and then applying this state with [`restore_common`], which checks
//! everything before it changes anything: the saved state is as hostile as guest memory
//! (a damaged or hand-made file), so a queue size that is not a power of two, a ring that is
//! misaligned or outside guest memory, a feature the device does not offer or a queue that
//! does not exist is a [`VirtioStateError`], never a panic or a device that trusts it.
//!
//! A device that was running when saved is started again with the restored memory and
//! interrupt (the same path as the driver's DRIVER_OK), so the guest goes on using its
//! queues without negotiating again; its event handler then registers the queue kicks and
//! serves whatever the guest queued meanwhile.

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{ActivateError, Interrupt, VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1};

/// The ring feature that makes a queue use event indices (virtio spec 6); Ember offers it
/// on no device, so no restored queue may have it on.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// One queue as saved: what the driver programmed and how far the device got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The largest size the device offers (QueueNumMax).
    pub max_size: u16,
    /// The size the driver chose (QueueNum).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest addresses of the descriptor table, the available ring and the used ring.
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available-ring entry the device takes.
    pub next_avail: u16,
    /// The next used-ring entry the device fills.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use on this queue.
    pub event_idx: bool,
}

impl From<&Queue> for QueueState {
    fn from(queue: &Queue) -> Self {
        let q = queue.state();
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

/// The state every virtio device has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The features the device offered.
    pub avail_features: u64,
    /// The features the driver accepted (FEATURES_OK).
    pub acked_features: u64,
    /// Every queue, in queue order.
    pub queues: Vec<QueueState>,
    /// The driver started the device (DRIVER_OK) and has not reset it since.
    pub activated: bool,
}

/// What a restored device needs to run: the restored guest memory and its interrupt (the
/// same one its transport reports the status of).
#[derive(Clone)]
pub struct VirtioArgs {
    pub mem: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<Interrupt>,
}

/// The rings of a split queue, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    DescriptorTable,
    AvailRing,
    UsedRing,
}

impl std::fmt::Display for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ring::DescriptorTable => "descriptor table",
            Ring::AvailRing => "available ring",
            Ring::UsedRing => "used ring",
        })
    }
}

/// Why a saved virtio state cannot be applied to a device. Every one means the state file
/// is damaged or was written by a different build, so the messages say so.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioStateError {
    #[error("the snapshot holds {saved} queues but the device has {expected}; the snapshot state is damaged")]
    QueueCount { saved: usize, expected: usize },
    #[error("queue {queue} was saved with a maximum size of {saved} but the device offers {expected}; the snapshot state is damaged")]
    QueueMaxSize {
        queue: usize,
        saved: u16,
        expected: u16,
    },
    #[error("queue {queue} has size {size}, which is not a power of two from 1 to {max}; the snapshot state is damaged")]
    QueueSize { queue: usize, size: u16, max: u16 },
    #[error("the {ring} of queue {queue} is at {addr:#x}, which is not aligned as the virtio spec requires; the snapshot state is damaged")]
    QueueAlign { queue: usize, ring: Ring, addr: u64 },
    #[error("queue {queue} is in use but not ready; the snapshot state is damaged")]
    QueueNotReady { queue: usize },
    #[error("the {ring} of queue {queue} ({len} bytes at {addr:#x}) lies outside guest memory; the snapshot state does not match the memory file")]
    QueueOutsideMemory {
        queue: usize,
        ring: Ring,
        addr: u64,
        len: u64,
    },
    #[error("queue {queue} uses event indices, which the driver did not negotiate; the snapshot state is damaged")]
    EventIdx { queue: usize },
    #[error("the snapshot's device offered features {saved:#x} but the restored device offers {offered:#x}; the snapshot was taken by a different build of Ember or its state is damaged")]
    OfferedFeatures { saved: u64, offered: u64 },
    #[error("the driver's accepted features {acked:#x} include bits {unknown:#x} the device does not offer; the snapshot state is damaged")]
    UnknownFeatures { acked: u64, unknown: u64 },
    #[error("the device was running but its driver never accepted VIRTIO_F_VERSION_1; the snapshot state is damaged")]
    NotModern,
    #[error("cannot start the restored device: {0}")]
    Activate(String),
}

impl VirtioCommon {
    /// The common state, for a device's snapshot.
    pub fn save_state(&self) -> VirtioState {
        VirtioState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queues: self.queues.iter().map(QueueState::from).collect(),
            activated: self.active.is_some(),
        }
    }
}

/// Applies `state` to `device`, which was just built from its saved configuration, and
/// starts it when it was running. Nothing changes unless every check passes.
pub fn restore_common(
    device: &mut dyn VirtioDevice,
    state: &VirtioState,
    args: VirtioArgs,
) -> Result<(), VirtioStateError> {
    let offered = device.avail_features();
    check_features(state, offered)?;
    let expected = device.queues().len();
    if state.queues.len() != expected {
        return Err(VirtioStateError::QueueCount {
            saved: state.queues.len(),
            expected,
        });
    }
    let mut queues = Vec::with_capacity(expected);
    for (index, (saved, current)) in state.queues.iter().zip(device.queues()).enumerate() {
        let queue = restore_queue(index, saved, current.max_size(), state)?;
        if state.activated {
            check_running_queue(index, saved, &args.mem)?;
        }
        queues.push(queue);
    }
    device.set_acked_features(state.acked_features);
    for (slot, queue) in device.queues_mut().iter_mut().zip(queues) {
        *slot = queue;
    }
    if state.activated {
        device
            .activate(args.mem, args.interrupt)
            .map_err(|e: ActivateError| VirtioStateError::Activate(e.to_string()))?;
    }
    Ok(())
}

fn check_features(state: &VirtioState, offered: u64) -> Result<(), VirtioStateError> {
    if state.avail_features != offered {
        return Err(VirtioStateError::OfferedFeatures {
            saved: state.avail_features,
            offered,
        });
    }
    let unknown = state.acked_features & !offered;
    if unknown != 0 {
        return Err(VirtioStateError::UnknownFeatures {
            acked: state.acked_features,
            unknown,
        });
    }
    if state.activated && state.acked_features & VIRTIO_F_VERSION_1 == 0 {
        return Err(VirtioStateError::NotModern);
    }
    Ok(())
}

/// Builds queue `index` from its saved registers, with virtio-queue's own checks (size,
/// alignment) turned into messages that name the queue.
fn restore_queue(
    index: usize,
    saved: &QueueState,
    max_size: u16,
    state: &VirtioState,
) -> Result<Queue, VirtioStateError> {
    if saved.max_size != max_size {
        return Err(VirtioStateError::QueueMaxSize {
            queue: index,
            saved: saved.max_size,
            expected: max_size,
        });
    }
    if saved.event_idx && state.acked_features & VIRTIO_RING_F_EVENT_IDX == 0 {
        return Err(VirtioStateError::EventIdx { queue: index });
    }
    let queue_state = virtio_queue::QueueState {
        max_size: saved.max_size,
        next_avail: saved.next_avail,
        next_used: saved.next_used,
        event_idx_enabled: saved.event_idx,
        size: saved.size,
        ready: saved.ready,
        desc_table: saved.desc_table,
        avail_ring: saved.avail_ring,
        used_ring: saved.used_ring,
    };
    Queue::try_from(queue_state).map_err(|e| {
        let align = |ring, addr| VirtioStateError::QueueAlign {
            queue: index,
            ring,
            addr,
        };
        match e {
            virtio_queue::Error::InvalidDescTableAlign => {
                align(Ring::DescriptorTable, saved.desc_table)
            }
            virtio_queue::Error::InvalidAvailRingAlign => align(Ring::AvailRing, saved.avail_ring),
            virtio_queue::Error::InvalidUsedRingAlign => align(Ring::UsedRing, saved.used_ring),
            // The maximum size was checked above, so the size is what is wrong.
            _ => VirtioStateError::QueueSize {
                queue: index,
                size: saved.size,
                max: max_size,
            },
        }
    })
}

/// The bytes each ring of a split queue of `size` entries takes (virtio spec 2.7): a
/// 16-byte descriptor each; flags, index, an entry each and the event word.
pub fn ring_sizes(size: u16) -> [(Ring, u64); 3] {
    let size = u64::from(size);
    [
        (Ring::DescriptorTable, 16 * size),
        (Ring::AvailRing, 6 + 2 * size),
        (Ring::UsedRing, 6 + 8 * size),
    ]
}

/// A running device's queue must be ready with every ring inside guest memory, as the
/// transport checked when the driver started it.
fn check_running_queue(
    index: usize,
    saved: &QueueState,
    mem: &GuestMemoryMmap,
) -> Result<(), VirtioStateError> {
    if !saved.ready {
        return Err(VirtioStateError::QueueNotReady { queue: index });
    }
    let addrs = [saved.desc_table, saved.avail_ring, saved.used_ring];
    for ((ring, len), addr) in ring_sizes(saved.size).into_iter().zip(addrs) {
        // At most 16 * 32768 bytes: fits any usize Ember runs on.
        let inside = usize::try_from(len)
            .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(addr), len));
        if !inside {
            return Err(VirtioStateError::QueueOutsideMemory {
                queue: index,
                ring,
                addr,
                len,
            });
        }
    }
    Ok(())
}

/// Test helpers shared by the devices' snapshot tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    /// A queue of a device offering `max_size` entries, on the mock's rings: the mock's own
    /// `create_queue` would make the mock's length the maximum, unlike a real device's queue.
    pub fn queue_on(vq: &MockSplitQueue<GuestMemoryMmap>, max_size: u16) -> Queue {
        let mut queue = Queue::new(max_size).unwrap();
        let mock: Queue = vq.create_queue().unwrap();
        queue.set_size(mock.size());
        queue.set_desc_table_address(Some(mock.desc_table() as u32), Some(0));
        queue.set_avail_ring_address(Some(mock.avail_ring() as u32), Some(0));
        queue.set_used_ring_address(Some(mock.used_ring() as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    /// Restore arguments over `mem` with a fresh eventfd interrupt, and that eventfd.
    pub fn args(mem: &Arc<GuestMemoryMmap>) -> (VirtioArgs, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let args = VirtioArgs {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        };
        (args, irq)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{args, queue_on};
    use super::*;
    use crate::snapshot::{decode, encode};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    const MEM_SIZE: usize = 0x10_0000;
    const MAX: u16 = 256;

    /// A minimal device: two queues, configuration space of four bytes.
    struct Dummy {
        common: VirtioCommon,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            0xff
        }
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
    }

    fn dummy() -> Dummy {
        Dummy {
            common: VirtioCommon::new(VIRTIO_F_VERSION_1 | 1, 2, MAX).unwrap(),
        }
    }

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
    }

    /// A running dummy whose queues sit on mock rings, with ring positions moved on.
    fn running(mem: &Arc<GuestMemoryMmap>) -> (Dummy, EventFd) {
        let mut dev = dummy();
        let vq0 = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1_0000), 16);
        let vq1 = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2_0000), 64);
        dev.common.queues[0] = queue_on(&vq0, MAX);
        dev.common.queues[1] = queue_on(&vq1, MAX);
        dev.common.queues[0].set_next_avail(7);
        dev.common.queues[0].set_next_used(5);
        dev.common.queues[1].set_next_avail(65535);
        dev.common.acked_features = VIRTIO_F_VERSION_1;
        let (args, irq) = args(mem);
        dev.activate(args.mem, args.interrupt).unwrap();
        (dev, irq)
    }

    fn round_trip(state: &VirtioState) -> VirtioState {
        let bytes = encode(state, 0).unwrap();
        decode::<VirtioState>(&bytes, std::path::Path::new("test"))
            .unwrap()
            .1
    }

    #[test]
    fn a_running_device_round_trips_and_starts_again() {
        let mem = memory();
        let (dev, _irq) = running(&mem);
        let saved = dev.common.save_state();
        assert!(saved.activated);
        assert_eq!(saved.queues[0].next_avail, 7);
        assert_eq!(saved.queues[1].size, 64);
        let decoded = round_trip(&saved);
        assert_eq!(decoded, saved);

        let mut restored = dummy();
        let (args, _irq) = args(&mem);
        restore_common(&mut restored, &decoded, args).unwrap();
        assert!(restored.is_activated());
        assert_eq!(
            restored.common.activate_event.read().unwrap(),
            1,
            "the event handler is told to register the queues"
        );
        assert_eq!(restored.common.save_state(), saved);
    }

    #[test]
    fn a_device_mid_negotiation_is_not_started() {
        let mem = memory();
        let mut dev = dummy();
        dev.common.queues[0].set_size(32);
        dev.common.queues[0].set_desc_table_address(Some(0xfff0_0000), Some(0x10));
        let saved = round_trip(&dev.common.save_state());
        let mut restored = dummy();
        let (args, _irq) = args(&mem);
        // Rings outside memory are fine while the driver has not started the device.
        restore_common(&mut restored, &saved, args).unwrap();
        assert!(!restored.is_activated());
        assert_eq!(restored.common.save_state(), saved);
    }

    /// Applies `damage` to a running device's state; the restore must fail with `expected`
    /// and leave the fresh device as it was.
    fn refused(damage: impl FnOnce(&mut VirtioState), expected: VirtioStateError) {
        let mem = memory();
        let (dev, _irq) = running(&mem);
        let mut state = dev.common.save_state();
        damage(&mut state);
        let state = round_trip(&state);
        let mut restored = dummy();
        let before = restored.common.save_state();
        let (args, _irq) = args(&mem);
        let err = restore_common(&mut restored, &state, args).unwrap_err();
        assert_eq!(err, expected, "{err}");
        assert!(err.to_string().contains("snapshot"), "{err}");
        assert_eq!(restored.common.save_state(), before, "nothing applied");
    }

    #[test]
    fn queue_sizes_must_be_powers_of_two_within_the_maximum() {
        for size in [0, 3, 100, 512, u16::MAX] {
            refused(
                |s| s.queues[1].size = size,
                VirtioStateError::QueueSize {
                    queue: 1,
                    size,
                    max: MAX,
                },
            );
        }
        refused(
            |s| s.queues[0].max_size = 1024,
            VirtioStateError::QueueMaxSize {
                queue: 0,
                saved: 1024,
                expected: MAX,
            },
        );
        refused(
            |s| s.queues[0].max_size = 3,
            VirtioStateError::QueueMaxSize {
                queue: 0,
                saved: 3,
                expected: MAX,
            },
        );
    }

    #[test]
    fn rings_must_be_aligned_and_inside_memory() {
        refused(
            |s| s.queues[0].desc_table = 0x1_0008,
            VirtioStateError::QueueAlign {
                queue: 0,
                ring: Ring::DescriptorTable,
                addr: 0x1_0008,
            },
        );
        refused(
            |s| s.queues[1].used_ring = 0x2_0002,
            VirtioStateError::QueueAlign {
                queue: 1,
                ring: Ring::UsedRing,
                addr: 0x2_0002,
            },
        );
        refused(
            |s| s.queues[1].avail_ring = MEM_SIZE as u64 - 64,
            VirtioStateError::QueueOutsideMemory {
                queue: 1,
                ring: Ring::AvailRing,
                addr: MEM_SIZE as u64 - 64,
                len: 6 + 2 * 64,
            },
        );
        refused(
            |s| s.queues[0].used_ring = u64::MAX - 3,
            VirtioStateError::QueueOutsideMemory {
                queue: 0,
                ring: Ring::UsedRing,
                addr: u64::MAX - 3,
                len: 6 + 8 * 16,
            },
        );
        refused(
            |s| s.queues[0].ready = false,
            VirtioStateError::QueueNotReady { queue: 0 },
        );
    }

    #[test]
    fn queue_counts_and_features_must_match_the_device() {
        refused(
            |s| s.queues.push(s.queues[0]),
            VirtioStateError::QueueCount {
                saved: 3,
                expected: 2,
            },
        );
        refused(
            |s| s.queues.clear(),
            VirtioStateError::QueueCount {
                saved: 0,
                expected: 2,
            },
        );
        refused(
            |s| s.acked_features |= 1 << 40 | 1 << 3,
            VirtioStateError::UnknownFeatures {
                acked: VIRTIO_F_VERSION_1 | 1 << 40 | 1 << 3,
                unknown: 1 << 40 | 1 << 3,
            },
        );
        refused(
            |s| s.avail_features |= 1 << 5,
            VirtioStateError::OfferedFeatures {
                saved: VIRTIO_F_VERSION_1 | 1 | 1 << 5,
                offered: VIRTIO_F_VERSION_1 | 1,
            },
        );
        refused(|s| s.acked_features = 1, VirtioStateError::NotModern);
        refused(
            |s| s.queues[1].event_idx = true,
            VirtioStateError::EventIdx { queue: 1 },
        );
    }
}
