//! The control plane: how soon after process start the VMM answers on its control socket,
//! how fast it answers a trivial request on one connection, and how much memory the VMM
//! itself costs next to a booted guest. Ember's API socket against QEMU's QMP socket.
//!
//! - Ready: spawn to the first answer. Ember runs as `ember --api-sock PATH` (no VM
//!   configured yet, which is how an API-driven Ember starts) and is ready at the first
//!   `200` to `GET /`. QEMU runs as it would be started to run the same guest, the same
//!   `-M microvm` machine as [`crate::boot`], paused before the guest runs (`-S`) with
//!   `-qmp unix:PATH,server=on,wait=off`; it is ready once its QMP greeting arrived and
//!   `qmp_capabilities` was answered. QEMU has built its machine (guest memory, kernel and
//!   initramfs loaded) by then, because its configuration is its command line; Ember builds
//!   nothing before `InstanceStart`. Both are polled every millisecond until they answer.
//! - Latency: after [`WARMUP`] untimed requests, `--requests` sequential round trips on one
//!   kept-alive connection to that same process, each timed alone (p50, p99), and the
//!   requests per second of the whole series. Ember: `GET /` framed by the api crate's HTTP
//!   module; QEMU: `query-status` over QMP. Ember answers on a connection thread that hands
//!   each request to the VMM thread and waits for its answer; QEMU answers QMP within its
//!   main loop. Two thread wake-ups per request make Ember's figure the more sensitive to
//!   CPU contention, which in the nested test bed means the host's load on the level-1
//!   VM's vCPU threads: compare runs made on a quiet host.
//! - Memory: the guest (1 vCPU, 128 MiB, the standard kernel and initramfs, staying up)
//!   booted to ember-init's ready line, [`SETTLE`] later the VMM's resident memory minus the
//!   guest memory it has touched. Ember boots from a config file with its API socket open;
//!   QEMU with its QMP socket open. See [`crate::procfs::MemorySample`] for how the figures are read.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use api::http::{self, Connection};
use serde::Serialize;
use serde_json::{json, Value};
use testbed::{Artifacts, GuestSpec, TEST_BOOT_ARGS};

use crate::boot::{alternate, Vmm};
use crate::procfs::{read_memory, MemorySample};
use crate::stats::{percentile, sorted, Summary};

/// The guest of the memory measurement, as the issue asks: 1 vCPU, 128 MiB.
pub const VCPUS: u8 = 1;
pub const MEM_MIB: u32 = 128;
/// Untimed requests before the timed ones: the first answers pay for lazily set-up state.
const WARMUP: usize = 10;
/// How long after the ready line the memory is read: the guest's init is idle by then.
const SETTLE: Duration = Duration::from_secs(2);
/// Limits for a VMM to answer on its socket, to boot, and for one request.
const READY_LIMIT: Duration = Duration::from_secs(120);
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// Boots tried per memory sample. In the nested test bed a guest now and then hangs early
/// in its boot (seen with both VMMs, while the level-1 VM carried on): such a boot measures
/// nothing and is tried again, once, and said so on stderr.
const BOOT_ATTEMPTS: u32 = 2;
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// How often a socket is tried until it answers: the granularity of the ready figure.
const READY_POLL: Duration = Duration::from_millis(1);
/// How often the console is read for the ready line: reads are not free in the nested test
/// bed (its files are shared over virtiofs), and no time is measured here.
const CONSOLE_POLL: Duration = Duration::from_millis(20);

/// Figures for one VMM: metric name -> summary over runs.
#[derive(Debug, Clone, Serialize)]
pub struct ApiResult {
    pub vmm: &'static str,
    /// What the latency figures time.
    pub request: &'static str,
    pub metrics: BTreeMap<String, Summary>,
}

/// What one fresh VMM process measured on its control socket.
#[derive(Debug, Clone, Copy)]
struct ControlSample {
    ready_ms: f64,
    p50_us: f64,
    p99_us: f64,
    requests_per_s: f64,
}

/// Runs `runs` rounds per VMM, alternating who goes first; each round measures a fresh
/// process's control socket (`requests` timed round trips) and a booted guest's memory.
pub fn compare(
    runs: usize,
    requests: usize,
    art: &Artifacts,
    work: &Path,
    with_peer: bool,
) -> Result<Vec<ApiResult>, String> {
    let vmms: &[Vmm] = if with_peer {
        &[Vmm::Ember, Vmm::QemuMicrovm]
    } else {
        &[Vmm::Ember]
    };
    let samples = alternate(runs, vmms, |run, vmm| {
        let control = match vmm {
            Vmm::Ember => ember_control(art, work, requests)?,
            Vmm::QemuMicrovm => qemu_control(art, work, requests)?,
        };
        let memory = memory_sample(vmm, art, work)?;
        eprintln!(
            "run {}/{runs} {:<13} ready {:>8.1} ms, p50 {:>7.1} us, p99 {:>7.1} us, {:>7.0} req/s, \
             RSS {:>6.1} MiB - guest {:>6.1} MiB = {:>5.1} MiB",
            run + 1,
            vmm.name(),
            control.ready_ms,
            control.p50_us,
            control.p99_us,
            control.requests_per_s,
            mib(memory.rss_kib),
            mib(memory.guest_touched_kib),
            mib(memory.overhead_kib()),
        );
        Ok((control, memory))
    })?;
    vmms.iter()
        .zip(samples)
        .map(|(vmm, runs)| {
            Ok(ApiResult {
                vmm: vmm.name(),
                request: match vmm {
                    Vmm::Ember => "GET /",
                    Vmm::QemuMicrovm => "QMP query-status",
                },
                metrics: summarise(&runs)?,
            })
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Metric name -> summary over the runs of one VMM.
fn summarise(runs: &[(ControlSample, MemorySample)]) -> Result<BTreeMap<String, Summary>, String> {
    type Figure = fn(&(ControlSample, MemorySample)) -> f64;
    let figures: [(&str, Figure); 9] = [
        ("ready_ms", |(c, _)| c.ready_ms),
        ("request_p50_us", |(c, _)| c.p50_us),
        ("request_p99_us", |(c, _)| c.p99_us),
        ("requests_per_s", |(c, _)| c.requests_per_s),
        ("rss_mib", |(_, m)| mib(m.rss_kib)),
        ("guest_touched_mib", |(_, m)| mib(m.guest_touched_kib)),
        ("overhead_mib", |(_, m)| mib(m.overhead_kib())),
        ("overhead_anon_mib", |(_, m)| {
            mib(m.anonymous_kib.saturating_sub(m.guest_touched_kib))
        }),
        ("overhead_file_shmem_mib", |(_, m)| {
            mib(m.rss_kib.saturating_sub(m.anonymous_kib))
        }),
    ];
    figures
        .iter()
        .map(|(name, figure)| {
            let values: Vec<f64> = runs.iter().map(figure).collect();
            let summary = Summary::of(&values).ok_or("no runs")?;
            Ok((name.to_string(), summary))
        })
        .collect()
}

/// A VMM process, killed when dropped (when a measurement fails, or for Ember without a
/// VM). A VMM with a VM is ended the way its guest would end instead: in the nested test
/// bed, killing a VMM whose guest runs was followed by a hung level-1 VM at the next boot
/// several times, and an orderly end is what the other benchmarks do.
struct Vm {
    child: Child,
    name: &'static str,
    stderr: PathBuf,
}

impl Vm {
    fn spawn(mut cmd: Command, vmm: Vmm, work: &Path, stdout: Stdio) -> Result<Self, String> {
        let stderr = work.join(format!("api-{}.stderr", vmm.name()));
        let file = fs::File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", vmm.name()))?;
        Ok(Self {
            child,
            name: vmm.name(),
            stderr,
        })
    }

    /// Calls `attempt` every `interval` until it gives an answer; None once `limit` has
    /// passed, an error when the process ends first.
    fn poll<T>(
        &mut self,
        limit: Duration,
        interval: Duration,
        mut attempt: impl FnMut() -> Option<T>,
    ) -> Result<Option<T>, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(answer) = attempt() {
                return Ok(Some(answer));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(&format!("exited with {status}")));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(interval);
        }
    }

    /// Polls the control socket with `attempt` until it answers, within [`READY_LIMIT`].
    fn wait_ready<T>(&mut self, attempt: impl FnMut() -> Option<T>) -> Result<T, String> {
        match self.poll(READY_LIMIT, READY_POLL, attempt)? {
            Some(answer) => Ok(answer),
            None => Err(self.failure(&format!("gave no answer within {READY_LIMIT:?}"))),
        }
    }

    /// Waits for the process to end by itself, with success.
    fn wait_exit(&mut self, limit: Duration) -> Result<(), String> {
        match testbed::wait_with_timeout(&mut self.child, limit) {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(self.failure(&format!("ended with {status}"))),
            None => Err(self.failure(&format!("did not end within {limit:?}"))),
        }
    }

    fn failure(&self, what: &str) -> String {
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("{} {what}; its stderr:\n{stderr}", self.name)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A socket path in `work`, with nothing left at it from an earlier run.
fn fresh_socket(work: &Path, name: &str) -> PathBuf {
    let path = work.join(name);
    let _ = fs::remove_file(&path);
    path
}

/// `ember --api-sock`: spawn to the first `200` on `GET /`, then `GET /` round trips on one
/// kept-alive connection.
fn ember_control(art: &Artifacts, work: &Path, requests: usize) -> Result<ControlSample, String> {
    let socket = fresh_socket(work, "api-ember.sock");
    let mut cmd = Command::new(&art.ember);
    cmd.arg("--api-sock").arg(&socket);
    let start = Instant::now();
    let mut vm = Vm::spawn(cmd, Vmm::Ember, work, Stdio::null())?;
    let client = ApiClient::new(&socket).with_timeout(REQUEST_LIMIT);
    let first = vm.wait_ready(|| {
        client
            .request("GET", "/", None)
            .ok()
            .filter(|r| r.status == 200)
    })?;
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let info: Value = serde_json::from_str(&first.body)
        .map_err(|e| format!("GET / answered {:?}: {e}", first.body))?;
    if info["app_name"] != "ember" {
        return Err(format!(
            "GET / answered {info} instead of Ember's instance info"
        ));
    }
    let stream = connect(&socket)?;
    let mut conn = Connection::new(stream);
    let (p50_us, p99_us, requests_per_s) = time_requests(requests, || {
        http::write_request(conn.stream(), "GET", "/", None)
            .map_err(|e| format!("cannot send GET /: {e}"))?;
        match conn.read_response() {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!(
                "GET / answered {status}: {}",
                String::from_utf8_lossy(&body)
            )),
            Err(e) => Err(format!("GET /: {e}")),
        }
    })?;
    Ok(ControlSample {
        ready_ms,
        p50_us,
        p99_us,
        requests_per_s,
    })
}

/// QEMU microvm paused before the guest runs: spawn to the QMP greeting and
/// `qmp_capabilities` answered, then `query-status` round trips on that connection.
fn qemu_control(art: &Artifacts, work: &Path, requests: usize) -> Result<ControlSample, String> {
    let socket = fresh_socket(work, "api-qemu.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(qemu_microvm_args(&bench_guest(art), &socket))
        .arg("-S");
    let start = Instant::now();
    let mut vm = Vm::spawn(cmd, Vmm::QemuMicrovm, work, Stdio::null())?;
    let mut qmp = vm.wait_ready(|| Qmp::handshake(&socket).ok())?;
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let status = qmp.execute("query-status")?;
    if status["status"] != "prelaunch" {
        return Err(format!("QEMU reports {status} instead of a paused machine"));
    }
    let (p50_us, p99_us, requests_per_s) =
        time_requests(requests, || qmp.execute("query-status").map(drop))?;
    // QEMU may close the connection before it answers `quit`; its exit is what counts.
    let _ = qmp.execute("quit");
    vm.wait_exit(READY_LIMIT)?;
    Ok(ControlSample {
        ready_ms,
        p50_us,
        p99_us,
        requests_per_s,
    })
}

fn connect(socket: &Path) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(REQUEST_LIMIT))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_LIMIT)))
        .map_err(|e| format!("cannot set timeouts on {}: {e}", socket.display()))?;
    Ok(stream)
}

/// Runs `round_trip` [`WARMUP`] times untimed, then `n` times timed; returns the p50 and
/// p99 of the single round trips in microseconds and the round trips per second overall.
fn time_requests(
    n: usize,
    mut round_trip: impl FnMut() -> Result<(), String>,
) -> Result<(f64, f64, f64), String> {
    for _ in 0..WARMUP {
        round_trip()?;
    }
    let mut micros = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        round_trip()?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let per_s = n as f64 / start.elapsed().as_secs_f64();
    let micros = sorted(&micros);
    let p = |q| percentile(&micros, q).ok_or_else(|| "no requests".to_string());
    Ok((p(50.0)?, p(99.0)?, per_s))
}

/// One QMP connection, past the capabilities negotiation. QMP speaks one JSON object per
/// line; asynchronous events may arrive between a command and its answer and are skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    fn handshake(socket: &Path) -> Result<Self, String> {
        let stream = connect(socket)?;
        let writer = stream
            .try_clone()
            .map_err(|e| format!("cannot clone the QMP socket: {e}"))?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QEMU greeted with {greeting}"));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Sends a command without arguments and returns its `return` value.
    fn execute(&mut self, command: &str) -> Result<Value, String> {
        self.execute_with(command, None)
    }

    /// Sends a command with `arguments` and returns its `return` value.
    fn execute_with(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot send QMP {command}: {e}"))?;
        loop {
            let mut message = self.read_message()?;
            if let Some(answer) = message.get_mut("return") {
                return Ok(answer.take());
            }
            if let Some(error) = message.get("error") {
                return Err(format!("QMP {command} failed: {error}"));
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed the QMP connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}")),
            Err(e) => Err(format!("cannot read from QMP: {e}")),
        }
    }
}

/// The memory measurement's guest: the standard kernel and initramfs, 1 vCPU, 128 MiB,
/// staying up after its ready line.
pub fn bench_guest(art: &Artifacts) -> GuestSpec {
    GuestSpec {
        vcpus: VCPUS,
        mem_mib: MEM_MIB,
        boot_args: TEST_BOOT_ARGS.replace(" ember.test=poweroff", ""),
        ..GuestSpec::standard(art)
    }
}

/// QEMU's microvm machine as [`crate::boot`] runs it (same options, same kernel, initramfs
/// and command line; this guest has no drives or network), with its QMP socket at `qmp`.
fn qemu_microvm_args(spec: &GuestSpec, qmp: &Path) -> Vec<String> {
    let mut args = crate::boot::qemu_microvm_args(spec);
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    args
}

/// The memory of `vmm` with a booted guest, booting again after a hung boot.
fn memory_sample(vmm: Vmm, art: &Artifacts, work: &Path) -> Result<MemorySample, String> {
    for attempt in 1..=BOOT_ATTEMPTS {
        if let Some(sample) = memory_once(vmm, art, work)? {
            return Ok(sample);
        }
        eprintln!(
            "{}: the guest printed no ready line within {BOOT_LIMIT:?} (boot {attempt} of \
             {BOOT_ATTEMPTS}, a hung boot)",
            vmm.name()
        );
    }
    let console = work.join(format!("api-{}.out", vmm.name()));
    Err(format!(
        "{}: no boot of {BOOT_ATTEMPTS} reached the ready line; the last console:\n{}",
        vmm.name(),
        fs::read_to_string(console).unwrap_or_default()
    ))
}

/// Boots the bench guest with `vmm` to ember-init's ready line, waits [`SETTLE`], reads the
/// VMM's memory and powers the guest off; None when the ready line did not come within
/// [`BOOT_LIMIT`].
fn memory_once(vmm: Vmm, art: &Artifacts, work: &Path) -> Result<Option<MemorySample>, String> {
    let spec = bench_guest(art);
    let console = work.join(format!("api-{}.out", vmm.name()));
    let stdout = fs::File::create(&console)
        .map_err(|e| format!("cannot create {}: {e}", console.display()))?;
    let socket = fresh_socket(work, &format!("api-{}.sock", vmm.name()));
    let cmd = match vmm {
        Vmm::Ember => {
            let config = work.join("api-bench-vm.json");
            fs::write(&config, spec.config_json())
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            let mut cmd = Command::new(&art.ember);
            cmd.arg("--api-sock")
                .arg(&socket)
                .arg("--config-file")
                .arg(&config);
            cmd
        }
        Vmm::QemuMicrovm => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(qemu_microvm_args(&spec, &socket));
            cmd
        }
    };
    let mut vm = Vm::spawn(cmd, vmm, work, stdout.into())?;
    let ready = vm
        .poll(BOOT_LIMIT, CONSOLE_POLL, || {
            fs::read_to_string(&console)
                .ok()
                .filter(|text| text.contains("ember-init: ready in "))
        })
        .map_err(|e| {
            let text = fs::read_to_string(&console).unwrap_or_default();
            format!("no ready line: {e}\nits console:\n{text}")
        })?;
    if ready.is_none() {
        return Ok(None);
    }
    std::thread::sleep(SETTLE);
    let smaps_path = format!("/proc/{}/smaps", vm.child.id());
    let smaps =
        fs::read_to_string(&smaps_path).map_err(|e| format!("cannot read {smaps_path}: {e}"))?;
    let sample = read_memory(&smaps, u64::from(MEM_MIB) << 10)
        .map_err(|e| format!("{}: {e}", vmm.name()))?;
    press_ctrl_alt_del(vmm, &socket)?;
    vm.wait_exit(BOOT_LIMIT)?;
    Ok(Some(sample))
}

/// Types Ctrl-Alt-Del into the guest's i8042 through the VMM's control socket: ember-init
/// powers off, the guest resets through the i8042 (`reboot=k`) and the VMM exits.
fn press_ctrl_alt_del(vmm: Vmm, socket: &Path) -> Result<(), String> {
    match vmm {
        Vmm::Ember => {
            let answer = ApiClient::new(socket)
                .with_timeout(REQUEST_LIMIT)
                .request(
                    "PUT",
                    "/actions",
                    Some(r#"{"action_type": "SendCtrlAltDel"}"#),
                )
                .map_err(|e| e.to_string())?;
            if !answer.is_success() {
                return Err(format!("SendCtrlAltDel: {}", answer.fault_message()));
            }
        }
        Vmm::QemuMicrovm => {
            let keys: Vec<Value> = ["ctrl", "alt", "delete"]
                .iter()
                .map(|key| json!({"type": "qcode", "data": key}))
                .collect();
            Qmp::handshake(socket)?.execute_with("send-key", Some(json!({ "keys": keys })))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_args_open_qmp_and_leave_pausing_to_the_caller() {
        let spec = GuestSpec {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            vcpus: 1,
            mem_mib: 128,
            boot_args: "quiet".into(),
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        };
        let args = qemu_microvm_args(&spec, Path::new("/tmp/q.sock")).join(" ");
        assert!(args.contains("-m 128M"), "{args}");
        assert!(args.contains("-initrd /i -append quiet"), "{args}");
        assert!(
            args.ends_with("-qmp unix:/tmp/q.sock,server=on,wait=off"),
            "{args}"
        );
        assert!(!args.split(' ').any(|a| a == "-S"), "{args}");
    }
}
