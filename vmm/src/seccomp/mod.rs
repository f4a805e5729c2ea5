//! Per-thread seccomp filters. Each thread kind (VMM, vCPU, API) installs its own filter
//! before it handles any input from the guest or from a client, so that a bug exploited
//! through that input can reach only the system calls that thread needs. The lists live in
//! `filters.rs` as commented Rust tables; seccompiler compiles them to BPF.
//!
//! A call outside a thread's list traps: the SIGSYS handler (installed once at startup with
//! [`install_sigsys_handler`]) prints `ember: seccomp: the <kind> thread made the forbidden
//! system call <name> (<nr>); exiting with code 148`, counts it in [`SECCOMP_FAULTS`] and
//! ends the process with [`EXIT_SECCOMP_VIOLATION`] (148).
//!
//! The API thread makes a thread per connection, which inherits its filter; a second filter
//! stacked under it fails clone3 and openat with ENOSYS instead of trapping (see
//! `api_soft_denials`).
//!
//! `--no-seccomp` turns [`install`] into a no-op through [`set_enabled`].
//!
//! Filters are x86_64 only, like the rest of Ember.

mod filters;
mod sigsys;
mod syscall_names;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use filters::Args;
pub use sigsys::{install_sigsys_handler, syscall_name, EXIT_SECCOMP_VIOLATION, SECCOMP_FAULTS};

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The event-manager loop that owns the devices.
    Vmm,
    /// One per vCPU: KVM_RUN and the port and MMIO exits.
    Vcpu,
    /// The HTTP server on the API socket.
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api];
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Api => "API",
        })
    }
}

/// Why a filter or the SIGSYS handler could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {0} thread: {1}; this is a bug in Ember's filter tables, run with --no-seccomp meanwhile")]
    Build(ThreadKind, BackendError),
    #[error("cannot install the seccomp filter of the {0} thread: {1}; the host kernel needs seccomp filters (CONFIG_SECCOMP_FILTER), or run with --no-seccomp")]
    Install(ThreadKind, seccompiler::Error),
    #[error("cannot install the SIGSYS handler that reports forbidden system calls: {0}")]
    Handler(std::io::Error),
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns filter installation on (the default) or off (`--no-seccomp`) for the whole process.
/// Call before any thread installs its filter.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::SeqCst);
}

/// Whether [`install`] installs filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Installs the filter of `kind` on the calling thread, unless filters are disabled. The
/// filter stays for the thread's life and is inherited by threads it spawns.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let program = compile(kind)?;
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e))
    };
    if kind == ThreadKind::Api {
        // First, while prctl and seccomp are still allowed.
        install(&api_soft_denials().map_err(|e| SeccompError::Build(kind, e))?)?;
    }
    sigsys::mark_thread(kind);
    install(&program)
}

/// A filter stacked under the API filter (the kernel takes the strictest answer of all a
/// thread's filters) that fails two calls with ENOSYS instead of trapping, and allows the
/// rest to the API filter:
/// - clone3, so that glibc creates threads with clone, whose flags the API filter checks
///   (clone3 passes them in memory, out of a filter's reach);
/// - openat: glibc's malloc reads /sys/devices/system/cpu/online the first time it creates
///   more arenas than 8, which can happen in a new connection thread; it copes with the
///   failure, and the API thread never needs a file.
fn api_soft_denials() -> Result<BpfProgram, BackendError> {
    let filter = SeccompFilter::new(
        BTreeMap::from([
            (libc::SYS_clone3, Vec::new()),
            (libc::SYS_openat, Vec::new()),
        ]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(filter)
}

/// The BPF program of `kind`'s filter: its allowed list, everything else traps.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind, e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(nr, args) in filters::allowed(kind) {
        // An empty rule list allows the call whatever its arguments.
        let chain = rule_chain(args).map_err(build)?;
        rules.entry(nr).or_default().extend(chain);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The seccompiler rules for one entry: one rule per allowed value, any of which allows.
fn rule_chain(args: Args) -> Result<Vec<SeccompRule>, BackendError> {
    let condition = |index, op, value| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    match args {
        Args::Any => Ok(Vec::new()),
        Args::OneOf(index, values) => values
            .iter()
            .map(|&v| condition(index, SeccompCmpOp::Eq, v))
            .collect(),
        Args::OneOfAtRunTime(index, values) => values()
            .into_iter()
            .map(|v| condition(index, SeccompCmpOp::Eq, v))
            .collect(),
        Args::NoneOf(index, mask) => Ok(vec![condition(index, SeccompCmpOp::MaskedEq(mask), 0)?]),
        Args::AllOf(index, mask) => Ok(vec![condition(index, SeccompCmpOp::MaskedEq(mask), mask)?]),
    }
}

#[cfg(test)]
mod tests;
