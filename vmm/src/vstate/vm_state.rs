//! The VM's KVM state for snapshots ([`VmState`]): the in-kernel interrupt controllers (the
//! two PICs and the IOAPIC), the PIT and the kvmclock. Saved and restored from the VMM
//! thread, through the VM fd.
//!
//! # Order
//!
//! Save once the vCPUs are paused, right next to their states (just before them, after the
//! devices: see `crate::persist`), so that the kvmclock and the vCPUs' TSCs are read
//! moments apart. Restore into a VM just made by [`create_vm`] (which
//! is what [`Persist::restore`] does), before its vCPUs are restored: KVM recomputes each
//! vCPU's view of the kvmclock when it first enters the guest, so setting the clock before
//! the vCPUs exist loses nothing, and interrupts the PIT or IOAPIC raise meanwhile wait in
//! the controllers as they would on a paused VM.
//!
//! # Guest time across a restore
//!
//! The clock is restored to the value it had when saved, with no flags, so guest time goes
//! on from where the snapshot left it: the time the snapshot spent on disk is not seen by the
//! guest's monotonic clocks, and the vCPUs' TSCs, restored from their saved MSRs, go on from
//! their saved values too, so the kvmclock and the TSC agree. KVM could instead advance the
//! clock by the real time that passed (`KVM_CLOCK_REALTIME`), but then every guest timer that
//! came due meanwhile fires at once, the guest's watchdogs see CPUs that did not run for the
//! whole gap (soft-lockup and RCU-stall reports), and each clone of one snapshot starts with
//! a different jump. The cost: after a restore the guest's wall clock lags real time by the
//! snapshot's age until something sets it (the agent or NTP, in the guest).

use std::fmt;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::kvm::{create_vm, KvmError, KvmVm};
use crate::snapshot::Persist;

/// The in-kernel interrupt controllers, PIT and clock of a VM, as saved in a snapshot.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_IRQCHIP` of the master PIC (chip 0), the slave PIC (chip 1), the IOAPIC
    /// (chip 2).
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// The kvmclock as read; only `clock` is restored (see the module docs).
    pub clock: kvm_clock_data,
}

impl fmt::Debug for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The irqchips are unions, shown by their chip ids only.
        f.debug_struct("VmState")
            .field("irqchip_ids", &self.chip_ids())
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish()
    }
}

/// Why the VM's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("cannot read the VM's {what}: {source}")]
    Get {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the VM's {what}: {source}")]
    Set {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the snapshot's {what} state is that of interrupt controller {chip_id}; the snapshot state is damaged")]
    WrongChip { what: &'static str, chip_id: u32 },
    #[error(transparent)]
    CreateVm(#[from] KvmError),
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

impl VmState {
    fn chips(&self) -> [&kvm_irqchip; 3] {
        [&self.pic_master, &self.pic_slave, &self.ioapic]
    }

    fn chip_ids(&self) -> [u32; 3] {
        self.chips().map(|chip| chip.chip_id)
    }
}

impl KvmVm {
    /// Writes `state` into this VM, which has just been created and has no vCPUs running.
    pub fn set_state(&self, state: &VmState) -> Result<(), VmStateError> {
        // All checked before anything is written.
        for (chip, (id, what)) in state.chips().into_iter().zip(CHIPS) {
            if chip.chip_id != id {
                return Err(VmStateError::WrongChip {
                    what,
                    chip_id: chip.chip_id,
                });
            }
        }
        let set = |what| move |source| VmStateError::Set { what, source };
        for (chip, (_, what)) in state.chips().into_iter().zip(CHIPS) {
            self.fd.set_irqchip(chip).map_err(set(what))?;
        }
        self.fd.set_pit2(&state.pit).map_err(set("PIT"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("clock"))?;
        Ok(())
    }

    fn get_irqchip(
        &self,
        (chip_id, what): (u32, &'static str),
    ) -> Result<kvm_irqchip, VmStateError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(|source| VmStateError::Get { what, source })?;
        Ok(chip)
    }
}

/// The VM's interrupt controllers, PIT and clock. `save` needs the vCPUs paused; `restore`
/// takes an opened KVM ([`super::kvm::open_kvm`]), creates the VM as a boot does and writes
/// the saved state into it. Guest memory and vCPUs come after.
impl Persist for KvmVm {
    type State = VmState;
    type Args = Kvm;
    type Error = VmStateError;

    fn save(&self) -> Result<VmState, VmStateError> {
        let [master, slave, ioapic] = CHIPS;
        let get = |what| move |source| VmStateError::Get { what, source };
        Ok(VmState {
            pic_master: self.get_irqchip(master)?,
            pic_slave: self.get_irqchip(slave)?,
            ioapic: self.get_irqchip(ioapic)?,
            pit: self.fd.get_pit2().map_err(get("PIT"))?,
            clock: self.fd.get_clock().map_err(get("clock"))?,
        })
    }

    fn restore(kvm: Kvm, state: &VmState) -> Result<KvmVm, VmStateError> {
        let vm = create_vm(kvm)?;
        vm.set_state(state)?;
        Ok(vm)
    }
}
