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
    pub to_ready_ms: Summary,
    pub guest_uptime_at_ready_ms: Summary,
}

/// One VM run: how long to the ready line, and everything the console printed until exit.
pub struct VmRun {
    pub to_ready: Duration,
    pub ready_line: String,
    pub console: String,
}

/// Runs the guest with `vmm` until it powers off (inside network namespace `netns` when
/// given) and returns its timing and console.
pub fn run_vm(
    vmm: Vmm,
    art: &Artifacts,
    spec: &GuestSpec,
    work: &Path,
    netns: Option<&str>,
) -> Result<VmRun, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]);
            c
        }
        None => Command::new("env"),
    };
    match vmm {
        Vmm::Ember => {
            let config = work.join("bench-vm.json");
            std::fs::write(&config, spec.config_json())
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            cmd.arg(&art.ember)
                .arg("--no-api")
                .arg("--config-file")
                .arg(&config);
        }
        Vmm::QemuMicrovm => {
            cmd.arg("qemu-system-x86_64").args(qemu_microvm_args(spec));
        }
    }
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
    let lines = console_lines(&mut child);
    let ready = wait_ready_line(&lines, Duration::from_secs(300));
    let to_ready = start.elapsed();
    let exited = testbed::wait_with_timeout(&mut child, Duration::from_secs(600)).is_some();
    let (ready_line, mut console) = ready.map_err(|console| {
        format!(
            "{} never printed the ready line; its console:\n{console}",
            vmm.name()
        )
    })?;
    console.extend(lines.iter().map(|l| l + "\n"));
    if !exited {
        return Err(format!(
            "{} did not exit after the guest powered off:\n{console}",
            vmm.name()
        ));
    }
    Ok(VmRun {
        to_ready,
        ready_line,
        console,
    })
}

/// Boots the guest once with `vmm` and times it.
pub fn boot_once(
    vmm: Vmm,
    art: &Artifacts,
    spec: &GuestSpec,
    work: &Path,
) -> Result<BootSample, String> {
    let run = run_vm(vmm, art, spec, work, None)?;
    let guest = parse_ready_line(&run.ready_line).ok_or_else(|| {
        format!(
            "{}: unparsable ready line {:?}\n{}",
            vmm.name(),
            run.ready_line,
            run.console
        )
    })?;
    Ok(BootSample {
        to_ready_ms: run.to_ready.as_secs_f64() * 1000.0,
        guest_ready_ms: guest.ready_ms as f64,
    })
}

/// QEMU's microvm machine with the same kernel, initramfs, command line, shape, drives and
/// network. The options follow QEMU's own advice for fast microvm boots; the serial port
/// stays on for the ready line, and an i8042 is added so that the guest's `reboot=k`
/// power-off ends QEMU as it ends Ember (microvm has none by default). Without ACPI (the
/// guest kernel has none) QEMU announces its virtio-mmio devices on the command line, as
/// Ember does; the root device's `root=` is added here, as Ember adds it.
pub(crate) fn qemu_microvm_args(spec: &GuestSpec) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-device",
        "i8042",
        "-accel",
        "kvm",
        "-cpu",
        "host",
    ]
    .iter()
    .chain(testbed::QEMU_HEADLESS_ARGS.iter())
    .chain(["-serial", "stdio"].iter())
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{}M", spec.mem_mib),
    ]);
    args.extend(["-kernel".into(), spec.kernel.display().to_string()]);
    if let Some(initrd) = &spec.initrd {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    let mut append = String::new();
    let root = spec.drives.iter().find(|d| d["is_root_device"] == true);
    for (i, drive) in root
        .into_iter()
        .chain(spec.drives.iter().filter(|d| d["is_root_device"] != true))
        .enumerate()
    {
        let read_only = drive["is_read_only"] == true;
        let cache = if drive["cache_type"] == "Writeback" {
            "writeback"
        } else {
            "unsafe"
        };
        args.push("-drive".into());
        args.push(format!(
            "id=d{i},file={},format=raw,if=none,cache={cache},readonly={}",
            drive["path_on_host"].as_str().unwrap_or_default(),
            if read_only { "on" } else { "off" }
        ));
        args.extend(["-device".into(), format!("virtio-blk-device,drive=d{i}")]);
    }
    if let Some(root) = root {
        append = format!(
            "root=/dev/vda {} ",
            if root["is_read_only"] == true {
                "ro"
            } else {
                "rw"
            }
        );
    }
    for (i, net) in spec.nets.iter().enumerate() {
        let tap = net["host_dev_name"].as_str().unwrap_or_default();
        args.push("-netdev".into());
        args.push(format!("tap,id=n{i},ifname={tap},script=no,downscript=no"));
        let mac = net["guest_mac"]
            .as_str()
            .map(|m| format!(",mac={m}"))
            .unwrap_or_default();
        args.extend([
            "-device".into(),
            format!("virtio-net-device,netdev=n{i}{mac}"),
        ]);
    }
    args.extend(["-append".into(), append + &spec.boot_args]);
    args
}

/// Streams the child's stdout line by line. The reader drains to the end even after the
/// ready line: a VMM whose console pipe fills up or closes early could stall before exit.
fn console_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
    }
    rx
}

/// Waits for the ready line; returns it and the console so far, or the console on failure.
fn wait_ready_line(
    lines: &mpsc::Receiver<String>,
    timeout: Duration,
) -> Result<(String, String), String> {
    let deadline = Instant::now() + timeout;
    let mut console = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                console.push_str(&line);
                console.push('\n');
                if line.contains("ember-init: ready in ") {
                    return Ok((line, console));
                }
            }
            Err(_) => return Err(console),
        }
    }
}

/// Runs `measure` `runs` times for each VMM, alternating which goes first so that drift
/// on the machine hits all alike; returns the results per VMM, in `vmms` order.
pub fn alternate<T>(
    runs: usize,
    vmms: &[Vmm],
    mut measure: impl FnMut(usize, Vmm) -> Result<T, String>,
) -> Result<Vec<Vec<T>>, String> {
    let mut results: Vec<Vec<T>> = (0..vmms.len()).map(|_| Vec::new()).collect();
    for run in 0..runs {
        for k in 0..vmms.len() {
            let i = (k + run) % vmms.len();
            results[i].push(measure(run, vmms[i])?);
        }
    }
    Ok(results)
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
    let samples = alternate(runs, vmms, |run, vmm| {
        let sample = boot_once(vmm, art, spec, work)?;
        eprintln!(
            "run {}/{runs} {:<13} {:>9.1} ms to ready (guest uptime {:.0} ms)",
            run + 1,
            vmm.name(),
            sample.to_ready_ms,
            sample.guest_ready_ms
        );
        Ok(sample)
    })?;
    vmms.iter()
        .zip(samples)
        .map(|(vmm, s)| {
            let to_ready: Vec<f64> = s.iter().map(|b| b.to_ready_ms).collect();
            let guest: Vec<f64> = s.iter().map(|b| b.guest_ready_ms).collect();
            Ok(VmmResult {
                vmm: vmm.name(),
                to_ready_ms: Summary::of(&to_ready).ok_or("no runs")?,
                guest_uptime_at_ready_ms: Summary::of(&guest).ok_or("no runs")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternate_switches_who_goes_first_and_groups_by_vmm() {
        let mut order = Vec::new();
        let results = alternate(3, &[Vmm::Ember, Vmm::QemuMicrovm], |run, vmm| {
            order.push((run, vmm.name()));
            Ok(run)
        })
        .unwrap();
        assert_eq!(order[0], (0, "ember"));
        assert_eq!(order[2], (1, "qemu-microvm"));
        assert_eq!(results, vec![vec![0, 1, 2], vec![0, 1, 2]]);
        let failed = alternate(2, &[Vmm::Ember], |_, _| Err::<(), _>("boom".to_string()));
        assert_eq!(failed.unwrap_err(), "boom");
    }
}
