//! The block device: configuration space (capacity), features, activation and the queue
//! loop, which is free of epoll so that unit tests drive it directly.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::QueueT;

use super::request::{Disk, Request, RequestError, ID_BYTES, SECTOR_SHIFT, S_IOERR, S_UNSUPP};
use crate::devices::virtio::{
    read_config_bytes, SetupError, VirtioCommon, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

/// Ring size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Errors while opening a drive.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("drives[{0}].path_on_host: cannot open {1}: {2}")]
    OpenDisk(String, PathBuf, std::io::Error),
    #[error("drives[{0}].path_on_host: {1} is not a regular file")]
    NotAFile(String, PathBuf),
    #[error("drives[{0}]: {1}")]
    Setup(String, SetupError),
}

/// What a drive is made of, from the configuration.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    pub drive_id: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Honour guest flushes with fdatasync (Firecracker's cache_type "Writeback").
    pub flush_to_disk: bool,
}

/// Per-device counters, for metrics and tests.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub invalid_requests: AtomicU64,
    pub io_errors: AtomicU64,
}

/// A virtio-blk device.
pub struct Block {
    pub drive_id: String,
    /// The backing file now (a live drive update changes it) and its size in bytes when
    /// opened, for snapshots.
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) disk: Disk,
    config: [u8; 8],
    pub(super) common: VirtioCommon,
    pub counters: Arc<BlockCounters>,
}

impl Block {
    /// Opens the drive's file (read-only drives without write access) and returns it with
    /// its size in bytes; a missing, unreadable or non-regular file is an error.
    pub fn open_disk(spec: &DriveSpec) -> Result<(File, u64), BlockError> {
        let id = &spec.drive_id;
        let open_err = |e| BlockError::OpenDisk(id.clone(), spec.path.clone(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .open(&spec.path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(BlockError::NotAFile(id.clone(), spec.path.clone()));
        }
        Ok((file, meta.len()))
    }

    /// Opens the drive and builds the device.
    pub fn new(spec: &DriveSpec) -> Result<Self, BlockError> {
        let (file, size) = Self::open_disk(spec)?;
        Self::with_file(spec, file, size)
    }

    /// Builds the device on the drive's opened file of `size` bytes.
    pub(super) fn with_file(spec: &DriveSpec, file: File, size: u64) -> Result<Self, BlockError> {
        let id = &spec.drive_id;
        let capacity = size >> SECTOR_SHIFT;
        let mut avail_features = VIRTIO_F_VERSION_1;
        if spec.read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        }
        if spec.flush_to_disk {
            avail_features |= VIRTIO_BLK_F_FLUSH;
        }
        Ok(Self {
            drive_id: id.clone(),
            path: spec.path.clone(),
            size,
            disk: Disk {
                file,
                capacity,
                read_only: spec.read_only,
                flush_to_disk: spec.flush_to_disk,
                id: device_id(id),
            },
            config: capacity.to_le_bytes(),
            common: VirtioCommon::new(avail_features, 1, QUEUE_SIZE)
                .map_err(|e| BlockError::Setup(id.clone(), e))?,
            counters: Arc::new(BlockCounters::default()),
        })
    }

    /// Reopens the drive on `path` (same read-only and cache settings) and, if the guest
    /// drives the device, raises a configuration-change interrupt so it rereads the size.
    pub fn swap_backing_file(&mut self, path: &std::path::Path) -> Result<(), BlockError> {
        let spec = DriveSpec {
            drive_id: self.drive_id.clone(),
            path: path.to_path_buf(),
            read_only: self.disk.read_only,
            flush_to_disk: self.disk.flush_to_disk,
        };
        let (file, size) = Self::open_disk(&spec)?;
        self.path = spec.path;
        self.size = size;
        self.disk.file = file;
        self.disk.capacity = size >> SECTOR_SHIFT;
        self.config = self.disk.capacity.to_le_bytes();
        if let Some(active) = &self.common.active {
            // A lost interrupt only delays the guest noticing the new size.
            let _ = active.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Serves every available request; returns true when the guest should be notified.
    pub fn process_queue(&mut self) -> bool {
        let Some(active) = &self.common.active else {
            return false;
        };
        let mem = active.mem.clone();
        let queue = &mut self.common.queues[0];
        let mut used_any = false;
        loop {
            // A ring the guest broke (index out of range) ends this pass; the driver is
            // told through the used entries made so far.
            if queue.disable_notification(mem.as_ref()).is_err() {
                break;
            }
            let mut served = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) {
                let head = chain.head_index();
                let used_len = serve(&mut self.disk, &mem, chain, &self.counters);
                if queue.add_used(mem.as_ref(), head, used_len).is_err() {
                    self.counters
                        .invalid_requests
                        .fetch_add(1, Ordering::Relaxed);
                }
                served = true;
            }
            used_any |= served;
            // More requests arrived while notifications were off: serve them too. A ring
            // that claims more but yields none (an avail index past the queue size) would
            // spin this loop forever, so it waits for the guest's next kick instead.
            match queue.enable_notification(mem.as_ref()) {
                Ok(true) if served => continue,
                Ok(true) => {
                    self.counters
                        .invalid_requests
                        .fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ => break,
            }
        }
        used_any && queue.needs_notification(mem.as_ref()).unwrap_or(true)
    }
}

/// Parses and executes one chain; returns the used length.
fn serve(
    disk: &mut Disk,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    counters: &BlockCounters,
) -> u32 {
    match Request::parse(chain, disk.capacity) {
        Ok(request) => {
            let outcome = disk.execute(mem, &request);
            count(counters, &request, outcome.status);
            outcome.used_len
        }
        Err((error, status_addr)) => {
            counters.invalid_requests.fetch_add(1, Ordering::Relaxed);
            let status = match error {
                RequestError::UnsupportedType(_) => S_UNSUPP,
                _ => S_IOERR,
            };
            match status_addr {
                Some(addr) if vm_memory::Bytes::write_obj(mem, status, addr).is_ok() => 1,
                _ => 0,
            }
        }
    }
}

fn count(counters: &BlockCounters, request: &Request, status: u8) {
    use super::request::RequestKind;
    if status != 0 {
        counters.io_errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let counter = match request.kind {
        RequestKind::Read => &counters.read_bytes,
        RequestKind::Write => &counters.write_bytes,
        RequestKind::Flush => {
            counters.flushes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        RequestKind::GetId => return,
    };
    counter.fetch_add(request.data_len(), Ordering::Relaxed);
}

/// The 20-byte id GET_ID returns: the drive id, truncated or NUL-padded.
fn device_id(drive_id: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = drive_id.len().min(ID_BYTES);
    id[..n].copy_from_slice(&drive_id.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::S_OK;
    use super::*;
    use crate::devices::virtio::{Active, Interrupt};
    use std::io::{Read, Seek, SeekFrom, Write};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM_SIZE: usize = 0x40_0000;
    const DISK_SECTORS: u64 = 64;

    struct Rig {
        mem: Arc<GuestMemoryMmap>,
        block: Block,
        path: PathBuf,
    }

    fn rig(name: &str, read_only: bool) -> Rig {
        let path = std::env::temp_dir().join(format!("ember-blk-{}-{name}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![0xee; (DISK_SECTORS * 512) as usize])
            .unwrap();
        let spec = DriveSpec {
            drive_id: "data0".into(),
            path: path.clone(),
            read_only,
            flush_to_disk: true,
        };
        let mem =
            Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let mut block = Block::new(&spec).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        block.common.active = Some(Active {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq)),
        });
        Rig { mem, block, path }
    }

    impl Rig {
        /// Queues one chain of (addr, len, device-writable) descriptors, runs the queue and
        /// returns (status byte, used length).
        fn run(&mut self, descs: &[(u64, u32, bool)]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, writable))| {
                    let mut flags = if writable { F_WRITE } else { 0 };
                    if i + 1 < descs.len() {
                        flags |= F_NEXT;
                    }
                    RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
                })
                .collect();
            self.run_raw(&raw)
        }

        fn run_raw(&mut self, raw: &[RawDescriptor]) -> (u8, u32) {
            let vq = MockSplitQueue::new(self.mem.as_ref(), 16);
            vq.add_desc_chains(raw, 0).unwrap();
            self.block.common.queues[0] = vq.create_queue().unwrap();
            assert!(self.block.process_queue(), "a used entry must be added");
            let used_len = vq.used().ring().ref_at(0).unwrap().load().len();
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
        }

        fn header(&self, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
            self.mem
                .write_obj(sector, GuestAddress(HEADER + 8))
                .unwrap();
        }

        fn disk_bytes(&self, sector: u64, len: usize) -> Vec<u8> {
            let mut f = File::open(&self.path).unwrap();
            f.seek(SeekFrom::Start(sector * 512)).unwrap();
            let mut buf = vec![0; len];
            f.read_exact(&mut buf).unwrap();
            buf
        }
    }

    /// Descriptors as (guest address, length, device-writable).
    type Chain = Vec<(u64, u32, bool)>;

    /// Header, one data buffer, status byte.
    fn standard(len: u32, writable: bool) -> Chain {
        vec![
            (HEADER, 16, false),
            (DATA, len, writable),
            (STATUS, 1, true),
        ]
    }

    #[test]
    fn write_then_read_round_trips_through_the_file() {
        let mut r = rig("roundtrip", false);
        r.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .unwrap();
        r.header(1, 3);
        assert_eq!(r.run(&standard(1024, false)), (S_OK, 1));
        assert_eq!(r.disk_bytes(3, 1024), vec![0x5a; 1024]);
        assert_eq!(
            r.disk_bytes(2, 512),
            vec![0xee; 512],
            "neighbours untouched"
        );
        r.mem.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        r.header(0, 3);
        assert_eq!(r.run(&standard(1024, true)), (S_OK, 1025));
        let mut back = [0u8; 1024];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0x5a; 1024]);
        assert_eq!(r.block.counters.write_bytes.load(Ordering::Relaxed), 1024);
        assert_eq!(r.block.counters.read_bytes.load(Ordering::Relaxed), 1024);
    }

    #[test]
    fn flush_and_get_id_succeed() {
        let mut r = rig("flush-id", false);
        r.header(4, 0);
        assert_eq!(r.run(&[(HEADER, 16, false), (STATUS, 1, true)]), (S_OK, 1));
        assert_eq!(r.block.counters.flushes.load(Ordering::Relaxed), 1);
        r.header(8, 0);
        assert_eq!(r.run(&standard(20, true)), (S_OK, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..5], b"data0");
    }

    #[test]
    fn read_only_drive_refuses_writes_and_keeps_the_image() {
        let mut r = rig("ro", true);
        assert_ne!(r.block.avail_features() & VIRTIO_BLK_F_RO, 0);
        r.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
        r.header(1, 0);
        assert_eq!(r.run(&standard(512, false)).0, S_IOERR);
        assert_eq!(r.disk_bytes(0, 512), vec![0xee; 512]);
        assert_eq!(r.block.counters.io_errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn hostile_chains_fail_cleanly() {
        let beyond = MEM_SIZE as u64 + 0x1000;
        let cases: Vec<(&str, u32, u64, Chain, u8)> = vec![
            (
                "data outside memory",
                0,
                0,
                vec![(HEADER, 16, false), (beyond, 512, true), (STATUS, 1, true)],
                S_IOERR,
            ),
            (
                "data straddling the end",
                0,
                0,
                vec![
                    (HEADER, 16, false),
                    (MEM_SIZE as u64 - 256, 512, true),
                    (STATUS, 1, true),
                ],
                S_IOERR,
            ),
            (
                "read into a read-only buffer",
                0,
                0,
                standard(512, false),
                S_IOERR,
            ),
            (
                "write from a writable buffer",
                1,
                0,
                standard(512, true),
                S_IOERR,
            ),
            ("zero-length data", 0, 0, standard(0, true), S_IOERR),
            ("partial sector", 0, 0, standard(100, true), S_IOERR),
            (
                "sector past the end",
                0,
                DISK_SECTORS,
                standard(512, true),
                S_IOERR,
            ),
            (
                "last sector plus one",
                0,
                DISK_SECTORS - 1,
                standard(1024, true),
                S_IOERR,
            ),
            (
                "overflowing sector",
                1,
                u64::MAX,
                standard(512, false),
                S_IOERR,
            ),
            (
                "header in a writable descriptor",
                0,
                0,
                vec![(HEADER, 16, true), (DATA, 512, true), (STATUS, 1, true)],
                S_IOERR,
            ),
            (
                "short header",
                0,
                0,
                vec![(HEADER, 8, false), (DATA, 512, true), (STATUS, 1, true)],
                S_IOERR,
            ),
            ("unknown request type", 77, 0, standard(512, true), S_UNSUPP),
        ];
        for (name, kind, sector, chain, expected) in cases {
            let mut r = rig("hostile", false);
            r.header(kind, sector);
            let (status, used) = r.run(&chain);
            assert_eq!((status, used), (expected, 1), "{name}");
            assert_eq!(
                r.disk_bytes(0, 512),
                vec![0xee; 512],
                "{name}: disk untouched"
            );
            assert_eq!(
                r.block.counters.invalid_requests.load(Ordering::Relaxed),
                1,
                "{name}"
            );
        }
    }

    #[test]
    fn chain_without_a_writable_status_gets_no_status() {
        let mut r = rig("no-status", false);
        r.header(0, 0);
        assert_eq!(r.run(&[(HEADER, 16, false), (DATA, 512, false)]), (0xff, 0));
    }

    #[test]
    fn descriptor_loop_ends() {
        let mut r = rig("loop", false);
        r.header(0, 0);
        let raw = [
            RawDescriptor::from(Descriptor::new(HEADER, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, F_NEXT | F_WRITE, 0)),
        ];
        // The chain repeats until the queue size bounds it; it ends on a data descriptor
        // and so is refused, with IOERR written where its "status" would be.
        let (_, used) = r.run_raw(&raw);
        assert!(used <= 1);
        assert_eq!(r.block.counters.invalid_requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn avail_index_past_the_queue_size_does_not_spin() {
        let mut r = rig("avail-jump", false);
        let vq = MockSplitQueue::new(r.mem.as_ref(), 16);
        r.block.common.queues[0] = vq.create_queue().unwrap();
        // The guest claims 1000 new requests in a 16-entry ring.
        vq.avail().idx().store(1000);
        assert!(
            !r.block.process_queue(),
            "nothing served, and the call returns"
        );
        assert_eq!(r.block.counters.invalid_requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn capacity_is_in_config_space() {
        let r = rig("config", false);
        let mut bytes = [0u8; 8];
        r.block.read_config(0, &mut bytes);
        assert_eq!(u64::from_le_bytes(bytes), DISK_SECTORS);
    }

    #[test]
    fn missing_disk_is_named() {
        let spec = DriveSpec {
            drive_id: "rootfs".into(),
            path: "/nonexistent/disk.img".into(),
            read_only: false,
            flush_to_disk: false,
        };
        let err = Block::new(&spec).err().unwrap().to_string();
        assert!(
            err.starts_with("drives[rootfs].path_on_host: cannot open /nonexistent/disk.img"),
            "{err}"
        );
    }
}
