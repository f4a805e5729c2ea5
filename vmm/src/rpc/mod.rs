//! The API socket, Firecracker's dialect: the API thread ([`server`]) turns HTTP requests
//! into [`api::requests::VmmAction`]s and sends them over a channel, writing an eventfd;
//! the VMM thread ([`run`]) drains the channel between event-loop rounds and answers each
//! through the one state machine in [`controller`]. The config file's sections become the
//! same actions ([`preconfigure`]).

pub mod controller;
pub mod logger;
pub mod server;

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use api::models::VmConfig;
use api::requests::{actions_from_config, Fault, LogLevel};

use crate::metrics::{DeviceCounters, VcpuExitCounters};
use crate::{VmOutcome, Vmm, VmmError};
pub use controller::{Controller, Launcher, Machine, VmState};
pub use server::ApiRequest;

impl Machine for Vmm {
    fn pause(&mut self) -> Result<(), VmmError> {
        Vmm::pause(self)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Vmm::resume(self)
    }

    fn send_ctrl_alt_del(&mut self) {
        Vmm::send_ctrl_alt_del(self);
    }

    fn update_drive(&mut self, drive_id: &str, path: &Path) -> Result<(), VmmError> {
        Vmm::update_drive(self, drive_id, path)
    }

    fn device_counters(&self) -> DeviceCounters {
        Vmm::device_counters(self)
    }

    fn exit_counters(&self) -> Arc<VcpuExitCounters> {
        Vmm::exit_counters(self)
    }
}

/// Why a config file could not boot through the controller.
#[derive(Debug, thiserror::Error)]
pub enum PreconfigureError {
    /// A section was refused; the message names the section and field.
    #[error("{0}")]
    Refused(Fault),
    /// Building or starting the VM failed.
    #[error(transparent)]
    Start(#[from] VmmError),
}

/// Feeds a config file through the controller as the API would, then starts the VM.
/// Stops at the first refusal.
pub fn preconfigure<M: Machine>(
    controller: &mut Controller<M>,
    config: &VmConfig,
) -> Result<(), PreconfigureError> {
    for action in actions_from_config(config) {
        controller
            .handle(action)
            .map_err(PreconfigureError::Refused)?;
    }
    Ok(controller.launch()?)
}

/// Why the VMM thread's loop ended without the VM ending.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("the API thread stopped before the VM was started")]
    ApiGone,
}

/// The VMM thread: answers API requests and, once started, runs the VM's event loop until
/// the guest stops.
pub fn run(
    controller: &mut Controller<Vmm>,
    requests: &Receiver<ApiRequest>,
) -> Result<VmOutcome, RunError> {
    loop {
        let timeout_ms = controller.next_flush_in_ms();
        match controller.machine_mut() {
            None => {
                let timeout =
                    u64::try_from(timeout_ms).map_or(Duration::MAX, Duration::from_millis);
                match requests.recv_timeout(timeout) {
                    Ok(request) => answer(controller, request),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Err(RunError::ApiGone),
                }
            }
            Some(vmm) => {
                if let Some(outcome) = vmm.run_events(timeout_ms)? {
                    logger::log(LogLevel::Info, "vmm", &format!("the VM ended: {outcome:?}"));
                    return Ok(outcome);
                }
                while let Ok(request) = requests.try_recv() {
                    answer(controller, request);
                }
            }
        }
        controller.flush_if_due();
    }
}

fn answer<M: Machine>(controller: &mut Controller<M>, request: ApiRequest) {
    let result = controller.handle(request.action);
    // The client may have hung up; the action has been carried out all the same.
    let _ = request.reply.send(result);
}
