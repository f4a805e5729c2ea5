//! Device throughput: inside the guest, sequential 1 MiB and random 4 KiB direct I/O on a
//! data drive (ember-iobench), and TCP both ways between the guest and the host over a TAP
//! in a namespace the benchmark makes. The same guest, images and TAP for Ember and QEMU
//! microvm, runs alternating.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::{drive, Artifacts, GuestSpec};

use crate::boot::{alternate, run_vm, Vmm};
use crate::stats::Summary;

const HOST_ADDR: &str = "172.16.0.1";
const TAP: &str = "emberbench0";

/// Figures for one VMM: metric name -> summary over runs.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceResult {
    pub vmm: &'static str,
    pub metrics: BTreeMap<String, Summary>,
}

/// A network namespace with a TAP, removed on drop.
struct Namespace(String);

impl Namespace {
    fn create() -> Result<Self, String> {
        let name = format!("ember-bench-{}", std::process::id());
        sh(&format!("ip netns add {name}"))?;
        let ns = Self(name);
        ns.exec(&format!(
            "ip link set lo up && ip tuntap add dev {TAP} mode tap && \
             ip addr add {HOST_ADDR}/24 dev {TAP} && ip link set {TAP} up"
        ))?;
        Ok(ns)
    }

    fn exec(&self, script: &str) -> Result<(), String> {
        sh(&format!("ip netns exec {} sh -c '{script}'", self.0))
    }

    fn spawn_peer(&self, work: &Path, receive: u64, send_file: &Path) -> Result<Child, String> {
        let _ = std::fs::remove_file(work.join("server.ready"));
        let peer = testbed::repo_root().join("tests/testbed/tcp_peer.py");
        let out = std::fs::File::create(work.join("peer.out")).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0, "python3"])
            .arg(peer)
            .args([HOST_ADDR, &receive.to_string()])
            .arg(send_file)
            .current_dir(work)
            .stdout(out)
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the TCP peer: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !work.join("server.ready").exists() {
            if Instant::now() > deadline {
                return Err("the TCP peer did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.0));
    }
}

fn sh(script: &str) -> Result<(), String> {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{script}` failed with {status}"))
    }
}

/// The guest's script: four disk tests on /dev/vdb, then TCP out and in.
fn guest_script(seconds: u32, net_bytes: u64) -> String {
    format!(
        "set -e; for t in seqwrite:1048576 seqread:1048576 randwrite:4096 randread:4096; do \
         ember-iobench ${{t%%:*}} /dev/vdb {seconds} ${{t##*:}}; done; \
         head -c {net_bytes} /dev/zero | nc {HOST_ADDR} 5000; nc {HOST_ADDR} 5001 > /dev/null"
    )
}

/// Collects `BENCH key=value` pairs from the guest console and the peer's rates.
fn parse_figures(console: &str, peer: &str) -> BTreeMap<String, f64> {
    let mut figures = BTreeMap::new();
    for line in console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BENCH "))
    {
        for pair in line.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                if let Ok(v) = v.parse() {
                    figures.insert(k.to_string(), v);
                }
            }
        }
    }
    for line in peer.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["received", _, _, rate] => figures.insert(
                "net_guest_to_host_mib_s".into(),
                rate.parse().unwrap_or(0.0),
            ),
            ["sent", _, rate] => figures.insert(
                "net_host_to_guest_mib_s".into(),
                rate.parse().unwrap_or(0.0),
            ),
            _ => None,
        };
    }
    figures
}

/// Runs the device benchmark `runs` times per VMM.
pub fn compare(
    runs: usize,
    seconds: u32,
    net_mib: u64,
    art: &Artifacts,
    work: &Path,
) -> Result<Vec<DeviceResult>, String> {
    let ns = Namespace::create()?;
    let net_bytes = net_mib << 20;
    let outbound = work.join("outbound.bin");
    std::fs::write(&outbound, vec![0x5au8; net_bytes as usize]).map_err(|e| e.to_string())?;
    let vmms = [Vmm::Ember, Vmm::QemuMicrovm];
    let runs_per_vmm = alternate(runs, &vmms, |run, vmm| {
        let figures = run_once(vmm, art, work, &ns, seconds, net_bytes, &outbound)?;
        eprintln!("run {}/{runs} {:<13} {figures:?}", run + 1, vmm.name());
        Ok(figures)
    })?;
    let samples = runs_per_vmm.into_iter().map(|runs| {
        let mut by_metric: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (name, value) in runs.into_iter().flatten() {
            by_metric.entry(name).or_default().push(value);
        }
        by_metric
    });
    vmms.iter()
        .zip(samples)
        .map(|(vmm, by_metric)| {
            let metrics = by_metric
                .into_iter()
                .filter_map(|(name, values)| Summary::of(&values).map(|s| (name, s)))
                .collect();
            Ok(DeviceResult {
                vmm: vmm.name(),
                metrics,
            })
        })
        .collect()
}

fn run_once(
    vmm: Vmm,
    art: &Artifacts,
    work: &Path,
    ns: &Namespace,
    seconds: u32,
    net_bytes: u64,
    outbound: &Path,
) -> Result<BTreeMap<String, f64>, String> {
    let root = work.join("bench-root.ext4");
    let data = work.join("bench-data.img");
    std::fs::copy(&art.rootfs, &root).map_err(|e| format!("cannot copy the rootfs: {e}"))?;
    let disk = std::fs::File::create(&data).map_err(|e| e.to_string())?;
    disk.set_len(512 << 20).map_err(|e| e.to_string())?;
    let mut guest = GuestSpec::with_root_running(art, &root, &guest_script(seconds, net_bytes));
    guest.mem_mib = 256;
    guest.boot_args = format!(
        "ip=172.16.0.2::{HOST_ADDR}:255.255.255.0::eth0:off {}",
        guest.boot_args
    );
    guest.drives.push(drive("data", &data, false, false));
    guest.nets.push(serde_json::json!({"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:ac:10:00:02"}));
    let mut peer = ns.spawn_peer(work, net_bytes, outbound)?;
    let run = run_vm(vmm, art, &guest, work, Some(&ns.0));
    // The guest has finished with the peer by now; one that failed early would leave the
    // peer waiting for connections that never come.
    let _ = testbed::wait_with_timeout(&mut peer, Duration::from_secs(10));
    let run = run?;
    if !run.console.contains("ember-init: run exited with status 0") {
        return Err(format!(
            "{}: the guest benchmark failed:\n{}",
            vmm.name(),
            run.console
        ));
    }
    let peer_out = std::fs::read_to_string(work.join("peer.out")).unwrap_or_default();
    Ok(parse_figures(&run.console, &peer_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_parsed_from_guest_and_peer() {
        let console = "x\nBENCH seqread_iops=10 seqread_mib_s=10.5\nBENCH randread_iops=300 randread_mib_s=1.2\n";
        let peer = "received 100 abc 55.5\nsent 100 44.0\n";
        let f = parse_figures(console, peer);
        assert_eq!(f["seqread_mib_s"], 10.5);
        assert_eq!(f["randread_iops"], 300.0);
        assert_eq!(f["net_guest_to_host_mib_s"], 55.5);
        assert_eq!(f["net_host_to_guest_mib_s"], 44.0);
    }

    #[test]
    fn guest_script_has_no_double_quotes() {
        assert!(!guest_script(3, 1 << 20).contains('"'));
    }
}
