//! `emberctl clone`: loads one snapshot into N fresh `ember` processes, each running on its
//! own. Clone i lives in `DIR/clone-i/`: its API socket `api.sock`, its vsock socket
//! `vsock.sock` (`vsock_override.uds_path`), its guest CID `--first-cid + i` (Ember's
//! `vsock_override.guest_cid`), its guest console `console.log` (ember's stdout) and ember's
//! own messages `ember.log` (stderr). `--tap IFACE=PREFIX` puts interface IFACE of clone i
//! on the existing host TAP `PREFIX{i}`.
//!
//! Everything that can be checked before a process starts is (CIDs, TAPs, socket path
//! lengths, a clone already running in the directory). Then every ember is started, and
//! each loads the snapshot with `resume_vm`. On any failure the clones started so far are
//! killed and the failing one is named with why; so they are when emberctl gets SIGINT,
//! SIGTERM or SIGHUP before every clone runs (see `stop_on_signal`), and it then exits with
//! 128 plus the signal's number. The embers run in their own process group with no terminal
//! input, so once cloning has finished they outlive emberctl and a Ctrl-C meant for it; stop
//! one with `emberctl --api DIR/clone-i/api.sock ctrl-alt-del` or by its pid.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use api::models::check_guest_cid;
use clap::Args;
use serde_json::{json, Value};

use crate::signals;

/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest network interface name (`IFNAMSIZ` less the NUL).
const MAX_IFNAME: usize = 15;

#[derive(Args, Debug)]
pub struct CloneArgs {
    /// The snapshot's state file (snapshot_path).
    state: PathBuf,
    /// The snapshot's memory file (mapped privately by every clone).
    mem: PathBuf,
    /// How many clones to start.
    #[arg(long, short = 'n', value_name = "N")]
    count: u32,
    /// Where the clones' directories (clone-0, clone-1, ...) go; created if missing.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The ember binary (default: the one next to emberctl).
    #[arg(long, value_name = "PATH")]
    ember: Option<PathBuf>,
    /// The guest CID of clone 0; clone i gets this plus i.
    #[arg(long, value_name = "CID", default_value_t = 3)]
    first_cid: u64,
    /// Put interface IFACE of clone i on the existing host TAP PREFIX{i}, e.g.
    /// eth0=tap-clone gives clone 3 tap-clone3 (repeatable).
    #[arg(long = "tap", value_name = "IFACE=PREFIX")]
    taps: Vec<String>,
    /// Give up on a clone whose ember does not answer or load within this many seconds.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = crate::parse_secs)]
    timeout: Duration,
}

/// One clone as planned, then started.
#[derive(Debug, Clone, PartialEq)]
struct ClonePlan {
    index: u32,
    dir: PathBuf,
    api_sock: PathBuf,
    vsock_uds: PathBuf,
    guest_cid: u64,
    /// `(iface_id, tap)` pairs.
    taps: Vec<(String, String)>,
}

impl ClonePlan {
    fn describe(&self, pid: u32) -> Value {
        json!({
            "index": self.index,
            "pid": pid,
            "api_sock": self.api_sock,
            "vsock_uds": self.vsock_uds,
            "guest_cid": self.guest_cid,
            "taps": self.taps.iter().map(|(i, t)| json!({"iface_id": i, "host_dev_name": t}))
                .collect::<Vec<_>>(),
            "console": self.dir.join("console.log"),
            "log": self.dir.join("ember.log"),
        })
    }

    fn load_body(&self, state: &Path, mem: &Path) -> Value {
        let mut body = json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
            "vsock_override": {"uds_path": self.vsock_uds, "guest_cid": self.guest_cid},
        });
        if !self.taps.is_empty() {
            body["network_overrides"] = self
                .taps
                .iter()
                .map(|(iface, tap)| json!({"iface_id": iface, "host_dev_name": tap}))
                .collect();
        }
        body
    }
}

/// A started ember, killed on failure.
#[derive(Debug)]
struct Started {
    plan: ClonePlan,
    child: Child,
}

/// The embers started so far, shared with the thread that stops them on a signal. Once
/// every clone runs they are handed over to the user and taken out of here.
#[derive(Debug, Default)]
struct Clones {
    started: Vec<Started>,
    handed_over: bool,
}

type SharedClones = Arc<Mutex<Clones>>;

fn lock(clones: &SharedClones) -> MutexGuard<'_, Clones> {
    // A panic while holding the list leaves it usable: each entry is a whole clone.
    clones.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `emberctl clone`; 0 once every clone runs, 1 after saying which failed and why, 128
/// plus the signal's number after SIGINT, SIGTERM or SIGHUP.
pub fn run(args: &CloneArgs, json_output: bool) -> u8 {
    let clones = SharedClones::default();
    if let Err(e) = stop_on_signal(Arc::clone(&clones)) {
        eprintln!(
            "emberctl clone: cannot set up stopping the clones on Ctrl-C: {e}; \
             nothing was started, try again"
        );
        return 1;
    }
    match clone_all(args, &clones) {
        Ok(started) => {
            report(&started, json_output);
            0
        }
        Err(e) => {
            eprintln!("emberctl clone: {e}");
            1
        }
    }
}

fn report(started: &[Started], json_output: bool) {
    if json_output {
        let all: Vec<Value> = started
            .iter()
            .map(|s| s.plan.describe(s.child.id()))
            .collect();
        println!("{}", Value::Array(all));
        return;
    }
    for s in started {
        let p = &s.plan;
        let taps: String = p
            .taps
            .iter()
            .map(|(i, t)| format!(", {i} on {t}"))
            .collect();
        println!(
            "clone {}: pid {}, api {}, vsock {}, cid {}{taps}",
            p.index,
            s.child.id(),
            p.api_sock.display(),
            p.vsock_uds.display(),
            p.guest_cid
        );
    }
}

/// Until the clones are handed over, a stop signal stops the clones started so far, says
/// which on stderr and ends emberctl with 128 plus the signal's number; after that it only
/// ends emberctl, with the same status.
fn stop_on_signal(clones: SharedClones) -> std::io::Result<()> {
    signals::on_stop_signal(move |signal| {
        // Waits for a clone being started to be on the list, so that it is stopped too.
        let mut clones = lock(&clones);
        if !clones.handed_over {
            let stopped = stop_all(&mut clones.started);
            let what = if stopped.is_empty() {
                "no clone was running".to_string()
            } else {
                format!("stopped the clones started: {}", stopped.join(", "))
            };
            eprintln!(
                "emberctl clone: {} before cloning finished; {what}",
                signals::name(signal)
            );
        }
        std::process::exit(128 + signal);
    })
}

fn clone_all(args: &CloneArgs, clones: &SharedClones) -> Result<Vec<Started>, String> {
    let ember = match &args.ember {
        Some(path) => path.clone(),
        None => default_ember()?,
    };
    for (what, path) in [("state file", &args.state), ("memory file", &args.mem)] {
        if !path.is_file() {
            return Err(format!(
                "the snapshot's {what} {} is missing",
                path.display()
            ));
        }
    }
    let plans = plan(args)?;
    for p in &plans {
        check_free(p)?;
        for (_, tap) in &p.taps {
            if !Path::new("/sys/class/net").join(tap).exists() {
                return Err(format!(
                    "clone {}: host TAP {tap} does not exist; create it first \
                     (ip tuntap add {tap} mode tap)",
                    p.index
                ));
            }
        }
    }
    // Absolute paths: each ember resolves them itself, and the printed ones must work
    // from anywhere.
    let state = absolute(&args.state)?;
    let mem = absolute(&args.mem)?;
    let result = start_and_load(&ember, &plans, &state, &mem, args.timeout, clones);
    let mut clones = lock(clones);
    if let Err(e) = result {
        stop_all(&mut clones.started);
        return Err(e);
    }
    clones.handed_over = true;
    Ok(std::mem::take(&mut clones.started))
}

/// Starts every ember first (their start-up overlaps), then loads the snapshot into each.
fn start_and_load(
    ember: &Path,
    plans: &[ClonePlan],
    state: &Path,
    mem: &Path,
    timeout: Duration,
    clones: &SharedClones,
) -> Result<(), String> {
    for p in plans {
        // Started with the list locked: a signal meanwhile waits until the new ember is on
        // the list, so that it is stopped with the others.
        let mut clones = lock(clones);
        let child = spawn_ember(ember, p).map_err(|e| format!("clone {}: {e}", p.index))?;
        clones.started.push(Started {
            plan: p.clone(),
            child,
        });
    }
    for (i, p) in plans.iter().enumerate() {
        // Whether clone i's ember exited: looked at with the list locked, as the signal
        // thread may be stopping it.
        let mut exited = || {
            let mut clones = lock(clones);
            let child = &mut clones.started.get_mut(i)?.child;
            child.try_wait().ok().flatten()
        };
        load(p, &mut exited, state, mem, timeout).map_err(|e| {
            let log = tail(&p.dir.join("ember.log"), 10);
            format!(
                "clone {} ({}): {e}; the clones started were stopped{log}",
                p.index,
                p.dir.display()
            )
        })?;
    }
    Ok(())
}

/// Every clone's paths, CID and TAPs, checked.
fn plan(args: &CloneArgs) -> Result<Vec<ClonePlan>, String> {
    if args.count == 0 {
        return Err("--count must be at least 1".into());
    }
    let taps = args
        .taps
        .iter()
        .map(|t| match t.split_once('=') {
            Some((iface, prefix)) if !iface.is_empty() && !prefix.is_empty() => {
                Ok((iface.to_string(), prefix.to_string()))
            }
            _ => Err(format!("--tap {t}: give IFACE=PREFIX, e.g. eth0=tap-clone")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dir = absolute(&args.dir)?;
    (0..args.count)
        .map(|index| {
            let guest_cid = args
                .first_cid
                .checked_add(u64::from(index))
                .ok_or_else(|| format!("--first-cid {} is too large", args.first_cid))?;
            check_guest_cid(guest_cid).map_err(|e| format!("clone {index}: guest CID {e}"))?;
            let clone_dir = dir.join(format!("clone-{index}"));
            let plan = ClonePlan {
                index,
                api_sock: clone_dir.join("api.sock"),
                vsock_uds: clone_dir.join("vsock.sock"),
                dir: clone_dir,
                guest_cid,
                taps: taps
                    .iter()
                    .map(|(iface, prefix)| (iface.clone(), format!("{prefix}{index}")))
                    .collect(),
            };
            check_names(&plan)?;
            Ok(plan)
        })
        .collect()
}

/// Socket paths and TAP names fit the kernel's limits.
fn check_names(plan: &ClonePlan) -> Result<(), String> {
    // A guest connecting to host port P reaches `<vsock_uds>_P`: leave room for it.
    for (path, room) in [(&plan.api_sock, 0), (&plan.vsock_uds, 11)] {
        if path.as_os_str().len() + room > MAX_SOCKET_PATH {
            return Err(format!(
                "clone {}: the socket path {} is too long for a Unix socket; use a shorter --dir",
                plan.index,
                path.display()
            ));
        }
    }
    for (_, tap) in &plan.taps {
        if tap.len() > MAX_IFNAME {
            return Err(format!(
                "clone {}: TAP name {tap} is longer than {MAX_IFNAME} bytes; use a shorter prefix",
                plan.index
            ));
        }
    }
    Ok(())
}

/// No ember answers at the clone's API socket already (its socket would be replaced).
fn check_free(plan: &ClonePlan) -> Result<(), String> {
    if !plan.api_sock.exists() {
        return Ok(());
    }
    let probe = ApiClient::new(&plan.api_sock).with_timeout(Duration::from_secs(2));
    if probe.request("GET", "/", None).is_ok() {
        return Err(format!(
            "clone {}: an ember already answers at {}; stop it or use another --dir",
            plan.index,
            plan.api_sock.display()
        ));
    }
    Ok(())
}

fn spawn_ember(ember: &Path, plan: &ClonePlan) -> Result<Child, String> {
    fs::create_dir_all(&plan.dir)
        .map_err(|e| format!("cannot create {}: {e}", plan.dir.display()))?;
    let file = |name: &str| {
        let path = plan.dir.join(name);
        File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))
    };
    // Run from emberctl's own directory: drive and TAP paths the snapshot holds as given
    // (relative ones too) resolve as they did for the ember that took it, if it ran there.
    let mut command = Command::new(ember);
    // emberctl blocks the stop signals while cloning; a clone must not inherit that.
    signals::unblock_in_child(&mut command).map_err(|e| {
        format!(
            "cannot prepare the signal mask for {}: {e}",
            ember.display()
        )
    })?;
    command
        .arg("--api-sock")
        .arg(&plan.api_sock)
        .stdin(Stdio::null())
        .stdout(file("console.log")?)
        .stderr(file("ember.log")?)
        // Its own process group: a Ctrl-C or hangup for emberctl's group leaves it running.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ember.display()))
}

/// Waits for the clone's API socket, then loads the snapshot into it, running. `exited`
/// tells whether its ember has exited, and how.
fn load(
    plan: &ClonePlan,
    exited: &mut dyn FnMut() -> Option<ExitStatus>,
    state: &Path,
    mem: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let client = ApiClient::new(&plan.api_sock).with_timeout(timeout);
    loop {
        if let Some(status) = exited() {
            return Err(format!("ember exited ({status}) before it answered"));
        }
        if client.request("GET", "/", None).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "ember did not answer at {} within {timeout:?}",
                plan.api_sock.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = plan.load_body(state, mem).to_string();
    let response = client
        .request("PUT", "/snapshot/load", Some(&body))
        .map_err(|e| format!("PUT /snapshot/load: {e}"))?;
    if !response.is_success() {
        return Err(format!(
            "PUT /snapshot/load failed ({}): {}",
            response.status,
            response.fault_message()
        ));
    }
    Ok(())
}

/// Kills and reaps every ember started and empties the list; says which were stopped
/// ("clone 0 (pid 123)").
fn stop_all(started: &mut Vec<Started>) -> Vec<String> {
    started
        .drain(..)
        .map(|mut s| {
            let _ = s.child.kill();
            let _ = s.child.wait();
            format!("clone {} (pid {})", s.plan.index, s.child.id())
        })
        .collect()
}

fn default_ember() -> Result<PathBuf, String> {
    let me = std::env::current_exe()
        .map_err(|e| format!("cannot find emberctl's own path ({e}); give --ember PATH"))?;
    let ember = me.with_file_name("ember");
    if ember.is_file() {
        Ok(ember)
    } else {
        Err(format!(
            "no ember next to emberctl ({}); give --ember PATH",
            ember.display()
        ))
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))
}

/// The last lines of a log, to show under an error; empty when there are none.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return String::new();
    }
    let shown = all[all.len().saturating_sub(lines)..].join("\n");
    format!("\n--- {}\n{shown}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CloneArgs,
    }

    fn args(extra: &[&str]) -> CloneArgs {
        let all = ["clone", "s.state", "s.mem"].iter().chain(extra);
        Cli::try_parse_from(all).unwrap().args
    }

    #[test]
    fn each_clone_gets_its_own_paths_cid_and_taps() {
        let a = args(&["-n", "3", "--dir", "/run/c", "--first-cid", "10"]);
        let plans = plan(&a).unwrap();
        assert_eq!(plans.len(), 3);
        assert_eq!(plans[2].api_sock, Path::new("/run/c/clone-2/api.sock"));
        assert_eq!(plans[2].vsock_uds, Path::new("/run/c/clone-2/vsock.sock"));
        let cids: Vec<u64> = plans.iter().map(|p| p.guest_cid).collect();
        assert_eq!(cids, [10, 11, 12]);
        let a = args(&[
            "-n", "2", "--dir", "/c", "--tap", "eth0=tc", "--tap", "eth1=td",
        ]);
        let plans = plan(&a).unwrap();
        assert_eq!(
            plans[1].taps,
            [("eth0".into(), "tc1".into()), ("eth1".into(), "td1".into())]
        );
        let body = plans[1].load_body(Path::new("/s"), Path::new("/m"));
        assert_eq!(body["resume_vm"], true);
        assert_eq!(body["vsock_override"]["guest_cid"], 4);
        assert_eq!(body["network_overrides"][1]["host_dev_name"], "td1");
        assert_eq!(body["mem_backend"]["backend_path"], "/m");
    }

    #[test]
    fn bad_plans_are_refused_before_anything_starts() {
        let long_dir = "/d".repeat(50);
        let cases: [(&[&str], &str); 6] = [
            (&["-n", "0", "--dir", "/c"], "at least 1"),
            (
                &["-n", "1", "--dir", "/c", "--first-cid", "2"],
                "2 is out of range",
            ),
            (
                &["-n", "2", "--dir", "/c", "--first-cid", "4294967294"],
                "clone 1: guest CID 4294967295 is out of range",
            ),
            (&["-n", "1", "--dir", "/c", "--tap", "eth0"], "IFACE=PREFIX"),
            (
                &["-n", "11", "--dir", "/c", "--tap", "eth0=tap-clones-xyz"],
                "clone 10: TAP name tap-clones-xyz10 is longer",
            ),
            (
                &["-n", "1", "--dir", &long_dir],
                "too long for a Unix socket",
            ),
        ];
        for (extra, why) in cases {
            let err = plan(&args(extra)).unwrap_err();
            assert!(err.contains(why), "{extra:?}: {err}");
        }
    }

    #[test]
    fn a_missing_snapshot_or_tap_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let mut a = args(&["-n", "1", "--dir", d, "--ember", "/bin/true"]);
        let err = clone_all(&a, &SharedClones::default()).unwrap_err();
        assert!(err.contains("state file s.state is missing"), "{err}");
        a.state = dir.path().join("s.state");
        a.mem = dir.path().join("s.mem");
        fs::write(&a.state, "s").unwrap();
        fs::write(&a.mem, "m").unwrap();
        a.taps = vec!["eth0=no-such-tap".into()];
        let err = clone_all(&a, &SharedClones::default()).unwrap_err();
        assert!(
            err.contains("host TAP no-such-tap0 does not exist"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_load_stops_every_clone_and_names_the_failing_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let mut a = args(&["-n", "2", "--dir", d, "--ember", "/bin/false"]);
        a.state = dir.path().join("s.state");
        a.mem = dir.path().join("s.mem");
        fs::write(&a.state, "s").unwrap();
        fs::write(&a.mem, "m").unwrap();
        let err = clone_all(&a, &SharedClones::default()).unwrap_err();
        assert!(
            err.starts_with("clone 0 (") && err.contains("ember exited"),
            "{err}"
        );
        assert!(err.contains("the clones started were stopped"), "{err}");
    }
}
