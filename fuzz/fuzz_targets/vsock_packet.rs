//! virtio-vsock: hostile transmit chains (packet headers, lengths, operations, credit) and
//! receive/event buffers through `Vsock::process_tx`, `process_rx` and `process_evq`, with a
//! real host listener on port 1024 so connection requests reach the connection code.
#![no_main]

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember_fuzz::{activate, guest_memory, scratch_dir, take_layouts};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::muxer::Watcher;
use vmm::devices::virtio::vsock::unix::service_path;
use vmm::devices::virtio::vsock::{Vsock, VsockSpec};

/// The device's socket path, and a host service listening on guest port 1024.
fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let uds = scratch_dir().join("v.sock");
        let listener = UnixListener::bind(service_path(&uds, 1024)).expect("service listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        (uds, listener)
    })
}

/// The event loop stand-in: watching is all the muxer asks of it.
struct NoLoop;

impl Watcher for NoLoop {
    fn watch(&mut self, _fd: RawFd, _token: u32) -> io::Result<()> {
        Ok(())
    }
    fn unwatch(&mut self, _fd: RawFd) {}
}

fuzz_target!(|data: &[u8]| {
    // Three queue layouts (rx, tx, event), then memory.
    let Some((layouts, image)) = take_layouts(data, 3) else {
        return;
    };
    let (uds, listener) = host();
    let spec = VsockSpec {
        guest_cid: 3,
        uds_path: uds.clone(),
    };
    let mut vsock = Vsock::new(&spec).expect("vsock device");
    let mem = guest_memory(image);
    if activate(&mut vsock, &layouts, &mem) {
        let mut watcher = NoLoop;
        vsock.process_tx(&mut watcher);
        vsock.process_rx(&mut watcher);
        vsock.process_evq();
        vsock.process_tx(&mut watcher);
        vsock.process_rx(&mut watcher);
    }
    // Connections the guest opened: accept and drop them, so the backlog never fills.
    while listener.accept().is_ok() {}
});
