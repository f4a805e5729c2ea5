//! File operations: `write_file` (atomic: temp file, fsync, rename), `read_file`, `stat`,
//! `list`, `mkdir` and `remove`. Paths must be absolute.

use std::fs::{self, File, Metadata, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use guest_init::proto::{
    self, DirEntry, ErrorCode, FileKind, FileStat, FrameKind, ListResponse, MkdirRequest,
    ReadFileResponse, RemoveRequest, WriteFileRequest, WriteFileResponse, DATA_CHUNK,
    DEFAULT_FILE_MODE, MAX_PAYLOAD,
};

use super::{send_response, Failure};

/// Permission bits, setuid/setgid and sticky: what `mode` may hold.
const MODE_MASK: u32 = 0o7777;
const DEFAULT_DIR_MODE: u32 = 0o755;

fn absolute(path: &str) -> Result<&Path, Failure> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Failure::invalid(format!(
            "path {path:?} is not absolute; the agent takes absolute paths only"
        )));
    }
    Ok(p)
}

fn check_mode(mode: u32) -> Result<u32, Failure> {
    if mode & !MODE_MASK != 0 {
        return Err(Failure::invalid(format!(
            "mode {mode:#o} has bits outside {MODE_MASK:#o}"
        )));
    }
    Ok(mode)
}

/// Receives DATA frames into a temp file next to the target, then renames it over the target.
pub fn write_file<C: Read + Write>(
    conn: &mut C,
    request: &WriteFileRequest,
) -> Result<(), Failure> {
    let path = absolute(&request.path)?;
    let mode = check_mode(request.mode.unwrap_or(DEFAULT_FILE_MODE))?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Failure::invalid(format!(
            "{} is not a file path",
            path.display()
        )));
    };
    if request.mkdirs {
        fs::create_dir_all(dir)
            .map_err(|e| Failure::io(format_args!("cannot create {}", dir.display()), &e))?;
    }
    let mut temp = TempFile::create(dir, &name.to_string_lossy())?;
    let written = receive(conn, &mut temp.file).map_err(|e| e.into_failure(path))?;
    temp.persist(path, mode)?;
    send_response(conn, &WriteFileResponse { written })
}

/// Writes DATA frames into `file` until the empty one. A failed write stops writing but not
/// reading: the host is still sending and should get an answer, not a reset.
fn receive<C: Read>(conn: &mut C, file: &mut File) -> Result<u64, ReceiveError> {
    let mut written = 0u64;
    let mut write_error = None;
    loop {
        let frame = match proto::read_frame(conn) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return Err(ReceiveError::Protocol(
                    ErrorCode::Protocol,
                    "the upload ended without an empty DATA frame".into(),
                ))
            }
            Err(e) => return Err(ReceiveError::Protocol(e.code(), e.to_string())),
        };
        if frame.kind != FrameKind::Data {
            let message = format!(
                "a {} frame cannot be part of an upload; send DATA",
                frame.kind
            );
            return Err(ReceiveError::Protocol(ErrorCode::Protocol, message));
        }
        if frame.payload.is_empty() {
            break;
        }
        if write_error.is_none() {
            match file.write_all(&frame.payload) {
                Ok(()) => written += frame.payload.len() as u64,
                Err(e) => write_error = Some(e),
            }
        }
    }
    match write_error {
        Some(e) => Err(ReceiveError::Write(e)),
        None => Ok(written),
    }
}

/// Why an upload failed: the connection (answered as is) or the file.
enum ReceiveError {
    Protocol(ErrorCode, String),
    Write(io::Error),
}

impl ReceiveError {
    fn into_failure(self, path: &Path) -> Failure {
        match self {
            ReceiveError::Protocol(code, message) => Failure::new(code, message),
            ReceiveError::Write(e) => {
                Failure::io(format_args!("cannot write {}", path.display()), &e)
            }
        }
    }
}

/// A file that is deleted unless it is renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    fn create(dir: &Path, name: &str) -> Result<Self, Failure> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.ember-{}-{unique}.tmp", std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                Failure::io(
                    format_args!("cannot create a file in {}", dir.display()),
                    &e,
                )
            })?;
        Ok(Self {
            path,
            file,
            persisted: false,
        })
    }

    /// Sets the mode, syncs, renames over `target` and syncs the directory.
    fn persist(&mut self, target: &Path, mode: u32) -> Result<(), Failure> {
        let fail =
            |what: &str, e: io::Error| Failure::io(format_args!("{what} {}", target.display()), &e);
        self.file
            .set_permissions(Permissions::from_mode(mode))
            .map_err(|e| fail("cannot set the mode of", e))?;
        self.file.sync_all().map_err(|e| fail("cannot sync", e))?;
        fs::rename(&self.path, target).map_err(|e| fail("cannot replace", e))?;
        self.persisted = true;
        if let Some(dir) = target.parent() {
            // The rename is durable once the directory is synced; failing that is not worth
            // failing the upload for (some filesystems cannot sync directories).
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Sends the size and mode, the file in DATA frames, then an empty DATA frame.
pub fn read_file<C: Write>(conn: &mut C, path: &str) -> Result<(), Failure> {
    let path = absolute(path)?;
    let fail =
        |what: &str, e: io::Error| Failure::io(format_args!("{what} {}", path.display()), &e);
    let mut file = File::open(path).map_err(|e| fail("cannot open", e))?;
    let meta = file.metadata().map_err(|e| fail("cannot stat", e))?;
    if meta.is_dir() {
        return Err(Failure::invalid(format!(
            "{} is a directory; use list",
            path.display()
        )));
    }
    let header = ReadFileResponse {
        size: meta.len(),
        mode: meta.mode() & MODE_MASK,
    };
    send_response(conn, &header)?;
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail("cannot read", e)),
        };
        proto::write_frame(conn, FrameKind::Data, &buf[..n])
            .map_err(|e| Failure::io("cannot send file data", &e))?;
        if n == 0 {
            return Ok(());
        }
    }
}

fn kind_of(meta: &Metadata) -> FileKind {
    let file_type = meta.file_type();
    if file_type.is_file() {
        FileKind::File
    } else if file_type.is_dir() {
        FileKind::Dir
    } else if file_type.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    }
}

/// stat without following a final symlink.
pub fn stat(path: &str) -> Result<FileStat, Failure> {
    let path = absolute(path)?;
    let meta = fs::symlink_metadata(path)
        .map_err(|e| Failure::io(format_args!("cannot stat {}", path.display()), &e))?;
    Ok(FileStat {
        kind: kind_of(&meta),
        size: meta.len(),
        mode: meta.mode() & MODE_MASK,
        mtime: meta.mtime(),
    })
}

/// Sends the directory's entries, sorted by name.
pub fn list<C: Write>(conn: &mut C, path: &str) -> Result<(), Failure> {
    let path = absolute(path)?;
    let entries = list_entries(path)
        .map_err(|e| Failure::io(format_args!("cannot list {}", path.display()), &e))?;
    let count = entries.len();
    let payload = serde_json::to_vec(&ListResponse { entries })
        .map_err(|e| Failure::new(ErrorCode::Io, format!("cannot encode the listing: {e}")))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Failure::new(
            ErrorCode::TooLarge,
            format!(
                "{} holds {count} entries, more than one {MAX_PAYLOAD}-byte answer can carry; \
                 list it with exec (ls) instead",
                path.display()
            ),
        ));
    }
    proto::write_frame(conn, FrameKind::Response, &payload)
        .map_err(|e| Failure::io("cannot send the listing", &e))
}

fn list_entries(dir: &Path) -> io::Result<Vec<DirEntry>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // An entry removed since the directory was read is simply left out.
        let Ok(meta) = entry.metadata() else { continue };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind: kind_of(&meta),
            size: meta.len(),
            mode: meta.mode() & MODE_MASK,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

pub fn mkdir(request: &MkdirRequest) -> Result<(), Failure> {
    let path = absolute(&request.path)?;
    let mode = check_mode(request.mode.unwrap_or(DEFAULT_DIR_MODE))?;
    let fail =
        |what: &str, e: io::Error| Failure::io(format_args!("{what} {}", path.display()), &e);
    fs::DirBuilder::new()
        .recursive(request.parents)
        .mode(mode)
        .create(path)
        .map_err(|e| fail("cannot create", e))?;
    if request.mode.is_some() {
        // The umask trimmed the mode at creation; the caller asked for exactly this one.
        fs::set_permissions(path, Permissions::from_mode(mode))
            .map_err(|e| fail("cannot set the mode of", e))?;
    }
    Ok(())
}

pub fn remove(request: &RemoveRequest) -> Result<(), Failure> {
    let path = absolute(&request.path)?;
    if path.parent().is_none() {
        return Err(Failure::invalid("refusing to remove /"));
    }
    let fail = |e: io::Error| Failure::io(format_args!("cannot remove {}", path.display()), &e);
    let meta = fs::symlink_metadata(path).map_err(fail)?;
    let result = match (meta.is_dir(), request.recursive) {
        (true, true) => fs::remove_dir_all(path),
        (true, false) => fs::remove_dir(path),
        (false, _) => fs::remove_file(path),
    };
    result.map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTEMPTY) => Failure::invalid(format!(
            "cannot remove {}: the directory is not empty; pass recursive",
            path.display()
        )),
        _ => fail(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A directory for one test, removed when the test ends.
    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// A fake connection: reads from scripted frames, collects what is written.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Script {
        fn new(frames: &[(FrameKind, &[u8])]) -> Self {
            let mut input = Vec::new();
            for (kind, payload) in frames {
                proto::write_frame(&mut input, *kind, payload).unwrap();
            }
            Self {
                input: Cursor::new(input),
                output: Vec::new(),
            }
        }

        fn replies(&self) -> Vec<proto::Frame> {
            let mut cursor = Cursor::new(self.output.clone());
            std::iter::from_fn(|| proto::read_frame(&mut cursor).unwrap()).collect()
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn write_request(path: &Path) -> WriteFileRequest {
        WriteFileRequest {
            path: path.to_string_lossy().into_owned(),
            mode: Some(0o640),
            mkdirs: true,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn upload_lands_with_its_mode() {
        let dir = temp_dir();
        let target = dir.path().join("sub/file");
        let mut conn = Script::new(&[
            (FrameKind::Data, b"hello "),
            (FrameKind::Data, b"world"),
            (FrameKind::Data, b""),
        ]);
        write_file(&mut conn, &write_request(&target)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello world");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o640);
        let replies = conn.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].json::<WriteFileResponse>().unwrap().written, 11);
        assert!(leftovers(&dir.path().join("sub")).is_empty());
    }

    #[test]
    fn broken_upload_keeps_the_old_file_and_no_temp() {
        let dir = temp_dir();
        let target = dir.path().join("file");
        fs::write(&target, b"old").unwrap();
        // The stream ends before the empty DATA frame.
        let mut conn = Script::new(&[(FrameKind::Data, b"new data")]);
        let failure = write_file(&mut conn, &write_request(&target)).unwrap_err();
        assert_eq!(failure.code, ErrorCode::Protocol);
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn wrong_frame_in_an_upload_is_a_protocol_error() {
        let dir = temp_dir();
        let mut conn = Script::new(&[(FrameKind::Data, b"x"), (FrameKind::Stdin, b"y")]);
        let failure = write_file(&mut conn, &write_request(&dir.path().join("f"))).unwrap_err();
        assert_eq!(failure.code, ErrorCode::Protocol);
        assert!(!dir.path().join("f").exists());
    }

    #[test]
    fn relative_paths_and_bad_modes_are_invalid() {
        assert_eq!(stat("etc/passwd").unwrap_err().code, ErrorCode::Invalid);
        let request = MkdirRequest {
            path: "/tmp/x".into(),
            parents: false,
            mode: Some(0o17777),
        };
        assert_eq!(mkdir(&request).unwrap_err().code, ErrorCode::Invalid);
        let remove_root = RemoveRequest {
            path: "/".into(),
            recursive: true,
        };
        assert_eq!(remove(&remove_root).unwrap_err().code, ErrorCode::Invalid);
    }

    #[test]
    fn read_file_streams_and_ends_with_an_empty_frame() {
        let dir = temp_dir();
        let data: Vec<u8> = (0..DATA_CHUNK * 2 + 10).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("f"), &data).unwrap();
        let mut conn = Script::new(&[]);
        read_file(&mut conn, &dir.path().join("f").to_string_lossy()).unwrap();
        let replies = conn.replies();
        let header: ReadFileResponse = replies[0].json().unwrap();
        assert_eq!(header.size, data.len() as u64);
        let body: Vec<u8> = replies[1..]
            .iter()
            .flat_map(|f| f.payload.clone())
            .collect();
        assert_eq!(body, data);
        assert!(replies.last().unwrap().payload.is_empty());
        assert_eq!(replies.len(), 5, "header, three chunks, end");
    }
}
