//! `ember`: command-line flags in Firecracker's shape -> configuration -> VM -> exit code.
//!
//! Exit codes: 0 the guest stopped itself (power-off, reboot); 1 the VM failed while being
//! built or run; 2 the command line or configuration is wrong (the message names the flag,
//! field or file).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use api::models::VmConfig;
use clap::Parser;
use vmm::{VmOutcome, Vmm, VmmError, VmmOptions};

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
    /// Firecracker-format JSON configuration (boot-source, machine-config, ...).
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Run without the API socket; the VM boots straight from --config-file.
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// Path of the API socket.
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    api_sock: Option<PathBuf>,
    /// Print the time from process start to the guest's boot-complete signal (stderr).
    #[arg(long)]
    boot_timer: bool,
    /// Name of this microVM instance.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    let code = match run(&cli, process_start) {
        Ok(VmOutcome::GuestStopped) => EXIT_GUEST_STOPPED,
        Ok(VmOutcome::GuestTripleFault { vcpu, state }) => {
            eprintln!(
                "ember: the guest triple-faulted (crash or reboot=t) on vCPU {vcpu}: {state}"
            );
            EXIT_GUEST_STOPPED
        }
        Ok(VmOutcome::Failed { vcpu, message }) => {
            eprintln!("ember: vCPU {vcpu}: {message}");
            EXIT_VM_FAILED
        }
        Err(Failure::Config(message)) => {
            eprintln!("ember: {message}");
            EXIT_BAD_CONFIG
        }
        Err(Failure::Vmm(e)) => {
            eprintln!("ember: {e}");
            if e.is_config_error() {
                EXIT_BAD_CONFIG
            } else {
                EXIT_VM_FAILED
            }
        }
    };
    // vCPU threads may still sit in KVM_RUN; leaving the process ends them.
    std::process::exit(i32::from(code));
}

enum Failure {
    Config(String),
    Vmm(VmmError),
}

fn run(cli: &Cli, process_start: Instant) -> Result<VmOutcome, Failure> {
    if !cli.no_api {
        return Err(Failure::Config(
            "the API socket is not available in this version yet; run with --no-api --config-file PATH"
                .into(),
        ));
    }
    let path = cli
        .config_file
        .as_ref()
        .ok_or_else(|| Failure::Config("--no-api needs --config-file PATH".into()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("cannot read config file {}: {e}", path.display())))?;
    let config = VmConfig::from_json(&text)
        .map_err(|e| Failure::Config(format!("config file {}: {e}", path.display())))?;
    let options = VmmOptions {
        process_start,
        print_boot_time: cli.boot_timer,
    };
    let vmm = Vmm::build(&config, options, Box::new(std::io::stdout())).map_err(Failure::Vmm)?;
    vmm.run().map_err(Failure::Vmm)
}
