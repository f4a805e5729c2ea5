#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use api::models::{
    BootSource, Drive, LoggerConfig, MachineConfig, MetricsConfig, NetworkInterface, VsockConfig,
};
use api::requests::{DrivePatch, MachineConfigPatch};

use super::*;
use crate::rpc::{self, ApiRequest, PreconfigureError, RunError};

/// What the fake machine was asked to do, and how its event loop behaves.
#[derive(Default)]
struct Calls {
    log: Vec<String>,
    /// The timeout of each event-loop round.
    rounds: Vec<i32>,
    /// The VM stops itself in this round (counting from 1).
    stop_in_round: Option<usize>,
    /// The event loop fails in its first round.
    fail: bool,
}

struct FakeMachine(Rc<RefCell<Calls>>);

impl Machine for FakeMachine {
    fn pause(&mut self) -> Result<(), VmmError> {
        self.0.borrow_mut().log.push("pause".into());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.0.borrow_mut().log.push("resume".into());
        Ok(())
    }
    fn send_ctrl_alt_del(&mut self) {
        self.0.borrow_mut().log.push("ctrl-alt-del".into());
    }
    fn update_drive(&mut self, drive_id: &str, path: &Path) -> Result<(), VmmError> {
        let call = format!("swap {drive_id} {}", path.display());
        self.0.borrow_mut().log.push(call);
        Ok(())
    }
    fn save_snapshot(
        &mut self,
        params: &api::requests::SnapshotCreateParams,
    ) -> Result<(), VmmError> {
        let call = format!(
            "snapshot {:?} {} {}",
            params.snapshot_type,
            params.snapshot_path.display(),
            params.mem_file_path.display()
        );
        self.0.borrow_mut().log.push(call);
        Ok(())
    }
    fn device_counters(&self) -> DeviceCounters {
        DeviceCounters::default()
    }
    fn exit_counters(&self) -> Arc<VcpuExitCounters> {
        Arc::default()
    }
    /// Ends the VM when it was scheduled to stop, or once Ctrl-Alt-Del was typed (as
    /// ember-init powers off).
    fn run_events(&mut self, timeout_ms: i32) -> Result<Option<VmOutcome>, VmmError> {
        let mut calls = self.0.borrow_mut();
        calls.rounds.push(timeout_ms);
        if calls.fail {
            return Err(VmmError::NotStarted);
        }
        let scheduled = calls.stop_in_round == Some(calls.rounds.len());
        let typed = calls.log.iter().any(|c| c == "ctrl-alt-del");
        Ok((scheduled || typed).then_some(VmOutcome::GuestStopped))
    }
}

/// Files the checks accept: a kernel with ELF magic and a disk image.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF\x02\x01\x01\0rest").unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.path().join("other.img"), vec![0u8; 8192]).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn boot(&self) -> VmmAction {
        VmmAction::PutBootSource(BootSource {
            kernel_image_path: self.path("vmlinux"),
            boot_args: None,
            initrd_path: None,
        })
    }

    fn drive(&self, id: &str, root: bool) -> VmmAction {
        VmmAction::PutDrive(Drive {
            drive_id: id.into(),
            path_on_host: self.path("disk.img"),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: None,
            rate_limiter: None,
            socket: None,
        })
    }
}

fn controller() -> (Controller<FakeMachine>, Rc<RefCell<Calls>>) {
    let calls = Rc::new(RefCell::new(Calls::default()));
    let for_launch = calls.clone();
    let launch: Launcher<FakeMachine> = Box::new(move |config| {
        config.validate()?;
        for_launch.borrow_mut().log.push("launch".into());
        Ok(FakeMachine(for_launch.clone()))
    });
    (Controller::new("vm1".into(), launch), calls)
}

fn refused(c: &mut Controller<FakeMachine>, action: VmmAction) -> String {
    c.handle(action).unwrap_err().0
}

fn started(files: &Files) -> (Controller<FakeMachine>, Rc<RefCell<Calls>>) {
    let (mut c, calls) = controller();
    c.handle(files.boot()).unwrap();
    c.handle(files.drive("root", true)).unwrap();
    c.handle(VmmAction::InstanceStart).unwrap();
    (c, calls)
}

#[test]
fn instance_info_follows_the_state() {
    let files = Files::new();
    let (mut c, calls) = controller();
    let state = |c: &mut Controller<FakeMachine>| match c.handle(VmmAction::GetInstanceInfo) {
        Ok(VmmData::InstanceInfo(info)) => info.state,
        other => panic!("{other:?}"),
    };
    assert_eq!(state(&mut c), "Not started");
    c.handle(files.boot()).unwrap();
    c.handle(VmmAction::InstanceStart).unwrap();
    assert_eq!(state(&mut c), "Running");
    c.handle(VmmAction::Pause).unwrap();
    assert_eq!(state(&mut c), "Paused");
    c.handle(VmmAction::Pause).unwrap();
    c.handle(VmmAction::Resume).unwrap();
    assert_eq!(state(&mut c), "Running");
    assert_eq!(calls.borrow().log, ["launch", "pause", "resume"]);
}

#[test]
fn instance_start_needs_a_boot_source_and_happens_once() {
    let files = Files::new();
    let (mut c, _) = controller();
    assert_eq!(
        refused(&mut c, VmmAction::InstanceStart),
        "InstanceStart: boot-source: missing; give kernel_image_path at least"
    );
    assert_eq!(c.state(), VmState::NotStarted);
    c.handle(files.boot()).unwrap();
    c.handle(VmmAction::InstanceStart).unwrap();
    assert_eq!(
        refused(&mut c, VmmAction::InstanceStart),
        "InstanceStart: the VM is already running"
    );
}

#[test]
fn configuration_is_refused_after_start() {
    let files = Files::new();
    let (mut c, _) = started(&files);
    let machine = VmmAction::PutMachineConfig(MachineConfig::default());
    assert_eq!(
        refused(&mut c, machine),
        "machine-config cannot change after the VM started"
    );
    let patch = VmmAction::PatchMachineConfig(MachineConfigPatch::default());
    assert_eq!(
        refused(&mut c, patch),
        "machine-config cannot change after the VM started"
    );
    assert_eq!(
        refused(&mut c, files.boot()),
        "boot-source cannot change after the VM started"
    );
    assert!(refused(&mut c, files.drive("data", false)).starts_with("drives cannot be added"));
    let vsock = VmmAction::PutVsock(VsockConfig {
        vsock_id: None,
        guest_cid: 3,
        uds_path: "/v".into(),
    });
    assert_eq!(
        refused(&mut c, vsock),
        "vsock cannot change after the VM started"
    );
}

#[test]
fn wrong_state_actions_say_what_to_do() {
    let (mut c, _) = controller();
    assert_eq!(
        refused(&mut c, VmmAction::Pause),
        "vm.state: the VM is not started; InstanceStart first"
    );
    assert_eq!(
        refused(&mut c, VmmAction::SendCtrlAltDel),
        "SendCtrlAltDel: the VM is not started; InstanceStart first"
    );
    let files = Files::new();
    let (mut c, calls) = started(&files);
    c.handle(VmmAction::Pause).unwrap();
    assert!(refused(&mut c, VmmAction::SendCtrlAltDel).contains("resume it first"));
    c.handle(VmmAction::Resume).unwrap();
    c.handle(VmmAction::SendCtrlAltDel).unwrap();
    assert_eq!(calls.borrow().log.last().unwrap(), "ctrl-alt-del");
}

#[test]
fn missing_files_and_bad_values_are_refused_and_not_kept() {
    let files = Files::new();
    let (mut c, _) = controller();
    let boot = VmmAction::PutBootSource(BootSource {
        kernel_image_path: files.path("missing"),
        boot_args: None,
        initrd_path: None,
    });
    let err = refused(&mut c, boot);
    assert!(
        err.starts_with("boot-source.kernel_image_path: cannot open"),
        "{err}"
    );
    let bad = VmmAction::PutMachineConfig(MachineConfig {
        vcpu_count: 0,
        ..MachineConfig::default()
    });
    assert_eq!(
        refused(&mut c, bad),
        "machine-config.vcpu_count: 0 is out of range; use 1 to 32"
    );
    match c.handle(VmmAction::GetVmConfig).unwrap() {
        VmmData::VmConfig(config) => {
            assert!(config.boot_source.is_none());
            assert_eq!(config.machine_config, MachineConfig::default());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_second_root_device_is_refused() {
    let files = Files::new();
    let (mut c, _) = controller();
    c.handle(files.drive("root", true)).unwrap();
    assert_eq!(
        refused(&mut c, files.drive("other", true)),
        "drives[1].is_root_device: drive \"root\" is the root device already; only one drive can be"
    );
    // PUT with the same id replaces the drive.
    c.handle(files.drive("root", false)).unwrap();
    c.handle(files.drive("other", true)).unwrap();
}

#[test]
fn drive_patch_updates_the_config_before_start_and_swaps_after() {
    let files = Files::new();
    let (mut c, calls) = started(&files);
    let patch = |id: &str, path: PathBuf| {
        VmmAction::PatchDrive(DrivePatch {
            drive_id: id.into(),
            path_on_host: Some(path),
            rate_limiter: None,
        })
    };
    c.handle(patch("root", files.path("other.img"))).unwrap();
    let swap = calls.borrow().log.last().unwrap().clone();
    assert_eq!(
        swap,
        format!("swap root {}", files.path("other.img").display())
    );
    assert!(refused(&mut c, patch("nope", files.path("other.img")))
        .starts_with("drives: no drive \"nope\""));
    let (mut c, _) = controller();
    assert!(refused(&mut c, patch("root", files.path("other.img"))).starts_with("drives: no drive"));
    c.handle(files.drive("root", true)).unwrap();
    let err = refused(&mut c, patch("root", files.path("missing.img")));
    assert!(
        err.starts_with("drives[root].path_on_host: cannot open"),
        "{err}"
    );
}

#[test]
fn network_patch_is_honest_about_rate_limiters() {
    let (mut c, _) = controller();
    c.handle(VmmAction::PutNetworkInterface(NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
        guest_mac: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }))
    .unwrap();
    let patch = VmmAction::PatchNetworkInterface(api::requests::NetworkInterfacePatch {
        iface_id: "eth0".into(),
        rx_rate_limiter: Some(serde_json::json!({})),
        tx_rate_limiter: None,
    });
    assert!(refused(&mut c, patch).contains("rate limiters are not supported"));
}

#[test]
fn metrics_flush_writes_a_line_and_counts_requests() {
    let files = Files::new();
    let (mut c, _) = controller();
    assert_eq!(
        refused(&mut c, VmmAction::FlushMetrics),
        "FlushMetrics: no metrics destination; PUT /metrics first"
    );
    let path = files.path("metrics.json");
    c.handle(VmmAction::PutMetrics(MetricsConfig {
        metrics_path: path.clone(),
    }))
    .unwrap();
    c.handle(VmmAction::FlushMetrics).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(line["api"]["requests"], 2);
    assert_eq!(line["api"]["failures"], 1);
    assert!(c.next_flush_in_ms() > 0);
}

/// The metrics lines in `path`, parsed.
fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A config file's text with our files, and `extra` sections.
fn config_file(files: &Files, extra: &str) -> VmConfig {
    let text = format!(
        r#"{{"boot-source": {{"kernel_image_path": {:?}}},
            "drives": [{{"drive_id": "root", "path_on_host": {:?}, "is_root_device": true}}]
            {extra}}}"#,
        files.path("vmlinux"),
        files.path("disk.img"),
    );
    let config = VmConfig::from_json(&text).unwrap();
    config.validate().unwrap();
    config
}

#[test]
fn config_file_logger_and_metrics_are_the_api_actions() {
    let files = Files::new();
    let (log, metrics) = (files.path("ember.log"), files.path("metrics.json"));
    let config = config_file(
        &files,
        &format!(
            r#", "logger": {{"log_path": {log:?}, "level": "Info", "show_level": true}},
                 "metrics": {{"metrics_path": {metrics:?}}}"#
        ),
    );
    let (mut c, calls) = controller();
    rpc::preconfigure(&mut c, &config).unwrap();
    assert_eq!(c.state(), VmState::Running);
    assert_eq!(calls.borrow().log, ["launch"]);
    // The logger is global: other tests running now may add their lines too.
    let text = std::fs::read_to_string(&log).unwrap();
    for line in [
        "[Info] PutMetrics: done",
        "[Info] PutBootSource: done",
        "[Info] PutDrive: done",
        "[Info] InstanceStart: done",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
    // The destination is open and empty until a flush; the first periodic one is due
    // within the period.
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), "");
    let due = c.next_flush_in_ms();
    assert!(due > 0 && due <= 60_000, "{due}");
    c.handle(VmmAction::FlushMetrics).unwrap();
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 1);
    // The config file's actions are not API requests (and FlushMetrics is counted once
    // answered, after its line).
    assert_eq!(lines[0]["api"]["requests"], 0);
    // As Firecracker's GET /vm/config, the logger and metrics sections are not shown.
    match c.handle(VmmAction::GetVmConfig).unwrap() {
        VmmData::VmConfig(shown) => {
            assert_eq!(
                (shown.logger.as_ref(), shown.metrics.as_ref()),
                (None, None)
            );
            assert_eq!(shown.drives, config.drives);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_file_refusals_name_the_section_and_still_flush_metrics() {
    let files = Files::new();
    let (mut c, calls) = controller();
    let config = config_file(
        &files,
        r#", "logger": {"log_path": "/nonexistent/dir/ember.log"}"#,
    );
    match rpc::preconfigure(&mut c, &config).unwrap_err() {
        PreconfigureError::Refused(e) => assert_eq!(
            e.0,
            "logger.log_path: cannot open /nonexistent/dir/ember.log for writing: No such \
             file or directory (os error 2); give a writable file, or a FIFO with a reader"
        ),
        other => panic!("{other:?}"),
    }
    let metrics = files.path("metrics.json");
    let mut config = config_file(
        &files,
        &format!(r#", "metrics": {{"metrics_path": {metrics:?}}}"#),
    );
    config.drives[0].path_on_host = files.path("missing.img");
    match rpc::preconfigure(&mut c, &config).unwrap_err() {
        PreconfigureError::Refused(e) => assert!(
            e.0.starts_with("drives[root].path_on_host: cannot open"),
            "{}",
            e.0
        ),
        other => panic!("{other:?}"),
    }
    assert!(calls.borrow().log.is_empty(), "never launched");
    // ember ends on a refusal: the metrics destination gets its last line.
    assert_eq!(metrics_lines(&metrics).len(), 1);
}

#[test]
fn empty_paths_are_refused_on_the_api_too() {
    let (mut c, _) = controller();
    let metrics = VmmAction::PutMetrics(MetricsConfig {
        metrics_path: PathBuf::new(),
    });
    assert_eq!(refused(&mut c, metrics), "metrics.metrics_path: empty path");
    let logger = VmmAction::PutLogger(LoggerConfig {
        log_path: Some(PathBuf::new()),
        ..Default::default()
    });
    assert_eq!(refused(&mut c, logger), "logger.log_path: empty path");
}

/// Starts a VM from a config file that names a metrics destination.
fn started_with_metrics(files: &Files) -> (Controller<FakeMachine>, Rc<RefCell<Calls>>, PathBuf) {
    let metrics = files.path("metrics.json");
    let config = config_file(
        files,
        &format!(r#", "metrics": {{"metrics_path": {metrics:?}}}"#),
    );
    let (mut c, calls) = controller();
    rpc::preconfigure(&mut c, &config).unwrap();
    (c, calls, metrics)
}

#[test]
fn the_vm_ending_writes_a_last_metrics_line() {
    let files = Files::new();
    let (mut c, calls, metrics) = started_with_metrics(&files);
    calls.borrow_mut().stop_in_round = Some(3);
    // As with --no-api: no API thread, so nothing ever arrives.
    let (_, requests) = std::sync::mpsc::channel();
    assert_eq!(
        rpc::run(&mut c, &requests).unwrap(),
        VmOutcome::GuestStopped
    );
    let calls = calls.borrow();
    assert_eq!(calls.rounds.len(), 3);
    // The loop wakes up in time for the periodic flush.
    assert!(
        calls.rounds.iter().all(|&t| (0..=60_000).contains(&t)),
        "{:?}",
        calls.rounds
    );
    assert_eq!(metrics_lines(&metrics).len(), 1);
}

#[test]
fn ctrl_alt_del_from_the_api_ends_the_vm_with_a_last_metrics_line() {
    let files = Files::new();
    let (mut c, calls, metrics) = started_with_metrics(&files);
    let (tx, requests) = std::sync::mpsc::channel();
    let (reply, answer) = std::sync::mpsc::channel();
    tx.send(ApiRequest {
        action: VmmAction::SendCtrlAltDel,
        reply,
    })
    .unwrap();
    assert_eq!(
        rpc::run(&mut c, &requests).unwrap(),
        VmOutcome::GuestStopped
    );
    assert_eq!(answer.recv().unwrap(), Ok(VmmData::Empty));
    assert_eq!(calls.borrow().log, ["launch", "ctrl-alt-del"]);
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["api"]["requests"], 1, "SendCtrlAltDel is counted");
}

#[test]
fn a_failing_vm_still_writes_a_last_metrics_line() {
    let files = Files::new();
    let (mut c, calls, metrics) = started_with_metrics(&files);
    calls.borrow_mut().fail = true;
    let (_tx, requests) = std::sync::mpsc::channel();
    let err = rpc::run(&mut c, &requests).unwrap_err();
    assert!(matches!(err, RunError::Vmm(VmmError::NotStarted)), "{err}");
    assert_eq!(metrics_lines(&metrics).len(), 1);
}

#[test]
fn without_a_metrics_destination_the_loop_waits_for_events_only() {
    let files = Files::new();
    let (mut c, calls) = started(&files);
    calls.borrow_mut().stop_in_round = Some(1);
    let (_tx, requests) = std::sync::mpsc::channel();
    rpc::run(&mut c, &requests).unwrap();
    assert_eq!(calls.borrow().rounds, [-1]);
}

fn create(path: &str, kind: api::requests::SnapshotType) -> VmmAction {
    VmmAction::CreateSnapshot(api::requests::SnapshotCreateParams {
        snapshot_type: kind,
        snapshot_path: format!("{path}.state").into(),
        mem_file_path: format!("{path}.mem").into(),
    })
}

fn load(resume_vm: bool, track_dirty_pages: bool) -> VmmAction {
    VmmAction::LoadSnapshot(api::requests::SnapshotLoadParams {
        snapshot_path: "s.state".into(),
        mem_backend: None,
        mem_file_path: Some("s.mem".into()),
        track_dirty_pages,
        resume_vm,
        network_overrides: Vec::new(),
        vsock_override: None,
    })
}

fn with_restorer(
    c: Controller<FakeMachine>,
    calls: &Rc<RefCell<Calls>>,
) -> Controller<FakeMachine> {
    let for_restore = calls.clone();
    c.with_restorer(Box::new(move |params| {
        let call = format!("restore {}", params.snapshot_path.display());
        for_restore.borrow_mut().log.push(call);
        Ok((FakeMachine(for_restore.clone()), restored_config(params)))
    }))
}

/// What a restorer reports of a VM saved with two vCPUs, a drive, an interface on TAP
/// `tap0` and vsock on CID 3 at `/run/v.sock`, with the load's overrides applied.
fn restored_config(params: &api::requests::SnapshotLoadParams) -> VmConfig {
    let host_dev_name = params
        .network_overrides
        .iter()
        .find(|o| o.iface_id == "eth0")
        .map_or("tap0".into(), |o| o.host_dev_name.clone());
    let vsock = params.vsock_override.as_ref();
    VmConfig {
        machine_config: MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            track_dirty_pages: params.track_dirty_pages,
            ..MachineConfig::default()
        },
        drives: vec![Drive {
            drive_id: "root".into(),
            path_on_host: "/images/root.ext4".into(),
            is_root_device: false,
            is_read_only: true,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: None,
            rate_limiter: None,
            socket: None,
        }],
        network_interfaces: vec![NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name,
            guest_mac: Some("06:00:ac:10:00:02".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }],
        vsock: Some(VsockConfig {
            vsock_id: None,
            guest_cid: vsock.and_then(|v| v.guest_cid).unwrap_or(3),
            uds_path: vsock.map_or("/run/v.sock".into(), |v| v.uds_path.clone()),
        }),
        ..VmConfig::default()
    }
}

fn vm_config(c: &mut Controller<FakeMachine>) -> VmConfig {
    match c.handle(VmmAction::GetVmConfig) {
        Ok(VmmData::VmConfig(config)) => *config,
        other => panic!("{other:?}"),
    }
}

#[test]
fn snapshots_are_created_only_from_a_paused_vm() {
    use api::requests::SnapshotType::{Diff, Full};
    let files = Files::new();
    let (mut c, calls) = controller();
    assert!(refused(&mut c, create("a", Full)).contains("not started"));
    c.handle(files.boot()).unwrap();
    c.handle(files.drive("root", true)).unwrap();
    c.handle(VmmAction::InstanceStart).unwrap();
    let running = refused(&mut c, create("a", Full));
    assert!(
        running.contains("the VM is running; pause it first"),
        "{running}"
    );
    c.handle(VmmAction::Pause).unwrap();
    let diff = refused(&mut c, create("a", Diff));
    assert!(diff.contains("enable track_dirty_pages"), "{diff}");
    c.handle(create("a", Full)).unwrap();
    assert!(calls
        .borrow()
        .log
        .contains(&"snapshot Full a.state a.mem".to_string()));
    assert!(refused(&mut c, load(true, false)).contains("fresh ember process"));
}

#[test]
fn diff_snapshots_reach_a_vm_that_tracks_dirty_pages() {
    use api::requests::SnapshotType::Diff;
    let files = Files::new();
    let (mut c, calls) = controller();
    c.handle(VmmAction::PutMachineConfig(MachineConfig {
        track_dirty_pages: true,
        ..MachineConfig::default()
    }))
    .unwrap();
    c.handle(files.boot()).unwrap();
    c.handle(files.drive("root", true)).unwrap();
    c.handle(VmmAction::InstanceStart).unwrap();
    c.handle(VmmAction::Pause).unwrap();
    c.handle(create("d", Diff)).unwrap();
    assert!(calls
        .borrow()
        .log
        .contains(&"snapshot Diff d.state d.mem".to_string()));
}

#[test]
fn snapshots_load_only_into_a_fresh_controller() {
    let files = Files::new();
    let (c, calls) = controller();
    let mut c = with_restorer(c, &calls);
    c.handle(load(false, false)).unwrap();
    assert_eq!(c.state(), VmState::Paused);
    assert!(calls.borrow().log.contains(&"restore s.state".to_string()));
    assert_eq!(c.config.machine_config.vcpu_count, 2);
    c.handle(VmmAction::Resume).unwrap();
    assert_eq!(c.state(), VmState::Running);

    let (c, calls) = controller();
    let mut c = with_restorer(c, &calls);
    c.handle(files.boot()).unwrap();
    let configured = refused(&mut c, load(true, false));
    assert!(configured.contains("nothing configured"), "{configured}");

    let (c, calls) = controller();
    let mut c = with_restorer(c, &calls);
    c.handle(load(true, false)).unwrap();
    assert_eq!(c.state(), VmState::Running);
}

#[test]
fn vm_config_after_a_load_shows_the_restored_vm_with_its_overrides() {
    let files = Files::new();
    let (c, calls) = controller();
    let mut c = with_restorer(c, &calls);
    let metrics = files.path("metrics.json");
    c.handle(VmmAction::PutMetrics(MetricsConfig {
        metrics_path: metrics.clone(),
    }))
    .unwrap();
    let VmmAction::LoadSnapshot(mut params) = load(false, true) else {
        unreachable!()
    };
    params.network_overrides = vec![api::requests::NetworkOverride {
        iface_id: "eth0".into(),
        host_dev_name: "tap7".into(),
    }];
    params.vsock_override = Some(api::requests::VsockOverride {
        uds_path: "/run/clone.sock".into(),
        guest_cid: Some(9),
    });
    c.handle(VmmAction::LoadSnapshot(params)).unwrap();

    let config = vm_config(&mut c);
    assert_eq!(config.boot_source, None, "a loaded VM did not boot");
    assert_eq!(config.machine_config.vcpu_count, 2);
    assert_eq!(config.machine_config.mem_size_mib, 256);
    assert!(config.machine_config.track_dirty_pages);
    assert_eq!(config.drives[0].drive_id, "root");
    assert_eq!(config.network_interfaces[0].host_dev_name, "tap7");
    let vsock = config.vsock.as_ref().unwrap();
    assert_eq!(
        (vsock.guest_cid, vsock.uds_path.as_path()),
        (9, Path::new("/run/clone.sock"))
    );
    c.handle(VmmAction::FlushMetrics).unwrap();
    assert_eq!(
        metrics_lines(&metrics).len(),
        1,
        "the destination set before the load"
    );
    match c.handle(VmmAction::GetMachineConfig) {
        Ok(VmmData::MachineConfig(m)) => assert!(m.track_dirty_pages && m.vcpu_count == 2),
        other => panic!("{other:?}"),
    }
    // The Firecracker JSON: boot-source absent, the devices present.
    let json = serde_json::to_value(vm_config(&mut c)).unwrap();
    assert!(json.get("boot-source").is_none(), "{json}");
    assert_eq!(json["network-interfaces"][0]["host_dev_name"], "tap7");
    assert_eq!(json["machine-config"]["track_dirty_pages"], true);

    // The drive the VM has can be swapped, and the config follows.
    c.handle(VmmAction::PatchDrive(DrivePatch {
        drive_id: "root".into(),
        path_on_host: Some(files.path("other.img")),
        rate_limiter: None,
    }))
    .unwrap();
    assert_eq!(
        vm_config(&mut c).drives[0].path_on_host,
        files.path("other.img")
    );
}

#[test]
fn configuration_changes_after_a_load_are_refused_and_say_why() {
    let files = Files::new();
    let (c, calls) = controller();
    let mut c = with_restorer(c, &calls);
    c.handle(load(false, false)).unwrap();
    let before = vm_config(&mut c);
    let boot = refused(&mut c, files.boot());
    assert!(boot.contains("loaded from a snapshot"), "{boot}");
    assert!(boot.starts_with("boot-source: "), "{boot}");
    for (action, expect) in [
        (
            VmmAction::PutMachineConfig(MachineConfig::default()),
            "machine-config cannot change",
        ),
        (
            VmmAction::PatchMachineConfig(MachineConfigPatch::default()),
            "machine-config cannot change",
        ),
        (files.drive("data", false), "drives cannot be added"),
        (
            VmmAction::PutNetworkInterface(NetworkInterface {
                iface_id: "eth1".into(),
                host_dev_name: "tap1".into(),
                guest_mac: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }),
            "network_overrides",
        ),
        (
            VmmAction::PutVsock(VsockConfig {
                vsock_id: None,
                guest_cid: 4,
                uds_path: "/v".into(),
            }),
            "vsock_override",
        ),
    ] {
        let message = refused(&mut c, action);
        assert!(message.contains(expect), "{message}");
        assert!(message.contains("loaded from a snapshot"), "{message}");
    }
    let start = refused(&mut c, VmmAction::InstanceStart);
    assert!(start.contains("loaded from a snapshot"), "{start}");
    assert!(refused(&mut c, load(true, false)).contains("fresh ember process"));
    assert_eq!(vm_config(&mut c), before, "nothing refused was kept");
    assert_eq!(calls.borrow().log, ["restore s.state"]);
}

#[test]
fn a_failed_load_leaves_the_controller_fresh() {
    let (c, calls) = controller();
    let mut c = c.with_restorer(Box::new(|params| {
        Err(VmmError::Snapshot(crate::persist::PersistError::Request(
            format!("cannot open {}", params.snapshot_path.display()),
        )))
    }));
    let message = refused(&mut c, load(true, false));
    assert!(
        message.starts_with("snapshot/load: cannot open s.state"),
        "{message}"
    );
    assert_eq!(c.state(), VmState::NotStarted);
    assert_eq!(vm_config(&mut c), VmConfig::default());
    assert!(calls.borrow().log.is_empty());
}

#[test]
fn one_file_under_two_spellings_is_the_same_file() {
    assert!(same_file(Path::new("s"), Path::new("./s")));
    assert!(same_file(Path::new("d/./s"), Path::new("d/s")));
    assert!(!same_file(Path::new("s.state"), Path::new("s.mem")));
    let dir = std::env::temp_dir().join(format!("ember-same-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("real")).unwrap();
    std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
    std::fs::write(dir.join("real/snap"), b"x").unwrap();
    std::fs::write(dir.join("real/other"), b"x").unwrap();
    assert!(same_file(&dir.join("real/snap"), &dir.join("link/snap")));
    assert!(!same_file(&dir.join("real/snap"), &dir.join("link/other")));
    let _ = std::fs::remove_dir_all(&dir);
}
