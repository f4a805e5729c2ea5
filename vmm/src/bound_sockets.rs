//! The Unix sockets this process bound (the API socket, each vsock device's `uds_path`),
//! removed when ember exits, so that a platform reusing a VM's directory finds no stale
//! socket there (and a client no path that refuses it). `ember` ends with
//! `std::process::exit`, which runs no destructors, so the listeners cannot do it
//! themselves. A path is removed only while it still names the socket this process bound:
//! one that another process has bound since (a restored clone at the same path) is left alone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A bound socket: its path and the identity (device, inode) of the file it made.
struct Bound {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

static BOUND: Mutex<Vec<Bound>> = Mutex::new(Vec::new());

fn bound() -> std::sync::MutexGuard<'static, Vec<Bound>> {
    BOUND.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the socket just bound at `path`; a path that cannot be inspected is not recorded
/// (and so never removed).
pub fn record(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        bound().push(Bound {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        });
    }
}

/// Removes every recorded socket whose path still names it. Errors are of no interest: the
/// process is about to exit.
pub fn remove_all() {
    for socket in bound().drain(..) {
        let ours = std::fs::symlink_metadata(&socket.path)
            .is_ok_and(|m| m.dev() == socket.dev && m.ino() == socket.ino);
        if ours {
            let _ = std::fs::remove_file(&socket.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn only_sockets_still_ours_are_removed() {
        let dir = std::env::temp_dir().join(format!("ember-bound-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (mine, replaced) = (dir.join("mine.sock"), dir.join("replaced.sock"));
        let _a = UnixListener::bind(&mine).unwrap();
        record(&mine);
        let _b = UnixListener::bind(&replaced).unwrap();
        record(&replaced);
        // Another process replaces the second socket with one of its own.
        std::fs::remove_file(&replaced).unwrap();
        let _c = UnixListener::bind(&replaced).unwrap();
        remove_all();
        assert!(!mine.exists());
        assert!(replaced.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
