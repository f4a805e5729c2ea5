//! virtio-vsock with Firecracker's host-side conventions ("hybrid vsock"): the host end of
//! every guest socket is a Unix stream socket.
//!
//! - Host to guest: a host program connects to the device's Unix socket (`uds_path`), writes
//!   `CONNECT <port>\n`, and once the guest accepts reads `OK <host port>\n`; from then on the
//!   stream carries the connection's bytes.
//! - Guest to host: a guest connection to host port P is bridged to a new connection to the
//!   Unix socket `<uds_path>_<P>`; without a listener there the guest gets a reset.
//!
//! Parts: [`packet`] parses and writes the 44-byte packet header in descriptor chains and
//! trusts nothing in them; [`credit`] is the per-connection flow-control arithmetic;
//! [`handshake`] reads the `CONNECT` line; [`connection`] is one bridged connection's state
//! machine; [`muxer`] routes packets and host events between connections; [`device`] is the
//! virtio device and its queue loops; [`event_handler`] puts it on the VMM's event loop.

pub mod connection;
pub mod credit;
pub mod device;
pub mod event_handler;
pub mod handshake;
pub mod muxer;
pub mod packet;
pub mod persist;
pub mod unix;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use device::{Vsock, RESET_ACK_TIMEOUT};
pub use persist::{VsockArgs, VsockState, VsockStateError};

use super::SetupError;

/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// Queue indices (virtio spec 5.10.2).
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVQ: usize = 2;
/// Ring size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

/// What the device is made of, from the configuration.
#[derive(Debug, Clone)]
pub struct VsockSpec {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// Errors while creating the device; all but `Setup` and `Timer` are configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock.uds_path: {0} is too long for a Unix socket path; the limit is {max} bytes", max = unix::MAX_PATH_LEN)]
    PathTooLong(PathBuf),
    #[error("vsock.uds_path: {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("vsock.uds_path: the directory of {0} does not exist; create it first")]
    NoDirectory(PathBuf),
    #[error("vsock.uds_path: cannot inspect {0}: {1}")]
    Inspect(PathBuf, std::io::Error),
    #[error("vsock.uds_path: cannot remove the stale socket {0}: {1}")]
    RemoveStale(PathBuf, std::io::Error),
    #[error("vsock.uds_path: cannot listen on {0}: {1}")]
    Listen(PathBuf, std::io::Error),
    #[error("vsock: cannot create the connection timer: {0}")]
    Timer(std::io::Error),
    #[error("vsock: {0}")]
    Setup(SetupError),
}

impl VsockError {
    /// True when the user's configuration is at fault (the socket path), not the host.
    pub fn is_config_error(&self) -> bool {
        !matches!(self, VsockError::Timer(_) | VsockError::Setup(_))
    }
}

/// Per-device counters, for metrics and tests.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Packets taken from the guest's transmit queue, valid or not.
    pub tx_packets: AtomicU64,
    /// Payload bytes the guest sent towards host sockets.
    pub tx_bytes: AtomicU64,
    /// Packets given to the guest.
    pub rx_packets: AtomicU64,
    /// Payload bytes given to the guest.
    pub rx_bytes: AtomicU64,
    /// Chains with bad descriptors (direction, memory, size), in either queue.
    pub invalid_chains: AtomicU64,
    /// Guest packets dropped for a bad header (addresses, type, op, length).
    pub invalid_packets: AtomicU64,
    /// Connections opened, either way.
    pub connections: AtomicU64,
    /// Connections refused: no host listener, too many connections, a bad CONNECT line.
    pub refused: AtomicU64,
    /// Resets sent to the guest.
    pub resets: AtomicU64,
    /// Resets not sent because too many were waiting for receive buffers.
    pub dropped_resets: AtomicU64,
    /// Connections that timed out in their handshake.
    pub timeouts: AtomicU64,
    /// Transport-reset events given to the guest (one per restore of a running device).
    pub transport_resets: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}
