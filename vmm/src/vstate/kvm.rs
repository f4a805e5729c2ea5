//! Opening `/dev/kvm`, checking what Ember needs of it, and creating the VM with its
//! in-kernel interrupt controllers and PIT.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::vcpu::StateSupport;
use crate::arch::x86_64::cpuid::EmulatedFeatures;
use crate::arch::x86_64::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// The capabilities Ember cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::ImmediateExit, "immediate exit"),
];

/// Errors from KVM set-up.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}; check that KVM is enabled and that you may use /dev/kvm")]
    Open(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported; Ember needs version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability Ember needs: {0}")]
    MissingCap(&'static str),
    #[error("this host's KVM allows at most {max} vCPUs; the configuration asks for {asked}")]
    TooManyVcpus { asked: u8, max: usize },
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set KVM's TSS address: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("cannot set KVM's identity map address: {0}")]
    SetIdentityMap(kvm_ioctls::Error),
    #[error("cannot create the in-kernel irqchip: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("cannot read the CPUID KVM supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot read the list of MSRs KVM saves: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    #[error("cannot register guest memory slot {slot} with KVM: {source}")]
    SetMemoryRegion {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// An opened KVM with a created VM.
pub struct KvmVm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub supported_cpuid: CpuId,
    pub emulated: EmulatedFeatures,
    /// What KVM offers for vCPU snapshots, handed to each vCPU.
    pub state_support: StateSupport,
}

impl KvmVm {
    /// A second handle on the VM (a duplicated fd), for code that raises interrupt lines
    /// from another thread.
    pub fn duplicate_fd(&self) -> std::io::Result<VmFd> {
        use std::os::fd::AsRawFd;
        // SAFETY: F_DUPFD_CLOEXEC on the VM fd this struct owns; the result is a new fd.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh duplicate of a KVM VM fd, owned by the returned VmFd.
        unsafe { self.kvm.create_vmfd_from_rawfd(fd) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Opens KVM and checks its API version and capabilities.
pub fn open_kvm(vcpus: u8) -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(version));
    }
    if let Some((_, name)) = REQUIRED_CAPS
        .iter()
        .find(|(cap, _)| !kvm.check_extension(*cap))
    {
        return Err(KvmError::MissingCap(name));
    }
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(KvmError::TooManyVcpus { asked: vcpus, max });
    }
    Ok(kvm)
}

/// Creates the VM: TSS and identity map addresses, irqchip (PIC + IOAPIC), PIT.
pub fn create_vm(kvm: Kvm) -> Result<KvmVm, KvmError> {
    let fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
    fd.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(KvmError::SetTss)?;
    fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(KvmError::SetIdentityMap)?;
    fd.create_irq_chip().map_err(KvmError::CreateIrqchip)?;
    // The dummy speaker makes KVM answer port 0x61 itself.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(KvmError::CreatePit)?;
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::SupportedCpuid)?;
    let emulated = EmulatedFeatures {
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let state_support = StateSupport::probe(&kvm, &fd).map_err(KvmError::MsrIndexList)?;
    Ok(KvmVm {
        kvm,
        fd,
        supported_cpuid,
        emulated,
        state_support,
    })
}

impl KvmVm {
    /// Hands every guest memory region to KVM, one slot each (slot `n` is region `n`), with
    /// KVM's dirty page log on when `track_dirty`.
    pub fn register_memory(
        &self,
        mem: &GuestMemoryMmap,
        track_dirty: bool,
    ) -> Result<(), KvmError> {
        let flags = if track_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = mem.get_host_address(region.start_addr()).map_err(|_| {
                KvmError::SetMemoryRegion {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                }
            })?;
            let descriptor = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the caller keeps
            // alive for as long as the VM exists (the Vmm holds both), and regions never
            // overlap, so KVM may access exactly this host range.
            unsafe { self.fd.set_user_memory_region(descriptor) }
                .map_err(|source| KvmError::SetMemoryRegion { slot, source })?;
        }
        Ok(())
    }
}
