//! The VMM thread's side of the API: one `match (state, action)` that answers every
//! [`VmmAction`], whether it came from the socket ([`Controller::handle`]) or from the
//! config file ([`Controller::apply_config`]). It owns the metrics destination: lines are
//! written on FlushMetrics, every [`FLUSH_PERIOD`] and once more as ember ends. Before
//! InstanceStart it builds a [`VmConfig`] piece by piece, checking each piece (and the files
//! it names) as it arrives; InstanceStart hands the whole configuration to the launcher
//! ([`crate::Vmm::build`] in `ember`); afterwards it drives the running [`Machine`].

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use api::models::{LogLevel, LoggerConfig, MachineConfig, MetricsConfig, VmConfig};
use api::requests::{
    DrivePatch, Fault, InstanceInfo, NetworkInterfacePatch, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, VersionInfo, VmmAction, VmmData,
};

use super::logger;
use crate::metrics::{
    DeviceCounters, Metrics, MetricsError, MetricsSink, VcpuExitCounters, FLUSH_PERIOD,
};
use crate::{VmOutcome, VmmError};

/// The VM's lifecycle as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
}

impl VmState {
    /// Firecracker's words for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

/// What the controller needs of a started VM.
pub trait Machine {
    fn pause(&mut self) -> Result<(), VmmError>;
    fn resume(&mut self) -> Result<(), VmmError>;
    fn send_ctrl_alt_del(&mut self);
    fn update_drive(&mut self, drive_id: &str, path: &Path) -> Result<(), VmmError>;
    /// Writes a snapshot (full, or diff) of the paused VM: memory to `mem_file_path`, state
    /// to `snapshot_path`.
    fn save_snapshot(&mut self, params: &SnapshotCreateParams) -> Result<(), VmmError>;
    fn device_counters(&self) -> DeviceCounters;
    fn exit_counters(&self) -> Arc<VcpuExitCounters>;
    /// Serves the VM's events for up to `timeout_ms` (-1: until one arrives); `Some` once
    /// the VM has ended.
    fn run_events(&mut self, timeout_ms: i32) -> Result<Option<VmOutcome>, VmmError>;
}

/// Builds and starts the VM from a complete configuration.
pub type Launcher<M> = Box<dyn FnMut(&VmConfig) -> Result<M, VmmError>>;

/// Builds a VM from a snapshot and starts it, running or paused per `resume_vm`; returns it
/// with the configuration it really has (machine and devices, overrides applied, no boot
/// source), for `GET /vm/config`.
pub type Restorer<M> = Box<dyn FnMut(&SnapshotLoadParams) -> Result<(M, VmConfig), VmmError>>;

/// The state machine behind the API.
pub struct Controller<M: Machine> {
    id: String,
    state: VmState,
    config: VmConfig,
    machine: Option<M>,
    launch: Launcher<M>,
    restore: Option<Restorer<M>>,
    /// The VM was loaded from a snapshot rather than booted.
    loaded: bool,
    metrics: Metrics,
    sink: Option<MetricsSink>,
    last_flush: Instant,
}

fn fault(message: impl Into<String>) -> Fault {
    Fault(message.into())
}

fn after_start(section: &str) -> Fault {
    fault(format!("{section} cannot change after the VM started"))
}

/// Whether two paths name one file: spelled alike but for `.` parts (`s`, `./s`), or, for
/// files that exist, the same file by any name (links, symlinked directories). Only `statx`,
/// which the VMM thread's filter allows.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Component, PathBuf};
    let lexical = |p: &Path| -> PathBuf {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    };
    if lexical(a) == lexical(b) {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// Refuses a configuration change to a VM loaded from a snapshot: it has the machine and
/// devices it was saved with; the load's overrides were the time to change them.
fn after_load(change: &VmmAction) -> Fault {
    let message = match change {
        VmmAction::PutMachineConfig(_) | VmmAction::PatchMachineConfig(_) => {
            "machine-config cannot change: the VM was loaded from a snapshot and has the \
             vCPUs and memory it was saved with; track_dirty_pages is set in PUT /snapshot/load"
        }
        VmmAction::PutDrive(_) => {
            "drives cannot be added or replaced: the VM was loaded from a snapshot and has \
             the drives it was saved with; PATCH /drives/{drive_id} swaps a drive's backing file"
        }
        VmmAction::PutNetworkInterface(_) => {
            "network-interfaces cannot change: the VM was loaded from a snapshot and has the \
             interfaces it was saved with; give network_overrides in PUT /snapshot/load to \
             move one to another TAP"
        }
        VmmAction::PutVsock(_) => {
            "vsock cannot change: the VM was loaded from a snapshot and has the vsock device \
             it was saved with; give vsock_override in PUT /snapshot/load to move its socket"
        }
        _ => "this cannot change: the VM was loaded from a snapshot",
    };
    fault(message)
}

impl<M: Machine> Controller<M> {
    pub fn new(id: String, launch: Launcher<M>) -> Self {
        Self {
            id,
            state: VmState::NotStarted,
            config: VmConfig::default(),
            machine: None,
            launch,
            restore: None,
            loaded: false,
            metrics: Metrics::default(),
            sink: None,
            last_flush: Instant::now(),
        }
    }

    /// Lets `PUT /snapshot/load` build VMs with `restore`.
    pub fn with_restorer(mut self, restore: Restorer<M>) -> Self {
        self.restore = Some(restore);
        self
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn machine_mut(&mut self) -> Option<&mut M> {
        self.machine.as_mut()
    }

    /// The counters the API thread bumps for requests that never reach the controller.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one API request's action, counting and logging it.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmData, Fault> {
        let name = action_name(&action);
        let result = self.dispatch(action);
        self.metrics.api.record(result.is_ok());
        match &result {
            Ok(_) => logger::log(LogLevel::Info, "api", &format!("{name}: done")),
            Err(e) => {
                let prefix = format!("{name}: ");
                let reason = e.0.strip_prefix(&prefix).unwrap_or(&e.0);
                logger::log(
                    LogLevel::Warning,
                    "api",
                    &format!("{name} refused: {reason}"),
                );
            }
        }
        result
    }

    /// Carries out one action of the config file: the same as [`Controller::handle`], but
    /// not counted as an API request, and a refusal is only returned: it ends ember, whose
    /// last words report it once (on stderr and in the log file).
    pub fn apply_config(&mut self, action: VmmAction) -> Result<VmmData, Fault> {
        let name = action_name(&action);
        let result = self.dispatch(action);
        if result.is_ok() {
            logger::log(LogLevel::Info, "config", &format!("{name}: done"));
        }
        result
    }

    fn dispatch(&mut self, action: VmmAction) -> Result<VmmData, Fault> {
        use VmState::{NotStarted, Paused, Running};
        use VmmAction as A;
        match (self.state, action) {
            (_, A::GetInstanceInfo) => Ok(self.instance_info()),
            (_, A::GetVersion) => Ok(VmmData::Version(VersionInfo {
                firecracker_version: env!("CARGO_PKG_VERSION").into(),
            })),
            (_, A::GetVmConfig) => Ok(VmmData::VmConfig(Box::new(self.config.clone()))),
            (_, A::GetMachineConfig) => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            (_, A::PutLogger(config)) => set_logger(&config),
            (_, A::PutMetrics(config)) => self.set_metrics(&config),
            (_, A::FlushMetrics) => self.flush_metrics(),
            (NotStarted, A::PutBootSource(boot)) => self.configure(|c| c.boot_source = Some(boot)),
            (NotStarted, A::PutMachineConfig(machine)) => {
                self.configure(|c| c.machine_config = machine)
            }
            (NotStarted, A::PatchMachineConfig(patch)) => {
                self.configure(|c| c.machine_config = patch.apply(&c.machine_config))
            }
            (NotStarted, A::PutDrive(drive)) => self.configure(|c| {
                match c.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
                    Some(existing) => *existing = drive,
                    None => c.drives.push(drive),
                }
            }),
            (NotStarted, A::PatchDrive(patch)) => self.patch_drive_config(patch),
            (Running | Paused, A::PatchDrive(patch)) => self.swap_drive(&patch),
            (NotStarted, A::PutNetworkInterface(iface)) => self.configure(|c| {
                let ifaces = &mut c.network_interfaces;
                match ifaces.iter_mut().find(|n| n.iface_id == iface.iface_id) {
                    Some(existing) => *existing = iface,
                    None => ifaces.push(iface),
                }
            }),
            (_, A::PatchNetworkInterface(patch)) => self.patch_network_interface(&patch),
            (NotStarted, A::PutVsock(vsock)) => self.configure(|c| c.vsock = Some(vsock)),
            (NotStarted, A::InstanceStart) => self.start(),
            (Running | Paused, A::InstanceStart) if self.loaded => Err(fault(
                "InstanceStart: the VM was loaded from a snapshot and needs no start; \
                 PATCH /vm {\"state\": \"Resumed\"} runs a paused one",
            )),
            (Running | Paused, A::InstanceStart) => {
                Err(fault("InstanceStart: the VM is already running"))
            }
            (Running, A::SendCtrlAltDel) => {
                self.running()?.send_ctrl_alt_del();
                Ok(VmmData::Empty)
            }
            (Paused, A::SendCtrlAltDel) => Err(fault(
                "SendCtrlAltDel: the VM is paused and could not react; resume it first",
            )),
            (NotStarted, A::SendCtrlAltDel) => Err(fault(
                "SendCtrlAltDel: the VM is not started; InstanceStart first",
            )),
            (NotStarted, A::Pause | A::Resume) => Err(fault(
                "vm.state: the VM is not started; InstanceStart first",
            )),
            (Running, A::Pause) => self.set_paused(true),
            (Paused, A::Resume) => self.set_paused(false),
            (Paused, A::Pause) | (Running, A::Resume) => Ok(VmmData::Empty),
            (Running | Paused, A::PutBootSource(_)) if self.loaded => Err(fault(
                "boot-source: the VM was loaded from a snapshot and does not boot from a \
                 kernel; there is no boot source to set",
            )),
            (
                Running | Paused,
                change @ (A::PutMachineConfig(_)
                | A::PatchMachineConfig(_)
                | A::PutDrive(_)
                | A::PutNetworkInterface(_)
                | A::PutVsock(_)),
            ) if self.loaded => Err(after_load(&change)),
            (Running | Paused, A::PutBootSource(_)) => Err(after_start("boot-source")),
            (Running | Paused, A::PutMachineConfig(_) | A::PatchMachineConfig(_)) => {
                Err(after_start("machine-config"))
            }
            (Running | Paused, A::PutDrive(_)) => Err(fault(
                "drives cannot be added or replaced after the VM started; \
                 PATCH /drives/{drive_id} swaps a drive's backing file",
            )),
            (Running | Paused, A::PutNetworkInterface(_)) => Err(after_start("network-interfaces")),
            (Running | Paused, A::PutVsock(_)) => Err(after_start("vsock")),
            (Paused, A::CreateSnapshot(params)) => self.create_snapshot(&params),
            (Running, A::CreateSnapshot(_)) => Err(fault(
                "snapshot/create: the VM is running; pause it first (PATCH /vm {\"state\": \"Paused\"})",
            )),
            (NotStarted, A::CreateSnapshot(_)) => Err(fault(
                "snapshot/create: the VM is not started; there is nothing to snapshot",
            )),
            (NotStarted, A::LoadSnapshot(params)) => self.load_snapshot(&params),
            (Running | Paused, A::LoadSnapshot(_)) => Err(fault(
                "snapshot/load: this ember already runs a VM; load a snapshot into a fresh ember process",
            )),
        }
    }

    fn instance_info(&self) -> VmmData {
        VmmData::InstanceInfo(InstanceInfo {
            id: self.id.clone(),
            state: self.state.as_str().into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            app_name: "ember".into(),
        })
    }

    fn running(&mut self) -> Result<&mut M, Fault> {
        self.machine
            .as_mut()
            .ok_or_else(|| fault("the VM is not started; InstanceStart first"))
    }

    /// Applies `change` to a copy of the configuration and keeps it only if the copy is
    /// still valid and the files it names can be used.
    fn configure(&mut self, change: impl FnOnce(&mut VmConfig)) -> Result<VmmData, Fault> {
        let mut candidate = self.config.clone();
        change(&mut candidate);
        crate::check_config_present(&candidate).map_err(|e| fault(e.to_string()))?;
        self.config = candidate;
        Ok(VmmData::Empty)
    }

    fn patch_drive_config(&mut self, patch: DrivePatch) -> Result<VmmData, Fault> {
        check_drive_patch(&patch)?;
        if !self
            .config
            .drives
            .iter()
            .any(|d| d.drive_id == patch.drive_id)
        {
            return Err(no_drive(&patch.drive_id));
        }
        self.configure(|c| {
            for drive in c.drives.iter_mut().filter(|d| d.drive_id == patch.drive_id) {
                if let Some(path) = &patch.path_on_host {
                    drive.path_on_host.clone_from(path);
                }
            }
        })
    }

    /// Swaps a running drive's backing file and records the new path.
    fn swap_drive(&mut self, patch: &DrivePatch) -> Result<VmmData, Fault> {
        check_drive_patch(patch)?;
        let Some(path) = &patch.path_on_host else {
            return Ok(VmmData::Empty);
        };
        let index = self
            .config
            .drives
            .iter()
            .position(|d| d.drive_id == patch.drive_id)
            .ok_or_else(|| no_drive(&patch.drive_id))?;
        self.running()?
            .update_drive(&patch.drive_id, path)
            .map_err(|e| fault(e.to_string()))?;
        self.config.drives[index].path_on_host.clone_from(path);
        Ok(VmmData::Empty)
    }

    fn patch_network_interface(&mut self, patch: &NetworkInterfacePatch) -> Result<VmmData, Fault> {
        if patch.rx_rate_limiter.is_some() || patch.tx_rate_limiter.is_some() {
            return Err(fault(
                "network-interfaces: rate limiters are not supported by this version of \
                 Ember, so there is nothing to patch",
            ));
        }
        let known = self
            .config
            .network_interfaces
            .iter()
            .any(|n| n.iface_id == patch.iface_id);
        if !known {
            return Err(fault(format!(
                "network-interfaces: no interface {:?}; PUT /network-interfaces/{} before the VM starts",
                patch.iface_id, patch.iface_id
            )));
        }
        Ok(VmmData::Empty)
    }

    fn start(&mut self) -> Result<VmmData, Fault> {
        self.launch()
            .map_err(|e| fault(format!("InstanceStart: {e}")))?;
        Ok(VmmData::Empty)
    }

    /// Builds and starts the VM from the configuration so far (InstanceStart). Returns the
    /// VMM's own error, so that `ember --config-file` can tell configuration errors from
    /// host failures in its exit code.
    pub fn launch(&mut self) -> Result<(), VmmError> {
        if self.machine.is_some() {
            return Err(VmmError::AlreadyStarted);
        }
        let machine = (self.launch)(&self.config)?;
        self.metrics.devices = machine.device_counters();
        self.metrics.vcpu_exits = machine.exit_counters();
        self.machine = Some(machine);
        self.state = VmState::Running;
        Ok(())
    }

    fn create_snapshot(&mut self, params: &SnapshotCreateParams) -> Result<VmmData, Fault> {
        if params.snapshot_type == SnapshotType::Diff
            && !self.config.machine_config.track_dirty_pages
        {
            return Err(fault(
                "snapshot/create.snapshot_type: a Diff snapshot needs dirty page tracking, \
                 which is off for this VM; enable track_dirty_pages in PUT /machine-config \
                 before boot or in PUT /snapshot/load, or take a Full snapshot",
            ));
        }
        if same_file(&params.snapshot_path, &params.mem_file_path) {
            return Err(fault(
                "snapshot/create: snapshot_path and mem_file_path are the same file; give two paths",
            ));
        }
        self.running()?
            .save_snapshot(params)
            .map_err(|e| fault(format!("snapshot/create: {e}; the VM is still paused")))?;
        Ok(VmmData::Empty)
    }

    /// True once any part of a VM to boot was configured (logger and metrics aside).
    fn boot_configured(&self) -> bool {
        let c = &self.config;
        c.boot_source.is_some()
            || !c.drives.is_empty()
            || !c.network_interfaces.is_empty()
            || c.vsock.is_some()
            || c.machine_config != MachineConfig::default()
    }

    fn load_snapshot(&mut self, params: &SnapshotLoadParams) -> Result<VmmData, Fault> {
        if self.boot_configured() {
            return Err(fault(
                "snapshot/load: this VM is already being configured for a boot; load a \
                 snapshot into a fresh ember process with nothing configured",
            ));
        }
        let restore = self
            .restore
            .as_mut()
            .ok_or_else(|| fault("snapshot/load: this ember cannot load snapshots"))?;
        let (machine, restored) =
            restore(params).map_err(|e| fault(format!("snapshot/load: {e}")))?;
        self.metrics.devices = machine.device_counters();
        self.metrics.vcpu_exits = machine.exit_counters();
        self.machine = Some(machine);
        self.loaded = true;
        // What the VM really has, as Firecracker records its restored devices; the logger
        // and metrics destinations stay as configured.
        self.config = VmConfig {
            boot_source: None,
            machine_config: restored.machine_config,
            drives: restored.drives,
            network_interfaces: restored.network_interfaces,
            vsock: restored.vsock,
            ..self.config.clone()
        };
        self.state = if params.resume_vm {
            VmState::Running
        } else {
            VmState::Paused
        };
        Ok(VmmData::Empty)
    }

    fn set_paused(&mut self, pause: bool) -> Result<VmmData, Fault> {
        let machine = self.running()?;
        let result = if pause {
            machine.pause()
        } else {
            machine.resume()
        };
        result.map_err(|e| fault(format!("vm.state: {e}")))?;
        self.state = if pause {
            VmState::Paused
        } else {
            VmState::Running
        };
        Ok(VmmData::Empty)
    }

    fn set_metrics(&mut self, config: &MetricsConfig) -> Result<VmmData, Fault> {
        config.validate().map_err(|e| fault(e.to_string()))?;
        let sink = MetricsSink::open(&config.metrics_path).map_err(|e| fault(e.to_string()))?;
        self.sink = Some(sink);
        Ok(VmmData::Empty)
    }

    fn flush_metrics(&mut self) -> Result<VmmData, Fault> {
        match self.write_metrics() {
            Ok(()) => Ok(VmmData::Empty),
            Err(e @ MetricsError::NotConfigured) => Err(fault(e.to_string())),
            Err(e) => Err(fault(format!("FlushMetrics: {e}"))),
        }
    }

    /// Writes one metrics line now and starts the next period.
    fn write_metrics(&mut self) -> Result<(), MetricsError> {
        let sink = self.sink.as_mut().ok_or(MetricsError::NotConfigured)?;
        self.last_flush = Instant::now();
        sink.write(&self.metrics.snapshot())
    }

    /// Milliseconds until the next periodic flush (-1: none due, no destination).
    pub fn next_flush_in_ms(&self) -> i32 {
        if self.sink.is_none() {
            return -1;
        }
        let left = FLUSH_PERIOD.saturating_sub(self.last_flush.elapsed());
        i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
    }

    /// Writes the periodic metrics line when it is due.
    pub fn flush_if_due(&mut self) {
        if self.sink.is_some() && self.last_flush.elapsed() >= FLUSH_PERIOD {
            self.flush_or_warn();
        }
    }

    /// Writes the last metrics line as ember ends (the VM stopped or failed, or the
    /// configuration was refused), so that the counts since the last periodic line are
    /// never lost. The destination is already open: this works under the VMM thread's
    /// seccomp filter.
    pub fn flush_at_exit(&mut self) {
        if self.sink.is_some() {
            self.flush_or_warn();
        }
    }

    fn flush_or_warn(&mut self) {
        if let Err(e) = self.write_metrics() {
            logger::log(LogLevel::Warning, "metrics", &e.to_string());
        }
    }
}

fn set_logger(config: &LoggerConfig) -> Result<VmmData, Fault> {
    config.validate().map_err(|e| fault(e.to_string()))?;
    logger::configure(config).map_err(|e| fault(e.to_string()))?;
    Ok(VmmData::Empty)
}

fn check_drive_patch(patch: &DrivePatch) -> Result<(), Fault> {
    if patch.rate_limiter.is_some() {
        return Err(fault(
            "drives.rate_limiter: not supported by this version of Ember; remove it",
        ));
    }
    Ok(())
}

fn no_drive(drive_id: &str) -> Fault {
    fault(format!(
        "drives: no drive {drive_id:?}; PUT /drives/{drive_id} before the VM starts"
    ))
}

/// The action's name for log lines.
fn action_name(action: &VmmAction) -> String {
    let debug = format!("{action:?}");
    debug
        .split(['(', ' '])
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
