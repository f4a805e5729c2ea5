//! virtio-blk backed by a raw image file: read, write, flush, get-id, read-only drives.

pub mod device;
pub mod event_handler;
pub mod persist;
pub mod request;

pub use device::{Block, BlockCounters, BlockError, DriveSpec};
pub use persist::{BlockState, BlockStateError};
