//! Dirty pages for diff snapshots: which 4 KiB pages of guest memory changed since the last
//! snapshot (or since boot or restore), and writing only those into a sparse memory file.
//!
//! Two sources make up the set: KVM's dirty log of each memory slot (the guest's own
//! writes; the slots are registered with `KVM_MEM_LOG_DIRTY_PAGES`), and the VMM's bitmap in
//! each region (the devices' writes, see [`super::memory`]). Reading KVM's log clears it, so
//! a snapshot that fails after [`DirtyPages::fetch`] hands the pages back to the VMM's
//! bitmaps ([`DirtyPages::give_back`]), or the next diff would miss them; one that succeeds
//! clears them there ([`DirtyPages::forget`]). Both run on the VMM thread with the vCPUs
//! paused, so no page is dirtied in between.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::memory::{GuestMemoryMmap, GuestRegionMmap, PAGE_SIZE};

/// Why the dirty pages could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("cannot read KVM's dirty page log of memory slot {slot}: {source}")]
    GetDirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory region {0} has no dirty page bitmap: dirty page tracking is off")]
    NotTracked(usize),
}

/// The pages written since the last snapshot: per region, in address order, one bit per
/// page, 64 pages to a word (KVM's dirty log layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<Vec<u64>>,
}

/// The VMM's bitmap of a region, if it has one.
fn bitmap_of(region: &GuestRegionMmap) -> Option<&AtomicBitmap> {
    std::ops::Deref::deref(region).bitmap().as_ref()
}

fn pages_in(region: &GuestRegionMmap) -> usize {
    usize::try_from(GuestMemoryRegion::len(region))
        .unwrap_or(usize::MAX)
        .div_ceil(PAGE_SIZE)
}

impl DirtyPages {
    /// Reads (and so clears) KVM's dirty log of every memory slot, slot `n` being region `n`
    /// of `mem`, and adds the pages the VMM's bitmaps hold. On error, the logs already read
    /// are handed back to the VMM's bitmaps.
    pub fn fetch(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Self, DirtyError> {
        let mut logs = Vec::new();
        for (index, region) in mem.iter().enumerate() {
            let slot = index as u32;
            let len = usize::try_from(GuestMemoryRegion::len(region)).unwrap_or(usize::MAX);
            match vm.get_dirty_log(slot, len) {
                Ok(log) => logs.push(log),
                Err(source) => {
                    DirtyPages { regions: logs }.give_back(mem);
                    return Err(DirtyError::GetDirtyLog { slot, source });
                }
            }
        }
        Self::with_vmm_pages(logs, mem)
    }

    /// `logs` (one per region, KVM's layout) with the pages of the VMM's bitmaps added.
    pub fn with_vmm_pages(
        mut logs: Vec<Vec<u64>>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, DirtyError> {
        logs.resize(mem.num_regions(), Vec::new());
        for (index, region) in mem.iter().enumerate() {
            let Some(bitmap) = bitmap_of(region) else {
                DirtyPages { regions: logs }.give_back(mem);
                return Err(DirtyError::NotTracked(index));
            };
            let pages = pages_in(region);
            let log = &mut logs[index];
            log.resize(pages.div_ceil(64), 0);
            for page in (0..pages).filter(|&p| bitmap.is_bit_set(p)) {
                log[page / 64] |= 1 << (page % 64);
            }
        }
        Ok(DirtyPages { regions: logs })
    }

    /// Whether page `page` of region `region` is dirty.
    pub fn is_dirty(&self, region: usize, page: usize) -> bool {
        self.regions
            .get(region)
            .and_then(|words| words.get(page / 64))
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The dirty pages of region `region` as runs: (first page, number of pages).
    pub fn runs(&self, region: usize) -> Vec<(usize, usize)> {
        let pages = self.regions.get(region).map_or(0, |w| w.len() * 64);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for page in (0..pages).filter(|&p| self.is_dirty(region, p)) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }

    /// Puts these pages back into the VMM's bitmaps: a snapshot failed after KVM's log was
    /// read, and the next one must still see them.
    pub fn give_back(&self, mem: &GuestMemoryMmap) {
        self.for_each_tracked(mem, AtomicBitmap::set_bit);
    }

    /// Clears these pages from the VMM's bitmaps: they are in a snapshot now.
    pub fn forget(&self, mem: &GuestMemoryMmap) {
        self.for_each_tracked(mem, AtomicBitmap::reset_bit);
    }

    fn for_each_tracked(&self, mem: &GuestMemoryMmap, apply: fn(&AtomicBitmap, usize)) {
        for (index, region) in mem.iter().enumerate() {
            let Some(bitmap) = bitmap_of(region) else {
                continue;
            };
            for page in (0..pages_in(region)).filter(|&p| self.is_dirty(index, p)) {
                apply(bitmap, page);
            }
        }
    }
}

/// Up to `max` pages that are neither dirty nor all zero, one from each of `max` equal
/// stretches of memory where it has one: (offset in the memory file, contents). A diff's
/// holes read as zeros, so these tell its base's pages from a hole: a memory file that
/// holds them holds the base (see `persist`).
pub fn clean_samples(mem: &GuestMemoryMmap, dirty: &DirtyPages, max: usize) -> Vec<(u64, Vec<u8>)> {
    let pages: Vec<(usize, usize)> = mem
        .iter()
        .enumerate()
        .flat_map(|(index, region)| (0..pages_in(region)).map(move |page| (index, page)))
        .collect();
    let region_starts: Vec<u64> = mem
        .iter()
        .scan(0u64, |offset, r| {
            let start = *offset;
            *offset += GuestMemoryRegion::len(r);
            Some(start)
        })
        .collect();
    let stretch = pages.len().div_ceil(max.max(1)).max(1);
    let mut samples = Vec::new();
    let mut page_bytes = vec![0u8; PAGE_SIZE];
    for chunk in pages.chunks(stretch) {
        for &(index, page) in chunk.iter().filter(|(i, p)| !dirty.is_dirty(*i, *p)) {
            let Some(region) = mem.iter().nth(index) else {
                continue;
            };
            let at = MemoryRegionAddress((page * PAGE_SIZE) as u64);
            if region.read_slice(&mut page_bytes, at).is_err() || page_bytes.iter().all(|&b| b == 0)
            {
                continue;
            }
            samples.push((region_starts[index] + at.0, page_bytes.clone()));
            break;
        }
    }
    samples
}

/// Writes the `dirty` pages of `mem` into `file` at the offsets a full memory file has them
/// (regions back to back), and nothing else: the file gets the full size and is sparse
/// elsewhere. Then checks that the file system kept those holes at page granularity, since
/// merging the diff onto its base copies exactly the file's data regions.
pub fn write_diff(mem: &GuestMemoryMmap, dirty: &DirtyPages, file: &mut File) -> io::Result<()> {
    let total: u64 = mem.iter().map(GuestMemoryRegion::len).sum();
    file.set_len(total)?;
    let mut written = Vec::new();
    let mut region_start = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let region_len = GuestMemoryRegion::len(region);
        for (first, count) in dirty.runs(index) {
            let start = (first * PAGE_SIZE) as u64;
            let len = ((count * PAGE_SIZE) as u64).min(region_len.saturating_sub(start));
            if len == 0 {
                continue;
            }
            file.seek(SeekFrom::Start(region_start + start))?;
            region
                .write_all_volatile_to(MemoryRegionAddress(start), file, len as usize)
                .map_err(|e| match e {
                    vm_memory::guest_memory::Error::IOError(e) => e,
                    other => io::Error::other(other.to_string()),
                })?;
            written.push((region_start + start, region_start + start + len));
        }
        region_start += region_len;
    }
    check_holes(file, &coalesce(written), total)
}

/// Adjacent ranges joined: runs of two regions that meet in the file are one data range.
fn coalesce(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some((_, last_end)) if *last_end == start => *last_end = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// Fails unless every data range the file system reports for `file` lies within one of
/// `written`: a file system that fills holes, or keeps them in blocks larger than a page,
/// would make the merge copy zeros over pages of the base.
fn check_holes(file: &File, written: &[(u64, u64)], total: u64) -> io::Result<()> {
    for (data, hole) in api::memfile::data_regions(file, total)? {
        if !written.iter().any(|&(s, e)| s <= data && hole <= e) {
            return Err(io::Error::other(format!(
                "the file system keeps data at bytes {data}..{hole} that were not written \
                 (it does not keep holes at {PAGE_SIZE}-byte granularity), so this diff could \
                 not be merged; write diff snapshots to a file system with sparse files, such \
                 as ext4, xfs or tmpfs"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Read;
    use vm_memory::GuestAddress;

    fn no_kvm_log(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
        mem.iter()
            .map(|r| vec![0; pages_in(r).div_ceil(64)])
            .collect()
    }

    #[test]
    fn vmm_writes_are_dirty_pages_until_forgotten() {
        let mem = create_guest_memory(8, true).unwrap();
        mem.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[1; 5000], GuestAddress(0x10_0ff0))
            .unwrap();
        let dirty = DirtyPages::with_vmm_pages(no_kvm_log(&mem), &mem).unwrap();
        assert_eq!(dirty.runs(0), [(3, 1), (0x100, 3)]);
        assert_eq!(dirty.count(), 4);
        dirty.forget(&mem);
        let after = DirtyPages::with_vmm_pages(no_kvm_log(&mem), &mem).unwrap();
        assert_eq!(after.count(), 0);
        // A failed snapshot hands KVM's pages (here page 9) back to the VMM's bitmap.
        let mut logs = no_kvm_log(&mem);
        logs[0][0] = 1 << 9;
        DirtyPages::with_vmm_pages(logs, &mem)
            .unwrap()
            .give_back(&mem);
        let kept = DirtyPages::with_vmm_pages(no_kvm_log(&mem), &mem).unwrap();
        assert_eq!(kept.runs(0), [(9, 1)]);
    }

    #[test]
    fn without_tracking_there_are_no_dirty_pages_to_read() {
        let mem = create_guest_memory(8, false).unwrap();
        let err = DirtyPages::with_vmm_pages(no_kvm_log(&mem), &mem).unwrap_err();
        assert!(err.to_string().contains("tracking is off"), "{err}");
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_at_their_offsets_and_holes_elsewhere() {
        let mem = create_guest_memory(8, true).unwrap();
        mem.write_slice(&[0xaa; 4096], GuestAddress(0x5000))
            .unwrap();
        mem.write_obj(0xbbu8, GuestAddress((8 << 20) - 1)).unwrap();
        let mut logs = no_kvm_log(&mem);
        logs[0][0] |= 1 << 7; // a page "the guest" wrote: zero here, still written
        let dirty = DirtyPages::with_vmm_pages(logs, &mem).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diff.mem");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        write_diff(&mem, &dirty, &mut file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        let mut bytes = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
        assert!(bytes[0x5000..0x6000].iter().all(|&b| b == 0xaa));
        assert_eq!(bytes[(8 << 20) - 1], 0xbb);
        let regions = api::memfile::data_regions(&file, 8 << 20).unwrap();
        assert_eq!(regions[..2], [(0x5000, 0x6000), (0x7000, 0x8000)]);
    }

    #[test]
    fn samples_are_clean_pages_with_data() {
        let mem = create_guest_memory(8, true).unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(2u8, GuestAddress(0x2000)).unwrap();
        mem.write_obj(3u8, GuestAddress(0x60_0000)).unwrap();
        let mut logs = no_kvm_log(&mem);
        logs[0][0] = 1 << 1; // page 1 is dirty: its contents are in the diff
        let dirty = DirtyPages::with_vmm_pages(logs, &mem).unwrap();
        dirty.forget(&mem);
        let dirty = DirtyPages::with_vmm_pages(vec![vec![1 << 1]], &mem).unwrap();
        let samples = clean_samples(&mem, &dirty, 4);
        let offsets: Vec<u64> = samples.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, [0x2000, 0x60_0000]);
        assert_eq!(samples[0].1[0], 2);
    }

    #[test]
    fn runs_of_two_regions_meeting_in_the_file_are_one_range() {
        assert_eq!(
            coalesce(vec![(0, 4096), (4096, 8192), (12288, 16384)]),
            [(0, 8192), (12288, 16384)]
        );
    }
}
