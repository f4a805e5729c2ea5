//! vCPUs: boot-time register set-up and the thread that runs each one, dispatching port
//! and MMIO exits straight to the buses and reporting why it stopped. A running vCPU is
//! driven through its [`VcpuHandle`]: pause, resume and save-state requests are sent on a
//! channel and the thread is kicked out of `KVM_RUN` with a signal whose handler sets
//! `immediate_exit`, so a request that arrives just before the thread enters the guest is
//! not missed.
//!
//! Snapshots ([`state`]): a vCPU's fd lives on its thread once started, so a started vCPU's
//! state is read there, on request, while it is paused ([`VcpuHandle::save_state`]).
//! Restoring is done before the thread exists: a fresh [`Vcpu`] gets the saved state through
//! [`Persist::restore`] and is then started as usual. That keeps restore off the filtered
//! thread (its seccomp filter needs none of the set ioctls) and means a restored vCPU
//! never runs with half its state.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::kvm::KvmVm;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::Bus;
use crate::metrics::VcpuExitCounters;
use crate::snapshot::Persist;

pub mod msrs;
pub mod state;

pub use state::{check_vcpu_states, StateSupport, VcpuState, VcpuStateError};

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("cannot build the CPUID of vCPU {0}: {1:?}")]
    BuildCpuid(u8, vmm_sys_util::fam::Error),
    #[error("cannot set the CPUID of vCPU {0}: {1}")]
    SetCpuid(u8, kvm_ioctls::Error),
    #[error("cannot build the MSR list of vCPU {0}: {1:?}")]
    BuildMsrs(u8, vmm_sys_util::fam::Error),
    #[error("cannot set the MSRs of vCPU {0}: {1}")]
    SetMsrs(u8, kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {index}")]
    PartialMsrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("cannot set the registers of vCPU {0}: {1}")]
    SetRegs(u8, kvm_ioctls::Error),
    #[error("cannot set the local APIC of vCPU {0}: {1}")]
    SetLapic(u8, kvm_ioctls::Error),
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("cannot kick vCPU {0} out of the guest: {1}")]
    Kick(u8, vmm_sys_util::errno::Error),
    #[error("vCPU {0} has stopped; it cannot be paused or resumed")]
    Gone(u8),
    #[error("vCPU {0} did not answer a {1} request within {2:?}")]
    NoAnswer(u8, &'static str, Duration),
    #[error("vCPU {0} is running; pause the VM before saving its state")]
    NotPaused(u8),
    #[error(transparent)]
    State(#[from] VcpuStateError),
}

/// What the VMM asks of a running vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Read the vCPU's state; answered only by a paused vCPU (a running one answers
    /// [`VcpuError::NotPaused`]). See [`VcpuHandle::save_state`].
    SaveState,
}

impl VcpuEvent {
    fn name(self) -> &'static str {
        match self {
            VcpuEvent::Pause => "pause",
            VcpuEvent::Resume => "resume",
            VcpuEvent::SaveState => "save-state",
        }
    }
}

/// What a vCPU thread answers.
enum VcpuAnswer {
    Paused,
    Resumed,
    State(Box<Result<VcpuState, VcpuError>>),
}

impl VcpuAnswer {
    fn answers(&self, event: VcpuEvent) -> bool {
        matches!(
            (self, event),
            (VcpuAnswer::Paused, VcpuEvent::Pause)
                | (VcpuAnswer::Resumed, VcpuEvent::Resume)
                | (VcpuAnswer::State(_), VcpuEvent::SaveState)
        )
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU run structure, for the kick signal handler; null on other threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
        // while its VcpuFd (which owns the mapping) is alive and cleared before it drops.
        // A signal handler on the same thread cannot race with it.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result =
            register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::KickHandler);
    });
    result
}

/// The VMM's side of a running vCPU.
pub struct VcpuHandle {
    index: u8,
    events: Sender<VcpuEvent>,
    answers: Receiver<VcpuAnswer>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Sends `event` and kicks the vCPU out of the guest so it sees it at once.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.index))?;
        self.thread
            .kill(kick_signal())
            .map_err(|e| VcpuError::Kick(self.index, e))
    }

    /// Waits until the vCPU has carried out `event`. For [`VcpuEvent::SaveState`] the state
    /// is dropped: [`VcpuHandle::save_state`] is the call that returns it.
    pub fn wait_for(&self, event: VcpuEvent, timeout: Duration) -> Result<(), VcpuError> {
        self.answer_to(event, timeout).map(drop)
    }

    /// The state of this vCPU, which must be paused (see [`state`] for what is saved).
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuError> {
        // A state that came too late for an earlier, timed-out request is stale.
        while self.answers.try_recv().is_ok() {}
        self.send(VcpuEvent::SaveState)?;
        match self.answer_to(VcpuEvent::SaveState, timeout)? {
            VcpuAnswer::State(state) => *state,
            // answer_to returns only answers to the event asked.
            VcpuAnswer::Paused | VcpuAnswer::Resumed => Err(VcpuError::Gone(self.index)),
        }
    }

    /// The next answer to `event`; answers to earlier requests are passed over.
    fn answer_to(&self, event: VcpuEvent, timeout: Duration) -> Result<VcpuAnswer, VcpuError> {
        loop {
            match self.answers.recv_timeout(timeout) {
                Ok(answer) if answer.answers(event) => return Ok(answer),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::NoAnswer(self.index, event.name(), timeout))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.index)),
            }
        }
    }
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked to reset or power off (KVM system event).
    Reset,
    /// The guest triple-faulted, which is also how some kernels reboot; the string holds
    /// the vCPU's registers at that moment, for diagnosis.
    TripleFault(String),
    /// Running the guest failed; the message says how.
    Failed(String),
}

/// Port I/O and MMIO address spaces, shared by all vCPU threads.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// A vCPU and what it needs to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    buses: Arc<Buses>,
    stopped: Sender<(u8, VcpuStop)>,
    stopped_evt: EventFd,
    exits: Arc<VcpuExitCounters>,
    /// What KVM offers for saving and restoring this vCPU's state.
    support: StateSupport,
    /// The last exit was port or MMIO I/O, whose instruction KVM finishes only on the next
    /// `KVM_RUN` (see [`Vcpu::complete_pending_exit`]).
    exit_pending: bool,
}

impl Vcpu {
    /// Creates vCPU `index`; its stop is reported on `stopped` and signalled on `stopped_evt`.
    pub fn new(
        vm: &KvmVm,
        index: u8,
        buses: Arc<Buses>,
        stopped: Sender<(u8, VcpuStop)>,
        stopped_evt: EventFd,
        exits: Arc<VcpuExitCounters>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Self {
            exit_pending: false,
            index,
            fd,
            buses,
            stopped,
            stopped_evt,
            exits,
            support: vm.state_support.clone(),
        })
    }

    /// This vCPU's index (its KVM vCPU id and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC wiring for a 64-bit Linux entry.
    pub fn configure(&self, vm: &KvmVm, entry: GuestAddress, count: u8) -> Result<(), VcpuError> {
        let i = self.index;
        let cpuid = cpuid::vcpu_cpuid(&vm.supported_cpuid, i, count, vm.emulated)
            .map_err(|e| VcpuError::BuildCpuid(i, e))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::SetCpuid(i, e))?;
        let msrs = msr::boot_msrs().map_err(|e| VcpuError::BuildMsrs(i, e))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::SetMsrs(i, e))?;
        let wanted = msrs.as_slice().len();
        if set != wanted {
            return Err(VcpuError::PartialMsrs {
                index: i,
                set,
                wanted,
            });
        }
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(|e| VcpuError::SetRegs(i, e))?;
        let sregs = self.fd.get_sregs().map_err(|e| VcpuError::SetRegs(i, e))?;
        self.fd
            .set_sregs(&regs::boot_sregs(sregs))
            .map_err(|e| VcpuError::SetRegs(i, e))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|e| VcpuError::SetRegs(i, e))?;
        let mut lapic = self.fd.get_lapic().map_err(|e| VcpuError::SetLapic(i, e))?;
        regs::wire_lapic_lints(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::SetLapic(i, e))?;
        Ok(())
    }

    /// Runs the vCPU on its own thread until the guest stops it or running fails.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        self.spawn(None)
    }

    /// Starts the vCPU's thread parked, as if paused before its first `KVM_RUN` (a restored
    /// VM that is not to resume yet): the pause request is queued before the thread exists,
    /// so the guest never runs until [`VcpuEvent::Resume`]. Wait for its
    /// [`VcpuEvent::Pause`] answer to know it is parked.
    pub fn start_paused(self) -> Result<VcpuHandle, VcpuError> {
        self.spawn(Some(VcpuEvent::Pause))
    }

    fn spawn(mut self, first: Option<VcpuEvent>) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let (events_tx, events) = channel();
        if let Some(event) = first {
            // The receiver is alive: it is moved into the thread below.
            let _ = events_tx.send(event);
        }
        let (answers, answers_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            .spawn(move || {
                // Before the first KVM_RUN: from then on the guest drives this thread.
                let stop = match crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    Ok(()) => {
                        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run()));
                        self.run(&events, &answers)
                    }
                    Err(e) => VcpuStop::Failed(e.to_string()),
                };
                KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
                // The VMM loop may already be gone when several vCPUs stop at once.
                let _ = self.stopped.send((self.index, stop));
                let _ = self.stopped_evt.write(1);
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            events: events_tx,
            answers: answers_rx,
            thread,
        })
    }

    fn run(&mut self, events: &Receiver<VcpuEvent>, answers: &Sender<VcpuAnswer>) -> VcpuStop {
        loop {
            // Cleared before looking at requests: a kick that lands after this point sets
            // it again, so a request sent just now stops the next KVM_RUN at once.
            self.fd.set_kvm_immediate_exit(0);
            match events.try_recv() {
                Ok(VcpuEvent::Pause) => {
                    if let Some(stop) = self.complete_pending_exit() {
                        return stop;
                    }
                    if let Some(stop) = self.park(events, answers) {
                        return stop;
                    }
                    continue;
                }
                Ok(VcpuEvent::Resume) => {
                    let _ = answers.send(VcpuAnswer::Resumed);
                }
                Ok(VcpuEvent::SaveState) => {
                    let refused = Err(VcpuError::NotPaused(self.index));
                    let _ = answers.send(VcpuAnswer::State(Box::new(refused)));
                }
                // Without a VMM to pause it the vCPU just runs on.
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            if let Some(stop) = self.run_once() {
                return stop;
            }
        }
    }

    /// Paused: out of the guest until a resume request; `Some` if the VMM went away.
    fn park(
        &mut self,
        events: &Receiver<VcpuEvent>,
        answers: &Sender<VcpuAnswer>,
    ) -> Option<VcpuStop> {
        let _ = answers.send(VcpuAnswer::Paused);
        loop {
            match events.recv() {
                Ok(VcpuEvent::Resume) => {
                    let _ = answers.send(VcpuAnswer::Resumed);
                    return None;
                }
                Ok(VcpuEvent::Pause) => {
                    let _ = answers.send(VcpuAnswer::Paused);
                }
                Ok(VcpuEvent::SaveState) => {
                    let state = self.save().map_err(VcpuError::from);
                    let _ = answers.send(VcpuAnswer::State(Box::new(state)));
                }
                Err(_) => return Some(VcpuStop::Failed("the VMM stopped while paused".into())),
            }
        }
    }

    /// Registers worth knowing when a guest dies: where it was and what it was touching.
    fn describe_state(&self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            // KVM on AMD (SVM) puts a vCPU through INIT when the guest shuts down, before it
            // reports the exit: what it holds then is the reset state, not where it failed.
            (Ok(r), Ok(s)) if r.rip == RESET_RIP && s.cs.base == RESET_CS_BASE => {
                "its registers are unknown: KVM reset the vCPU at the shutdown, as it does on \
                 AMD (the guest console may tell where it failed)"
                    .into()
            }
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Lets KVM finish the instruction of the last I/O exit without running the guest any
    /// further. KVM completes a port or MMIO access (advancing the instruction pointer, or
    /// storing an IN or MMIO read's value in its register) only when `KVM_RUN` is entered
    /// again, and keeps that pending step where no state read can see it: a vCPU paused right
    /// after such an exit and saved would, once restored, run the access a second time or
    /// lose its value. With `immediate_exit` set, `KVM_RUN` finishes the step and returns
    /// EINTR before entering the guest; an MMIO access split in parts first exits again for
    /// its next part, which is served like any other.
    fn complete_pending_exit(&mut self) -> Option<VcpuStop> {
        // Far more rounds than an access has parts.
        for _ in 0..16 {
            if !self.exit_pending {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            self.fd.set_kvm_immediate_exit(1);
            if let Some(stop) = self.run_once() {
                return Some(stop);
            }
        }
        // KVM kept exiting for I/O with immediate_exit set: parked now, the vCPU's saved
        // state would hold a half-done access, so it stops rather than pretend to pause.
        Some(VcpuStop::Failed(
            "KVM did not finish the vCPU's last I/O access within 16 entries while pausing".into(),
        ))
    }

    /// One KVM_RUN and the handling of its exit; `Some` when the vCPU must stop.
    fn run_once(&mut self) -> Option<VcpuStop> {
        let buses = &self.buses;
        let result = self.fd.run();
        self.exits.count(&result);
        self.exit_pending = matches!(
            result,
            Ok(VcpuExit::IoOut(..)
                | VcpuExit::IoIn(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // Nothing at that port: the bus floats high, as on real hardware.
                if !buses.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !buses.mmio.read(addr, data) {
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VcpuStop::TripleFault(self.describe_state())),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Some(VcpuStop::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    Some(VcpuStop::Failed("the guest reported a crash".into()))
                }
                other => Some(VcpuStop::Failed(format!(
                    "unknown KVM system event {other}"
                ))),
            },
            Ok(VcpuExit::Hlt) => Some(VcpuStop::Failed(
                "the guest halted with interrupts off".into(),
            )),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VcpuStop::Failed(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => Some(VcpuStop::Failed(
                "KVM internal error: the host could not emulate a guest instruction".into(),
            )),
            Ok(other) => Some(VcpuStop::Failed(format!("unexpected KVM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuStop::Failed(format!("KVM_RUN failed: {e}"))),
        }
    }
}

/// A vCPU's KVM state. `save` reads it from a vCPU that is not running: one not started
/// yet, or, through [`VcpuHandle::save_state`], a paused one on its own thread. `restore`
/// takes a fresh vCPU, just made by [`Vcpu::new`] on the VM it is restored into (with guest
/// memory registered, and not configured for boot), and returns it with the saved state,
/// ready for [`Vcpu::start`].
/// Where a vCPU fresh from RESET or INIT starts: CS base 0xffff0000, RIP 0xfff0.
const RESET_RIP: u64 = 0xfff0;
const RESET_CS_BASE: u64 = 0xffff_0000;

impl Persist for Vcpu {
    type State = VcpuState;
    type Args = Vcpu;
    type Error = VcpuStateError;

    fn save(&self) -> Result<VcpuState, VcpuStateError> {
        state::save(&self.fd, self.index, &self.support)
    }

    fn restore(vcpu: Vcpu, state: &VcpuState) -> Result<Vcpu, VcpuStateError> {
        state::restore(&vcpu.fd, vcpu.index, &vcpu.support, state)?;
        Ok(vcpu)
    }
}

#[cfg(test)]
mod tests;
