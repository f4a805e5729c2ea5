//! The allowed system calls of each thread kind, as Rust tables: one entry per system call,
//! with the argument condition under which it is allowed, and a comment saying who needs
//! it. Anything not listed traps (SIGSYS, see `sigsys`).
//!
//! Kept as Rust rather than JSON data so that numbers come from `libc` and the KVM ioctl
//! encodings are computed, never typed by hand, and so that a typo fails the build.
//!
//! How the lists were made: from reading what each thread runs after its filter is installed
//! (vCPU: `Vcpu::run` and the bus devices; VMM: the event-manager loop, the device event
//! handlers and the API actions allowed after boot; API: `rpc::server`), then checked
//! against `strace -f` of real runs in the test bed (boot from the ext4 root, block I/O with
//! flushes, TAP traffic, vsock both ways, console input, guest power-off) and against the
//! unit tests' filtered threads. Set-up work (opening files, binding sockets, TAP ioctls,
//! KVM set-up, spawning vCPU threads) happens before the filters go on and is absent here on
//! purpose.

use std::os::raw::c_uint;

use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use super::ThreadKind;

/// When a listed system call is allowed. Argument comparisons look at the low 32 bits,
/// which is what the kernel reads for the `int` and `unsigned int` arguments compared here.
#[derive(Debug, Clone, Copy)]
pub(super) enum Args {
    /// Always.
    Any,
    /// When argument `.0` equals one of `.1`.
    OneOf(u8, &'static [u64]),
    /// When argument `.0` equals one of the values `.1` returns: values known only at run
    /// time, like glibc's SIGRTMIN.
    OneOfAtRunTime(u8, fn() -> Vec<u64>),
    /// When argument `.0` has none of the bits of `.1` set.
    NoneOf(u8, u64),
    /// When argument `.0` has all the bits of `.1` set.
    AllOf(u8, u64),
}

/// One allowed system call.
pub(super) type Allowed = (i64, Args);

const KVMIO: c_uint = 0xAE;
/// `_IO(KVMIO, 0x80)`: enter the guest.
pub(super) const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0);
/// `_IOW(KVMIO, 0x61, struct kvm_irq_level)`: raise or lower an IOAPIC pin (virtio
/// interrupts, see `devices::virtio::Trigger::Line`).
pub(super) const KVM_IRQ_LINE: u64 = ioctl_expr(
    _IOC_WRITE,
    KVMIO,
    0x61,
    std::mem::size_of::<kvm_bindings::kvm_irq_level>() as c_uint,
);
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub(super) const KVM_GET_REGS: u64 = ioctl_expr(
    _IOC_READ,
    KVMIO,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>() as c_uint,
);
/// `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
pub(super) const KVM_GET_SREGS: u64 = ioctl_expr(
    _IOC_READ,
    KVMIO,
    0x83,
    std::mem::size_of::<kvm_bindings::kvm_sregs>() as c_uint,
);

/// `_IOR(KVMIO, nr, T)`: a KVM ioctl that copies a `T` out of the kernel.
const fn kvm_ior<T>(nr: c_uint) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as c_uint)
}

/// `_IOWR(KVMIO, nr, T)`: a KVM ioctl that copies a `T` in and back out.
const fn kvm_iowr<T>(nr: c_uint) -> u64 {
    ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        KVMIO,
        nr,
        std::mem::size_of::<T>() as c_uint,
    )
}

// What a paused vCPU thread reads to save its state (`vstate::vcpu::state::save`), besides
// KVM_GET_REGS and KVM_GET_SREGS. Restoring needs no ioctl there: it is done before the
// thread starts.

/// `_IOR(KVMIO, 0x98, struct kvm_mp_state)`.
pub(super) const KVM_GET_MP_STATE: u64 = kvm_ior::<kvm_bindings::kvm_mp_state>(0x98);
/// `_IOR(KVMIO, 0xa4, struct kvm_xsave)`.
pub(super) const KVM_GET_XSAVE: u64 = kvm_ior::<kvm_bindings::kvm_xsave>(0xa4);
/// `_IOR(KVMIO, 0xcf, struct kvm_xsave)`.
pub(super) const KVM_GET_XSAVE2: u64 = kvm_ior::<kvm_bindings::kvm_xsave>(0xcf);
/// `_IOR(KVMIO, 0xa6, struct kvm_xcrs)`.
pub(super) const KVM_GET_XCRS: u64 = kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6);
/// `_IOR(KVMIO, 0xa1, struct kvm_debugregs)`.
pub(super) const KVM_GET_DEBUGREGS: u64 = kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1);
/// `_IOR(KVMIO, 0x8e, struct kvm_lapic_state)`.
pub(super) const KVM_GET_LAPIC: u64 = kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e);
/// `_IO(KVMIO, 0xa3)`.
pub(super) const KVM_GET_TSC_KHZ: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0xa3, 0);
/// `_IOWR(KVMIO, 0x91, struct kvm_cpuid2)`.
pub(super) const KVM_GET_CPUID2: u64 = kvm_iowr::<kvm_bindings::kvm_cpuid2>(0x91);
/// `_IOWR(KVMIO, 0x88, struct kvm_msrs)`.
pub(super) const KVM_GET_MSRS: u64 = kvm_iowr::<kvm_bindings::kvm_msrs>(0x88);
/// `_IOR(KVMIO, 0x9f, struct kvm_vcpu_events)`.
pub(super) const KVM_GET_VCPU_EVENTS: u64 = kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f);

// What the VMM thread reads to save the VM's state (`vstate::vm_state`), with the vCPUs
// paused. Restoring happens before its filter is installed.

/// `_IOWR(KVMIO, 0x62, struct kvm_irqchip)`.
pub(super) const KVM_GET_IRQCHIP: u64 = kvm_iowr::<kvm_bindings::kvm_irqchip>(0x62);
/// `_IOR(KVMIO, 0x9f, struct kvm_pit_state2)`.
pub(super) const KVM_GET_PIT2: u64 = kvm_ior::<kvm_bindings::kvm_pit_state2>(0x9f);
/// `_IOR(KVMIO, 0x7c, struct kvm_clock_data)`.
pub(super) const KVM_GET_CLOCK: u64 = kvm_ior::<kvm_bindings::kvm_clock_data>(0x7c);
/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`: the pages the guest wrote, for snapshots of a
/// VM that tracks dirty pages.
pub(super) const KVM_GET_DIRTY_LOG: u64 = ioctl_expr(
    _IOC_WRITE,
    KVMIO,
    0x42,
    std::mem::size_of::<kvm_bindings::kvm_dirty_log>() as c_uint,
);

/// `mmap`/`mprotect` argument 2 (`prot`): no thread ever maps new code.
const NO_EXEC: Args = Args::NoneOf(2, libc::PROT_EXEC as u64);

/// `tgkill` argument 2 (the signal) on threads that only ever signal themselves: abort()
/// after a panic (panic = "abort") raises SIGABRT, so that a panic ends the process as a
/// panic rather than as a seccomp violation.
const ABORT_ONLY: Args = Args::OneOf(2, &[libc::SIGABRT as u64]);

/// The VMM thread also kicks vCPU threads out of KVM_RUN with the kick signal, SIGRTMIN
/// (`vstate::vcpu`), through pthread_kill.
fn abort_or_vcpu_kick() -> Vec<u64> {
    vec![
        libc::SIGABRT as u64,
        vmm_sys_util::signal::SIGRTMIN() as u64,
    ]
}

/// What every Rust thread needs once it runs: memory allocation, locks, signal return,
/// ending the thread or the process.
const COMMON: &[Allowed] = &[
    // Eventfd signals (irqfds, queue kicks, stop and reset events), console output, and
    // the SIGSYS report and panic messages on stderr.
    (libc::SYS_write, Args::Any),
    // std's Mutex, Condvar, mpsc channels and thread parking.
    (libc::SYS_futex, Args::Any),
    // std's mpsc channels back off with sched_yield while another thread holds the channel
    // (seen on the API thread with 50 embers starting at once).
    (libc::SYS_sched_yield, Args::Any),
    // malloc: new arenas and large blocks (never executable).
    (libc::SYS_mmap, NO_EXEC),
    // malloc grows a thread's arena in place (never executable).
    (libc::SYS_mprotect, NO_EXEC),
    // free of large blocks; a finished thread's signal stack.
    (libc::SYS_munmap, Args::Any),
    // realloc of large blocks (keeps the protection of the old block).
    (libc::SYS_mremap, Args::Any),
    // malloc's main arena (the VMM thread is the process's first thread).
    (libc::SYS_brk, Args::Any),
    // malloc returns freed memory; glibc releases a finished thread's stack.
    (libc::SYS_madvise, Args::Any),
    // Dropping fds: finished vsock connections, a vCPU fd when its thread ends.
    (libc::SYS_close, Args::Any),
    // std's OwnedFd checks, in debug builds, that an fd is open before closing it.
    (libc::SYS_fcntl, Args::OneOf(1, &[libc::F_GETFD as u64])),
    // Returning from any signal handler (the vCPU kick signal among them).
    (libc::SYS_rt_sigreturn, Args::Any),
    // glibc blocks signals while a thread exits and while abort() runs.
    (libc::SYS_rt_sigprocmask, Args::Any),
    // std removes a thread's stack-overflow signal stack when the thread ends.
    (libc::SYS_sigaltstack, Args::Any),
    // Instant::now(): the vDSO falls back to the system call on some clock sources.
    (libc::SYS_clock_gettime, Args::Any),
    // A thread ends.
    (libc::SYS_exit, Args::Any),
    // The process ends: std::process::exit, and _exit in the SIGSYS handler.
    (libc::SYS_exit_group, Args::Any),
    // Sending a signal (tgkill, in each thread's list) takes the process and thread ids.
    (libc::SYS_getpid, Args::Any),
    (libc::SYS_gettid, Args::Any),
];

/// A vCPU thread: KVM_RUN and the exits it handles itself (port and MMIO writes reach the
/// serial console, i8042, boot timer and virtio-mmio transports, which write stdout and
/// eventfds). No reads, no opens, no sockets.
const VCPU: &[Allowed] = &[
    (
        libc::SYS_ioctl,
        Args::OneOf(
            1,
            &[
                KVM_RUN,
                // The registers of a guest that triple-faulted, for the report; the first
                // two parts of a saved state.
                KVM_GET_REGS,
                KVM_GET_SREGS,
                // A virtio transport whose activation failed raises its interrupt.
                KVM_IRQ_LINE,
                // Saving the state while paused: MP state (read first: it makes KVM take in
                // pending INIT/SIPI), XSAVE area (FPU, SSE, AVX) by whichever of the two
                // calls this KVM has, XCR0, debug registers, local APIC, TSC frequency,
                // CPUID, MSRs, pending events.
                KVM_GET_MP_STATE,
                KVM_GET_XSAVE,
                KVM_GET_XSAVE2,
                KVM_GET_XCRS,
                KVM_GET_DEBUGREGS,
                KVM_GET_LAPIC,
                KVM_GET_TSC_KHZ,
                KVM_GET_CPUID2,
                KVM_GET_MSRS,
                KVM_GET_VCPU_EVENTS,
            ],
        ),
    ),
    (libc::SYS_tgkill, ABORT_ONLY),
];

/// The VMM thread: the event-manager loop and the device work it drives (block, net,
/// vsock, console input, VM exits).
const VMM: &[Allowed] = &[
    // The event-manager loop.
    (libc::SYS_epoll_wait, Args::Any),
    (libc::SYS_epoll_ctl, Args::Any),
    // Eventfds, the vsock timerfd, stdin, TAP frames, vsock streams, block reads.
    (libc::SYS_read, Args::Any),
    // std's UnixStream reads and writes vsock streams with recv(2) and send(2)
    // (MSG_NOSIGNAL), which are recvfrom and sendto on x86_64.
    (libc::SYS_recvfrom, Args::Any),
    (libc::SYS_sendto, Args::Any),
    // Block requests seek, then read or write.
    (libc::SYS_lseek, Args::Any),
    // Block FLUSH with cache_type "Writeback".
    (libc::SYS_fdatasync, Args::Any),
    // Host clients connecting to the vsock socket.
    (libc::SYS_accept4, Args::Any),
    // Guest-initiated vsock connections to `<uds_path>_<port>`: Unix sockets only.
    (libc::SYS_socket, Args::OneOf(0, &[libc::AF_UNIX as u64])),
    (libc::SYS_connect, Args::Any),
    // vsock half-close when the guest stops sending.
    (libc::SYS_shutdown, Args::Any),
    (
        libc::SYS_ioctl,
        Args::OneOf(
            1,
            &[
                // std's set_nonblocking on accepted vsock streams.
                libc::FIONBIO,
                // Virtio interrupts.
                KVM_IRQ_LINE,
                // Saving the VM's state, vCPUs paused: the PICs and IOAPIC, the PIT, the
                // kvmclock.
                KVM_GET_IRQCHIP,
                KVM_GET_PIT2,
                KVM_GET_CLOCK,
                // Snapshot create with dirty page tracking: KVM's dirty log of each slot.
                KVM_GET_DIRTY_LOG,
            ],
        ),
    ),
    // The vsock timeout tick, armed and disarmed.
    (libc::SYS_timerfd_settime, Args::Any),
    // Pause and resume kick the vCPUs; abort() after a panic.
    (
        libc::SYS_tgkill,
        Args::OneOfAtRunTime(2, abort_or_vcpu_kick),
    ),
    // After boot, PATCH /drives opens the new backing file and reads its size (statx,
    // with fstat as std's fallback), and PUT /logger and PUT /metrics open (and may
    // create) their files for appending. Never with O_TRUNC: no file is emptied.
    // PUT /snapshot/create writes each file to a new temporary file next to it
    // (O_CREAT | O_EXCL, allowed by the openat line above), and, reading back a state
    // file, opens it read-only.
    (libc::SYS_openat, Args::NoneOf(2, libc::O_TRUNC as u64)),
    (libc::SYS_statx, Args::Any),
    (libc::SYS_fstat, Args::Any),
    // Snapshot create: each temporary file, then its directory, flushed to disk
    // (`snapshot::write_file_atomically`), so a renamed file survives a host crash.
    (libc::SYS_fsync, Args::Any),
    // Snapshot create: the flushed temporary file replaces the target path in one step
    // (glibc's rename(3) is the rename system call on x86_64).
    (libc::SYS_rename, Args::Any),
    // Snapshot create: a temporary file whose write failed (a full disk) is removed, and so
    // are those that writers that died left for the same target: found by listing the
    // directory (glibc's opendir checks the directory with fstat, which is newfstatat on
    // x86_64; readdir is getdents64), their writers looked up in /proc with statx.
    (libc::SYS_unlink, Args::Any),
    (libc::SYS_newfstatat, Args::Any),
    (libc::SYS_getdents64, Args::Any),
    // Diff snapshot create: the memory file gets its full size before the dirty pages are
    // written into it (the rest stays holes).
    (libc::SYS_ftruncate, Args::Any),
    // Snapshot create tags the memory file with its state file's checksum; snapshot load
    // reads the tag (`api::memfile::set_pair_tag`, `pair_tag`).
    (libc::SYS_fsetxattr, Args::Any),
    (libc::SYS_fgetxattr, Args::Any),
    // Snapshot load holds a shared lock on the memory file it maps (`api::memfile::lock`).
    (libc::SYS_flock, Args::Any),
];

/// The API thread (`rpc::server`): accepts clients on the bound API socket and serves each
/// connection on a thread of its own, which inherits this filter; requests go to the VMM
/// thread over a channel and an eventfd. The socket is bound before the filter goes on.
const API: &[Allowed] = &[
    // Clients connecting to the API socket.
    (libc::SYS_accept4, Args::Any),
    // Request bytes in and answers out: std's UnixStream uses recv(2) and send(2), which
    // are recvfrom and sendto on x86_64.
    (libc::SYS_recvfrom, Args::Any),
    (libc::SYS_sendto, Args::Any),
    // A new client taking the place of the connection that waited longest for its own
    // client (`rpc::connections`): that connection's socket is shut down.
    (libc::SYS_shutdown, Args::Any),
    // The deadline of a request and of its answer (set_read_timeout, set_write_timeout).
    (
        libc::SYS_setsockopt,
        Args::OneOf(2, &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64]),
    ),
    // A thread per connection: threads only (CLONE_THREAD), never a new process.
    (libc::SYS_clone, Args::AllOf(0, libc::CLONE_THREAD as u64)),
    // Listed only so that they do not trap: a filter stacked under this one fails both
    // with ENOSYS (see `api_soft_denials`). glibc then makes threads with clone; opening
    // a file fails.
    (libc::SYS_clone3, Args::Any),
    (libc::SYS_openat, Args::Any),
    // What glibc and std do in a new thread before running it: robust futex list, rseq
    // registration, the thread's name, and pthread_getattr_np (std's stack guard), which
    // reads the thread's CPU affinity.
    (libc::SYS_set_robust_list, Args::Any),
    (libc::SYS_rseq, Args::Any),
    (libc::SYS_prctl, Args::OneOf(0, &[libc::PR_SET_NAME as u64])),
    (libc::SYS_sched_getaffinity, Args::Any),
    (libc::SYS_tgkill, ABORT_ONLY),
];

/// Every system call `kind` may make: the common list, then its own.
pub(super) fn allowed(kind: ThreadKind) -> impl Iterator<Item = &'static Allowed> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Vmm => VMM,
        ThreadKind::Api => API,
    };
    COMMON.iter().chain(own)
}
