//! virtio-blk: a hostile driver's queue layout and guest memory (descriptor tables, rings,
//! request headers) against `Block::process_queue`, over a small real disk file.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember_fuzz::{activate, guest_memory, scratch_dir, take_layouts};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::{Block, DriveSpec};

/// The disk: 8 sectors, so requests past the end are easy to reach.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = scratch_dir().join("disk.img");
        let mut file = std::fs::File::create(&path).expect("disk image");
        file.write_all(&[0xa5; 8 * 512]).expect("disk image");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: bit 0 read-only, bit 1 flush to disk; then the queue layout; then memory.
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let Some((layouts, image)) = take_layouts(data, 1) else {
        return;
    };
    let spec = DriveSpec {
        drive_id: "fuzz0".into(),
        path: disk().clone(),
        read_only: flags & 1 != 0,
        flush_to_disk: flags & 2 != 0,
    };
    let mut block = Block::new(&spec).expect("the disk image opens");
    let mem = guest_memory(image);
    if !activate(&mut block, &layouts, &mem) {
        return;
    }
    block.process_queue();
    // A second kick sees the rings as the first pass left them.
    block.process_queue();
});
