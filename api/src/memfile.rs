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
//!
//! # Which state file a memory file belongs to
//!
//! Ember tags each memory file it writes with the checksum of the state file written with
//! it, in the extended attribute [`PAIR_TAG_XATTR`], and refuses to load a state file with a
//! memory file tagged for another. That catches a pair broken by a crash between the two
//! renames of a save, files from two snapshots mixed up, and a base loaded with its own
//! state after a diff was merged into it. A merge moves the diff's tag onto the base (the
//! merged file is the diff's memory now). A file system without extended attributes, or a
//! copy that drops them, leaves the file untagged, and an untagged file is not checked.

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
    #[error("base memory file {0} is in use by a VM loaded from it (a running ember maps it): merging in place would change that VM's memory under it; merge onto a copy (cp BASE COPY && emberctl snapshot merge --base COPY --diff DIFF), or stop that VM first; nothing was changed")]
    InUse(PathBuf),
    #[error("cannot lock base memory file {0} for the merge: {1}")]
    Lock(PathBuf, io::Error),
    #[error("cannot find the data regions of diff memory file {0}: {1}")]
    Seek(PathBuf, io::Error),
    #[error("cannot read diff memory file {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("cannot write base memory file {0}: {1}; it is partly merged: merge again, or start over from a copy of the base")]
    Write(PathBuf, io::Error),
    #[error("cannot flush base memory file {0} to disk: {1}")]
    Sync(PathBuf, io::Error),
    #[error("cannot move the state file tag of diff memory file {diff} onto base memory file {base}: {source}; the base is merged but would be refused with the diff's state file: merge again")]
    Tag {
        base: PathBuf,
        diff: PathBuf,
        source: io::Error,
    },
}

/// The extended attribute that names the state file a memory file was written with: the
/// state file's checksum, as 16 hexadecimal digits.
pub const PAIR_TAG_XATTR: &str = "user.ember.state-checksum";

/// Tags `file` with `checksum` (see the module docs). Returns false, having done nothing,
/// where the file system keeps no extended attributes.
pub fn set_pair_tag(file: &File, checksum: u64) -> io::Result<bool> {
    let value = format!("{checksum:016x}");
    let name = xattr_name();
    // SAFETY: fsetxattr reads the NUL-terminated name and `value.len()` bytes of `value`,
    // both alive for the call, on a descriptor `file` owns.
    let r = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if unsupported(&e) => Ok(false),
        e => Err(e),
    }
}

/// The checksum `file` is tagged with; None for an untagged file (or one on a file system
/// without extended attributes). A tag that does not parse reads as untagged.
pub fn pair_tag(file: &File) -> io::Result<Option<u64>> {
    let mut value = [0u8; 32];
    let name = xattr_name();
    // SAFETY: fgetxattr writes at most `value.len()` bytes into `value`, which outlives the
    // call, and reads the NUL-terminated name.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    let Ok(n) = usize::try_from(n) else {
        return match io::Error::last_os_error() {
            e if unsupported(&e) || e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
            // Longer than any tag Ember writes: not one of them.
            e if e.raw_os_error() == Some(libc::ERANGE) => Ok(None),
            e => Err(e),
        };
    };
    Ok(std::str::from_utf8(&value[..n])
        .ok()
        .and_then(|text| u64::from_str_radix(text, 16).ok()))
}

/// Removes `file`'s tag, if it has one.
fn remove_pair_tag(file: &File) -> io::Result<()> {
    let name = xattr_name();
    // SAFETY: fremovexattr reads the NUL-terminated name on a descriptor `file` owns.
    if unsafe { libc::fremovexattr(file.as_raw_fd(), name.as_ptr()) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if unsupported(&e) || e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        e => Err(e),
    }
}

fn xattr_name() -> std::ffi::CString {
    // The constant holds no NUL byte.
    std::ffi::CString::new(PAIR_TAG_XATTR).unwrap_or_default()
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
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
    match lock(&base_file, libc::LOCK_EX) {
        Ok(true) => {}
        Ok(false) => return Err(MergeError::InUse(base.into())),
        Err(e) => return Err(MergeError::Lock(base.into(), e)),
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
    // The base now holds the diff's memory: it belongs to the diff's state file.
    let tagged = match pair_tag(&diff_file) {
        Ok(Some(checksum)) => set_pair_tag(&base_file, checksum).map(|_| ()),
        Ok(None) => remove_pair_tag(&base_file),
        Err(e) => Err(e),
    };
    tagged.map_err(|source| MergeError::Tag {
        base: base.into(),
        diff: diff.into(),
        source,
    })?;
    base_file
        .sync_all()
        .map_err(|e| MergeError::Sync(base.into(), e))?;
    Ok(stats)
}

/// Takes the `flock` lock `kind` (`LOCK_SH` or `LOCK_EX`) on `file` without waiting: false
/// if a conflicting lock is held. A file system without `flock` (ENOLCK) counts as locked:
/// the lock only guards against a mistake, it protects no data by itself.
///
/// Ember holds a shared lock on a memory file it was loaded from for as long as it maps it;
/// a merge takes an exclusive one on its base, so it cannot change a running VM's memory.
pub fn lock(file: &File, kind: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a descriptor `file` owns; the lock goes with the open file.
    if unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        e if e.raw_os_error() == Some(libc::ENOLCK) => Ok(true),
        e => Err(e),
    }
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

    /// A temporary directory whose file system keeps user extended attributes: the system's
    /// temporary directory, or, where that is a tmpfs without them (before Linux 6.6), one
    /// in this crate's directory.
    fn tag_dir() -> tempfile::TempDir {
        for parent in [
            std::env::temp_dir(),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        ] {
            let dir = tempfile::tempdir_in(parent).unwrap();
            let probe = File::create(dir.path().join("probe")).unwrap();
            if set_pair_tag(&probe, 1).unwrap() {
                return dir;
            }
        }
        panic!("neither the temporary directory nor the source tree keeps user extended attributes: run the tests on ext4, xfs or btrfs")
    }

    #[test]
    fn merging_moves_the_diffs_tag_onto_the_base() {
        let dir = tag_dir();
        let (base, diff) = (dir.path().join("base.mem"), dir.path().join("diff.mem"));
        sparse(&base, 4, &[(0, 1)]);
        sparse(&diff, 4, &[(1, 2)]);
        set_pair_tag(&File::open(&base).unwrap(), 0xba5e).unwrap();
        set_pair_tag(&File::open(&diff).unwrap(), 0xd1ff).unwrap();
        merge_diff(&base, &diff).unwrap();
        assert_eq!(pair_tag(&File::open(&base).unwrap()).unwrap(), Some(0xd1ff));
        // An untagged diff (copied without its attributes) leaves the base untagged: it no
        // longer holds what its old tag says.
        let untagged = dir.path().join("untagged.mem");
        sparse(&untagged, 4, &[(2, 3)]);
        merge_diff(&base, &untagged).unwrap();
        assert_eq!(pair_tag(&File::open(&base).unwrap()).unwrap(), None);
        assert_eq!(pages_of(&base), [1, 2, 3, 0]);
    }

    #[test]
    fn tags_that_ember_did_not_write_read_as_untagged() {
        let dir = tag_dir();
        let path = dir.path().join("m.mem");
        let file = File::create(&path).unwrap();
        assert_eq!(pair_tag(&file).unwrap(), None);
        let name = xattr_name();
        for value in [&b"not hex"[..], &[b'f'; 40][..]] {
            // SAFETY: as in set_pair_tag; `value` outlives the call.
            let r = unsafe {
                libc::fsetxattr(
                    file.as_raw_fd(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            assert_eq!(r, 0, "{}", io::Error::last_os_error());
            assert_eq!(pair_tag(&file).unwrap(), None);
        }
    }

    #[test]
    fn a_base_a_vm_was_loaded_from_is_not_merged_into() {
        let dir = tempfile::tempdir().unwrap();
        let (base, diff) = (dir.path().join("base.mem"), dir.path().join("diff.mem"));
        sparse(&base, 4, &[(0, 1)]);
        sparse(&diff, 4, &[(0, 2)]);
        // What a loaded ember holds while it maps the file.
        let mapped = File::open(&base).unwrap();
        assert!(lock(&mapped, libc::LOCK_SH).unwrap());
        let err = merge_diff(&base, &diff).unwrap_err().to_string();
        assert!(err.contains("is in use by a VM loaded from it"), "{err}");
        assert_eq!(pages_of(&base), [1, 0, 0, 0]);
        drop(mapped);
        merge_diff(&base, &diff).unwrap();
        assert_eq!(pages_of(&base), [2, 0, 0, 0]);
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
