//! Snapshot memory files on the host: merging a Diff snapshot's memory file onto the memory
//! file of the snapshot it follows (`emberctl snapshot merge`).
//!
//! A diff memory file has the full size of guest memory but holds only the pages written
//! since the previous snapshot; everywhere else it is a hole. Merging copies its data
//! regions, found with `SEEK_DATA`/`SEEK_HOLE`, onto the base file at the same offsets, in
//! place, and flushes the base to disk. The result is the full memory at the diff's
//! moment, loadable with the diff's state file. The diff must still be sparse: a copy that
//! filled its holes (`cp --sparse=never`, some transfer tools) would overwrite the base with
//! zeros. Ember itself refuses to write a diff on a file system that does not keep holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why a merge failed. The base file may be partly merged after a read, write or flush
/// error (never after a refusal): merge again once the cause is fixed, or restore the base
/// from a copy.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("cannot open base memory file {0}: {1}")]
    OpenBase(PathBuf, io::Error),
    #[error("cannot open diff memory file {0}: {1}")]
    OpenDiff(PathBuf, io::Error),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error(
        "{0} is both the base and the diff; give the base memory file and the diff memory file"
    )]
    SameFile(PathBuf),
    #[error("the diff memory file {diff} is {diff_len} bytes but the base memory file {base} is {base_len}: they are not snapshots of the same VM; nothing was changed")]
    SizeMismatch {
        base: PathBuf,
        base_len: u64,
        diff: PathBuf,
        diff_len: u64,
    },
    #[error("cannot find the data regions of diff memory file {0}: {1}")]
    Seek(PathBuf, io::Error),
    #[error("cannot read diff memory file {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("cannot write base memory file {0}: {1}; it is partly merged: merge again, or start over from a copy of the base")]
    Write(PathBuf, io::Error),
    #[error("cannot flush base memory file {0} to disk: {1}")]
    Sync(PathBuf, io::Error),
}

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeStats {
    /// Bytes copied from the diff onto the base.
    pub bytes: u64,
    /// Data regions of the diff.
    pub regions: u64,
}

/// Copies every data region of the memory file at `diff` onto the memory file at `base`, at
/// the same offsets, and flushes `base`. Both must be regular files of the same size.
pub fn merge_diff(base: &Path, diff: &Path) -> Result<MergeStats, MergeError> {
    let diff_file = File::open(diff).map_err(|e| MergeError::OpenDiff(diff.into(), e))?;
    let base_file = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(|e| MergeError::OpenBase(base.into(), e))?;
    let diff_meta = diff_file
        .metadata()
        .map_err(|e| MergeError::OpenDiff(diff.into(), e))?;
    let base_meta = base_file
        .metadata()
        .map_err(|e| MergeError::OpenBase(base.into(), e))?;
    for (meta, path) in [(&base_meta, base), (&diff_meta, diff)] {
        if !meta.is_file() {
            return Err(MergeError::NotAFile(path.into()));
        }
    }
    if (base_meta.dev(), base_meta.ino()) == (diff_meta.dev(), diff_meta.ino()) {
        return Err(MergeError::SameFile(base.into()));
    }
    if base_meta.len() != diff_meta.len() {
        return Err(MergeError::SizeMismatch {
            base: base.into(),
            base_len: base_meta.len(),
            diff: diff.into(),
            diff_len: diff_meta.len(),
        });
    }
    let mut stats = MergeStats {
        bytes: 0,
        regions: 0,
    };
    for (start, end) in
        data_regions(&diff_file, diff_meta.len()).map_err(|e| MergeError::Seek(diff.into(), e))?
    {
        copy_range(&diff_file, &base_file, start, end, diff, base)?;
        stats.bytes += end - start;
        stats.regions += 1;
    }
    base_file
        .sync_all()
        .map_err(|e| MergeError::Sync(base.into(), e))?;
    Ok(stats)
}

/// The data regions of `file` (of `len` bytes): (start, end) byte offsets, in order.
pub fn data_regions(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut regions = Vec::new();
    let mut offset = 0;
    while offset < len {
        let Some(start) = seek(file, offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        regions.push((start, end));
        offset = end;
    }
    Ok(regions)
}

/// `lseek(fd, offset, whence)`; None when no data follows `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on the descriptor `file` owns; it only moves that file's offset.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(at as u64))
}

/// Copies bytes `start..end` of `from` to the same offsets of `to`, 1 MiB at a time.
fn copy_range(
    from: &File,
    to: &File,
    start: u64,
    end: u64,
    from_path: &Path,
    to_path: &Path,
) -> Result<(), MergeError> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = usize::try_from(end - at).map_or(buffer.len(), |left| left.min(buffer.len()));
        let chunk = &mut buffer[..n];
        from.read_exact_at(chunk, at)
            .map_err(|e| MergeError::Read(from_path.into(), e))?;
        to.write_all_at(chunk, at)
            .map_err(|e| MergeError::Write(to_path.into(), e))?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    /// A sparse file of `pages` pages with page `p` filled with `byte` for each (p, byte).
    fn sparse(path: &Path, pages: u64, filled: &[(u64, u8)]) {
        let file = File::create(path).unwrap();
        file.set_len(pages * PAGE).unwrap();
        for &(page, byte) in filled {
            file.write_all_at(&[byte; PAGE as usize], page * PAGE)
                .unwrap();
        }
    }

    fn pages_of(path: &Path) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        bytes.chunks(PAGE as usize).map(|p| p[0]).collect()
    }

    #[test]
    fn the_diff_data_lands_on_the_base_and_its_holes_leave_the_base_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (base, diff) = (dir.path().join("base.mem"), dir.path().join("diff.mem"));
        std::fs::write(
            &base,
            (0..8u8)
                .flat_map(|p| [p + 1; PAGE as usize])
                .collect::<Vec<_>>(),
        )
        .unwrap();
        sparse(&diff, 8, &[(1, 0xa1), (2, 0xa2), (6, 0)]);
        let file = File::open(&diff).unwrap();
        assert_eq!(
            data_regions(&file, 8 * PAGE).unwrap(),
            [(PAGE, 3 * PAGE), (6 * PAGE, 7 * PAGE)]
        );
        let stats = merge_diff(&base, &diff).unwrap();
        assert_eq!(
            stats,
            MergeStats {
                bytes: 3 * PAGE,
                regions: 2
            }
        );
        // A page the diff wrote as zeros is data: it overwrites the base.
        assert_eq!(pages_of(&base), [1, 0xa1, 0xa2, 4, 5, 6, 0, 8]);
    }

    #[test]
    fn a_diff_of_holes_only_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (base, diff) = (dir.path().join("base.mem"), dir.path().join("diff.mem"));
        sparse(&base, 4, &[(0, 1), (3, 4)]);
        sparse(&diff, 4, &[]);
        let before = std::fs::read(&base).unwrap();
        assert_eq!(merge_diff(&base, &diff).unwrap().bytes, 0);
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }

    #[test]
    fn mismatched_or_missing_files_are_refused_and_the_base_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (base, diff) = (dir.path().join("base.mem"), dir.path().join("diff.mem"));
        sparse(&base, 4, &[(0, 1)]);
        sparse(&diff, 5, &[(0, 2)]);
        let err = merge_diff(&base, &diff).unwrap_err().to_string();
        assert!(
            err.contains("is 20480 bytes but the base") && err.contains("16384"),
            "{err}"
        );
        assert_eq!(pages_of(&base), [1, 0, 0, 0]);
        let err = merge_diff(&base, &base).unwrap_err().to_string();
        assert!(err.contains("is both the base and the diff"), "{err}");
        let missing = dir.path().join("nope.mem");
        let err = merge_diff(&base, &missing).unwrap_err().to_string();
        assert!(err.starts_with("cannot open diff memory file"), "{err}");
        let err = merge_diff(&missing, &diff).unwrap_err().to_string();
        assert!(err.starts_with("cannot open base memory file"), "{err}");
        let err = merge_diff(dir.path(), &diff).unwrap_err().to_string();
        assert!(
            err.contains("base memory file") || err.contains("not a regular file"),
            "{err}"
        );
    }
}
