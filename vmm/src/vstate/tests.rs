//! VM snapshot tests on real KVM VMs (see `test_vm`): the irqchips, PIT and clock saved,
//! restored into a fresh VM and saved again; the whole KVM state (VM and vCPUs) through the
//! snapshot file format; damaged states.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a failed test

use kvm_bindings::{kvm_clock_data, kvm_ioapic_state, kvm_irqchip};
use serde::{Deserialize, Serialize};

use super::kvm::{open_kvm, KvmVm};
use super::test_vm::TestVm;
use super::vcpu::{Vcpu, VcpuState};
use super::vm_state::{VmState, VmStateError};
use crate::snapshot::Persist;

/// A kvmclock reading far from where a fresh VM's starts: 1000 s.
const SAVED_CLOCK_NS: u64 = 1_000_000_000_000;

fn bytes<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap()
}

fn ioapic(chip: &kvm_irqchip) -> kvm_ioapic_state {
    // SAFETY: the chip is the IOAPIC (chip 2), whose union member is `ioapic`.
    unsafe { chip.chip.ioapic }
}

/// Gives the VM's irqchips, PIT and clock state a fresh VM does not have.
fn make_distinct(test: &TestVm) {
    let mut state = test.vm.save().unwrap();
    let mut io = ioapic(&state.ioapic);
    io.id = 7;
    // Pin 5 unmasked to vector 0x35, level-triggered; pin 9 to vector 0x39.
    io.redirtbl[5].bits = 0x35 | (1 << 15);
    io.redirtbl[9].bits = 0x39;
    state.ioapic.chip.ioapic = io;
    // SAFETY: chip 0 is the master PIC, whose union member is `pic`.
    let mut pic = unsafe { state.pic_master.chip.pic };
    pic.imr = 0xe5;
    pic.irq_base = 0x30;
    state.pic_master.chip.pic = pic;
    // Channel 2 (the speaker channel, gated off) loaded with a count, mode 3.
    state.pit.channels[2].count = 0x1234;
    state.pit.channels[2].mode = 3;
    state.clock = kvm_clock_data {
        clock: SAVED_CLOCK_NS,
        ..Default::default()
    };
    test.vm.set_state(&state).unwrap();
}

/// The differences between two states of a VM besides what KVM changes by itself: the
/// clock counts on (and must go on from the saved value), and each PIT channel's
/// `count_load_time` is the host time KVM reloaded it at.
fn differences(before: &VmState, after: &VmState) -> Vec<String> {
    let mut found = Vec::new();
    for (name, a, b) in [
        ("master PIC", &before.pic_master, &after.pic_master),
        ("slave PIC", &before.pic_slave, &after.pic_slave),
        ("IOAPIC", &before.ioapic, &after.ioapic),
    ] {
        if bytes(a) != bytes(b) {
            found.push(name.to_string());
        }
    }
    let without_load_time = |state: &VmState| {
        let mut pit = state.pit;
        pit.channels.iter_mut().for_each(|c| c.count_load_time = 0);
        pit
    };
    if without_load_time(before) != without_load_time(after) {
        found.push(format!("PIT {:?} -> {:?}", before.pit, after.pit));
    }
    if after.clock.clock < before.clock.clock {
        found.push(format!(
            "clock went back: {:?} -> {:?}",
            before.clock, after.clock
        ));
    }
    found
}

#[test]
fn vm_state_restores_into_a_fresh_vm_unchanged() {
    let source = TestVm::new(1);
    make_distinct(&source);
    let saved = source.vm.save().unwrap();
    assert_eq!(ioapic(&saved.ioapic).id, 7);
    assert_eq!(saved.pit.channels[2].count, 0x1234);
    assert!(saved.clock.clock >= SAVED_CLOCK_NS);
    let restored = KvmVm::restore(open_kvm(1).unwrap(), &saved).unwrap();
    let again = restored.save().unwrap();
    let diff = differences(&saved, &again);
    assert!(diff.is_empty(), "{diff:#?}");
}

#[test]
fn a_damaged_irqchip_state_is_refused_before_anything_is_written() {
    let test = TestVm::new(1);
    let mut state = test.vm.save().unwrap();
    state.ioapic.chip_id = 1;
    let Err(e) = KvmVm::restore(open_kvm(1).unwrap(), &state) else {
        panic!("a damaged irqchip state was restored");
    };
    assert!(
        matches!(
            e,
            VmStateError::WrongChip {
                what: "IOAPIC",
                chip_id: 1
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "the snapshot's IOAPIC state is that of interrupt controller 1; the snapshot state is damaged"
    );
}

/// The KVM part of a microVM snapshot, as the controller composes it.
#[derive(Serialize, Deserialize)]
struct KvmState {
    vm: VmState,
    vcpus: Vec<VcpuState>,
}

#[test]
fn a_whole_vm_round_trips_through_the_state_file() {
    const VCPUS: u8 = 2;
    let source = TestVm::new(VCPUS);
    make_distinct(&source);
    let vcpus = source.boot_vcpus(VCPUS);
    // The save order of a snapshot: vCPUs (paused), then the VM right after.
    let state = KvmState {
        vcpus: vcpus.iter().map(|v| v.save().unwrap()).collect(),
        vm: source.vm.save().unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.state");
    crate::snapshot::save_state(&path, &state, 0).unwrap();
    let loaded: KvmState = crate::snapshot::load_state(&path).unwrap().state;
    assert_eq!(loaded.vcpus, state.vcpus);
    assert_eq!(bytes(&loaded.vm), bytes(&state.vm));

    // The restore order: the VM, guest memory, then the vCPUs.
    super::vcpu::check_vcpu_states(&loaded.vcpus, usize::from(VCPUS)).unwrap();
    let vm = KvmVm::restore(open_kvm(VCPUS).unwrap(), &loaded.vm).unwrap();
    let target = TestVm::from_vm(vm);
    let restored: Vec<Vcpu> = target
        .fresh_vcpus(VCPUS)
        .into_iter()
        .zip(&loaded.vcpus)
        .map(|(fresh, saved)| Vcpu::restore(fresh, saved).unwrap())
        .collect();
    for (vcpu, saved) in restored.iter().zip(&loaded.vcpus) {
        let again = vcpu.save().unwrap();
        assert_eq!((again.regs, again.sregs), (saved.regs, saved.sregs));
        assert_eq!(again.lapic, saved.lapic);
    }
    let diff = differences(&loaded.vm, &target.vm.save().unwrap());
    assert!(diff.is_empty(), "{diff:#?}");
}
