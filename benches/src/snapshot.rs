//! Snapshots: full snapshot create for guests of each size, restore into a fresh ember to
//! the agent's first answer against a cold boot of the same guest to the same point
//! (alternating runs), and `emberctl clone` of N guests: wall time until every clone's
//! agent answers, and each clone's private memory and PSS from `/proc/PID/smaps_rollup`;
//! then the Diff case ([`crate::snapshot_diff`]) on the smallest guest.
//!
//! Every guest boots from the same read-only root image with the agent on vsock, so a
//! restored guest and a cold-booted one reach the same state by different roads. "Agent
//! answers" is the first `ping` round trip that succeeds, on both roads. QEMU's
//! savevm/loadvm is not measured: its snapshots live inside a qcow2 image and restore
//! through a full QEMU start-up, a different work from Ember's mapped memory file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::agent::AgentClient;
use api::client::ApiClient;
use serde::Serialize;
use serde_json::{json, Value};
use testbed::{Artifacts, GuestSpec};

use crate::procfs::{rollup, Rollup};
use crate::snapshot_diff::{self, DiffResults};
use crate::stats::Summary;

/// How long one VM may take to any milestone (the nested test bed is slow).
pub(crate) const LIMIT: Duration = Duration::from_secs(600);

/// What the benchmark measured.
#[derive(Debug, Serialize)]
pub struct SnapshotResults {
    /// Per guest size: `PUT /snapshot/create` (Full) of a paused guest, ms.
    pub create_ms: Vec<SizedSummary>,
    /// Per guest size: ember process start to the restored agent's first answer, ms.
    pub restore_to_agent_ms: Vec<SizedSummary>,
    /// Per guest size: `PUT /snapshot/load` alone (map, restore, resume), ms.
    pub load_request_ms: Vec<SizedSummary>,
    /// The smallest guest booted cold: ember process start to the agent's first answer, ms.
    pub cold_boot_to_agent_ms: Summary,
    pub cold_boot_mem_mib: u32,
    pub clones: Option<CloneResults>,
    /// The smallest guest with dirty page tracking: Full vs Diff snapshot create.
    pub diff: DiffResults,
}

#[derive(Debug, Serialize)]
pub struct SizedSummary {
    pub mem_mib: u32,
    #[serde(flatten)]
    pub summary: Summary,
}

/// `emberctl clone` of one snapshot.
#[derive(Debug, Serialize)]
pub struct CloneResults {
    pub count: usize,
    pub mem_mib: u32,
    /// `emberctl clone` start to its exit (every clone loaded and running), ms.
    pub clone_command_ms: f64,
    /// `emberctl clone` start until every clone's agent answered, ms.
    pub all_agents_ms: f64,
    /// Per clone, after its agent answered: Private_Clean + Private_Dirty, MiB.
    pub private_mib: Summary,
    /// Per clone: proportional set size, MiB.
    pub pss_mib: Summary,
    /// Per clone: resident set size, MiB.
    pub rss_mib: Summary,
}

/// The benchmark's parameters.
pub struct Plan<'a> {
    pub runs: usize,
    pub sizes: &'a [u32],
    pub clones: usize,
}

/// Runs the whole benchmark in `work`.
pub fn run(plan: &Plan, art: &Artifacts, work: &Path) -> Result<SnapshotResults, String> {
    let root = art.private_rootfs(work)?;
    let mut create_ms = Vec::new();
    let mut snapshots = Vec::new();
    for &mem_mib in plan.sizes {
        let (samples, files) = create_runs(plan.runs, mem_mib, art, &root, work)?;
        create_ms.push(sized(mem_mib, &samples)?);
        snapshots.push((mem_mib, files));
    }
    let mut restore_to_agent_ms = Vec::new();
    let mut load_request_ms = Vec::new();
    let mut cold = Vec::new();
    let smallest = *plan.sizes.iter().min().ok_or("no guest sizes")?;
    for (mem_mib, files) in &snapshots {
        let (mut to_agent, mut load) = (Vec::new(), Vec::new());
        for run in 0..plan.runs {
            // Alternate with cold boots of the smallest guest, so drift hits both alike.
            let boot_first = *mem_mib == smallest && run % 2 == 1;
            if boot_first {
                cold.push(cold_boot(art, &root, *mem_mib, work)?);
            }
            let r = restore_once(art, files, work)?;
            eprintln!(
                "run {}/{} restore {mem_mib} MiB: {:.1} ms to agent ({:.1} ms load request)",
                run + 1,
                plan.runs,
                r.0,
                r.1
            );
            to_agent.push(r.0);
            load.push(r.1);
            if *mem_mib == smallest && !boot_first {
                cold.push(cold_boot(art, &root, *mem_mib, work)?);
            }
        }
        restore_to_agent_ms.push(sized(*mem_mib, &to_agent)?);
        load_request_ms.push(sized(*mem_mib, &load)?);
    }
    let clones = match snapshots.iter().find(|(m, _)| *m == smallest) {
        Some((mem_mib, files)) if plan.clones > 0 => {
            Some(clone_run(art, files, *mem_mib, plan.clones, work)?)
        }
        _ => None,
    };
    let diff = snapshot_diff::run(plan.runs, smallest, art, &root, work)?;
    Ok(SnapshotResults {
        create_ms,
        restore_to_agent_ms,
        load_request_ms,
        cold_boot_to_agent_ms: Summary::of(&cold).ok_or("no cold boots")?,
        cold_boot_mem_mib: smallest,
        clones,
        diff,
    })
}

fn sized(mem_mib: u32, samples: &[f64]) -> Result<SizedSummary, String> {
    Ok(SizedSummary {
        mem_mib,
        summary: Summary::of(samples).ok_or("no runs")?,
    })
}

/// A snapshot's two files.
#[derive(Debug, Clone)]
struct SnapshotFiles {
    state: PathBuf,
    mem: PathBuf,
}

/// The benchmark guest: the agent on vsock at `uds`, the shared root read-only.
pub(crate) fn guest(art: &Artifacts, root: &Path, mem_mib: u32, uds: &Path) -> GuestSpec {
    let mut spec = GuestSpec::with_agent(art, root, uds);
    spec.drives = vec![testbed::drive("rootfs", root, true, true)];
    spec.mem_mib = mem_mib;
    spec
}

/// Boots one guest of `mem_mib` and times `runs` full snapshots of it (paused, created,
/// resumed); the last snapshot's files stay for the restores.
fn create_runs(
    runs: usize,
    mem_mib: u32,
    art: &Artifacts,
    root: &Path,
    work: &Path,
) -> Result<(Vec<f64>, SnapshotFiles), String> {
    let dir = work.join(format!("snap-{mem_mib}"));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let uds = dir.join("v.sock");
    let config = guest(art, root, mem_mib, &uds).config_json();
    let (mut vm, api_sock) = boot_config(art, &dir, &config, &uds)?;
    let files = SnapshotFiles {
        state: dir.join("vm.state"),
        mem: dir.join("vm.mem"),
    };
    let mut samples = Vec::new();
    for run in 0..runs {
        // Saved as soon as the agent answers (a guest saved the moment it becomes ready is
        // tested too: `saved_as_ready` in tests/tests/clones.rs).
        agent_answers(&uds, &vm)?;
        request(&api_sock, "PATCH", "/vm", json!({"state": "Paused"}))?;
        let t = Instant::now();
        request(
            &api_sock,
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": files.state,
                   "mem_file_path": files.mem}),
        )?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!("run {}/{runs} create {mem_mib} MiB: {ms:.1} ms", run + 1);
        samples.push(ms);
        request(&api_sock, "PATCH", "/vm", json!({"state": "Resumed"}))?;
    }
    vm.shut_down(&uds)?;
    Ok((samples, files))
}

/// Starts an ember in `dir` on the VM configuration `config` (written to `dir/vm.json`),
/// whose guest serves the agent at `uds`; returns it and its API socket once the agent is
/// ready.
pub(crate) fn boot_config(
    art: &Artifacts,
    dir: &Path,
    config: &str,
    uds: &Path,
) -> Result<(Vm, PathBuf), String> {
    let path = dir.join("vm.json");
    fs::write(&path, config).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let api_sock = dir.join("api.sock");
    let mut cmd = Command::new(&art.ember);
    cmd.arg("--api-sock")
        .arg(&api_sock)
        .arg("--config-file")
        .arg(&path);
    let vm = Vm::spawn(cmd, dir)?;
    api::agent::wait_ready(uds, LIMIT).map_err(|e| format!("{e}{}", vm.logs()))?;
    Ok((vm, api_sock))
}

/// Checks that the guest's agent answers.
pub(crate) fn agent_answers(uds: &Path, vm: &Vm) -> Result<(), String> {
    AgentClient::vsock(uds)
        .with_timeout(LIMIT)
        .ping()
        .map(|_| ())
        .map_err(|e| format!("the agent before the snapshot: {e}{}", vm.logs()))
}

/// One restore into a fresh ember: (process start to the agent's first answer, the load
/// request alone), ms.
fn restore_once(art: &Artifacts, files: &SnapshotFiles, work: &Path) -> Result<(f64, f64), String> {
    let dir = work.join("restore");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (api_sock, uds) = (dir.join("api.sock"), dir.join("v.sock"));
    let start = Instant::now();
    let mut cmd = Command::new(&art.ember);
    cmd.arg("--api-sock").arg(&api_sock);
    let mut vm = Vm::spawn(cmd, &dir)?;
    wait_for_api(&api_sock, &vm)?;
    let t = Instant::now();
    request(
        &api_sock,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": files.state,
               "mem_backend": {"backend_type": "File", "backend_path": files.mem},
               "resume_vm": true, "vsock_override": {"uds_path": uds}}),
    )?;
    let load_ms = t.elapsed().as_secs_f64() * 1000.0;
    first_ping(&uds, &mut vm)?;
    let to_agent_ms = start.elapsed().as_secs_f64() * 1000.0;
    vm.shut_down(&uds)?;
    Ok((to_agent_ms, load_ms))
}

/// One cold boot of the same guest to the agent's first answer, ms.
fn cold_boot(art: &Artifacts, root: &Path, mem_mib: u32, work: &Path) -> Result<f64, String> {
    let dir = work.join("cold");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let uds = dir.join("v.sock");
    let config = dir.join("vm.json");
    fs::write(&config, guest(art, root, mem_mib, &uds).config_json())
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let start = Instant::now();
    let mut cmd = Command::new(&art.ember);
    cmd.args(["--no-api", "--config-file"]).arg(&config);
    let mut vm = Vm::spawn(cmd, &dir)?;
    api::agent::wait_ready(&uds, LIMIT).map_err(|e| format!("{e}{}", vm.logs()))?;
    first_ping(&uds, &mut vm)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    eprintln!("cold boot {mem_mib} MiB: {ms:.1} ms to agent");
    vm.shut_down(&uds)?;
    Ok(ms)
}

/// `emberctl clone` of `count` guests; their memory once every agent answered.
fn clone_run(
    art: &Artifacts,
    files: &SnapshotFiles,
    mem_mib: u32,
    count: usize,
    work: &Path,
) -> Result<CloneResults, String> {
    let dir = work.join("clones");
    let start = Instant::now();
    let out = Command::new(&art.emberctl)
        .arg("clone")
        .arg(&files.state)
        .arg(&files.mem)
        .args([
            "-n",
            &count.to_string(),
            "--timeout",
            "600",
            "--json",
            "--dir",
        ])
        .arg(&dir)
        .arg("--ember")
        .arg(&art.ember)
        .output()
        .map_err(|e| format!("cannot run emberctl clone: {e}"))?;
    let clone_command_ms = start.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        return Err(format!(
            "emberctl clone failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let list: Vec<Value> = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("emberctl clone --json printed no list: {e}"))?;
    let clones = Clones(list.iter().filter_map(|c| c["pid"].as_u64()).collect());
    for c in &list {
        let uds = PathBuf::from(c["vsock_uds"].as_str().unwrap_or_default());
        let pid = c["pid"].as_u64().unwrap_or(0);
        let exited = || !Path::new(&format!("/proc/{pid}")).exists();
        ping_until(&uds, exited).map_err(|e| format!("clone {}: {e}", c["index"]))?;
    }
    let all_agents_ms = start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "{count} clones: emberctl clone {clone_command_ms:.1} ms, all agents {all_agents_ms:.1} ms"
    );
    let mut memory = Vec::new();
    for pid in &clones.0 {
        memory.push(rollup(*pid)?);
    }
    let column = |f: fn(&Rollup) -> f64| {
        let values: Vec<f64> = memory.iter().map(f).collect();
        Summary::of(&values).ok_or_else(|| "no clones".to_string())
    };
    Ok(CloneResults {
        count,
        mem_mib,
        clone_command_ms,
        all_agents_ms,
        private_mib: column(|r| r.private_mib)?,
        pss_mib: column(|r| r.pss_mib)?,
        rss_mib: column(|r| r.rss_mib)?,
    })
}

/// The clones' processes, killed when the benchmark is done with them.
struct Clones(Vec<u64>);

impl Drop for Clones {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// A VMM process with its console and log in `dir`. Ended through its guest's agent
/// ([`Vm::shut_down`]); killed when dropped only if a measurement failed first.
pub(crate) struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    pub(crate) fn spawn(mut cmd: Command, dir: &Path) -> Result<Self, String> {
        let file = |name: &str| {
            fs::File::create(dir.join(name)).map_err(|e| format!("cannot create {name}: {e}"))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file("console.log")?)
            .stderr(file("ember.log")?)
            .spawn()
            .map_err(|e| format!("cannot start ember: {e}"))?;
        Ok(Self {
            child,
            dir: dir.to_path_buf(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the VMM ended, once it has.
    pub(crate) fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(crate) fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "\n--- console\n{}\n--- ember\n{}",
            read("console.log"),
            read("ember.log")
        )
    }
}

impl Vm {
    /// Ends the guest the way it would end itself: the agent at `uds` powers it off and
    /// ember exits. Killing a VMM whose guest runs was followed by hung level-1 VMs in the
    /// nested test bed.
    pub(crate) fn shut_down(&mut self, uds: &Path) -> Result<(), String> {
        AgentClient::vsock(uds)
            .with_timeout(LIMIT)
            .shutdown()
            .map_err(|e| format!("shutdown through the agent at {}: {e}", uds.display()))?;
        match testbed::wait_with_timeout(&mut self.child, Duration::from_secs(120)) {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(format!(
                "ember ended with {status} after the shutdown{}",
                self.logs()
            )),
            None => Err(format!(
                "ember did not exit after the shutdown{}",
                self.logs()
            )),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_api(socket: &Path, vm: &Vm) -> Result<(), String> {
    let deadline = Instant::now() + LIMIT;
    while ApiClient::new(socket).request("GET", "/", None).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "no API socket at {}{}",
                socket.display(),
                vm.logs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn first_ping(uds: &Path, vm: &mut Vm) -> Result<(), String> {
    let child = &mut vm.child;
    let result = ping_until(uds, || matches!(child.try_wait(), Ok(Some(_))));
    result.map_err(|e| format!("{e}{}", vm.logs()))
}

/// Pings the agent at `uds` until it answers (a restored guest's listener is back once the
/// guest handled the transport reset); gives up once `exited` says its VMM is gone.
fn ping_until(uds: &Path, mut exited: impl FnMut() -> bool) -> Result<(), String> {
    let agent = AgentClient::vsock(uds).with_timeout(Duration::from_secs(60));
    let deadline = Instant::now() + LIMIT;
    loop {
        match agent.ping() {
            Ok(_) => return Ok(()),
            Err(e) if exited() => {
                return Err(format!(
                    "the agent at {} never answered; its ember exited: {e}",
                    uds.display()
                ))
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "the agent at {} never answered: {e}",
                    uds.display()
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

pub(crate) fn request(socket: &Path, method: &str, path: &str, body: Value) -> Result<(), String> {
    let answer = ApiClient::new(socket)
        .with_timeout(LIMIT)
        .request(method, path, Some(&body.to_string()))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    if answer.is_success() {
        Ok(())
    } else {
        Err(format!("{method} {path}: {}", answer.fault_message()))
    }
}
