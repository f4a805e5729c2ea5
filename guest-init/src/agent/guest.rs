//! The agent inside a guest: listens on vsock, tells the host it is ready, serves. Without a
//! vsock device the guest boots as usual; the agent says so in one console line.

use std::sync::Arc;

use guest_init::proto::{self, FrameKind, Ready, AGENT_PORT, PROTOCOL_VERSION, READY_PORT};

use super::{serve, Agent, PowerHandler};
use crate::reaper::Reaper;
use crate::vsock::{VsockListener, VsockStream, HOST_CID};

/// Starts the agent on a background thread; returns at once.
pub fn start_in_guest(reaper: &'static Reaper, power: PowerHandler) {
    let started = std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || run(reaper, power));
    if let Err(e) = started {
        say!("ember-init: agent: cannot start its thread: {e}; running without the agent");
    }
}

fn run(reaper: &'static Reaper, power: PowerHandler) {
    let listener = match VsockListener::bind(AGENT_PORT) {
        Ok(listener) => listener,
        Err(e) => {
            say!(
                "ember-init: agent: cannot listen on vsock port {AGENT_PORT}: {e}; \
                 running without the agent (does the VM have a vsock device?)"
            );
            return;
        }
    };
    let agent = Arc::new(Agent::new(reaper, Some(power)));
    let boot_ms = agent.ready_ms;
    // The host may not listen (or the connect may take the kernel's 2 s timeout): announce
    // from a thread of its own so that serving starts at once.
    let _ = std::thread::Builder::new()
        .name("agent-ready".into())
        .spawn(move || announce_ready(boot_ms));
    serve(listener, agent);
}

/// Sends one READY frame to the host's readiness port.
fn announce_ready(boot_ms: u64) {
    let ready = Ready {
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        boot_ms,
    };
    let sent = VsockStream::connect(HOST_CID, READY_PORT)
        .and_then(|mut host| proto::write_json(&mut host, FrameKind::Ready, &ready));
    match sent {
        Ok(()) => {}
        // The listener binds without a transport; only a connect finds out.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => say!(
            "ember-init: agent: the VM has no vsock device; the agent is unreachable \
             (add a `vsock` section to the VM's configuration)"
        ),
        Err(e) => say!(
            "ember-init: agent: ready, but nobody on the host took the call on vsock port \
             {READY_PORT} ({e})"
        ),
    }
}
