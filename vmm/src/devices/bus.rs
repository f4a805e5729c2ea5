//! An address bus: a sorted set of non-overlapping ranges, each owned by a device. vCPU
//! threads look devices up here on every port I/O or MMIO exit, so lookup is a binary
//! search and the bus itself is immutable once the VM runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes within its range. `offset` is relative to the
/// range's base; `data` is as wide as the guest's access.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while laying devices out on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {0:#x} is empty or wraps around the address space")]
    BadRange(u64),
}

struct Slot {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Port I/O or MMIO address space.
#[derive(Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base))?;
        let before = self.slots.range(..end).next_back();
        if before.is_some_and(|(b, slot)| b + slot.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Slot)> {
        let (base, slot) = self.slots.range(..=addr).next_back()?;
        (addr - base < slot.len).then_some((addr - base, slot))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, slot)) => {
                lock(&slot.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, slot)) => {
                lock(&slot.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A poisoned lock means a device panicked while another vCPU used it;
/// carrying on with its half-updated state would hide the bug, so the panic propagates.
#[allow(clippy::unwrap_used)]
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0, vec![0x41])));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x3f7, &[0]));
    }

    #[test]
    fn overlaps_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let other = || Arc::new(Mutex::new(Recorder::default()));
        assert_eq!(
            bus.insert(0x64, 1, other()),
            Err(BusError::Overlap { base: 0x64, len: 1 })
        );
        assert_eq!(
            bus.insert(0x5f, 2, other()),
            Err(BusError::Overlap { base: 0x5f, len: 2 })
        );
        assert_eq!(bus.insert(0x70, 0, other()), Err(BusError::BadRange(0x70)));
        assert_eq!(
            bus.insert(u64::MAX, 2, other()),
            Err(BusError::BadRange(u64::MAX))
        );
        bus.insert(0x65, 1, other()).unwrap();
        bus.insert(0x5f, 1, other()).unwrap();
    }
}
