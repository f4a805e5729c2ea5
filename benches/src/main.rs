//! `ember-bench`: Ember's benchmarks. Each runs the same work on Ember and on a peer VMM on
//! the same machine, in the same run, and reports median and p90 with the ratio, as a table
//! and as JSON for harnesses. Where KVM cannot boot stock guests the benchmark re-runs
//! itself inside the nested test bed, where only the ratios are meaningful.
//!
//! `ember-bench boot [--runs N] [--vcpus N] [--mem MIB] [--json PATH] [--no-peer]`

mod boot;
mod stats;

use std::path::PathBuf;
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
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Process start to guest ready (ember-init's ready line), Ember vs QEMU microvm.
    Boot(BootArgs),
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
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Measure Ember alone.
    #[arg(long)]
    no_peer: bool,
    /// Where to write generated VM configs (default: target/bench).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Bench::Boot(args) => boot_bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn boot_bench(args: &BootArgs) -> Result<(), String> {
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let art = Artifacts::locate()?;
    if placement()? == Placement::Nested {
        return rerun_nested(args);
    }
    let spec = GuestSpec {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        ..GuestSpec::standard(&art)
    };
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| testbed::repo_root().join("target/bench"));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let results = boot::compare(args.runs, &art, &spec, &work, !args.no_peer)?;
    let environment = if std::env::var("EMBER_TESTBED_LEVEL").is_ok() {
        "nested test bed (QEMU TCG level 1, absolute times ~50x slower; compare ratios)"
    } else {
        "direct (hardware KVM)"
    };
    let report = json!({
        "benchmark": "boot",
        "metric": "VMM process start to ember-init ready line on the serial console",
        "environment": environment,
        "runs": args.runs,
        "guest": {"vcpus": spec.vcpus, "mem_mib": spec.mem_mib, "kernel": spec.kernel,
                  "initrd": spec.initrd, "boot_args": spec.boot_args},
        "results": results,
        "peer_over_ember": ratios(&results),
    });
    print_table(args, environment, &results);
    if let Some(path) = &args.json {
        ensure_parent_dir(path)?;
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Peer time divided by Ember time (above 1: Ember is faster).
fn ratios(results: &[boot::VmmResult]) -> serde_json::Value {
    match results {
        [ember, peer, ..] => json!({
            "median": peer.to_ready.median_ms / ember.to_ready.median_ms,
            "p90": peer.to_ready.p90_ms / ember.to_ready.p90_ms,
        }),
        _ => serde_json::Value::Null,
    }
}

fn print_table(args: &BootArgs, environment: &str, results: &[boot::VmmResult]) {
    println!(
        "boot: process start -> guest ready ({} runs, {} vCPU, {} MiB; {environment})",
        args.runs, args.vcpus, args.mem
    );
    println!(
        "{:<14} {:>12} {:>12} {:>22}",
        "vmm", "median ms", "p90 ms", "guest uptime median ms"
    );
    for r in results {
        println!(
            "{:<14} {:>12.1} {:>12.1} {:>22.1}",
            r.vmm, r.to_ready.median_ms, r.to_ready.p90_ms, r.guest_uptime_at_ready.median_ms
        );
    }
    if let [ember, peer, ..] = results {
        println!(
            "{} / ember: {:.2}x at the median, {:.2}x at p90",
            peer.vmm,
            peer.to_ready.median_ms / ember.to_ready.median_ms,
            peer.to_ready.p90_ms / ember.to_ready.p90_ms
        );
    }
}

/// Runs this same benchmark inside the nested test bed and relays its output.
fn rerun_nested(args: &BootArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let mut command = format!(
        "{} boot --runs {} --vcpus {} --mem {} --json result.json --work-dir .",
        shell_quote(&exe),
        args.runs,
        args.vcpus,
        args.mem
    );
    if args.no_peer {
        command += " --no-peer";
    }
    let job = Job::new("bench-boot", command)
        .memory_mib(args.mem.max(512) + 1536)
        .timeout(Duration::from_secs(120 + 60 * args.runs as u64));
    let out = job.run()?;
    eprint!("{}", out.stderr);
    print!("{}", out.stdout);
    if out.status != 0 {
        return Err(format!(
            "the benchmark failed in the test bed (status {})",
            out.status
        ));
    }
    if let Some(path) = &args.json {
        ensure_parent_dir(path)?;
        std::fs::copy(job.dir().join("result.json"), path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Creates the directory a result file goes into.
fn ensure_parent_dir(path: &std::path::Path) -> Result<(), String> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display())),
        None => Ok(()),
    }
}
