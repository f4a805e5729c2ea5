//! ember-init: PID 1 of an Ember guest. Top to bottom: mount the pseudo filesystems, make
//! sure the console is stdio, hand over to a block root if the initramfs is only a stage
//! (`root=` given), read `ember.*` options, set the hostname, start the agent on vsock, say
//! "ready" (console line and the boot-timer port), run the `ember.run` command if there is
//! one, then reap children until asked to power off.
//!
//! Not as PID 1, `ember-init --agent-unix PATH` serves only the agent, on a Unix socket (see
//! `standalone`).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use guest_init::ipconfig::IpConfig;
use guest_init::{cmdline, report};

use agent::PowerAction;

/// `eprintln!` as one console write: see `report::console_line`.
macro_rules! say {
    ($($arg:tt)*) => {
        guest_init::report::console_line(&format!($($arg)*))
    };
}

use reaper::{Reaper, Remaining};

mod agent;
mod netif;
mod reaper;
mod standalone;
mod switch_root;
mod vsock;

/// Ember's boot-timer port and the value that marks boot complete (see the VMM's
/// `devices::legacy::boot_timer`).
const BOOT_TIMER_PORT: u16 = 0x440;
const BOOT_COMPLETE_MAGIC: u8 = 123;

/// The one owner of `waitpid(-1)` in this process: PID 1's orphans and the agent's commands.
static REAPER: Reaper = Reaper::new();

/// What was asked for when `request_power` raised SIGTERM.
static POWER_REQUEST: AtomicU8 = AtomicU8::new(POWER_OFF);
const POWER_OFF: u8 = 0;
const REBOOT: u8 = 1;

fn main() {
    if std::process::id() != 1 {
        std::process::exit(standalone::main(&REAPER));
    }
    let action = run().unwrap_or_else(|e| {
        say!("ember-init: {e:#}");
        PowerAction::PowerOff
    });
    // PID 1 must not exit (the kernel would panic); a failed init powers the VM off instead.
    power_off(action);
}

fn run() -> Result<PowerAction> {
    mount_pseudo_filesystems()?;
    ensure_console_stdio();
    let text = std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?;
    if switch_root::running_from_initramfs() {
        if let Some(root) = cmdline::RootSpec::from_args(&cmdline::split_args(&text)) {
            let Err(e) = switch_root::switch_to(&root);
            say!("ember-init: {e:#}; staying on the initramfs");
            mount_pseudo_filesystems()?;
        }
    }
    let (options, warnings) = cmdline::parse(&text);
    for warning in warnings {
        say!("ember-init: {warning}");
    }
    set_hostname(&options.hostname)?;
    configure_network(options.ip.as_deref());
    // Before any thread starts: every thread inherits the mask, so the signals queue for
    // `supervise` instead of being delivered (and dropped) elsewhere.
    let signals = block_signals()?;
    let ready_ms = report::boot_time().as_millis();
    // Before the agent starts, so that no host can take a snapshot between the agent's
    // READY and this write (see `signal_boot_complete`).
    signal_boot_complete();
    agent::start_in_guest(&REAPER, Box::new(request_power));
    println!("ember-init: cmdline: {}", text.trim());
    println!(
        "ember-init: ready in {ready_ms} ms: cpus={} ram_kib={} hostname={}",
        online_cpus().map_or_else(|| "?".into(), |n| n.to_string()),
        system_ram_kib().map_or_else(|| "?".into(), |n| n.to_string()),
        options.hostname,
    );
    match (options.run, options.poweroff_when_ready) {
        (None, true) => return Ok(PowerAction::PowerOff),
        (Some(command), poweroff) => start_command(command, poweroff)?,
        (None, false) => {}
    }
    Ok(supervise(&signals))
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run, creating the directories.
/// An already mounted target (a block root with devtmpfs auto-mounted) is left as it is.
fn mount_pseudo_filesystems() -> Result<()> {
    let mounts = [
        (
            "proc",
            "/proc",
            "proc",
            "",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            "",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755", libc::MS_NOSUID),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            "mode=0620,ptmxmode=0666",
            libc::MS_NOSUID | libc::MS_NOEXEC,
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            "mode=1777",
            libc::MS_NOSUID | libc::MS_NODEV,
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            "mode=1777",
            libc::MS_NOSUID | libc::MS_NODEV,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            "mode=0755",
            libc::MS_NOSUID | libc::MS_NODEV,
        ),
    ];
    for (source, target, fstype, data, flags) in mounts {
        std::fs::create_dir_all(target).with_context(|| format!("cannot create {target}"))?;
        mount(source, target, fstype, flags, data)
            .with_context(|| format!("cannot mount {fstype} on {target}"))?;
    }
    Ok(())
}

/// mount(2); an already mounted target (EBUSY) counts as done.
fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
    let c = |s: &str| CString::new(s).context("path with a NUL byte");
    let (source, target, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    let err = std::io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(err.into())
}

/// Brings up `lo` and the `ip=` interface. A network problem is reported, never fatal: the
/// guest stays useful (and reachable over vsock) without it.
fn configure_network(ip: Option<&str>) {
    let config = match ip.map(IpConfig::parse).transpose() {
        Ok(config) => config.flatten(),
        Err(e) => {
            say!("ember-init: {e}");
            None
        }
    };
    if let Err(e) = netif::configure(config.as_ref()) {
        say!(
            "ember-init: {e:#} (interfaces: {})",
            netif::interface_names().join(", ")
        );
    }
}

/// The kernel opens /dev/console for init only if the initramfs has that node; when it
/// did not, stdio is closed, so open it now that devtmpfs is mounted.
fn ensure_console_stdio() {
    // SAFETY: F_GETFD only queries the descriptor table.
    let stdout_open = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if stdout_open {
        return;
    }
    let Ok(console) = File::options().read(true).write(true).open("/dev/console") else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: `console` is an open descriptor; dup2 onto 0..2 replaces closed slots.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

fn set_hostname(name: &str) -> Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set the hostname");
    }
    Ok(())
}

/// Blocks the signals init acts on, so that they queue for `sigwaitinfo` in `supervise`.
fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame for every call below.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, libc::SIGINT, libc::SIGTERM, libc::SIGPWR] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot block signals");
        }
    }
    Ok(set)
}

/// Runs the `ember.run` command on a thread of its own (its status comes from the reaper,
/// which `supervise` drives on the main thread), then asks for power-off if
/// `ember.test=poweroff` is set.
fn start_command(command: String, poweroff: bool) -> Result<()> {
    std::thread::Builder::new()
        .name("ember.run".into())
        .spawn(move || {
            run_command(&command);
            if poweroff {
                request_power(PowerAction::PowerOff);
            }
        })
        .context("cannot start the thread for ember.run")?;
    Ok(())
}

/// Runs `/bin/sh -c command` on the console and reports how it ended.
fn run_command(command: &str) {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut shell = std::process::Command::new("/bin/sh");
    shell
        .args(["-c", command])
        .env("PATH", agent::DEFAULT_PATH)
        .env("HOME", "/root");
    // SAFETY: the hook runs between fork and exec and only calls async-signal-safe functions
    // (sigprocmask, signal) that change the child's own signal state.
    unsafe { shell.pre_exec(reaper::restore_default_signals) };
    let raw = match REAPER.spawn(&mut shell) {
        Ok((_child, watch)) => watch.wait(),
        Err(e) => return say!("ember-init: cannot run /bin/sh: {e}"),
    };
    let status = std::process::ExitStatus::from_raw(raw);
    match (status.code(), status.signal()) {
        (Some(code), _) => println!("ember-init: run exited with status {code}"),
        (None, Some(sig)) => println!("ember-init: run killed by signal {sig}"),
        _ => println!("ember-init: run ended"),
    }
}

/// Reaps children; returns when asked to stop: SIGINT is Ctrl-Alt-Del, SIGTERM/SIGPWR a
/// power-off request (or the agent's request, see `request_power`).
fn supervise(signals: &libc::sigset_t) -> PowerAction {
    loop {
        // SAFETY: `signals` is an initialised set; a null info pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(signals, std::ptr::null_mut()) };
        match sig {
            libc::SIGCHLD => {
                REAPER.reap();
            }
            libc::SIGINT | libc::SIGTERM | libc::SIGPWR => {
                return match POWER_REQUEST.load(Ordering::SeqCst) {
                    REBOOT => PowerAction::Reboot,
                    _ => PowerAction::PowerOff,
                };
            }
            _ => {}
        }
    }
}

/// Asks `supervise` on the main thread to end the VM: records the action, then raises
/// SIGTERM, which every thread blocks, so it queues for `sigwaitinfo`.
fn request_power(action: PowerAction) {
    let value = match action {
        PowerAction::PowerOff => POWER_OFF,
        PowerAction::Reboot => REBOOT,
    };
    POWER_REQUEST.store(value, Ordering::SeqCst);
    // SAFETY: kill has no memory effects; the signal goes to this process.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

fn online_cpus() -> Option<u32> {
    report::count_cpulist(&std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?)
}

fn system_ram_kib() -> Option<u64> {
    report::system_ram_kib(&std::fs::read_to_string("/proc/iomem").ok()?)
}

/// Writes the boot-complete value to Ember's boot-timer port. Elsewhere (another VMM, no
/// port access) this does nothing harmful: an unclaimed port ignores writes.
///
/// The port is granted for the write only and dropped right after, so that neither PID 1
/// nor the commands the agent starts (which would inherit it) keep any I/O port. It matters
/// for snapshots too: a guest paused between the grant and the write must not have to make
/// a user-mode port access once restored. In the nested test bed (QEMU's emulated SVM),
/// such an access faults after any restore: KVM reports the task register as a busy TSS,
/// as it must be, and QEMU only checks the I/O bitmap of one marked available; PID 1 died
/// of that #GP when saved at that moment.
fn signal_boot_complete() {
    #[cfg(target_arch = "x86_64")]
    {
        let port = u64::from(BOOT_TIMER_PORT);
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        if unsafe { libc::ioperm(port, 1, 1) } != 0 {
            return;
        }
        // SAFETY: the port was just granted to this process; a port write touches no
        // memory and the VMM (or nothing) handles it.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") BOOT_TIMER_PORT,
                in("al") BOOT_COMPLETE_MAGIC,
                options(nomem, nostack, preserves_flags)
            );
        }
        // SAFETY: as above; this takes the grant back (Linux frees the bitmap).
        unsafe { libc::ioperm(port, 1, 0) };
    }
}

/// Stops every process, flushes filesystems and ends the VM. Ember guests have no ACPI,
/// so a power-off request would only halt the CPUs; a reboot goes out through the i8042
/// reset line (`reboot=k`), which makes Ember exit with status 0. Both actions end the VM
/// that way; they differ only in what the console says.
fn power_off(action: PowerAction) -> ! {
    if action == PowerAction::Reboot {
        println!("ember-init: rebooting");
    }
    // SAFETY: signalling all other processes and syncing have no memory-safety impact.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    for _ in 0..100 {
        if REAPER.reap() == Remaining::None {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    loop {
        // SAFETY: reboot(2) with RB_AUTOBOOT does not return on success.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        std::thread::sleep(Duration::from_secs(1));
    }
}
