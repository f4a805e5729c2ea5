//! Which MSRs a vCPU snapshot carries, reading them from a vCPU and writing them back in an
//! order KVM accepts.
//!
//! The candidates are what `KVM_GET_MSR_INDEX_LIST` reports, the MSRs KVM itself considers
//! guest state to migrate, plus the MTRRs (see [`ALSO_SAVED`]). Two kinds are dropped by
//! [`to_save`] because they are not state of an Ember guest (see [`NOT_SAVED`]). Of the
//! rest, KVM refuses to read some on a given vCPU, for instance PMU counters when the vCPU's
//! CPUID offers no PMU, or variable MTRRs past the count KVM emulates: such an MSR does not
//! exist for that vCPU and holds no state, so [`read`] skips it instead of failing.

use std::ops::RangeInclusive;

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::state::VcpuStateError;

/// The time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// The local APIC timer's deadline in TSC-deadline mode.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSR ranges KVM lists that a snapshot leaves out, and why.
pub const NOT_SAVED: &[(RangeInclusive<u32>, &str)] = &[
    (
        0x480..=0x491,
        "VMX capability MSRs: read-only descriptions of nested VMX, which Ember does not offer",
    ),
    (
        0x4000_0000..=0x4000_00ff,
        "Hyper-V synthetic MSRs: Ember offers the guest no Hyper-V interface",
    ),
];

/// MSRs saved although KVM does not list them: the MTRRs, which KVM emulates but leaves
/// out of `KVM_GET_MSR_INDEX_LIST`. Ember enables them at boot (the default type, see
/// `arch::x86_64::msr`) and the guest may program ranges; without them a restored guest
/// would read its MTRRs as disabled.
pub const ALSO_SAVED: &[RangeInclusive<u32>] = &[
    // IA32_MTRR_PHYSBASE0/PHYSMASK0 to PHYSBASE7/PHYSMASK7.
    0x200..=0x20f,
    // IA32_MTRR_FIX64K_00000.
    0x250..=0x250,
    // IA32_MTRR_FIX16K_80000 and _A0000.
    0x258..=0x259,
    // IA32_MTRR_FIX4K_C0000 to _F8000.
    0x268..=0x26f,
    // IA32_MTRR_DEF_TYPE.
    0x2ff..=0x2ff,
];

/// One saved MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMsr {
    pub index: u32,
    pub value: u64,
}

/// The MSRs worth saving out of what KVM lists, in KVM's order, then [`ALSO_SAVED`].
pub fn to_save(listed: &[u32]) -> Vec<u32> {
    let also = ALSO_SAVED
        .iter()
        .flat_map(|range| range.clone())
        .filter(|msr| !listed.contains(msr));
    listed
        .iter()
        .copied()
        .filter(|msr| !NOT_SAVED.iter().any(|(range, _)| range.contains(msr)))
        .chain(also)
        .collect()
}

/// Reads `wanted` from the vCPU, skipping the MSRs KVM will not read on this vCPU.
///
/// `KVM_GET_MSRS` reads entries in order and stops at the first it refuses, returning how
/// many it read; the entry it stopped at is skipped and reading goes on after it.
pub fn read(fd: &VcpuFd, index: u8, wanted: &[u32]) -> Result<Vec<SavedMsr>, VcpuStateError> {
    let mut saved = Vec::with_capacity(wanted.len());
    let mut rest = wanted;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = msr_entries(index, chunk.iter().map(|&msr| (msr, 0)))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Get {
                index,
                what: "MSRs",
                source,
            })?;
        let read = read.min(chunk.len());
        saved.extend(msrs.as_slice()[..read].iter().map(|e| SavedMsr {
            index: e.index,
            value: e.data,
        }));
        // The entry KVM stopped at, if any, does not exist on this vCPU.
        let skip = usize::from(read < chunk.len());
        rest = &rest[read + skip..];
    }
    Ok(saved)
}

/// Writes the saved MSRs back. The TSC deadline goes last, in a call of its own: KVM
/// compares it with the guest's TSC, and ignores it unless the local APIC is in TSC-deadline
/// mode, so it must follow both the TSC and the LAPIC (which the caller restores first).
pub fn write(fd: &VcpuFd, index: u8, saved: &[SavedMsr]) -> Result<(), VcpuStateError> {
    let (deferred, first): (Vec<SavedMsr>, Vec<SavedMsr>) = saved
        .iter()
        .partition(|msr| msr.index == MSR_IA32_TSC_DEADLINE);
    for group in [first, deferred] {
        for chunk in group.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = msr_entries(index, chunk.iter().map(|m| (m.index, m.value)))?;
            let written = fd.set_msrs(&msrs).map_err(|source| VcpuStateError::Set {
                index,
                what: "MSRs",
                source,
            })?;
            if let Some(refused) = chunk.get(written) {
                return Err(VcpuStateError::RefusedMsr {
                    index,
                    msr: refused.index,
                    value: refused.value,
                });
            }
        }
    }
    Ok(())
}

/// The FAM structure KVM takes, from (index, value) pairs; at most `KVM_MAX_MSR_ENTRIES`.
fn msr_entries(
    index: u8,
    entries: impl Iterator<Item = (u32, u64)>,
) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = entries
        .map(|(msr, data)| kvm_msr_entry {
            index: msr,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| VcpuStateError::MsrList {
        index,
        reason: format!("{e:?}"),
    })
}

const APIC_LVTT: usize = 0x320;
const LVT_MASKED: u32 = 1 << 16;
const LVTT_MODE_SHIFT: u32 = 17;
const LVTT_MODE_TSC_DEADLINE: u32 = 0b10;

/// Keeps a TSC-deadline timer interrupt that KVM's state would lose.
///
/// When the deadline passes while the vCPU is out of the guest (and a paused vCPU is out of
/// the guest for the whole pause), KVM clears the deadline MSR and counts the interrupt as
/// pending, to inject it at the next entry. That count is in no state KVM reports: restored
/// as it is, the timer would read as disarmed and the guest would wait for a tick that never
/// comes. So a zero deadline on an unmasked timer in TSC-deadline mode is saved as the
/// current TSC, which makes the timer fire as soon as the vCPU runs again. A guest that
/// disarmed the timer itself masks it (Linux does), so it is left alone.
pub fn keep_expired_deadline(msrs: &mut [SavedMsr], lapic: &kvm_lapic_state) {
    let lvtt = lapic_register(lapic, APIC_LVTT);
    let tsc_deadline_mode = (lvtt >> LVTT_MODE_SHIFT) & 0b11 == LVTT_MODE_TSC_DEADLINE;
    if !tsc_deadline_mode || lvtt & LVT_MASKED != 0 {
        return;
    }
    let Some(tsc) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.value)
    else {
        return;
    };
    for msr in msrs
        .iter_mut()
        .filter(|m| m.index == MSR_IA32_TSC_DEADLINE && m.value == 0)
    {
        msr.value = tsc;
    }
}

/// A 32-bit local APIC register at byte `offset` of KVM's APIC page.
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let byte = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = byte as _;
        }
    }

    fn msrs(tsc: u64, deadline: u64) -> Vec<SavedMsr> {
        vec![
            SavedMsr {
                index: MSR_IA32_TSC,
                value: tsc,
            },
            SavedMsr {
                index: MSR_IA32_TSC_DEADLINE,
                value: deadline,
            },
        ]
    }

    #[test]
    fn vmx_and_hyperv_msrs_are_left_out_the_order_kept_and_mtrrs_added() {
        let listed = [0x10, 0x480, 0x491, 0x492, 0x4000_0001, 0x4b56_4d01, 0x2ff];
        let saved = to_save(&listed);
        assert_eq!(saved[..4], [0x10, 0x492, 0x4b56_4d01, 0x2ff]);
        // Then the MTRRs KVM did not list, each once.
        assert_eq!(saved[4..6], [0x200, 0x201]);
        assert_eq!(saved[saved.len() - 1], 0x26f);
        assert_eq!(saved.iter().filter(|&&msr| msr == 0x2ff).count(), 1);
        assert_eq!(saved.len(), 4 + 16 + 1 + 2 + 8);
    }

    #[test]
    fn an_expired_deadline_on_an_armed_tsc_deadline_timer_fires_after_restore() {
        let mut lapic = kvm_lapic_state::default();
        set_register(&mut lapic, APIC_LVTT, (LVTT_MODE_TSC_DEADLINE << 17) | 0xec);
        let mut saved = msrs(5000, 0);
        keep_expired_deadline(&mut saved, &lapic);
        assert_eq!(saved, msrs(5000, 5000));
        // A deadline still ahead is kept as it is.
        let mut saved = msrs(5000, 9000);
        keep_expired_deadline(&mut saved, &lapic);
        assert_eq!(saved, msrs(5000, 9000));
    }

    #[test]
    fn a_masked_or_other_mode_timer_keeps_its_zero_deadline() {
        let mut lapic = kvm_lapic_state::default();
        let armed = (LVTT_MODE_TSC_DEADLINE << 17) | 0xec;
        for lvtt in [armed | LVT_MASKED, 0xec, (0b01 << 17) | 0xec] {
            set_register(&mut lapic, APIC_LVTT, lvtt);
            let mut saved = msrs(5000, 0);
            keep_expired_deadline(&mut saved, &lapic);
            assert_eq!(saved, msrs(5000, 0), "LVTT {lvtt:#x}");
        }
        assert_eq!(lapic_register(&lapic, APIC_LVTT), (0b01 << 17) | 0xec);
    }
}
