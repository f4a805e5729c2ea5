//! `emberctl exec`: runs a command in the guest with its output streamed live to emberctl's
//! stdout and stderr. Input is forwarded only with `--stdin` (as `docker exec -i`), so a
//! script that loops over its own stdin never has it swallowed by a guest command. With
//! `--tty --stdin` on a terminal, the local terminal goes raw for the duration so keys reach
//! the guest unprocessed. Interrupting emberctl closes the connection, and the agent kills
//! the command.

use std::io::{self, IsTerminal, Read, Write};
use std::time::Duration;

use api::agent::{AgentError, ErrorCode, Exec, ExecControl, ExitStatus, OutputStream};
use clap::Args;

use crate::terminal::RawTerminal;
use crate::{parse_secs, AgentTarget};

/// emberctl's own failures, kept apart from the command's statuses.
const EXIT_EMBERCTL_FAILED: u8 = 255;
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_NOT_EXECUTABLE: u8 = 126;
/// 128 + SIGPIPE: what a shell reports when the reader of a pipe went away.
const EXIT_BROKEN_PIPE: u8 = 141;

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    target: AgentTarget,
    /// Add a variable to the command's environment (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Run on a pseudo-terminal in the guest (stderr then arrives on stdout).
    #[arg(long, short = 't')]
    tty: bool,
    /// Forward emberctl's stdin to the command; without it the command reads /dev/null.
    #[arg(long, short = 'i')]
    stdin: bool,
    /// End the command after SECS seconds: SIGTERM, then SIGKILL after --kill-grace.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Seconds between SIGTERM and SIGKILL on timeout (default 2).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    kill_grace: Option<Duration>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    argv: Vec<String>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("{text:?} is not K=V")),
    }
}

/// Runs the command; returns emberctl's exit status.
pub fn run(args: &ExecArgs) -> u8 {
    match execute(args) {
        Ok(status) => {
            if status.timed_out {
                eprintln!(
                    "emberctl: the command ran past its timeout and was stopped ({})",
                    describe(&status)
                );
            }
            u8::try_from(status.shell_code()).unwrap_or(EXIT_EMBERCTL_FAILED)
        }
        Err(e) => failure_code(&e),
    }
}

fn describe(status: &ExitStatus) -> String {
    match (status.code, status.signal) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "unknown status".into(),
    }
}

/// Prints the error (except a closed output pipe) and picks the exit status.
fn failure_code(error: &AgentError) -> u8 {
    if let AgentError::Local { error, .. } = error {
        if error.kind() == io::ErrorKind::BrokenPipe {
            return EXIT_BROKEN_PIPE;
        }
    }
    eprintln!("emberctl: {error}");
    match error.code() {
        Some(ErrorCode::NotFound) => EXIT_NOT_FOUND,
        Some(ErrorCode::Permission) => EXIT_NOT_EXECUTABLE,
        _ => EXIT_EMBERCTL_FAILED,
    }
}

fn build(args: &ExecArgs) -> Exec {
    let mut exec = Exec::new(args.argv.iter().cloned())
        .stdin(args.stdin)
        .tty(args.tty);
    for (key, value) in &args.env {
        exec = exec.env(key, value);
    }
    if let Some(cwd) = &args.cwd {
        exec = exec.cwd(cwd);
    }
    if let Some(timeout) = args.timeout {
        exec = exec.timeout(timeout);
    }
    if let Some(grace) = args.kill_grace {
        exec = exec.kill_grace(grace);
    }
    exec
}

fn execute(args: &ExecArgs) -> Result<ExitStatus, AgentError> {
    let running = args.target.client().start(&build(args))?;
    // Raw only once the command runs, and restored (on drop) before any error is printed.
    let _raw = (args.tty && args.stdin && io::stdin().is_terminal())
        .then(RawTerminal::enable)
        .and_then(Result::ok);
    if args.stdin {
        let control = running.control();
        std::thread::spawn(move || forward_stdin(&control));
    }
    running.wait(print_output)
}

fn print_output(stream: OutputStream, data: &[u8]) -> io::Result<()> {
    match stream {
        OutputStream::Stdout => {
            let mut out = io::stdout().lock();
            out.write_all(data)?;
            out.flush()
        }
        OutputStream::Stderr => io::stderr().lock().write_all(data),
    }
}

/// Copies stdin to the command as it comes (a keystroke at a time on a raw terminal).
fn forward_stdin(control: &ExecControl) {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let sent = if n == 0 {
            control.close_stdin()
        } else {
            control.write_stdin(&buf[..n])
        };
        if n == 0 || sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        exec: ExecArgs,
    }

    fn parse(args: &[&str]) -> Result<ExecArgs, clap::Error> {
        let argv = std::iter::once("exec").chain(args.iter().copied());
        Wrapper::try_parse_from(argv).map(|w| w.exec)
    }

    #[test]
    fn command_after_double_dash_keeps_its_flags() {
        let args = parse(&[
            "--vsock",
            "v.sock",
            "-e",
            "A=1=2",
            "--timeout",
            "1.5",
            "--",
            "ls",
            "-l",
            "--all",
        ])
        .unwrap();
        assert_eq!(args.argv, ["ls", "-l", "--all"]);
        assert_eq!(args.env, [("A".to_string(), "1=2".to_string())]);
        let request = build(&args);
        let request = request.request();
        assert_eq!(request.timeout_ms, Some(1500));
        assert!(!request.stdin && !request.tty);
    }

    #[test]
    fn needs_a_command_and_well_formed_env() {
        assert!(parse(&["--vsock", "v.sock"]).is_err());
        assert!(parse(&["--vsock", "v.sock", "-e", "NOEQUALS", "--", "true"]).is_err());
        assert!(parse(&["--vsock", "v.sock", "-e", "=v", "--", "true"]).is_err());
    }

    #[test]
    fn failure_codes() {
        let remote = |code| AgentError::Remote {
            op: "exec",
            code,
            message: "m".into(),
        };
        assert_eq!(failure_code(&remote(ErrorCode::NotFound)), EXIT_NOT_FOUND);
        assert_eq!(
            failure_code(&remote(ErrorCode::Permission)),
            EXIT_NOT_EXECUTABLE
        );
        assert_eq!(failure_code(&remote(ErrorCode::Io)), EXIT_EMBERCTL_FAILED);
        let pipe = AgentError::Local {
            what: "w".into(),
            error: io::ErrorKind::BrokenPipe.into(),
        };
        assert_eq!(failure_code(&pipe), EXIT_BROKEN_PIPE);
    }
}
