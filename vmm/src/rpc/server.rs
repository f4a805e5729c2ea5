//! The API thread: accepts connections on the API socket, reads HTTP requests
//! ([`api::http`]), routes them to actions ([`api::requests::route`]), hands each action to
//! the VMM thread (channel + eventfd) and writes back its answer. A thread serves each
//! connection so that one idle keep-alive client cannot hold up the others, and
//! [`connections`](super::connections) bounds how many are open and how long a request
//! may take; nothing here touches the VM.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use api::http::{Connection, Request, Response};
use api::requests::{route, Fault, VmmAction, VmmData};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::ApiCounters;

use super::connections::{admit, Admitted, Deadline, Registry};
pub use super::connections::{MAX_CONNECTIONS, REQUEST_TIMEOUT};

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--api-sock: {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("--api-sock: cannot remove the stale socket {0}: {1}")]
    RemoveStale(PathBuf, std::io::Error),
    #[error("--api-sock: cannot listen on {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    #[error("cannot start the API thread: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// An action for the VMM thread and where its answer goes.
pub struct ApiRequest {
    pub action: VmmAction,
    pub reply: Sender<Result<VmmData, Fault>>,
}

/// What every connection thread shares.
#[derive(Clone)]
struct Shared {
    requests: Sender<ApiRequest>,
    wake: Arc<EventFd>,
    counters: Arc<ApiCounters>,
    connections: Arc<Mutex<Registry>>,
}

/// Listens on `path`, replacing a stale socket left there by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        fs::remove_file(path).map_err(|e| ServerError::RemoveStale(path.to_path_buf(), e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
    crate::bound_sockets::record(path);
    Ok(listener)
}

/// Serves `listener` on the API thread; requests go to `requests`, and `wake` is written
/// after each so that the VMM's event loop looks at the channel.
pub fn spawn(
    listener: UnixListener,
    requests: Sender<ApiRequest>,
    wake: EventFd,
    counters: Arc<ApiCounters>,
) -> Result<(), ServerError> {
    let shared = Shared {
        requests,
        wake: Arc::new(wake),
        counters,
        connections: Arc::default(),
    };
    // The thread installs its filter before it accepts a client and says how that went.
    let (filtered_tx, filtered) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("ember_api".into())
        .spawn(move || {
            let installed = crate::seccomp::install(crate::seccomp::ThreadKind::Api);
            let ok = installed.is_ok();
            let _ = filtered_tx.send(installed);
            if ok {
                accept_loop(&listener, &shared);
            }
        })
        .map_err(ServerError::Spawn)?;
    match filtered.recv() {
        Ok(installed) => installed.map_err(ServerError::from),
        Err(_) => Err(ServerError::Spawn(std::io::Error::other(
            "the API thread ended before it started serving",
        ))),
    }
}

fn accept_loop(listener: &UnixListener, shared: &Shared) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let admitted = match admit(&shared.connections, stream) {
            Ok(admitted) => admitted,
            Err(stream) => {
                refuse_busy(stream);
                continue;
            }
        };
        let shared_for_thread = shared.clone();
        // A failed spawn drops the closure, and with it the connection and its place.
        let _ = std::thread::Builder::new()
            .name("ember_api_conn".into())
            .spawn(move || serve_connection(&admitted, &shared_for_thread));
    }
}

fn refuse_busy(mut stream: UnixStream) {
    let message = format!(
        "all {MAX_CONNECTIONS} API connections are busy with requests; retry when one is answered"
    );
    let _ = Response::fault(400, &message).write_to(&mut stream, true);
}

/// Answers requests on one connection until the client closes it, a request is bad or
/// late, or a new client takes the connection's place while it waits for its client.
fn serve_connection(admitted: &Admitted, shared: &Shared) {
    // Answers go out as fast as the client takes them, for as long as a request may take.
    let _ = admitted.stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut conn = Connection::new(Deadline::new(&admitted.stream));
    loop {
        conn.stream().restart();
        admitted.set_waiting(true);
        let request = conn.read_request();
        admitted.set_waiting(false);
        let (response, close) = match request {
            Ok(request) => (answer(&request, shared), request.close),
            // The client hung up (between requests or mid-body), or was too slow, or its
            // connection was given to another client: nobody to answer.
            Err(e) if e.is_disconnect() => return,
            Err(e) => {
                shared.counters.record(false);
                (Response::fault(400, &e.to_string()), true)
            }
        };
        admitted.set_waiting(true);
        if response.write_to(conn.stream(), close).is_err() || close {
            return;
        }
    }
}

/// Routes one request and waits for the VMM thread's answer.
pub fn answer(request: &Request, vmm: &impl Forward) -> Response {
    match route(&request.method, &request.path, &request.body) {
        Ok(action) => match vmm.forward(action) {
            Ok(data) => data.into_response(),
            Err(fault) => Response::fault(400, &fault.0),
        },
        Err(e) => {
            vmm.route_failed();
            Response::fault(e.status, &e.message)
        }
    }
}

/// Hands an action to the VMM thread; a trait so routing is testable without one.
pub trait Forward {
    fn forward(&self, action: VmmAction) -> Result<VmmData, Fault>;
    fn route_failed(&self);
}

impl Forward for Shared {
    fn forward(&self, action: VmmAction) -> Result<VmmData, Fault> {
        let (reply, answer) = channel();
        let gone = || Fault("the VMM is shutting down".into());
        self.requests
            .send(ApiRequest { action, reply })
            .map_err(|_| gone())?;
        // The eventfd counter cannot overflow in practice; the channel holds the request.
        let _ = self.wake.write(1);
        answer.recv().map_err(|_| gone())?
    }

    fn route_failed(&self) {
        self.counters.record(false);
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
