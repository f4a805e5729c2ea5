//! The network device's snapshot state: the interface id, the guest's MAC (configuration
//! space), the TAP it was on, and the common virtio state (both queues).
//!
//! The TAP is opened anew on restore under the name the caller gives
//! ([`NetArgs::host_dev_name`]): the saved one, or another from the snapshot load's
//! `network_overrides`, which is how clones of one snapshot get distinct TAPs. The MAC stays
//! what the guest saw; giving clones distinct addresses is the guest's business (or a
//! network namespace per clone on the host).
//!
//! A frame read from the TAP but still waiting for a receive buffer when the snapshot is
//! taken is not saved: the restored device starts with none. That is one lost frame on a
//! link that may lose frames anyway; TCP resends it, and on a clone's new TAP it would be
//! someone else's traffic. Transmitted frames are never pending: each chain is written to the
//! TAP in the queue pass that takes it.

use serde::{Deserialize, Serialize};

use super::device::{FrameBackend, VIRTIO_NET_F_MAC};
use super::tap::Tap;
use super::{Net, NetSpec};
use crate::devices::virtio::persist::{restore_common, VirtioArgs, VirtioState, VirtioStateError};
use crate::snapshot::Persist;

/// An interface as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub iface_id: String,
    /// The TAP the device was on when saved.
    pub host_dev_name: String,
    /// The MAC in configuration space; `None` when the host chose none (no VIRTIO_NET_F_MAC).
    pub guest_mac: Option<[u8; 6]>,
    pub virtio: VirtioState,
}

/// What restoring an interface needs besides its state.
#[derive(Clone)]
pub struct NetArgs {
    pub virtio: VirtioArgs,
    /// The TAP to open: the saved `host_dev_name`, or its override.
    pub host_dev_name: String,
}

/// Why an interface cannot be restored. Each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum NetStateError {
    #[error("network interface {iface_id}: cannot open TAP {host_dev_name}: {source}")]
    OpenTap {
        iface_id: String,
        host_dev_name: String,
        source: std::io::Error,
    },
    #[error("network interface {iface_id}: {source}")]
    Virtio {
        iface_id: String,
        source: VirtioStateError,
    },
    #[error("network interface {0}: {1}")]
    Setup(String, String),
}

impl<B: FrameBackend> Net<B> {
    /// The interface's state; the frame waiting for a receive buffer, if any, is left out.
    pub fn save_state(&self) -> NetState {
        let has_mac = self.common.avail_features & VIRTIO_NET_F_MAC != 0;
        NetState {
            iface_id: self.iface_id.clone(),
            host_dev_name: self.host_dev_name.clone(),
            guest_mac: has_mac.then_some(self.config),
            virtio: self.common.save_state(),
        }
    }

    /// Rebuilds a saved interface on `backend`, which is the host interface `host_dev_name`.
    pub fn restore_with_backend(
        state: &NetState,
        host_dev_name: String,
        backend: B,
        args: VirtioArgs,
    ) -> Result<Self, NetStateError> {
        let spec = NetSpec {
            iface_id: state.iface_id.clone(),
            host_dev_name,
            guest_mac: state.guest_mac,
        };
        let mut net = Net::with_backend(&spec, backend)
            .map_err(|e| NetStateError::Setup(spec.iface_id.clone(), e.to_string()))?;
        restore_common(&mut net, &state.virtio, args).map_err(|source| NetStateError::Virtio {
            iface_id: spec.iface_id.clone(),
            source,
        })?;
        Ok(net)
    }
}

/// An interface on a TAP. `restore` opens the TAP named in the arguments.
impl Persist for Net<Tap> {
    type State = NetState;
    type Args = NetArgs;
    type Error = NetStateError;

    fn save(&self) -> Result<NetState, NetStateError> {
        Ok(self.save_state())
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, NetStateError> {
        let tap = Tap::open(&args.host_dev_name).map_err(|source| NetStateError::OpenTap {
            iface_id: state.iface_id.clone(),
            host_dev_name: args.host_dev_name.clone(),
            source,
        })?;
        Self::restore_with_backend(state, args.host_dev_name, tap, args.virtio)
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::{QUEUE_SIZE, RX, TX};
    use super::super::tap::VNET_HDR_LEN;
    use super::*;
    use crate::devices::virtio::persist::test_util::{args, queue_on};
    use crate::devices::virtio::VirtioDevice;
    use crate::snapshot::{decode, encode};
    use crate::vstate::memory::GuestMemoryMmap;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;
    const MEM_SIZE: usize = 0x40_0000;
    const MAC: [u8; 6] = [6, 0, 0xac, 0x10, 0, 2];

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
    }

    fn pair() -> (UnixDatagram, UnixDatagram) {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        (ours, peer)
    }

    fn round_trip(state: &NetState) -> NetState {
        let bytes = encode(state, 0).unwrap();
        decode(&bytes, std::path::Path::new("t")).unwrap().1
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_running_interface_round_trips_onto_a_new_backend() {
        let mem = memory();
        let (ours, peer) = pair();
        let spec = NetSpec {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some(MAC),
        };
        let mut net = Net::with_backend(&spec, ours).unwrap();
        let rx = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1_0000), 16);
        let tx = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2_0000), 16);
        net.common.queues[RX] = queue_on(&rx, QUEUE_SIZE);
        net.common.queues[TX] = queue_on(&tx, QUEUE_SIZE);
        net.common.acked_features = net.avail_features();
        let (a, _irq) = args(&mem);
        net.activate(a.mem, a.interrupt).unwrap();
        // A frame arrives with no receive buffer: it waits in the device, and is the one
        // a snapshot loses.
        peer.send(&frame(b"lost")).unwrap();
        assert!(!net.process_rx());
        assert!(net.rx_pending.is_some());
        // The guest queues a frame to send that the device has not taken yet.
        let out = frame(b"to the host");
        mem.write_slice(&out, GuestAddress(0x10_0000)).unwrap();
        let desc = Descriptor::new(0x10_0000, out.len() as u32, 0, 0);
        tx.add_desc_chains(&[RawDescriptor::from(desc)], 0).unwrap();

        let saved = net.save_state();
        assert_eq!(saved.guest_mac, Some(MAC));
        assert_eq!(saved.host_dev_name, "tap0");
        let decoded = round_trip(&saved);
        assert_eq!(decoded, saved);
        drop(net);

        let (ours, peer) = pair();
        let (a, _irq) = args(&mem);
        let mut restored = Net::restore_with_backend(&decoded, "tap7".into(), ours, a).unwrap();
        assert!(restored.is_activated());
        assert!(
            restored.rx_pending.is_none(),
            "the waiting frame is dropped"
        );
        let mut mac = [0u8; 6];
        restored.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        let again = restored.save_state();
        assert_eq!(again.host_dev_name, "tap7");
        assert_eq!(
            NetState {
                host_dev_name: "tap0".into(),
                ..again
            },
            saved
        );
        // The frame the guest queued before the snapshot goes out of the new backend.
        assert!(restored.process_tx());
        let mut got = [0u8; 64];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], out.as_slice());
        // And receiving works on the new backend.
        let buf = Descriptor::new(0x20_0000, 2048, F_WRITE, 0);
        rx.add_desc_chains(&[RawDescriptor::from(buf)], 0).unwrap();
        peer.send(&frame(b"hello again")).unwrap();
        assert!(restored.process_rx());
        assert_eq!(rx.used().idx().load(), 1);
        let mut payload = [0u8; 11];
        mem.read_slice(&mut payload, GuestAddress(0x20_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(&payload, b"hello again");
    }

    #[test]
    fn an_interface_without_a_mac_keeps_having_none() {
        let (ours, _peer) = pair();
        let spec = NetSpec {
            iface_id: "eth1".into(),
            host_dev_name: "tap1".into(),
            guest_mac: None,
        };
        let net = Net::with_backend(&spec, ours).unwrap();
        let saved = round_trip(&net.save_state());
        assert_eq!(saved.guest_mac, None);
        let (ours, _peer) = pair();
        let (a, _irq) = args(&memory());
        let restored = Net::restore_with_backend(&saved, "tap1".into(), ours, a).unwrap();
        assert_eq!(restored.avail_features() & VIRTIO_NET_F_MAC, 0);
        assert_eq!(restored.save_state(), saved);
    }

    #[test]
    fn damaged_states_and_missing_taps_are_named() {
        let (ours, _peer) = pair();
        let spec = NetSpec {
            iface_id: "eth2".into(),
            host_dev_name: "tap2".into(),
            guest_mac: Some(MAC),
        };
        let saved = Net::with_backend(&spec, ours).unwrap().save_state();
        let (a, _irq) = args(&memory());
        let mut bad = saved.clone();
        bad.virtio.queues.pop();
        let (ours, _peer) = pair();
        let err = Net::restore_with_backend(&bad, "tap2".into(), ours, a.clone())
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "network interface eth2: the snapshot holds 1 queues but the device has 2; \
             the snapshot state is damaged"
        );
        // A MAC dropped from the state changes the features the guest was offered.
        let mut bad = saved.clone();
        bad.guest_mac = None;
        let (ours, _peer) = pair();
        let err = Net::restore_with_backend(&bad, "tap2".into(), ours, a.clone())
            .err()
            .unwrap();
        assert!(matches!(err, NetStateError::Virtio { .. }), "{err}");
        // An invalid TAP name fails before any system call, naming interface and TAP.
        let args = NetArgs {
            virtio: a,
            host_dev_name: "no/slashes".into(),
        };
        let err = Net::<Tap>::restore(args, &saved).err().unwrap().to_string();
        assert!(
            err.starts_with("network interface eth2: cannot open TAP no/slashes: "),
            "{err}"
        );
    }
}
