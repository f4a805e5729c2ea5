//! virtio-net backed by a TAP device on the host.

pub mod device;
pub mod event_handler;
pub mod persist;
pub mod tap;

pub use device::{Net, NetCounters, NetError, NetSpec};
pub use persist::{NetArgs, NetState, NetStateError};
