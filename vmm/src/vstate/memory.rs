//! Guest memory: anonymous private mappings laid out by [`ram_ranges`], sized against what
//! the host can back, aligned to 2 MiB and offered to transparent huge pages.
//!
//! Why huge pages: a guest region whose host address is 2 MiB-aligned like its guest
//! address can be mapped by KVM with 2 MiB nested page-table entries, so the guest takes
//! fewer nested TLB misses and page faults, and the host kernel backs it with huge pages at
//! fault time instead of collapsing small pages later behind the guest's back. QEMU and Cloud
//! Hypervisor do the same by default. `MADV_HUGEPAGE` is advice: where THP is off, the
//! mapping simply stays on small pages.
//!
//! Dirty pages: with `track_dirty_pages` on, each region carries an [`AtomicBitmap`] (one
//! bit per 4 KiB page) that vm-memory sets on every write the VMM makes through it (virtio
//! devices filling buffers, used rings), since KVM's dirty log only sees the guest's own
//! writes. Without tracking the bitmap is `None` and costs nothing. See [`super::dirty`].

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// The VMM's record of the pages it wrote in one region: `Some` with dirty-page tracking.
pub type DirtyBitmap = Option<AtomicBitmap>;
/// Guest memory as Ember maps it: mmap regions, each with its [`DirtyBitmap`].
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// The page size of dirty-page tracking: KVM's dirty log has one bit per 4 KiB page.
pub const PAGE_SIZE: usize = 4096;

use crate::arch::x86_64::ram_ranges;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("machine-config.mem_size_mib: {asked} MiB is more than this host can back ({host} MiB of RAM and swap)")]
    TooLarge { asked: usize, host: u64 },
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Map(usize, io::Error),
    #[error("cannot describe guest memory to vm-memory: {0}")]
    Region(String),
    #[error("cannot map the snapshot memory file privately: {0}")]
    MapFile(String),
    #[error("cannot write guest memory to the memory file: {0}")]
    Dump(String),
}

/// A dirty bitmap for a region of `size` bytes: empty (all clean) when `track` is on.
fn new_bitmap(size: usize, track: bool) -> DirtyBitmap {
    const PAGE: NonZeroUsize = match NonZeroUsize::new(PAGE_SIZE) {
        Some(page) => page,
        None => panic!("the page size is not zero"),
    };
    track.then(|| AtomicBitmap::new(size, PAGE))
}

/// Anonymous guest memory at `ranges` (guest address, size), without dirty-page tracking;
/// for tests and tools that need memory but no VM.
pub fn anonymous(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for &(base, size) in ranges {
        let mapping = MmapRegionBuilder::new_with_bitmap(size, None)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, base)
            .ok_or_else(|| MemoryError::Region(format!("region at {base:?} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

/// Huge page size on x86_64.
const HUGE_PAGE: usize = 2 << 20;

/// RAM plus swap of this host, in MiB, from /proc/meminfo; None when it cannot be read.
pub fn host_backing_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some((field("MemTotal:")? + field("SwapTotal:").unwrap_or(0)) / 1024)
}

/// Refuses a guest larger than this host's RAM and swap: it could never be backed.
pub fn check_size(mem_size_mib: usize) -> Result<(), MemoryError> {
    match host_backing_mib() {
        Some(host) if mem_size_mib as u64 > host => Err(MemoryError::TooLarge {
            asked: mem_size_mib,
            host,
        }),
        _ => Ok(()),
    }
}

/// Maps `mem_size_mib` of guest RAM, with a dirty bitmap per region when `track_dirty`.
/// Pages are touched only when the guest uses them.
pub fn create_guest_memory(
    mem_size_mib: usize,
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    check_size(mem_size_mib)?;
    let bytes = (mem_size_mib as u64) << 20;
    let mut regions = Vec::new();
    for (base, size) in ram_ranges(bytes) {
        let size = size as usize;
        let addr = map_aligned(size).map_err(|e| MemoryError::Map(mem_size_mib, e))?;
        // SAFETY: `addr..addr + size` is a fresh private anonymous mapping owned by this
        // process for its whole life (guest memory is never unmapped before exit).
        let mapping = unsafe {
            MmapRegionBuilder::new_with_bitmap(size, new_bitmap(size, track_dirty))
                .with_raw_mmap_pointer(addr)
        }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, base)
            .ok_or_else(|| MemoryError::Region(format!("region at {base:?} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

/// The guest RAM regions of `mem`: (guest address, size in bytes), in address order.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().0, GuestMemoryRegion::len(r)))
        .collect()
}

/// Writes every region of `mem`, in address order and back to back, to `file`: the
/// snapshot memory file that [`map_file_private`] maps back.
pub fn dump(mem: &GuestMemoryMmap, file: &mut File) -> io::Result<()> {
    for region in mem.iter() {
        let len = usize::try_from(GuestMemoryRegion::len(region))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        region
            .write_all_volatile_to(MemoryRegionAddress(0), file, len)
            .map_err(|e| match e {
                vm_memory::guest_memory::Error::IOError(e) => e,
                other => io::Error::other(other.to_string()),
            })?;
    }
    Ok(())
}

/// Guest memory backed by a snapshot memory file, mapped `MAP_PRIVATE`: pages are read from
/// the file only when the guest touches them, and a guest write copies the page, so the file
/// is never changed and every VM restored from it shares its unchanged pages through the page
/// cache. `layout` is (guest address, size) per region, which lie back to back in the file;
/// the caller has checked that they cover the file exactly. With `track_dirty`, each region
/// gets a dirty bitmap, clean: the file is the base the next diff snapshot builds on.
pub fn map_file_private(
    file: File,
    layout: &[(u64, u64)],
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let file = Arc::new(file);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for &(base, size) in layout {
        let len = usize::try_from(size).map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, new_bitmap(len, track_dirty))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(base))
            .ok_or_else(|| MemoryError::Region(format!("region at {base:#x} overflows")))?;
        regions.push(region);
        offset = offset.saturating_add(size);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

/// A private anonymous mapping of `size` bytes at a 2 MiB-aligned address, advised for
/// transparent huge pages. It is never unmapped: guest memory lives as long as the process.
fn map_aligned(size: usize) -> io::Result<*mut u8> {
    let reserve = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; no existing
    // memory is affected.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (aligned - start, reserve - size - (aligned - start));
    // SAFETY: both ranges lie inside the mapping just made and outside `aligned..+size`;
    // unmapping them only trims the reservation.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on a range this function mapped; failure (THP not built in) is harmless.
    unsafe { libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
    Ok(aligned as *mut u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn absurd_sizes_are_refused_before_mapping() {
        let err = create_guest_memory(usize::MAX >> 21, false)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("machine-config.mem_size_mib:"), "{err}");
    }

    #[test]
    fn memory_has_the_asked_size() {
        let mem = create_guest_memory(64, false).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(
            mem.iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>(),
            64 << 20
        );
    }

    #[test]
    fn a_dumped_memory_maps_back_privately() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = create_guest_memory(64, false).unwrap();
        let high = GuestAddress((64 << 20) - 8);
        mem.write_obj(0xfeed_u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0xbeef_u64, high).unwrap();
        let path = std::env::temp_dir().join(format!("ember-mem-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        dump(&mem, &mut file).unwrap();
        drop(file);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);
        let restored = map_file_private(File::open(&path).unwrap(), &layout(&mem), false).unwrap();
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            0xfeed
        );
        assert_eq!(restored.read_obj::<u64>(high).unwrap(), 0xbeef);
        // Copy on write: the guest's writes never reach the file.
        restored.write_obj(1_u64, GuestAddress(0x2000)).unwrap();
        let again = map_file_private(File::open(&path).unwrap(), &layout(&mem), false).unwrap();
        assert_eq!(again.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0xfeed);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn regions_are_2mib_aligned_and_writable() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};
        let mem = create_guest_memory(4096, false).unwrap();
        assert_eq!(mem.num_regions(), 2, "RAM below and above the MMIO gap");
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(host as usize % HUGE_PAGE, 0);
        }
        let last = mem.iter().last().unwrap();
        let end = last.start_addr().0 + last.len() - 8;
        mem.write_obj(0x1234_5678_u64, GuestAddress(end)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(end)).unwrap(), 0x1234_5678);
    }
}
