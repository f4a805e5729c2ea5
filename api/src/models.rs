//! Request and configuration models, in Firecracker's dialect.
//!
//! The config file (`ember --config-file`) and the API bodies share these types, so a field
//! means the same thing on both paths. Parsing rejects unknown fields and names the field that
//! failed; [`VmConfig::validate`] checks what does not depend on the host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The most vCPUs a guest may have: the MP table that announces them must fit in the EBDA.
pub const MAX_VCPUS: u8 = 32;

/// The kernel command line limit on x86_64 (`COMMAND_LINE_SIZE`), terminating NUL included.
pub const MAX_BOOT_ARGS_LEN: usize = 2048;

/// Boot arguments used when the config gives none.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// A model that failed to parse or validate; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The JSON is malformed or has the wrong shape.
    #[error("{0}")]
    Parse(String),
    /// A field holds a value Ember cannot use.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A section is valid Firecracker but not implemented by this version of Ember.
    #[error("{0}: not supported by this version of Ember yet; remove it from the configuration")]
    Unsupported(&'static str),
}

/// `boot-source` / `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Uncompressed ELF `vmlinux` or a `bzImage`.
    pub kernel_image_path: PathBuf,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Initial RAM filesystem (a cpio archive) loaded next to the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `machine-config` / `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading; Ember presents one thread per core.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker CPU templates are not supported; only `null`/`"None"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages backing; only `"None"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// How the host caches a drive's writes, as Firecracker names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Guest flushes are not offered; writes reach the file but are not synced.
    #[default]
    Unsafe,
    /// Guest flushes are honoured with fdatasync, so flushed data survives a host crash.
    Writeback,
}

/// `drives[]` / `PUT /drives/{drive_id}`: a virtio-blk device backed by a raw image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Letters, digits and `_`; unique among the drives.
    pub drive_id: String,
    pub path_on_host: PathBuf,
    /// Boot from this drive: `root=/dev/vda` (or `root=PARTUUID=...`) joins the command line.
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// Partition UUID of the root partition, when the root is a partition of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    /// Only `"Sync"` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Not supported; must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
    /// vhost-user drives are not supported; must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `network-interfaces[]` / `PUT /network-interfaces/{iface_id}`: a virtio-net device
/// backed by a host TAP interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Letters, digits and `_`; unique among the interfaces.
    pub iface_id: String,
    /// The host TAP device (created if missing, which needs CAP_NET_ADMIN).
    pub host_dev_name: String,
    /// The guest's MAC, `aa:bb:cc:dd:ee:ff`; the guest picks a random one without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Not supported; must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Not supported; must be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// Parses a MAC address written as `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn validate_network_interfaces(ifaces: &[NetworkInterface]) -> Result<(), ModelError> {
    for (i, n) in ifaces.iter().enumerate() {
        let field = |name: &str| format!("network-interfaces[{i}].{name}");
        if !valid_id(&n.iface_id) {
            return Err(invalid(
                field("iface_id"),
                format!(
                    "{:?} is not valid; use 1 to 64 letters, digits or underscores",
                    n.iface_id
                ),
            ));
        }
        if ifaces[..i].iter().any(|o| o.iface_id == n.iface_id) {
            return Err(invalid(
                field("iface_id"),
                format!("{:?} is used by another interface", n.iface_id),
            ));
        }
        let name_ok = !n.host_dev_name.is_empty()
            && n.host_dev_name.len() < 16
            && n.host_dev_name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/');
        if !name_ok {
            return Err(invalid(
                field("host_dev_name"),
                format!(
                    "{:?} is not a valid interface name (1 to 15 characters, no '/')",
                    n.host_dev_name
                ),
            ));
        }
        if ifaces[..i]
            .iter()
            .any(|o| o.host_dev_name == n.host_dev_name)
        {
            return Err(invalid(
                field("host_dev_name"),
                format!("{:?} is used by another interface", n.host_dev_name),
            ));
        }
        if let Some(mac) = &n.guest_mac {
            match parse_mac(mac) {
                Some(bytes) if bytes[0] & 1 == 0 => {}
                Some(_) => {
                    return Err(invalid(
                        field("guest_mac"),
                        format!("{mac} is a multicast address; use a unicast one"),
                    ))
                }
                None => {
                    return Err(invalid(
                        field("guest_mac"),
                        format!("{mac:?} is not a MAC address like 06:00:ac:10:00:02"),
                    ))
                }
            }
        }
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            return Err(ModelError::Unsupported(
                "network-interfaces[].rx_rate_limiter/tx_rate_limiter",
            ));
        }
    }
    Ok(())
}

/// `vsock` / `PUT /vsock`: a virtio-vsock device whose host side is a Unix socket, with
/// Firecracker's conventions: host programs connect to `uds_path` and send `CONNECT <port>\n`
/// to reach a guest port; guest connections to host port P reach `<uds_path>_<P>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context id: 3 or more, and below 2^32 - 1 (`VMADDR_CID_ANY`).
    pub guest_cid: u64,
    /// Where Ember listens for host connections; a stale socket there is replaced.
    pub uds_path: PathBuf,
}

/// The lowest context id a guest can have: 0 to 2 are the hypervisor, local and host.
pub const MIN_GUEST_CID: u64 = 3;

/// Checks a guest context id: 3 or more, and below 2^32 - 1 (`VMADDR_CID_ANY`, which no
/// guest may own); the error is the reason, for the caller to prefix with its field.
pub fn check_guest_cid(cid: u64) -> Result<(), String> {
    if (MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(format!(
            "{cid} is out of range; use {MIN_GUEST_CID} to {}",
            u32::MAX - 1
        ))
    }
}

impl VsockConfig {
    fn validate(&self) -> Result<(), ModelError> {
        check_guest_cid(self.guest_cid).map_err(|e| invalid("vsock.guest_cid".into(), e))?;
        if self.uds_path.as_os_str().is_empty() {
            return Err(invalid("vsock.uds_path".into(), "empty path"));
        }
        Ok(())
    }
}

/// `logger` / `PUT /logger`: where Ember's own log lines go, and which.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file (appended to) or FIFO; Ember's log lines go there instead of stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The least severe level written; `Info` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with the part of Ember that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Firecracker's module filter; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl LoggerConfig {
    /// Checks what does not need the host; opening the file is the logger's business.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self
            .log_path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("logger.log_path".into(), "empty path"));
        }
        Ok(())
    }
}

/// Log levels, most severe first, as Firecracker spells them; parsed in any case, and
/// `Warn` for `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum LogLevel {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    const ALL: [LogLevel; 6] = [
        LogLevel::Off,
        LogLevel::Error,
        LogLevel::Warning,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ];

    /// Parses a level's name, in any case.
    pub fn from_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("warn") {
            return Some(LogLevel::Warning);
        }
        Self::ALL
            .into_iter()
            .find(|level| name.eq_ignore_ascii_case(&format!("{level:?}")))
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        LogLevel::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown level {name:?}; use Off, Error, Warning, Info, Debug or Trace"
            ))
        })
    }
}

/// `metrics` / `PUT /metrics`: where metrics lines go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file (appended to) or FIFO that receives one JSON object per line.
    pub metrics_path: PathBuf,
}

impl MetricsConfig {
    /// Checks what does not need the host; opening the file is the metrics sink's business.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.metrics_path.as_os_str().is_empty() {
            return Err(invalid("metrics.metrics_path".into(), "empty path"));
        }
        Ok(())
    }
}

/// The most virtio devices a guest can have: one IOAPIC pin each, from GSI 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

fn invalid(field: String, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn validate_drives(drives: &[Drive]) -> Result<(), ModelError> {
    if drives.len() > MAX_VIRTIO_DEVICES {
        return Err(invalid(
            "drives".into(),
            format!(
                "{} drives is too many; the limit is {MAX_VIRTIO_DEVICES}",
                drives.len()
            ),
        ));
    }
    let mut root = None;
    for (i, d) in drives.iter().enumerate() {
        let field = |name: &str| format!("drives[{i}].{name}");
        if d.drive_id.is_empty()
            || d.drive_id.len() > 64
            || !d
                .drive_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(invalid(
                field("drive_id"),
                format!(
                    "{:?} is not valid; use 1 to 64 letters, digits or underscores",
                    d.drive_id
                ),
            ));
        }
        if drives[..i].iter().any(|o| o.drive_id == d.drive_id) {
            return Err(invalid(
                field("drive_id"),
                format!("{:?} is used by another drive", d.drive_id),
            ));
        }
        if d.path_on_host.as_os_str().is_empty() {
            return Err(invalid(field("path_on_host"), "empty path"));
        }
        if d.is_root_device {
            if let Some(other) = root.replace(&d.drive_id) {
                return Err(invalid(
                    field("is_root_device"),
                    format!("drive {other:?} is the root device already; only one drive can be"),
                ));
            }
        } else if d.partuuid.is_some() {
            return Err(invalid(
                field("partuuid"),
                "only the root device takes a partuuid",
            ));
        }
        if d.io_engine.as_deref().is_some_and(|e| e != "Sync") {
            return Err(invalid(field("io_engine"), "only \"Sync\" is supported"));
        }
        if d.rate_limiter.is_some() {
            return Err(ModelError::Unsupported("drives[].rate_limiter"));
        }
        if d.socket.is_some() {
            return Err(ModelError::Unsupported("drives[].socket (vhost-user)"));
        }
    }
    Ok(())
}

/// The whole configuration file, with Firecracker's section names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<Drive>,
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Applied before the other sections, so that what they do is logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<serde_json::Value>,
}

impl VmConfig {
    /// Parses a config file's text, naming the offending field on failure.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                ModelError::Parse(inner.to_string())
            } else {
                ModelError::Parse(format!("{path}: {inner}"))
            }
        })
    }

    /// Checks everything that does not need the host: counts, limits and unsupported sections.
    pub fn validate(&self) -> Result<(), ModelError> {
        let boot = self.boot_source.as_ref().ok_or(ModelError::Invalid {
            field: "boot-source".into(),
            reason: "missing; give kernel_image_path at least".into(),
        })?;
        boot.validate()?;
        self.validate_present()?;
        let unsupported = [
            ("mmds-config", self.mmds_config.is_some()),
            ("balloon", self.balloon.is_some()),
            ("entropy", self.entropy.is_some()),
        ];
        match unsupported.iter().find(|(_, present)| *present) {
            Some((name, _)) => Err(ModelError::Unsupported(name)),
            None => Ok(()),
        }
    }

    /// Checks the sections given so far, as the API builds a configuration piece by piece:
    /// like [`VmConfig::validate`], but `boot-source` may still be missing.
    pub fn validate_present(&self) -> Result<(), ModelError> {
        if let Some(boot) = &self.boot_source {
            boot.validate()?;
        }
        if let Some(logger) = &self.logger {
            logger.validate()?;
        }
        if let Some(metrics) = &self.metrics {
            metrics.validate()?;
        }
        self.machine_config.validate()?;
        validate_drives(&self.drives)?;
        validate_network_interfaces(&self.network_interfaces)?;
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        let devices =
            self.drives.len() + self.network_interfaces.len() + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "drives".into(),
                format!("{devices} drives, network interfaces and vsock devices is too many; the limit is {MAX_VIRTIO_DEVICES}"),
            ));
        }
        Ok(())
    }
}

impl BootSource {
    /// The command line the guest gets.
    pub fn boot_args(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }

    fn validate(&self) -> Result<(), ModelError> {
        if self.kernel_image_path.as_os_str().is_empty() {
            return Err(ModelError::Invalid {
                field: "boot-source.kernel_image_path".into(),
                reason: "empty path".into(),
            });
        }
        let len = self.boot_args().len();
        if len >= MAX_BOOT_ARGS_LEN {
            return Err(ModelError::Invalid {
                field: "boot-source.boot_args".into(),
                reason: format!(
                    "{len} bytes is too long; the limit is {} bytes",
                    MAX_BOOT_ARGS_LEN - 1
                ),
            });
        }
        if self.boot_args().bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(ModelError::Invalid {
                field: "boot-source.boot_args".into(),
                reason: "only printable ASCII is allowed".into(),
            });
        }
        Ok(())
    }
}

impl MachineConfig {
    fn validate(&self) -> Result<(), ModelError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpu_count) {
            return Err(ModelError::Invalid {
                field: "machine-config.vcpu_count".into(),
                reason: format!("{} is out of range; use 1 to {MAX_VCPUS}", self.vcpu_count),
            });
        }
        if self.mem_size_mib == 0 {
            return Err(ModelError::Invalid {
                field: "machine-config.mem_size_mib".into(),
                reason: "0 MiB is not enough memory to boot; use at least 16".into(),
            });
        }
        if self.mem_size_mib < 16 {
            return Err(ModelError::Invalid {
                field: "machine-config.mem_size_mib".into(),
                reason: format!(
                    "{} MiB is too little to boot; use at least 16",
                    self.mem_size_mib
                ),
            });
        }
        if self.smt {
            return Err(ModelError::Invalid {
                field: "machine-config.smt".into(),
                reason: "SMT is not supported; set it to false".into(),
            });
        }
        let none_or = |v: &Option<String>| v.as_deref().is_none_or(|s| s == "None");
        if !none_or(&self.cpu_template) {
            return Err(ModelError::Unsupported("machine-config.cpu_template"));
        }
        if !none_or(&self.huge_pages) {
            return Err(ModelError::Unsupported("machine-config.huge_pages"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ModelError> {
        VmConfig::from_json(text).and_then(|c| c.validate().map(|()| c))
    }

    const KERNEL: &str = r#""boot-source": {"kernel_image_path": "/k"}"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&format!("{{{KERNEL}}}")).unwrap();
        assert_eq!(c.machine_config, MachineConfig::default());
        assert_eq!(c.boot_source.unwrap().boot_args(), DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let text = format!(
            r#"{{{KERNEL}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}}}}"#
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("machine-config.vcpus: unknown field `vcpus`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let text = format!(
            r#"{{{KERNEL}, "machine-config": {{"vcpu_count": "two", "mem_size_mib": 64}}}}"#
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("machine-config.vcpu_count: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_reports_position() {
        let err = parse("{\"boot-source\": ").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn vcpu_bounds() {
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false)] {
            let text = format!(
                r#"{{{KERNEL}, "machine-config": {{"vcpu_count": {n}, "mem_size_mib": 64}}}}"#
            );
            assert_eq!(parse(&text).is_ok(), ok, "vcpu_count {n}");
        }
    }

    #[test]
    fn zero_memory_is_refused_by_name() {
        let text =
            format!(r#"{{{KERNEL}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 0}}}}"#);
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("machine-config.mem_size_mib: 0 MiB"),
            "{err}"
        );
    }

    #[test]
    fn missing_boot_source_is_named() {
        let err = parse("{}").unwrap_err().to_string();
        assert!(err.starts_with("boot-source: missing"), "{err}");
    }

    #[test]
    fn sections_of_later_versions_are_refused_clearly() {
        let text = format!(r#"{{{KERNEL}, "balloon": {{"amount_mib": 3}}}}"#);
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("balloon: not supported"), "{err}");
        assert!(parse(&format!(r#"{{{KERNEL}, "drives": []}}"#)).is_ok());
    }

    fn vsock(body: &str) -> Result<VmConfig, ModelError> {
        parse(&format!(r#"{{{KERNEL}, "vsock": {body}}}"#))
    }

    #[test]
    fn vsock_parses_in_firecracker_form() {
        let c = vsock(r#"{"guest_cid": 3, "uds_path": "/run/v.sock"}"#).unwrap();
        let v = c.vsock.unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/run/v.sock")));
        let c =
            vsock(r#"{"vsock_id": "vsock0", "guest_cid": 4294967294, "uds_path": "/v"}"#).unwrap();
        assert_eq!(c.vsock.unwrap().guest_cid, u64::from(u32::MAX) - 1);
    }

    #[test]
    fn vsock_errors_name_the_field() {
        let cases = [
            (
                r#"{"guest_cid": 2, "uds_path": "/v"}"#,
                "vsock.guest_cid: 2 is out of range",
            ),
            (
                r#"{"guest_cid": 0, "uds_path": "/v"}"#,
                "vsock.guest_cid: 0 is out of range",
            ),
            (
                r#"{"guest_cid": 4294967295, "uds_path": "/v"}"#,
                "vsock.guest_cid: 4294967295 is out of range",
            ),
            (
                r#"{"guest_cid": 4294967296, "uds_path": "/v"}"#,
                "vsock.guest_cid: 4294967296 is out of range",
            ),
            (
                r#"{"guest_cid": -3, "uds_path": "/v"}"#,
                "vsock.guest_cid: invalid value",
            ),
            (
                r#"{"guest_cid": 3, "uds_path": ""}"#,
                "vsock.uds_path: empty path",
            ),
            (r#"{"guest_cid": 3}"#, "missing field `uds_path`"),
            (
                r#"{"guest_cid": 3, "uds_path": "/v", "port": 1}"#,
                "vsock.port: unknown field `port`",
            ),
        ];
        for (body, expected) in cases {
            let err = vsock(body).unwrap_err().to_string();
            assert!(
                err.starts_with(expected) || err.contains(expected),
                "{expected}: {err}"
            );
        }
    }

    #[test]
    fn vsock_counts_towards_the_device_limit() {
        let many: Vec<String> = (0..MAX_VIRTIO_DEVICES)
            .map(|i| {
                format!(r#"{{"drive_id": "d{i}", "path_on_host": "/x", "is_root_device": false}}"#)
            })
            .collect();
        let text = format!(
            r#"{{{KERNEL}, "drives": [{}], "vsock": {{"guest_cid": 3, "uds_path": "/v"}}}}"#,
            many.join(",")
        );
        assert!(parse(&text).unwrap_err().to_string().contains("too many"));
    }

    fn drives(list: &str) -> Result<VmConfig, ModelError> {
        parse(&format!(r#"{{{KERNEL}, "drives": [{list}]}}"#))
    }

    #[test]
    fn drives_parse_with_firecracker_fields() {
        let c = drives(r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": true, "cache_type": "Writeback", "io_engine": "Sync"},
                          {"drive_id": "data_1", "path_on_host": "/d.img", "is_root_device": false}"#).unwrap();
        assert_eq!(c.drives.len(), 2);
        assert_eq!(c.drives[0].cache_type, CacheType::Writeback);
        assert!(c.drives[0].is_read_only);
        assert_eq!(c.drives[1].cache_type, CacheType::Unsafe);
    }

    #[test]
    fn network_interfaces_parse_and_fail_by_field() {
        let ok =
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#;
        let c = parse(&format!(r#"{{{KERNEL}, "network-interfaces": [{ok}]}}"#)).unwrap();
        assert_eq!(
            parse_mac(c.network_interfaces[0].guest_mac.as_deref().unwrap()),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        let cases = [
            (
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00"}"#,
                "network-interfaces[0].guest_mac",
            ),
            (
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:ac:10:00:02"}"#,
                "multicast",
            ),
            (
                r#"{"iface_id": "eth0", "host_dev_name": "a/b"}"#,
                "network-interfaces[0].host_dev_name",
            ),
            (
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}, {"iface_id": "eth0", "host_dev_name": "tap1"}"#,
                "network-interfaces[1].iface_id",
            ),
            (
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}, {"iface_id": "eth1", "host_dev_name": "tap0"}"#,
                "network-interfaces[1].host_dev_name",
            ),
            (
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 9000}"#,
                "unknown field `mtu`",
            ),
        ];
        for (list, expected) in cases {
            let err = parse(&format!(r#"{{{KERNEL}, "network-interfaces": [{list}]}}"#))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:f"), None);
    }

    #[test]
    fn drive_errors_name_the_drive_and_field() {
        let cases = [
            (
                r#"{"drive_id": "a b", "path_on_host": "/x", "is_root_device": false}"#,
                "drives[0].drive_id",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": true}, {"drive_id": "b", "path_on_host": "/y", "is_root_device": true}"#,
                "drives[1].is_root_device",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false}, {"drive_id": "a", "path_on_host": "/y", "is_root_device": false}"#,
                "drives[1].drive_id",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "partuuid": "1"}"#,
                "drives[0].partuuid",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "io_engine": "Async"}"#,
                "drives[0].io_engine",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "", "is_root_device": false}"#,
                "drives[0].path_on_host",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "cache_type": "Fast"}"#,
                "drives[0].cache_type",
            ),
            (
                r#"{"drive_id": "a", "path_on_host": "/x"}"#,
                "missing field `is_root_device`",
            ),
        ];
        for (list, expected) in cases {
            let err = drives(list).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let many: Vec<String> = (0..20)
            .map(|i| {
                format!(r#"{{"drive_id": "d{i}", "path_on_host": "/x", "is_root_device": false}}"#)
            })
            .collect();
        assert!(drives(&many.join(","))
            .unwrap_err()
            .to_string()
            .contains("too many"));
    }

    #[test]
    fn overlong_and_non_ascii_boot_args_are_refused() {
        let long = "a".repeat(MAX_BOOT_ARGS_LEN);
        let text =
            format!(r#"{{"boot-source": {{"kernel_image_path": "/k", "boot_args": "{long}"}}}}"#);
        assert!(parse(&text).unwrap_err().to_string().contains("too long"));
        let text = r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "a\u0001"}}"#;
        assert!(parse(text)
            .unwrap_err()
            .to_string()
            .contains("printable ASCII"));
    }

    #[test]
    fn logger_and_metrics_sections_parse_as_the_api_bodies() {
        let c = parse(&format!(
            r#"{{{KERNEL}, "logger": {{"log_path": "/l", "level": "debug", "show_level": true,
                "show_log_origin": false, "module": "api_server"}},
                "metrics": {{"metrics_path": "/m"}}}}"#
        ))
        .unwrap();
        let logger = c.logger.unwrap();
        assert_eq!(logger.log_path, Some(PathBuf::from("/l")));
        assert_eq!(logger.level, Some(LogLevel::Debug));
        assert_eq!(
            (logger.show_level, logger.show_log_origin),
            (Some(true), Some(false))
        );
        assert_eq!(c.metrics.unwrap().metrics_path, PathBuf::from("/m"));
        // Every logger field is optional, as in PUT /logger.
        let c = parse(&format!(r#"{{{KERNEL}, "logger": {{}}}}"#)).unwrap();
        assert_eq!(c.logger, Some(LoggerConfig::default()));
    }

    #[test]
    fn logger_and_metrics_errors_name_the_field() {
        let cases = [
            (
                r#""logger": {"log_path": "/l", "colour": true}"#,
                "logger.colour: unknown field `colour`, expected one of `log_path`, `level`, \
                 `show_level`, `show_log_origin`, `module` at line 1 column 82",
            ),
            (
                r#""logger": {"level": "Loud"}"#,
                "logger.level: unknown level \"Loud\"; use Off, Error, Warning, Info, Debug \
                 or Trace at line 1 column 72",
            ),
            (
                r#""logger": {"show_level": "yes"}"#,
                "logger.show_level: invalid type: string \"yes\", expected a boolean at line 1 \
                 column 75",
            ),
            (
                r#""logger": {"log_path": ""}"#,
                "logger.log_path: empty path",
            ),
            (
                r#""metrics": {"metrics_path": "/m", "format": "json"}"#,
                "metrics.format: unknown field `format`, expected `metrics_path` at line 1 \
                 column 87",
            ),
            (
                r#""metrics": {}"#,
                "metrics: missing field `metrics_path` at line 1 column 58",
            ),
            (
                r#""metrics": {"metrics_path": ""}"#,
                "metrics.metrics_path: empty path",
            ),
        ];
        for (section, expected) in cases {
            let err = parse(&format!("{{{KERNEL}, {section}}}")).unwrap_err();
            assert_eq!(err.to_string(), expected, "{section}");
        }
    }

    #[test]
    fn config_round_trips() {
        let c = parse(&format!(
            r#"{{{KERNEL}, "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256}}, "vsock": {{"guest_cid": 7, "uds_path": "/v"}}, "logger": {{"log_path": "/l", "level": "Info"}}, "metrics": {{"metrics_path": "/m"}}}}"#
        ))
        .unwrap();
        let again = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }
}
