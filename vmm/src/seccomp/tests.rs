//! Filter tests. Installing a filter cannot be undone and a trap ends the process, so every
//! test that installs one runs in a child: this test binary run again with
//! `EMBER_SECCOMP_CHILD=<scenario>`, which only `child_process` acts on.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashSet;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::channel;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};
use vmm_sys_util::timerfd::TimerFd;

use super::*;
use crate::vstate::test_vm::TestVm;

const CHILD_ENV: &str = "EMBER_SECCOMP_CHILD";

#[test]
fn every_filter_compiles_for_x86_64() {
    for kind in ThreadKind::ALL {
        let program = compile(kind).unwrap_or_else(|e| panic!("{e}"));
        // Architecture check, the listed calls, the default trap: far more than a stub,
        // far less than the 4096 instructions the kernel accepts.
        assert!(program.len() > 20, "{kind}: {} instructions", program.len());
        assert!(
            program.len() < 1024,
            "{kind}: {} instructions",
            program.len()
        );
    }
}

#[test]
fn every_thread_may_yield_as_std_channels_do_under_contention() {
    // A contended mpsc send or receive backs off with sched_yield; forbidding it killed an
    // ember whose API thread met a busy channel.
    for kind in ThreadKind::ALL {
        assert!(
            filters::allowed(kind).any(|(nr, _)| *nr == libc::SYS_sched_yield),
            "{kind} may not call sched_yield"
        );
    }
}

#[test]
fn no_system_call_is_listed_twice_for_a_thread() {
    // A second entry would merge its conditions into the first and could narrow an `Any`.
    for kind in ThreadKind::ALL {
        let mut seen = HashSet::new();
        for (nr, _) in filters::allowed(kind) {
            assert!(
                seen.insert(*nr),
                "{kind}: {} listed twice",
                syscall_name(*nr as i32)
            );
        }
    }
}

#[test]
fn dangerous_calls_are_on_no_list() {
    let forbidden = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_open,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_kill,
    ];
    for kind in ThreadKind::ALL {
        let mut forbidden = forbidden.to_vec();
        if kind == ThreadKind::Vcpu {
            // The VMM thread opens files after boot (PATCH /drives); the API thread's
            // openat fails with ENOSYS (`api_threads_cannot_open_files`).
            forbidden.push(libc::SYS_openat);
        }
        if kind != ThreadKind::Api {
            // Only the API thread makes threads (one per connection).
            forbidden.extend([libc::SYS_clone, libc::SYS_clone3]);
        }
        for (nr, _) in filters::allowed(kind) {
            assert!(
                !forbidden.contains(nr),
                "{kind}: {}",
                syscall_name(*nr as i32)
            );
        }
    }
}

#[test]
fn the_kvm_run_request_number_is_the_kernels() {
    assert_eq!(filters::KVM_RUN, 0xae80);
    // _IOW(KVMIO, 0x61, struct kvm_irq_level), 8 bytes.
    assert_eq!(filters::KVM_IRQ_LINE, 0x4008_ae61);
}

#[test]
fn the_snapshot_request_numbers_are_the_kernels() {
    // From the kernel's <linux/kvm.h>, as the _IOR/_IOWR macros expand on x86_64.
    let expected = [
        (filters::KVM_GET_REGS, 0x8090_ae81_u64),
        (filters::KVM_GET_SREGS, 0x8138_ae83),
        (filters::KVM_GET_MP_STATE, 0x8004_ae98),
        (filters::KVM_GET_XSAVE, 0x9000_aea4),
        (filters::KVM_GET_XSAVE2, 0x9000_aecf),
        (filters::KVM_GET_XCRS, 0x8188_aea6),
        (filters::KVM_GET_DEBUGREGS, 0x8080_aea1),
        (filters::KVM_GET_LAPIC, 0x8400_ae8e),
        (filters::KVM_GET_TSC_KHZ, 0xaea3),
        (filters::KVM_GET_CPUID2, 0xc008_ae91),
        (filters::KVM_GET_MSRS, 0xc008_ae88),
        (filters::KVM_GET_VCPU_EVENTS, 0x8040_ae9f),
        (filters::KVM_GET_IRQCHIP, 0xc208_ae62),
        (filters::KVM_GET_PIT2, 0x8070_ae9f),
        (filters::KVM_GET_CLOCK, 0x8030_ae7c),
        (filters::KVM_GET_DIRTY_LOG, 0x4010_ae42),
    ];
    for (computed, kernel) in expected {
        assert_eq!(computed, kernel, "{computed:#x} is not {kernel:#x}");
    }
}

#[test]
fn a_paused_vcpu_thread_saves_its_state_under_its_filter() {
    let (code, stdout, stderr) = run_child("vcpu-save-state");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for line in [
        "vcpu thread status: Seccomp:\t2\n",
        "running vcpu refused: vCPU 1 is running; pause the VM before saving its state\n",
        "paused vcpu state saved and equal\n",
        "vcpu resumed and paused again\n",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}\n{stderr}");
    }
}

#[test]
fn the_vmm_thread_writes_snapshot_files_under_its_filter() {
    let (code, stdout, stderr) = run_child("vmm-write-snapshot-files");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("filtered thread status: Seccomp:\t2\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("snapshot files written"),
        "{stdout}\n{stderr}"
    );
}

/// What snapshot create does on the VMM thread: the memory file and the state file, each
/// written to a temporary file, fsynced, renamed over an older one (the directory fsynced);
/// a failed write, whose temporary file is removed; and the temporary file a writer that
/// died left, found in the directory listing, checked in /proc and removed.
/// What a writer of `vm.mem` that died left: pid_max is at most 2^22, no process has 2^23.
const STALE_TEMP_FILE: &str = ".vm.mem.8388608.0.tmp";

fn write_snapshot_files((dir, mem): (std::path::PathBuf, crate::vstate::memory::GuestMemoryMmap)) {
    use crate::snapshot::{load_state, save_state, write_file_atomically};
    let mem_path = dir.join("vm.mem");
    let stale = dir.join(STALE_TEMP_FILE);
    for _ in 0..2 {
        write_file_atomically(&mem_path, |f| crate::vstate::memory::dump(&mem, f)).unwrap();
        save_state(&dir.join("vm.state"), &7_u64, 16 << 20).unwrap();
    }
    let failed = write_file_atomically(&mem_path, |_| Err(std::io::Error::other("full")));
    assert!(failed.is_err());
    let loaded = load_state::<u64>(&dir.join("vm.state")).unwrap();
    loaded.open_memory_file(&mem_path).unwrap();
    assert!(!stale.exists(), "{} is still there", stale.display());
    println!("snapshot files written");
}

#[test]
fn the_vmm_thread_saves_the_vm_state_under_its_filter() {
    let (code, stdout, stderr) = run_child("vmm-save-vm-state");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("filtered thread status: Seccomp:\t2\n"),
        "{stdout}"
    );
    assert!(stdout.contains("vm state saved"), "{stdout}\n{stderr}");
}

/// Runs this test binary as a child acting out `scenario`: (exit code, stdout, stderr).
fn run_child(scenario: &str) -> (Option<i32>, String, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seccomp::tests::child_process"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that `scenario` ended with the seccomp exit code and a line naming `syscall`.
fn assert_trapped(scenario: &str, kind: &str, syscall: &str) {
    let (code, stdout, stderr) = run_child(scenario);
    let nr = (1..450).find(|&nr| syscall_name(nr) == syscall).unwrap();
    let line = format!(
        "ember: seccomp: the {kind} thread made the forbidden system call {syscall} ({nr}); \
         exiting with code 148\n"
    );
    assert_eq!(code, Some(EXIT_SECCOMP_VIOLATION), "{stdout}\n{stderr}");
    assert!(stderr.contains(&line), "no {line:?} in:\n{stderr}");
    assert!(!stdout.contains("RETURNED"), "{stdout}");
}

#[test]
fn the_vmm_thread_may_not_open_an_inet_socket() {
    assert_trapped("vmm-inet-socket", "VMM", "socket");
}

#[test]
fn the_vmm_thread_may_not_map_executable_memory() {
    assert_trapped("vmm-exec-mmap", "VMM", "mmap");
}

#[test]
fn the_vmm_thread_may_not_truncate_files() {
    assert_trapped("vmm-truncate", "VMM", "openat");
}

#[test]
fn a_vcpu_thread_may_not_open_files() {
    assert_trapped("vcpu-open", "vCPU", "openat");
}

#[test]
fn a_vcpu_thread_may_make_no_ioctl_but_its_kvm_ones() {
    assert_trapped("vcpu-fionbio", "vCPU", "ioctl");
}

#[test]
fn the_api_thread_may_make_threads_but_not_processes() {
    assert_trapped("api-fork", "API", "clone");
}

#[test]
fn api_threads_cannot_open_files() {
    let (code, stdout, stderr) = run_child("api-open");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("open failed with ENOSYS"), "{stdout}");
}

#[test]
fn the_api_thread_may_not_execute_programs() {
    assert_trapped("api-execve", "API", "execve");
}

#[test]
fn filtered_threads_work_and_show_seccomp_mode_2() {
    for scenario in ["vcpu-allowed", "vmm-allowed", "api-served"] {
        let (code, stdout, stderr) = run_child(scenario);
        assert_eq!(code, Some(0), "{scenario}:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("filtered thread status: Seccomp:\t2\n"),
            "{scenario}:\n{stdout}"
        );
        assert!(
            stdout.contains("filtered thread done"),
            "{scenario}:\n{stdout}"
        );
    }
}

#[test]
fn no_seccomp_installs_nothing() {
    let (code, stdout, stderr) = run_child("disabled");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("filtered thread status: Seccomp:\t0\n"),
        "{stdout}"
    );
}

/// The child's side; a no-op in the normal test run.
#[test]
fn child_process() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    install_sigsys_handler().unwrap();
    match scenario.as_str() {
        "vmm-inet-socket" => forbidden(ThreadKind::Vmm, || {
            // SAFETY: socket() takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }),
        "vmm-exec-mmap" => forbidden(ThreadKind::Vmm, || {
            // SAFETY: a fresh anonymous mapping that nothing uses.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        }),
        "vmm-truncate" => forbidden(ThreadKind::Vmm, || {
            let _ = std::fs::File::create(std::env::temp_dir().join("ember-seccomp-created"));
        }),
        "vcpu-open" => forbidden(ThreadKind::Vcpu, || {
            let _ = std::fs::File::open("/proc/self/status");
        }),
        "vcpu-fionbio" => forbidden(ThreadKind::Vcpu, || {
            let mut on: libc::c_int = 1;
            // SAFETY: FIONBIO reads one int from the pointer, which lives across the call.
            unsafe { libc::ioctl(libc::STDERR_FILENO, libc::FIONBIO, &mut on) };
        }),
        "api-execve" => forbidden(ThreadKind::Api, || {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argument and environment arrays that
            // outlive the call.
            unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
        }),
        "vcpu-allowed" => allowed(ThreadKind::Vcpu, eventfd(), vcpu_work),
        "vmm-allowed" => {
            extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
            register_signal_handler(SIGRTMIN(), ignore).unwrap();
            allowed(ThreadKind::Vmm, vmm_fds(), vmm_work);
        }
        "api-fork" => forbidden(ThreadKind::Api, || {
            // SAFETY: the child, if there were one, would only _exit.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
        }),
        "api-served" => serve_api_under_filter(),
        "vcpu-save-state" => save_state_on_a_filtered_vcpu_thread(),
        "vmm-save-vm-state" => allowed(ThreadKind::Vmm, TestVm::new(1), |test| {
            use crate::snapshot::Persist;
            let state = test.vm.save().unwrap();
            println!("vm state saved: {state:?}");
        }),
        "vmm-write-snapshot-files" => {
            let dir = scratch("snapshot-files");
            // Created here, unfiltered: the VMM thread never truncates a file.
            std::fs::write(dir.join(STALE_TEMP_FILE), b"left by a crash").unwrap();
            let mem = crate::vstate::memory::create_guest_memory(16, false).unwrap();
            allowed(ThreadKind::Vmm, (dir, mem), write_snapshot_files);
        }
        "api-open" => {
            install(ThreadKind::Api).unwrap();
            let err = std::fs::File::open("/proc/self/status").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOSYS));
            println!("open failed with ENOSYS");
        }
        "disabled" => {
            set_enabled(false);
            allowed(ThreadKind::Vcpu, (), |()| {
                // Unfiltered, so opening a file is fine.
                std::fs::File::open("/proc/self/status").unwrap();
            });
        }
        other => panic!("unknown scenario {other}"),
    }
    std::process::exit(0);
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// Installs `kind`'s filter on this thread and makes a call it forbids; never returns.
fn forbidden(kind: ThreadKind, call: impl FnOnce()) {
    install(kind).unwrap();
    call();
    println!("RETURNED: the forbidden call came back");
    std::process::exit(1);
}

/// Runs `work` on a new thread under `kind`'s filter, with `prepared` (the fds the real
/// thread would have been handed). Prints that thread's seccomp mode, read by this
/// unfiltered thread, and whether it finished; its exit is under the filter too.
fn allowed<T: Send + 'static>(kind: ThreadKind, prepared: T, work: fn(T)) {
    let (tid_tx, tid_rx) = channel();
    let (go_tx, go_rx) = channel::<()>();
    let thread = std::thread::spawn(move || {
        install(kind).unwrap();
        // SAFETY: gettid takes no arguments and cannot fail.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        go_rx.recv().unwrap();
        work(prepared);
        println!("filtered thread done");
    });
    let tid = tid_rx.recv().unwrap();
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let mode = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    println!("filtered thread status: {mode}");
    go_tx.send(()).unwrap();
    thread.join().unwrap();
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-seccomp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A vCPU thread besides KVM_RUN: eventfd writes (irqfds), stdout (the serial console),
/// allocation and locks; it drops its fds when it ends.
fn vcpu_work(evt: EventFd) {
    evt.write(1).unwrap();
    let shared = std::sync::Arc::new(std::sync::Mutex::new(vec![7u8; 8 << 20]));
    shared.lock().unwrap().extend_from_slice(&[1; 4096]);
    println!("vcpu work: {}", shared.lock().unwrap().len());
}

/// What the VMM thread was handed: an eventfd, the loop's epoll, a timerfd, a disk image,
/// the vsock listener and the path of the service socket behind it.
type VmmFds = (
    EventFd,
    Epoll,
    TimerFd,
    std::fs::File,
    UnixListener,
    PathBuf,
);

fn vmm_fds() -> VmmFds {
    let dir = scratch("vmm");
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("disk"))
        .unwrap();
    disk.set_len(1 << 20).unwrap();
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (
        evt,
        Epoll::new().unwrap(),
        TimerFd::new().unwrap(),
        disk,
        listener,
        path,
    )
}

/// The VMM thread's loop: epoll, eventfds, the timerfd, block I/O with a flush, and a
/// vsock-style Unix connection made, accepted, used and half-closed.
fn vmm_work((evt, epoll, mut timer, mut disk, listener, path): VmmFds) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let fd = evt.as_raw_fd();
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )
        .unwrap();
    evt.write(1).unwrap();
    let mut events = [EpollEvent::default(); 4];
    assert_eq!(epoll.wait(1000, &mut events).unwrap(), 1);
    assert_eq!(evt.read().unwrap(), 1);
    timer.reset(Duration::from_millis(10), None).unwrap();
    timer.clear().unwrap();
    disk.seek(SeekFrom::Start(4096)).unwrap();
    disk.write_all(&[9; 512]).unwrap();
    disk.sync_data().unwrap();
    disk.seek(SeekFrom::Start(4096)).unwrap();
    let mut sector = [0u8; 512];
    disk.read_exact(&mut sector).unwrap();
    assert_eq!(sector, [9; 512]);
    let mut client = UnixStream::connect(&path).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let mut line = [0u8; 11];
    server.read_exact(&mut line).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(client.read(&mut line).unwrap(), 0);
    // PATCH /drives: an existing file reopened and measured.
    let swapped = std::fs::File::open(path.with_file_name("disk")).unwrap();
    assert_eq!(swapped.metadata().unwrap().len(), 1 << 20);
    // Kicking a vCPU thread (here itself; the handler does nothing).
    // SAFETY: pthread_self is this live thread; the kick signal has a handler (the child
    // installed it before spawning this thread).
    let rc = unsafe { libc::pthread_kill(libc::pthread_self(), SIGRTMIN()) };
    assert_eq!(rc, 0);
}

/// The API thread's shape (`rpc::server`): under the API filter, an accept loop serves
/// each connection on a thread of its own (inheriting the filter) with the API's real HTTP
/// framing, forwarding each request over a channel and an eventfd, while this unfiltered
/// thread plays the VMM thread. (`rpc::server::spawn` itself installs the filter once
/// wired, so it cannot be started from a thread that already has one.)
fn serve_api_under_filter() {
    use api::http::{Connection, Response};
    use api::requests::{Fault, VersionInfo, VmmData};
    use std::io::{Read, Write};

    const CLIENTS: usize = 2;
    let path = scratch("api").join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (requests_tx, requests) = channel::<std::sync::mpsc::Sender<Result<VmmData, Fault>>>();
    let wake = std::sync::Arc::new(eventfd());
    std::thread::Builder::new()
        .name("ember_api".into())
        .spawn(move || {
            install(ThreadKind::Api).unwrap();
            for stream in listener.incoming().take(CLIENTS) {
                let (stream, requests_tx, wake) =
                    (stream.unwrap(), requests_tx.clone(), wake.clone());
                std::thread::Builder::new()
                    .name("ember_api_conn".into())
                    .spawn(move || {
                        stream
                            .set_read_timeout(Some(Duration::from_secs(60)))
                            .unwrap();
                        stream
                            .set_write_timeout(Some(Duration::from_secs(60)))
                            .unwrap();
                        let mut conn = Connection::new(stream);
                        let request = conn.read_request().unwrap();
                        assert_eq!(request.path, "/version");
                        let (reply, answer) = channel();
                        requests_tx.send(reply).unwrap();
                        wake.write(1).unwrap();
                        let response = match answer.recv().unwrap() {
                            Ok(data) => data.into_response(),
                            Err(fault) => Response::fault(400, &fault.0),
                        };
                        response.write_to(conn.stream(), true).unwrap();
                    })
                    .unwrap();
            }
            // Parked rather than ended, so that its seccomp mode can be read.
            std::thread::park();
        })
        .unwrap();
    for _ in 0..CLIENTS {
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .write_all(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let reply = requests.recv().unwrap();
        reply
            .send(Ok(VmmData::Version(VersionInfo {
                firecracker_version: "9.9.9".into(),
            })))
            .unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("9.9.9"), "{response}");
    }
    let api_thread = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|task| task.unwrap().path())
        .find(|task| std::fs::read_to_string(task.join("comm")).unwrap() == "ember_api\n")
        .unwrap();
    let status = std::fs::read_to_string(api_thread.join("status")).unwrap();
    let mode = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    println!("filtered thread status: {mode}");
    println!("filtered thread done");
}

/// The real vCPU thread (`Vcpu::start`, which installs the vCPU filter) of an application
/// processor that has not been started by the guest: KVM_RUN holds it in the kernel until a
/// kick, as a real AP waits for its startup IPI. Asked for its state while running it
/// refuses; paused, it saves, and the state matches what was saved before it started.
fn save_state_on_a_filtered_vcpu_thread() {
    use crate::snapshot::Persist;
    use crate::vstate::vcpu::{VcpuError, VcpuEvent};

    const WAIT: Duration = Duration::from_secs(30);
    let test = TestVm::new(2);
    let ap = test.boot_vcpus(2).pop().unwrap();
    let before = ap.save().unwrap();
    let handle = ap.start().unwrap();
    match handle.save_state(WAIT) {
        Err(e @ VcpuError::NotPaused(1)) => println!("running vcpu refused: {e}"),
        other => panic!("a running vCPU answered {other:?}"),
    }
    handle.send(VcpuEvent::Pause).unwrap();
    handle.wait_for(VcpuEvent::Pause, WAIT).unwrap();
    let vcpu_thread = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|task| task.unwrap().path())
        .find(|task| std::fs::read_to_string(task.join("comm")).unwrap() == "ember_vcpu1\n")
        .unwrap();
    let status = std::fs::read_to_string(vcpu_thread.join("status")).unwrap();
    let mode = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    println!("vcpu thread status: {mode}");
    let saved = handle.save_state(WAIT).unwrap();
    // Only the TSC moves while a vCPU exists.
    let without_tsc = |state: &crate::vstate::vcpu::VcpuState| {
        let mut state = state.clone();
        state.msrs.retain(|m| m.index != 0x10);
        state
    };
    assert_eq!(without_tsc(&saved), without_tsc(&before));
    println!("paused vcpu state saved and equal");
    handle.send(VcpuEvent::Resume).unwrap();
    handle.wait_for(VcpuEvent::Resume, WAIT).unwrap();
    handle.send(VcpuEvent::Pause).unwrap();
    handle.wait_for(VcpuEvent::Pause, WAIT).unwrap();
    println!("vcpu resumed and paused again");
}
