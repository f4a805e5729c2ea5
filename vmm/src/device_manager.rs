//! Places virtio devices on the MMIO bus: one 4 KiB window and one IOAPIC pin each (raised
//! with `KVM_IRQ_LINE`, see [`Trigger::Line`] for why not an irqfd), an ioeventfd per queue,
//! and the `virtio_mmio.device=` arguments that tell the guest kernel where they are.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::MMIO_GAP_START;
use crate::devices::bus::lock;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW};
use crate::devices::virtio::{Interrupt, Trigger, VirtioDevice};
use crate::devices::BusError;
use crate::vstate::kvm::KvmVm;
use crate::vstate::vcpu::Buses;

/// The first IOAPIC pin given to virtio devices (1 is the keyboard, 4 the serial port).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// One past the last IOAPIC pin.
const IRQ_END: u32 = 24;
/// Offset of the QueueNotify register in a device's window.
const QUEUE_NOTIFY: u64 = 0x50;

/// Errors while placing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no interrupt line left for {0}; at most {max} virtio devices fit", max = IRQ_END - FIRST_VIRTIO_IRQ)]
    NoIrq(String),
    #[error("cannot give {0} a handle on the VM for its interrupt: {1}")]
    VmHandle(String, std::io::Error),
    #[error("cannot register queue {1} of {0} for notifications: {2}")]
    Ioeventfd(String, usize, kvm_ioctls::Error),
    #[error("cannot place {0} on the MMIO bus: {1}")]
    Bus(String, BusError),
}

/// Hands out MMIO windows and IRQs in order, and collects the kernel arguments.
#[derive(Default)]
pub struct MmioDeviceManager {
    attached: u32,
    kernel_args: Vec<String>,
}

impl MmioDeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `device` (named for errors) behind a new transport.
    pub fn attach(
        &mut self,
        vm: &KvmVm,
        buses: &mut Buses,
        mem: &Arc<GuestMemoryMmap>,
        name: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), DeviceError> {
        let irq = FIRST_VIRTIO_IRQ + self.attached;
        if irq >= IRQ_END {
            return Err(DeviceError::NoIrq(name.into()));
        }
        let base = MMIO_GAP_START + u64::from(self.attached) * MMIO_WINDOW;
        let trigger = Trigger::Line {
            vm: vm
                .duplicate_fd()
                .map_err(|e| DeviceError::VmHandle(name.into(), e))?,
            gsi: irq,
        };
        for (index, evt) in lock(&device).queue_events().iter().enumerate() {
            let address = IoEventAddress::Mmio(base + QUEUE_NOTIFY);
            vm.fd
                .register_ioevent(evt, &address, index as u32)
                .map_err(|e| DeviceError::Ioeventfd(name.into(), index, e))?;
        }
        let transport = MmioTransport::new(
            device,
            mem.clone(),
            Arc::new(Interrupt::with_trigger(trigger)),
        );
        buses
            .mmio
            .insert(base, MMIO_WINDOW, Arc::new(Mutex::new(transport)))
            .map_err(|e| DeviceError::Bus(name.into(), e))?;
        self.kernel_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.attached += 1;
        Ok(())
    }

    /// The arguments announcing every attached device, space separated.
    pub fn kernel_args(&self) -> String {
        self.kernel_args.join(" ")
    }
}
