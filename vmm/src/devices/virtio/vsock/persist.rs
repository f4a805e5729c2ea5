//! The vsock device's snapshot state: the guest's CID, the host socket path and the common
//! virtio state (the three queues). Connections are not saved: their host ends are Unix
//! sockets of the process that took the snapshot, and cannot be carried to another.
//!
//! # Restore
//!
//! The device listens again at the path given in [`VsockArgs::uds_path`]: the saved one, or
//! the snapshot load's `vsock_override`, so that clones of one snapshot listen at distinct
//! paths (a stale socket at the path is replaced, as at boot). A device the driver was
//! running is started again with no connections and owes the guest a transport reset (see
//! [`super::device`]): the guest's connected sockets get ECONNRESET, its listeners stay, and
//! ember-init's agent answers new connections at once.
//!
//! # The guest's CID
//!
//! Firecracker's `vsock_override` changes only the socket path; its guest keeps the CID it
//! booted with, so all clones of a snapshot share one. Ember keeps the saved CID as well
//! unless [`VsockArgs::guest_cid`] names another, which is safe for Linux guests: the
//! transport reset makes the driver read its CID from configuration space again before it
//! resets its sockets, and sockets listening on `VMADDR_CID_ANY` (as ember-init's agent does)
//! accept on the new CID. A guest socket bound to the old CID explicitly keeps that address
//! and no longer receives anything. The host side (hybrid vsock) never needs distinct CIDs,
//! as each clone has its own socket path; a distinct CID matters to software in the guest
//! that reads its own CID to tell clones apart.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::PendingReset;
use super::{Vsock, VsockError, VsockSpec};
use crate::devices::virtio::persist::{restore_common, VirtioArgs, VirtioState, VirtioStateError};
use crate::snapshot::Persist;

/// The lowest CID a guest may have: 0 to 2 are the hypervisor, local and host.
const MIN_GUEST_CID: u64 = 3;
/// One past the highest: `u32::MAX` is `VMADDR_CID_ANY`, and CIDs are 32 bits wide.
const CID_END: u64 = u32::MAX as u64;

/// The vsock device as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The CID the guest read from configuration space.
    pub guest_cid: u64,
    /// Where host clients connected.
    pub uds_path: PathBuf,
    pub virtio: VirtioState,
}

/// What restoring the device needs besides its state.
#[derive(Clone)]
pub struct VsockArgs {
    pub virtio: VirtioArgs,
    /// Where to listen: the saved `uds_path`, or its override.
    pub uds_path: PathBuf,
    /// A new CID for the guest, or `None` to keep the saved one (Firecracker's behaviour).
    pub guest_cid: Option<u64>,
}

/// Why the vsock device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum VsockStateError {
    #[error("the snapshot's vsock guest CID {0} is out of range ({MIN_GUEST_CID} to {max}); the snapshot state is damaged", max = CID_END - 1)]
    SavedCid(u64),
    #[error("vsock guest CID {0} is out of range; use {MIN_GUEST_CID} to {max}", max = CID_END - 1)]
    Cid(u64),
    #[error(transparent)]
    Device(#[from] VsockError),
    #[error("the vsock device: {0}")]
    Virtio(VirtioStateError),
}

/// The vsock device. `restore` listens at the given path with the given or saved CID; a
/// device that was running is started again and owes the guest a transport reset.
impl Persist for Vsock {
    type State = VsockState;
    type Args = VsockArgs;
    type Error = VsockStateError;

    fn save(&self) -> Result<VsockState, VsockStateError> {
        Ok(VsockState {
            guest_cid: self.guest_cid(),
            uds_path: self.muxer.uds_path().to_path_buf(),
            virtio: self.common.save_state(),
        })
    }

    fn restore(args: VsockArgs, state: &VsockState) -> Result<Vsock, VsockStateError> {
        if !(MIN_GUEST_CID..CID_END).contains(&state.guest_cid) {
            return Err(VsockStateError::SavedCid(state.guest_cid));
        }
        let guest_cid = args.guest_cid.unwrap_or(state.guest_cid);
        if !(MIN_GUEST_CID..CID_END).contains(&guest_cid) {
            return Err(VsockStateError::Cid(guest_cid));
        }
        let spec = VsockSpec {
            guest_cid,
            uds_path: args.uds_path,
        };
        let mut vsock = Vsock::new(&spec)?;
        if let Err(e) = restore_common(&mut vsock, &state.virtio, args.virtio) {
            // The listener goes with the device; so does the socket file it bound.
            drop(vsock);
            let _ = std::fs::remove_file(&spec.uds_path);
            return Err(VsockStateError::Virtio(e));
        }
        if state.virtio.activated {
            vsock.transport_reset = Some(PendingReset::default());
        }
        Ok(vsock)
    }
}
