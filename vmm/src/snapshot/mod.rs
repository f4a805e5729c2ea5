//! Snapshots: the [`Persist`] trait that every stateful part of a microVM implements, and the
//! snapshot *state file* that carries the composed state to disk and back.
//!
//! A snapshot is two files: the state file described here (vCPUs, VM, devices, memory
//! layout: small) and the memory file (guest RAM, byte for byte: large). The state file
//! records the memory file's size, so a restore can refuse a memory file that does not
//! belong to it before anything is mapped or any vCPU runs.
//!
//! # State file layout
//!
//! All integers are little-endian.
//!
//! | offset   | size | field                                                         |
//! |----------|------|---------------------------------------------------------------|
//! | 0        | 8    | magic: the ASCII bytes `EMBERSNP`                             |
//! | 8        | 4    | format version, `u32` (this build writes [`FORMAT_VERSION`])   |
//! | 12       | 8    | size of the memory file in bytes, `u64`                        |
//! | 20       | 8    | payload length `N` in bytes, `u64`, at most [`MAX_PAYLOAD_LEN`]|
//! | 28       | `N`  | payload: the state, serialised with postcard                   |
//! | 28 + `N` | 8    | CRC-64/XZ of bytes `0 .. 28 + N`, `u64`                        |
//!
//! The file is exactly `36 + N` bytes long: a shorter one is truncated, a longer one carries
//! trailing garbage, and both are refused.
//!
//! The *envelope* (magic, version field, memory size, payload length, CRC) is the same in
//! every format version; a version only changes what the payload holds. That is what lets
//! the loader check length and CRC before it looks at the version, so a flipped bit in the
//! version field reads as corruption and not as a file from another Ember. A change to the
//! envelope itself needs a new magic.
//!
//! # Loading validates first
//!
//! [`load_state`] checks, in this order and before it deserialises anything: the file is a
//! regular file; the magic; the header is complete; the file is exactly as long as the header
//! says; the payload is at most [`MAX_PAYLOAD_LEN`] (so a hostile header cannot make Ember
//! allocate or read without bound); the CRC; the format version. Only then is the payload
//! decoded, and it must decode completely with no bytes left over. [`check_memory_file`] then
//! checks the memory file against the recorded size. Every failure is a [`SnapshotError`]
//! that names the file, what is wrong with it and what to do. Nothing here panics on file
//! contents.
//!
//! # Writing never half-exists
//!
//! [`save_state`] (and [`write_file_atomically`], which the memory dump can use too) writes a
//! temporary file next to the target (`.<name>.<pid>.<n>.tmp`, mode 0600), fsyncs it, renames
//! it over the target and fsyncs the directory. A crash, a full disk (ENOSPC) or any other
//! error before the rename leaves the previous file at the target path untouched, and the
//! temporary file is removed on error. Only a crash can leave a temporary file behind; it never
//! sits at the target path, and the next save to the same target removes it (a regular file of
//! exactly that name whose `<pid>` is no longer a running process; logged with its size).
//!
//! # Why postcard and CRC-64/XZ
//!
//! The payload format is [postcard](https://docs.rs/postcard) 1.x: a compact, non
//! self-describing serde format whose wire format is specified and promised stable for all
//! 1.x releases, actively maintained, with few dependencies. Deserialising from a byte slice
//! can never read or allocate past the slice, which suits hostile input. bincode, the usual
//! alternative, is no longer maintained: its last release is a deliberate compile error.
//! Because postcard is not self-describing, any change to the shape of a saved state (a field
//! added, removed, reordered or retyped) must bump [`FORMAT_VERSION`]; the golden-bytes test
//! in this module guards the envelope and the encoding against silent changes. A state whose
//! shape changed keeps reading the older versions through [`load_state_with`], which hands
//! the payload over with its version (see `persist::MicrovmState`).
//!
//! | version | change                                                                 |
//! |---------|------------------------------------------------------------------------|
//! | 1       | first format                                                           |
//! | 2       | the microVM state ends with the memory file's kind: full, or diff      |
//!
//! The checksum is CRC-64/XZ (the ECMA-182 polynomial, reflected, as xz uses) from the `crc`
//! crate. It is there to catch storage and copy corruption (bit flips, torn writes,
//! truncation), not tampering: a snapshot file is trusted as much as the path it came from.

mod file;
mod format;

use std::io;
use std::path::PathBuf;

pub use file::{
    check_memory_file, load_state, load_state_with, prepare_file, save_state,
    write_file_atomically, LoadedState, PreparedFile,
};
pub use format::{
    checksum, decode, decode_exact, decode_with, encode, stored_checksum, Header, CRC_LEN,
    FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN, SUPPORTED_VERSIONS,
};

/// Saving and restoring one stateful part of a microVM (a device, the VM, a vCPU, the whole
/// microVM).
///
/// States compose upward: a part's `State` holds its children's states, and its `restore`
/// restores its children first. `State` is plain data (no file descriptors, no pointers), so
/// it can be written to a state file with [`save_state`] and read back with [`load_state`].
///
/// `save` returns a `Result`, unlike the guide's sketch: saving KVM state (registers, irqchip,
/// clock) goes through ioctls that can fail, and a part must be able to say so rather than
/// panic or save garbage. Parts whose save cannot fail simply return `Ok`.
///
/// ```
/// use vmm::snapshot::Persist;
///
/// struct Counter { step: u64, value: u64 }
///
/// impl Persist for Counter {
///     type State = u64;
///     type Args = u64; // the step comes from the new configuration, not the snapshot
///     type Error = std::convert::Infallible;
///
///     fn save(&self) -> Result<u64, Self::Error> {
///         Ok(self.value)
///     }
///     fn restore(step: u64, value: &u64) -> Result<Self, Self::Error> {
///         Ok(Counter { step, value: *value })
///     }
/// }
/// ```
pub trait Persist: Sized {
    /// What is saved: plain, serialisable data.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What `restore` needs besides the state and cannot take from a file: guest memory,
    /// EventFds, host paths given anew at load time. Owned, so `restore` can keep it.
    type Args;
    /// Why a save or restore failed.
    type Error: std::error::Error;

    /// Captures the current state. The part must be quiescent (vCPUs paused) so that the
    /// state is consistent.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds the part from `args` and a saved `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors while writing or reading snapshot files. Each names the file, says what is wrong
/// with it and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot serialise the snapshot state: {0}")]
    Encode(String),
    #[error("the snapshot state serialises to {len} bytes, more than the {max}-byte limit of the state file format", max = MAX_PAYLOAD_LEN)]
    StateTooLarge { len: usize },
    #[error("cannot create a temporary file in {dir} to write {target}: {source}")]
    CreateTemp {
        dir: PathBuf,
        target: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {target}: {source}; the previous file there, if any, is intact")]
    Write { target: PathBuf, source: io::Error },
    #[error("cannot flush {target} to disk: {source}; the previous file there, if any, is intact")]
    Sync { target: PathBuf, source: io::Error },
    #[error("cannot move the new file into place at {target}: {source}; the previous file there, if any, is intact")]
    Rename { target: PathBuf, source: io::Error },
    #[error("{target} is written but its directory {dir} cannot be flushed to disk: {source}; the new file may not survive a host crash")]
    SyncDirectory {
        target: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("cannot open snapshot state {0}: {1}")]
    OpenState(PathBuf, io::Error),
    #[error("cannot read snapshot state {0}: {1}")]
    ReadState(PathBuf, io::Error),
    #[error("snapshot state {0} is not a regular file")]
    StateNotAFile(PathBuf),
    #[error("{0} is not an Ember snapshot state file (it does not start with the snapshot magic); pass the state file that snapshot create wrote, not the memory file or another file")]
    NotASnapshot(PathBuf),
    #[error("snapshot state {path} is truncated: it has {actual} bytes, fewer than the {HEADER_LEN}-byte header; the write or copy was cut short, take the snapshot again")]
    TruncatedHeader { path: PathBuf, actual: u64 },
    #[error("snapshot state {path} is truncated or its header is damaged: the header says {expected} bytes, the file has {actual}; take the snapshot again or use an intact copy")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot state {path} has {extra} bytes of trailing data or its header is damaged: the header says {expected} bytes, the file has {actual}; take the snapshot again or use an intact copy", extra = actual.saturating_sub(*expected))]
    TrailingData {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot state {path} declares a {len}-byte payload, more than the {max}-byte limit; the file is damaged or was not written by Ember", max = MAX_PAYLOAD_LEN)]
    PayloadTooLarge { path: PathBuf, len: u64 },
    #[error("snapshot state {path} is corrupt: it records CRC64 {stored:#018x} but its contents give {computed:#018x}; take the snapshot again or use an intact copy")]
    ChecksumMismatch {
        path: PathBuf,
        stored: u64,
        computed: u64,
    },
    #[error("snapshot state {path} has format version {found}; this Ember reads {supported}; restore it with the Ember release that created it", supported = format::versions_list())]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("snapshot state {path} has a valid checksum but its state does not decode ({reason}); it was written by an incompatible build of Ember with the same format version")]
    Decode { path: PathBuf, reason: String },
    #[error("cannot open memory file {0}: {1}")]
    OpenMemory(PathBuf, io::Error),
    #[error("memory file {0} is not a regular file")]
    MemoryNotAFile(PathBuf),
    #[error("memory file {mem_path} is {actual} bytes but snapshot state {state_path} records {expected}; pass the memory file saved with this snapshot")]
    MemorySizeMismatch {
        mem_path: PathBuf,
        state_path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
