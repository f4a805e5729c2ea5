//! `emberctl cp`: copies one file between the host and the guest; `vm:PATH` names the guest
//! side, `-` is stdin or stdout. Uploads keep the local file's permission bits unless
//! `--mode` says otherwise; a destination ending in `/` (guest) or naming a directory (host)
//! receives the source's file name. Both directions land atomically: the guest's agent and
//! emberctl each write a temporary file and rename it. A progress line appears on stderr for
//! transfers longer than a second when stderr is a terminal, or always with `--progress`.

use std::fs::{self, File, Permissions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::agent::{AgentClient, AgentError, WriteOptions};
use clap::Args;

use crate::AgentTarget;

const GUEST_PREFIX: &str = "vm:";
/// Quiet transfers stay quiet: the line shows up only after this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

#[derive(Args, Debug)]
pub struct CpArgs {
    #[command(flatten)]
    target: AgentTarget,
    /// Show the progress line even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Permission bits of the uploaded file, in octal (default: the local file's).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    mode: Option<u32>,
    /// Create missing directories in the guest for an upload.
    #[arg(long)]
    mkdirs: bool,
    /// What to copy: a local path, `-` (stdin) or vm:PATH.
    source: String,
    /// Where to: a local path, `-` (stdout) or vm:PATH.
    dest: String,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not an octal mode such as 644"))
}

#[derive(Debug, PartialEq, Eq)]
enum Transfer {
    Upload { local: String, remote: String },
    Download { remote: String, local: String },
}

fn transfer(source: &str, dest: &str) -> Result<Transfer, String> {
    match (
        source.strip_prefix(GUEST_PREFIX),
        dest.strip_prefix(GUEST_PREFIX),
    ) {
        (None, Some(remote)) => Ok(Transfer::Upload {
            local: source.into(),
            remote: upload_target(remote, source)?,
        }),
        (Some(remote), None) => Ok(Transfer::Download {
            remote: remote.into(),
            local: dest.into(),
        }),
        _ => Err(format!(
            "exactly one of {source:?} and {dest:?} must name the guest side as vm:PATH"
        )),
    }
}

/// `vm:/dir/` means `/dir/<source's name>`.
fn upload_target(remote: &str, local: &str) -> Result<String, String> {
    if !remote.ends_with('/') {
        return Ok(remote.into());
    }
    match Path::new(local).file_name().filter(|_| local != "-") {
        Some(name) => Ok(format!("{remote}{}", name.to_string_lossy())),
        None => Err(format!("name the guest file: vm:{remote} is a directory")),
    }
}

pub fn run(args: &CpArgs) -> Result<(), AgentError> {
    let plan = transfer(&args.source, &args.dest).map_err(|what| AgentError::Local {
        what,
        error: io::ErrorKind::InvalidInput.into(),
    })?;
    let client = args.target.client();
    let mut progress = Progress::new(args.progress);
    match plan {
        Transfer::Upload { local, remote } => upload(&client, args, &local, &remote, &mut progress),
        Transfer::Download { remote, local } => download(&client, &remote, &local, &mut progress),
    }
}

fn local_error(what: String) -> impl FnOnce(io::Error) -> AgentError {
    move |error| AgentError::Local { what, error }
}

fn upload(
    client: &AgentClient,
    args: &CpArgs,
    local: &str,
    remote: &str,
    progress: &mut Progress,
) -> Result<(), AgentError> {
    let options = |mode| WriteOptions {
        mode: args.mode.or(mode),
        mkdirs: args.mkdirs,
    };
    let sent = if local == "-" {
        client.write_file(remote, io::stdin().lock(), options(None), |n| {
            progress.update(n, None)
        })?
    } else {
        let file = File::open(local).map_err(local_error(format!("cannot open {local}")))?;
        let meta = file
            .metadata()
            .map_err(local_error(format!("cannot stat {local}")))?;
        let mode = Some(meta.permissions().mode() & 0o7777);
        let total = Some(meta.len());
        client.write_file(remote, file, options(mode), |n| progress.update(n, total))?
    };
    progress.finish(sent);
    Ok(())
}

fn download(
    client: &AgentClient,
    remote: &str,
    local: &str,
    progress: &mut Progress,
) -> Result<(), AgentError> {
    if local == "-" {
        let got = client.read_file(remote, io::stdout().lock(), |n, size| {
            progress.update(n, Some(size))
        })?;
        progress.finish(got.bytes);
        return Ok(());
    }
    let target = download_target(Path::new(local), remote);
    let mut temp = TempFile::create(&target)?;
    let got = client.read_file(remote, &mut temp.file, |n, size| {
        progress.update(n, Some(size))
    })?;
    temp.persist(&target, got.mode & 0o777)?;
    progress.finish(got.bytes);
    Ok(())
}

/// A local directory receives the guest file's name.
fn download_target(local: &Path, remote: &str) -> PathBuf {
    match Path::new(remote).file_name() {
        Some(name) if local.is_dir() => local.join(name),
        _ => local.into(),
    }
}

/// A file beside the target, renamed over it once complete, deleted otherwise.
struct TempFile {
    path: PathBuf,
    file: File,
    done: bool,
}

impl TempFile {
    fn create(target: &Path) -> Result<Self, AgentError> {
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let path = target.with_file_name(format!(".{name}.emberctl-{}.tmp", std::process::id()));
        let file = File::create(&path)
            .map_err(local_error(format!("cannot create {}", path.display())))?;
        Ok(Self {
            path,
            file,
            done: false,
        })
    }

    fn persist(&mut self, target: &Path, mode: u32) -> Result<(), AgentError> {
        let what = format!("cannot finish {}", target.display());
        self.file
            .set_permissions(Permissions::from_mode(mode))
            .and_then(|()| self.file.sync_all())
            .and_then(|()| fs::rename(&self.path, target))
            .map_err(local_error(what))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The progress line on stderr.
struct Progress {
    enabled: bool,
    forced: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(forced: bool) -> Self {
        Self {
            enabled: forced || io::stderr().is_terminal(),
            forced,
            started: Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: Option<u64>) {
        let now = Instant::now();
        let due = match self.last {
            None => self.forced || now - self.started >= PROGRESS_AFTER,
            Some(last) => now - last >= PROGRESS_EVERY,
        };
        if self.enabled && due {
            self.last = Some(now);
            self.print(done, total, "\r");
        }
    }

    /// Ends the line, if one was shown (or asked for).
    fn finish(&mut self, done: u64) {
        if self.enabled && (self.forced || self.last.is_some()) {
            self.print(done, Some(done), "\r");
            eprintln!();
        }
        self.enabled = false;
    }

    fn print(&self, done: u64, total: Option<u64>, lead: &str) {
        let line = progress_line(done, total, self.started.elapsed());
        let mut err = io::stderr().lock();
        let _ = write!(err, "{lead}{line:<60}");
        let _ = err.flush();
    }
}

impl Drop for Progress {
    /// A transfer that failed midway: end the line so the error starts on a fresh one.
    fn drop(&mut self) {
        if self.enabled && self.last.is_some() {
            eprintln!();
        }
    }
}

fn progress_line(done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let rate = format!("{}/s", human_bytes(rate as u64));
    match total.filter(|t| *t > 0) {
        Some(total) => format!(
            "{} / {} ({}%) {rate}",
            human_bytes(done),
            human_bytes(total),
            done.saturating_mul(100) / total
        ),
        None => format!("{} {rate}", human_bytes(done)),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_comes_from_the_vm_prefix() {
        assert_eq!(
            transfer("a.txt", "vm:/tmp/").unwrap(),
            Transfer::Upload {
                local: "a.txt".into(),
                remote: "/tmp/a.txt".into()
            }
        );
        assert_eq!(
            transfer("vm:/etc/hostname", "-").unwrap(),
            Transfer::Download {
                remote: "/etc/hostname".into(),
                local: "-".into()
            }
        );
        assert!(transfer("a", "b").is_err());
        assert!(transfer("vm:/a", "vm:/b").is_err());
        assert!(transfer("-", "vm:/tmp/").is_err(), "stdin has no name");
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0o4755"), Ok(0o4755));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("17777").is_err());
    }

    #[test]
    fn download_into_a_directory_takes_the_guest_name() {
        let dir = std::env::temp_dir();
        assert_eq!(
            download_target(&dir, "/etc/os-release"),
            dir.join("os-release")
        );
        assert_eq!(
            download_target(Path::new("/nonexistent/x"), "/etc/a"),
            PathBuf::from("/nonexistent/x")
        );
    }

    #[test]
    fn progress_lines() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        let line = progress_line(1 << 20, Some(4 << 20), Duration::from_secs(1));
        assert_eq!(line, "1.0 MiB / 4.0 MiB (25%) 1.0 MiB/s");
        assert_eq!(
            progress_line(10, None, Duration::from_secs(10)),
            "10 B 1 B/s"
        );
    }
}
