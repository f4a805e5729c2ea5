use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Mode {
    Running,
    Halted { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Queue {
    size: u16,
    ready: bool,
    desc_table: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SampleState {
    name: String,
    regs: Vec<u64>,
    mode: Mode,
    irq: Option<u32>,
    queues: Vec<Queue>,
    config_space: Vec<u8>,
}

fn sample() -> SampleState {
    SampleState {
        name: "vda".to_string(),
        regs: vec![0, 1, u64::MAX, 0x8000_0000_0000_0000],
        mode: Mode::Halted {
            reason: "paused".to_string(),
        },
        irq: Some(5),
        queues: vec![
            Queue {
                size: 256,
                ready: true,
                desc_table: 0x1000_0000,
            },
            Queue {
                size: 0,
                ready: false,
                desc_table: 0,
            },
        ],
        config_space: (0..=255).collect(),
    }
}

/// A small state, so that exhaustive loops over its file stay fast.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Small {
    value: u32,
    label: String,
}

fn small() -> Small {
    Small {
        value: 0xdead_beef,
        label: "ember".to_string(),
    }
}

const MEM_SIZE: u64 = 256 << 20;

/// A state file image built by hand, independently of `encode`: header fields as given, then
/// the payload and a CRC-64/XZ computed here.
fn envelope(version: u32, mem_file_size: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"EMBERSNP".to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&mem_file_size.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("write test file");
}

fn load_small(path: &Path) -> Result<LoadedState<Small>, SnapshotError> {
    load_state::<Small>(path)
}

/// Files in `dir` other than `keep`: leftovers such as temporary files.
fn others_in(dir: &Path, keep: &[&str]) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| !keep.iter().any(|k| p.file_name() == Some(k.as_ref())))
        .collect()
}

#[test]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.snap");
    save_state(&path, &sample(), MEM_SIZE).expect("save");
    let loaded = load_state::<SampleState>(&path).expect("load");
    assert_eq!(loaded.state, sample());
    assert_eq!(loaded.path, path);
    assert_eq!(loaded.mem_file_size(), MEM_SIZE);
    assert_eq!(loaded.header.version, FORMAT_VERSION);
    let file_len = fs::metadata(&path).expect("stat").len();
    assert_eq!(loaded.header.file_len(), file_len);
    assert_eq!(file_len, HEADER_LEN + loaded.header.payload_len + CRC_LEN);
    let mode = fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o077, 0, "a snapshot is private to its owner");
    assert_eq!(others_in(dir.path(), &["vm.snap"]), Vec::<PathBuf>::new());
    // The checksum that tags the memory file: the file's last 8 bytes, and another state's
    // differs.
    let bytes = fs::read(&path).expect("read");
    assert_eq!(loaded.checksum, stored_checksum(&bytes));
    assert_eq!(
        loaded.checksum.to_le_bytes(),
        bytes[bytes.len() - 8..],
        "the checksum is the file's trailer"
    );
    let mut other = sample();
    other.regs[0] = 1;
    assert_ne!(
        stored_checksum(&encode(&other, MEM_SIZE).expect("encode")),
        loaded.checksum
    );
}

#[test]
fn round_trip_in_memory_with_extreme_values() {
    let mut state = sample();
    state.name = String::new();
    state.regs = vec![u64::MAX; 64];
    state.irq = None;
    state.mode = Mode::Running;
    for mem in [0, 1, u64::MAX] {
        let bytes = encode(&state, mem).expect("encode");
        let (header, back) = decode::<SampleState>(&bytes, Path::new("x")).expect("decode");
        assert_eq!(back, state);
        assert_eq!(header.mem_file_size, mem);
    }
}

#[test]
fn saving_again_replaces_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.snap");
    save_state(&path, &small(), 4096).expect("first save");
    let mut second = small();
    second.value = 7;
    save_state(&path, &second, 8192).expect("second save");
    let loaded = load_small(&path).expect("load");
    assert_eq!(loaded.state, second);
    assert_eq!(loaded.mem_file_size(), 8192);
    assert_eq!(others_in(dir.path(), &["vm.snap"]), Vec::<PathBuf>::new());
}

/// The exact bytes of a known state: catches any silent change to the envelope, to postcard's
/// encoding or to the CRC, each of which would make old snapshots unreadable.
#[test]
fn golden_bytes() {
    let bytes = encode(&small(), 0x1000).expect("encode");
    let payload = [
        0xef, 0xfd, 0xb6, 0xf5, 0x0d, 5, b'e', b'm', b'b', b'e', b'r',
    ];
    assert_eq!(bytes, envelope(2, 0x1000, &payload));
    let crc: [u8; 8] = bytes[39..].try_into().expect("8 bytes");
    assert_eq!(u64::from_le_bytes(crc), 0x7567_a873_364d_5e75);
    // The check value of CRC-64/XZ: the algorithm is the one the docs name.
    let xz = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    assert_eq!(xz.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
}

/// A toy device with host resources given at restore time, saved through a file.
#[derive(Debug)]
struct ToyDevice {
    host_path: PathBuf,
    counter: u64,
    queue: Queue,
}

#[derive(Debug, thiserror::Error)]
#[error("toy device: {0}")]
struct ToyError(&'static str);

impl Persist for ToyDevice {
    type State = (u64, Queue);
    type Args = PathBuf;
    type Error = ToyError;

    fn save(&self) -> Result<Self::State, ToyError> {
        Ok((self.counter, self.queue.clone()))
    }

    fn restore(host_path: PathBuf, state: &Self::State) -> Result<Self, ToyError> {
        if state.1.size > 1024 {
            return Err(ToyError("queue too large"));
        }
        Ok(ToyDevice {
            host_path,
            counter: state.0,
            queue: state.1.clone(),
        })
    }
}

#[test]
fn persist_states_go_through_a_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.snap");
    let device = ToyDevice {
        host_path: PathBuf::from("/old"),
        counter: 41,
        queue: sample().queues[0].clone(),
    };
    save_state(&path, &device.save().expect("save"), 0).expect("write");
    let loaded = load_state::<<ToyDevice as Persist>::State>(&path).expect("load");
    let restored = ToyDevice::restore(PathBuf::from("/new"), &loaded.state).expect("restore");
    assert_eq!(restored.counter, 41);
    assert_eq!(restored.queue, device.queue);
    assert_eq!(restored.host_path, PathBuf::from("/new"));
    let mut bad = loaded.state;
    bad.1.size = 4096;
    assert!(ToyDevice::restore(PathBuf::new(), &bad).is_err());
}

#[test]
fn truncation_at_every_byte_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cut.snap");
    let full = encode(&small(), MEM_SIZE).expect("encode");
    for len in 0..full.len() {
        write(&path, &full[..len]);
        let err = load_small(&path).expect_err("a truncated file must not load");
        let actual = len as u64;
        match err {
            SnapshotError::TruncatedHeader { actual: a, .. } if len < 28 => assert_eq!(a, actual),
            SnapshotError::Truncated {
                expected,
                actual: a,
                ..
            } if len >= 28 => {
                assert_eq!((expected, a), (full.len() as u64, actual));
            }
            other => panic!("cut at {len}: unexpected {other:?}"),
        }
        let in_memory = decode::<Small>(&full[..len], &path).expect_err("truncated");
        assert_eq!(in_memory.to_string(), err.to_string());
    }
}

/// Which error a flipped bit at `offset` of an intact file must give.
fn expect_flip_error(offset: usize, err: &SnapshotError) -> bool {
    match offset {
        0..=7 => matches!(err, SnapshotError::NotASnapshot(_)),
        // The payload length: the file no longer has the announced length.
        20..=27 => matches!(
            err,
            SnapshotError::Truncated { .. } | SnapshotError::TrailingData { .. }
        ),
        // Version, memory size, payload, CRC: the checksum catches it, even in the version.
        _ => matches!(err, SnapshotError::ChecksumMismatch { .. }),
    }
}

#[test]
fn every_flipped_bit_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flip.snap");
    let full = encode(&small(), MEM_SIZE).expect("encode");
    for offset in 0..full.len() {
        for bit in 0..8 {
            let mut bytes = full.clone();
            bytes[offset] ^= 1 << bit;
            write(&path, &bytes);
            let err = load_small(&path).expect_err("a flipped bit must not load");
            assert!(
                expect_flip_error(offset, &err),
                "bit {bit} of byte {offset}: unexpected {err:?}"
            );
            let in_memory = decode::<Small>(&bytes, &path).expect_err("flipped");
            assert_eq!(in_memory.to_string(), err.to_string());
        }
    }
}

#[test]
fn trailing_garbage_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("long.snap");
    let full = encode(&small(), MEM_SIZE).expect("encode");
    for extra in [1usize, 7, 8, 4096] {
        let mut bytes = full.clone();
        bytes.resize(full.len() + extra, 0);
        write(&path, &bytes);
        match load_small(&path) {
            Err(
                e @ SnapshotError::TrailingData {
                    expected, actual, ..
                },
            ) => {
                assert_eq!(actual - expected, extra as u64);
                assert!(e
                    .to_string()
                    .contains(&format!("{extra} bytes of trailing data")));
            }
            other => panic!("{extra} extra bytes: unexpected {other:?}"),
        }
    }
    // Two snapshots concatenated.
    write(&path, &[full.clone(), full].concat());
    assert!(matches!(
        load_small(&path),
        Err(SnapshotError::TrailingData { .. })
    ));
}

#[test]
fn other_format_versions_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.snap");
    let payload = postcard::to_allocvec(&small()).expect("serialise");
    for version in [0, 3, 1 << 16, u32::MAX] {
        write(&path, &envelope(version, MEM_SIZE, &payload));
        let err = load_small(&path).expect_err("wrong version");
        assert!(
            matches!(err, SnapshotError::UnsupportedVersion { found, .. } if found == version),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("format version {version};")),
            "{message}"
        );
        assert!(
            message.contains("this Ember reads format versions 1, 2"),
            "{message}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
    for version in [1, 2] {
        write(&path, &envelope(version, MEM_SIZE, &payload));
        assert_eq!(
            load_small(&path).expect("a supported version").state,
            small()
        );
    }
}

#[test]
fn files_that_are_not_snapshots_are_named_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other");
    let cases: [(&[u8], bool); 6] = [
        (&[0u8; 4096], false), // a memory file given as the state file
        (b"{\"snapshot_path\": \"x\"}", false),
        (b"XYZ", false),
        (b"EMB", true), // a prefix of the magic: a cut-short snapshot
        (b"EMBERSNP", true),
        (b"", true),
    ];
    for (bytes, truncated) in cases {
        write(&path, bytes);
        let err = load_small(&path).expect_err("not a snapshot");
        match (truncated, &err) {
            (false, SnapshotError::NotASnapshot(p)) => assert_eq!(p, &path),
            (true, SnapshotError::TruncatedHeader { actual, .. }) => {
                assert_eq!(*actual, bytes.len() as u64)
            }
            _ => panic!("{bytes:?}: unexpected {err:?}"),
        }
    }
    write(&path, &[0u8; 64]);
    let message = load_small(&path).expect_err("zeros").to_string();
    assert!(
        message.contains("not an Ember snapshot state file"),
        "{message}"
    );
    assert!(message.contains("not the memory file"), "{message}");
}

#[test]
fn hostile_lengths_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.snap");
    // A header announcing an enormous payload in a small file: refused as truncated.
    let mut bytes = encode(&small(), MEM_SIZE).expect("encode");
    for claimed in [u64::MAX, u64::MAX - 35, 1 << 40, MAX_PAYLOAD_LEN + 1] {
        bytes[20..28].copy_from_slice(&claimed.to_le_bytes());
        write(&path, &bytes);
        assert!(
            matches!(load_small(&path), Err(SnapshotError::Truncated { .. })),
            "claimed {claimed}"
        );
    }
    // A file that really is as long as its oversized header says (sparse: costs no disk):
    // refused by the limit before any of it is read.
    let file = fs::File::create(&path).expect("create");
    let mut header = b"EMBERSNP".to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&MEM_SIZE.to_le_bytes());
    header.extend_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
    (&file).write_all(&header).expect("write header");
    file.set_len(HEADER_LEN + MAX_PAYLOAD_LEN + 1 + CRC_LEN)
        .expect("extend");
    let err = load_small(&path).expect_err("over the limit");
    assert!(
        matches!(err, SnapshotError::PayloadTooLarge { len, .. } if len == MAX_PAYLOAD_LEN + 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("67108864-byte limit"), "{err}");
}

#[test]
fn payloads_that_do_not_decode_are_refused() {
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Bigger {
        value: u32,
        label: String,
        more: u64,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.snap");
    save_state(&path, &small(), 0).expect("save");
    let err = load_state::<Bigger>(&path).expect_err("another type");
    assert!(matches!(err, SnapshotError::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("does not decode"), "{err}");

    // Valid data followed by bytes the state does not account for.
    let mut payload = postcard::to_allocvec(&small()).expect("serialise");
    payload.extend_from_slice(&[1, 2, 3]);
    write(&path, &envelope(1, 0, &payload));
    let err = load_small(&path).expect_err("leftover bytes");
    assert!(err.to_string().contains("3 bytes left over"), "{err}");

    // Not UTF-8 where a String goes; a string length past the end; an empty payload.
    let bad_payloads: [&[u8]; 3] = [&[1, 2, 0xff, 0xfe], &[1, 200, b'a'], &[]];
    for payload in bad_payloads {
        write(&path, &envelope(1, 0, payload));
        let err = load_small(&path).expect_err("bad payload");
        assert!(matches!(err, SnapshotError::Decode { .. }), "{err:?}");
    }
}

#[test]
fn a_state_over_the_limit_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.snap");
    let state = vec![0u8; MAX_PAYLOAD_LEN as usize];
    // Its length prefix makes the payload just over the limit.
    let err = save_state(&path, &state, 0).expect_err("too large");
    assert!(
        matches!(err, SnapshotError::StateTooLarge { .. }),
        "{err:?}"
    );
    assert!(!path.exists());
    assert_eq!(others_in(dir.path(), &[]), Vec::<PathBuf>::new());
}

#[test]
fn the_memory_file_must_have_the_recorded_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_path = dir.path().join("vm.snap");
    let mem_path = dir.path().join("vm.mem");
    save_state(&state_path, &small(), 8192).expect("save");
    let loaded = load_small(&state_path).expect("load");
    fs::File::create(&mem_path)
        .and_then(|f| f.set_len(8192))
        .expect("memory file");
    let file = loaded.open_memory_file(&mem_path).expect("right size");
    assert_eq!(file.metadata().expect("stat").len(), 8192);

    for wrong in [0, 4096, 8191, 8193, 1 << 30] {
        fs::File::create(&mem_path)
            .and_then(|f| f.set_len(wrong))
            .expect("memory file");
        let err = loaded.open_memory_file(&mem_path).expect_err("wrong size");
        match &err {
            SnapshotError::MemorySizeMismatch {
                expected, actual, ..
            } => assert_eq!((*expected, *actual), (8192, wrong)),
            other => panic!("{wrong}: unexpected {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&mem_path.display().to_string()),
            "{message}"
        );
        assert!(
            message.contains(&state_path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("pass the memory file saved with this snapshot"));
    }
    let missing = dir.path().join("missing.mem");
    assert!(matches!(
        check_memory_file(&missing, 8192, &state_path),
        Err(SnapshotError::OpenMemory(p, _)) if p == missing
    ));
    assert!(matches!(
        check_memory_file(dir.path(), 8192, &state_path),
        Err(SnapshotError::MemoryNotAFile(_))
    ));
}

#[test]
fn a_missing_or_odd_state_path_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.snap");
    let err = load_small(&missing).expect_err("missing");
    assert!(matches!(err, SnapshotError::OpenState(..)), "{err:?}");
    assert!(err.to_string().contains("missing.snap"), "{err}");
    assert!(matches!(
        load_small(dir.path()),
        Err(SnapshotError::StateNotAFile(_))
    ));
    let err =
        save_state(&dir.path().join("no/such/dir/x.snap"), &small(), 0).expect_err("no directory");
    assert!(matches!(err, SnapshotError::CreateTemp { .. }), "{err:?}");
    let err = save_state(Path::new("/"), &small(), 0).expect_err("no file name");
    assert!(matches!(err, SnapshotError::CreateTemp { .. }), "{err:?}");
}

#[test]
fn a_failing_write_leaves_the_previous_file_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.snap");
    let enospc = || io::Error::from_raw_os_error(libc::ENOSPC);
    // Nothing there before: nothing there after.
    let err = write_file_atomically(&path, |f| {
        f.write_all(b"EMBERSNP half")?;
        Err(enospc())
    })
    .expect_err("disk full");
    assert!(!path.exists());
    assert_eq!(others_in(dir.path(), &[]), Vec::<PathBuf>::new());
    assert!(matches!(err, SnapshotError::Write { .. }));

    save_state(&path, &small(), 4096).expect("save");
    let before = fs::read(&path).expect("read");
    let err = write_file_atomically(&path, |f| {
        f.write_all(&before[..before.len() / 2])?;
        Err(enospc())
    })
    .expect_err("disk full");
    let message = err.to_string();
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains("the previous file there, if any, is intact"));
    assert_eq!(fs::read(&path).expect("read"), before);
    assert_eq!(load_small(&path).expect("still loads").state, small());
    assert_eq!(others_in(dir.path(), &["vm.snap"]), Vec::<PathBuf>::new());
}

#[test]
fn a_failing_rename_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A non-empty directory at the target path: rename(2) cannot replace it.
    let target = dir.path().join("taken");
    fs::create_dir(&target).expect("mkdir");
    write(&target.join("inside"), b"x");
    let err = save_state(&target, &small(), 0).expect_err("rename over a directory");
    assert!(matches!(err, SnapshotError::Rename { .. }), "{err:?}");
    assert_eq!(others_in(dir.path(), &["taken"]), Vec::<PathBuf>::new());
}

/// A small tmpfs mounted for one test, unmounted when dropped (even when the test fails).
struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    /// None where this process cannot mount (not root, no CAP_SYS_ADMIN, no mount binary).
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "ember-snap-test",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(SmallTmpfs(dir))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(self.0.path()).status();
        if !matches!(unmounted, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
        }
    }
}

#[test]
fn a_full_filesystem_keeps_the_previous_snapshot_and_a_retry_works() {
    let Some(tmpfs) = SmallTmpfs::mount("64k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let path = tmpfs.0.path().join("vm.snap");
    save_state(&path, &small(), 4096).expect("a small state fits");
    let before = fs::read(&path).expect("read");
    let big = vec![0x5au8; 256 << 10];
    let err = save_state(&path, &big, 4096).expect_err("does not fit");
    match &err {
        SnapshotError::Write { source, .. } | SnapshotError::Sync { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{err}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(fs::read(&path).expect("read"), before);
    assert_eq!(load_small(&path).expect("still loads").state, small());
    assert_eq!(
        others_in(tmpfs.0.path(), &["vm.snap"]),
        Vec::<PathBuf>::new()
    );
    // With the space the failed attempt took given back, a new save succeeds.
    let mut retry = small();
    retry.value = 2;
    save_state(&path, &retry, 4096).expect("retry");
    assert_eq!(load_small(&path).expect("load").state, retry);
}

/// xorshift64: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max_len: u64) -> Vec<u8> {
        let len = self.next() % (max_len + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_files_never_panic() {
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let valid = encode(&sample(), MEM_SIZE).expect("encode");
    for round in 0..3000 {
        let bytes = match round % 4 {
            // Pure noise.
            0 => noise.bytes(128),
            // The magic, then noise.
            1 => [&MAGIC[..], &noise.bytes(128)].concat(),
            // A valid envelope around a noise payload: only the state decoder stands guard.
            2 => envelope(1, MEM_SIZE, &noise.bytes(400)),
            // A valid file with a few random bytes overwritten.
            _ => {
                let mut bytes = valid.clone();
                for _ in 0..1 + noise.next() % 4 {
                    let at = (noise.next() % bytes.len() as u64) as usize;
                    bytes[at] = noise.next() as u8;
                }
                bytes
            }
        };
        // Ok or Err are both fine; a panic fails the test.
        let _ = decode::<SampleState>(&bytes, Path::new("noise"));
        let _ = decode::<Small>(&bytes, Path::new("noise"));
    }
}

#[test]
fn prepared_files_replace_their_targets_only_when_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mem, state) = (dir.path().join("vm.mem"), dir.path().join("vm.state"));
    write(&mem, b"old memory");
    write(&state, b"old state");
    let prepared = prepare_file(&mem, |f| f.write_all(b"new memory")).expect("prepare");
    let failed = prepare_file(&state, |_| Err(io::Error::other("disk full")));
    assert!(matches!(failed, Err(SnapshotError::Write { .. })));
    drop(prepared);
    assert_eq!(fs::read(&mem).expect("mem"), b"old memory");
    assert_eq!(fs::read(&state).expect("state"), b"old state");
    assert_eq!(
        others_in(dir.path(), &["vm.mem", "vm.state"]),
        Vec::<PathBuf>::new()
    );
    let mem_file = prepare_file(&mem, |f| f.write_all(b"new memory")).expect("prepare");
    let state_file = prepare_file(&state, |f| f.write_all(b"new state")).expect("prepare");
    mem_file.commit().expect("commit");
    state_file.commit().expect("commit");
    assert_eq!(fs::read(&mem).expect("mem"), b"new memory");
    assert_eq!(fs::read(&state).expect("state"), b"new state");
    assert_eq!(
        others_in(dir.path(), &["vm.mem", "vm.state"]),
        Vec::<PathBuf>::new()
    );
}

/// A pid no process can have: one above the kernel's limit.
fn impossible_pid() -> u32 {
    let max = fs::read_to_string("/proc/sys/kernel/pid_max").expect("read pid_max");
    max.trim().parse::<u32>().expect("pid_max is a number") + 1
}

#[test]
fn a_save_removes_what_a_writer_that_died_left_for_the_same_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = impossible_pid();
    let me = std::process::id();
    let stale = [
        format!(".vm.mem.{dead}.0.tmp"),
        format!(".vm.mem.{dead}.17.tmp"),
    ];
    let kept = [
        // This process's own (a save in progress) and a running process's.
        format!(".vm.mem.{me}.4000000000.tmp"),
        ".vm.mem.1.0.tmp".to_string(),
        // Other targets' leftovers.
        format!(".vm.state.{dead}.0.tmp"),
        format!(".vm.{dead}.0.tmp"),
        format!(".vm.mem.x.{dead}.0.tmp"),
        // Names that are not exactly ours.
        format!("vm.mem.{dead}.0.tmp"),
        format!(".vm.mem.{dead}.0.tmp.old"),
        format!(".vm.mem.{dead}.tmp"),
        format!(".vm.mem.{dead}.0.1.tmp"),
        format!(".vm.mem.0{dead}.0.tmp"),
        format!(".vm.mem.+{dead}.0.tmp"),
        format!(".vm.mem.{dead}.00.tmp"),
        format!(".vm.mem.{dead}.x.tmp"),
        ".vm.mem.-1.0.tmp".to_string(),
        ".vm.mem.0.0.tmp".to_string(),
        ".vm.mem.2147483648.0.tmp".to_string(),
        ".vm.mem.4294967296.0.tmp".to_string(),
    ];
    for name in stale.iter().chain(&kept) {
        write(&dir.path().join(name), b"guest memory");
    }
    // Right names, but not regular files: a symbolic link (to a file that must survive) and
    // a directory.
    let outside = tempfile::tempdir().expect("tempdir");
    let precious = outside.path().join("precious");
    write(&precious, b"precious");
    let link = dir.path().join(format!(".vm.mem.{dead}.1.tmp"));
    std::os::unix::fs::symlink(&precious, &link).expect("symlink");
    let subdir = dir.path().join(format!(".vm.mem.{dead}.2.tmp"));
    fs::create_dir(&subdir).expect("mkdir");

    write_file_atomically(&dir.path().join("vm.mem"), |f| f.write_all(b"new memory"))
        .expect("save");

    for name in &stale {
        assert!(!dir.path().join(name).exists(), "{name} is still there");
    }
    for name in &kept {
        let contents = fs::read(dir.path().join(name)).expect(name);
        assert_eq!(contents, b"guest memory", "{name}");
    }
    assert!(fs::symlink_metadata(&link).expect("link").is_symlink());
    assert_eq!(fs::read(&precious).expect("precious"), b"precious");
    assert!(subdir.is_dir());
    assert_eq!(
        fs::read(dir.path().join("vm.mem")).expect("mem"),
        b"new memory"
    );
    let mut keep: Vec<&str> = kept.iter().map(String::as_str).collect();
    let (link_name, subdir_name) = (
        format!(".vm.mem.{dead}.1.tmp"),
        format!(".vm.mem.{dead}.2.tmp"),
    );
    keep.extend(["vm.mem", link_name.as_str(), subdir_name.as_str()]);
    assert_eq!(others_in(dir.path(), &keep), Vec::<PathBuf>::new());
}
