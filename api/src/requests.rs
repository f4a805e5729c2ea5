//! The API socket's requests in Firecracker's dialect: routing (method and path to a
//! [`VmmAction`]), the bodies only the API has (actions, VM state, PATCH bodies), and the
//! VMM's answers. The config file becomes the same actions
//! ([`actions_from_config`]), so both paths meet in one handler on the VMM thread.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::http::Response;
use crate::models::{
    check_guest_cid, BootSource, Drive, MachineConfig, NetworkInterface, VmConfig, VsockConfig,
};
// The logger and metrics bodies are config file sections too, so they live with the models.
pub use crate::models::{LogLevel, LoggerConfig, MetricsConfig};

/// What the API (or the config file) asks the VMM to do.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVersion,
    GetVmConfig,
    GetMachineConfig,
    PutBootSource(BootSource),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigPatch),
    PutDrive(Drive),
    PatchDrive(DrivePatch),
    PutNetworkInterface(NetworkInterface),
    PatchNetworkInterface(NetworkInterfacePatch),
    PutVsock(VsockConfig),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    CreateSnapshot(SnapshotCreateParams),
    LoadSnapshot(SnapshotLoadParams),
}

/// The VMM's successful answers.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    Version(VersionInfo),
    VmConfig(Box<VmConfig>),
    MachineConfig(MachineConfig),
}

impl VmmData {
    /// 204 for `Empty`, otherwise 200 with the JSON body.
    pub fn into_response(self) -> Response {
        let body = match self {
            VmmData::Empty => return Response::no_content(),
            VmmData::InstanceInfo(info) => serde_json::to_string(&info),
            VmmData::Version(version) => serde_json::to_string(&version),
            VmmData::VmConfig(config) => serde_json::to_string(&config),
            VmmData::MachineConfig(machine) => serde_json::to_string(&machine),
        };
        match body {
            Ok(body) => Response::json(200, body),
            Err(e) => Response::fault(500, &format!("cannot encode the answer: {e}")),
        }
    }
}

/// A refused action; the message becomes the `fault_message` of a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Fault(pub String);

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// `GET /version`: Firecracker's key, Ember's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub firecracker_version: String,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateBody {
    pub state: VmStateRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

/// `PATCH /machine-config`: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<usize>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

impl MachineConfigPatch {
    /// `base` with the given fields replaced.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        let mut out = base.clone();
        out.vcpu_count = self.vcpu_count.unwrap_or(out.vcpu_count);
        out.mem_size_mib = self.mem_size_mib.unwrap_or(out.mem_size_mib);
        out.smt = self.smt.unwrap_or(out.smt);
        out.track_dirty_pages = self.track_dirty_pages.unwrap_or(out.track_dirty_pages);
        if self.cpu_template.is_some() {
            out.cpu_template.clone_from(&self.cpu_template);
        }
        if self.huge_pages.is_some() {
            out.huge_pages.clone_from(&self.huge_pages);
        }
        out
    }
}

/// `PATCH /drives/{drive_id}`: a new backing file (after start: swapped live).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Not supported; must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PATCH /network-interfaces/{iface_id}`: Firecracker only patches rate limiters, which
/// Ember does not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfacePatch {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create`: save a paused VM to a state file and a memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

/// `mem_backend.backend_type` of `PUT /snapshot/load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`: where guest memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

/// One entry of `network_overrides`: the TAP a restored interface uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override`: the Unix socket path of the restored vsock device and, an Ember
/// extension Firecracker does not have, a new context id for the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
    /// The restored guest's CID (3 to 2^32 - 2); absent: the saved one, as in Firecracker.
    /// The guest learns it when it handles the transport reset every restore sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u64>,
}

/// `PUT /snapshot/load`, in Firecracker's shape; the older `mem_file_path` is accepted in
/// place of `mem_backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

impl SnapshotLoadParams {
    /// The memory file to map: `mem_backend.backend_path` (backend `File`) or the older
    /// `mem_file_path`; exactly one of the two must be given.
    pub fn mem_file(&self) -> Result<&PathBuf, Fault> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(Fault(
                "snapshot/load: give either mem_backend or mem_file_path, not both".into(),
            )),
            (None, None) => Err(Fault(
                "snapshot/load: mem_backend is missing; give {\"backend_type\": \"File\", \"backend_path\": ...}".into(),
            )),
            (Some(b), None) if b.backend_type == MemBackendType::Uffd => Err(Fault(
                "snapshot/load.mem_backend.backend_type: Uffd is not supported by this version of Ember; use File".into(),
            )),
            (Some(b), None) => Ok(&b.backend_path),
            (None, Some(path)) => Ok(path),
        }
    }

    /// The checks the request alone allows: one memory file, a usable CID override.
    pub fn validate(&self) -> Result<(), Fault> {
        self.mem_file()?;
        if let Some(cid) = self.vsock_override.as_ref().and_then(|v| v.guest_cid) {
            check_guest_cid(cid)
                .map_err(|e| Fault(format!("snapshot/load.vsock_override.guest_cid: {e}")))?;
        }
        Ok(())
    }
}

/// Why a request matched no action: the HTTP status and the fault message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    pub status: u16,
    pub message: String,
}

fn bad_request(message: impl Into<String>) -> RouteError {
    RouteError {
        status: 400,
        message: message.into(),
    }
}

/// Parses `body` as `T`, naming the failing field as `section.field`.
pub fn parse_body<T: DeserializeOwned>(section: &str, body: &[u8]) -> Result<T, RouteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad_request(format!(
            "{section}: the request needs a JSON body"
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            bad_request(format!("{section}: {inner}"))
        } else {
            bad_request(format!("{section}.{path}: {inner}"))
        }
    })
}

/// Maps a request to its action. Unknown paths are 404; a known path with the wrong
/// method, or a body that does not parse, is 400.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<VmmAction, RouteError> {
    let path = path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (method, segments.as_slice()) {
        ("GET", []) => Ok(VmmAction::GetInstanceInfo),
        ("GET", ["version"]) => Ok(VmmAction::GetVersion),
        ("GET", ["vm", "config"]) => Ok(VmmAction::GetVmConfig),
        ("PUT", ["boot-source"]) => parse_body("boot-source", body).map(VmmAction::PutBootSource),
        ("GET", ["machine-config"]) => Ok(VmmAction::GetMachineConfig),
        ("PUT", ["machine-config"]) => {
            parse_body("machine-config", body).map(VmmAction::PutMachineConfig)
        }
        ("PATCH", ["machine-config"]) => {
            parse_body("machine-config", body).map(VmmAction::PatchMachineConfig)
        }
        ("PUT", ["drives", id]) => {
            let drive: Drive = parse_body("drives", body)?;
            same_id("drive_id", id, &drive.drive_id)?;
            Ok(VmmAction::PutDrive(drive))
        }
        ("PATCH", ["drives", id]) => {
            let patch: DrivePatch = parse_body("drives", body)?;
            same_id("drive_id", id, &patch.drive_id)?;
            Ok(VmmAction::PatchDrive(patch))
        }
        ("PUT", ["network-interfaces", id]) => {
            let iface: NetworkInterface = parse_body("network-interfaces", body)?;
            same_id("iface_id", id, &iface.iface_id)?;
            Ok(VmmAction::PutNetworkInterface(iface))
        }
        ("PATCH", ["network-interfaces", id]) => {
            let patch: NetworkInterfacePatch = parse_body("network-interfaces", body)?;
            same_id("iface_id", id, &patch.iface_id)?;
            Ok(VmmAction::PatchNetworkInterface(patch))
        }
        ("PUT", ["vsock"]) => parse_body("vsock", body).map(VmmAction::PutVsock),
        ("PUT", ["logger"]) => parse_body("logger", body).map(VmmAction::PutLogger),
        ("PUT", ["metrics"]) => parse_body("metrics", body).map(VmmAction::PutMetrics),
        ("PUT", ["actions"]) => {
            let action: ActionBody = parse_body("actions", body)?;
            Ok(match action.action_type {
                ActionType::InstanceStart => VmmAction::InstanceStart,
                ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
                ActionType::FlushMetrics => VmmAction::FlushMetrics,
            })
        }
        ("PATCH", ["vm"]) => {
            let state: VmStateBody = parse_body("vm", body)?;
            Ok(match state.state {
                VmStateRequest::Paused => VmmAction::Pause,
                VmStateRequest::Resumed => VmmAction::Resume,
            })
        }
        ("PUT", ["snapshot", "create"]) => {
            parse_body("snapshot/create", body).map(VmmAction::CreateSnapshot)
        }
        ("PUT", ["snapshot", "load"]) => {
            let params: SnapshotLoadParams = parse_body("snapshot/load", body)?;
            params.validate().map_err(|f| bad_request(f.0))?;
            Ok(VmmAction::LoadSnapshot(params))
        }
        (_, segments) => Err(wrong_method_or_path(method, path, segments)),
    }
}

/// The methods each known path answers, for the 400 that names them.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        [] | ["version"] | ["vm", "config"] => "GET",
        ["boot-source"] | ["vsock"] | ["logger"] | ["metrics"] | ["actions"] => "PUT",
        ["snapshot", "create" | "load"] => "PUT",
        ["machine-config"] => "GET, PUT or PATCH",
        ["drives", _] | ["network-interfaces", _] => "PUT or PATCH",
        ["vm"] => "PATCH",
        _ => return None,
    })
}

fn wrong_method_or_path(method: &str, path: &str, segments: &[&str]) -> RouteError {
    let shown = if path.is_empty() { "/" } else { path };
    match allowed_methods(segments) {
        Some(allowed) => bad_request(format!("{method} is not allowed on {shown}; use {allowed}")),
        None => RouteError {
            status: 404,
            message: format!("no API resource at {shown}"),
        },
    }
}

fn same_id(field: &str, in_path: &str, in_body: &str) -> Result<(), RouteError> {
    if in_path == in_body {
        return Ok(());
    }
    Err(bad_request(format!(
        "{field}: the path names {in_path:?} but the body names {in_body:?}; they must match"
    )))
}

/// The actions that configure what `config` describes, in a fixed order (logger and
/// metrics first, so that the rest is logged and counted), without `InstanceStart`.
pub fn actions_from_config(config: &VmConfig) -> Vec<VmmAction> {
    let mut actions = Vec::new();
    actions.extend(config.logger.clone().map(VmmAction::PutLogger));
    actions.extend(config.metrics.clone().map(VmmAction::PutMetrics));
    if let Some(boot) = &config.boot_source {
        actions.push(VmmAction::PutBootSource(boot.clone()));
    }
    actions.push(VmmAction::PutMachineConfig(config.machine_config.clone()));
    actions.extend(config.drives.iter().cloned().map(VmmAction::PutDrive));
    actions.extend(
        config
            .network_interfaces
            .iter()
            .cloned()
            .map(VmmAction::PutNetworkInterface),
    );
    actions.extend(config.vsock.clone().map(VmmAction::PutVsock));
    actions
}

#[cfg(test)]
#[path = "requests_tests.rs"]
mod tests;
