//! API socket: raw bytes from a client through HTTP framing (`Connection::read_request`,
//! several requests per connection, delivered in chunks), routing and JSON bodies
//! (`requests::route`), then the accepted bodies through the configuration checks the VMM
//! applies (`VmConfig::validate_present`) and the answer written back. Byte 0 bit 7 instead
//! reads the stream as responses, the way `emberctl` reads the VMM's.
#![no_main]

use std::io::{self, Read, Write};

use api::http::{Connection, Response};
use api::models::VmConfig;
use api::requests::{route, VmmAction};
use libfuzzer_sys::fuzz_target;

/// A client socket: hands out at most `chunk` bytes per read, swallows writes.
struct Socket<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Applies an accepted action to a configuration being built, as the VMM does before boot.
fn apply(config: &mut VmConfig, action: VmmAction) {
    match action {
        VmmAction::PutBootSource(boot) => config.boot_source = Some(boot),
        VmmAction::PutMachineConfig(machine) => config.machine_config = machine,
        VmmAction::PatchMachineConfig(patch) => {
            config.machine_config = patch.apply(&config.machine_config)
        }
        VmmAction::PutDrive(drive) => {
            config.drives.retain(|d| d.drive_id != drive.drive_id);
            config.drives.push(drive);
        }
        VmmAction::PutNetworkInterface(iface) => {
            config
                .network_interfaces
                .retain(|i| i.iface_id != iface.iface_id);
            config.network_interfaces.push(iface);
        }
        VmmAction::PutVsock(vsock) => config.vsock = Some(vsock),
        VmmAction::PutLogger(logger) => config.logger = Some(logger),
        VmmAction::PutMetrics(metrics) => config.metrics = Some(metrics),
        _ => return,
    }
    if config.validate_present().is_err() {
        *config = VmConfig::default();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let socket = Socket {
        data: stream,
        chunk: usize::from(mode & 0x7f).max(1) * 64,
    };
    let mut connection = Connection::new(socket);
    if mode & 0x80 != 0 {
        while connection.read_response().is_ok() {}
        return;
    }
    let mut config = VmConfig::default();
    while let Ok(request) = connection.read_request() {
        let response = match route(&request.method, &request.path, &request.body) {
            Ok(action) => {
                apply(&mut config, action);
                Response::no_content()
            }
            Err(error) => Response::fault(error.status, &error.message),
        };
        response
            .write_to(connection.stream(), request.close)
            .expect("a sink never fails");
        if request.close {
            break;
        }
    }
});
