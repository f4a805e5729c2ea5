#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::*;

fn fault(method: &str, path: &str, body: &str) -> RouteError {
    route(method, path, body.as_bytes()).unwrap_err()
}

#[test]
fn every_endpoint_routes() {
    let cases: [(&str, &str, &str, VmmAction); 8] = [
        ("GET", "/", "", VmmAction::GetInstanceInfo),
        ("GET", "/version", "", VmmAction::GetVersion),
        ("GET", "/vm/config", "", VmmAction::GetVmConfig),
        ("GET", "/machine-config", "", VmmAction::GetMachineConfig),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            VmmAction::InstanceStart,
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
            VmmAction::SendCtrlAltDel,
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#,
            VmmAction::FlushMetrics,
        ),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#, VmmAction::Pause),
    ];
    for (method, path, body, expected) in cases {
        assert_eq!(route(method, path, body.as_bytes()), Ok(expected), "{path}");
    }
    assert_eq!(
        route("PATCH", "/vm", br#"{"state": "Resumed"}"#),
        Ok(VmmAction::Resume)
    );
    let bodies = [
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        ),
        ("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#),
        (
            "PUT",
            "/drives/root",
            r#"{"drive_id": "root", "path_on_host": "/r", "is_root_device": true}"#,
        ),
        (
            "PATCH",
            "/drives/root",
            r#"{"drive_id": "root", "path_on_host": "/s"}"#,
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0"}"#,
        ),
        ("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/v"}"#),
        (
            "PUT",
            "/logger",
            r#"{"log_path": "/l", "level": "Info", "show_level": true, "show_log_origin": false}"#,
        ),
        ("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
    ];
    for (method, path, body) in bodies {
        assert!(route(method, path, body.as_bytes()).is_ok(), "{path}");
    }
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let err = fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}"#,
    );
    assert_eq!(err.status, 400);
    assert!(
        err.message
            .starts_with("machine-config.vcpus: unknown field `vcpus`"),
        "{err}"
    );
    let err = fault("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
    assert!(
        err.message
            .starts_with("actions.action_type: unknown variant `Reboot`"),
        "{err}"
    );
}

#[test]
fn wrong_types_and_bad_json_are_named() {
    let err = fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
    );
    assert!(
        err.message
            .starts_with("machine-config.vcpu_count: invalid type: string \"two\""),
        "{err}"
    );
    let err = fault("PUT", "/boot-source", "{\"kernel_image_path\": ");
    assert!(
        err.message
            .starts_with("boot-source.kernel_image_path: EOF while parsing"),
        "{err}"
    );
    let err = fault("PUT", "/boot-source", "");
    assert_eq!(err.message, "boot-source: the request needs a JSON body");
    let err = fault("PATCH", "/vm", r#"{"state": "Stopped"}"#);
    assert!(
        err.message
            .starts_with("vm.state: unknown variant `Stopped`"),
        "{err}"
    );
}

#[test]
fn ids_in_path_and_body_must_match() {
    let err = fault(
        "PUT",
        "/drives/a",
        r#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": false}"#,
    );
    assert_eq!(
        err.message,
        r#"drive_id: the path names "a" but the body names "b"; they must match"#
    );
    let err = fault(
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth1"}"#,
    );
    assert!(err.message.starts_with("iface_id: the path names"), "{err}");
}

#[test]
fn wrong_methods_are_400_and_unknown_paths_404() {
    let err = fault("GET", "/actions", "");
    assert_eq!(
        (err.status, err.message.as_str()),
        (400, "GET is not allowed on /actions; use PUT")
    );
    let err = fault("DELETE", "/drives/a", "");
    assert_eq!(
        err.message,
        "DELETE is not allowed on /drives/a; use PUT or PATCH"
    );
    let err = fault("PUT", "/", "{}");
    assert_eq!(err.message, "PUT is not allowed on /; use GET");
    let err = fault("GET", "/balloon", "");
    assert_eq!(
        (err.status, err.message.as_str()),
        (404, "no API resource at /balloon")
    );
}

#[test]
fn machine_config_patch_changes_only_given_fields() {
    let base = MachineConfig {
        vcpu_count: 2,
        mem_size_mib: 256,
        ..MachineConfig::default()
    };
    let patch = MachineConfigPatch {
        mem_size_mib: Some(512),
        ..MachineConfigPatch::default()
    };
    let out = patch.apply(&base);
    assert_eq!((out.vcpu_count, out.mem_size_mib), (2, 512));
}

#[test]
fn log_levels_accept_firecracker_spellings() {
    for (text, level) in [
        ("\"Warning\"", LogLevel::Warning),
        ("\"warn\"", LogLevel::Warning),
        ("\"info\"", LogLevel::Info),
        ("\"Off\"", LogLevel::Off),
        ("\"TRACE\"", LogLevel::Trace),
        ("\"Error\"", LogLevel::Error),
    ] {
        assert_eq!(serde_json::from_str::<LogLevel>(text).unwrap(), level);
    }
    assert!(LogLevel::Error < LogLevel::Debug);
}

#[test]
fn config_file_becomes_the_same_actions() {
    let config = VmConfig::from_json(
        r#"{"boot-source": {"kernel_image_path": "/k"},
            "drives": [{"drive_id": "r", "path_on_host": "/r", "is_root_device": true}],
            "vsock": {"guest_cid": 3, "uds_path": "/v"},
            "metrics": {"metrics_path": "/m"},
            "logger": {"log_path": "/l", "level": "Info", "show_level": true}}"#,
    )
    .unwrap();
    let actions = actions_from_config(&config);
    // Logger and metrics first, as the same actions PUT /logger and PUT /metrics become.
    let logger = route(
        "PUT",
        "/logger",
        br#"{"log_path": "/l", "level": "Info", "show_level": true}"#,
    )
    .unwrap();
    let metrics = route("PUT", "/metrics", br#"{"metrics_path": "/m"}"#).unwrap();
    assert_eq!(actions[..2], [logger, metrics]);
    assert!(matches!(actions[2], VmmAction::PutBootSource(_)));
    assert!(matches!(actions[3], VmmAction::PutMachineConfig(_)));
    assert!(matches!(actions[4], VmmAction::PutDrive(_)));
    assert!(matches!(actions[5], VmmAction::PutVsock(_)));
    assert_eq!(actions.len(), 6);
}

#[test]
fn logger_and_metrics_bodies_fail_alike_in_the_api_and_the_config_file() {
    let cases = [
        (
            "/logger",
            "logger",
            r#"{"log_path": "/l", "colour": true}"#,
            "logger.colour: unknown field `colour`, expected one of `log_path`, `level`, \
             `show_level`, `show_log_origin`, `module`",
        ),
        (
            "/logger",
            "logger",
            r#"{"level": "Loud"}"#,
            "logger.level: unknown level \"Loud\"; use Off, Error, Warning, Info, Debug or Trace",
        ),
        (
            "/metrics",
            "metrics",
            r#"{"metrics_path": "/m", "format": "json"}"#,
            "metrics.format: unknown field `format`, expected `metrics_path`",
        ),
        (
            "/metrics",
            "metrics",
            r#"{}"#,
            "metrics: missing field `metrics_path`",
        ),
    ];
    for (path, section, body, expected) in cases {
        let api = fault("PUT", path, body);
        assert_eq!(api.status, 400);
        let file = VmConfig::from_json(&format!(r#"{{"{section}": {body}}}"#))
            .unwrap_err()
            .to_string();
        // Only the position in the text differs.
        for message in [&api.message, &file] {
            let (text, position) = message.split_once(" at line 1 column ").unwrap();
            assert_eq!(text, expected, "{path}: {message}");
            assert!(position.parse::<u32>().is_ok(), "{message}");
        }
    }
}

#[test]
fn answers_become_responses() {
    assert_eq!(VmmData::Empty.into_response().status, 204);
    let version = VmmData::Version(VersionInfo {
        firecracker_version: "0.1.0".into(),
    })
    .into_response();
    assert_eq!(version.status, 200);
    assert_eq!(version.body.unwrap(), r#"{"firecracker_version":"0.1.0"}"#);
}

#[test]
fn snapshot_bodies_route_in_firecrackers_shapes() {
    let create = route(
        "PUT",
        "/snapshot/create",
        br#"{"snapshot_type": "Full", "snapshot_path": "s", "mem_file_path": "m"}"#,
    )
    .unwrap();
    assert_eq!(
        create,
        VmmAction::CreateSnapshot(SnapshotCreateParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: "s".into(),
            mem_file_path: "m".into(),
        })
    );
    let body =
        br#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"},
        "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
        "vsock_override": {"uds_path": "v.sock"}}"#;
    let VmmAction::LoadSnapshot(load) = route("PUT", "/snapshot/load", body).unwrap() else {
        panic!("not a load");
    };
    assert_eq!(load.mem_file().unwrap(), &PathBuf::from("m"));
    assert!(load.resume_vm && !load.track_dirty_pages);
    assert_eq!(load.network_overrides[0].host_dev_name, "tap1");
    let old = br#"{"snapshot_path": "s", "mem_file_path": "m"}"#;
    let VmmAction::LoadSnapshot(load) = route("PUT", "/snapshot/load", old).unwrap() else {
        panic!("not a load");
    };
    assert_eq!(load.mem_file().unwrap(), &PathBuf::from("m"));
    let none = fault("PUT", "/snapshot/load", r#"{"snapshot_path": "s"}"#);
    assert!(none.message.contains("mem_backend is missing"), "{none}");
    let uffd =
        r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}}"#;
    assert!(fault("PUT", "/snapshot/load", uffd)
        .message
        .contains("Uffd is not supported"));
    assert_eq!(fault("GET", "/snapshot/create", "").status, 400);
}

#[test]
fn the_vsock_override_may_give_a_new_cid() {
    let load = |cid: &str| {
        format!(
            r#"{{"snapshot_path": "s", "mem_file_path": "m",
            "vsock_override": {{"uds_path": "v.sock"{cid}}}}}"#
        )
    };
    let VmmAction::LoadSnapshot(plain) =
        route("PUT", "/snapshot/load", load("").as_bytes()).unwrap()
    else {
        panic!("not a load");
    };
    assert_eq!(plain.vsock_override.unwrap().guest_cid, None);
    let with_cid = load(r#", "guest_cid": 4294967294"#);
    let VmmAction::LoadSnapshot(cid) = route("PUT", "/snapshot/load", with_cid.as_bytes()).unwrap()
    else {
        panic!("not a load");
    };
    let cid = cid.vsock_override.unwrap();
    assert_eq!(cid.guest_cid, Some(u64::from(u32::MAX) - 1));
    // Firecracker's tools never see the extension: absent, it is not written either.
    let firecracker = serde_json::to_value(VsockOverride {
        guest_cid: None,
        ..cid
    })
    .unwrap();
    assert_eq!(firecracker, serde_json::json!({"uds_path": "v.sock"}));
    for (bad, why) in [
        ("2", "2 is out of range; use 3 to 4294967294"),
        ("4294967295", "4294967295 is out of range"),
        ("4294967296", "4294967296 is out of range"),
        ("-1", "invalid value"),
        ("\"7\"", "invalid type"),
    ] {
        let body = load(&format!(r#", "guest_cid": {bad}"#));
        let err = fault("PUT", "/snapshot/load", &body);
        assert_eq!(err.status, 400);
        assert!(
            err.message
                .starts_with("snapshot/load.vsock_override.guest_cid: ")
                && err.message.contains(why),
            "{bad}: {err}"
        );
    }
}
