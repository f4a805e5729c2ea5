//! What the snapshot, snapshot-chain and clone tests share: an `ember --api-sock` process in
//! its own directory, `emberctl`, the agent after a restore, and a booted guest with the agent.

#![allow(dead_code)] // each test binary (snapshot.rs, clones.rs) uses a different part of it

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::agent::{AgentClient, Exec};
use api::client::{ApiClient, ApiResponse};
use serde_json::{json, Value};
use testbed::{Artifacts, GuestSpec};

/// The artifacts; an `EMBER_BIN` given when this test was built also holds inside the
/// nested test bed, whose jobs start with a clean environment.
pub fn artifacts() -> Artifacts {
    if std::env::var_os("EMBER_BIN").is_none() {
        if let Some(bin) = option_env!("EMBER_BIN") {
            std::env::set_var("EMBER_BIN", bin);
        }
    }
    Artifacts::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// An `ember --api-sock` process in `dir`, killed when dropped.
pub struct Ember {
    pub dir: PathBuf,
    pub sock: PathBuf,
    child: Option<Child>,
    /// None for an ember started without the guest artifacts (`start`).
    art: Option<Artifacts>,
}

impl Ember {
    pub fn spawn(dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_wrapped(dir, &[], extra)
    }

    /// Like [`Ember::spawn`], with ember started through `wrapper` (a command that execs
    /// its arguments, such as `ip netns exec NS`), so the pid is still ember's.
    pub fn spawn_wrapped(dir: &Path, wrapper: &[&str], extra: &[&str]) -> Self {
        let art = artifacts();
        Self::start_wrapped(&art.ember.clone(), wrapper, dir, extra, Some(art))
    }

    /// Starts the `ember` binary at `ember` with `--api-sock` in `dir`; `art`, the guest
    /// artifacts, are needed only by `emberctl`.
    pub fn start(ember: &Path, dir: &Path, extra: &[&str], art: Option<Artifacts>) -> Self {
        Self::start_wrapped(ember, &[], dir, extra, art)
    }

    /// [`Ember::start`] through `wrapper` (see [`Ember::spawn_wrapped`]).
    fn start_wrapped(
        ember: &Path,
        wrapper: &[&str],
        dir: &Path,
        extra: &[&str],
        art: Option<Artifacts>,
    ) -> Self {
        fs::create_dir_all(dir).unwrap();
        let sock = dir.join("api.sock");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(ember);
                c
            }
            None => Command::new(ember),
        };
        let child = command
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("vm.out")).unwrap())
            .stderr(fs::File::create(dir.join("vm.err")).unwrap())
            .spawn()
            .unwrap();
        let ember = Self {
            dir: dir.to_path_buf(),
            sock,
            child: Some(child),
            art,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ApiClient::new(&ember.sock)
            .request("GET", "/", None)
            .is_err()
        {
            assert!(Instant::now() < deadline, "no API socket\n{}", ember.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        ember
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        let body = body.map(|b| b.to_string());
        ApiClient::new(&self.sock)
            .with_timeout(Duration::from_secs(600))
            .request(method, path, body.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    /// Sends a request that must succeed.
    pub fn ok(&self, method: &str, path: &str, body: Value) {
        let r = self.call(method, path, Some(body));
        assert!(r.is_success(), "{method} {path}: {r:?}\n{}", self.logs());
    }

    /// Sends a request that must fail with 400; returns its fault message.
    pub fn refused(&self, method: &str, path: &str, body: Value) -> String {
        let r = self.call(method, path, Some(body));
        assert_eq!(r.status, 400, "{method} {path}: {r:?}\n{}", self.logs());
        r.fault_message()
    }

    pub fn state(&self) -> String {
        let info: Value = serde_json::from_str(&self.call("GET", "/", None).body).unwrap();
        info["state"].as_str().unwrap().to_string()
    }

    /// Runs `emberctl --api SOCK ARGS...`; (exit code, stdout, stderr).
    pub fn emberctl(&self, args: &[&str]) -> (i32, String, String) {
        let art = self
            .art
            .as_ref()
            .expect("emberctl needs an ember started with `spawn`");
        run(Command::new(&art.emberctl)
            .arg("--api")
            .arg(&self.sock)
            .args(args))
    }

    /// The ember process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether ember is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The `Seccomp:` mode from /proc of each of Ember's threads.
    pub fn seccomp_modes(&self) -> Vec<(String, String)> {
        testbed::seccomp_modes(self.pid())
    }

    /// Pauses the VM and writes a full snapshot to `state` and `mem`.
    pub fn snapshot(&self, state: &Path, mem: &Path) {
        self.ok("PATCH", "/vm", json!({"state": "Paused"}));
        self.ok(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}),
        );
    }

    pub fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- guest console ({})\n{}\n--- ember stderr\n{}",
            self.dir.display(),
            read("vm.out"),
            read("vm.err")
        )
    }

    /// Waits for ember to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        testbed::wait_with_timeout(&mut child, timeout).and_then(|s| s.code())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `emberctl ARGS...` without an API socket; (exit code, stdout, stderr).
pub fn emberctl_offline(art: &Artifacts, args: &[&str]) -> (i32, String, String) {
    run(Command::new(&art.emberctl).args(args))
}

/// Runs `command` to its end; (exit code, stdout, stderr).
fn run(command: &mut Command) -> (i32, String, String) {
    let out = command.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// The body of a `PUT /snapshot/load` that resumes with a new vsock socket (and CID).
pub fn load_body(state: &Path, mem: &Path, uds: &Path, cid: Option<u64>) -> Value {
    let mut body = json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
        "vsock_override": {"uds_path": uds},
    });
    if let Some(cid) = cid {
        body["vsock_override"]["guest_cid"] = json!(cid);
    }
    body
}

/// Runs a shell script in the guest; it must exit 0; returns its stdout.
pub fn sh(agent: &AgentClient, script: &str) -> String {
    let out = agent.exec_output(&Exec::new(["sh", "-c", script])).unwrap();
    assert_eq!(out.status.code, Some(0), "{script}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Starts the guest's counting process: it writes its pid to /tmp/loop.pid, then a number one
/// higher to /tmp/count every tenth of a second.
pub fn start_counter(agent: &AgentClient) {
    sh(
        agent,
        // Each value is written aside and renamed into place, so a reader never sees the
        // file truncated and not yet rewritten.
        "setsid sh -c 'echo $$ > /tmp/loop.pid; i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1 &",
    );
}

/// The guest's counting process's last value.
pub fn counter(agent: &AgentClient) -> u64 {
    sh(agent, "cat /tmp/count 2>/dev/null || echo 0")
        .trim()
        .parse()
        .unwrap()
}

/// Waits until `check` holds, polling.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The agent after a restore: it announced itself only at boot, so ping until it answers
/// (the guest's vsock transport was reset; its listener survives). `logs` says what the VM
/// printed, for the failure message.
pub fn agent_after_restore(uds: &Path, logs: impl Fn() -> String) -> AgentClient {
    let agent = AgentClient::vsock(uds).with_timeout(Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match agent.ping() {
            Ok(_) => return agent,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the agent at {} never answered after the restore: {e}\n{}",
                uds.display(),
                logs()
            ),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Boots `spec` (which serves the agent at `uds`) in an ember in `dir/first`; returns the
/// VM and its agent once ready.
pub fn boot_with_agent(dir: &Path, spec: &GuestSpec, uds: &Path) -> (Ember, AgentClient) {
    boot_with_config(dir, &spec.config_json(), uds)
}

/// Boots the VM configuration `config_json` (whose guest serves the agent at `uds`) in an
/// ember in `dir/first`; returns the VM and its agent once ready.
pub fn boot_with_config(dir: &Path, config_json: &str, uds: &Path) -> (Ember, AgentClient) {
    boot_wrapped(dir, config_json, uds, &[])
}

/// [`boot_with_config`] with ember started through `wrapper` ([`Ember::spawn_wrapped`]).
pub fn boot_wrapped(
    dir: &Path,
    config_json: &str,
    uds: &Path,
    wrapper: &[&str],
) -> (Ember, AgentClient) {
    let config = dir.join("vm.json");
    fs::write(&config, config_json).unwrap();
    let ready_uds = uds.to_path_buf();
    let ready =
        std::thread::spawn(move || api::agent::wait_ready(&ready_uds, Duration::from_secs(900)));
    let vm = Ember::spawn_wrapped(
        &dir.join("first"),
        wrapper,
        &["--config-file", config.to_str().unwrap()],
    );
    ready
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.logs()));
    let agent = AgentClient::vsock(uds).with_timeout(Duration::from_secs(300));
    (vm, agent)
}
