//! Density: 1 vCPU / 128 MiB guests with the agent started in batches (each batch's embers
//! at once) until the target count runs, a guest fails to reach agent-ready, or the host's
//! available memory would not hold another batch. Then every guest must answer an exec
//! through its own agent with its own hostname (`ember.hostname=`), which tells the guests
//! apart; the host's free memory and each ember's PSS, RSS and private memory are read with
//! all of them running. All are then ended through their agents.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use api::agent::{AgentClient, Exec};
use serde::Serialize;
use testbed::Artifacts;

use crate::churn::boot_to_agent;
use crate::procfs::{rollup, vmm_memory};
use crate::snapshot::{guest, Vm, LIMIT};
use crate::stats::Summary;

/// The benchmark's parameters.
pub struct Plan {
    pub target: usize,
    pub batch: usize,
    pub mem_mib: u32,
    /// Memory the host keeps available: no batch starts that would eat into it.
    pub reserve_mib: u64,
}

/// What the benchmark measured.
#[derive(Debug, Serialize)]
pub struct DensityResults {
    pub target: usize,
    pub batch: usize,
    pub mem_mib: u32,
    /// Guests that reached agent-ready.
    pub reached: usize,
    pub stopped_because: String,
    /// Guests whose agent answered the final exec with their own hostname.
    pub answered_distinctly: usize,
    /// Batch start to the last agent of the batch ready, ms.
    pub batch_to_ready_ms: Summary,
    /// The host (the level-1 VM in the test bed) with every guest running, MiB.
    pub host_mem_total_mib: f64,
    pub host_mem_available_mib: f64,
    pub host_mem_free_mib: f64,
    pub host_mem_available_before_mib: f64,
    /// Per ember, from smaps_rollup and smaps, MiB.
    pub pss_mib: Summary,
    pub rss_mib: Summary,
    pub private_mib: Summary,
    pub private_non_guest_mib: Summary,
}

/// A running guest of the fleet.
struct Member {
    vm: Vm,
    uds: PathBuf,
    hostname: String,
}

/// Runs the benchmark in `work`.
pub fn run(plan: &Plan, art: &Artifacts, work: &Path) -> Result<DensityResults, String> {
    let root = art.private_rootfs(work)?;
    let available_before = meminfo_mib("MemAvailable")?;
    let mut fleet: Vec<Member> = Vec::new();
    let mut batch_ms = Vec::new();
    let stopped_because = loop {
        if fleet.len() >= plan.target {
            break format!("the target of {} guests was reached", plan.target);
        }
        let count = plan.batch.min(plan.target - fleet.len());
        let need = count as u64 * (u64::from(plan.mem_mib) + 32) + plan.reserve_mib;
        let available = meminfo_mib("MemAvailable")?;
        if available < need as f64 {
            break format!(
                "memory ran low: {available:.0} MiB available, a batch of {count} needs \
                 {need} MiB with the {} MiB reserve",
                plan.reserve_mib
            );
        }
        let start = Instant::now();
        match start_batch(fleet.len(), count, plan.mem_mib, art, &root, work) {
            Ok(members) => fleet.extend(members),
            Err((members, e)) => {
                fleet.extend(members);
                break e;
            }
        }
        batch_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "density: {} guests ready (batch of {count} in {:.0} ms)",
            fleet.len(),
            batch_ms[batch_ms.len() - 1]
        );
    };
    eprintln!("density: stopped: {stopped_because}");
    let answered_distinctly = check_distinct(&fleet)?;
    let results = measure(
        plan,
        &fleet,
        &batch_ms,
        available_before,
        answered_distinctly,
    )?;
    for member in &mut fleet {
        member.vm.shut_down(&member.uds)?;
    }
    Ok(DensityResults {
        stopped_because,
        ..results
    })
}

/// Starts `count` embers at once (guests `first..first+count`) and waits for every agent.
/// On failure, returns those that did get ready with the error.
#[allow(clippy::type_complexity)]
fn start_batch(
    first: usize,
    count: usize,
    mem_mib: u32,
    art: &Artifacts,
    root: &Path,
    work: &Path,
) -> Result<Vec<Member>, (Vec<Member>, String)> {
    let results: Vec<Result<Member, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (first..first + count)
            .map(|i| scope.spawn(move || start_one(i, mem_mib, art, root, work)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a starter thread panicked".into()))
            })
            .collect()
    });
    let mut ready = Vec::new();
    let mut failure = None;
    for result in results {
        match result {
            Ok(member) => ready.push(member),
            Err(e) if failure.is_none() => failure = Some(e),
            Err(_) => {}
        }
    }
    match failure {
        None => Ok(ready),
        Some(e) => Err((ready, e)),
    }
}

fn start_one(
    index: usize,
    mem_mib: u32,
    art: &Artifacts,
    root: &Path,
    work: &Path,
) -> Result<Member, String> {
    let dir = work.join(format!("density/vm-{index}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let uds = dir.join("v.sock");
    let hostname = format!("dense{index}");
    let mut spec = guest(art, root, mem_mib, &uds);
    spec.boot_args = format!("{} ember.hostname={hostname}", spec.boot_args);
    let (vm, _) = boot_to_agent(art, &spec, &dir, &uds, Instant::now())
        .map_err(|e| format!("guest {index} did not reach agent-ready: {e}"))?;
    Ok(Member { vm, uds, hostname })
}

/// Runs `hostname` through every guest's agent; the number that answered with their own.
fn check_distinct(fleet: &[Member]) -> Result<usize, String> {
    let mut answered = 0;
    for member in fleet {
        let out = AgentClient::vsock(&member.uds)
            .with_timeout(LIMIT)
            .exec_output(&Exec::new(["hostname"]))
            .map_err(|e| format!("{}: exec through the agent: {e}", member.hostname))?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got == member.hostname {
            answered += 1;
        } else {
            eprintln!(
                "density: {} answered {got:?} instead of its own name",
                member.hostname
            );
        }
    }
    Ok(answered)
}

fn measure(
    plan: &Plan,
    fleet: &[Member],
    batch_ms: &[f64],
    available_before: f64,
    answered_distinctly: usize,
) -> Result<DensityResults, String> {
    let (mut pss, mut rss, mut private, mut own) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for member in fleet {
        let pid = member.vm.pid();
        let r = rollup(u64::from(pid))?;
        pss.push(r.pss_mib);
        rss.push(r.rss_mib);
        private.push(r.private_mib);
        let m = vmm_memory(pid, u64::from(plan.mem_mib) << 10)?;
        own.push(m.private_non_guest_kib() as f64 / 1024.0);
    }
    let summary = |v: &[f64]| Summary::of(v).ok_or("no guest reached agent-ready");
    Ok(DensityResults {
        target: plan.target,
        batch: plan.batch,
        mem_mib: plan.mem_mib,
        reached: fleet.len(),
        stopped_because: String::new(),
        answered_distinctly,
        batch_to_ready_ms: summary(batch_ms)?,
        host_mem_total_mib: meminfo_mib("MemTotal")?,
        host_mem_available_mib: meminfo_mib("MemAvailable")?,
        host_mem_free_mib: meminfo_mib("MemFree")?,
        host_mem_available_before_mib: available_before,
        pss_mib: summary(&pss)?,
        rss_mib: summary(&rss)?,
        private_mib: summary(&private)?,
        private_non_guest_mib: summary(&own)?,
    })
}

/// A `/proc/meminfo` field in MiB.
fn meminfo_mib(key: &str) -> Result<f64, String> {
    let text = fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .ok_or_else(|| format!("/proc/meminfo has no {key} line"))
}
