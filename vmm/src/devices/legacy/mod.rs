//! Legacy PC devices on port I/O: the 8250 UART console, the i8042 controller (guest resets
//! and Ctrl-Alt-Del) and Ember's boot timer port.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

pub use boot_timer::BootTimer;
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialInput};

/// An `EventFd` that vm-superio devices can fire: an interrupt line (as an irqfd) or a
/// notification to the VMM loop.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        self.0.try_clone().map(Self)
    }
}
