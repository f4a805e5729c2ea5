//! `ember-testbed`: runs a command where KVM can boot a stock guest (directly on hardware
//! virtualization, else in the nested test bed) and passes its output and exit status on.
//!
//! `ember-testbed [--share DIR]... [--timeout SECS] [--memory MIB] -- COMMAND [ARGS...]`
//! `ember-testbed [--timeout SECS] [--memory MIB] [--profile NAME] --test NAME...`
//!
//! With `--test`, it builds those integration tests of this package and runs them one after
//! the other in a single job: in the nested test bed that is one level-1 VM for the lot
//! instead of one per test (a level-1 boot costs seconds under TCG), which is how `make test`
//! runs the suites that boot guests.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use testbed::{shell_quote, Job};

#[derive(Parser, Debug)]
#[command(
    name = "ember-testbed",
    about = "Run a command where KVM can boot stock guests"
)]
struct Cli {
    /// A host directory the command may write to (repeatable). The current directory is
    /// always shared.
    #[arg(long, value_name = "DIR")]
    share: Vec<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Memory of the nested test bed's VM in MiB.
    #[arg(long, default_value_t = 3072)]
    memory: u32,
    /// Print where the command runs (direct or nested) and exit.
    #[arg(long)]
    show_placement: bool,
    /// Build this integration test of the ember-tests package and run it, with the others
    /// named, in one job (repeatable; instead of a command).
    #[arg(long = "test", value_name = "NAME", conflicts_with = "command")]
    tests: Vec<String>,
    /// The cargo profile the tests named by `--test` are built with.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "test-release",
        requires = "tests"
    )]
    profile: String,
    /// The command and its arguments.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.show_placement {
        return match testbed::placement() {
            Ok(p) => {
                println!("{p:?}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if !cli.tests.is_empty() {
        return match suites(&cli.tests, &cli.profile) {
            Ok(job) => finish(
                job.timeout(Duration::from_secs(cli.timeout))
                    .memory_mib(cli.memory),
            ),
            Err(e) => fail(&e),
        };
    }
    if cli.command.is_empty() {
        return fail(
            "no command given; usage: ember-testbed [OPTIONS] -- COMMAND [ARGS...] \
             or ember-testbed [OPTIONS] --test NAME...",
        );
    }
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => return fail(&format!("cannot read the current directory: {e}")),
    };
    let words: Vec<String> = cli
        .command
        .iter()
        .map(|w| shell_quote(std::path::Path::new(w)))
        .collect();
    let script = format!("cd {}\n{}", shell_quote(&cwd), words.join(" "));
    let mut job = Job::new("cli", script)
        .share(cwd.clone())
        .timeout(Duration::from_secs(cli.timeout))
        .memory_mib(cli.memory);
    for dir in cli.share {
        job = job.share(cwd.join(dir));
    }
    finish(job)
}

/// Runs `job` and passes its output and exit status on.
fn finish(job: Job) -> ExitCode {
    match job.run() {
        Ok(out) => {
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            let _ = std::io::stdout().flush();
            ExitCode::from(u8::try_from(out.status).unwrap_or(1))
        }
        Err(e) => fail(&e),
    }
}

/// A job that runs the named integration tests of this package one after the other, each with
/// one test thread and its output shown as it comes (as the per-test jobs ran them: a test
/// that a time limit ends has said what it got to), and fails if any failed, naming them.
fn suites(names: &[String], profile: &str) -> Result<Job, String> {
    let root = testbed::repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&root)
        .args([
            "test",
            "--profile",
            profile,
            "-p",
            "ember-tests",
            "--no-run",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit());
    for name in names {
        build.args(["--test", name]);
    }
    let out = build
        .output()
        .map_err(|e| format!("cannot run cargo to build the tests: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the tests {names:?} failed (cargo said why above)"
        ));
    }
    let executables = test_executables(&String::from_utf8_lossy(&out.stdout));
    let mut script = String::from("failed=\n");
    for name in names {
        let exe = executables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, exe)| exe)
            .ok_or_else(|| format!("cargo built no test executable named {name}"))?;
        script += &format!(
            "echo \"=== {name}\"\n{} --test-threads=1 --nocapture || failed=\"$failed {name}\"\n",
            shell_quote(exe)
        );
    }
    script += "if [ -n \"$failed\" ]; then echo \"=== failed:$failed\"; exit 1; fi\n\
               echo \"=== all passed\"\n";
    // The tests make their own jobs' directories (run in place here) beside this one.
    Ok(Job::new("suites", script).share(root.join("target/testbed/jobs")))
}

/// (test target name, executable) for each test cargo built, from its JSON messages.
fn test_executables(messages: &str) -> Vec<(String, PathBuf)> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_string();
            let exe = m["executable"].as_str()?;
            Some((name, PathBuf::from(exe)))
        })
        .collect()
}

fn fail(message: &str) -> ExitCode {
    eprintln!("ember-testbed: {message}");
    ExitCode::from(125)
}
