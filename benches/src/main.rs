//! `ember-bench`: Ember's benchmarks. Each runs the same work on Ember and on a peer VMM on
//! the same machine, in the same run, and reports median and p90 with the ratio, as a table
//! and as JSON for harnesses. Where KVM cannot boot stock guests the benchmark re-runs
//! itself inside the nested test bed, where only the ratios are meaningful.
//!
//! `ember-bench boot [--runs N] [--vcpus N] [--mem MIB] [--rootfs] [--json PATH] [--no-peer]`
//! `ember-bench devices [--runs N] [--seconds S] [--net-mib M] [--json PATH]`
//! `ember-bench agent [--runs N] [--execs N] [--mib M] [--json PATH] [--no-peer]`
//! `ember-bench api [--runs N] [--requests N] [--json PATH] [--no-peer]`
//! `ember-bench snapshot [--runs N] [--sizes MIB,MIB] [--clones N] [--json PATH]`
//! `ember-bench churn [--cycles N] [--max-minutes M] [--ember-creates-tap] [--pause-ms MS] [--json PATH]`
//! `ember-bench density [--target N] [--batch N] [--reserve-mib MIB] [--json PATH]`

mod agent;
mod api;
mod boot;
mod churn;
mod density;
mod devices;
mod procfs;
mod snapshot;
mod snapshot_diff;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use testbed::{placement, shell_quote, Artifacts, GuestSpec, Job, Placement};

#[derive(Parser, Debug)]
#[command(
    name = "ember-bench",
    about = "Ember benchmarks, side by side with a peer VMM"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH", global = true)]
    json: Option<PathBuf>,
    /// Where to put generated configs and images (default: target/bench).
    #[arg(long, value_name = "DIR", global = true)]
    work_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Process start to guest ready (ember-init's ready line), Ember vs QEMU microvm.
    Boot(BootArgs),
    /// Disk (sequential 1 MiB, random 4 KiB, direct I/O) and TCP throughput in the guest,
    /// Ember vs QEMU microvm.
    Devices(DevicesArgs),
    /// Process start to agent ready over vsock (QEMU microvm: to the serial ready line),
    /// exec round trip, and upload/download throughput through the agent.
    Agent(AgentArgs),
    /// Control socket: process start to the first answer, request latency and rate on one
    /// connection, and VMM memory next to a booted 1 vCPU / 128 MiB guest; Ember's API
    /// socket (`GET /`) vs QEMU microvm's QMP (`query-status`).
    Api(ApiArgs),
    /// Full snapshot create per guest size; restore into a fresh ember to the agent's first
    /// answer against a cold boot to the same point; `emberctl clone` of N guests: wall
    /// time and private memory per clone; with dirty page tracking, Diff create time and
    /// diff file size against a Full create of the same guest.
    Snapshot(SnapshotArgs),
    /// Cycles of create, boot to the agent (1 vCPU, 128 MiB, TAP, vsock), one exec and a
    /// clean end: per-cycle time, ember's descriptors, threads and memory at agent-ready,
    /// and what is left behind (TAPs, files, descriptors, threads).
    Churn(ChurnArgs),
    /// 128 MiB guests with agents started in batches until a target count, a failed boot or
    /// low memory; every guest answers with its own name; host memory and PSS per VM.
    Density(DensityArgs),
}

#[derive(Args, Debug, Clone)]
struct ChurnArgs {
    /// Cycles to run.
    #[arg(long, default_value_t = 500)]
    cycles: usize,
    /// Start no cycle after this many minutes; the report says how many ran.
    #[arg(long)]
    max_minutes: Option<u64>,
    /// Each ember creates the TAP itself instead of attaching to a persistent one.
    #[arg(long)]
    ember_creates_tap: bool,
    /// Pause between an ember's exit and the next start, ms (not counted in the cycle).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

#[derive(Args, Debug, Clone)]
struct DensityArgs {
    /// Guests to reach.
    #[arg(long, default_value_t = 64)]
    target: usize,
    /// Guests started at once.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// MiB the host keeps available: no batch starts that would eat into it.
    #[arg(long, default_value_t = 512)]
    reserve_mib: u64,
    /// Memory of the level-1 VM in the nested test bed, MiB (default: enough for the
    /// target, at most 16384).
    #[arg(long)]
    bed_mib: Option<u32>,
}

#[derive(Args, Debug, Clone)]
struct SnapshotArgs {
    /// Snapshots created and restores (and cold boots) timed per guest size.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest sizes in MiB; the smallest is also booted cold and cloned.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    sizes: Vec<u32>,
    /// Clones of the smallest guest's snapshot (0: none).
    #[arg(long, default_value_t = 50)]
    clones: usize,
}

#[derive(Args, Debug, Clone)]
struct ApiArgs {
    /// Rounds per VMM; each starts one process for the socket figures and boots one guest.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Timed round trips on one connection per round.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Measure Ember alone.
    #[arg(long)]
    no_peer: bool,
}

#[derive(Args, Debug, Clone)]
struct AgentArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// `exec true` round trips per Ember boot.
    #[arg(long, default_value_t = 50)]
    execs: usize,
    /// MiB uploaded and downloaded per Ember boot.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Measure Ember alone.
    #[arg(long)]
    no_peer: bool,
}

#[derive(Args, Debug, Clone)]
struct BootArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u32,
    /// Boot from the ext4 root drive (resources/out/rootfs.ext4) instead of the initramfs.
    #[arg(long)]
    rootfs: bool,
    /// Measure Ember alone.
    #[arg(long)]
    no_peer: bool,
}

#[derive(Args, Debug, Clone)]
struct DevicesArgs {
    /// Runs per VMM.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per disk test.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    /// MiB sent each way over TCP. Kept small by default: in the nested test bed, longer
    /// piped guest->host streams have crashed the guest under Ember (see the project notes).
    #[arg(long, default_value_t = 16)]
    net_mib: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let art = Artifacts::locate()?;
    if placement()? == Placement::Nested {
        return rerun_nested(cli);
    }
    let work = cli
        .work_dir
        .clone()
        .unwrap_or_else(|| testbed::repo_root().join("target/bench"));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let report = match &cli.command {
        Bench::Boot(args) => boot_bench(args, &art, &work)?,
        Bench::Devices(args) => devices_bench(args, &art, &work)?,
        Bench::Agent(args) => agent_bench(args, &art, &work)?,
        Bench::Api(args) => api_bench(args, &art, &work)?,
        Bench::Snapshot(args) => snapshot_bench(args, &art, &work)?,
        Bench::Churn(args) => churn_bench(args, &art, &work)?,
        Bench::Density(args) => density_bench(args, &art, &work)?,
    };
    if let Some(path) = &cli.json {
        ensure_parent_dir(path)?;
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn environment() -> &'static str {
    if std::env::var("EMBER_TESTBED_LEVEL").is_ok() {
        "nested test bed (QEMU TCG level 1, absolute times ~50x slower; compare ratios)"
    } else {
        "direct (hardware KVM)"
    }
}

fn boot_bench(args: &BootArgs, art: &Artifacts, work: &Path) -> Result<serde_json::Value, String> {
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let mut spec = GuestSpec {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        ..GuestSpec::standard(art)
    };
    if args.rootfs {
        let root = work.join("boot-root.ext4");
        std::fs::copy(&art.rootfs, &root).map_err(|e| format!("cannot copy the rootfs: {e}"))?;
        spec.initrd = None;
        spec.drives
            .push(testbed::drive("rootfs", &root, true, false));
    }
    let results = boot::compare(args.runs, art, &spec, work, !args.no_peer)?;
    let root = if args.rootfs {
        "ext4 root drive"
    } else {
        "initramfs"
    };
    println!(
        "boot: process start -> guest ready ({} runs, {} vCPU, {} MiB, {root}; {})",
        args.runs,
        args.vcpus,
        args.mem,
        environment()
    );
    println!(
        "{:<14} {:>12} {:>12} {:>22}",
        "vmm", "median ms", "p90 ms", "guest uptime median ms"
    );
    for r in &results {
        println!(
            "{:<14} {:>12.1} {:>12.1} {:>22.1}",
            r.vmm, r.to_ready_ms.median, r.to_ready_ms.p90, r.guest_uptime_at_ready_ms.median
        );
    }
    let ratios = match results.as_slice() {
        [ember, peer, ..] => {
            let (median, p90) = (
                peer.to_ready_ms.median / ember.to_ready_ms.median,
                peer.to_ready_ms.p90 / ember.to_ready_ms.p90,
            );
            println!(
                "{} / ember: {median:.2}x at the median, {p90:.2}x at p90",
                peer.vmm
            );
            json!({"median": median, "p90": p90})
        }
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "benchmark": "boot",
        "metric": "VMM process start to ember-init ready line on the serial console",
        "environment": environment(),
        "runs": args.runs,
        "guest": {"vcpus": spec.vcpus, "mem_mib": spec.mem_mib, "root": root, "kernel": spec.kernel,
                  "boot_args": spec.boot_args},
        "results": results,
        "peer_over_ember": ratios,
    }))
}

fn devices_bench(
    args: &DevicesArgs,
    art: &Artifacts,
    work: &Path,
) -> Result<serde_json::Value, String> {
    if args.runs == 0 || args.seconds == 0 || args.net_mib == 0 {
        return Err("--runs, --seconds and --net-mib must be at least 1".into());
    }
    let results = devices::compare(args.runs, args.seconds, args.net_mib, art, work)?;
    println!(
        "devices: throughput inside the guest ({} runs, {} s per disk test, {} MiB each way; {})",
        args.runs,
        args.seconds,
        args.net_mib,
        environment()
    );
    println!(
        "{:<26} {:>14} {:>14} {:>16} {:>16} {:>10}",
        "metric", "ember median", "ember p90", "qemu median", "qemu p90", "ember/qemu"
    );
    let mut ratios = serde_json::Map::new();
    if let [ember, qemu] = results.as_slice() {
        for (name, e) in &ember.metrics {
            let Some(q) = qemu.metrics.get(name) else {
                continue;
            };
            let ratio = e.median / q.median;
            ratios.insert(name.clone(), json!(ratio));
            println!(
                "{name:<26} {:>14.1} {:>14.1} {:>16.1} {:>16.1} {:>9.2}x",
                e.median, e.p90, q.median, q.p90, ratio
            );
        }
    }
    Ok(json!({
        "benchmark": "devices",
        "metric": "higher is better: MiB/s and IOPS measured in the guest (disk) and by the host peer (TCP)",
        "environment": environment(),
        "runs": args.runs,
        "results": results,
        "ember_over_peer": ratios,
    }))
}

fn agent_bench(
    args: &AgentArgs,
    art: &Artifacts,
    work: &Path,
) -> Result<serde_json::Value, String> {
    if args.runs == 0 || args.execs == 0 || args.mib == 0 {
        return Err("--runs, --execs and --mib must be at least 1".into());
    }
    let r = agent::compare(args.runs, args.execs, args.mib, art, work, !args.no_peer)?;
    println!(
        "agent: {} runs, {} exec round trips and {} MiB each way per Ember boot; {}",
        args.runs,
        args.execs,
        args.mib,
        environment()
    );
    let row = |name: &str, s: &stats::Summary| {
        println!("{name:<34} {:>12.1} {:>12.1}", s.median, s.p90);
    };
    println!("{:<34} {:>12} {:>12}", "metric", "median", "p90");
    row(
        "ember: start -> agent ready (ms)",
        &r.ember_to_agent_ready_ms,
    );
    let mut ratio = serde_json::Value::Null;
    if let Some(q) = &r.qemu_to_serial_ready_ms {
        row("qemu: start -> serial ready (ms)", q);
        let (median, p90) = (
            q.median / r.ember_to_agent_ready_ms.median,
            q.p90 / r.ember_to_agent_ready_ms.p90,
        );
        println!(
            "qemu serial ready / ember agent ready: {median:.2}x at the median, {p90:.2}x at p90"
        );
        ratio = json!({"median": median, "p90": p90});
    }
    row("ember: exec true round trip (ms)", &r.exec_true_ms);
    println!(
        "{:<34} {:>12.2}",
        "ember: exec true p99 (ms)", r.exec_true_p99_ms
    );
    row("ember: exec stdout (MiB/s)", &r.exec_stdout_mib_s);
    row("ember: upload (MiB/s)", &r.upload_mib_s);
    row("ember: download (MiB/s)", &r.download_mib_s);
    Ok(json!({
        "benchmark": "agent",
        "metric": "ms to readiness and per exec round trip; MiB/s through the agent",
        "environment": environment(),
        "runs": args.runs,
        "results": r,
        "qemu_serial_ready_over_ember_agent_ready": ratio,
    }))
}

fn api_bench(args: &ApiArgs, art: &Artifacts, work: &Path) -> Result<serde_json::Value, String> {
    if args.runs == 0 || args.requests == 0 {
        return Err("--runs and --requests must be at least 1".into());
    }
    let results = api::compare(args.runs, args.requests, art, work, !args.no_peer)?;
    let guest = api::bench_guest(art);
    println!(
        "api: control socket ({} runs, {} requests on one connection; memory with a booted \
         {} vCPU, {} MiB guest; {})",
        args.runs,
        args.requests,
        guest.vcpus,
        guest.mem_mib,
        environment()
    );
    for r in &results {
        println!("{}: requests are {}", r.vmm, r.request);
    }
    println!(
        "{:<24} {:>13} {:>13} {:>13} {:>13} {:>11}",
        "metric", "ember median", "ember p90", "qemu median", "qemu p90", "ember/qemu"
    );
    let mut ratios = serde_json::Map::new();
    let (ember, peer) = match results.as_slice() {
        [ember, peer, ..] => (ember, Some(peer)),
        [ember] => (ember, None),
        [] => return Err("no results".into()),
    };
    for (name, e) in &ember.metrics {
        let q = peer.and_then(|p| p.metrics.get(name));
        let (q_median, q_p90, ratio) = match q {
            Some(q) => {
                let ratio = e.median / q.median;
                ratios.insert(name.clone(), json!(ratio));
                (
                    format!("{:.1}", q.median),
                    format!("{:.1}", q.p90),
                    format!("{ratio:.2}x"),
                )
            }
            None => (String::new(), String::new(), String::new()),
        };
        println!(
            "{name:<24} {:>13.1} {:>13.1} {q_median:>13} {q_p90:>13} {ratio:>11}",
            e.median, e.p90
        );
    }
    println!("ember/qemu below 1 means Ember needs less, except requests_per_s (above 1: faster)");
    Ok(json!({
        "benchmark": "api",
        "metric": "ms from process start to the first answer on the control socket; us per \
                   request and requests/s on one connection; MiB resident (overhead = RSS \
                   minus guest memory touched) with a booted guest",
        "environment": environment(),
        "runs": args.runs,
        "requests": args.requests,
        "guest": {"vcpus": guest.vcpus, "mem_mib": guest.mem_mib, "root": "initramfs",
                  "kernel": guest.kernel, "boot_args": guest.boot_args},
        "results": results,
        "ember_over_peer": ratios,
    }))
}

fn snapshot_bench(
    args: &SnapshotArgs,
    art: &Artifacts,
    work: &Path,
) -> Result<serde_json::Value, String> {
    if args.runs == 0 || args.sizes.is_empty() || args.sizes.contains(&0) {
        return Err("--runs must be at least 1 and --sizes a list of MiB above 0".into());
    }
    let plan = snapshot::Plan {
        runs: args.runs,
        sizes: &args.sizes,
        clones: args.clones,
    };
    let r = snapshot::run(&plan, art, work)?;
    println!(
        "snapshot: {} runs per size, 1 vCPU guests with the agent on a read-only ext4 root; {}",
        args.runs,
        environment()
    );
    println!("{:<44} {:>12} {:>12}", "metric", "median", "p90");
    let row = |name: String, s: &stats::Summary| {
        println!("{name:<44} {:>12.1} {:>12.1}", s.median, s.p90);
    };
    for s in &r.create_ms {
        row(format!("create Full, {} MiB (ms)", s.mem_mib), &s.summary);
    }
    for s in &r.load_request_ms {
        row(format!("load request, {} MiB (ms)", s.mem_mib), &s.summary);
    }
    for s in &r.restore_to_agent_ms {
        row(
            format!("restore: start -> agent, {} MiB (ms)", s.mem_mib),
            &s.summary,
        );
    }
    let cold = &r.cold_boot_to_agent_ms;
    row(
        format!(
            "cold boot: start -> agent, {} MiB (ms)",
            r.cold_boot_mem_mib
        ),
        cold,
    );
    let mut ratio = serde_json::Value::Null;
    if let Some(restore) = r
        .restore_to_agent_ms
        .iter()
        .find(|s| s.mem_mib == r.cold_boot_mem_mib)
    {
        let (median, p90) = (
            cold.median / restore.summary.median,
            cold.p90 / restore.summary.p90,
        );
        println!("cold boot / restore: {median:.2}x at the median, {p90:.2}x at p90");
        ratio = json!({"median": median, "p90": p90});
    }
    if let Some(c) = &r.clones {
        println!(
            "{} clones of the {} MiB guest: emberctl clone {:.1} ms, every agent answering              {:.1} ms",
            c.count, c.mem_mib, c.clone_command_ms, c.all_agents_ms
        );
        row("per clone: private (MiB)".into(), &c.private_mib);
        row("per clone: PSS (MiB)".into(), &c.pss_mib);
        row("per clone: RSS (MiB)".into(), &c.rss_mib);
    }
    let d = &r.diff;
    println!(
        "Diff after the guest wrote {} MiB, {} MiB guest tracking dirty pages:",
        d.dirtied_mib, d.mem_mib
    );
    row("  create Full, the base (ms)".into(), &d.full_create_ms);
    row("  create Diff (ms)".into(), &d.diff_create_ms);
    row(
        "  diff file allocated (MiB)".into(),
        &d.diff_file_allocated_mib,
    );
    row(
        "  diff file / guest memory (%)".into(),
        &d.diff_file_fraction_of_memory.scaled(100.0),
    );
    row(
        "  Diff / Full create, per run (x)".into(),
        &d.diff_over_full_create,
    );
    Ok(json!({
        "benchmark": "snapshot",
        "metric": "ms to create a Full snapshot, to load one, and from ember process start to \
                    the agent's first answer (restore vs cold boot); clones: wall ms and MiB \
                    per clone from smaps_rollup; diff: Full vs Diff create ms of a tracking guest \
                    after it wrote 10 MiB, the diff file's allocated MiB",
        "environment": environment(),
        "runs": args.runs,
        "results": r,
        "cold_boot_over_restore": ratio,
    }))
}

fn churn_bench(
    args: &ChurnArgs,
    art: &Artifacts,
    work: &Path,
) -> Result<serde_json::Value, String> {
    if args.cycles == 0 {
        return Err("--cycles must be at least 1".into());
    }
    let plan = churn::Plan {
        cycles: args.cycles,
        budget: args.max_minutes.map(|m| Duration::from_secs(60 * m)),
        ember_creates_tap: args.ember_creates_tap,
        pause: Duration::from_millis(args.pause_ms),
    };
    let r = churn::run(&plan, art, work)?;
    println!(
        "churn: {} of {} cycles of create, boot to agent ({} MiB, 1 vCPU, TAP {}, vsock), \
         exec, poweroff; {}",
        r.cycles_run,
        r.cycles_planned,
        r.mem_mib,
        if r.ember_creates_tap {
            "created by ember"
        } else {
            "persistent"
        },
        environment()
    );
    if let Some(why) = &r.stopped_early {
        println!("stopped early: {why}");
    }
    println!("{:<40} {:>12} {:>12}", "metric", "median", "p90");
    let row = |name: &str, s: &stats::Summary| {
        println!("{name:<40} {:>12.1} {:>12.1}", s.median, s.p90);
    };
    row("cycle (ms)", &r.cycle_ms);
    row("start -> agent ready (ms)", &r.to_agent_ready_ms);
    row("ember RSS (MiB)", &r.rss_mib);
    row("ember PSS (MiB)", &r.pss_mib);
    row("ember RSS - guest touched (MiB)", &r.overhead_mib);
    row(
        "ember private non-guest anon (MiB)",
        &r.private_non_guest_mib,
    );
    let l = &r.leaks;
    println!(
        "leaks (after - before): TAPs {}, /tmp entries {}, harness fds {}, harness threads {}; \
         cycles leaving files {}, leaving the TAP {}",
        l.tap_interfaces,
        l.tmp_entries,
        l.harness_fds,
        l.harness_threads,
        l.cycles_with_files_left,
        l.cycles_with_tap_left
    );
    println!(
        "ember at agent-ready: fds {:?}, threads {:?} (one value each: constant)",
        l.ember_fd_counts_seen, l.ember_thread_counts_seen
    );
    Ok(json!({
        "benchmark": "churn",
        "metric": "ms per cycle and to agent-ready; ember's MiB at agent-ready from /proc/PID/smaps; \
                   leak counts as after minus before (expected 0)",
        "environment": environment(),
        "results": r,
    }))
}

fn density_bench(
    args: &DensityArgs,
    art: &Artifacts,
    work: &Path,
) -> Result<serde_json::Value, String> {
    if args.target == 0 || args.batch == 0 {
        return Err("--target and --batch must be at least 1".into());
    }
    let plan = density::Plan {
        target: args.target,
        batch: args.batch,
        mem_mib: churn::MEM_MIB,
        reserve_mib: args.reserve_mib,
    };
    let r = density::run(&plan, art, work)?;
    println!(
        "density: {} MiB guests with agents, batches of {}; {}",
        r.mem_mib,
        r.batch,
        environment()
    );
    println!(
        "reached {} of {} (stopped: {}); {} answered an exec with their own name",
        r.reached, r.target, r.stopped_because, r.answered_distinctly
    );
    println!(
        "host memory with all running: {:.0} MiB available, {:.0} MiB free of {:.0} MiB \
         ({:.0} MiB available before)",
        r.host_mem_available_mib,
        r.host_mem_free_mib,
        r.host_mem_total_mib,
        r.host_mem_available_before_mib
    );
    println!("{:<40} {:>12} {:>12}", "per VM", "median", "p90");
    for (name, s) in [
        ("PSS (MiB)", &r.pss_mib),
        ("RSS (MiB)", &r.rss_mib),
        ("private (MiB)", &r.private_mib),
        (
            "ember private non-guest anon (MiB)",
            &r.private_non_guest_mib,
        ),
        ("batch start -> all agents ready (ms)", &r.batch_to_ready_ms),
    ] {
        println!("{name:<40} {:>12.1} {:>12.1}", s.median, s.p90);
    }
    Ok(json!({
        "benchmark": "density",
        "metric": "guests reaching agent-ready; host MiB from /proc/meminfo; per-VM MiB from \
                   /proc/PID/smaps_rollup and smaps",
        "environment": environment(),
        "results": r,
    }))
}

/// Runs this same command inside the nested test bed and relays its output.
fn rerun_nested(cli: &Cli) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let (command, name, mem, minutes) = match &cli.command {
        Bench::Boot(a) => {
            let mut c = format!("boot --runs {} --vcpus {} --mem {}", a.runs, a.vcpus, a.mem);
            if a.no_peer {
                c += " --no-peer";
            }
            if a.rootfs {
                c += " --rootfs";
            }
            (c, "bench-boot", a.mem.max(512) + 1536, 2 + a.runs as u64)
        }
        Bench::Devices(a) => (
            format!(
                "devices --runs {} --seconds {} --net-mib {}",
                a.runs, a.seconds, a.net_mib
            ),
            "bench-devices",
            3072,
            5 + 4 * a.runs as u64,
        ),
        Bench::Agent(a) => {
            let mut c = format!(
                "agent --runs {} --execs {} --mib {}",
                a.runs, a.execs, a.mib
            );
            if a.no_peer {
                c += " --no-peer";
            }
            (c, "bench-agent", 3072, 5 + 4 * a.runs as u64)
        }
        Bench::Api(a) => {
            let mut c = format!("api --runs {} --requests {}", a.runs, a.requests);
            if a.no_peer {
                c += " --no-peer";
            }
            (c, "bench-api", 2048, 5 + 3 * a.runs as u64)
        }
        Bench::Snapshot(a) => {
            let sizes: Vec<String> = a.sizes.iter().map(u32::to_string).collect();
            let c = format!(
                "snapshot --runs {} --sizes {} --clones {}",
                a.runs,
                sizes.join(","),
                a.clones
            );
            // The largest guest, and the clones' private pages beside the shared snapshot.
            let largest = a.sizes.iter().copied().max().unwrap_or(0);
            let mem = 2048 + largest + 48 * a.clones as u32;
            // Each size's creates and restores, the Diff case's cycles, and the clones.
            let minutes =
                10 + 4 * (a.runs * a.sizes.len()) as u64 + 2 * a.runs as u64 + a.clones as u64 / 2;
            (c, "bench-snapshot", mem, minutes)
        }
        Bench::Churn(a) => {
            let mut c = format!("churn --cycles {}", a.cycles);
            if let Some(m) = a.max_minutes {
                c += &format!(" --max-minutes {m}");
            }
            if a.ember_creates_tap {
                c += " --ember-creates-tap";
            }
            c += &format!(" --pause-ms {}", a.pause_ms);
            // A cycle takes well under a minute even in the test bed.
            let minutes = 10 + a.max_minutes.unwrap_or(a.cycles as u64);
            (c, "bench-churn", 2048, minutes)
        }
        Bench::Density(a) => {
            let c = format!(
                "density --target {} --batch {} --reserve-mib {}",
                a.target, a.batch, a.reserve_mib
            );
            let need = 1024 + a.reserve_mib as u32 + a.target as u32 * (churn::MEM_MIB + 48);
            let mem = a.bed_mib.unwrap_or(need.min(16384));
            (c, "bench-density", mem, 15 + 2 * a.target as u64)
        }
    };
    let script = format!(
        "{} {command} --json result.json --work-dir .",
        shell_quote(&exe)
    );
    let job = Job::new(name, script)
        .memory_mib(mem)
        .timeout(Duration::from_secs(60 * minutes));
    let out = job.run()?;
    eprint!("{}", out.stderr);
    print!("{}", out.stdout);
    if out.status != 0 {
        return Err(format!(
            "the benchmark failed in the test bed (status {})",
            out.status
        ));
    }
    if let Some(path) = &cli.json {
        ensure_parent_dir(path)?;
        std::fs::copy(job.dir().join("result.json"), path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Creates the directory a result file goes into.
fn ensure_parent_dir(path: &Path) -> Result<(), String> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display())),
        None => Ok(()),
    }
}
