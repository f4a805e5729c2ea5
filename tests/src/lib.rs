//! The test bed: runs a shell job where KVM can boot a stock Linux guest.
//!
//! On a host with hardware virtualization the job runs directly. On a host whose `/dev/kvm`
//! cannot run stock guests (PVM, or no `svm`/`vmx` at all) it runs inside the nested test
//! bed: QEMU with TCG and `-cpu max` boots a Debian cloud kernel that loads `kvm-amd`, shows
//! the host's root read-only over virtiofs with the job's directory writable at the same
//! path, and runs the job there. Absolute times inside are ~50x slower than hardware; only
//! ratios against a peer measured in the same job mean anything.
//!
//! `EMBER_TESTBED=direct|nested` overrides the detection; `EMBER_TESTBED_KERNEL_ARGS` adds
//! arguments to the level-1 kernel's command line (`loglevel=7` to see its boot messages too).
//! Nested runs are serialised by a lock: one level-1 VM already uses both cores of a small
//! machine.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On this host: it has hardware virtualization (or this is the test bed itself).
    Direct,
    /// In the nested QEMU/TCG test bed.
    Nested,
}

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Decides where VM jobs run; see the module docs.
pub fn placement() -> Result<Placement, String> {
    match std::env::var("EMBER_TESTBED").as_deref() {
        Ok("direct") => return Ok(Placement::Direct),
        Ok("nested") => return Ok(Placement::Nested),
        Ok(other) if !other.is_empty() => {
            return Err(format!(
                "EMBER_TESTBED={other:?}: use \"direct\" or \"nested\""
            ))
        }
        _ => {}
    }
    if std::env::var("EMBER_TESTBED_LEVEL").is_ok() {
        return Ok(Placement::Direct);
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"));
    if !pvm && hw_virt && Path::new("/dev/kvm").exists() {
        Ok(Placement::Direct)
    } else {
        Ok(Placement::Nested)
    }
}

/// Where the `ember` binary under test is: `EMBER_BIN`, or the release build.
fn ember_path() -> PathBuf {
    std::env::var_os("EMBER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/ember"))
}

/// The `ember` binary alone, for tests that boot no guest (and so need no kernel or
/// root filesystem), or how to build it.
pub fn ember_binary() -> Result<PathBuf, String> {
    let ember = ember_path();
    if !ember.is_file() {
        return Err(format!(
            "{} is missing; run `cargo build --release -p vmm` (or set EMBER_BIN)",
            ember.display()
        ));
    }
    Ok(ember)
}

/// The files every VM test needs, at the stable paths `resources/build.sh` writes.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub ember: PathBuf,
    pub emberctl: PathBuf,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

impl Artifacts {
    /// Finds the artifacts or says how to build them.
    pub fn locate() -> Result<Self, String> {
        let out = repo_root().join("resources/out");
        let ember = ember_path();
        let emberctl = ember.with_file_name("emberctl");
        let found = Self {
            ember,
            emberctl,
            vmlinux: out.join("vmlinux"),
            bzimage: out.join("bzImage"),
            initramfs: out.join("initramfs.cpio"),
            rootfs: out.join("rootfs.ext4"),
        };
        let all = [
            &found.ember,
            &found.emberctl,
            &found.vmlinux,
            &found.bzimage,
            &found.initramfs,
            &found.rootfs,
        ];
        for path in all {
            if !path.is_file() {
                return Err(format!(
                    "{} is missing; run `make build` first",
                    path.display()
                ));
            }
        }
        Ok(found)
    }
}

impl Artifacts {
    /// A private, writable copy of the standard rootfs at `dir/root.ext4` (sparse, so a copy
    /// costs only the blocks in use).
    pub fn private_rootfs(&self, dir: &Path) -> Result<PathBuf, String> {
        let root = dir.join("root.ext4");
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(&self.rootfs)
            .arg(&root)
            .status()
            .map_err(|e| format!("cannot run cp: {e}"))?;
        if !status.success() {
            return Err(format!(
                "cannot copy {} to {}",
                self.rootfs.display(),
                root.display()
            ));
        }
        Ok(root)
    }
}

/// What a job printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub status: i32,
    /// The level-1 VM's console (nested runs only), for diagnosing the test bed itself.
    pub console: String,
}

impl Output {
    /// Panics with everything the job printed unless it exited with 0.
    pub fn assert_success(&self) -> &Self {
        assert_eq!(self.status, 0, "job failed:\n{self}");
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "status: {}", self.status)?;
        writeln!(f, "--- stdout\n{}", self.stdout)?;
        writeln!(f, "--- stderr\n{}", self.stderr)?;
        if !self.console.is_empty() {
            writeln!(f, "--- test bed console\n{}", tail(&self.console, 40))?;
        }
        Ok(())
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A shell job with its own writable directory (the job's working directory).
#[derive(Debug)]
pub struct Job {
    dir: PathBuf,
    script: String,
    shares: Vec<PathBuf>,
    timeout: Duration,
    memory_mib: u32,
}

static JOB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The level-1 VM's memory unless a job asks for more ([`Job::memory_mib`]).
pub const DEFAULT_JOB_MEMORY_MIB: u32 = 3072;

/// What the level-1 init prints once the job is about to run.
const JOB_STARTED: &str = "testbed-l1: running";
/// How long a level-1 VM may take to start the job (it takes ~5 s on an idle host).
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// The level-1 init prints a heartbeat every 60 s; a console silent for this long means the
/// level-1 VM froze as a whole (seen under TCG: no CPU runs, so no watchdog fires either).
const FROZEN_LIMIT: Duration = Duration::from_secs(240);
/// Level-1 VMs tried before the job is declared failed (after a boot that never started the
/// job, or a level-1 VM that died under it).
const BOOT_ATTEMPTS: u32 = 2;

/// How a nested job's level-1 VM ended.
enum Ended {
    Status(i32),
    NoStatus,
    TimedOut,
    NoBoot,
}

impl Job {
    /// A job named `name` (used in its directory name) running the bash `script`.
    pub fn new(name: &str, script: impl Into<String>) -> Self {
        let n = JOB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = repo_root()
            .join("target/testbed/jobs")
            .join(format!("{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // A job that cannot get its directory fails at `run` with the reason.
        let _ = fs::create_dir_all(&dir);
        Self {
            dir,
            script: script.into(),
            shares: Vec::new(),
            timeout: Duration::from_secs(600),
            memory_mib: DEFAULT_JOB_MEMORY_MIB,
        }
    }

    /// The job's directory: writable, shared with the test bed, the script's cwd.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a file into the job directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        if let Err(e) = fs::write(&path, contents) {
            panic!("cannot write {}: {e}", path.display());
        }
        path
    }

    /// Another host directory the job may write to.
    pub fn share(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shares.push(dir.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Memory of the level-1 VM (nested runs); enough for the guests the job boots.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Runs the job where KVM works and returns its output.
    pub fn run(&self) -> Result<Output, String> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create job directory {}: {e}", self.dir.display()))?;
        let script = format!("set -u\ncd {}\n{}\n", shell_quote(&self.dir), self.script);
        fs::write(self.dir.join("job.sh"), script)
            .map_err(|e| format!("cannot write the job script: {e}"))?;
        for name in ["stdout", "stderr", "status", "console.log"] {
            let _ = fs::remove_file(self.dir.join(name));
        }
        match placement()? {
            Placement::Direct => self.run_direct(),
            Placement::Nested => self.run_nested(),
        }
    }

    fn run_direct(&self) -> Result<Output, String> {
        let file = |name: &str| {
            File::create(self.dir.join(name)).map_err(|e| format!("cannot create {name}: {e}"))
        };
        let mut child = Command::new("bash")
            .arg(self.dir.join("job.sh"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(file("stdout")?)
            .stderr(file("stderr")?)
            .spawn()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        let status = wait_with_timeout(&mut child, self.timeout)
            .ok_or_else(|| format!("job timed out after {:?}", self.timeout))?;
        self.collect(status.code().unwrap_or(128 + status.signal_number()))
    }

    fn run_nested(&self) -> Result<Output, String> {
        let bed = prepare_bed()?;
        // The repository read-only (it may sit under /tmp, which the test bed replaces with
        // a tmpfs), then the writable directories.
        let mut list = format!("ro {}\nrw {}\n", repo_root().display(), self.dir.display());
        for share in &self.shares {
            list += &format!("rw {}\n", share.display());
        }
        fs::write(self.dir.join("shares"), list)
            .map_err(|e| format!("cannot write the share list: {e}"))?;
        let _lock = BedLock::acquire()?;
        // A level-1 boot that hangs (rare, but seen under TCG on a loaded host) is the test
        // bed's failure, not the job's: it is retried once, and said so on stderr. A job that
        // hangs once running is never retried.
        let mut attempt = 1;
        loop {
            match self.boot_and_run(&bed)? {
                Ended::Status(code) => return self.collect(code),
                Ended::NoBoot if attempt < BOOT_ATTEMPTS => {
                    eprintln!(
                        "testbed: level-1 VM for {} printed nothing within {:?}; retrying \
                         (attempt {} of {BOOT_ATTEMPTS})",
                        self.dir.display(),
                        BOOT_LIMIT,
                        attempt + 1
                    );
                    attempt += 1;
                }
                // The level-1 VM itself died (its emulated CPU reset, which only a fault of
                // the emulation or of the level-1 kernel can cause): the job is run again,
                // once, and the death reported.
                // A soft lockup (a level-1 CPU stuck in its kernel) panics the level-1 VM
                // (tests/testbed/init.sh) and ends here too, as does a level-1 VM that froze
                // as a whole (no heartbeat for FROZEN_LIMIT).
                Ended::NoStatus if attempt < BOOT_ATTEMPTS => {
                    let console =
                        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
                    let how = if console.contains("soft lockup") {
                        "locked up (a CPU stuck in the level-1 kernel: soft lockup) and panicked"
                    } else if console.contains("the level-1 VM froze") {
                        "froze"
                    } else {
                        "died"
                    };
                    eprintln!(
                        "testbed: the level-1 VM running {} {how} without finishing the job; \
                         its console:\n{}\nretrying (attempt {} of {BOOT_ATTEMPTS})",
                        self.dir.display(),
                        tail(&console, 60),
                        attempt + 1
                    );
                    attempt += 1;
                }
                ended => return Err(self.failure(ended)),
            }
        }
    }

    /// Boots one level-1 VM for the job and waits for it to end.
    fn boot_and_run(&self, bed: &Path) -> Result<Ended, String> {
        for name in ["status", "console.log"] {
            let _ = fs::remove_file(self.dir.join(name));
        }
        // In the temporary directory, not the job's: a Unix socket path holds 107 bytes,
        // which a job directory with a long test name in a deep checkout can exceed.
        let socket = std::env::temp_dir().join(format!(
            "ember-testbed-{}-{}.sock",
            std::process::id(),
            JOB_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_file(&socket);
        let monitor = socket.with_extension("monitor");
        let _ = fs::remove_file(&monitor);
        let _monitor_file = RemoveOnDrop(monitor.clone());
        let virtiofsd = spawn_virtiofsd(&socket, &self.dir)?;
        let _virtiofsd = KillOnDrop(virtiofsd);
        let _socket_file = RemoveOnDrop(socket.clone());
        wait_for_socket(&socket)?;
        let mut qemu = self
            .qemu_command(bed, &socket, &monitor)
            .spawn()
            .map_err(|e| {
                format!(
                "cannot start qemu-system-x86_64 for the test bed: {e}; install qemu-system-x86"
            )
            })?;
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut booted = false;
        let console = self.dir.join("console.log");
        let (mut last_len, mut last_growth) = (0u64, started);
        let finished = loop {
            match qemu.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) => {}
                Err(_) => break false,
            }
            let now = Instant::now();
            if !booted && now > started + BOOT_LIMIT {
                booted = fs::read_to_string(self.dir.join("console.log"))
                    .is_ok_and(|c| c.contains(JOB_STARTED));
                if !booted {
                    let _ = qemu.kill();
                    let _ = qemu.wait();
                    return Ok(Ended::NoBoot);
                }
            }
            if now > deadline {
                let _ = qemu.kill();
                let _ = qemu.wait();
                break false;
            }
            let console_len = fs::metadata(&console).map_or(0, |m| m.len());
            if console_len != last_len {
                (last_len, last_growth) = (console_len, now);
            } else if now > last_growth + FROZEN_LIMIT {
                // What the emulated CPUs were doing, for whoever looks into the freeze.
                let state = frozen_state(qemu.id(), &monitor);
                let _ = qemu.kill();
                let _ = qemu.wait();
                // Said on the console, which the retry and failure reports show.
                let _ = fs::OpenOptions::new()
                    .append(true)
                    .open(&console)
                    .and_then(|mut f| {
                        writeln!(
                            f,
                            "testbed: the level-1 VM froze: no console output, not even its \
                             heartbeat, for {FROZEN_LIMIT:?}; stopped it. {state}"
                        )
                    });
                break true;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let status = fs::read_to_string(self.dir.join("status")).ok();
        Ok(match status.and_then(|s| s.trim().parse::<i32>().ok()) {
            Some(code) => Ended::Status(code),
            None if finished => Ended::NoStatus,
            None => Ended::TimedOut,
        })
    }

    /// Everything that tells why a nested job failed: the level-1 console, the job's own
    /// output and the tail of every `*.out` file it wrote (guest consoles, by convention).
    fn failure(&self, ended: Ended) -> String {
        let why = match ended {
            Ended::TimedOut => format!("timed out (limit {:?})", self.timeout),
            Ended::NoStatus => "ended without a status".to_string(),
            Ended::NoBoot => format!(
                "never started: the level-1 VM printed nothing within {BOOT_LIMIT:?}, \
                 {BOOT_ATTEMPTS} times"
            ),
            Ended::Status(code) => format!("exited with {code}"),
        };
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let mut text = format!(
            "test bed job in {} {why}\n--- test bed console\n{}\n--- stdout\n{}\n--- stderr\n{}",
            self.dir.display(),
            tail(&read("console.log"), 40),
            tail(&read("stdout"), 40),
            tail(&read("stderr"), 40)
        );
        let mut outs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "out"))
            .collect();
        outs.sort();
        for path in outs {
            let body = fs::read_to_string(&path).unwrap_or_default();
            text += &format!("\n--- {}\n{}", path.display(), tail(&body, 40));
        }
        text
    }

    fn qemu_command(&self, bed: &Path, socket: &Path, monitor: &Path) -> Command {
        let mem = format!("{}M", self.memory_mib);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", &mem])
            .args(QEMU_HEADLESS_ARGS)
            .arg("-kernel")
            .arg(bed.join("vmlinuz"))
            .arg("-initrd")
            .arg(bed.join("initramfs.cpio"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off testbed.job={} {}",
                self.dir.display(),
                std::env::var("EMBER_TESTBED_KERNEL_ARGS").unwrap_or_default()
            ))
            .arg("-serial")
            .arg(format!("file:{}", self.dir.join("console.log").display()))
            .arg("-chardev")
            .arg(format!("socket,id=vfs,path={}", socket.display()))
            .args(["-device", "vhost-user-fs-pci,chardev=vfs,tag=host"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match File::create(self.dir.join("qemu.log")) {
            Ok(log) => cmd.stderr(log),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        cmd
    }

    fn collect(&self, status: i32) -> Result<Output, String> {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        Ok(Output {
            stdout: read("stdout"),
            stderr: read("stderr"),
            status,
            console: read("console.log"),
        })
    }
}

/// QEMU options for a VM with no display, no default devices and no reboot (a guest reset
/// ends QEMU), shared by the test bed and the benchmark peers.
pub const QEMU_HEADLESS_ARGS: [&str; 5] = [
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
];

/// Single-quotes a path for bash.
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

trait SignalNumber {
    fn signal_number(&self) -> i32;
}

impl SignalNumber for std::process::ExitStatus {
    fn signal_number(&self) -> i32 {
        std::os::unix::process::ExitStatusExt::signal(self).unwrap_or(0)
    }
}

/// Runs a test whose body drives VMs from Rust where KVM can boot stock guests.
///
/// Returns the directory the body works in when that place is here (hardware KVM, or this
/// process already runs inside the test bed): the caller then runs its body. Otherwise it
/// runs `test` of this same test binary inside the nested test bed, panics with everything
/// it printed unless it passed there, and returns None: the body ran, over there.
pub fn vm_test(test: &str, timeout: Duration) -> Option<PathBuf> {
    vm_test_with_memory(test, timeout, DEFAULT_JOB_MEMORY_MIB)
}

/// [`vm_test`] for a test whose guests need more than the level-1 VM's default
/// memory (nested runs; a direct run uses the host's).
pub fn vm_test_with_memory(test: &str, timeout: Duration, memory_mib: u32) -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("EMBER_TEST_DIR") {
        return Some(PathBuf::from(dir));
    }
    let placement = placement().unwrap_or_else(|e| panic!("{e}"));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("cannot find this test: {e}"));
    let script = format!(
        "EMBER_TEST_DIR=\"$PWD\" {} --exact {test} --nocapture --test-threads=1",
        shell_quote(&exe)
    );
    let job = Job::new(test, script)
        .timeout(timeout)
        .memory_mib(memory_mib);
    if placement == Placement::Direct {
        // Run the body in this process, in the job's directory, within the time limit.
        time_limit(test, timeout);
        return Some(job.dir().to_path_buf());
    }
    let out = job.run().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status == 0 && out.stdout.contains("test result: ok. 1 passed"),
        "{test} failed in the test bed:\n{out}"
    );
    None
}

/// Ends this process if the calling test's thread (libtest runs each test on its own) is
/// still running after `limit`: in one process, as `make test` runs the suites, a test that
/// hangs must not hold up the rest until the whole run's limit.
fn time_limit(test: &str, limit: Duration) {
    thread_local! {
        static DONE: std::cell::RefCell<Option<std::sync::mpsc::Sender<()>>> =
            const { std::cell::RefCell::new(None) };
    }
    let (done, finished) = std::sync::mpsc::channel::<()>();
    // Dropped with the test's thread-locals when its thread ends, which wakes the watchdog.
    DONE.with(|d| *d.borrow_mut() = Some(done));
    let test = test.to_string();
    std::thread::spawn(move || {
        if finished.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("testbed: {test} is still running after its limit of {limit:?}; ending the test process");
            std::process::exit(101);
        }
    });
}

/// Waits for `child` to exit; kills it and returns None once `timeout` has passed.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The state of a frozen level-1 VM: how much CPU its QEMU used in one second (spinning or
/// idle) and each emulated CPU's registers, from QEMU's monitor.
fn frozen_state(pid: u32, monitor: &Path) -> String {
    let cpu_ticks = || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime and stime: fields 14 and 15, counted after the parenthesised command name.
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0)
    };
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks().saturating_sub(before);
    let registers = human_monitor_command(monitor, "info registers -a")
        .unwrap_or_else(|e| format!("(no answer from QEMU's monitor: {e})"));
    format!("QEMU used {used} clock ticks of CPU in one second; its CPUs:\n{registers}")
}

/// Runs a human-monitor command through QMP and returns its text (within 2 s per answer).
fn human_monitor_command(qmp: &Path, command: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader};
    let stream = std::os::unix::net::UnixStream::connect(qmp)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut lines = BufReader::new(stream.try_clone()?).lines();
    let request = serde_json::json!({
        "execute": "human-monitor-command",
        "arguments": { "command-line": command },
    });
    writeln!(&stream, r#"{{"execute": "qmp_capabilities"}}"#)?;
    writeln!(&stream, "{request}")?;
    // The greeting, the capabilities answer, maybe events, then the command's answer.
    for line in lines.by_ref() {
        let value: serde_json::Value = serde_json::from_str(&line?).unwrap_or_default();
        if let Some(text) = value["return"].as_str() {
            return Ok(text.to_string());
        }
        if let Some(error) = value.get("error") {
            return Ok(format!("QEMU refused {command}: {error}"));
        }
    }
    Err(std::io::ErrorKind::UnexpectedEof.into())
}

/// Builds (or finds cached) the level-1 kernel and initramfs, once per process.
fn prepare_bed() -> Result<PathBuf, String> {
    static BED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BED.get_or_init(|| {
        let script = repo_root().join("tests/testbed/prepare.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "the nested test bed could not be prepared ({}); this host has no hardware \
                 virtualization KVM can boot stock guests with, and VM tests need one of the two",
                script.display()
            ));
        }
        let dir = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        Ok(PathBuf::from(dir))
    })
    .clone()
}

fn spawn_virtiofsd(socket: &Path, dir: &Path) -> Result<Child, String> {
    let log = File::create(dir.join("virtiofsd.log"))
        .map_err(|e| format!("cannot create virtiofsd.log: {e}"))?;
    Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", socket.display()))
        // xattr: snapshot memory files carry a tag naming their state file.
        .args([
            "-o",
            "source=/",
            "-o",
            "cache=auto",
            "-o",
            "sandbox=chroot",
            "-o",
            "xattr",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!("cannot start /usr/lib/qemu/virtiofsd: {e}; install qemu-system-common")
        })
}

fn wait_for_socket(socket: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!("virtiofsd did not create {}", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

struct KillOnDrop(Child);

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An exclusive lock on the test bed, held while a level-1 VM runs. Machine-wide (next to
/// the prepared bed in the cache, not in a checkout): one level-1 VM already uses both
/// cores of a small machine, whichever checkout or worktree started it.
struct BedLock(File);

impl BedLock {
    fn acquire() -> Result<Self, String> {
        let cache = std::env::var_os("EMBER_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ember")))
            .unwrap_or_else(|| repo_root().join("target"));
        fs::create_dir_all(&cache)
            .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
        let path = cache.join("testbed.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; blocks until the lock is free.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self(file))
    }
}

impl Drop for BedLock {
    fn drop(&mut self) {
        let _ = self.0.flush();
        // SAFETY: unlocking the descriptor this value owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// (thread name, `Seccomp:` mode from /proc) for each thread of process `pid`; a thread
/// that ends between the listing and the read is left out.
pub fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut modes = Vec::new();
    for task in tasks.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    modes
}

/// Boot arguments for test and benchmark guests: quiet console, power off once ready.
pub const TEST_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd quiet ember.test=poweroff";

/// A guest to boot: the pieces of an `ember` config file.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub boot_args: String,
    /// `drives[]` entries, in Firecracker's format.
    pub drives: Vec<serde_json::Value>,
    /// `network-interfaces[]` entries, in Firecracker's format.
    pub nets: Vec<serde_json::Value>,
    /// The `vsock` section, in Firecracker's format.
    pub vsock: Option<serde_json::Value>,
}

impl GuestSpec {
    /// The standard test guest: our kernel and initramfs, 1 vCPU, 128 MiB.
    pub fn standard(artifacts: &Artifacts) -> Self {
        Self {
            kernel: artifacts.vmlinux.clone(),
            initrd: Some(artifacts.initramfs.clone()),
            vcpus: 1,
            mem_mib: 128,
            boot_args: TEST_BOOT_ARGS.into(),
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        }
    }

    /// A guest that boots from a writable ext4 root at `root` and stays up, serving the
    /// agent on a vsock device whose Unix socket is `uds_path`.
    pub fn with_agent(artifacts: &Artifacts, root: &Path, uds_path: &Path) -> Self {
        Self {
            initrd: None,
            boot_args: TEST_BOOT_ARGS.replace(" ember.test=poweroff", ""),
            drives: vec![drive("rootfs", root, true, false)],
            vsock: Some(serde_json::json!({"guest_cid": 3, "uds_path": uds_path})),
            ..Self::standard(artifacts)
        }
    }

    /// Boots from an ext4 root drive at `root` (no initramfs) and runs `script` with
    /// `ember.run` before powering off. The script must not contain double quotes.
    pub fn with_root_running(artifacts: &Artifacts, root: &Path, script: &str) -> Self {
        assert!(
            !script.contains('"'),
            "ember.run scripts cannot contain double quotes"
        );
        Self {
            initrd: None,
            boot_args: format!("{TEST_BOOT_ARGS} ember.run=\"{script}\""),
            drives: vec![drive("rootfs", root, true, false)],
            ..Self::standard(artifacts)
        }
    }

    /// The Firecracker-format config file for this guest.
    pub fn config_json(&self) -> String {
        let mut boot = serde_json::json!({
            "kernel_image_path": self.kernel,
            "boot_args": self.boot_args,
        });
        if let Some(initrd) = &self.initrd {
            boot["initrd_path"] = serde_json::json!(initrd);
        }
        let mut config = serde_json::json!({
            "boot-source": boot,
            "machine-config": {"vcpu_count": self.vcpus, "mem_size_mib": self.mem_mib},
        });
        if !self.drives.is_empty() {
            config["drives"] = serde_json::Value::Array(self.drives.clone());
        }
        if !self.nets.is_empty() {
            config["network-interfaces"] = serde_json::Value::Array(self.nets.clone());
        }
        if let Some(vsock) = &self.vsock {
            config["vsock"] = vsock.clone();
        }
        config.to_string()
    }
}

/// A `drives[]` entry; writable drives use cache_type "Writeback" so guest flushes reach
/// the disk.
pub fn drive(id: &str, path: &Path, root: bool, read_only: bool) -> serde_json::Value {
    serde_json::json!({
        "drive_id": id,
        "path_on_host": path,
        "is_root_device": root,
        "is_read_only": read_only,
        "cache_type": if read_only { "Unsafe" } else { "Writeback" },
    })
}

/// What ember-init's ready line says about the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub ready_ms: u64,
    pub cpus: u32,
    pub ram_kib: u64,
    pub hostname: String,
}

/// The guest console (`vm.out`) and ember's stderr (`vm.err`) of a VM run in `dir`, for
/// failure messages: together they say the most about why a VM test failed.
pub fn vm_logs(dir: &Path) -> String {
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!(
        "--- guest console\n{}\n--- ember stderr\n{}",
        read("vm.out"),
        read("vm.err")
    )
}

/// Finds and parses `ember-init: ready in N ms: cpus=C ram_kib=R hostname=H` in console text.
pub fn parse_ready_line(console: &str) -> Option<ReadyLine> {
    let line = console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("ember-init: ready in "))?;
    let (ms, rest) = line.split_once(" ms: ")?;
    let field = |key: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
    };
    Some(ReadyLine {
        ready_ms: ms.parse().ok()?,
        cpus: field("cpus")?.parse().ok()?,
        ram_kib: field("ram_kib")?.parse().ok()?,
        hostname: field("hostname")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_past_its_time_limit_ends_the_process() {
        if std::env::var_os("EMBER_TIME_LIMIT_CHILD").is_some() {
            time_limit("the child", Duration::from_millis(100));
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_test_past_its_time_limit_ends_the_process",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env("EMBER_TIME_LIMIT_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(101), "{stderr}");
        assert!(
            stderr.contains("the child is still running after its limit of 100ms"),
            "{stderr}"
        );
    }

    #[test]
    fn a_test_that_ends_in_time_is_left_alone() {
        std::thread::spawn(|| time_limit("a quick one", Duration::from_millis(200)))
            .join()
            .unwrap();
        // Had the watchdog fired, this process would have ended here.
        std::thread::sleep(Duration::from_millis(600));
    }

    /// `make test` runs the integration tests by name: one missing from both of the
    /// Makefile's lists would never run.
    #[test]
    fn every_integration_test_is_listed_in_the_makefile() {
        let makefile = fs::read_to_string(repo_root().join("Makefile")).unwrap();
        let list = |var: &str| -> Vec<String> {
            let prefix = format!("{var} := ");
            let line = makefile.lines().find(|l| l.starts_with(&prefix));
            let line = line.unwrap_or_else(|| panic!("no `{prefix}` line in the Makefile"));
            line[prefix.len()..]
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        let (vm, host) = (list("VM_TESTS"), list("HOST_TESTS"));
        let mut files: Vec<String> = fs::read_dir(repo_root().join("tests/tests"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter_map(|f| f.strip_suffix(".rs").map(String::from))
            .collect();
        files.sort();
        for file in &files {
            let listed = usize::from(vm.contains(file)) + usize::from(host.contains(file));
            assert_eq!(
                listed, 1,
                "tests/tests/{file}.rs must be in exactly one of VM_TESTS and HOST_TESTS"
            );
        }
        for name in vm.iter().chain(&host) {
            assert!(
                files.contains(name),
                "the Makefile lists {name}, but there is no tests/tests/{name}.rs"
            );
        }
    }

    #[test]
    fn ready_line_parses() {
        let text = "noise\nember-init: ready in 42 ms: cpus=2 ram_kib=261755 hostname=ember\r\n";
        let r = parse_ready_line(text).unwrap();
        assert_eq!(
            r,
            ReadyLine {
                ready_ms: 42,
                cpus: 2,
                ram_kib: 261755,
                hostname: "ember".into()
            }
        );
        assert!(parse_ready_line("ember-init: ready in x ms: cpus=1").is_none());
    }

    #[test]
    fn config_json_is_firecracker_shaped() {
        let spec = GuestSpec {
            kernel: "/k".into(),
            initrd: None,
            vcpus: 2,
            mem_mib: 256,
            boot_args: "quiet".into(),
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
        };
        let v: serde_json::Value = serde_json::from_str(&spec.config_json()).unwrap();
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k");
        assert!(v["boot-source"].get("initrd_path").is_none());
        assert_eq!(v["machine-config"]["vcpu_count"], 2);
    }
}
