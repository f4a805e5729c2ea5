//! ember-iobench: a guest-side disk benchmark with no dependencies, shipped in the default
//! rootfs for `ember-bench devices`. O_DIRECT so that the device, not the page cache, is
//! measured; prints one `BENCH name=value` line.
//!
//! `ember-iobench seqread|seqwrite|randread|randwrite DEVICE SECONDS BLOCK_BYTES`

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// O_DIRECT needs buffers aligned to the logical block size; 4 KiB covers all devices.
const ALIGN: usize = 4096;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, device, seconds, block] = args.as_slice() else {
        bail!(
            "usage: ember-iobench seqread|seqwrite|randread|randwrite DEVICE SECONDS BLOCK_BYTES"
        );
    };
    let duration = Duration::from_secs(seconds.parse().context("SECONDS")?);
    let block: usize = block.parse().context("BLOCK_BYTES")?;
    if block == 0 || block % ALIGN != 0 {
        bail!("BLOCK_BYTES must be a positive multiple of {ALIGN}");
    }
    let write = mode.ends_with("write");
    let random = mode.starts_with("rand");
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("cannot open {device}"))?;
    let size = std::fs::read_to_string(format!(
        "/sys/class/block/{}/size",
        device.trim_start_matches("/dev/")
    ))
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok())
    .map(|sectors| sectors * 512)
    .context("cannot read the device size")?;
    let blocks = size / block as u64;
    if blocks == 0 {
        bail!("{device} is smaller than one block");
    }
    let mut storage = vec![0xa5u8; block + ALIGN];
    let start = storage.as_ptr().align_offset(ALIGN);
    let buf = &mut storage[start..start + block];
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut ops, mut index) = (0u64, 0u64);
    let begin = Instant::now();
    while begin.elapsed() < duration {
        let n = if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            index = (index + 1) % blocks;
            index
        };
        let offset = n * block as u64;
        if write {
            file.write_all_at(buf, offset)?;
        } else {
            file.read_exact_at(buf, offset)?;
        }
        ops += 1;
    }
    let secs = begin.elapsed().as_secs_f64();
    let mib_s = (ops * block as u64) as f64 / secs / (1 << 20) as f64;
    println!(
        "BENCH {mode}_iops={:.0} {mode}_mib_s={mib_s:.1}",
        ops as f64 / secs
    );
    Ok(())
}
