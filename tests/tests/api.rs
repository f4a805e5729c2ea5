//! The API socket through real boots: a VM configured over `--api-sock` (by the `api`
//! client, by `emberctl --api` and by `curl --unix-socket`, as users would), started,
//! paused and resumed (the guest's console ticker stops and goes on), its drive swapped, its
//! metrics flushed, and ended by Ctrl-Alt-Del with exit code 0. The bodies run where KVM can
//! boot stock guests (`testbed::vm_test`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::agent::{AgentClient, Exec};
use api::client::{ApiClient, ApiResponse};
use serde_json::{json, Value};
use testbed::{Artifacts, TEST_BOOT_ARGS};

/// An `ember --api-sock` process, killed when dropped unless it ended.
struct Ember {
    dir: PathBuf,
    sock: PathBuf,
    child: Option<Child>,
    art: Artifacts,
}

/// The artifacts; an `EMBER_BIN` given when this test was built also holds inside the
/// nested test bed, whose jobs start with a clean environment.
fn artifacts() -> Artifacts {
    if std::env::var_os("EMBER_BIN").is_none() {
        if let Some(bin) = option_env!("EMBER_BIN") {
            std::env::set_var("EMBER_BIN", bin);
        }
    }
    Artifacts::locate().unwrap_or_else(|e| panic!("{e}"))
}

impl Ember {
    fn spawn(dir: &Path, extra: &[&str]) -> Self {
        let art = artifacts();
        let sock = dir.join("api.sock");
        let child = Command::new(&art.ember)
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", "api-test"])
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
        while ember.try_get("/").is_none() {
            assert!(Instant::now() < deadline, "no API socket\n{}", ember.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        ember
    }

    /// (thread name, `Seccomp:` mode from /proc) for each of Ember's threads.
    fn seccomp_modes(&self) -> Vec<(String, String)> {
        testbed::seccomp_modes(self.child.as_ref().unwrap().id())
    }

    fn try_get(&self, path: &str) -> Option<ApiResponse> {
        ApiClient::new(&self.sock).request("GET", path, None).ok()
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        let body = body.map(|b| b.to_string());
        ApiClient::new(&self.sock)
            .with_timeout(Duration::from_secs(300))
            .request(method, path, body.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    /// Sends a request that must succeed; returns its body.
    fn ok(&self, method: &str, path: &str, body: Value) -> String {
        let r = self.call(method, path, Some(body));
        assert!(r.is_success(), "{method} {path}: {r:?}\n{}", self.logs());
        r.body
    }

    /// Sends a request that must fail with 400; returns its fault message.
    fn refused(&self, method: &str, path: &str, body: Value) -> String {
        let r = self.call(method, path, Some(body));
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        r.fault_message()
    }

    fn state(&self) -> String {
        let info: Value = serde_json::from_str(&self.call("GET", "/", None).body).unwrap();
        info["state"].as_str().unwrap().to_string()
    }

    fn emberctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(&self.art.emberctl)
            .arg("--api")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        )
    }

    fn curl(&self, args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("curl is needed for this test (apt-get install curl)");
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn console_len(&self) -> u64 {
        fs::metadata(self.dir.join("vm.out")).map_or(0, |m| m.len())
    }

    fn logs(&self) -> String {
        testbed::vm_logs(&self.dir)
    }

    /// Waits for ember to exit and returns its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        testbed::wait_with_timeout(&mut child, timeout).and_then(|s| s.code())
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Whatever failed, the guest's console and ember's own log say the most about why.
            eprintln!("{}", self.logs());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sparse_image(path: &Path, bytes: u64) {
    fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

/// Configures everything over the API, checking refusals on the way.
fn configure(vm: &Ember, dir: &Path) -> PathBuf {
    let art = &vm.art;
    let root = art.private_rootfs(dir).unwrap();
    sparse_image(&dir.join("data1.img"), 4 << 20);
    sparse_image(&dir.join("data2.img"), 8 << 20);
    let uds = dir.join("v.sock");
    vm.ok(
        "PUT",
        "/logger",
        json!({"log_path": dir.join("ember.log"), "level": "Info", "show_level": true}),
    );
    vm.ok(
        "PUT",
        "/metrics",
        json!({"metrics_path": dir.join("metrics.json")}),
    );
    let boot_args = TEST_BOOT_ARGS.replace(" ember.test=poweroff", "");
    vm.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": art.vmlinux, "boot_args": boot_args}),
    );
    vm.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    vm.ok("PATCH", "/machine-config", json!({"mem_size_mib": 512}));
    let drive = |id: &str, path: &Path, root: bool| json!({"drive_id": id, "path_on_host": path, "is_root_device": root, "cache_type": "Writeback"});
    vm.ok("PUT", "/drives/rootfs", drive("rootfs", &root, true));
    vm.ok(
        "PUT",
        "/drives/data",
        drive("data", &dir.join("data1.img"), false),
    );
    let second_root = vm.refused("PUT", "/drives/other", drive("other", &root, true));
    assert!(
        second_root.contains("is the root device already"),
        "{second_root}"
    );
    let missing = vm.refused(
        "PUT",
        "/drives/gone",
        drive("gone", &dir.join("nope.img"), false),
    );
    assert!(missing.contains("cannot open"), "{missing}");
    vm.ok("PUT", "/vsock", json!({"guest_cid": 3, "uds_path": uds}));
    let unknown = vm.refused(
        "PUT",
        "/vsock",
        json!({"guest_cid": 3, "uds_path": uds, "port": 1}),
    );
    assert!(
        unknown.starts_with("vsock.port: unknown field"),
        "{unknown}"
    );
    let config: Value = serde_json::from_str(&vm.call("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);
    assert_eq!(config["drives"].as_array().unwrap().len(), 2);
    uds
}

#[test]
fn api_configures_boots_pauses_and_ends_a_vm() {
    let Some(dir) = testbed::vm_test(
        "api_configures_boots_pauses_and_ends_a_vm",
        Duration::from_secs(1500),
    ) else {
        return;
    };
    let mut vm = Ember::spawn(&dir, &[]);
    assert_eq!(vm.state(), "Not started");
    let version: Value = serde_json::from_str(&vm.call("GET", "/version", None).body).unwrap();
    assert!(version["firecracker_version"].is_string());
    let uds = configure(&vm, &dir);

    let ready_uds = uds.clone();
    let ready =
        std::thread::spawn(move || api::agent::wait_ready(&ready_uds, Duration::from_secs(900)));
    vm.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(vm.state(), "Running");
    assert_eq!(
        vm.refused("PUT", "/actions", json!({"action_type": "InstanceStart"})),
        "InstanceStart: the VM is already running"
    );
    assert_eq!(
        vm.refused(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128})
        ),
        "machine-config cannot change after the VM started"
    );
    ready
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.logs()));
    let agent = AgentClient::vsock(&uds).with_timeout(Duration::from_secs(300));

    // Every thread runs under its seccomp filter (mode 2) once the VM runs.
    let modes = vm.seccomp_modes();
    for name in ["ember", "ember_vcpu0", "ember_api"] {
        assert!(
            modes.iter().any(|(n, _)| n == name),
            "no thread {name}: {modes:?}"
        );
    }
    assert!(modes.iter().all(|(_, m)| m == "2"), "{modes:?}");

    pause_stops_the_guest(&vm, &agent);
    drive_swap_reaches_the_guest(&vm, &agent, &dir);
    metrics_and_logs_are_written(&vm, &dir);
    users_tools_work(&vm);

    let (code, out, err) = vm.emberctl(&["ctrl-alt-del"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(300)),
        Some(0),
        "{}",
        vm.logs()
    );
}

fn sh(agent: &AgentClient, script: &str) -> String {
    let out = agent.exec_output(&Exec::new(["sh", "-c", script])).unwrap();
    assert_eq!(out.status.code, Some(0), "{script}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A guest loop prints to the console; while paused the console stays still.
fn pause_stops_the_guest(vm: &Ember, agent: &AgentClient) {
    sh(agent, "setsid sh -c 'while :; do echo tick > /dev/console; sleep 0.2; done' </dev/null >/dev/null 2>&1 &");
    let grows = |vm: &Ember, within: Duration| {
        let start = vm.console_len();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if vm.console_len() > start {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    assert!(
        grows(vm, Duration::from_secs(120)),
        "the ticker never ran\n{}",
        vm.logs()
    );
    let (code, out, err) = vm.emberctl(&["pause"]);
    assert_eq!((code, out.trim()), (0, "paused"), "{err}");
    assert_eq!(vm.state(), "Paused");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !grows(vm, Duration::from_secs(4)),
        "the guest ran while paused"
    );
    assert!(vm
        .refused("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}))
        .contains("paused"));
    vm.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    assert_eq!(vm.state(), "Running");
    assert!(
        grows(vm, Duration::from_secs(120)),
        "the guest did not go on after resume"
    );
}

/// PATCH /drives/data to a larger image: the guest sees the new size.
fn drive_swap_reaches_the_guest(vm: &Ember, agent: &AgentClient, dir: &Path) {
    assert_eq!(sh(agent, "cat /sys/block/vdb/size").trim(), "8192");
    let data2 = dir.join("data2.img");
    let (code, _, err) = vm.emberctl(&["drive", "update", "data", data2.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sh(agent, "cat /sys/block/vdb/size").trim() != "16384" {
        assert!(
            Instant::now() < deadline,
            "the guest never saw the new size"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let config: Value = serde_json::from_str(&vm.call("GET", "/vm/config", None).body).unwrap();
    assert_eq!(config["drives"][1]["path_on_host"], json!(data2));
}

fn metrics_and_logs_are_written(vm: &Ember, dir: &Path) {
    let (code, _, err) = vm.emberctl(&["metrics", "flush"]);
    assert_eq!(code, 0, "{err}");
    let text = fs::read_to_string(dir.join("metrics.json")).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["api"]["requests"].as_u64().unwrap() > 10, "{line}");
    assert!(line["api"]["failures"].as_u64().unwrap() >= 4, "{line}");
    assert!(line["vcpu_exits"]["io_out"].as_u64().unwrap() > 0, "{line}");
    assert!(
        line["devices"]["block"]["rootfs"]["read_bytes"]
            .as_u64()
            .unwrap()
            > 0,
        "{line}"
    );
    assert!(
        line["devices"]["vsock"]["connections"].as_u64().unwrap() > 0,
        "{line}"
    );
    assert!(line["boot_time_us"].as_u64().unwrap() > 0, "{line}");
    let log = fs::read_to_string(dir.join("ember.log")).unwrap();
    assert!(log.contains("[Info] InstanceStart: done"), "{log}");
    assert!(log.contains("[Warning] PutDrive refused"), "{log}");
}

/// curl as a user would, and emberctl's friendly and JSON output.
fn users_tools_work(vm: &Ember) {
    let info: Value = serde_json::from_str(&vm.curl(&["http://localhost/"])).unwrap();
    assert_eq!(
        (info["id"].as_str(), info["state"].as_str()),
        (Some("api-test"), Some("Running"))
    );
    let refused = vm.curl(&[
        "-X",
        "PATCH",
        "http://localhost/network-interfaces/eth0",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {}}"#,
    ]);
    assert!(
        refused.contains("rate limiters are not supported"),
        "{refused}"
    );
    let (code, out, _) = vm.emberctl(&["status"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("api-test: Running (ember "), "{out}");
    let (code, out, _) = vm.emberctl(&["--json", "machine-config"]);
    assert_eq!(code, 0);
    let machine: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(machine["vcpu_count"], 2);
    let (code, _, err) = vm.emberctl(&["start"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("InstanceStart: the VM is already running"),
        "{err}"
    );
}

/// `--config-file` with the API: the file's sections become API actions, the VM boots at
/// once, and the socket serves the running VM; the file's logger and metrics work as
/// `PUT /logger` and `PUT /metrics` would: log lines, a periodic metrics line, and a last
/// one once curl has ended the VM with Ctrl-Alt-Del.
#[test]
fn config_file_boots_at_once_and_the_api_serves_it() {
    let Some(dir) = testbed::vm_test(
        "config_file_boots_at_once_and_the_api_serves_it",
        Duration::from_secs(1200),
    ) else {
        return;
    };
    let art = artifacts();
    let root = art.private_rootfs(&dir).unwrap();
    let uds = dir.join("v.sock");
    let (log, metrics) = (dir.join("ember.log"), dir.join("metrics.json"));
    let spec = testbed::GuestSpec::with_agent(&art, &root, &uds);
    let mut config: Value = serde_json::from_str(&spec.config_json()).unwrap();
    config["logger"] = json!({"log_path": log, "level": "Info", "show_level": true,
                              "show_log_origin": true});
    config["metrics"] = json!({"metrics_path": metrics});
    fs::write(dir.join("vm.json"), config.to_string()).unwrap();
    let ready = std::thread::spawn(move || api::agent::wait_ready(&uds, Duration::from_secs(900)));
    let mut vm = Ember::spawn(
        &dir,
        &[
            "--config-file",
            dir.join("vm.json").to_str().unwrap(),
            "--no-seccomp",
        ],
    );
    assert_eq!(vm.state(), "Running");
    let modes = vm.seccomp_modes();
    assert!(modes.len() >= 3, "{modes:?}");
    assert!(
        modes.iter().all(|(_, m)| m == "0"),
        "--no-seccomp: {modes:?}"
    );
    let shown: Value = serde_json::from_str(&vm.curl(&["http://localhost/vm/config"])).unwrap();
    assert_eq!(shown["drives"][0]["drive_id"], "rootfs");
    // As Firecracker's GET /vm/config, the logger and metrics sections are not shown.
    assert!(
        shown.get("logger").is_none() && shown.get("metrics").is_none(),
        "{shown}"
    );
    ready
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.logs()));
    let periodic = first_periodic_metrics_line(&vm, &metrics);
    assert!(
        periodic["vcpu_exits"]["io_out"].as_u64().unwrap() > 0,
        "{periodic}"
    );
    let answer = vm.curl(&[
        "-X",
        "PUT",
        "http://localhost/actions",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    ]);
    assert_eq!(answer, "", "204 has no body");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(300)),
        Some(0),
        "{}",
        vm.logs()
    );
    let text = fs::read_to_string(&log).unwrap();
    for line in [
        "[Info] [config] PutMetrics: done",
        "[Info] [config] PutDrive: done",
        "[Info] [config] InstanceStart: done",
        "[Info] [api] SendCtrlAltDel: done",
    ] {
        assert!(text.contains(line), "{line:?} not in the log:\n{text}");
    }
    let last = last_metrics_line_after_the_end(&log, &metrics);
    assert!(
        last["api"]["requests"].as_u64() > periodic["api"]["requests"].as_u64(),
        "SendCtrlAltDel is in the last line: {periodic}\n{last}"
    );
}

/// The metrics lines written so far.
fn metrics_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits for the first periodic line (due 60 s after ember started).
fn first_periodic_metrics_line(vm: &Ember, path: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(line) = metrics_lines(path).into_iter().next() {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no periodic metrics line\n{}",
            vm.logs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The last metrics line, checked to be written once the VM had ended: not before the
/// log line that says so (log lines start with `<seconds>.<milliseconds>`).
fn last_metrics_line_after_the_end(log: &Path, metrics: &Path) -> Value {
    let text = fs::read_to_string(log).unwrap();
    let ended = text
        .lines()
        .find(|l| l.contains("the VM ended: GuestStopped"))
        .unwrap_or_else(|| panic!("no end in the log:\n{text}"));
    let (secs, millis) = ended.split_once(' ').unwrap().0.split_once('.').unwrap();
    let ended_ms = secs.parse::<u64>().unwrap() * 1000 + millis.parse::<u64>().unwrap();
    let lines = metrics_lines(metrics);
    let last = lines.last().unwrap().clone();
    assert!(
        last["utc_timestamp_ms"].as_u64().unwrap() >= ended_ms,
        "the last metrics line is older than the end ({ended}):\n{last}"
    );
    last
}
