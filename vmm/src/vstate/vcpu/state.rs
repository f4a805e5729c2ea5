//! A vCPU's KVM state for snapshots: what is saved ([`VcpuState`]), how it is read from a
//! vCPU and written into a fresh one, and in which order.
//!
//! # What is saved
//!
//! CPUID, the TSC frequency, the MP state, general and special registers, the XSAVE area,
//! XCRs, debug registers, the local APIC, the MSRs chosen in [`super::msrs`], and the pending
//! events (exception, interrupt, NMI, interrupt shadow, SMM). The XSAVE area holds the x87
//! FPU, SSE and AVX state in the layout the `XSAVE` instruction defines; what `KVM_GET_FPU`
//! returns is a subset of its legacy region, so the FPU is saved through it and not twice.
//! (The area's header says which components hold state. `KVM_SET_FPU` writes the legacy
//! region without touching the header, so on a vCPU that never ran, what it wrote reads back
//! from the XSAVE area as the initial state, which is also what XRSTOR would load for the
//! guest, as it does for every component the header marks initial. Once a guest has run,
//! its own XSAVE keeps the header right.)
//!
//! CPUID is saved because the guest has already read it: a restored vCPU must keep offering
//! what the guest kernel configured itself for, and KVM checks XCR0, XSAVE components and
//! MSRs against it.
//!
//! # Save order
//!
//! The vCPU must be out of the guest (paused) and stay so. `KVM_GET_MP_STATE` goes first:
//! it makes KVM take in pending INIT/SIPI signals, which can change registers and the LAPIC,
//! so everything read after it agrees with it. The vCPU events go last: they hold what is
//! pending at the moment of reading (an NMI KVM queued while the other state was read
//! included). The TSC-deadline fix of [`super::msrs::keep_expired_deadline`] is applied to
//! the saved MSRs.
//!
//! # Restore order
//!
//! Into a vCPU just created by `KVM_CREATE_VCPU` that has never run, on a VM whose guest
//! memory is registered (restoring the paravirtual MSRs, kvmclock, steal time, async page
//! faults and PV EOI, makes KVM map the guest pages they point at):
//!
//! 1. CPUID, first: KVM checks XCR0, XSAVE components and MSR writes against it.
//! 2. TSC frequency, before the TSC MSR, so the saved TSC value is taken at the guest's rate.
//!    It is set only when the host's differs by more than 250 ppm (calibration noise), and
//!    only where KVM can scale the TSC; otherwise restoring fails with a message that says so.
//! 3. General registers, then special registers. `KVM_SET_SREGS` sets the APIC base (the
//!    xAPIC/x2APIC mode) and CR8 (the TPR), so it must precede the LAPIC; both clear pending
//!    exceptions, so both precede the events.
//! 4. XSAVE area, then XCRs, then debug registers.
//! 5. LAPIC, after the special registers (APIC base) and before the MSRs: KVM ignores a TSC
//!    deadline written while the LAPIC timer is not in TSC-deadline mode.
//! 6. MSRs, the TSC deadline last of all (see [`super::msrs::write`]).
//! 7. Events: the pending exception, interrupt and NMI and the interrupt shadow that the
//!    register writes cleared.
//! 8. MP state, last: a vCPU waiting for a startup IPI gets it as pending LAPIC work, which
//!    nothing after this point can clear.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::msrs::{self, SavedMsr};

/// Bytes of the XSAVE area every KVM moves: `struct kvm_xsave` without its extension.
pub const XSAVE_BASE_SIZE: usize = std::mem::size_of::<kvm_xsave>();
const XSAVE_WORD: usize = std::mem::size_of::<u32>();

/// TSC frequencies this close (parts per million) count as the same: hosts calibrate their
/// TSC at boot and land a few kHz apart.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Everything KVM holds about one vCPU, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index, which is also its KVM vCPU id and its APIC id.
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency in kHz; `None` where the saving host's KVM could not say.
    pub tsc_khz: Option<u32>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as `KVM_GET_XSAVE`/`KVM_GET_XSAVE2` return it, in 32-bit words: at
    /// least [`XSAVE_BASE_SIZE`] bytes, more on hosts with large state components (AMX).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<SavedMsr>,
    pub events: kvm_vcpu_events,
}

/// What this host's KVM offers for saving and restoring vCPU state; read once per VM.
#[derive(Debug, Clone)]
pub struct StateSupport {
    /// The MSRs a snapshot saves (see [`msrs::to_save`]), in the order KVM listed them.
    pub msrs: Arc<[u32]>,
    /// Bytes of the XSAVE area KVM moves: `KVM_CAP_XSAVE2`'s answer on the VM, or
    /// [`XSAVE_BASE_SIZE`] where KVM predates `KVM_GET_XSAVE2` (Linux 5.17).
    pub xsave_size: usize,
    /// `KVM_GET_XSAVE2` exists.
    pub xsave2: bool,
    /// KVM can run a vCPU at a TSC frequency other than the host's (`KVM_CAP_TSC_CONTROL`).
    pub tsc_scaling: bool,
}

impl StateSupport {
    /// Asks KVM (`/dev/kvm` and the VM) what it offers.
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Result<Self, kvm_ioctls::Error> {
        let listed = kvm.get_msr_index_list()?;
        let xsave2_size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(Self {
            msrs: msrs::to_save(listed.as_slice()).into(),
            xsave_size: xsave2_size.max(XSAVE_BASE_SIZE),
            xsave2: xsave2_size > 0,
            tsc_scaling: kvm.check_extension(Cap::TscControl),
        })
    }
}

/// Why a vCPU's state could not be saved or restored. Each names the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot read the {what} of vCPU {index}: {source}")]
    Get {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the {what} of vCPU {index}: {source}")]
    Set {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the MSR list of vCPU {index}: {reason}")]
    MsrList { index: u8, reason: String },
    #[error("KVM refused MSR {msr:#x} = {value:#x} of vCPU {index}; the snapshot was taken where the CPU or KVM offers an MSR or a value this host does not")]
    RefusedMsr { index: u8, msr: u32, value: u64 },
    #[error("the snapshot's CPUID of vCPU {index} has {entries} entries, more than KVM's limit of {KVM_MAX_CPUID_ENTRIES}; the snapshot state is damaged")]
    CpuidTooLarge { index: u8, entries: usize },
    #[error("the saved XSAVE area of vCPU {index} is {saved} bytes but this host's KVM moves {supported}; the snapshot was taken on a CPU with state components (such as AMX) that this one lacks")]
    XsaveTooLarge {
        index: u8,
        saved: usize,
        supported: usize,
    },
    #[error("the saved XSAVE area of vCPU {index} is {saved} bytes, less than the {XSAVE_BASE_SIZE} every XSAVE area has; the snapshot state is damaged")]
    XsaveTooSmall { index: u8, saved: usize },
    #[error("cannot read this host's TSC frequency for vCPU {index}: {source}")]
    HostTscFrequency { index: u8, source: std::io::Error },
    #[error("vCPU {index} was saved with a {saved_khz} kHz TSC; this host's runs at {host_khz} kHz and its KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL); restore on a host with the same TSC frequency")]
    NoTscScaling {
        index: u8,
        saved_khz: u32,
        host_khz: u32,
    },
    #[error("cannot set the TSC of vCPU {index} to the saved {saved_khz} kHz (this host runs at {host_khz} kHz): {source}")]
    SetTscFrequency {
        index: u8,
        saved_khz: u32,
        host_khz: u32,
        source: kvm_ioctls::Error,
    },
    #[error("the saved state of vCPU {saved} cannot be restored into vCPU {vcpu}")]
    WrongVcpu { saved: u8, vcpu: u8 },
    #[error("the snapshot holds the state of {saved} vCPUs but the VM has {vcpus}; the snapshot state is damaged")]
    VcpuCount { saved: usize, vcpus: usize },
    #[error("the snapshot's vCPU states are out of order: state {position} is that of vCPU {saved}; the snapshot state is damaged")]
    VcpuOrder { position: usize, saved: u8 },
}

/// Reads the state of the vCPU `fd`, which must be out of the guest (see the save order).
pub fn save(fd: &VcpuFd, index: u8, support: &StateSupport) -> Result<VcpuState, VcpuStateError> {
    let get = |what| {
        move |source| VcpuStateError::Get {
            index,
            what,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(get("MP state"))?;
    let regs = fd.get_regs().map_err(get("registers"))?;
    let sregs = fd.get_sregs().map_err(get("special registers"))?;
    let xsave = read_xsave(fd, support).map_err(get("XSAVE area"))?;
    let xcrs = fd.get_xcrs().map_err(get("XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(get("debug registers"))?;
    let lapic = fd.get_lapic().map_err(get("local APIC"))?;
    let tsc_khz = tsc_khz(fd).ok();
    let cpuid = read_cpuid(fd).map_err(get("CPUID"))?;
    let mut msrs = msrs::read(fd, index, &support.msrs)?;
    msrs::keep_expired_deadline(&mut msrs, &lapic);
    let events = fd.get_vcpu_events().map_err(get("pending events"))?;
    Ok(VcpuState {
        index,
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Writes `state` into the fresh vCPU `fd` (see the restore order).
pub fn restore(
    fd: &VcpuFd,
    index: u8,
    support: &StateSupport,
    state: &VcpuState,
) -> Result<(), VcpuStateError> {
    if state.index != index {
        return Err(VcpuStateError::WrongVcpu {
            saved: state.index,
            vcpu: index,
        });
    }
    let set = |what| {
        move |source| VcpuStateError::Set {
            index,
            what,
            source,
        }
    };
    // Checked before anything is written, so a state from an incompatible host fails first.
    let xsave = xsave_for_kvm(index, support, &state.xsave)?;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::CpuidTooLarge {
        index,
        entries: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
    if let Some(saved_khz) = state.tsc_khz {
        restore_tsc_khz(fd, index, support, saved_khz)?;
    }
    fd.set_regs(&state.regs).map_err(set("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(set("special registers"))?;
    // SAFETY: `xsave` holds `support.xsave_size` bytes, which is what KVM_SET_XSAVE reads on
    // this VM (KVM_CAP_XSAVE2's answer, or the plain struct where KVM predates it).
    unsafe { fd.set_xsave2(&xsave) }.map_err(set("XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(set("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(set("local APIC"))?;
    msrs::write(fd, index, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(set("pending events"))?;
    fd.set_mp_state(state.mp_state).map_err(set("MP state"))?;
    Ok(())
}

/// Checks that `states` are those of vCPUs `0..vcpus`, in order.
pub fn check_vcpu_states(states: &[VcpuState], vcpus: usize) -> Result<(), VcpuStateError> {
    if states.len() != vcpus {
        return Err(VcpuStateError::VcpuCount {
            saved: states.len(),
            vcpus,
        });
    }
    match states
        .iter()
        .enumerate()
        .find(|(position, state)| usize::from(state.index) != *position)
    {
        Some((position, state)) => Err(VcpuStateError::VcpuOrder {
            position,
            saved: state.index,
        }),
        None => Ok(()),
    }
}

/// The XSAVE area in 32-bit words, with `KVM_GET_XSAVE2` where KVM has it.
pub(super) fn read_xsave(
    fd: &VcpuFd,
    support: &StateSupport,
) -> Result<Vec<u32>, kvm_ioctls::Error> {
    if !support.xsave2 {
        return Ok(fd.get_xsave()?.region.to_vec());
    }
    let mut xsave = new_xsave(support)?;
    // SAFETY: `new_xsave` sized the buffer to KVM_CAP_XSAVE2's answer for this VM, which is
    // what KVM_GET_XSAVE2 writes; Ember enables no dynamic XSAVE features that could grow it.
    unsafe { fd.get_xsave2(&mut xsave) }?;
    let region = &xsave.as_fam_struct_ref().xsave.region;
    Ok(region.iter().chain(xsave.as_slice()).copied().collect())
}

/// A zeroed XSAVE buffer of `support.xsave_size` bytes.
fn new_xsave(support: &StateSupport) -> Result<Xsave, kvm_ioctls::Error> {
    let extra_words = (support.xsave_size - XSAVE_BASE_SIZE).div_ceil(XSAVE_WORD);
    Xsave::new(extra_words).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))
}

/// The saved XSAVE words in a buffer of the size this host's KVM reads, zero-padded: a
/// state component past the end of a shorter area is absent from its XSAVE header, so
/// zeros there are never read.
pub(super) fn xsave_for_kvm(
    index: u8,
    support: &StateSupport,
    saved: &[u32],
) -> Result<Xsave, VcpuStateError> {
    let saved_bytes = saved.len() * XSAVE_WORD;
    if saved_bytes < XSAVE_BASE_SIZE {
        return Err(VcpuStateError::XsaveTooSmall {
            index,
            saved: saved_bytes,
        });
    }
    if saved_bytes > support.xsave_size {
        return Err(VcpuStateError::XsaveTooLarge {
            index,
            saved: saved_bytes,
            supported: support.xsave_size,
        });
    }
    let mut xsave = new_xsave(support).map_err(|source| VcpuStateError::Set {
        index,
        what: "XSAVE area",
        source,
    })?;
    let (region, extra) = saved.split_at(XSAVE_BASE_SIZE / XSAVE_WORD);
    // SAFETY: only the fixed region is written through the FAM struct; its length is untouched.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    Ok(xsave)
}

/// The vCPU's CPUID without the unused zero entries KVM may leave after the real ones.
fn read_cpuid(fd: &VcpuFd) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?;
    Ok(cpuid
        .as_slice()
        .iter()
        .filter(|e| **e != kvm_cpuid_entry2::default())
        .copied()
        .collect())
}

/// `KVM_GET_TSC_KHZ`. kvm-ioctls reports its failure with the return value (-1) in place of
/// errno, so the errno is taken here, before any other call can change it.
fn tsc_khz(fd: &VcpuFd) -> Result<u32, std::io::Error> {
    fd.get_tsc_khz()
        .map_err(|_| std::io::Error::last_os_error())
}

/// Sets the saved TSC frequency when this host's differs from it by more than the tolerance.
fn restore_tsc_khz(
    fd: &VcpuFd,
    index: u8,
    support: &StateSupport,
    saved_khz: u32,
) -> Result<(), VcpuStateError> {
    let host_khz =
        tsc_khz(fd).map_err(|source| VcpuStateError::HostTscFrequency { index, source })?;
    if same_tsc_frequency(saved_khz, host_khz) {
        return Ok(());
    }
    if !support.tsc_scaling {
        return Err(VcpuStateError::NoTscScaling {
            index,
            saved_khz,
            host_khz,
        });
    }
    fd.set_tsc_khz(saved_khz)
        .map_err(|source| VcpuStateError::SetTscFrequency {
            index,
            saved_khz,
            host_khz,
            source,
        })
}

/// Whether two TSC frequencies are within 250 ppm of each other (calibration noise).
pub fn same_tsc_frequency(saved_khz: u32, host_khz: u32) -> bool {
    let difference = u64::from(saved_khz.abs_diff(host_khz));
    difference * 1_000_000 <= u64::from(saved_khz) * TSC_KHZ_TOLERANCE_PPM
}
