//! Legacy PC devices on port I/O: the 8250 UART console, the i8042 controller (guest resets
//! and Ctrl-Alt-Del) and Ember's boot timer port.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use boot_timer::{BootTimer, BootTimerArgs, BootTimerState};
pub use i8042::{I8042Args, I8042State, I8042StateError, I8042};
pub use serial::{SerialArgs, SerialConsole, SerialConsoleState, SerialInput, SerialStateError};

/// The legacy devices' snapshot states. They sit at fixed ports and IRQs, so the state
/// needs no layout; each is restored with its own `Persist::restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    pub serial: SerialConsoleState,
    pub i8042: I8042State,
    pub boot_timer: BootTimerState,
}

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
