//! emberctl's API subcommands: each becomes one request to the VMM's API socket
//! (`--api PATH`), with a short human answer, or the JSON body with `--json`.

use std::path::PathBuf;

use api::client::{ApiClient, ApiResponse, ClientError};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum ApiCommand {
    /// Show the VM's id and state (GET /).
    Status,
    /// Show the VM's configuration (GET /vm/config).
    Config,
    /// Show Ember's version (GET /version).
    Version,
    /// Set the kernel, initrd and command line (PUT /boot-source).
    BootSource(BootSourceArgs),
    /// Show, set or change vCPUs and memory (GET, PUT or PATCH /machine-config).
    MachineConfig(MachineArgs),
    /// Add or change a drive (PUT or PATCH /drives/ID).
    #[command(subcommand)]
    Drive(DriveCommand),
    /// Add a network interface on a host TAP (PUT /network-interfaces/ID).
    #[command(subcommand)]
    Net(NetCommand),
    /// Configure the vsock device (PUT /vsock).
    #[command(subcommand)]
    Vsock(VsockCommand),
    /// Boot the VM (PUT /actions InstanceStart).
    Start,
    /// Pause the vCPUs (PATCH /vm Paused).
    Pause,
    /// Resume paused vCPUs (PATCH /vm Resumed).
    Resume,
    /// Press Ctrl-Alt-Del: ember-init powers the guest off (PUT /actions SendCtrlAltDel).
    CtrlAltDel,
    /// Set where metrics go, or write them now (PUT /metrics, PUT /actions FlushMetrics).
    #[command(subcommand)]
    Metrics(MetricsCommand),
    /// Send Ember's log lines to a file or FIFO (PUT /logger).
    #[command(subcommand)]
    Logger(LoggerCommand),
    /// Save a paused VM, or load one into a fresh ember (PUT /snapshot/create, /snapshot/load).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Raw request: GET PATH.
    Get(RawArgs),
    /// Raw request: PUT PATH JSON.
    Put(RawArgs),
    /// Raw request: PATCH PATH JSON.
    Patch(RawArgs),
}

#[derive(Args)]
pub struct BootSourceArgs {
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// The kernel command line (Ember's default without it).
    #[arg(long, value_name = "ARGS")]
    args: Option<String>,
}

#[derive(Args)]
pub struct MachineArgs {
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    #[arg(long, value_name = "MIB")]
    mem: Option<usize>,
    /// Track dirty pages, for Diff snapshots.
    #[arg(long)]
    track_dirty_pages: bool,
}

#[derive(Subcommand)]
pub enum DriveCommand {
    /// Add or replace a drive before the VM starts.
    Add {
        id: String,
        path: PathBuf,
        /// Boot from this drive (root=/dev/vda).
        #[arg(long)]
        root: bool,
        #[arg(long)]
        read_only: bool,
        /// Honour guest flushes (cache_type Writeback).
        #[arg(long)]
        writeback: bool,
        #[arg(long)]
        partuuid: Option<String>,
    },
    /// Point a drive at another file (after start: swapped live).
    Update { id: String, path: PathBuf },
}

#[derive(Subcommand)]
pub enum NetCommand {
    Add {
        id: String,
        /// The host TAP device.
        tap: String,
        #[arg(long)]
        mac: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum VsockCommand {
    Set {
        #[arg(long, value_name = "N")]
        cid: u64,
        /// The host Unix socket (uds_path).
        #[arg(long, value_name = "PATH")]
        uds: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum MetricsCommand {
    /// Write metrics lines to PATH (a file or a FIFO with a reader).
    Set { path: PathBuf },
    /// Write a metrics line now.
    Flush,
}

#[derive(Subcommand)]
pub enum LoggerCommand {
    Set {
        path: PathBuf,
        /// Error, Warning, Info, Debug or Trace.
        #[arg(long, default_value = "Info")]
        level: String,
        #[arg(long)]
        show_level: bool,
        #[arg(long)]
        show_origin: bool,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write a snapshot of the paused VM: its state to STATE, its memory to MEM.
    Create {
        state: PathBuf,
        mem: PathBuf,
        /// A Diff snapshot: MEM holds only the pages written since the last snapshot (needs
        /// track_dirty_pages); merge it onto that snapshot's memory file before loading.
        #[arg(long)]
        diff: bool,
    },
    /// Load a snapshot into this ember, which must have nothing configured yet.
    Load {
        state: PathBuf,
        mem: PathBuf,
        /// Let the vCPUs run once loaded (otherwise the VM is loaded paused).
        #[arg(long)]
        resume: bool,
        /// Track dirty pages from here on, for Diff snapshots of the loaded VM.
        #[arg(long)]
        track_dirty_pages: bool,
        /// Put interface IFACE on host TAP device TAP (repeatable).
        #[arg(long = "tap", value_name = "IFACE=TAP")]
        taps: Vec<String>,
        /// The vsock device's new Unix socket path.
        #[arg(long, value_name = "PATH")]
        vsock_uds: Option<PathBuf>,
        /// A new guest CID (an Ember extension of vsock_override; needs --vsock-uds).
        #[arg(long, value_name = "N", requires = "vsock_uds")]
        vsock_cid: Option<u64>,
    },
    /// Merge a Diff snapshot's memory file onto the memory file of the snapshot it follows,
    /// in place; then load the diff's state file with BASE. Works on files: no --api needed.
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The memory file of the snapshot the diff follows (changed in place).
    #[arg(long, value_name = "BASE_MEM")]
    base: PathBuf,
    /// The Diff snapshot's memory file.
    #[arg(long, value_name = "DIFF_MEM")]
    diff: PathBuf,
}

/// `snapshot merge`: 0, or 1 after printing why not.
pub fn merge(args: &MergeArgs) -> u8 {
    match api::memfile::merge_diff(&args.base, &args.diff) {
        Ok(stats) => {
            println!(
                "merged {} bytes in {} regions of {} onto {}",
                stats.bytes,
                stats.regions,
                args.diff.display(),
                args.base.display()
            );
            0
        }
        Err(e) => {
            eprintln!("emberctl: snapshot merge: {e}");
            1
        }
    }
}

#[derive(Args)]
pub struct RawArgs {
    /// The API path, e.g. /machine-config.
    path: String,
    /// The JSON body.
    body: Option<String>,
}

/// One request: method, path, body, and what to say on success.
struct Call {
    method: &'static str,
    path: String,
    body: Option<Value>,
    done: &'static str,
}

fn call(method: &'static str, path: impl Into<String>, body: Value, done: &'static str) -> Call {
    Call {
        method,
        path: path.into(),
        body: Some(body),
        done,
    }
}

fn get(path: &str) -> Call {
    Call {
        method: "GET",
        path: path.into(),
        body: None,
        done: "",
    }
}

fn action(kind: &str, done: &'static str) -> Call {
    call("PUT", "/actions", json!({ "action_type": kind }), done)
}

impl ApiCommand {
    fn into_call(self) -> Result<Call, String> {
        Ok(match self {
            ApiCommand::Status => get("/"),
            ApiCommand::Config => get("/vm/config"),
            ApiCommand::Version => get("/version"),
            ApiCommand::BootSource(a) => {
                let mut body = json!({ "kernel_image_path": a.kernel });
                if let Some(initrd) = a.initrd {
                    body["initrd_path"] = json!(initrd);
                }
                if let Some(args) = a.args {
                    body["boot_args"] = json!(args);
                }
                call("PUT", "/boot-source", body, "boot source set")
            }
            ApiCommand::MachineConfig(a) => machine_call(&a),
            ApiCommand::Drive(d) => drive_call(d),
            ApiCommand::Net(NetCommand::Add { id, tap, mac }) => {
                let mut body = json!({ "iface_id": id, "host_dev_name": tap });
                if let Some(mac) = mac {
                    body["guest_mac"] = json!(mac);
                }
                call(
                    "PUT",
                    format!("/network-interfaces/{id}"),
                    body,
                    "interface set",
                )
            }
            ApiCommand::Vsock(VsockCommand::Set { cid, uds }) => call(
                "PUT",
                "/vsock",
                json!({ "guest_cid": cid, "uds_path": uds }),
                "vsock set",
            ),
            ApiCommand::Start => action("InstanceStart", "started"),
            ApiCommand::Pause => call("PATCH", "/vm", json!({ "state": "Paused" }), "paused"),
            ApiCommand::Resume => call("PATCH", "/vm", json!({ "state": "Resumed" }), "resumed"),
            ApiCommand::CtrlAltDel => action("SendCtrlAltDel", "Ctrl-Alt-Del sent"),
            ApiCommand::Metrics(MetricsCommand::Set { path }) => call(
                "PUT",
                "/metrics",
                json!({ "metrics_path": path }),
                "metrics set",
            ),
            ApiCommand::Metrics(MetricsCommand::Flush) => action("FlushMetrics", "metrics flushed"),
            ApiCommand::Logger(LoggerCommand::Set {
                path,
                level,
                show_level,
                show_origin,
            }) => call(
                "PUT",
                "/logger",
                json!({ "log_path": path, "level": level, "show_level": show_level,
                        "show_log_origin": show_origin }),
                "logger set",
            ),
            ApiCommand::Snapshot(command) => snapshot_call(command)?,
            ApiCommand::Get(raw) => get(&raw.path),
            ApiCommand::Put(raw) => raw_call("PUT", raw)?,
            ApiCommand::Patch(raw) => raw_call("PATCH", raw)?,
        })
    }
}

fn machine_call(a: &MachineArgs) -> Call {
    let tracking = a.track_dirty_pages;
    match (a.vcpus, a.mem) {
        (None, None) if !tracking => get("/machine-config"),
        (Some(vcpus), Some(mem)) => call(
            "PUT",
            "/machine-config",
            json!({ "vcpu_count": vcpus, "mem_size_mib": mem, "track_dirty_pages": tracking }),
            "machine config set",
        ),
        (vcpus, mem) => {
            let mut body = json!({});
            if tracking {
                body["track_dirty_pages"] = json!(true);
            }
            if let Some(v) = vcpus {
                body["vcpu_count"] = json!(v);
            }
            if let Some(m) = mem {
                body["mem_size_mib"] = json!(m);
            }
            call("PATCH", "/machine-config", body, "machine config changed")
        }
    }
}

fn drive_call(command: DriveCommand) -> Call {
    match command {
        DriveCommand::Add {
            id,
            path,
            root,
            read_only,
            writeback,
            partuuid,
        } => {
            let mut body = json!({
                "drive_id": id, "path_on_host": path, "is_root_device": root,
                "is_read_only": read_only,
                "cache_type": if writeback { "Writeback" } else { "Unsafe" },
            });
            if let Some(p) = partuuid {
                body["partuuid"] = json!(p);
            }
            call("PUT", format!("/drives/{id}"), body, "drive set")
        }
        DriveCommand::Update { id, path } => call(
            "PATCH",
            format!("/drives/{id}"),
            json!({ "drive_id": id, "path_on_host": path }),
            "drive updated",
        ),
    }
}

fn snapshot_call(command: SnapshotCommand) -> Result<Call, String> {
    Ok(match command {
        SnapshotCommand::Create { state, mem, diff } => call(
            "PUT",
            "/snapshot/create",
            json!({ "snapshot_type": if diff { "Diff" } else { "Full" },
                    "snapshot_path": state, "mem_file_path": mem }),
            if diff {
                "diff snapshot created"
            } else {
                "snapshot created"
            },
        ),
        SnapshotCommand::Merge(_) => {
            return Err("snapshot merge works on files, not through the API socket".into())
        }
        SnapshotCommand::Load {
            state,
            mem,
            resume,
            track_dirty_pages,
            taps,
            vsock_uds,
            vsock_cid,
        } => {
            let overrides = taps
                .iter()
                .map(|t| match t.split_once('=') {
                    Some((iface, tap)) if !iface.is_empty() && !tap.is_empty() => {
                        Ok(json!({ "iface_id": iface, "host_dev_name": tap }))
                    }
                    _ => Err(format!("--tap {t}: give IFACE=TAP, e.g. eth0=tap1")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut body = json!({
                "snapshot_path": state,
                "mem_backend": { "backend_type": "File", "backend_path": mem },
                "resume_vm": resume,
                "track_dirty_pages": track_dirty_pages,
            });
            if !overrides.is_empty() {
                body["network_overrides"] = json!(overrides);
            }
            if let Some(uds) = vsock_uds {
                body["vsock_override"] = json!({ "uds_path": uds });
                if let Some(cid) = vsock_cid {
                    body["vsock_override"]["guest_cid"] = json!(cid);
                }
            }
            let done = if resume {
                "snapshot loaded, running"
            } else {
                "snapshot loaded, paused"
            };
            call("PUT", "/snapshot/load", body, done)
        }
    })
}

fn raw_call(method: &'static str, raw: RawArgs) -> Result<Call, String> {
    let body = match raw.body {
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| format!("the JSON body does not parse: {e}"))?
        }
        None => json!({}),
    };
    Ok(call(method, raw.path, body, "done"))
}

/// Runs one API subcommand; 0 on success, 1 after printing why not.
pub fn run(socket: &PathBuf, json_output: bool, command: ApiCommand) -> u8 {
    let call = match command.into_call() {
        Ok(call) => call,
        Err(e) => {
            eprintln!("emberctl: {e}");
            return 1;
        }
    };
    match send(socket, &call) {
        Ok(response) => show(&call, &response, json_output),
        Err(e) => {
            eprintln!("emberctl: {e}");
            1
        }
    }
}

fn send(socket: &PathBuf, call: &Call) -> Result<ApiResponse, ClientError> {
    let body = call.body.as_ref().map(Value::to_string);
    let mut client = ApiClient::new(socket);
    if call.path.starts_with("/snapshot/") {
        // Writing or mapping a large guest's memory can take longer than other requests.
        client = client.with_timeout(std::time::Duration::from_secs(900));
    }
    client.request(call.method, &call.path, body.as_deref())
}

fn show(call: &Call, response: &ApiResponse, json_output: bool) -> u8 {
    if !response.is_success() {
        if json_output {
            println!("{}", response.body);
        }
        eprintln!(
            "emberctl: {} {} failed ({}): {}",
            call.method,
            call.path,
            response.status,
            response.fault_message()
        );
        return 1;
    }
    match (json_output, response.body.is_empty()) {
        (true, true) => println!("{{}}"),
        (true, false) => println!("{}", response.body),
        (false, true) => println!("{}", call.done),
        (false, false) => println!("{}", friendly(&call.path, &response.body)),
    }
    0
}

/// A short human rendering of a GET answer.
fn friendly(path: &str, body: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return body.to_string();
    };
    let text = |key: &str| value[key].as_str().unwrap_or("?").to_string();
    match path {
        "/" => format!(
            "{}: {} ({} {})",
            text("id"),
            text("state"),
            text("app_name"),
            text("vmm_version")
        ),
        "/version" => text("firecracker_version"),
        _ => serde_json::to_string_pretty(&value).unwrap_or_else(|_| body.to_string()),
    }
}
