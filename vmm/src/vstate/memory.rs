//! Guest memory: anonymous private mappings laid out by [`ram_ranges`], sized against what
//! the host can back, aligned to 2 MiB and offered to transparent huge pages.
//!
//! Why huge pages: a guest region whose host address is 2 MiB-aligned like its guest
//! address can be mapped by KVM with 2 MiB nested page-table entries, so the guest takes
//! fewer nested TLB misses and page faults, and the host kernel backs it with huge pages at
//! fault time instead of collapsing small pages later behind the guest's back. QEMU and Cloud
//! Hypervisor do the same by default. `MADV_HUGEPAGE` is advice: where THP is off, the
//! mapping simply stays on small pages.

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

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

/// Maps `mem_size_mib` of guest RAM. Pages are touched only when the guest uses them.
pub fn create_guest_memory(mem_size_mib: usize) -> Result<GuestMemoryMmap, MemoryError> {
    check_size(mem_size_mib)?;
    let bytes = (mem_size_mib as u64) << 20;
    let mut regions = Vec::new();
    for (base, size) in ram_ranges(bytes) {
        let size = size as usize;
        let addr = map_aligned(size).map_err(|e| MemoryError::Map(mem_size_mib, e))?;
        // SAFETY: `addr..addr + size` is a fresh private anonymous mapping owned by this
        // process for its whole life (guest memory is never unmapped before exit).
        let mapping = unsafe { MmapRegionBuilder::new(size).with_raw_mmap_pointer(addr) }
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
        let err = create_guest_memory(usize::MAX >> 21)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("machine-config.mem_size_mib:"), "{err}");
    }

    #[test]
    fn memory_has_the_asked_size() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(
            mem.iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>(),
            64 << 20
        );
    }

    #[test]
    fn regions_are_2mib_aligned_and_writable() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};
        let mem = create_guest_memory(4096).unwrap();
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
