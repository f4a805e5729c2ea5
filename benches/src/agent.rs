//! The agent over vsock: process start to agent-ready, the round trip of `exec true`, the
//! rate of a command's streamed output, and file upload/download throughput. QEMU's microvm has no hybrid vsock (and vhost-vsock is
//! not available here), so its side of the comparison is boot to ember-init's serial ready
//! line on the same kernel, root image and command line: the readiness a harness gets
//! without an agent channel.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::agent::{self, AgentClient, Exec, WriteOptions};
use serde::Serialize;
use testbed::{Artifacts, GuestSpec};

use crate::boot::{self, Vmm};
use crate::stats::{percentile, sorted, Summary};

/// What one Ember boot measured.
struct EmberSample {
    to_ready_ms: f64,
    exec_ms: Vec<f64>,
    stdout_mib_s: f64,
    upload_mib_s: f64,
    download_mib_s: f64,
}

/// Results of the agent benchmark.
#[derive(Debug, Serialize)]
pub struct AgentResults {
    /// Ember: process start to the agent's READY over vsock.
    pub ember_to_agent_ready_ms: Summary,
    /// QEMU microvm: process start to ember-init's ready line on the serial console.
    pub qemu_to_serial_ready_ms: Option<Summary>,
    /// Round trip of `exec true` (request to exit status), every call of every boot.
    pub exec_true_ms: Summary,
    pub exec_true_p99_ms: f64,
    /// A command's output streamed to the host: `dd` writing `mib` MiB to stdout in 4 KiB
    /// writes, as a program's stdio does.
    pub exec_stdout_mib_s: Summary,
    pub upload_mib_s: Summary,
    pub download_mib_s: Summary,
}

/// Runs `runs` boots per VMM, alternating, with `execs` exec round trips and a `mib` MiB
/// transfer each way on every Ember boot.
pub fn compare(
    runs: usize,
    execs: usize,
    mib: usize,
    art: &Artifacts,
    work: &Path,
    with_peer: bool,
) -> Result<AgentResults, String> {
    let payload = work.join("agent-payload.bin");
    fs::write(&payload, pseudo_random(mib << 20))
        .map_err(|e| format!("cannot write {}: {e}", payload.display()))?;
    let vmms: &[Vmm] = if with_peer {
        &[Vmm::Ember, Vmm::QemuMicrovm]
    } else {
        &[Vmm::Ember]
    };
    let mut ember = Vec::new();
    let mut qemu = Vec::new();
    boot::alternate(runs, vmms, |run, vmm| {
        let root = art.private_rootfs(work)?;
        match vmm {
            Vmm::Ember => {
                let s = ember_once(art, &root, work, execs, &payload)?;
                eprintln!(
                    "run {}/{runs} ember        {:>9.1} ms to agent ready, exec true median \
                     {:.2} ms, stdout {:.1} MiB/s, up {:.1} MiB/s, down {:.1} MiB/s",
                    run + 1,
                    s.to_ready_ms,
                    crate::stats::median(&sorted(&s.exec_ms)).unwrap_or(0.0),
                    s.stdout_mib_s,
                    s.upload_mib_s,
                    s.download_mib_s
                );
                ember.push(s);
            }
            Vmm::QemuMicrovm => {
                let mut spec = GuestSpec::with_root_running(art, &root, "true");
                spec.mem_mib = 256;
                let sample = boot::boot_once(vmm, art, &spec, work)?;
                eprintln!(
                    "run {}/{runs} qemu-microvm {:>9.1} ms to serial ready",
                    run + 1,
                    sample.to_ready_ms
                );
                qemu.push(sample.to_ready_ms);
            }
        }
        Ok(())
    })?;
    let all_execs: Vec<f64> = ember.iter().flat_map(|s| s.exec_ms.clone()).collect();
    let summary = |v: Vec<f64>| Summary::of(&v).ok_or_else(|| "no runs".to_string());
    Ok(AgentResults {
        ember_to_agent_ready_ms: summary(ember.iter().map(|s| s.to_ready_ms).collect())?,
        qemu_to_serial_ready_ms: Summary::of(&qemu),
        exec_true_p99_ms: percentile(&sorted(&all_execs), 99.0).unwrap_or(0.0),
        exec_true_ms: summary(all_execs)?,
        exec_stdout_mib_s: summary(ember.iter().map(|s| s.stdout_mib_s).collect())?,
        upload_mib_s: summary(ember.iter().map(|s| s.upload_mib_s).collect())?,
        download_mib_s: summary(ember.iter().map(|s| s.download_mib_s).collect())?,
    })
}

/// One Ember boot with a vsock device: time to the agent's READY, then the exec and
/// transfer figures, then a shutdown through the agent.
fn ember_once(
    art: &Artifacts,
    root: &Path,
    work: &Path,
    execs: usize,
    payload: &Path,
) -> Result<EmberSample, String> {
    let uds = work.join("agent-bench.sock");
    let mut spec = GuestSpec::with_agent(art, root, &uds);
    spec.mem_mib = 256;
    let config = work.join("agent-bench.json");
    fs::write(&config, spec.config_json())
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let console = work.join("agent-bench.console");
    let start = Instant::now();
    let child = Command::new(&art.ember)
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console).map_err(|e| e.to_string())?)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start ember: {e}"))?;
    let mut vm = Running(Some(child));
    agent::wait_ready(&uds, Duration::from_secs(600)).map_err(|e| {
        let text = fs::read_to_string(&console).unwrap_or_default();
        format!("the agent never became ready: {e}\n{text}")
    })?;
    let to_ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let client = AgentClient::vsock(&uds).with_timeout(Duration::from_secs(600));
    let mut exec_ms = Vec::with_capacity(execs);
    for _ in 0..execs {
        let t = Instant::now();
        let out = client
            .exec_output(&Exec::new(["true"]))
            .map_err(|e| format!("exec true: {e}"))?;
        exec_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if out.status.code != Some(0) {
            return Err(format!("exec true ended with {:?}", out.status));
        }
    }
    let mib = fs::metadata(payload).map_err(|e| e.to_string())?.len() >> 20;
    let stdout_mib_s = stream_stdout(&client, mib)?;
    let (upload_mib_s, download_mib_s) = transfer(&client, payload)?;
    client
        .shutdown()
        .map_err(|e| format!("shutdown through the agent: {e}"))?;
    vm.wait(Duration::from_secs(120))?;
    Ok(EmberSample {
        to_ready_ms,
        exec_ms,
        stdout_mib_s,
        upload_mib_s,
        download_mib_s,
    })
}

/// Runs `dd` writing `mib` MiB of zeros to stdout in 4 KiB writes; MiB/s as the host
/// receives them, request to exit status.
fn stream_stdout(client: &AgentClient, mib: u64) -> Result<f64, String> {
    let count = (mib << 20) / 4096;
    let command = Exec::new(["dd", "if=/dev/zero", "bs=4096", &format!("count={count}")]);
    let mut received = 0u64;
    let t = Instant::now();
    let status = client
        .exec(&command, |stream, data| {
            if stream == agent::OutputStream::Stdout {
                received += data.len() as u64;
            }
            Ok(())
        })
        .map_err(|e| format!("exec dd: {e}"))?;
    let seconds = t.elapsed().as_secs_f64();
    if status.code != Some(0) || received != count * 4096 {
        return Err(format!(
            "exec dd ended with {status:?} after {received} of {} bytes",
            count * 4096
        ));
    }
    Ok(mib as f64 / seconds)
}

/// Uploads `payload` to the guest's /tmp and downloads it again; MiB/s each way.
fn transfer(client: &AgentClient, payload: &Path) -> Result<(f64, f64), String> {
    let size = fs::metadata(payload).map_err(|e| e.to_string())?.len();
    let file = fs::File::open(payload).map_err(|e| e.to_string())?;
    let t = Instant::now();
    client
        .write_file("/tmp/payload.bin", file, WriteOptions::default(), |_| {})
        .map_err(|e| format!("upload: {e}"))?;
    let up = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut sink = CountingSink(0);
    client
        .read_file("/tmp/payload.bin", &mut sink, |_, _| {})
        .map_err(|e| format!("download: {e}"))?;
    let down = t.elapsed().as_secs_f64();
    if sink.0 != size {
        return Err(format!("downloaded {} bytes of {size}", sink.0));
    }
    let mib = size as f64 / f64::from(1u32 << 20);
    Ok((mib / up, mib / down))
}

struct CountingSink(u64);

impl std::io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The VMM process, killed if the benchmark gives up on it.
struct Running(Option<Child>);

impl Running {
    fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        let mut child = self.0.take().ok_or("already waited")?;
        match testbed::wait_with_timeout(&mut child, timeout) {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(format!("ember ended with {status} after the shutdown")),
            None => Err("ember did not exit after the shutdown".into()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Incompressible bytes (xorshift), so no layer can shortcut the transfer.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
