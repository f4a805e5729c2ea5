//! The host side's Unix sockets: the listener at `uds_path`, checked before boot and bound
//! with a stale socket replaced, and non-blocking connections to `<uds_path>_<port>`.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::VsockError;

/// Longest socket path: `sun_path` holds 108 bytes, the terminating NUL included.
pub const MAX_PATH_LEN: usize = 107;

/// Checks `path` without changing anything: short enough, its directory exists, and
/// nothing but a (stale) socket is in the way.
pub fn check_path(path: &Path) -> Result<(), VsockError> {
    if path.as_os_str().len() > MAX_PATH_LEN {
        return Err(VsockError::PathTooLong(path.into()));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(VsockError::NoDirectory(path.into()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => Err(VsockError::NotASocket(path.into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VsockError::Inspect(path.into(), e)),
    }
}

/// Listens at `path`, non-blocking, after removing a socket left there by an earlier run.
/// Anything else at `path` is left alone and refused.
pub fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    check_path(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(|e| VsockError::RemoveStale(path.into(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| VsockError::Listen(path.into(), e))?;
    crate::bound_sockets::record(path);
    listener
        .set_nonblocking(true)
        .map_err(|e| VsockError::Listen(path.into(), e))?;
    Ok(listener)
}

/// The socket a guest connection to host port `port` is bridged to: `<uds_path>_<port>`.
pub fn service_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut name = OsString::from(uds_path.as_os_str());
    name.push(format!("_{port}"));
    name.into()
}

/// Connects to `path` without blocking: a listener whose backlog is full answers
/// `WouldBlock` instead of stalling the VMM thread. The stream is non-blocking.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > MAX_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` is within it
    // (the path is at most 107 bytes plus its NUL).
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ember-vsock-unix-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn stale_socket_is_replaced_but_other_files_are_not() {
        let dir = temp_dir("stale");
        let path = dir.join("v.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "an earlier run left its socket");
        let listener = listen(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        let file = dir.join("notes.txt");
        std::fs::write(&file, "keep me").unwrap();
        assert!(matches!(listen(&file), Err(VsockError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        assert!(matches!(
            check_path(&dir.join("missing/v.sock")),
            Err(VsockError::NoDirectory(_))
        ));
        let long = dir.join("x".repeat(MAX_PATH_LEN));
        assert!(matches!(check_path(&long), Err(VsockError::PathTooLong(_))));
    }

    #[test]
    fn service_paths_and_non_blocking_connects() {
        let dir = temp_dir("connect");
        let uds = dir.join("v.sock");
        assert_eq!(service_path(&uds, 1025), dir.join("v.sock_1025"));
        let err = connect(&service_path(&uds, 1025)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let listener = UnixListener::bind(service_path(&uds, 1025)).unwrap();
        let mut ours = connect(&service_path(&uds, 1025)).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        ours.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        let mut nothing = [0u8; 1];
        assert_eq!(
            ours.read(&mut nothing).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "non-blocking"
        );
    }
}
