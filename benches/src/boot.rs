//! Boot latency: process start to the guest's ready line, Ember against QEMU's `microvm`
//! machine booting the same kernel and initramfs with the same command line, alternating
//! runs so that drift on the machine hits both alike.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::{parse_ready_line, Artifacts, GuestSpec};

use crate::stats::Summary;

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Ember,
    QemuMicrovm,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Ember => "ember",
            Vmm::QemuMicrovm => "qemu-microvm",
        }
    }
}

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
pub struct BootSample {
    /// Host-side: spawn of the VMM process to the ready line on its stdout.
    pub to_ready_ms: f64,
    /// Guest-side: the guest kernel's uptime when ember-init was ready.
    pub guest_ready_ms: f64,
}

/// Results for one VMM.
#[derive(Debug, Clone, Serialize)]
pub struct VmmResult {
    pub vmm: &'static str,
    pub to_ready: Summary,
    pub guest_uptime_at_ready: Summary,
}

/// Boots the guest once with `vmm` and times it.
pub fn boot_once(
    vmm: Vmm,
    art: &Artifacts,
    spec: &GuestSpec,
    work: &Path,
) -> Result<BootSample, String> {
    let mut cmd = match vmm {
        Vmm::Ember => {
            let config = work.join("bench-vm.json");
            std::fs::write(&config, spec.config_json())
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            let mut c = Command::new(&art.ember);
            c.arg("--no-api").arg("--config-file").arg(&config);
            c
        }
        Vmm::QemuMicrovm => qemu_microvm(spec),
    };
    let stderr_path = work.join(format!("{}.stderr", vmm.name()));
    let stderr = std::fs::File::create(&stderr_path)
        .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.name()))?;
    let ready = wait_ready_line(&mut child, Duration::from_secs(120));
    let to_ready = start.elapsed();
    let exited = testbed::wait_with_timeout(&mut child, Duration::from_secs(60)).is_some();
    let (ready_line, console) = ready.map_err(|console| {
        format!(
            "{} never printed the ready line; its console:\n{console}",
            vmm.name()
        )
    })?;
    if !exited {
        return Err(format!(
            "{} did not exit after the guest powered off",
            vmm.name()
        ));
    }
    let guest = parse_ready_line(&ready_line).ok_or_else(|| {
        format!(
            "{}: unparsable ready line {ready_line:?}\n{console}",
            vmm.name()
        )
    })?;
    Ok(BootSample {
        to_ready_ms: to_ready.as_secs_f64() * 1000.0,
        guest_ready_ms: guest.ready_ms as f64,
    })
}

/// QEMU's microvm machine with the same kernel, initramfs, command line and shape. The
/// options follow QEMU's own advice for fast microvm boots; the serial port stays on for
/// the ready line, and an i8042 is added so that the guest's `reboot=k` power-off ends
/// QEMU as it ends Ember (microvm has none by default).
fn qemu_microvm(spec: &GuestSpec) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-device",
        "i8042",
        "-accel",
        "kvm",
        "-cpu",
        "host",
    ])
    .args([
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &format!("{}M", spec.mem_mib),
    ])
    .args(testbed::QEMU_HEADLESS_ARGS)
    .args(["-serial", "stdio"])
    .arg("-kernel")
    .arg(&spec.kernel)
    .arg("-append")
    .arg(&spec.boot_args);
    if let Some(initrd) = &spec.initrd {
        c.arg("-initrd").arg(initrd);
    }
    c
}

/// Reads stdout until the ready line; returns it and the console so far, or the console
/// on failure.
fn wait_ready_line(child: &mut Child, timeout: Duration) -> Result<(String, String), String> {
    let Some(stdout) = child.stdout.take() else {
        return Err(String::new());
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Drain to the end even after the ready line: a VMM whose console pipe fills up or
        // closes early could stall before it exits.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let mut console = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                console.push_str(&line);
                console.push('\n');
                if line.contains("ember-init: ready in ") {
                    return Ok((line, console));
                }
            }
            Err(_) => {
                let _ = child.kill();
                return Err(console);
            }
        }
    }
}

/// Runs `runs` boots of each VMM, alternating which goes first.
pub fn compare(
    runs: usize,
    art: &Artifacts,
    spec: &GuestSpec,
    work: &Path,
    with_peer: bool,
) -> Result<Vec<VmmResult>, String> {
    let vmms: &[Vmm] = if with_peer {
        &[Vmm::Ember, Vmm::QemuMicrovm]
    } else {
        &[Vmm::Ember]
    };
    let mut samples: Vec<Vec<BootSample>> = vec![Vec::new(); vmms.len()];
    for run in 0..runs {
        for k in 0..vmms.len() {
            let i = (k + run) % vmms.len();
            let sample = boot_once(vmms[i], art, spec, work)?;
            eprintln!(
                "run {}/{runs} {:<13} {:>9.1} ms to ready (guest uptime {:.0} ms)",
                run + 1,
                vmms[i].name(),
                sample.to_ready_ms,
                sample.guest_ready_ms
            );
            samples[i].push(sample);
        }
    }
    vmms.iter()
        .zip(samples)
        .map(|(vmm, s)| {
            let to_ready: Vec<f64> = s.iter().map(|b| b.to_ready_ms).collect();
            let guest: Vec<f64> = s.iter().map(|b| b.guest_ready_ms).collect();
            Ok(VmmResult {
                vmm: vmm.name(),
                to_ready: Summary::of(&to_ready).ok_or("no runs")?,
                guest_uptime_at_ready: Summary::of(&guest).ok_or("no runs")?,
            })
        })
        .collect()
}
