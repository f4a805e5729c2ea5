//! Snapshot files on disk: writing a file so that it never half-exists at its path (and
//! removing what a writer that crashed left behind), loading a state file with every check
//! before its state is used, and checking a memory file against the size its state file
//! records.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

use api::models::LogLevel;

use super::format::{
    check_header, decode_exact, decode_with, encode, stored_checksum, Header, HEADER_LEN,
};
use super::SnapshotError;
use crate::rpc::logger;

/// A state file that passed every check, with its decoded state.
#[derive(Debug)]
pub struct LoadedState<T> {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its header: format version, memory file size, payload length.
    pub header: Header,
    /// Its checksum, which tags the memory file saved with it (see `api::memfile`).
    pub checksum: u64,
    /// The decoded state.
    pub state: T,
}

impl<T> LoadedState<T> {
    /// The size the memory file saved with this state must have.
    pub fn mem_file_size(&self) -> u64 {
        self.header.mem_file_size
    }

    /// Opens the memory file at `mem_path` read-only after checking that it has the size this
    /// state records; see [`check_memory_file`].
    pub fn open_memory_file(&self, mem_path: &Path) -> Result<File, SnapshotError> {
        check_memory_file(mem_path, self.header.mem_file_size, &self.path)
    }
}

/// Writes `state` as a state file at `path` recording `mem_file_size`, atomically: see
/// [`write_file_atomically`].
pub fn save_state<T: Serialize + ?Sized>(
    path: &Path,
    state: &T,
    mem_file_size: u64,
) -> Result<(), SnapshotError> {
    let bytes = encode(state, mem_file_size)?;
    write_file_atomically(path, |file| io::Write::write_all(file, &bytes))
}

/// Reads and checks the state file at `path` and decodes its state. Everything is checked
/// (see the module docs) before the state is returned; at most the payload limit plus the
/// envelope is ever read or allocated, whatever the file says.
pub fn load_state<T: DeserializeOwned>(path: &Path) -> Result<LoadedState<T>, SnapshotError> {
    load_state_with(path, |_, payload| decode_exact(payload))
}

/// [`load_state`] with the payload decoded by `payload`, given its format version: for a
/// state that reads older versions' shapes.
pub fn load_state_with<T>(
    path: &Path,
    payload: impl FnOnce(u32, &[u8]) -> Result<T, String>,
) -> Result<LoadedState<T>, SnapshotError> {
    let read_err = |e| SnapshotError::ReadState(path.to_path_buf(), e);
    let file = open_nonblocking(path).map_err(|e| SnapshotError::OpenState(path.into(), e))?;
    let metadata = file.metadata().map_err(read_err)?;
    if !metadata.is_file() {
        return Err(SnapshotError::StateNotAFile(path.to_path_buf()));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN as usize);
    (&file)
        .take(HEADER_LEN)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let header = check_header(&bytes, metadata.len(), path)?;
    // check_header bounded this by the payload limit and by the file's real length.
    let rest = header.file_len() - HEADER_LEN;
    bytes.reserve_exact(rest as usize);
    // One byte more than announced, so that a file that grew since it was measured is seen.
    (&file)
        .take(rest + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let (header, state) = decode_with(&bytes, path, payload)?;
    Ok(LoadedState {
        path: path.to_path_buf(),
        header,
        checksum: stored_checksum(&bytes),
        state,
    })
}

/// Opens the memory file at `mem_path` read-only and checks that it is a regular file of
/// `expected_size` bytes, as recorded by the state file at `state_path` (named in the error).
/// The returned file is what the caller should map, so that the file checked is the file used.
/// It is opened with `O_NONBLOCK` so that a FIFO at that path cannot hang the caller; the flag
/// does nothing on a regular file.
pub fn check_memory_file(
    mem_path: &Path,
    expected_size: u64,
    state_path: &Path,
) -> Result<File, SnapshotError> {
    let open_err = |e| SnapshotError::OpenMemory(mem_path.to_path_buf(), e);
    let file = open_nonblocking(mem_path).map_err(open_err)?;
    let metadata = file.metadata().map_err(open_err)?;
    if !metadata.is_file() {
        return Err(SnapshotError::MemoryNotAFile(mem_path.to_path_buf()));
    }
    if metadata.len() != expected_size {
        return Err(SnapshotError::MemorySizeMismatch {
            mem_path: mem_path.to_path_buf(),
            state_path: state_path.to_path_buf(),
            expected: expected_size,
            actual: metadata.len(),
        });
    }
    Ok(file)
}

fn open_nonblocking(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Creates the file at `target` with the contents `write` puts into it, so that it never
/// half-exists: `write` fills a temporary file in the same directory, which is fsynced and
/// renamed over `target`, then the directory is fsynced. If `write` or anything before the
/// rename fails (a full disk included), the temporary file is removed and whatever was at
/// `target` before is left as it was.
pub fn write_file_atomically<F>(target: &Path, write: F) -> Result<(), SnapshotError>
where
    F: FnOnce(&mut File) -> io::Result<()>,
{
    prepare_file(target, write)?.commit()
}

/// The first half of [`write_file_atomically`]: the contents are written to a temporary file
/// next to `target` and flushed to disk, but not yet moved into place. Several files can be
/// prepared before any is committed, so that a failure while writing any of them (a full
/// disk) leaves every target as it was.
pub fn prepare_file<F>(target: &Path, write: F) -> Result<PreparedFile, SnapshotError>
where
    F: FnOnce(&mut File) -> io::Result<()>,
{
    let dir = parent_dir(target);
    let mut temp = TempFile::create(&dir, target)?;
    write(&mut temp.file).map_err(|source| SnapshotError::Write {
        target: target.to_path_buf(),
        source,
    })?;
    temp.file.sync_all().map_err(|source| SnapshotError::Sync {
        target: target.to_path_buf(),
        source,
    })?;
    Ok(PreparedFile {
        temp,
        dir,
        target: target.to_path_buf(),
    })
}

/// A file written and flushed next to its target; dropped without [`PreparedFile::commit`],
/// it is removed and the target is left as it was.
pub struct PreparedFile {
    temp: TempFile,
    dir: PathBuf,
    target: PathBuf,
}

impl PreparedFile {
    /// Renames the file over its target and flushes the directory.
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        let target = self.target.clone();
        fs::rename(&self.temp.path, &target).map_err(|source| SnapshotError::Rename {
            target: target.clone(),
            source,
        })?;
        self.temp.renamed = true;
        // The rename is durable only once the directory entry is on disk.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| SnapshotError::SyncDirectory {
                target,
                dir: self.dir.clone(),
                source,
            })
    }
}

/// The directory that holds `path` ("." for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary file next to a target, removed when dropped unless it was renamed.
struct TempFile {
    path: PathBuf,
    file: File,
    renamed: bool,
}

impl TempFile {
    /// Creates `.<name>.<pid>.<n>.tmp` in `dir` with `O_EXCL`, mode 0600 (a snapshot is the
    /// guest's private data). `n` counts up per process, so concurrent writers within one
    /// process never collide. Files of that form that a process no longer running left for
    /// the same name are removed first (see [`remove_stale_temp_files`]).
    fn create(dir: &Path, target: &Path) -> Result<Self, SnapshotError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let create_err = |source| SnapshotError::CreateTemp {
            dir: dir.to_path_buf(),
            target: target.to_path_buf(),
            source,
        };
        let Some(name) = target.file_name() else {
            let why = "the path does not end in a file name";
            return Err(create_err(io::Error::new(io::ErrorKind::InvalidInput, why)));
        };
        remove_stale_temp_files(dir, name);
        let mut last_error = io::Error::from(io::ErrorKind::AlreadyExists);
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(temp_file_name(name, std::process::id(), n));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match opened {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        renamed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = e,
                Err(e) => return Err(create_err(e)),
            }
        }
        Err(create_err(last_error))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            // Best effort: failing to remove a temporary file must not hide the real error.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `.<name>.<pid>.<n>.tmp`: the temporary file that process `pid` writes `name` into.
fn temp_file_name(name: &OsStr, pid: u32, n: u32) -> OsString {
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{pid}.{n}.tmp"));
    temp_name
}

/// The writer's pid if `file_name` is exactly what [`temp_file_name`] makes for `name`: both
/// numbers in decimal as written (no sign, no leading zero), the pid one a process can have.
fn temp_file_writer(file_name: &OsStr, name: &OsStr) -> Option<u32> {
    let rest = file_name
        .as_bytes()
        .strip_prefix(b".")?
        .strip_prefix(name.as_bytes())?
        .strip_prefix(b".")?
        .strip_suffix(b".tmp")?;
    let (pid, n) = std::str::from_utf8(rest).ok()?.split_once('.')?;
    let canonical = |digits: &str| {
        digits
            .parse::<u32>()
            .ok()
            .filter(|v| v.to_string() == digits)
    };
    canonical(n)?;
    // A pid is a positive pid_t.
    canonical(pid).filter(|&pid| pid > 0 && libc::pid_t::try_from(pid).is_ok())
}

/// Whether process `pid` may exist: its `/proc` entry is there, or `/proc` cannot tell (it
/// does not show this process itself: not mounted, or another pid namespace's). Only a
/// missing entry in a `/proc` that shows us counts as gone, so a file is only ever removed
/// when its writer surely is. (`/proc` and not kill(2): the VMM thread's seccomp filter
/// allows no kill at all, and reading file metadata it allows already.)
fn process_may_exist(pid: u32) -> bool {
    let missing = |pid: u32| {
        let entry = Path::new("/proc").join(pid.to_string());
        matches!(fs::symlink_metadata(entry), Err(e) if e.kind() == io::ErrorKind::NotFound)
    };
    missing(std::process::id()) || !missing(pid)
}

/// Removes the temporary files for `name` in `dir` left by writers that no longer run: a
/// snapshot save cut short by SIGKILL or a host crash leaves one behind, as large as guest
/// memory, and nothing else would ever remove it. Only regular files whose name is exactly
/// `.<name>.<pid>.<n>.tmp` (see [`temp_file_writer`]) and whose process is gone are removed;
/// symbolic links are never followed (unlink(2) removes the link itself, and the file type is
/// read without following it). Each removal is logged. Best effort: a directory that cannot
/// be read is left alone (creating the new file there reports the real error), and a file
/// that cannot be removed is logged and skipped.
///
/// The writer is looked up in `/proc`, which shows this process's pid namespace: an ember in
/// another pid namespace, or hidden by `/proc`'s `hidepid` option, writing into the same
/// directory at the same time could be taken for gone.
fn remove_stale_temp_files(dir: &Path, name: &OsStr) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = temp_file_writer(&entry.file_name(), name) else {
            continue;
        };
        // Not a regular file (a symlink, a directory), or gone already: not ours to remove.
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.is_file() || process_may_exist(pid) {
            continue;
        }
        let (path, size, target) = (entry.path(), metadata.len(), dir.join(name));
        let message = match fs::remove_file(&path) {
            Ok(()) => format!(
                "removed {} ({size} bytes): process {pid} was writing {} there and ended \
                 before it finished",
                path.display(),
                target.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => format!(
                "cannot remove {} ({size} bytes), left by process {pid} (no longer running) \
                 writing {}: {e}; remove it by hand",
                path.display(),
                target.display()
            ),
        };
        logger::log(LogLevel::Warning, "snapshot", &message);
    }
}
