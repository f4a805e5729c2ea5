//! `ember`: command-line flags in Firecracker's shape -> configuration -> VM -> exit code.
//!
//! With `--api-sock PATH` the VM is configured and driven over the API socket
//! ([`vmm::rpc`]); a `--config-file` then pre-configures it through the same actions and
//! boots it at once. With `--no-api --config-file PATH` there is no socket: the same
//! controller and loop run without the API thread, so the file's `logger` and `metrics`
//! sections mean the same on both paths (metrics lines every 60 s and as the VM ends).
//!
//! Exit codes: 0 the guest stopped itself (power-off, reboot); 1 the VM failed while being
//! built or run; 2 the command line or configuration is wrong (the message names the flag,
//! field or file); 148 a thread made a system call its seccomp filter forbids (the line on
//! stderr names the thread and the call; see [`vmm::seccomp`]).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::channel;
use std::time::Instant;

use api::models::{LogLevel, VmConfig};
use clap::Parser;
use vmm::rpc::{self, logger, server, Controller, Launcher, PreconfigureError, Restorer, RunError};
use vmm::{seccomp, VmOutcome, Vmm, VmmError, VmmOptions};
use vmm_sys_util::eventfd::EventFd;

const EXIT_GUEST_STOPPED: u8 = 0;
const EXIT_VM_FAILED: u8 = 1;
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "ember",
    version,
    about = "Ember: a small, fast microVM monitor"
)]
struct Cli {
    /// Firecracker-format JSON configuration (boot-source, machine-config, ...); with the
    /// API socket it pre-configures the VM and boots it at once.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Run without the API socket; the VM boots straight from --config-file.
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// Path of the API socket (HTTP/1.1, Firecracker's paths and bodies).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    api_sock: Option<PathBuf>,
    /// Print the time from process start to the guest's boot-complete signal (stderr).
    #[arg(long)]
    boot_timer: bool,
    /// Name of this microVM instance.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Run without the per-thread seccomp filters (for debugging a filter that is too
    /// strict; never in production).
    #[arg(long)]
    no_seccomp: bool,
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    let code = match run(&cli, process_start) {
        Ok(VmOutcome::GuestStopped) => EXIT_GUEST_STOPPED,
        Ok(VmOutcome::GuestTripleFault { vcpu, state }) => {
            report(&format!(
                "the guest triple-faulted (crash or reboot=t) on vCPU {vcpu}: {state}"
            ));
            EXIT_GUEST_STOPPED
        }
        Ok(VmOutcome::Failed { vcpu, message }) => {
            report(&format!("vCPU {vcpu}: {message}"));
            EXIT_VM_FAILED
        }
        Err(Failure::Config(message)) => {
            report(&message);
            EXIT_BAD_CONFIG
        }
        Err(Failure::Host(message)) => {
            report(&message);
            EXIT_VM_FAILED
        }
        Err(Failure::Vmm(e)) => {
            report(&e.to_string());
            if e.is_config_error() {
                EXIT_BAD_CONFIG
            } else {
                EXIT_VM_FAILED
            }
        }
    };
    // No destructors run from here on: the sockets ember bound are removed by hand.
    vmm::bound_sockets::remove_all();
    // vCPU threads may still sit in KVM_RUN; leaving the process ends them.
    std::process::exit(i32::from(code));
}

/// Ember's last words: on stderr always, and in the log file when one is set.
fn report(message: &str) {
    eprintln!("ember: {message}");
    logger::log_to_file(LogLevel::Error, "main", message);
}

enum Failure {
    Config(String),
    Vmm(VmmError),
    /// Ember itself could not go on (exit 1).
    Host(String),
}

fn run(cli: &Cli, process_start: Instant) -> Result<VmOutcome, Failure> {
    seccomp::set_enabled(!cli.no_seccomp);
    if !cli.no_seccomp {
        seccomp::install_sigsys_handler().map_err(|e| Failure::Host(e.to_string()))?;
    }
    let options = VmmOptions {
        process_start,
        print_boot_time: cli.boot_timer,
    };
    let config_file = cli.config_file.as_deref();
    match (cli.api_sock.as_deref(), cli.no_api) {
        (Some(socket), _) => {
            let config = config_file.map(read_config).transpose()?;
            run_vmm(cli, Some(socket), config, options)
        }
        (None, true) => {
            let path = config_file
                .ok_or_else(|| Failure::Config("--no-api needs --config-file PATH".into()))?;
            let config = read_config(path)?;
            run_vmm(cli, None, Some(config), options)
        }
        (None, false) => Err(Failure::Config(
            "give --api-sock PATH to serve the API, or --no-api --config-file PATH to boot \
             without it"
                .into(),
        )),
    }
}

fn read_config(path: &Path) -> Result<VmConfig, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("cannot read config file {}: {e}", path.display())))?;
    let config = VmConfig::from_json(&text)
        .map_err(|e| Failure::Config(format!("config file {}: {e}", path.display())))?;
    // Unsupported sections are refused here, before anything happens; the rest is checked
    // section by section as the config becomes actions.
    config
        .validate()
        .map_err(|e| Failure::Config(e.to_string()))?;
    Ok(config)
}

/// Runs the VMM thread's loop: with `socket`, the API thread serves it; `config` boots the
/// VM at once. `--no-api` is the same without the API thread, so the config file, metrics
/// and logger work the same way on both.
fn run_vmm(
    cli: &Cli,
    socket: Option<&Path>,
    config: Option<VmConfig>,
    options: VmmOptions,
) -> Result<VmOutcome, Failure> {
    let api = socket.map(ApiSocket::bind).transpose()?;
    let wake = api.as_ref().map(|a| a.wake_for_vmm()).transpose()?;
    let restore_wake = wake
        .as_ref()
        .map(EventFd::try_clone)
        .transpose()
        .map_err(|e| Failure::Vmm(VmmError::EventFd("API requests", e)))?;
    let mut controller = Controller::new(cli.id.clone(), launcher(options, wake))
        .with_restorer(restorer(options, restore_wake));
    // Without the API thread the sender is dropped: no request ever arrives.
    let (requests_tx, requests) = channel();
    if let Some(api) = api {
        let counters = controller.metrics().api.clone();
        server::spawn(api.listener, requests_tx, api.wake, counters)
            .map_err(|e| Failure::Host(e.to_string()))?;
    }
    if let Some(config) = config {
        rpc::preconfigure(&mut controller, &config).map_err(|e| match e {
            PreconfigureError::Refused(fault) => Failure::Config(fault.0),
            PreconfigureError::Start(e) => Failure::Vmm(e),
        })?;
    }
    rpc::run(&mut controller, &requests).map_err(|e| match e {
        RunError::Vmm(e) => Failure::Vmm(e),
        RunError::ApiGone => Failure::Host(e.to_string()),
    })
}

/// The API socket, and the eventfd its thread writes after each request.
struct ApiSocket {
    listener: UnixListener,
    wake: EventFd,
}

impl ApiSocket {
    fn bind(socket: &Path) -> Result<Self, Failure> {
        let listener = server::bind(socket).map_err(|e| Failure::Config(e.to_string()))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Failure::Vmm(VmmError::EventFd("API requests", e)))?;
        Ok(Self { listener, wake })
    }

    /// The VMM's copy of the request signal, for its event loop to wake on.
    fn wake_for_vmm(&self) -> Result<EventFd, Failure> {
        self.wake
            .try_clone()
            .map_err(|e| Failure::Vmm(VmmError::EventFd("API requests", e)))
    }
}

/// Builds and starts the VM on InstanceStart; `wake` (the API's request signal) wakes its
/// event loop.
fn launcher(options: VmmOptions, wake: Option<EventFd>) -> Launcher<Vmm> {
    Box::new(move |config| {
        let mut vmm = Vmm::build(config, options, Box::new(std::io::stdout()))?;
        if let Some(wake) = &wake {
            let wake = wake
                .try_clone()
                .map_err(|e| VmmError::EventFd("API requests", e))?;
            vmm.add_wakeup(wake);
        }
        vmm.start()?;
        Ok(vmm)
    })
}

/// Builds a VM from a snapshot on `PUT /snapshot/load` and starts it running or paused.
/// Everything is restored before [`Vmm::start`] installs the VMM thread's seccomp filter, so
/// that filter needs none of the calls restoring makes.
fn restorer(options: VmmOptions, wake: Option<EventFd>) -> Restorer<Vmm> {
    Box::new(move |params| {
        let mut vmm = Vmm::load_snapshot(params, options, Box::new(std::io::stdout()))?;
        // Described before the vCPUs run: the devices as restored, overrides applied.
        let config = vmm.restored_config()?;
        if let Some(wake) = &wake {
            let wake = wake
                .try_clone()
                .map_err(|e| VmmError::EventFd("API requests", e))?;
            vmm.add_wakeup(wake);
        }
        if params.resume_vm {
            vmm.start()?;
        } else {
            vmm.start_paused()?;
        }
        Ok((vmm, config))
    })
}
