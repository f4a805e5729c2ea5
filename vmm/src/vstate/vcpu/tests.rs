//! vCPU snapshot tests on real KVM vCPUs (see `vstate::test_vm`): save, restore into a fresh
//! VM, save again and compare; damaged and mismatched states. The vCPU thread's side (save
//! on request while paused, under the vCPU seccomp filter) is tested in `seccomp::tests`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a failed test

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_mp_state, KVM_MP_STATE_HALTED, KVM_VCPUEVENT_VALID_NMI_PENDING,
};

use super::msrs::{lapic_register, SavedMsr, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use super::state::{same_tsc_frequency, XSAVE_BASE_SIZE};
use super::*;
use crate::vstate::test_vm::TestVm;

const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const APIC_TPR: usize = 0x80;
const APIC_LVTT: usize = 0x320;
/// Where the tests' vCPUs have their TSC when saved: far from where a fresh vCPU's starts.
const SAVED_TSC: u64 = 1 << 40;
/// A pattern in XMM0, written in the XSAVE area and read back through KVM_GET_FPU.
const XMM0: [u8; 16] = *b"ember xmm0 state";
/// Where XMM0 and the XSAVE header's XSTATE_BV are in the XSAVE area, in 32-bit words.
const XSAVE_XMM0_WORD: usize = 160 / 4;
const XSAVE_XSTATE_BV_WORD: usize = 512 / 4;
/// XSTATE_BV bits: the x87 and SSE components are in the area, not in their initial state.
const XSTATE_FP_SSE: u32 = 0b11;

/// Gives vCPU `vcpu` state that a fresh vCPU does not have, in every part that is saved.
fn make_distinct(test: &TestVm, vcpu: &Vcpu) {
    let fd = &vcpu.fd;
    let index = u64::from(vcpu.index);
    let mut regs = fd.get_regs().unwrap();
    regs.rax = 0x1111_0000 + index;
    regs.r15 = 0xfeed_f00d;
    fd.set_regs(&regs).unwrap();
    let mut debug = fd.get_debug_regs().unwrap();
    debug.db[0] = 0x1000 + index;
    debug.db[3] = 0x2000;
    debug.dr7 = 0x401; // L0 on, bit 10 reads as one
    fd.set_debug_regs(&debug).unwrap();
    let mut xcrs = fd.get_xcrs().unwrap();
    xcrs.xcrs[0].value = 0x3; // x87 and SSE
    fd.set_xcrs(&xcrs).unwrap();
    // Through the XSAVE area with its header saying so, as a guest's own XSAVE leaves it.
    // (KVM_SET_FPU would not do: it leaves the header alone, and on a vCPU that never ran
    // the header marks the x87 and SSE state as initial, so KVM reports it as zeros.)
    let mut xsave = state::read_xsave(fd, &vcpu.support).unwrap();
    for (i, word) in XMM0.chunks(4).enumerate() {
        xsave[XSAVE_XMM0_WORD + i] = u32::from_le_bytes(word.try_into().unwrap());
    }
    xsave[XSAVE_XSTATE_BV_WORD] |= XSTATE_FP_SSE;
    let xsave = state::xsave_for_kvm(vcpu.index, &vcpu.support, &xsave).unwrap();
    // SAFETY: xsave_for_kvm sized the buffer to what this VM's KVM reads.
    unsafe { fd.set_xsave2(&xsave) }.unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    set_lapic_register(&mut lapic, APIC_TPR, 0x20);
    if test.vm.emulated.tsc_deadline {
        // The timer armed in TSC-deadline mode, vector 0xec, with a deadline far ahead.
        set_lapic_register(&mut lapic, APIC_LVTT, (0b10 << 17) | 0xec);
    }
    fd.set_lapic(&lapic).unwrap();
    let mut msrs = vec![
        (MSR_IA32_TSC, SAVED_TSC),
        (MSR_LSTAR, 0xffff_ffff_8100_0000 + index),
        (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_0000),
        (MSR_IA32_TSC_DEADLINE, SAVED_TSC * 2),
    ];
    if vcpu.support.msrs.contains(&MSR_KVM_SYSTEM_TIME_NEW) {
        // kvmclock on, its page in guest memory: restoring it makes KVM map that page.
        msrs.push((MSR_KVM_SYSTEM_TIME_NEW, 0x5000 | 1));
    }
    let entries: Vec<SavedMsr> = msrs
        .into_iter()
        .map(|(index, value)| SavedMsr { index, value })
        .collect();
    msrs::write(fd, vcpu.index, &entries).unwrap();
    if vcpu.index == 0 {
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        })
        .unwrap();
    } else {
        let mut events = fd.get_vcpu_events().unwrap();
        events.nmi.pending = 1;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
        fd.set_vcpu_events(&events).unwrap();
    }
}

fn set_lapic_register(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    state
        .msrs
        .iter()
        .find(|m| m.index == index)
        .map(|m| m.value)
}

/// What differs between two states of the same vCPU, besides what KVM changes by itself
/// while a vCPU merely exists: its TSC counts on. The TSC must have gone on from the saved
/// value, not started again.
fn differences(before: &VcpuState, after: &VcpuState) -> Vec<String> {
    let mut found = Vec::new();
    let mut field = |name: &str, same: bool| {
        if !same {
            found.push(name.to_string());
        }
    };
    field("index", before.index == after.index);
    field("cpuid", before.cpuid == after.cpuid);
    field("tsc_khz", before.tsc_khz == after.tsc_khz);
    field("mp_state", before.mp_state == after.mp_state);
    field("regs", before.regs == after.regs);
    field("sregs", before.sregs == after.sregs);
    field("xcrs", before.xcrs == after.xcrs);
    field("debug_regs", before.debug_regs == after.debug_regs);
    field("events", before.events == after.events);
    if before.xsave != after.xsave {
        let at = before
            .xsave
            .iter()
            .zip(&after.xsave)
            .position(|(a, b)| a != b);
        found.push(format!(
            "xsave ({} and {} words, first difference at word {at:?})",
            before.xsave.len(),
            after.xsave.len()
        ));
    }
    let lapic_diff: Vec<usize> = (0..1024)
        .filter(|&i| before.lapic.regs[i] != after.lapic.regs[i])
        .collect();
    if !lapic_diff.is_empty() {
        found.push(format!("lapic bytes {lapic_diff:x?}"));
    }
    let without_tsc = |s: &VcpuState| -> Vec<SavedMsr> {
        s.msrs
            .iter()
            .filter(|m| m.index != MSR_IA32_TSC)
            .copied()
            .collect()
    };
    let (msrs_before, msrs_after) = (without_tsc(before), without_tsc(after));
    if msrs_before != msrs_after {
        let changed: Vec<String> = msrs_before
            .iter()
            .filter(|m| !msrs_after.contains(m))
            .map(|m| {
                format!(
                    "{:#x}: {:#x} -> {:x?}",
                    m.index,
                    m.value,
                    msr(after, m.index)
                )
            })
            .collect();
        found.push(format!(
            "msrs {changed:?}, {} and {} saved",
            msrs_before.len(),
            msrs_after.len()
        ));
    }
    match (msr(before, MSR_IA32_TSC), msr(after, MSR_IA32_TSC)) {
        (Some(saved), Some(now)) if now >= saved => {}
        other => found.push(format!("TSC went back or is missing: {other:x?}")),
    }
    found
}

/// Saves every vCPU of a configured, distinct VM, restores into a fresh VM, saves again.
fn round_trip(count: u8) -> (Vec<VcpuState>, Vec<VcpuState>, Vec<Vcpu>) {
    let source = TestVm::new(count);
    let vcpus = source.boot_vcpus(count);
    for vcpu in &vcpus {
        make_distinct(&source, vcpu);
    }
    let saved: Vec<VcpuState> = vcpus.iter().map(|v| v.save().unwrap()).collect();
    let target = TestVm::new(count);
    let restored: Vec<Vcpu> = target
        .fresh_vcpus(count)
        .into_iter()
        .zip(&saved)
        .map(|(fresh, state)| Vcpu::restore(fresh, state).unwrap())
        .collect();
    let again = restored.iter().map(|v| v.save().unwrap()).collect();
    (saved, again, restored)
}

#[test]
fn configured_vcpus_restore_into_a_fresh_vm_unchanged() {
    let (saved, again, restored) = round_trip(2);
    for (before, after) in saved.iter().zip(&again) {
        let diff = differences(before, after);
        assert!(diff.is_empty(), "vCPU {}: {diff:#?}", before.index);
    }
    // What was made distinct made it into the state, so the comparison above means something.
    let [bsp, ap] = [&saved[0], &saved[1]];
    assert_eq!((bsp.regs.rax, ap.regs.rax), (0x1111_0000, 0x1111_0001));
    assert_eq!(bsp.mp_state.mp_state, KVM_MP_STATE_HALTED);
    assert_eq!(ap.events.nmi.pending, 1);
    assert_eq!(
        (bsp.xcrs.xcrs[0].value, bsp.debug_regs.db[0]),
        (0x3, 0x1000)
    );
    assert_eq!(lapic_register(&bsp.lapic, APIC_TPR), 0x20);
    assert_eq!(msr(bsp, MSR_LSTAR), Some(0xffff_ffff_8100_0000));
    assert_eq!(msr(bsp, MSR_IA32_TSC_DEADLINE), Some(SAVED_TSC * 2));
    assert!(msr(bsp, MSR_IA32_TSC).unwrap() >= SAVED_TSC);
    // The x87/SSE state travels inside the XSAVE area: KVM_GET_FPU sees it on the new vCPU.
    for vcpu in &restored {
        assert_eq!(
            vcpu.fd.get_fpu().unwrap().xmm[0],
            XMM0,
            "vCPU {}",
            vcpu.index
        );
    }
}

#[test]
fn saved_msrs_are_what_kvm_lists_less_vmx_and_hyperv_plus_mtrrs() {
    let test = TestVm::new(1);
    let vcpus = test.boot_vcpus(1);
    let state = vcpus[0].save().unwrap();
    let listed = test.vm.kvm.get_msr_index_list().unwrap();
    let also = |msr: u32| msrs::ALSO_SAVED.iter().any(|range| range.contains(&msr));
    for saved in &state.msrs {
        assert!(
            listed.as_slice().contains(&saved.index) || also(saved.index),
            "{:#x}",
            saved.index
        );
        let left_out = |msr| msrs::NOT_SAVED.iter().any(|(range, _)| range.contains(msr));
        assert!(!left_out(&saved.index), "{:#x}", saved.index);
    }
    for wanted in [MSR_IA32_TSC, MSR_LSTAR, MSR_KERNEL_GS_BASE] {
        assert!(msr(&state, wanted).is_some(), "{wanted:#x} not saved");
    }
    // The boot MSRs Ember sets are all carried.
    for boot in crate::arch::x86_64::msr::boot_msr_entries() {
        assert!(
            msr(&state, boot.index).is_some(),
            "boot MSR {:#x}",
            boot.index
        );
    }
}

#[test]
fn a_state_survives_the_snapshot_file_format() {
    let (saved, _, _) = round_trip(1);
    let bytes = crate::snapshot::encode(&saved, 0).unwrap();
    let path = std::path::Path::new("vcpus.state");
    let (_, decoded): (_, Vec<VcpuState>) = crate::snapshot::decode(&bytes, path).unwrap();
    assert_eq!(decoded, saved);
    // And what decodes restores.
    let target = TestVm::new(1);
    let fresh = target.fresh_vcpus(1).pop().unwrap();
    Vcpu::restore(fresh, &decoded[0]).unwrap();
}

#[test]
fn every_truncation_of_a_saved_state_fails_to_decode_without_panicking() {
    let (saved, _, _) = round_trip(1);
    let payload = postcard::to_allocvec(&saved[0]).unwrap();
    for len in 0..payload.len() {
        assert!(
            postcard::from_bytes::<VcpuState>(&payload[..len]).is_err(),
            "{len}"
        );
    }
}

fn restore_error(state: &VcpuState, into: u8) -> VcpuStateError {
    let target = TestVm::new(into + 1);
    let fresh = target.fresh_vcpus(into + 1).pop().unwrap();
    match Vcpu::restore(fresh, state) {
        Ok(_) => panic!("restoring {state:?} into vCPU {into} succeeded"),
        Err(e) => e,
    }
}

#[test]
fn a_state_restored_into_another_vcpu_is_refused() {
    let (saved, _, _) = round_trip(2);
    let e = restore_error(&saved[1], 0);
    assert!(
        matches!(e, VcpuStateError::WrongVcpu { saved: 1, vcpu: 0 }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "the saved state of vCPU 1 cannot be restored into vCPU 0"
    );
}

#[test]
fn vcpu_states_must_be_as_many_as_the_vcpus_and_in_order() {
    let (saved, _, _) = round_trip(2);
    check_vcpu_states(&saved, 2).unwrap();
    let e = check_vcpu_states(&saved, 3).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the snapshot holds the state of 2 vCPUs but the VM has 3; the snapshot state is damaged"
    );
    let e = check_vcpu_states(&saved[..1], 2).unwrap_err();
    assert!(
        matches!(e, VcpuStateError::VcpuCount { saved: 1, vcpus: 2 }),
        "{e}"
    );
    let swapped = vec![saved[1].clone(), saved[0].clone()];
    let e = check_vcpu_states(&swapped, 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the snapshot's vCPU states are out of order: state 0 is that of vCPU 1; the snapshot state is damaged"
    );
}

#[test]
fn an_xsave_area_of_the_wrong_size_is_refused() {
    let (saved, _, restored) = round_trip(1);
    let supported = restored[0].support.xsave_size;
    let mut larger = saved[0].clone();
    larger.xsave.resize(supported / 4 + 16, 0);
    let e = restore_error(&larger, 0);
    assert!(
        matches!(e, VcpuStateError::XsaveTooLarge { index: 0, saved, supported: s }
            if saved == supported + 64 && s == supported),
        "{e}"
    );
    assert!(e.to_string().contains("this host's KVM moves"), "{e}");
    let mut smaller = saved[0].clone();
    smaller.xsave.truncate(1000);
    let e = restore_error(&smaller, 0);
    assert_eq!(
        e.to_string(),
        "the saved XSAVE area of vCPU 0 is 4000 bytes, less than the 4096 every XSAVE area has; the snapshot state is damaged"
    );
}

#[test]
fn a_shorter_xsave_area_than_this_hosts_is_padded() {
    // A state saved where KVM moves only the 4096-byte area restores on a host that moves
    // more, and the other way round only if the extra is absent (the test above).
    let (saved, _, _) = round_trip(1);
    let mut base_only = saved[0].clone();
    base_only.xsave.truncate(XSAVE_BASE_SIZE / 4);
    let target = TestVm::new(1);
    let fresh = target.fresh_vcpus(1).pop().unwrap();
    let restored = Vcpu::restore(fresh, &base_only).unwrap();
    assert_eq!(restored.fd.get_fpu().unwrap().xmm[0], XMM0);
}

#[test]
fn an_msr_kvm_refuses_is_named() {
    let (saved, _, _) = round_trip(1);
    let mut state = saved[0].clone();
    // In no range an x86 CPU or KVM defines.
    state.msrs.push(SavedMsr {
        index: 0x0bad_c0de,
        value: 7,
    });
    let e = restore_error(&state, 0);
    assert!(
        matches!(
            e,
            VcpuStateError::RefusedMsr {
                index: 0,
                msr: 0x0bad_c0de,
                value: 7
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("KVM refused MSR 0xbadc0de = 0x7 of vCPU 0;"),
        "{e}"
    );
}

#[test]
fn a_cpuid_longer_than_kvm_takes_is_refused() {
    let (saved, _, _) = round_trip(1);
    let mut state = saved[0].clone();
    state.cpuid = vec![kvm_cpuid_entry2::default(); 300];
    let e = restore_error(&state, 0);
    assert!(
        matches!(
            e,
            VcpuStateError::CpuidTooLarge {
                index: 0,
                entries: 300
            }
        ),
        "{e}"
    );
}

#[test]
fn a_tsc_frequency_is_kept_within_tolerance_and_otherwise_set_or_refused() {
    let (saved, _, restored) = round_trip(1);
    let host_khz = saved[0]
        .tsc_khz
        .expect("KVM_GET_TSC_KHZ works on this host");
    assert!(same_tsc_frequency(host_khz, host_khz + host_khz / 10_000)); // 100 ppm
    assert!(!same_tsc_frequency(host_khz, host_khz + host_khz / 1_000)); // 1000 ppm
    let mut near = saved[0].clone();
    near.tsc_khz = Some(host_khz + host_khz / 10_000);
    let target = TestVm::new(1);
    let fresh = target.fresh_vcpus(1).pop().unwrap();
    let kept = Vcpu::restore(fresh, &near).unwrap();
    assert_eq!(kept.fd.get_tsc_khz().unwrap(), host_khz);

    let mut faster = saved[0].clone();
    let wanted = host_khz + host_khz / 10;
    faster.tsc_khz = Some(wanted);
    let target = TestVm::new(1);
    let fresh = target.fresh_vcpus(1).pop().unwrap();
    match Vcpu::restore(fresh, &faster) {
        Ok(scaled) => {
            assert!(restored[0].support.tsc_scaling, "set without TSC scaling");
            assert_eq!(scaled.fd.get_tsc_khz().unwrap(), wanted);
        }
        Err(e) => {
            assert!(!restored[0].support.tsc_scaling, "{e}");
            assert!(matches!(e, VcpuStateError::NoTscScaling { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "vCPU 0 was saved with a {wanted} kHz TSC; this host's runs at {host_khz} kHz \
                     and its KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL); restore on a \
                     host with the same TSC frequency"
                )
            );
        }
    }
}

#[test]
fn an_expired_tsc_deadline_is_saved_as_due_now() {
    let test = TestVm::new(1);
    if !test.vm.emulated.tsc_deadline {
        panic!("this host's KVM has no TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER)");
    }
    let vcpus = test.boot_vcpus(1);
    make_distinct(&test, &vcpus[0]);
    // A deadline already past: KVM fires the timer at once, clears the MSR and keeps the
    // interrupt pending where KVM_GET_LAPIC does not report it.
    let past = [SavedMsr {
        index: MSR_IA32_TSC_DEADLINE,
        value: 1,
    }];
    msrs::write(&vcpus[0].fd, 0, &past).unwrap();
    let state = vcpus[0].save().unwrap();
    let tsc = msr(&state, MSR_IA32_TSC).unwrap();
    let deadline = msr(&state, MSR_IA32_TSC_DEADLINE).unwrap();
    assert!(
        deadline != 0 && deadline <= tsc,
        "deadline {deadline:#x}, TSC {tsc:#x}"
    );
}

/// A vCPU in its reset state (which is what KVM on AMD leaves after a guest shutdown) is
/// described as such, not by registers that would point at the reset vector; a configured
/// one by its registers.
#[test]
fn a_triple_fault_report_does_not_show_the_reset_state_as_the_crash_site() {
    let test = TestVm::new(1);
    let fresh = test.fresh_vcpus(1);
    let described = fresh[0].describe_state();
    assert!(described.contains("KVM reset the vCPU"), "{described}");
    drop(fresh);
    let test = TestVm::new(1);
    let booted = test.boot_vcpus(1);
    let described = booted[0].describe_state();
    assert!(described.starts_with("rip=0x"), "{described}");
}
