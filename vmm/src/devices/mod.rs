//! Emulated devices and the buses that route vCPU port and memory accesses to them.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
