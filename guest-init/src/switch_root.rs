//! Leaving the initramfs for a block root: when ember-init runs from an initramfs and the
//! command line names `root=`, the initramfs is only a stage. The root is mounted, the
//! stage's mounts are dropped, and the root's own /sbin/init (ember-init again) takes over
//! as PID 1.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_init::cmdline::RootSpec;

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const NEW_ROOT: &str = "/newroot";
/// How long to wait for the root device to show up.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// True when `/` is the initramfs (ramfs or tmpfs).
pub fn running_from_initramfs() -> bool {
    // SAFETY: statfs is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and `st` a valid out-parameter.
    let rc = unsafe { libc::statfs(c"/".as_ptr(), &mut st) };
    rc == 0 && matches!(st.f_type as i64, RAMFS_MAGIC | TMPFS_MAGIC)
}

/// Mounts the root and executes its init; returns only on failure.
pub fn switch_to(spec: &RootSpec) -> Result<std::convert::Infallible> {
    let device = wait_for_device(&spec.device)?;
    println!(
        "ember-init: switching root to {} ({})",
        device.display(),
        spec.device
    );
    std::fs::create_dir_all(NEW_ROOT).context("cannot create /newroot")?;
    let flags = if spec.read_only { libc::MS_RDONLY } else { 0 };
    crate::mount(&device.to_string_lossy(), NEW_ROOT, &spec.fstype, flags, "").with_context(
        || {
            format!(
                "cannot mount {} ({}) on {NEW_ROOT}",
                device.display(),
                spec.fstype
            )
        },
    )?;
    for target in [
        "/dev/shm", "/dev/pts", "/run", "/tmp", "/dev", "/sys", "/proc",
    ] {
        // The new init mounts its own; a busy mount is detached lazily.
        let path = CString::new(target).context("mount target")?;
        // SAFETY: a valid C string; umount2 has no memory effects.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    std::env::set_current_dir(NEW_ROOT).context("cannot enter /newroot")?;
    crate::mount(".", "/", "", libc::MS_MOVE, "").context("cannot move /newroot to /")?;
    let dot = CString::new(".").context("path")?;
    // SAFETY: a valid C string; chroot changes only this process's root.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot chroot into the new root");
    }
    std::env::set_current_dir("/").context("cannot enter the new root")?;
    let init = CString::new("/sbin/init").context("path")?;
    let argv = [init.as_ptr(), std::ptr::null()];
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call.
    unsafe { libc::execv(init.as_ptr(), argv.as_ptr()) };
    bail!(
        "cannot execute /sbin/init on the new root: {}",
        std::io::Error::last_os_error()
    )
}

/// Resolves `/dev/...` or `PARTUUID=...`, waiting for the device to appear.
fn wait_for_device(spec: &str) -> Result<PathBuf> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let found = match spec.strip_prefix("PARTUUID=") {
            Some(uuid) => find_partuuid(uuid),
            None => Some(PathBuf::from(spec)).filter(|p| p.exists()),
        };
        if let Some(path) = found {
            return Ok(path);
        }
        if Instant::now() > deadline {
            bail!("root device {spec} did not appear within {DEVICE_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find_partuuid(uuid: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/block").ok()?;
    entries.flatten().find_map(|entry| {
        let uevent = std::fs::read_to_string(entry.path().join("uevent")).ok()?;
        let matches = uevent.lines().any(|l| {
            l.strip_prefix("PARTUUID=")
                .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
        });
        matches.then(|| Path::new("/dev").join(entry.file_name()))
    })
}
