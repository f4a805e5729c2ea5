//! Churn: cycles of create an ember, boot a 1 vCPU / 128 MiB guest with the agent, a TAP and
//! vsock, run one command through the agent, and end the VM the way a platform would (the
//! agent powers the guest off, ember exits 0). What a long-lived host would notice is
//! measured, not assumed: TAP interfaces, files left in the cycle's run directory and in
//! `/tmp`, this harness's descriptors and threads (before and after the whole run), and per
//! cycle ember's descriptors and threads once the agent is ready (which must not grow from
//! cycle to cycle; read once two reads 200 ms apart agree) and its memory: RSS, PSS, RSS less the guest memory touched, and its own
//! private memory (anonymous pages outside guest RAM, from `/proc/PID/smaps`).
//!
//! By default the TAP is the platform's: the harness makes one persistent TAP before the
//! first cycle (`ip tuntap add`), every cycle's ember attaches to it, and the harness
//! deletes it after the last; so the TAP count before and after is the same unless one
//! leaked. With `ember_creates_tap` the TAP is missing when a cycle starts and ember creates
//! it; a TAP still there after the cycle is one ember failed to let go of. (In the nested
//! test bed, two runs of that kind froze the level-1 VM as a whole while an ember was
//! building its VM, in cycles 1 and 31; see the notes.)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::agent::{AgentClient, Exec};
use serde::Serialize;
use serde_json::json;
use testbed::{Artifacts, GuestSpec};

use crate::procfs::{fd_count, thread_count, vmm_memory, whereabouts};
use crate::snapshot::{guest, Vm, LIMIT};
use crate::stats::Summary;

/// The TAP of every cycle's guest.
const TAP: &str = "churntap0";
pub const MEM_MIB: u32 = 128;
/// Files the harness itself writes into a cycle's run directory.
const HARNESS_FILES: [&str; 3] = ["vm.json", "console.log", "ember.log"];

/// Cycles between two writes of the figures so far.
const PARTIAL_EVERY: usize = 25;
/// Time between two reads of ember's descriptor and thread counts.
const SETTLE_READ: Duration = Duration::from_millis(200);

/// The benchmark's parameters.
pub struct Plan {
    pub cycles: usize,
    /// Stop starting cycles after this long (the rest are reported as not run).
    pub budget: Option<Duration>,
    /// Each cycle's ember creates the TAP (and it goes when ember exits) instead of
    /// attaching to a persistent one the harness made.
    pub ember_creates_tap: bool,
    /// A pause between an ember's exit and the next start (not part of the cycle's time).
    pub pause: Duration,
}

/// What one cycle measured.
#[derive(Debug, Clone, Serialize)]
pub struct CycleSample {
    /// Ember's start to its exit, less the time the harness spent reading /proc.
    pub cycle_ms: f64,
    pub to_agent_ready_ms: f64,
    pub ember_fds: usize,
    pub ember_threads: usize,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub guest_touched_kib: u64,
    pub private_non_guest_kib: u64,
    /// Names left in the run directory after ember exited, besides the harness's own files.
    pub left_in_run_dir: Vec<String>,
    /// Whether the TAP ember created still existed after it exited.
    pub tap_left: bool,
}

/// What a host looks like from outside, before and after the run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostCounts {
    pub tap_interfaces: usize,
    pub tmp_entries: usize,
    pub harness_fds: usize,
    pub harness_threads: usize,
}

impl HostCounts {
    fn now() -> Result<Self, String> {
        let taps = fs::read_dir("/sys/class/net")
            .map_err(|e| format!("cannot list /sys/class/net: {e}"))?
            .filter_map(Result::ok)
            .filter(|e| Path::new(&e.path().join("tun_flags")).exists())
            .count();
        let tmp = fs::read_dir("/tmp")
            .map_err(|e| format!("cannot list /tmp: {e}"))?
            .count();
        Ok(Self {
            tap_interfaces: taps,
            tmp_entries: tmp,
            harness_fds: fd_count("self")?,
            harness_threads: thread_count("self")?,
        })
    }
}

/// Leaks over the whole run: after minus before (expected 0 each), and per cycle.
#[derive(Debug, Clone, Serialize)]
pub struct Leaks {
    pub tap_interfaces: i64,
    pub tmp_entries: i64,
    pub harness_fds: i64,
    pub harness_threads: i64,
    /// Cycles after which something was left in the run directory.
    pub cycles_with_files_left: usize,
    /// Cycles after which the TAP was still there.
    pub cycles_with_tap_left: usize,
    /// Distinct values of ember's descriptor and thread counts at agent-ready.
    pub ember_fd_counts_seen: Vec<usize>,
    pub ember_thread_counts_seen: Vec<usize>,
}

/// What the benchmark measured.
#[derive(Debug, Serialize)]
pub struct ChurnResults {
    pub cycles_planned: usize,
    pub cycles_run: usize,
    pub ember_creates_tap: bool,
    pub pause_ms: u128,
    /// Why fewer cycles than planned ran (time budget, a failed cycle), if so.
    pub stopped_early: Option<String>,
    pub mem_mib: u32,
    pub cycle_ms: Summary,
    pub to_agent_ready_ms: Summary,
    pub rss_mib: Summary,
    pub pss_mib: Summary,
    /// RSS less the guest memory touched.
    pub overhead_mib: Summary,
    /// Anonymous memory outside guest RAM: ember's own.
    pub private_non_guest_mib: Summary,
    pub before: HostCounts,
    pub after: HostCounts,
    pub leaks: Leaks,
    /// The first cycle with files or a TAP left behind, for a look.
    pub first_leaky_cycle: Option<CycleSample>,
}

/// Runs the cycles in `work`.
pub fn run(plan: &Plan, art: &Artifacts, work: &Path) -> Result<ChurnResults, String> {
    let root = art.private_rootfs(work)?;
    let run_dir = work.join("churn-run");
    let before = HostCounts::now()?;
    let tap = if plan.ember_creates_tap {
        None
    } else {
        Some(PersistentTap::create()?)
    };
    let started = Instant::now();
    // Named for this run: the test bed runs a job again after its level-1 VM froze, and the
    // second run must not overwrite what the first measured.
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let partial = work.join(format!("churn-partial-{since_epoch}.json"));
    let mut samples = Vec::new();
    let mut stopped_early = None;
    for i in 0..plan.cycles {
        if plan.budget.is_some_and(|b| started.elapsed() > b) {
            stopped_early = Some(format!(
                "the time budget of {:?} ran out after {i} cycles",
                plan.budget.unwrap_or_default()
            ));
            break;
        }
        if i > 0 {
            std::thread::sleep(plan.pause);
        }
        match cycle(i, art, &root, &run_dir, plan.ember_creates_tap) {
            Ok(sample) => samples.push(sample),
            Err(e) => {
                stopped_early = Some(format!("cycle {} failed: {e}", i + 1));
                break;
            }
        }
        if (i + 1) % PARTIAL_EVERY == 0 {
            write_partial(plan, &samples, &before, &partial)?;
        }
        if (i + 1) % 10 == 0 {
            let last = &samples[samples.len() - 1];
            eprintln!(
                "churn: {} cycles, last {:.0} ms, ember fds {} threads {}",
                i + 1,
                last.cycle_ms,
                last.ember_fds,
                last.ember_threads
            );
        }
    }
    let _ = fs::remove_dir_all(&run_dir);
    drop(tap);
    let after = HostCounts::now()?;
    summarise(plan, &samples, stopped_early, before, after)
}

fn summarise(
    plan: &Plan,
    samples: &[CycleSample],
    stopped_early: Option<String>,
    before: HostCounts,
    after: HostCounts,
) -> Result<ChurnResults, String> {
    let column = |f: fn(&CycleSample) -> f64| {
        let values: Vec<f64> = samples.iter().map(f).collect();
        Summary::of(&values).ok_or_else(|| {
            format!(
                "no cycle completed: {}",
                stopped_early.as_deref().unwrap_or("none ran")
            )
        })
    };
    let distinct = |f: fn(&CycleSample) -> usize| {
        let mut seen: Vec<usize> = samples.iter().map(f).collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    };
    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }
    let diff = |a: usize, b: usize| b as i64 - a as i64;
    let leaky = |s: &&CycleSample| !s.left_in_run_dir.is_empty() || s.tap_left;
    let leaks = Leaks {
        tap_interfaces: diff(before.tap_interfaces, after.tap_interfaces),
        tmp_entries: diff(before.tmp_entries, after.tmp_entries),
        harness_fds: diff(before.harness_fds, after.harness_fds),
        harness_threads: diff(before.harness_threads, after.harness_threads),
        cycles_with_files_left: samples
            .iter()
            .filter(|s| !s.left_in_run_dir.is_empty())
            .count(),
        cycles_with_tap_left: samples.iter().filter(|s| s.tap_left).count(),
        ember_fd_counts_seen: distinct(|s| s.ember_fds),
        ember_thread_counts_seen: distinct(|s| s.ember_threads),
    };
    Ok(ChurnResults {
        cycles_planned: plan.cycles,
        cycles_run: samples.len(),
        ember_creates_tap: plan.ember_creates_tap,
        pause_ms: plan.pause.as_millis(),
        mem_mib: MEM_MIB,
        cycle_ms: column(|s| s.cycle_ms)?,
        to_agent_ready_ms: column(|s| s.to_agent_ready_ms)?,
        rss_mib: column(|s| mib(s.rss_kib))?,
        pss_mib: column(|s| mib(s.pss_kib))?,
        overhead_mib: column(|s| mib(s.rss_kib.saturating_sub(s.guest_touched_kib)))?,
        private_non_guest_mib: column(|s| mib(s.private_non_guest_kib))?,
        first_leaky_cycle: samples.iter().find(leaky).cloned(),
        stopped_early,
        before,
        after,
        leaks,
    })
}

/// One cycle in a fresh `dir`.
fn cycle(
    index: usize,
    art: &Artifacts,
    root: &Path,
    dir: &Path,
    ember_creates_tap: bool,
) -> Result<CycleSample, String> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let uds = dir.join("v.sock");
    let mut spec = guest(art, root, MEM_MIB, &uds);
    spec.nets
        .push(json!({"iface_id": "eth0", "host_dev_name": TAP}));
    let start = Instant::now();
    let (mut vm, to_agent_ready_ms) = boot_to_agent(art, &spec, dir, &uds, start)?;
    let pid = vm.pid().to_string();
    // Reading /proc is the harness's work, not the cycle's: its time is left out.
    let probing = Instant::now();
    let (ember_fds, ember_threads) = settled(|| Ok((fd_count(&pid)?, thread_count(&pid)?)))?;
    let memory = vmm_memory(vm.pid(), u64::from(MEM_MIB) << 10)?;
    let probe_time = probing.elapsed();
    let word = format!("cycle-{index}");
    let out = AgentClient::vsock(&uds)
        .with_timeout(LIMIT)
        .exec_output(&Exec::new(["echo", &word]))
        .map_err(|e| format!("exec through the agent: {e}{}", vm.logs()))?;
    if out.stdout != format!("{word}\n").as_bytes() {
        return Err(format!("exec printed {:?}, not {word}", out.stdout));
    }
    vm.shut_down(&uds)?;
    let cycle_ms = (start.elapsed() - probe_time).as_secs_f64() * 1000.0;
    Ok(CycleSample {
        cycle_ms,
        to_agent_ready_ms,
        ember_fds,
        ember_threads,
        rss_kib: memory.rss_kib,
        pss_kib: memory.pss_kib,
        guest_touched_kib: memory.guest_touched_kib,
        private_non_guest_kib: memory.private_non_guest_kib(),
        left_in_run_dir: left_behind(dir)?,
        tap_left: ember_creates_tap && Path::new("/sys/class/net").join(TAP).exists(),
    })
}

/// Starts an ember with its API socket on `spec` (whose guest announces its agent at
/// `uds`), config, console and log in `dir`, listening for the announcement first; returns
/// the VM and the ms from `start` to the announcement.
pub(crate) fn boot_to_agent(
    art: &Artifacts,
    spec: &GuestSpec,
    dir: &Path,
    uds: &Path,
    start: Instant,
) -> Result<(Vm, f64), String> {
    let config = dir.join("vm.json");
    fs::write(&config, spec.config_json())
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let mut cmd = Command::new(&art.ember);
    cmd.arg("--api-sock")
        .arg(dir.join("api.sock"))
        .arg("--config-file")
        .arg(&config);
    let ready_uds: PathBuf = uds.into();
    let ready = std::thread::spawn(move || api::agent::wait_ready(&ready_uds, LIMIT));
    // The listener binds at once; give it the head start a guest boot gives it anyway.
    std::thread::sleep(Duration::from_millis(20));
    let mut vm = Vm::spawn(cmd, dir)?;
    // A guest that dies early never calls: stop waiting once its ember is gone.
    while !ready.is_finished() {
        if let Some(status) = vm.exit_status() {
            return Err(format!(
                "ember exited ({status}) before the agent was ready{}",
                vm.logs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = ready
        .join()
        .map_err(|_| "the readiness listener panicked".to_string())?;
    answer.map_err(|e| format!("{e}\n{}{}", whereabouts(vm.pid()), vm.logs()))?;
    Ok((vm, start.elapsed().as_secs_f64() * 1000.0))
}

/// Writes the figures so far to `path`: a run cut short (the test bed's level-1 VM has
/// frozen under long runs) still leaves them.
fn write_partial(
    plan: &Plan,
    samples: &[CycleSample],
    before: &HostCounts,
    path: &Path,
) -> Result<(), String> {
    let so_far = summarise(
        plan,
        samples,
        Some(format!("partial: {} cycles so far", samples.len())),
        before.clone(),
        HostCounts::now()?,
    )?;
    let text = serde_json::to_string_pretty(&so_far).map_err(|e| e.to_string())?;
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The platform's persistent TAP, deleted when dropped.
struct PersistentTap;

impl PersistentTap {
    fn create() -> Result<Self, String> {
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        Ok(Self)
    }
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", TAP]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}; install iproute2"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Counts read until two reads in a row agree: the guest's readiness call leaves ember a
/// connection that closes a moment after the announcement arrives.
fn settled(read: impl Fn() -> Result<(usize, usize), String>) -> Result<(usize, usize), String> {
    let mut last = read()?;
    for _ in 0..20 {
        std::thread::sleep(SETTLE_READ);
        let now = read()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Names in `dir` that the harness did not write.
fn left_behind(dir: &Path) -> Result<Vec<String>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !HARNESS_FILES.contains(&n.as_str()))
        .collect();
    names.sort();
    Ok(names)
}
