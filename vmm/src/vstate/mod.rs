//! KVM state: the VM (irqchip, PIT, memory slots), guest memory and the vCPUs, and their
//! snapshot states (`vcpu::state`, [`vm_state`]).

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm_state;

#[cfg(test)]
pub(crate) mod test_vm;
#[cfg(test)]
mod tests;
