//! The API socket, Firecracker's dialect: the API thread ([`server`]) turns HTTP requests
//! into [`api::requests::VmmAction`]s and sends them over a channel, writing an eventfd;
//! the VMM thread ([`run`]) drains the channel between event-loop rounds and answers each
//! through the one state machine in [`controller`]. The config file's sections become the
//! same actions ([`preconfigure`]). `ember --no-api` takes the same path without the API
//! thread: nothing ever arrives on its channel, and the loop serves the VM, its periodic
//! metrics lines and the last one as the VM ends.

pub mod connections;
pub mod controller;
pub mod logger;
pub mod server;

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use api::models::{LogLevel, VmConfig};
use api::requests::{actions_from_config, Fault, SnapshotCreateParams};

use crate::metrics::{DeviceCounters, VcpuExitCounters};
use crate::{VmOutcome, Vmm, VmmError};
pub use controller::{Controller, Launcher, Machine, Restorer, VmState};
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

    fn save_snapshot(&mut self, params: &SnapshotCreateParams) -> Result<(), VmmError> {
        Vmm::save_snapshot(
            self,
            &params.snapshot_path,
            &params.mem_file_path,
            params.snapshot_type,
        )
    }

    fn device_counters(&self) -> DeviceCounters {
        Vmm::device_counters(self)
    }

    fn exit_counters(&self) -> Arc<VcpuExitCounters> {
        Vmm::exit_counters(self)
    }

    fn run_events(&mut self, timeout_ms: i32) -> Result<Option<VmOutcome>, VmmError> {
        Vmm::run_events(self, timeout_ms)
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

/// Feeds a config file through the controller as the API would (logger and metrics
/// first), then starts the VM. Stops at the first refusal; ember then ends, so the metrics
/// destination named so far gets its last line.
pub fn preconfigure<M: Machine>(
    controller: &mut Controller<M>,
    config: &VmConfig,
) -> Result<(), PreconfigureError> {
    let result = configure_and_start(controller, config);
    if result.is_err() {
        controller.flush_at_exit();
    }
    result
}

fn configure_and_start<M: Machine>(
    controller: &mut Controller<M>,
    config: &VmConfig,
) -> Result<(), PreconfigureError> {
    for action in actions_from_config(config) {
        controller
            .apply_config(action)
            .map_err(PreconfigureError::Refused)?;
    }
    controller.launch()?;
    logger::log(LogLevel::Info, "config", "InstanceStart: done");
    Ok(())
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
/// the guest stops. However it ends, the metrics destination gets a last line.
pub fn run<M: Machine>(
    controller: &mut Controller<M>,
    requests: &Receiver<ApiRequest>,
) -> Result<VmOutcome, RunError> {
    let result = serve(controller, requests);
    if let Ok(outcome) = &result {
        logger::log(LogLevel::Info, "vmm", &format!("the VM ended: {outcome:?}"));
    }
    controller.flush_at_exit();
    result
}

fn serve<M: Machine>(
    controller: &mut Controller<M>,
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
            Some(vm) => {
                if let Some(outcome) = vm.run_events(timeout_ms)? {
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
