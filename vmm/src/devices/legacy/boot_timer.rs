//! The boot timer: a one-byte I/O port ([`BOOT_TIMER_PORT`]) the guest writes
//! [`BOOT_COMPLETE_MAGIC`] to once it is up (ember-init does, right before its ready line).
//! The first such write prints the time since the `ember` process started, on stderr, as
//! `ember: guest boot time: <us> us (<ms> ms since process start)`.
//!
//! A snapshot keeps the boot time already reported, so that a restored VM keeps reporting
//! the boot it had (in metrics) and a later magic write is not taken for a new boot.
//!
//! [`BOOT_TIMER_PORT`]: crate::arch::x86_64::BOOT_TIMER_PORT
//! [`BOOT_COMPLETE_MAGIC`]: crate::arch::x86_64::BOOT_COMPLETE_MAGIC

use std::convert::Infallible;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::BOOT_COMPLETE_MAGIC;
use crate::devices::BusDevice;
use crate::snapshot::Persist;

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

/// The boot timer as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimerState {
    /// The boot time the guest reported, in microseconds since its `ember` started.
    pub boot_time_us: Option<u64>,
}

/// What a restored boot timer needs: the new process's start, and `--boot-timer`.
#[derive(Debug, Clone, Copy)]
pub struct BootTimerArgs {
    pub process_start: Instant,
    pub print: bool,
}

impl Persist for BootTimer {
    type State = BootTimerState;
    type Args = BootTimerArgs;
    type Error = Infallible;

    fn save(&self) -> Result<BootTimerState, Infallible> {
        Ok(BootTimerState {
            boot_time_us: self
                .reported
                .map(|t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX)),
        })
    }

    fn restore(args: BootTimerArgs, state: &BootTimerState) -> Result<Self, Infallible> {
        let mut timer = BootTimer::new(args.process_start, args.print);
        timer.reported = state.boot_time_us.map(Duration::from_micros);
        Ok(timer)
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
    fn a_reported_boot_stays_reported() {
        let mut timer = BootTimer::new(Instant::now(), false);
        let args = BootTimerArgs {
            process_start: Instant::now(),
            print: false,
        };
        let idle = timer.save().unwrap();
        assert_eq!(idle.boot_time_us, None);
        let Ok(mut back) = BootTimer::restore(args, &idle);
        back.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert!(
            back.boot_time().is_some(),
            "not booted yet: the write counts"
        );

        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        let saved = timer.save().unwrap();
        let bytes = crate::snapshot::encode(&saved, 0).unwrap();
        let (_, decoded): (_, BootTimerState) =
            crate::snapshot::decode(&bytes, std::path::Path::new("t")).unwrap();
        let Ok(mut back) = BootTimer::restore(args, &decoded);
        assert_eq!(back.save().unwrap(), saved);
        back.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(
            back.save().unwrap(),
            saved,
            "a second magic write is ignored"
        );
    }

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
