//! What the guest tells about itself in its ready line (and the agent in its READY frame):
//! uptime, CPUs online and RAM, so that a host-side test can check the guest got what it was
//! given.

/// The time since boot, suspend included (`CLOCK_BOOTTIME`): what the ready line reports.
pub fn boot_time() -> std::time::Duration {
    // SAFETY: timespec is plain data, filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Counts CPUs in a cpulist such as `0-3,5` (/sys/devices/system/cpu/online).
pub fn count_cpulist(list: &str) -> Option<u32> {
    let mut total = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        total += last.checked_sub(first)? + 1;
    }
    Some(total)
}

/// Sums the top-level "System RAM" ranges of /proc/iomem, in KiB: the RAM the firmware (for
/// Ember, the e820 map) handed to the kernel, before the kernel reserves any of it.
pub fn system_ram_kib(iomem: &str) -> Option<u64> {
    let mut bytes = 0u64;
    for line in iomem.lines().filter(|l| !l.starts_with(' ')) {
        let Some((range, name)) = line.split_once(" : ") else {
            continue;
        };
        if name.trim() != "System RAM" {
            continue;
        }
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        bytes += end.checked_sub(start)? + 1;
    }
    Some(bytes / 1024)
}

/// Writes one line to the console (stderr) with a single `write`, so that lines printed by
/// PID 1's threads at the same moment never interleave mid-line (`eprintln!` writes each
/// formatted piece separately).
pub fn console_line(line: &str) {
    use std::io::Write;
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    let _ = std::io::stderr().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(count_cpulist("0\n"), Some(1));
        assert_eq!(count_cpulist("0-3"), Some(4));
        assert_eq!(count_cpulist("0-1,4,6-7"), Some(5));
        assert_eq!(count_cpulist("3-1"), None);
        assert_eq!(count_cpulist("x"), None);
    }

    #[test]
    fn iomem_ram() {
        let iomem = "00000000-00000fff : Reserved\n\
                     00001000-0009fbff : System RAM\n\
                     00100000-07ffffff : System RAM\n\
                     \x20 01000000-01ffffff : Kernel code\n\
                     d0000000-d0000fff : LNRO0005:00\n";
        let ram = (0x9fbff - 0x1000 + 1) + (0x7ff_ffff - 0x10_0000 + 1);
        assert_eq!(system_ram_kib(iomem), Some(ram / 1024));
        assert_eq!(system_ram_kib(""), Some(0));
    }
}
