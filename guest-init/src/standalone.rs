//! ember-init when it is not PID 1: `ember-init --agent-unix PATH` serves only the agent, on
//! a Unix socket at PATH, so that the agent and its host client can be tested on the host.
//! The process reaps like PID 1 does: it makes itself a child subreaper, so that orphans of
//! its commands come back to it as they would to init, and one reaper woken by SIGCHLD
//! collects them all. It stops on SIGINT or SIGTERM, killing the commands still running and
//! removing the socket.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::agent::{self, Agent};
use crate::reaper::Reaper;

const USAGE: &str = "usage: ember-init --agent-unix PATH\n\
    Serves the Ember guest agent on a Unix socket at PATH (for tests on the host).\n\
    As PID 1 in a guest, ember-init takes no arguments.";

/// Returns the process exit status.
pub fn main(reaper: &'static Reaper) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--agent-unix", path] => match serve_unix(Path::new(path), reaper) {
            Ok(()) => 0,
            Err(e) => {
                say!("ember-init: {e:#}");
                1
            }
        },
        ["--help" | "-h"] => {
            println!("{USAGE}");
            0
        }
        _ => {
            say!("{USAGE}");
            2
        }
    }
}

fn serve_unix(path: &Path, reaper: &'static Reaper) -> Result<()> {
    // Before the agent's thread exists, as in PID 1: SIGCHLD must reach `supervise` only.
    let signals = crate::block_signals()?;
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and changes only this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot become a child subreaper");
    }
    remove_stale_socket(path)?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let agent = Arc::new(Agent::new(reaper, None));
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || agent::serve(listener, agent))
        .context("cannot start the agent's thread")?;
    say!("ember-init: agent listening on {}", path.display());
    crate::supervise(&signals);
    reaper.kill_all_groups();
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// A socket left by an earlier run is removed; any other file is not ours to delete.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display())),
        Ok(_) => bail!(
            "{} exists and is not a socket; choose another path",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}
