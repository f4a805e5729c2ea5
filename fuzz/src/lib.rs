//! Shared pieces of the fuzz targets: a small guest memory with a hole, split queues laid
//! out where the input says, and the plumbing a device needs to run (an interrupt, a disk
//! file, a frame backend). Everything the guest controls comes from the fuzzer's bytes;
//! everything the host controls is fixed, so a crash reproduces from its input alone.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::net::device::FrameBackend;
use vmm::devices::virtio::{Interrupt, VirtioDevice};
use vmm::vstate::memory::{self, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory: `[0, LOW_END)`, a hole, then `[HIGH_START, HIGH_END)`. The hole makes
/// "inside the address range but not in memory" reachable with 16-bit addresses.
pub const LOW_END: u64 = 0x8000;
pub const HIGH_START: u64 = 0x9000;
pub const HIGH_END: u64 = 0x1_0000;
/// Bytes of guest memory the input can fill.
pub const MEMORY_BYTES: usize = (LOW_END + (HIGH_END - HIGH_START)) as usize;

/// Builds the guest memory and fills it from `image` (low region first, then high).
pub fn guest_memory(image: &[u8]) -> Arc<GuestMemoryMmap> {
    let ranges = [
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH_START), (HIGH_END - HIGH_START) as usize),
    ];
    let mem = memory::anonymous(&ranges).expect("anonymous guest memory");
    let image = &image[..image.len().min(MEMORY_BYTES)];
    let (low, high) = image.split_at(image.len().min(LOW_END as usize));
    mem.write_slice(low, GuestAddress(0)).expect("low region");
    mem.write_slice(high, GuestAddress(HIGH_START))
        .expect("high region");
    Arc::new(mem)
}

/// Where one queue's rings sit, as the driver would program them.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Bytes one [`QueueLayout`] takes from the input.
pub const LAYOUT_BYTES: usize = 7;

impl QueueLayout {
    /// Decodes 7 bytes: a size exponent and three 16-bit ring addresses, aligned as the
    /// spec requires so most inputs reach the device rather than the transport's checks.
    pub fn from_bytes(b: &[u8; LAYOUT_BYTES]) -> Self {
        let word = |i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
        Self {
            size: 1 << (b[0] % 9),
            desc: word(1) & !0xf,
            avail: word(3) & !0x1,
            used: word(5) & !0x3,
        }
    }

    /// Programs `queue` as a driver would and marks it ready.
    pub fn apply(&self, queue: &mut Queue) {
        queue.set_size(self.size.min(queue.max_size()));
        queue.set_desc_table_address(Some(self.desc as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail as u32), Some(0));
        queue.set_used_ring_address(Some(self.used as u32), Some(0));
        queue.set_ready(true);
    }
}

/// Splits `n` queue layouts off the front of `data`.
pub fn take_layouts(data: &[u8], n: usize) -> Option<(Vec<QueueLayout>, &[u8])> {
    if data.len() < n * LAYOUT_BYTES {
        return None;
    }
    let (head, rest) = data.split_at(n * LAYOUT_BYTES);
    let layouts = head
        .chunks_exact(LAYOUT_BYTES)
        .map(|c| QueueLayout::from_bytes(c.try_into().expect("chunk of LAYOUT_BYTES")))
        .collect();
    Some((layouts, rest))
}

/// An interrupt on a plain eventfd.
pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ))
}

/// Programs the device's queues from `layouts` and activates it the way the MMIO transport
/// does: only when every ready queue is valid for `mem`. False when the transport would
/// have refused to start the device.
pub fn activate(
    device: &mut dyn VirtioDevice,
    layouts: &[QueueLayout],
    mem: &Arc<GuestMemoryMmap>,
) -> bool {
    for (queue, layout) in device.queues_mut().iter_mut().zip(layouts) {
        layout.apply(queue);
        if !queue.is_valid(mem.as_ref()) {
            return false;
        }
    }
    device.activate(mem.clone(), interrupt()).is_ok()
}

/// A scratch directory for this process's files: under `$EMBER_FUZZ_SCRATCH` (smoke.sh
/// sets it and removes it afterwards), else tmpfs when the host has one, so the block
/// target's flushes cost nothing.
pub fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("EMBER_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .or_else(|| {
                ["/dev/shm", "/tmp"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_dir())
            })
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("ember-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// A frame backend that hands out the frames it was given, then reports WouldBlock, and
/// swallows what the device sends.
pub struct FakeTap {
    rx: VecDeque<Vec<u8>>,
    fd: EventFd,
    pub sent: usize,
}

impl FakeTap {
    pub fn new(frames: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self {
            rx: frames.into_iter().collect(),
            fd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            sent: 0,
        }
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl FrameBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .rx
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        // A TAP truncates a frame longer than the buffer; so does this.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sent += 1;
        Ok(frame.len())
    }
}

/// Splits up to `max` length-prefixed (u16 little-endian) frames off the front of `data`.
pub fn take_frames(data: &[u8], max: usize) -> (Vec<Vec<u8>>, &[u8]) {
    let Some((&count, mut rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let mut frames = Vec::new();
    for _ in 0..usize::from(count).min(max) {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        frames.push(frame.to_vec());
        rest = tail;
    }
    (frames, rest)
}
