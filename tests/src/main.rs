//! `ember-testbed`: runs a command where KVM can boot a stock guest (directly on hardware
//! virtualization, else in the nested test bed) and passes its output and exit status on.
//!
//! `ember-testbed [--share DIR]... [--timeout SECS] [--memory MIB] -- COMMAND [ARGS...]`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
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
    if cli.command.is_empty() {
        return fail("no command given; usage: ember-testbed [OPTIONS] -- COMMAND [ARGS...]");
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

fn fail(message: &str) -> ExitCode {
    eprintln!("ember-testbed: {message}");
    ExitCode::from(125)
}
