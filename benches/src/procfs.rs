//! What benchmarks read about processes from `/proc`: a VMM's memory split into guest RAM
//! and its own (`smaps`), a process's PSS and private memory (`smaps_rollup`), and its
//! open descriptors and threads.

use std::fs;

/// Open file descriptors of process `pid` (`"self"` for this one).
pub fn fd_count(pid: &str) -> Result<usize, String> {
    count_entries(&format!("/proc/{pid}/fd"))
}

/// Threads of process `pid` (`"self"` for this one).
pub fn thread_count(pid: &str) -> Result<usize, String> {
    count_entries(&format!("/proc/{pid}/task"))
}

fn count_entries(dir: &str) -> Result<usize, String> {
    fs::read_dir(dir)
        .map(|entries| entries.count())
        .map_err(|e| format!("cannot list {dir}: {e}"))
}

/// Where process `pid` is, for a failure message about a process that stopped making
/// progress: its state, the kernel function it waits in, and each thread's kernel stack
/// (readable as root).
pub fn whereabouts(pid: u32) -> String {
    let read =
        |path: String| fs::read_to_string(&path).unwrap_or_else(|e| format!("({path}: {e})"));
    let status = read(format!("/proc/{pid}/status"));
    let state = status
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or("State: unknown");
    let mut text = format!(
        "process {pid}: {state}, wchan {}\n",
        read(format!("/proc/{pid}/wchan"))
    );
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.filter_map(Result::ok) {
            let tid = task.file_name().to_string_lossy().into_owned();
            let comm = read(format!("/proc/{pid}/task/{tid}/comm"));
            let stack = read(format!("/proc/{pid}/task/{tid}/stack"));
            text += &format!("thread {tid} ({}):\n{stack}", comm.trim());
        }
    }
    text
}

/// The memory of VMM process `pid` whose guest has `guest_kib` of RAM; see [`MemorySample`].
pub fn vmm_memory(pid: u32, guest_kib: u64) -> Result<MemorySample, String> {
    let path = format!("/proc/{pid}/smaps");
    let smaps = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    read_memory(&smaps, guest_kib)
}

/// The resident memory of a VMM with a booted guest, from `/proc/PID/smaps`, in KiB.
///
/// The guest memory mapping is the one private anonymous read-write mapping exactly the
/// guest's size (Ember maps each RAM range on its own, 2 MiB-aligned; QEMU maps its RAM
/// block the same way, its guard page being a separate mapping); anything else is an error
/// rather than a guess. "Guest memory touched" is that mapping's `Rss`: the guest pages
/// the host backs, whoever touched them first (the VMM loading the kernel and initramfs, or
/// the guest), counted whole huge pages where THP backs them. Totals are the sums over all
/// mappings of the same snapshot (`Rss`, and `Anonymous` for the anonymous part), not
/// `/proc/PID/status`, whose per-thread counters may lag. Memory the kernel spends for KVM
/// (page tables, vCPU state) is in neither figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySample {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub anonymous_kib: u64,
    pub guest_touched_kib: u64,
    /// The guest mapping's `Anonymous` pages (its touched pages less any shared zero pages).
    pub guest_anonymous_kib: u64,
}

impl MemorySample {
    /// Resident memory that is not guest memory.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_touched_kib)
    }
}

impl MemorySample {
    /// The VMM's own private memory: anonymous pages outside guest RAM (heap, stacks,
    /// buffers, written pages of its binary's data), the part no other process shares.
    pub fn private_non_guest_kib(&self) -> u64 {
        self.anonymous_kib.saturating_sub(self.guest_anonymous_kib)
    }
}
/// One mapping of `/proc/PID/smaps`: its header and the sizes we need, in KiB.
#[derive(Debug, Default)]
pub struct Mapping {
    header: String,
    perms: String,
    anonymous_name: bool,
    size_kib: u64,
    rss_kib: u64,
    pss_kib: u64,
    anonymous_kib: u64,
}

/// Parses `/proc/PID/smaps`: a header line per mapping (`start-end perms offset dev inode
/// [path]`) followed by `Key: value kB` lines.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { continue };
        let is_header = first.split_once('-').is_some_and(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        });
        if is_header {
            mappings.push(Mapping {
                header: line.to_string(),
                perms: words.get(1).unwrap_or(&"").to_string(),
                anonymous_name: words.len() <= 5,
                ..Mapping::default()
            });
            continue;
        }
        let (Some(mapping), Some(value)) = (mappings.last_mut(), words.get(1)) else {
            continue;
        };
        let value = value.parse().unwrap_or(0);
        match *first {
            "Size:" => mapping.size_kib = value,
            "Rss:" => mapping.rss_kib = value,
            "Pss:" => mapping.pss_kib = value,
            "Anonymous:" => mapping.anonymous_kib = value,
            _ => {}
        }
    }
    mappings
}

/// The memory figures of one smaps snapshot; see [`MemorySample`].
pub fn read_memory(smaps: &str, guest_kib: u64) -> Result<MemorySample, String> {
    let mappings = parse_smaps(smaps);
    let guest: Vec<&Mapping> = mappings
        .iter()
        .filter(|m| m.anonymous_name && m.perms == "rw-p" && m.size_kib == guest_kib)
        .collect();
    let [guest] = guest.as_slice() else {
        let found: Vec<&str> = guest.iter().map(|m| m.header.as_str()).collect();
        return Err(format!(
            "expected one private anonymous rw mapping of {guest_kib} KiB (guest memory), \
             found {}: {found:?}",
            found.len()
        ));
    };
    Ok(MemorySample {
        rss_kib: mappings.iter().map(|m| m.rss_kib).sum(),
        pss_kib: mappings.iter().map(|m| m.pss_kib).sum(),
        anonymous_kib: mappings.iter().map(|m| m.anonymous_kib).sum(),
        guest_touched_kib: guest.rss_kib,
        guest_anonymous_kib: guest.anonymous_kib,
    })
}

/// A process's memory from `/proc/PID/smaps_rollup`, MiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollup {
    pub private_mib: f64,
    pub pss_mib: f64,
    pub rss_mib: f64,
}

pub fn rollup(pid: u64) -> Result<Rollup, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_rollup(&text).ok_or_else(|| format!("{path} has no Rss/Pss/Private lines"))
}

/// Sums the `Key: N kB` lines of smaps_rollup into MiB.
fn parse_rollup(text: &str) -> Option<Rollup> {
    let kib = |key: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()
        })
    };
    Some(Rollup {
        private_mib: (kib("Private_Clean")? + kib("Private_Dirty")?) / 1024.0,
        pss_mib: kib("Pss")? / 1024.0,
        rss_mib: kib("Rss")? / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0200000 r-xp 00000000 fe:00 123 /usr/bin/ember
Size:               2048 kB
Rss:                1500 kB
Pss:                 750 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               40960 kB
Pss:               40960 kB
Anonymous:         40960 kB
AnonHugePages:     40960 kB
VmFlags: rd wr mr mw me ac hg
7f0008000000-7f000c000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                 300 kB
Pss:                 300 kB
Anonymous:           300 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  20 kB
Pss:                  20 kB
Anonymous:            20 kB
";

    #[test]
    fn guest_mapping_and_totals_from_smaps() {
        let m = read_memory(SMAPS, 128 << 10).unwrap();
        assert_eq!(
            m,
            MemorySample {
                rss_kib: 1500 + 40960 + 300 + 20,
                pss_kib: 750 + 40960 + 300 + 20,
                anonymous_kib: 40960 + 300 + 20,
                guest_touched_kib: 40960,
                guest_anonymous_kib: 40960,
            }
        );
        assert_eq!(m.overhead_kib(), 1820);
        assert_eq!(m.private_non_guest_kib(), 320);
    }

    #[test]
    fn no_guess_without_exactly_one_guest_sized_mapping() {
        let err = read_memory(SMAPS, 256 << 10).unwrap_err();
        assert!(err.contains("found 0"), "{err}");
        let twice = format!(
            "{SMAPS}{}",
            SMAPS.lines().skip(6).take(7).collect::<Vec<_>>().join("\n")
        );
        let err = read_memory(&twice, 128 << 10).unwrap_err();
        assert!(err.contains("found 2"), "{err}");
    }

    #[test]
    fn smaps_rollup_parses() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:               20480 kB\n\
                    Pss:               10240 kB\nPss_Anon:           1024 kB\n\
                    Private_Clean:      2048 kB\nPrivate_Dirty:      3072 kB\n";
        let r = parse_rollup(text).unwrap();
        assert_eq!(
            r,
            Rollup {
                private_mib: 5.0,
                pss_mib: 10.0,
                rss_mib: 20.0
            }
        );
        assert!(parse_rollup("Rss: 1 kB\n").is_none());
    }
}
