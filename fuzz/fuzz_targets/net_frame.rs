//! virtio-net: frames from the host side (a fake TAP) into hostile receive buffers, and
//! hostile transmit chains out to it, through `Net::process_rx` and `Net::process_tx`.
#![no_main]

use ember_fuzz::{activate, guest_memory, take_frames, take_layouts, FakeTap};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::{Net, NetSpec};

fuzz_target!(|data: &[u8]| {
    // Two queue layouts (rx, tx), up to 4 length-prefixed host frames, then memory.
    let Some((layouts, rest)) = take_layouts(data, 2) else {
        return;
    };
    let (frames, image) = take_frames(rest, 4);
    let spec = NetSpec {
        iface_id: "eth0".into(),
        host_dev_name: "fuzz-tap".into(),
        guest_mac: Some([0x06, 0, 0, 0, 0, 1]),
    };
    let mut net = Net::with_backend(&spec, FakeTap::new(frames)).expect("net device");
    let mem = guest_memory(image);
    if !activate(&mut net, &layouts, &mem) {
        return;
    }
    net.process_tx();
    net.process_rx();
    // A frame left pending for lack of buffers is retried on the next kick.
    net.process_rx();
});
