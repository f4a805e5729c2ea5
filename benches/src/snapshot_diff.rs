//! Diff snapshots: one guest booted with dirty page tracking takes, per run, a Full snapshot
//! (the base), runs on while its agent writes [`DIRTY_MIB`] MiB of random bytes to tmpfs,
//! then a Diff snapshot. Reported: the Diff create time, the diff memory file's allocated
//! size (`st_blocks * 512`, its holes excluded) against the guest's memory, and per run the
//! Diff create time over the Full create time of the same guest in the same run.
//!
//! The guest is ended through its agent (ember-init powers off and ember exits), never by
//! killing a VMM whose guest runs: in the nested test bed that was followed by hung level-1
//! VMs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use api::agent::{AgentClient, Exec};
use serde::Serialize;
use serde_json::{json, Value};
use testbed::Artifacts;

use crate::snapshot::{agent_answers, boot_config, guest, request, Vm, LIMIT};
use crate::stats::Summary;

/// How much guest memory each run writes between the base and the diff, MiB.
pub const DIRTY_MIB: u32 = 10;

/// What the Diff case measured.
#[derive(Debug, Serialize)]
pub struct DiffResults {
    pub mem_mib: u32,
    /// What the guest wrote between the base and the diff, MiB.
    pub dirtied_mib: u32,
    /// `PUT /snapshot/create` (Full, the base) of the tracking guest, ms.
    pub full_create_ms: Summary,
    /// `PUT /snapshot/create` (Diff) after the guest wrote `dirtied_mib`, ms.
    pub diff_create_ms: Summary,
    /// The diff memory file's allocated size, MiB.
    pub diff_file_allocated_mib: Summary,
    /// The diff memory file's allocated size over the guest's memory size.
    pub diff_file_fraction_of_memory: Summary,
    /// Per run: Diff create time over the Full create time of that run.
    pub diff_over_full_create: Summary,
}

/// One run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiffSample {
    pub full_ms: f64,
    pub diff_ms: f64,
    /// The diff memory file's allocated bytes.
    pub diff_allocated: u64,
}

/// Summarises runs of a `mem_mib` guest; None without runs, or if a Full create took no
/// time (no ratio).
pub fn summarize(mem_mib: u32, samples: &[DiffSample]) -> Option<DiffResults> {
    let column = |f: &dyn Fn(&DiffSample) -> f64| {
        let values: Vec<f64> = samples.iter().map(f).collect();
        Summary::of(&values)
    };
    let mem_bytes = f64::from(mem_mib) * f64::from(1u32 << 20);
    if mem_mib == 0 || samples.iter().any(|s| s.full_ms <= 0.0) {
        return None;
    }
    Some(DiffResults {
        mem_mib,
        dirtied_mib: DIRTY_MIB,
        full_create_ms: column(&|s| s.full_ms)?,
        diff_create_ms: column(&|s| s.diff_ms)?,
        diff_file_allocated_mib: column(&|s| s.diff_allocated as f64 / f64::from(1u32 << 20))?,
        diff_file_fraction_of_memory: column(&|s| s.diff_allocated as f64 / mem_bytes)?,
        diff_over_full_create: column(&|s| s.diff_ms / s.full_ms)?,
    })
}

/// The bytes a file really takes on disk: its allocated blocks, holes excluded.
pub fn allocated_bytes(path: &Path) -> Result<u64, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    // st_blocks counts 512-byte units whatever the file system's block size.
    Ok(meta.blocks() * 512)
}

/// A config file's JSON with dirty page tracking turned on in its machine-config.
pub fn with_dirty_tracking(config_json: &str) -> Result<String, String> {
    let mut config: Value = serde_json::from_str(config_json)
        .map_err(|e| format!("the guest's config file is not JSON: {e}"))?;
    let machine = config
        .get_mut("machine-config")
        .and_then(Value::as_object_mut)
        .ok_or("the guest's config file has no machine-config section")?;
    machine.insert("track_dirty_pages".into(), json!(true));
    Ok(config.to_string())
}

/// Boots one tracking guest of `mem_mib` and runs the Full, dirty, Diff cycle `runs` times.
pub fn run(
    runs: usize,
    mem_mib: u32,
    art: &Artifacts,
    root: &Path,
    work: &Path,
) -> Result<DiffResults, String> {
    let dir = work.join(format!("diff-{mem_mib}"));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let uds = dir.join("v.sock");
    let json = with_dirty_tracking(&guest(art, root, mem_mib, &uds).config_json())?;
    let (mut vm, api_sock) = boot_config(art, &dir, &json, &uds)?;
    let mut samples = Vec::new();
    for run in 0..runs {
        let sample = one_cycle(&api_sock, &uds, &dir, &vm)?;
        eprintln!(
            "run {}/{runs} {mem_mib} MiB tracking: Full {:.1} ms, Diff {:.1} ms, diff file {:.1} MiB allocated",
            run + 1,
            sample.full_ms,
            sample.diff_ms,
            sample.diff_allocated as f64 / f64::from(1u32 << 20)
        );
        samples.push(sample);
    }
    vm.shut_down(&uds)?;
    summarize(mem_mib, &samples).ok_or_else(|| "no Diff runs to summarise".to_string())
}

/// Full snapshot (the base), resume, dirty the guest, pause, Diff snapshot, resume.
fn one_cycle(api_sock: &Path, uds: &Path, dir: &Path, vm: &Vm) -> Result<DiffSample, String> {
    let (base_state, base_mem) = (dir.join("base.state"), dir.join("base.mem"));
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    agent_answers(uds, vm)?;
    let full_ms = paused_snapshot(api_sock, "Full", &base_state, &base_mem)?;
    dirty(uds, vm)?;
    let diff_ms = paused_snapshot(api_sock, "Diff", &diff_state, &diff_mem)?;
    Ok(DiffSample {
        full_ms,
        diff_ms,
        diff_allocated: allocated_bytes(&diff_mem)?,
    })
}

/// Pauses the guest, times one snapshot of `kind`, resumes it; ms.
fn paused_snapshot(api_sock: &Path, kind: &str, state: &Path, mem: &Path) -> Result<f64, String> {
    request(api_sock, "PATCH", "/vm", json!({"state": "Paused"}))?;
    let t = Instant::now();
    request(
        api_sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}),
    )?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    request(api_sock, "PATCH", "/vm", json!({"state": "Resumed"}))?;
    Ok(ms)
}

/// Has the guest write [`DIRTY_MIB`] MiB of random bytes to tmpfs (`/dev/shm`): fresh
/// pages of guest memory, whatever it held before.
fn dirty(uds: &Path, vm: &Vm) -> Result<(), String> {
    let script = format!(
        "rm -f /dev/shm/dirty && dd if=/dev/urandom of=/dev/shm/dirty bs=1M count={DIRTY_MIB} 2>/dev/null && sync"
    );
    let agent = AgentClient::vsock(uds).with_timeout(LIMIT);
    let out = agent
        .exec_output(&Exec::new(["sh", "-c", &script]))
        .map_err(|e| {
            format!(
                "the agent, writing {DIRTY_MIB} MiB in the guest: {e}{}",
                vm.logs()
            )
        })?;
    if out.status.code != Some(0) {
        return Err(format!(
            "writing {DIRTY_MIB} MiB to /dev/shm in the guest ended with {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // A moment for the guest to finish what follows the write (page cache, the agent's
    // answer) before the pause.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(full_ms: f64, diff_ms: f64, mib: u64) -> DiffSample {
        DiffSample {
            full_ms,
            diff_ms,
            diff_allocated: mib << 20,
        }
    }

    #[test]
    fn runs_summarise_into_times_sizes_and_per_run_ratios() {
        let runs = [sample(100.0, 10.0, 12), sample(200.0, 40.0, 16)];
        let r = summarize(256, &runs).unwrap();
        assert_eq!(r.full_create_ms.samples, [100.0, 200.0]);
        assert_eq!(r.diff_create_ms.samples, [10.0, 40.0]);
        assert_eq!(r.diff_file_allocated_mib.samples, [12.0, 16.0]);
        assert_eq!(
            r.diff_file_fraction_of_memory.samples,
            [12.0 / 256.0, 16.0 / 256.0]
        );
        // The ratio is taken within each run, not between the medians.
        assert_eq!(r.diff_over_full_create.samples, [0.1, 0.2]);
        assert_eq!(r.dirtied_mib, DIRTY_MIB);
        assert!(summarize(256, &[]).is_none());
        assert!(summarize(256, &[sample(0.0, 1.0, 1)]).is_none());
        assert!(summarize(0, &runs).is_none());
    }

    #[test]
    fn allocated_bytes_leave_out_holes() {
        let dir = std::env::temp_dir().join(format!("ember-bench-diff-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse.mem");
        let file = fs::File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[1u8; 4096], 4 << 20).unwrap();
        file.sync_all().unwrap();
        let allocated = allocated_bytes(&path).unwrap();
        assert!((4096..8 << 20).contains(&allocated), "{allocated}");
        let missing = allocated_bytes(&dir.join("none")).unwrap_err();
        assert!(missing.starts_with("cannot stat "), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dirty_tracking_is_switched_on_in_the_machine_config() {
        let config = r#"{"boot-source": {"kernel_image_path": "/k"},
                         "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}}"#;
        let on: Value = serde_json::from_str(&with_dirty_tracking(config).unwrap()).unwrap();
        assert_eq!(on["machine-config"]["track_dirty_pages"], true);
        assert_eq!(on["machine-config"]["mem_size_mib"], 256);
        assert!(with_dirty_tracking("{}")
            .unwrap_err()
            .contains("no machine-config"));
        assert!(with_dirty_tracking("nope").is_err());
    }
}
