//! The boot timer: a one-byte I/O port ([`BOOT_TIMER_PORT`]) the guest writes
//! [`BOOT_COMPLETE_MAGIC`] to once it is up (ember-init does, right before its ready line).
//! The first such write prints the time since the `ember` process started, on stderr, as
//! `ember: guest boot time: <us> us (<ms> ms since process start)`.
//!
//! [`BOOT_TIMER_PORT`]: crate::arch::x86_64::BOOT_TIMER_PORT
//! [`BOOT_COMPLETE_MAGIC`]: crate::arch::x86_64::BOOT_COMPLETE_MAGIC

use std::time::{Duration, Instant};

use crate::arch::x86_64::BOOT_COMPLETE_MAGIC;
use crate::devices::BusDevice;

/// Reports the first boot-complete write.
pub struct BootTimer {
    process_start: Instant,
    reported: Option<Duration>,
    print: bool,
}

impl BootTimer {
    /// `print`: whether to write the figure to stderr (`--boot-timer`).
    pub fn new(process_start: Instant, print: bool) -> Self {
        Self {
            process_start,
            reported: None,
            print,
        }
    }

    /// The boot time, once the guest has reported it.
    pub fn boot_time(&self) -> Option<Duration> {
        self.reported
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&BOOT_COMPLETE_MAGIC) || self.reported.is_some() {
            return;
        }
        let elapsed = self.process_start.elapsed();
        self.reported = Some(elapsed);
        if self.print {
            eprintln!(
                "ember: guest boot time: {} us ({:.1} ms since process start)",
                elapsed.as_micros(),
                elapsed.as_secs_f64() * 1000.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_magic_write_counts() {
        let mut timer = BootTimer::new(Instant::now(), false);
        timer.write(0, &[1]);
        assert!(timer.boot_time().is_none());
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        let first = timer.boot_time().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(timer.boot_time(), Some(first));
    }
}
