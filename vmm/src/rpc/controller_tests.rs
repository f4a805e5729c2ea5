#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use api::models::{BootSource, Drive, MachineConfig, NetworkInterface, VsockConfig};
use api::requests::{DrivePatch, MachineConfigPatch, MetricsConfig};

use super::*;

/// What the fake machine was asked to do.
#[derive(Default)]
struct Calls {
    log: Vec<String>,
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
    fn device_counters(&self) -> DeviceCounters {
        DeviceCounters::default()
    }
    fn exit_counters(&self) -> Arc<VcpuExitCounters> {
        Arc::default()
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
