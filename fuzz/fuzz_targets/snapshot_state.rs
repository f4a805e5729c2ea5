//! Snapshot state files: any bytes through `snapshot::decode` (the envelope checks), and
//! payloads wrapped in a valid envelope so the fuzzer reaches the postcard decoding of
//! device, VM and vCPU states. Decoded virtio-blk states are then restored onto a scratch
//! disk (device and transport), and a restored running device serves its queue once.
#![no_main]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crc::{Crc, CRC_64_XZ};
use ember_fuzz::{guest_memory, interrupt, scratch_dir};
use libfuzzer_sys::fuzz_target;
use vmm::device_manager::{DeviceStates, VirtioDeviceState};
use vmm::devices::virtio::block::{Block, BlockState};
use vmm::devices::virtio::mmio::{MmioTransport, MmioTransportArgs, MmioTransportState};
use vmm::devices::virtio::persist::VirtioArgs;
use vmm::devices::virtio::VirtioDevice;
use vmm::snapshot::{decode, Persist, FORMAT_VERSION, MAGIC};
use vmm::vstate::vcpu::VcpuState;
use vmm::vstate::vm_state::VmState;

const DISK_BYTES: u64 = 8 * 512;

fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = scratch_dir().join("snapshot-disk.img");
        let mut file = std::fs::File::create(&path).expect("disk image");
        file.write_all(&[0u8; DISK_BYTES as usize])
            .expect("disk image");
        path
    })
}

/// A state file image around `payload`, with a correct length and checksum.
fn envelope(payload: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(36 + payload.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&0u64.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(payload);
    let crc = Crc::<u64>::new(&CRC_64_XZ).checksum(&file);
    file.extend_from_slice(&crc.to_le_bytes());
    file
}

/// Restores a saved drive onto the scratch disk (never the path the state names) and its
/// transport, and lets a running one serve its queue.
fn restore_block(state: &BlockState, transport: &MmioTransportState) {
    let mut state = state.clone();
    state.path = disk().clone();
    state.size = DISK_BYTES;
    state.capacity = DISK_BYTES / 512;
    let mem = guest_memory(&[]);
    let irq = interrupt();
    let args = VirtioArgs {
        mem: mem.clone(),
        interrupt: irq.clone(),
    };
    let Ok(block) = Block::restore(args, &state) else {
        return;
    };
    let block = Arc::new(Mutex::new(block));
    let args = MmioTransportArgs {
        device: block.clone(),
        mem,
        interrupt: irq,
    };
    if MmioTransport::restore(args, transport).is_err() {
        return;
    }
    let mut block = block.lock().expect("unpoisoned");
    if block.is_activated() {
        block.process_queue();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz.state");
    match selector % 4 {
        0 => {
            let _ = decode::<DeviceStates>(rest, path);
        }
        1 => {
            let Ok((_, states)) = decode::<DeviceStates>(&envelope(rest), path) else {
                return;
            };
            for device in &states.virtio {
                if let VirtioDeviceState::Block(block) = &device.device {
                    restore_block(block, &device.transport);
                }
            }
        }
        2 => {
            let _ = decode::<VmState>(&envelope(rest), path);
        }
        _ => {
            let _ = decode::<Vec<VcpuState>>(&envelope(rest), path);
        }
    }
});
