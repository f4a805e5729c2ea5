//! KVM state: the VM (irqchip, PIT, memory slots), guest memory and its dirty pages
//! ([`dirty`]), the vCPUs, and their snapshot states (`vcpu::state`, [`vm_state`]).

pub mod dirty;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm_state;

#[cfg(test)]
pub(crate) mod test_vm;
#[cfg(test)]
mod tests;
