//! virtio-blk with real guests: the guest boots from the ext4 root drive, writes through
//! its block devices, and the host checks the image files afterwards.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testbed::{drive, shell_quote, Artifacts, GuestSpec, Job};

fn artifacts() -> Artifacts {
    Artifacts::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// Copies the standard rootfs into the job (the guest writes to it).
fn private_rootfs(job: &Job, art: &Artifacts) -> PathBuf {
    art.private_rootfs(job.dir())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn sparse_file(path: &Path, bytes: u64) {
    fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

/// Boots `guest` once in `job` and returns ember's stdout after checking it ran cleanly.
fn boot(job: &Job, guest: &GuestSpec) -> String {
    job.write_file("vm.json", &guest.config_json());
    let out = job.run().unwrap_or_else(|e| panic!("{e}"));
    let console = fs::read_to_string(job.dir().join("vm.out")).unwrap_or_default();
    assert_eq!(out.status, 0, "ember failed:\n{console}\n{out}");
    assert!(
        console.contains("ember-init: run exited with status 0"),
        "the guest script failed:\n{console}"
    );
    console
}

fn ember_script(art: &Artifacts) -> String {
    format!(
        "{} --no-api --config-file vm.json > vm.out 2> vm.err < /dev/null",
        shell_quote(&art.ember)
    )
}

/// md5 of `len` bytes of `path` at `offset`, as md5sum prints it.
fn md5_of(path: &Path, offset: u64, len: u64) -> String {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut slice = vec![0u8; len as usize];
    file.read_exact(&mut slice).unwrap();
    let mut md5sum = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    md5sum.stdin.take().unwrap().write_all(&slice).unwrap();
    let out = md5sum.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The md5 sums the guest printed, in order.
fn guest_md5s(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_suffix('-')
                .or_else(|| l.trim().strip_suffix("/tmp/a"))
        })
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|h| h.len() == 32)
        .collect()
}

#[test]
fn guest_writes_reach_the_image_and_read_only_drives_stay_untouched() {
    let art = artifacts();
    let job = Job::new("block-rw", ember_script(&art)).timeout(Duration::from_secs(600));
    let root = private_rootfs(&job, &art);
    let data = job.dir().join("data.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&data)
        .arg("32M")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let raw = job.dir().join("raw.img");
    sparse_file(&raw, 16 << 20);
    let ro = job.dir().join("ro.img");
    fs::write(&ro, vec![0xab; 1 << 20]).unwrap();
    let token = format!("ember-token-{}", std::process::id());
    let script = format!(
        "set -e; mount /dev/vdb /mnt; echo {token} > /mnt/hello.txt; sync; umount /mnt; \
         head -c 1048576 /dev/urandom > /tmp/a; md5sum /tmp/a; \
         dd if=/tmp/a of=/dev/vdc bs=65536 seek=16 conv=notrunc oflag=direct 2>/dev/null; sync; \
         if dd if=/dev/zero of=/dev/vdd bs=512 count=1 conv=notrunc oflag=direct 2>/dev/null; \
         then echo RO-WRITE-ACCEPTED; else echo RO-WRITE-REFUSED; fi; \
         cat /sys/block/vdd/ro"
    );
    let mut guest = GuestSpec::with_root_running(&art, &root, &script);
    guest.drives.push(drive("data", &data, false, false));
    guest.drives.push(drive("raw", &raw, false, false));
    guest.drives.push(drive("readonly", &ro, false, true));
    let console = boot(&job, &guest);

    let file = Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&file.stdout).trim(),
        token,
        "file written in the guest"
    );
    let sums = guest_md5s(&console);
    assert_eq!(sums.len(), 1, "{console}");
    assert_eq!(
        md5_of(&raw, 1 << 20, 1 << 20),
        sums[0],
        "raw bytes at 1 MiB"
    );
    assert!(console.contains("RO-WRITE-REFUSED"), "{console}");
    assert_eq!(
        fs::read(&ro).unwrap(),
        vec![0xab; 1 << 20],
        "read-only image changed"
    );
}

#[test]
fn mixed_load_on_a_1gib_drive_keeps_data_intact() {
    let art = artifacts();
    let job = Job::new("block-load", ember_script(&art)).timeout(Duration::from_secs(900));
    let root = private_rootfs(&job, &art);
    let data = job.dir().join("big.img");
    sparse_file(&data, 1 << 30);
    // Direct I/O both ways so that reads come from the device, not the guest page cache;
    // writes at 4 KiB and 1 MiB granularity, near the start and near the end of the disk.
    let script = "set -e; head -c 8388608 /dev/urandom > /tmp/a; md5sum /tmp/a; \
         dd if=/tmp/a of=/dev/vdb bs=4096 seek=1000 conv=notrunc oflag=direct 2>/dev/null; \
         dd if=/tmp/a of=/dev/vdb bs=1048576 seek=1000 conv=notrunc,fsync oflag=direct 2>/dev/null; \
         sync; echo 3 > /proc/sys/vm/drop_caches; \
         dd if=/dev/vdb bs=4096 skip=1000 count=2048 iflag=direct 2>/dev/null | md5sum; \
         dd if=/dev/vdb bs=1048576 skip=1000 count=8 iflag=direct 2>/dev/null | md5sum; \
         dd if=/dev/vdb bs=65536 skip=100 count=16 iflag=direct 2>/dev/null | md5sum";
    let mut guest = GuestSpec::with_root_running(&art, &root, script);
    guest.drives.push(drive("big", &data, false, false));
    let console = boot(&job, &guest);

    let sums = guest_md5s(&console);
    assert_eq!(sums.len(), 4, "{console}");
    assert_eq!(sums[1], sums[0], "4 KiB writes read back");
    assert_eq!(sums[2], sums[0], "1 MiB writes near the end read back");
    assert_eq!(
        sums[3],
        md5_of(&data, 100 * 65536, 16 * 65536),
        "untouched region is still zero"
    );
    assert_eq!(
        md5_of(&data, 1000 * 4096, 8 << 20),
        sums[0],
        "host sees the 4 KiB writes"
    );
    assert_eq!(
        md5_of(&data, 1000 << 20, 8 << 20),
        sums[0],
        "host sees the 1 MiB writes"
    );
}

#[test]
fn initramfs_stage_hands_over_to_the_block_root() {
    let art = artifacts();
    let job = Job::new("switch-root", ember_script(&art)).timeout(Duration::from_secs(600));
    let root = private_rootfs(&job, &art);
    // busybox exists only on the block root, not in the initramfs.
    let mut guest =
        GuestSpec::with_root_running(&art, &root, "test -x /bin/busybox; grep ' / ' /proc/mounts");
    guest.initrd = Some(art.initramfs.clone());
    let console = boot(&job, &guest);
    assert!(
        console.contains("ember-init: switching root to /dev/vda"),
        "{console}"
    );
    assert!(
        console.contains("/dev/root / ext4 rw") || console.contains("/dev/vda / ext4 rw"),
        "{console}"
    );
    assert_eq!(
        console.matches("ember-init: ready in").count(),
        1,
        "one ready line, from the new root: {console}"
    );
}
