//! Ember's metrics: counters kept by the parts that do the work (vCPU exits here, devices in
//! their own modules, API requests by the controller), gathered into one JSON object per
//! flush and written as a line to the file or FIFO given by `PUT /metrics`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvm_ioctls::VcpuExit;
use serde_json::{json, Value};

use crate::devices::bus::lock;
use crate::devices::legacy::BootTimer;
use crate::devices::virtio::block::BlockCounters;
use crate::devices::virtio::net::NetCounters;
use crate::devices::virtio::vsock::VsockCounters;
use crate::seccomp::SECCOMP_FAULTS;

/// How often metrics are written without a FlushMetrics request (as Firecracker does).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(60);

/// Errors opening or writing the metrics destination.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.metrics_path: cannot open {0} for writing: {1}; give a writable file, or a FIFO with a reader")]
    Open(PathBuf, std::io::Error),
    #[error("cannot write metrics to {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("FlushMetrics: no metrics destination; PUT /metrics first")]
    NotConfigured,
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// vCPU exits by kind, summed over all vCPUs.
#[derive(Debug, Default)]
pub struct VcpuExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub shutdown: AtomicU64,
    pub system_event: AtomicU64,
    pub hlt: AtomicU64,
    pub fail_entry: AtomicU64,
    pub internal_error: AtomicU64,
    pub other: AtomicU64,
    /// KVM_RUN returned EINTR/EAGAIN: a kick (pause) or a host signal.
    pub interrupted: AtomicU64,
    pub run_errors: AtomicU64,
}

impl VcpuExitCounters {
    /// Counts one KVM_RUN result.
    pub fn count(&self, result: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let counter = match result {
            Ok(VcpuExit::IoIn(..)) => &self.io_in,
            Ok(VcpuExit::IoOut(..)) => &self.io_out,
            Ok(VcpuExit::MmioRead(..)) => &self.mmio_read,
            Ok(VcpuExit::MmioWrite(..)) => &self.mmio_write,
            Ok(VcpuExit::Shutdown) => &self.shutdown,
            Ok(VcpuExit::SystemEvent(..)) => &self.system_event,
            Ok(VcpuExit::Hlt) => &self.hlt,
            Ok(VcpuExit::FailEntry(..)) => &self.fail_entry,
            Ok(VcpuExit::InternalError) => &self.internal_error,
            Ok(_) => &self.other,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => &self.interrupted,
            Err(_) => &self.run_errors,
        };
        bump(counter);
    }

    fn snapshot(&self) -> Value {
        json!({
            "io_in": read(&self.io_in), "io_out": read(&self.io_out),
            "mmio_read": read(&self.mmio_read), "mmio_write": read(&self.mmio_write),
            "shutdown": read(&self.shutdown), "system_event": read(&self.system_event),
            "hlt": read(&self.hlt), "fail_entry": read(&self.fail_entry),
            "internal_error": read(&self.internal_error), "other": read(&self.other),
            "interrupted": read(&self.interrupted), "run_errors": read(&self.run_errors),
        })
    }
}

/// API requests answered, and how many failed.
#[derive(Debug, Default)]
pub struct ApiCounters {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
}

impl ApiCounters {
    pub fn record(&self, ok: bool) {
        bump(&self.requests);
        if !ok {
            bump(&self.failures);
        }
    }
}

/// The counters of a built VM's devices, by id.
#[derive(Default, Clone)]
pub struct DeviceCounters {
    pub drives: Vec<(String, Arc<BlockCounters>)>,
    pub nets: Vec<(String, Arc<NetCounters>)>,
    pub vsock: Option<Arc<VsockCounters>>,
    pub boot_timer: Option<Arc<Mutex<BootTimer>>>,
}

impl DeviceCounters {
    fn snapshot(&self) -> Value {
        let mut block = serde_json::Map::new();
        for (id, c) in &self.drives {
            block.insert(
                id.clone(),
                json!({
                    "read_bytes": read(&c.read_bytes), "write_bytes": read(&c.write_bytes),
                    "flushes": read(&c.flushes), "invalid_requests": read(&c.invalid_requests),
                    "io_errors": read(&c.io_errors),
                }),
            );
        }
        let mut net = serde_json::Map::new();
        for (id, c) in &self.nets {
            net.insert(
                id.clone(),
                json!({
                    "rx_frames": read(&c.rx_frames), "rx_bytes": read(&c.rx_bytes),
                    "rx_dropped": read(&c.rx_dropped), "tx_frames": read(&c.tx_frames),
                    "tx_bytes": read(&c.tx_bytes), "tx_dropped": read(&c.tx_dropped),
                    "invalid_chains": read(&c.invalid_chains),
                }),
            );
        }
        let vsock = self.vsock.as_ref().map(|c| json!({
            "tx_packets": read(&c.tx_packets), "tx_bytes": read(&c.tx_bytes),
            "rx_packets": read(&c.rx_packets), "rx_bytes": read(&c.rx_bytes),
            "invalid_chains": read(&c.invalid_chains), "invalid_packets": read(&c.invalid_packets),
            "connections": read(&c.connections), "refused": read(&c.refused),
            "resets": read(&c.resets), "timeouts": read(&c.timeouts),
        }));
        json!({"block": block, "net": net, "vsock": vsock})
    }

    fn boot_time_us(&self) -> Option<u128> {
        let timer = self.boot_timer.as_ref()?;
        lock(timer).boot_time().map(|t| t.as_micros())
    }
}

/// Everything a metrics line reports.
#[derive(Default)]
pub struct Metrics {
    pub api: Arc<ApiCounters>,
    pub vcpu_exits: Arc<VcpuExitCounters>,
    pub devices: DeviceCounters,
}

impl Metrics {
    /// One metrics line's object.
    pub fn snapshot(&self) -> Value {
        let utc_timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        json!({
            "utc_timestamp_ms": utc_timestamp_ms,
            "api": {"requests": read(&self.api.requests), "failures": read(&self.api.failures)},
            "vcpu_exits": self.vcpu_exits.snapshot(),
            "devices": self.devices.snapshot(),
            "seccomp": {"faults": read(&SECCOMP_FAULTS)},
            "boot_time_us": self.devices.boot_time_us(),
        })
    }
}

/// Where metrics lines go: a file (appended to) or a FIFO.
pub struct MetricsSink {
    path: PathBuf,
    file: File,
}

impl MetricsSink {
    /// Opens `path` without blocking: a FIFO must already have a reader.
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| MetricsError::Open(path.to_path_buf(), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes one line.
    pub fn write(&mut self, line: &Value) -> Result<(), MetricsError> {
        let mut text = line.to_string();
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| MetricsError::Write(self.path.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn lines_hold_every_counter_group() {
        let metrics = Metrics::default();
        metrics.api.record(true);
        metrics.api.record(false);
        let snap = metrics.snapshot();
        assert_eq!(snap["api"]["requests"], 2);
        assert_eq!(snap["api"]["failures"], 1);
        assert_eq!(snap["vcpu_exits"]["io_out"], 0);
        assert_eq!(snap["seccomp"]["faults"], 0);
        assert!(snap["boot_time_us"].is_null());
    }

    #[test]
    fn sink_appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut sink = MetricsSink::open(&path).unwrap();
        sink.write(&json!({"a": 1})).unwrap();
        sink.write(&json!({"a": 2})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"a\":2}\n");
        let err = MetricsSink::open(Path::new("/nonexistent/dir/m"))
            .err()
            .unwrap();
        assert!(err
            .to_string()
            .starts_with("metrics.metrics_path: cannot open /nonexistent/dir/m"));
    }
}
