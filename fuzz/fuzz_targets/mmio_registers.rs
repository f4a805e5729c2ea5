//! virtio-mmio: a hostile driver's register accesses (any offset in the window, any size,
//! any order: status writes, feature selection, queue setup, resets, config space) against
//! `MmioTransport`, with the device's queue work run in between whenever the driver got it
//! started.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use ember_fuzz::{guest_memory, interrupt, scratch_dir, FakeTap};
use libfuzzer_sys::fuzz_target;
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::block::{Block, DriveSpec};
use vmm::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW};
use vmm::devices::virtio::net::{Net, NetSpec};
use vmm::devices::virtio::VirtioDevice;

/// Bytes per access: kind, offset (u16), value (u32).
const OP_BYTES: usize = 7;

enum Device {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net<FakeTap>>>),
}

impl Device {
    fn new(choice: u8) -> Self {
        if choice & 1 == 0 {
            let path = scratch_dir().join("mmio-disk.img");
            if !path.exists() {
                let mut file = std::fs::File::create(&path).expect("disk image");
                file.write_all(&[0x5a; 4 * 512]).expect("disk image");
            }
            let spec = DriveSpec {
                drive_id: "fuzz0".into(),
                path,
                read_only: false,
                flush_to_disk: false,
            };
            Device::Block(Arc::new(Mutex::new(Block::new(&spec).expect("block"))))
        } else {
            let spec = NetSpec {
                iface_id: "eth0".into(),
                host_dev_name: "fuzz-tap".into(),
                guest_mac: None,
            };
            let tap = FakeTap::new([vec![0u8; 64], vec![1u8; 12]]);
            Device::Net(Arc::new(Mutex::new(
                Net::with_backend(&spec, tap).expect("net"),
            )))
        }
    }

    fn shared(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Device::Block(d) => d.clone(),
            Device::Net(d) => d.clone(),
        }
    }

    /// What the device's event handler does on a queue kick.
    fn kick(&self) {
        match self {
            Device::Block(d) => {
                d.lock().expect("unpoisoned").process_queue();
            }
            Device::Net(d) => {
                let mut net = d.lock().expect("unpoisoned");
                net.process_tx();
                net.process_rx();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: the device; byte 1: how many accesses; the accesses; then memory.
    let [choice, count, rest @ ..] = data else {
        return;
    };
    let ops_len = (usize::from(*count) * OP_BYTES).min(rest.len() / OP_BYTES * OP_BYTES);
    let (ops, image) = rest.split_at(ops_len);
    let device = Device::new(*choice);
    let mem = guest_memory(image);
    let mut transport = MmioTransport::new(device.shared(), mem, interrupt());
    for op in ops.chunks_exact(OP_BYTES) {
        let kind = op[0];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % MMIO_WINDOW;
        let size = 1usize << ((kind >> 1) & 3);
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[3..7]);
        value[4..].copy_from_slice(&op[3..7]);
        if kind & 1 == 1 {
            transport.write(offset, &value[..size]);
        } else {
            transport.read(offset, &mut value[..size]);
        }
        if kind & 8 != 0 {
            let started = device.shared().lock().expect("unpoisoned").is_activated();
            if started {
                device.kick();
            }
        }
    }
});
