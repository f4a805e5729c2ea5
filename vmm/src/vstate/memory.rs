//! Guest memory: anonymous private mappings laid out by [`ram_ranges`], sized against what
//! the host can back.

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::ram_ranges;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("machine-config.mem_size_mib: {asked} MiB is more than this host can back ({host} MiB of RAM and swap)")]
    TooLarge { asked: usize, host: u64 },
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Map(usize, vm_memory::mmap::FromRangesError),
}

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
    let ranges: Vec<_> = ram_ranges(bytes)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(mem_size_mib, e))
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
}
