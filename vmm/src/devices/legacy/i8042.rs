//! The i8042 keyboard controller on ports 0x60 and 0x64, through vm-superio. Ember uses it
//! for what `reboot=k` needs: the guest's CPU-reset command ends the VM.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::BusDevice;

/// The controller's port range starts at 0x60; the command port is 0x64 (offset 4).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// i8042 behind the bus interface.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset`: fired when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self { device: I8042Device::new(reset) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.device.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        // A failed reset notification leaves nothing to recover: the eventfd counter cannot
        // overflow from guest writes in practice, and the guest can simply ask again.
        let _ = self.device.write(offset, *value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_fires_the_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        dev.write(4, &[0x01]);
        assert!(evt.read().is_err(), "no reset for other commands");
        dev.write(4, &[0x01, 0x02]);
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
