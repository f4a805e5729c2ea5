//! The block device's snapshot state: what reopens the drive (id, backing file, read-only,
//! cache type), the size the guest was told (capacity) and the common virtio state.
//!
//! Nothing of a request outlives its queue pass (requests run synchronously on the VMM
//! thread), so the rings and their positions are the whole of the I/O state: a request the
//! guest queued but the device had not taken yet is taken after the restore, when the
//! restored device is started.
//!
//! The backing file is reopened at the saved path (the drive's current file, after any live
//! update) and must have the size it had when saved: the guest's file systems hold the
//! disk's contents in their caches, and Ember cannot check them, so a restore only refuses
//! what it can see (a missing file, a different size). Clones of one snapshot that share a
//! writable drive write to the same file; give each clone its own copy or a read-only drive.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::request::SECTOR_SHIFT;
use super::{Block, BlockError, DriveSpec};
use crate::devices::virtio::persist::{restore_common, VirtioArgs, VirtioState, VirtioStateError};
use crate::snapshot::Persist;

/// A drive as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive_id: String,
    /// The backing file at the time of the snapshot.
    pub path: PathBuf,
    pub read_only: bool,
    /// Guest flushes reach the disk (Firecracker's cache_type "Writeback").
    pub flush_to_disk: bool,
    /// The backing file's size in bytes.
    pub size: u64,
    /// What the configuration space told the guest: the size in 512-byte sectors.
    pub capacity: u64,
    pub virtio: VirtioState,
}

/// Why a drive cannot be restored. Each names the drive (and the file, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    #[error("drive {drive_id}: cannot reopen its disk image {path}: {source}; restore needs the image at the path it had when the snapshot was taken")]
    Reopen {
        drive_id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drive {drive_id}: its disk image {path} is not a regular file")]
    NotAFile { drive_id: String, path: PathBuf },
    #[error("drive {drive_id}: its disk image {path} is {actual} bytes but was {saved} bytes when the snapshot was taken; restore with the image the snapshot was taken with")]
    SizeChanged {
        drive_id: String,
        path: PathBuf,
        saved: u64,
        actual: u64,
    },
    #[error("drive {drive_id}: the saved capacity of {capacity} sectors does not match the saved image size of {size} bytes; the snapshot state is damaged")]
    Capacity {
        drive_id: String,
        capacity: u64,
        size: u64,
    },
    #[error("drive {drive_id}: {source}")]
    Virtio {
        drive_id: String,
        source: VirtioStateError,
    },
    #[error("drive {0}: {1}")]
    Setup(String, String),
}

impl BlockState {
    fn spec(&self) -> DriveSpec {
        DriveSpec {
            drive_id: self.drive_id.clone(),
            path: self.path.clone(),
            read_only: self.read_only,
            flush_to_disk: self.flush_to_disk,
        }
    }
}

impl BlockStateError {
    fn from_open(error: BlockError) -> Self {
        match error {
            BlockError::OpenDisk(drive_id, path, source) => Self::Reopen {
                drive_id,
                path,
                source,
            },
            BlockError::NotAFile(drive_id, path) => Self::NotAFile { drive_id, path },
            BlockError::Setup(drive_id, e) => Self::Setup(drive_id, e.to_string()),
        }
    }
}

/// A drive. `restore` reopens the saved backing file with the saved settings, checks its
/// size, and restores the queue; a drive that was running is started again.
impl Persist for Block {
    type State = BlockState;
    type Args = VirtioArgs;
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        Ok(BlockState {
            drive_id: self.drive_id.clone(),
            path: self.path.clone(),
            read_only: self.disk.read_only,
            flush_to_disk: self.disk.flush_to_disk,
            size: self.size,
            capacity: self.disk.capacity,
            virtio: self.common.save_state(),
        })
    }

    fn restore(args: VirtioArgs, state: &BlockState) -> Result<Block, BlockStateError> {
        let drive_id = || state.drive_id.clone();
        if state.capacity != state.size >> SECTOR_SHIFT {
            return Err(BlockStateError::Capacity {
                drive_id: drive_id(),
                capacity: state.capacity,
                size: state.size,
            });
        }
        let spec = state.spec();
        let (file, size) = Block::open_disk(&spec).map_err(BlockStateError::from_open)?;
        if size != state.size {
            return Err(BlockStateError::SizeChanged {
                drive_id: drive_id(),
                path: spec.path,
                saved: state.size,
                actual: size,
            });
        }
        let mut block = Block::with_file(&spec, file, size).map_err(BlockStateError::from_open)?;
        restore_common(&mut block, &state.virtio, args).map_err(|source| {
            BlockStateError::Virtio {
                drive_id: drive_id(),
                source,
            }
        })?;
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::{SECTOR_SIZE, S_OK};
    use super::*;
    use crate::devices::virtio::persist::test_util::{args, queue_on};
    use crate::devices::virtio::VirtioDevice;
    use crate::snapshot::{decode, encode};
    use crate::vstate::memory::GuestMemoryMmap;
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM_SIZE: usize = 0x40_0000;
    const RING: u64 = 0x1_0000;
    const HEADERS: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUSES: u64 = 0x30_0000;
    const SECTORS: u64 = 16;

    fn image(name: &str, bytes: usize) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("ember-blk-snap-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0x11; bytes]).unwrap();
        path
    }

    fn spec(name: &str) -> DriveSpec {
        DriveSpec {
            drive_id: format!("disk-{name}"),
            path: image(name, (SECTORS * SECTOR_SIZE) as usize),
            read_only: false,
            flush_to_disk: true,
        }
    }

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
    }

    fn round_trip(state: &BlockState) -> BlockState {
        let bytes = encode(state, 0).unwrap();
        decode(&bytes, std::path::Path::new("t")).unwrap().1
    }

    /// Queues `count` one-sector writes of `fill` bytes, to sectors `0..count`, each with its
    /// own header, data and status.
    fn queue_writes(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, fill: &[u8]) {
        let mut raw = Vec::new();
        for (i, &byte) in fill.iter().enumerate() {
            let i = i as u64;
            let (header, data, status) = (HEADERS + i * 16, DATA + i * 512, STATUSES + i);
            mem.write_obj(1u32, GuestAddress(header)).unwrap();
            mem.write_obj(i, GuestAddress(header + 8)).unwrap();
            mem.write_slice(&[byte; 512], GuestAddress(data)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let next = raw.len() as u16;
            raw.push(Descriptor::new(header, 16, F_NEXT, next + 1));
            raw.push(Descriptor::new(data, 512, F_NEXT, next + 2));
            raw.push(Descriptor::new(status, 1, F_WRITE, 0));
        }
        let raw: Vec<RawDescriptor> = raw.into_iter().map(RawDescriptor::from).collect();
        vq.add_desc_chains(&raw, 0).unwrap();
    }

    fn sector(path: &std::path::Path, n: u64) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        bytes[(n * SECTOR_SIZE) as usize..((n + 1) * SECTOR_SIZE) as usize].to_vec()
    }

    #[test]
    fn a_running_drive_with_requests_in_flight_round_trips() {
        let mem = memory();
        let spec = spec("in-flight");
        let mut block = Block::new(&spec).unwrap();
        let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(RING), 16);
        block.common.queues[0] = queue_on(&vq, super::super::device::QUEUE_SIZE);
        block.common.acked_features = block.avail_features();
        let (args0, _irq0) = args(&mem);
        block.activate(args0.mem, args0.interrupt).unwrap();
        // Three requests: the device serves the first two, then the snapshot is taken with
        // the third still in the ring.
        queue_writes(&mem, &vq, &[0xa1, 0xa2, 0xa3]);
        vq.avail().idx().store(2);
        assert!(block.process_queue());
        vq.avail().idx().store(3);
        let saved = block.save().unwrap();
        assert_eq!(
            (
                saved.virtio.queues[0].next_avail,
                saved.virtio.queues[0].next_used
            ),
            (2, 2)
        );
        assert_eq!(saved.capacity, SECTORS);
        let decoded = round_trip(&saved);
        assert_eq!(decoded, saved);
        drop(block);

        let (args1, irq1) = args(&mem);
        let mut restored = Block::restore(args1, &decoded).unwrap();
        assert_eq!(restored.save().unwrap(), saved);
        assert!(restored.is_activated());
        assert_eq!(restored.capacity(), SECTORS);
        // The restored device takes up where the saved one stopped: request three only.
        assert!(restored.process_queue());
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUSES + 2)).unwrap(),
            S_OK
        );
        assert_eq!(sector(&spec.path, 2), vec![0xa3; 512]);
        assert_eq!(sector(&spec.path, 0), vec![0xa1; 512]);
        restored.common.signal_used(&[(0, true)]);
        assert_eq!(irq1.read().unwrap(), 1, "the restored interrupt is used");
    }

    #[test]
    fn a_drive_the_guest_never_started_round_trips() {
        let mem = memory();
        let spec = DriveSpec {
            read_only: true,
            flush_to_disk: false,
            ..spec("idle")
        };
        let block = Block::new(&spec).unwrap();
        let saved = round_trip(&block.save().unwrap());
        let (args, _irq) = args(&mem);
        let restored = Block::restore(args, &saved).unwrap();
        assert!(!restored.is_activated());
        assert_eq!(restored.avail_features(), block.avail_features());
        assert_eq!(restored.save().unwrap(), saved);
    }

    #[test]
    fn a_swapped_backing_file_is_what_is_saved() {
        let spec = spec("swap-a");
        let mut block = Block::new(&spec).unwrap();
        let other = image("swap-b", 4 * SECTOR_SIZE as usize);
        block.swap_backing_file(&other).unwrap();
        let saved = block.save().unwrap();
        assert_eq!(
            (saved.path.clone(), saved.size, saved.capacity),
            (other, 2048, 4)
        );
        let (args, _irq) = args(&memory());
        assert_eq!(Block::restore(args, &saved).unwrap().capacity(), 4);
    }

    #[test]
    fn a_missing_or_resized_image_is_named() {
        let spec = spec("gone");
        let saved = Block::new(&spec).unwrap().save().unwrap();
        let (a, _irq) = args(&memory());
        std::fs::write(&spec.path, vec![0u8; 4096]).unwrap();
        let err = Block::restore(a.clone(), &saved).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "drive disk-gone: its disk image {} is 4096 bytes but was 8192 bytes",
                spec.path.display()
            )),
            "{err}"
        );
        std::fs::remove_file(&spec.path).unwrap();
        let err = Block::restore(a.clone(), &saved).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "drive disk-gone: cannot reopen its disk image {}: No such file or directory",
                spec.path.display()
            )),
            "{err}"
        );
        std::fs::create_dir(&spec.path).unwrap();
        let err = Block::restore(a, &saved).err().unwrap();
        assert!(
            matches!(
                err,
                BlockStateError::NotAFile { .. } | BlockStateError::Reopen { .. }
            ),
            "{err}"
        );
        std::fs::remove_dir(&spec.path).unwrap();
    }

    #[test]
    fn damaged_states_are_refused() {
        let mem = memory();
        let spec = spec("damaged");
        let saved = Block::new(&spec).unwrap().save().unwrap();
        let (a, _irq) = args(&mem);
        let mut bad = saved.clone();
        bad.capacity += 1;
        let err = Block::restore(a.clone(), &bad).err().unwrap();
        assert!(matches!(err, BlockStateError::Capacity { .. }), "{err}");
        let mut bad = saved.clone();
        bad.virtio.queues[0].size = 7;
        let err = Block::restore(a.clone(), &bad).err().unwrap().to_string();
        assert_eq!(
            err,
            "drive disk-damaged: queue 0 has size 7, which is not a power of two from 1 to 256; \
             the snapshot state is damaged"
        );
        // A read-only flag flipped in the file changes the offer the guest accepted.
        let mut bad = saved.clone();
        bad.read_only = true;
        let err = Block::restore(a, &bad).err().unwrap().to_string();
        assert!(err.contains("offered features"), "{err}");
    }
}
