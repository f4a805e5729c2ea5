//! emberctl: drives Ember VMs from the host. The subcommands here talk to ember-init's agent
//! in the guest, through the VM's vsock Unix socket (`--vsock`, the vsock device's
//! `uds_path`) or, for tests, an `ember-init --agent-unix` socket (`--agent-unix`).
//! The subcommands for the VMM's API socket (`--api PATH`, see `api_cmd`) sit beside them,
//! and `clone` (see `clone`), which starts embers of its own.
//!
//! Exit status: `exec` exits with the command's status (128 + N when signal N ended it), 127
//! when the program does not exist in the guest, 126 when it cannot be executed, and 255
//! when emberctl itself failed. `clone` stopped by SIGINT, SIGTERM or SIGHUP while cloning
//! exits with 128 + N too. The other subcommands exit with 0 or 1.

mod api_cmd;
mod clone;
mod cp;
mod exec;
mod signals;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::agent::{self, AgentClient};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "emberctl",
    version,
    about = "Drive Ember microVMs from the host"
)]
struct Cli {
    /// The VMM's API socket (ember --api-sock), for the API subcommands.
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// Print API answers (and clone's list) as JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in the guest, streaming its output; exit with its status.
    Exec(exec::ExecArgs),
    /// Copy a file into or out of the guest; `vm:PATH` names the guest side.
    Cp(cp::CpArgs),
    /// Check that the guest agent answers.
    Ping(PingArgs),
    /// Wait until the guest agent is ready; print the guest uptime (ms) at which it was.
    WaitReady(WaitReadyArgs),
    /// Ask the guest to sync its filesystems and power off (the VM then ends).
    Shutdown(PingArgs),
    /// Ask the guest to reboot (on Ember without ACPI this also ends the VM).
    Reboot(PingArgs),
    /// Load one snapshot into N new ember processes, each with its own API socket, vsock
    /// socket, guest CID and TAPs; they keep running after emberctl exits.
    Clone(clone::CloneArgs),
    #[command(flatten)]
    Api(api_cmd::ApiCommand),
}

/// Where the agent is.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct AgentTarget {
    /// The VM's vsock Unix socket (the vsock device's uds_path).
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// An agent served by `ember-init --agent-unix PATH` (host tests).
    #[arg(long, value_name = "PATH")]
    agent_unix: Option<PathBuf>,
}

impl AgentTarget {
    pub fn client(&self) -> AgentClient {
        match (&self.vsock, &self.agent_unix) {
            (Some(path), _) => AgentClient::vsock(path),
            (None, Some(path)) => AgentClient::unix(path),
            // clap requires one of the two.
            (None, None) => AgentClient::vsock("vsock.sock"),
        }
    }
}

#[derive(Args)]
struct PingArgs {
    #[command(flatten)]
    target: AgentTarget,
}

#[derive(Args)]
struct WaitReadyArgs {
    /// The VM's vsock Unix socket (the vsock device's uds_path).
    #[arg(long, value_name = "PATH")]
    vsock: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Exec(args) => exec::run(&args),
        Command::Cp(args) => report(cp::run(&args)),
        Command::Ping(args) => report(ping(&args)),
        Command::WaitReady(args) => report(wait_ready(&args)),
        Command::Shutdown(args) => report(args.target.client().shutdown()),
        Command::Reboot(args) => report(args.target.client().reboot()),
        Command::Clone(args) => clone::run(&args, cli.json),
        Command::Api(api_cmd::ApiCommand::Snapshot(api_cmd::SnapshotCommand::Merge(args))) => {
            api_cmd::merge(&args)
        }
        Command::Api(command) => {
            match &cli.api {
                Some(socket) => api_cmd::run(socket, cli.json, command),
                None => {
                    eprintln!("emberctl: this subcommand talks to the API socket; give --api PATH before it");
                    2
                }
            }
        }
    };
    ExitCode::from(code)
}

/// 0, or 1 after printing the error.
fn report(result: Result<(), agent::AgentError>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("emberctl: {e}");
            1
        }
    }
}

fn ping(args: &PingArgs) -> Result<(), agent::AgentError> {
    let started = Instant::now();
    let pong = args.target.client().ping()?;
    println!(
        "agent ember-init {} (protocol {}): up {} ms, ready at {} ms; round trip {:.1} ms",
        pong.version,
        pong.protocol,
        pong.uptime_ms,
        pong.boot_ms,
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

fn wait_ready(args: &WaitReadyArgs) -> Result<(), agent::AgentError> {
    let boot_ms = agent::wait_ready(&args.vsock, args.timeout)?;
    println!("{boot_ms}");
    Ok(())
}

/// Seconds, fractions allowed: `2`, `0.5`.
pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{text:?} is not a usable number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_secs("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_secs("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }

    #[test]
    fn exactly_one_agent_target() {
        assert!(Cli::try_parse_from(["emberctl", "ping"]).is_err());
        assert!(
            Cli::try_parse_from(["emberctl", "ping", "--vsock", "a", "--agent-unix", "b"]).is_err()
        );
        let cli = Cli::try_parse_from(["emberctl", "ping", "--agent-unix", "b"]).unwrap();
        let Command::Ping(args) = cli.command else {
            panic!("not ping")
        };
        assert_eq!(
            args.target.client().endpoint(),
            &agent::Endpoint::Unix("b".into())
        );
    }

    #[test]
    fn api_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "emberctl", "--api", "a.sock", "--json", "drive", "add", "root", "/r.ext4", "--root",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Api(api_cmd::ApiCommand::Drive(_))
        ));
        for args in [
            &["status"][..],
            &["machine-config", "--vcpus", "2", "--mem", "256"],
            &["boot-source", "--kernel", "k", "--args", "console=ttyS0"],
            &["metrics", "flush"],
            &["put", "/actions", r#"{"action_type":"InstanceStart"}"#],
            &["snapshot", "create", "s.state", "s.mem"],
            &["snapshot", "create", "s.state", "d.mem", "--diff"],
            &[
                "snapshot",
                "load",
                "s.state",
                "s.mem",
                "--track-dirty-pages",
            ],
            &["machine-config", "--track-dirty-pages"],
            &[
                "snapshot",
                "load",
                "s.state",
                "s.mem",
                "--resume",
                "--tap",
                "eth0=tap1",
                "--vsock-uds",
                "v.sock",
                "--vsock-cid",
                "9",
            ],
        ] {
            let all = ["emberctl", "--api", "a.sock"].iter().chain(args);
            assert!(Cli::try_parse_from(all).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn clone_parses_with_json_anywhere() {
        let cli = Cli::try_parse_from([
            "emberctl", "clone", "s.state", "s.mem", "-n", "20", "--dir", "c", "--json",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Clone(_)));
    }

    #[test]
    fn snapshot_merge_needs_no_api_socket() {
        let cli = Cli::try_parse_from([
            "emberctl", "snapshot", "merge", "--base", "a.mem", "--diff", "b.mem",
        ])
        .unwrap();
        assert!(cli.api.is_none());
        assert!(matches!(
            cli.command,
            Command::Api(api_cmd::ApiCommand::Snapshot(
                api_cmd::SnapshotCommand::Merge(_)
            ))
        ));
        let missing = Cli::try_parse_from(["emberctl", "snapshot", "merge", "--base", "a.mem"]);
        assert!(missing.is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
