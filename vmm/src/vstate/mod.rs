//! KVM state: the VM (irqchip, PIT, memory slots), guest memory and the vCPUs.

pub mod kvm;
pub mod memory;
pub mod vcpu;
