//! Real KVM VMs for tests, made the way `Vmm::build` makes them: the VM with its irqchip and
//! PIT, a little guest memory registered, vCPUs fresh or configured for a 64-bit Linux
//! entry. They need `/dev/kvm`; without it they fail and say so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a failed test

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::kvm::{create_vm, open_kvm, KvmVm};
use super::vcpu::{Buses, Vcpu, VcpuStop};
use crate::metrics::VcpuExitCounters;

/// Guest memory of a test VM.
pub const TEST_MEMORY: usize = 16 << 20;
/// Where the test vCPUs would enter the guest.
pub const TEST_ENTRY: GuestAddress = GuestAddress(0x100_0000);

/// A VM and its memory. Fields drop in order: vCPUs made from it must go first.
pub struct TestVm {
    pub vm: KvmVm,
    _memory: GuestMemoryMmap,
    stops: Sender<(u8, VcpuStop)>,
    _stopped: Receiver<(u8, VcpuStop)>,
}

impl TestVm {
    /// A VM for `vcpus` vCPUs with [`TEST_MEMORY`] registered.
    pub fn new(vcpus: u8) -> Self {
        let kvm = open_kvm(vcpus).unwrap_or_else(|e| {
            panic!("this test needs a usable /dev/kvm (it creates real VMs and vCPUs): {e}")
        });
        Self::from_vm(create_vm(kvm).unwrap())
    }

    /// `vm` with [`TEST_MEMORY`] registered.
    pub fn from_vm(vm: KvmVm) -> Self {
        let memory = crate::vstate::memory::anonymous(&[(GuestAddress(0), TEST_MEMORY)]).unwrap();
        vm.register_memory(&memory, false).unwrap();
        let (stops, stopped) = channel();
        Self {
            vm,
            _memory: memory,
            stops,
            _stopped: stopped,
        }
    }

    /// vCPUs `0..count`, just created.
    pub fn fresh_vcpus(&self, count: u8) -> Vec<Vcpu> {
        (0..count)
            .map(|index| {
                Vcpu::new(
                    &self.vm,
                    index,
                    Arc::new(Buses::default()),
                    self.stops.clone(),
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    Arc::new(VcpuExitCounters::default()),
                )
                .unwrap()
            })
            .collect()
    }

    /// vCPUs `0..count` configured as `Vmm::build` configures them for boot.
    pub fn boot_vcpus(&self, count: u8) -> Vec<Vcpu> {
        let vcpus = self.fresh_vcpus(count);
        for vcpu in &vcpus {
            vcpu.configure(&self.vm, TEST_ENTRY, count).unwrap();
        }
        vcpus
    }
}
