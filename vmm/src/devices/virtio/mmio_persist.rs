//! The MMIO transport's snapshot state: the device status, the feature selectors and the
//! driver's features, the queue selector, the interrupt status bits and the configuration
//! generation. Queue registers live in the device's queues and are saved with it
//! ([`super::super::persist`]).
//!
//! Restoring checks the saved registers against each other and against the restored device,
//! which must be restored first (it is the transport's argument): the status must be one the
//! driver can reach in order, DRIVER_OK exactly when the device runs, the driver's features
//! those the device took at FEATURES_OK, and the interrupt status only the two bits there
//! are. The selectors are restored as they were whatever their value: a driver may select a
//! queue or feature word that does not exist, and the transport answers such accesses
//! harmlessly, so a snapshot of that is valid.

use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};

use super::MmioTransport;
use crate::devices::bus::lock;
use crate::devices::virtio::{status, Interrupt, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING};
use crate::snapshot::Persist;

/// The transport's registers, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures (both words).
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The InterruptStatus bits the driver has not acknowledged.
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// What restoring a transport needs: the device behind it (restored already), and the
/// guest memory and interrupt the device was restored with.
pub struct MmioTransportArgs {
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub mem: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<Interrupt>,
}

/// Why saved transport registers cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioStateError {
    #[error(
        "the saved device status {0:#x} has bits no driver can set; the snapshot state is damaged"
    )]
    UnknownStatusBits(u32),
    #[error("the saved device status {0:#x} skips a step of the virtio handshake; the snapshot state is damaged")]
    StatusOutOfOrder(u32),
    #[error("the saved device status {status:#x} says the driver {} the device, but the device state says it {}; the snapshot state is damaged",
        if *status & crate::devices::virtio::status::DRIVER_OK != 0 { "started" } else { "did not start" },
        if *device_running { "runs" } else { "does not run" })]
    ActivationMismatch { status: u32, device_running: bool },
    #[error("the driver's features {driver:#x} differ from the features {device:#x} the device accepted; the snapshot state is damaged")]
    FeaturesMismatch { driver: u64, device: u64 },
    #[error("the saved interrupt status {0:#x} has bits other than used-buffer (1) and configuration-change (2); the snapshot state is damaged")]
    InterruptStatus(u32),
}

const HANDSHAKE: [u32; 5] = [
    0,
    status::ACKNOWLEDGE,
    status::ACKNOWLEDGE | status::DRIVER,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
];
const STEPS: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const KNOWN_STATUS: u32 = STEPS | status::DEVICE_NEEDS_RESET | status::FAILED;

/// Checks a saved status on its own: known bits, handshake steps in order, and
/// DEVICE_NEEDS_RESET only where the transport sets it (a failed DRIVER_OK, so after
/// FEATURES_OK). FAILED may come at any step.
fn check_status(value: u32) -> Result<(), MmioStateError> {
    if value & !KNOWN_STATUS != 0 {
        return Err(MmioStateError::UnknownStatusBits(value));
    }
    let in_order = HANDSHAKE.contains(&(value & STEPS));
    let needs_reset_ok =
        value & status::DEVICE_NEEDS_RESET == 0 || value & status::FEATURES_OK != 0;
    if !in_order || !needs_reset_ok {
        return Err(MmioStateError::StatusOutOfOrder(value));
    }
    Ok(())
}

/// Checks a saved state against the restored device.
fn check_against_device(
    state: &MmioTransportState,
    device: &dyn VirtioDevice,
) -> Result<(), MmioStateError> {
    let running = device.is_activated();
    if (state.status & status::DRIVER_OK != 0) != running {
        return Err(MmioStateError::ActivationMismatch {
            status: state.status,
            device_running: running,
        });
    }
    // Until FEATURES_OK the device has accepted nothing; from then on it has what the
    // driver had written.
    let acked = device.common().acked_features;
    let expected = if state.status & status::FEATURES_OK != 0 {
        state.driver_features
    } else {
        0
    };
    if acked != expected {
        return Err(MmioStateError::FeaturesMismatch {
            driver: state.driver_features,
            device: acked,
        });
    }
    if state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
        return Err(MmioStateError::InterruptStatus(state.interrupt_status));
    }
    Ok(())
}

/// A device's register window. `save` needs the VMM thread and paused vCPUs (no register
/// access in flight); `restore` takes the restored device and sets the interrupt status
/// without injecting an interrupt (the restored interrupt controllers hold what was pending).
impl Persist for MmioTransport {
    type State = MmioTransportState;
    type Args = MmioTransportArgs;
    type Error = MmioStateError;

    fn save(&self) -> Result<MmioTransportState, MmioStateError> {
        Ok(MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
        })
    }

    fn restore(
        args: MmioTransportArgs,
        state: &MmioTransportState,
    ) -> Result<Self, MmioStateError> {
        check_status(state.status)?;
        check_against_device(state, &*lock(&args.device))?;
        args.interrupt.restore_status(state.interrupt_status);
        let mut transport = MmioTransport::new(args.device, args.mem, args.interrupt);
        transport.status = state.status;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport.config_generation = state.config_generation;
        Ok(transport)
    }
}

#[cfg(test)]
mod tests {
    use super::super::reg;
    use super::*;
    use crate::devices::virtio::block::{Block, DriveSpec};
    use crate::devices::virtio::persist::{restore_common, VirtioArgs, VirtioState};
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use crate::devices::BusDevice;
    use crate::snapshot::{decode, encode};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    const READY: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    const RUNNING: u32 = READY | status::DRIVER_OK;

    /// A block device behind a transport, driven through registers as a driver would.
    struct Rig {
        transport: MmioTransport,
        block: Arc<Mutex<Block>>,
        mem: Arc<GuestMemoryMmap>,
        spec: DriveSpec,
    }

    fn drive(name: &str) -> DriveSpec {
        let path =
            std::env::temp_dir().join(format!("ember-mmio-snap-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        DriveSpec {
            drive_id: name.into(),
            path,
            read_only: false,
            flush_to_disk: true,
        }
    }

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }

    fn rig(name: &str) -> Rig {
        let spec = drive(name);
        let block = Arc::new(Mutex::new(Block::new(&spec).unwrap()));
        let mem =
            Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let transport = MmioTransport::new(block.clone(), mem.clone(), interrupt());
        Rig {
            transport,
            block,
            mem,
            spec,
        }
    }

    impl Rig {
        fn write(&mut self, offset: u64, value: u32) {
            self.transport.write(offset, &value.to_le_bytes());
        }
        fn read(&mut self, offset: u64) -> u32 {
            let mut data = [0u8; 4];
            self.transport.read(offset, &mut data);
            u32::from_le_bytes(data)
        }
        /// The driver's side of the handshake up to `until` (a status value).
        fn handshake(&mut self, until: u32) {
            for step in [status::ACKNOWLEDGE, status::DRIVER] {
                if until & step != 0 {
                    let now = self.read(reg::STATUS);
                    self.write(reg::STATUS, now | step);
                }
            }
            if until & status::FEATURES_OK == 0 {
                return;
            }
            self.write(reg::DRIVER_FEATURES_SEL, 1);
            self.write(reg::DRIVER_FEATURES, 1);
            self.write(reg::STATUS, READY);
            self.write(reg::QUEUE_SEL, 0);
            self.write(reg::QUEUE_NUM, 64);
            self.write(reg::QUEUE_DESC_LOW, 0x1_0000);
            self.write(reg::QUEUE_DRIVER_LOW, 0x2_0000);
            self.write(reg::QUEUE_DEVICE_LOW, 0x3_0000);
            self.write(reg::QUEUE_READY, 1);
            if until & status::DRIVER_OK != 0 {
                self.write(reg::STATUS, RUNNING);
            }
        }

        /// Saves transport and device, encodes and decodes them as a state file would.
        fn save(&self) -> (MmioTransportState, VirtioState) {
            let transport = self.transport.save().unwrap();
            let device = self.block.lock().unwrap().common().save_state();
            let bytes = encode(&(transport, device), 0).unwrap();
            decode(&bytes, std::path::Path::new("t")).unwrap().1
        }

        /// A new block device and transport from saved states.
        fn restore(
            &self,
            (transport, device): &(MmioTransportState, VirtioState),
        ) -> Result<Rig, MmioStateError> {
            let interrupt = interrupt();
            let mut block = Block::new(&self.spec).unwrap();
            let args = VirtioArgs {
                mem: self.mem.clone(),
                interrupt: interrupt.clone(),
            };
            restore_common(&mut block, device, args).unwrap();
            let block = Arc::new(Mutex::new(block));
            let args = MmioTransportArgs {
                device: block.clone(),
                mem: self.mem.clone(),
                interrupt,
            };
            Ok(Rig {
                transport: MmioTransport::restore(args, transport)?,
                block,
                mem: self.mem.clone(),
                spec: self.spec.clone(),
            })
        }
    }

    #[test]
    fn every_handshake_step_round_trips() {
        for until in HANDSHAKE {
            let mut r = rig(&format!("step-{until}"));
            r.handshake(until);
            r.write(reg::DEVICE_FEATURES_SEL, 1);
            r.write(reg::QUEUE_SEL, 0);
            // A configuration write bumps the generation.
            r.transport.write(0x100, &[0]);
            let saved = r.save();
            assert_eq!(saved.0.status, until);
            let mut back = r.restore(&saved).unwrap();
            assert_eq!(back.save(), saved, "step {until:#x}");
            assert_eq!(back.read(reg::STATUS), until);
            assert_eq!(back.read(reg::CONFIG_GENERATION), 1);
            assert_eq!(back.read(reg::DEVICE_FEATURES), 1, "VERSION_1, high word");
            assert_eq!(
                back.block.lock().unwrap().is_activated(),
                until & status::DRIVER_OK != 0
            );
        }
    }

    #[test]
    fn a_restored_running_device_needs_no_new_handshake() {
        let mut r = rig("running");
        r.handshake(RUNNING);
        r.transport.interrupt.signal_used_queue().unwrap();
        let saved = r.save();
        assert_eq!(saved.0.interrupt_status, INT_USED_RING);
        let mut back = r.restore(&saved).unwrap();
        assert_eq!(back.read(reg::INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(back.read(reg::QUEUE_READY), 1);
        assert_eq!(back.read(reg::QUEUE_NUM_MAX), 256);
        assert_eq!(
            back.block.lock().unwrap().common().acked_features,
            VIRTIO_F_VERSION_1
        );
        // The driver acknowledges as usual, and a reset still returns everything.
        back.write(reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(back.read(reg::INTERRUPT_STATUS), 0);
        back.write(reg::STATUS, 0);
        assert!(!back.block.lock().unwrap().is_activated());
        assert_eq!(back.read(reg::QUEUE_READY), 0);
    }

    #[test]
    fn odd_but_legal_selectors_are_kept() {
        let mut r = rig("selectors");
        r.handshake(READY);
        r.write(reg::QUEUE_SEL, 9);
        r.write(reg::DEVICE_FEATURES_SEL, 0xffff_ffff);
        r.write(reg::DRIVER_FEATURES_SEL, 7);
        let saved = r.save();
        let mut back = r.restore(&saved).unwrap();
        assert_eq!(back.read(reg::QUEUE_NUM_MAX), 0, "queue 9 does not exist");
        assert_eq!(back.read(reg::DEVICE_FEATURES), 0);
        assert_eq!(back.save(), saved);
    }

    #[test]
    fn failed_and_needs_reset_statuses_round_trip() {
        let mut r = rig("failed");
        r.handshake(status::ACKNOWLEDGE);
        r.write(reg::STATUS, status::ACKNOWLEDGE | status::FAILED);
        let saved = r.save();
        assert_eq!(r.restore(&saved).unwrap().save(), saved);

        let mut r = rig("needs-reset");
        r.handshake(READY);
        r.write(reg::QUEUE_DESC_LOW, 0xfff0_0000);
        r.write(reg::STATUS, RUNNING);
        let saved = r.save();
        assert_eq!(saved.0.status, READY | status::DEVICE_NEEDS_RESET);
        assert_eq!(r.restore(&saved).unwrap().save(), saved);
    }

    fn refused(
        until: u32,
        damage: impl FnOnce(&mut (MmioTransportState, VirtioState)),
        expected: MmioStateError,
    ) {
        let mut r = rig("refused");
        r.handshake(until);
        let mut saved = r.save();
        damage(&mut saved);
        let err = r.restore(&saved).err().unwrap();
        assert_eq!(err, expected);
        assert!(
            err.to_string().ends_with("the snapshot state is damaged"),
            "{err}"
        );
    }

    #[test]
    fn hostile_registers_are_refused() {
        let damaged = |status| move |s: &mut (MmioTransportState, VirtioState)| s.0.status = status;
        for bad in [0x10, 0x20, 1 << 31, RUNNING | 0x100] {
            refused(
                RUNNING,
                damaged(bad),
                MmioStateError::UnknownStatusBits(bad),
            );
        }
        for bad in [
            status::DRIVER,
            status::ACKNOWLEDGE | status::FEATURES_OK,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
            status::DEVICE_NEEDS_RESET | status::ACKNOWLEDGE,
        ] {
            refused(READY, damaged(bad), MmioStateError::StatusOutOfOrder(bad));
        }
        refused(
            READY,
            damaged(RUNNING),
            MmioStateError::ActivationMismatch {
                status: RUNNING,
                device_running: false,
            },
        );
        refused(
            RUNNING,
            damaged(READY),
            MmioStateError::ActivationMismatch {
                status: READY,
                device_running: true,
            },
        );
        refused(
            RUNNING,
            |s| s.0.driver_features |= 1 << 9,
            MmioStateError::FeaturesMismatch {
                driver: VIRTIO_F_VERSION_1 | 1 << 9,
                device: VIRTIO_F_VERSION_1,
            },
        );
        refused(
            RUNNING,
            |s| s.0.interrupt_status = 0xdead_beef,
            MmioStateError::InterruptStatus(0xdead_beef),
        );
        refused(
            RUNNING,
            |s| s.0.interrupt_status = 4,
            MmioStateError::InterruptStatus(4),
        );
    }

    #[test]
    fn features_the_driver_is_still_writing_may_be_anything() {
        let mut r = rig("negotiating");
        r.handshake(status::ACKNOWLEDGE | status::DRIVER);
        r.write(reg::DRIVER_FEATURES, 0xffff_ffff);
        let saved = r.save();
        assert_eq!(saved.0.driver_features, 0xffff_ffff);
        let mut back = r.restore(&saved).unwrap();
        // FEATURES_OK still refuses what the device does not offer.
        back.write(reg::STATUS, READY);
        assert_eq!(back.read(reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }
}
