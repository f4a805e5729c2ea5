//! The state file's bytes: wrapping a serialised state in the envelope (header, CRC) and taking
//! it apart again with every check. Pure functions over byte slices, so they can be tested
//! and fuzzed without files; the layout is in the parent module's docs.

use std::path::Path;

use crc::{Crc, CRC_64_XZ};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::SnapshotError;

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// The format version this build writes. Version 2 added the kind of the memory file (full
/// or diff) at the end of the microVM's state; version 1 files hold full memory files.
pub const FORMAT_VERSION: u32 = 2;
/// The format versions this build reads.
pub const SUPPORTED_VERSIONS: &[u32] = &[1, FORMAT_VERSION];
/// Bytes before the payload: magic, version, memory file size, payload length.
pub const HEADER_LEN: u64 = 28;
/// Bytes after the payload: the CRC64.
pub const CRC_LEN: u64 = 8;
/// The largest payload a state file may carry. Real states are kilobytes (a vCPU's state is
/// a few KiB, 32 of them well under 1 MiB); the cap only bounds what a damaged or hostile
/// header can make the loader read and allocate.
pub const MAX_PAYLOAD_LEN: u64 = 64 << 20;

const HEADER: usize = HEADER_LEN as usize;
const CRC: usize = CRC_LEN as usize;
const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_XZ);

/// The fixed fields at the start of a state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version of the payload.
    pub version: u32,
    /// Size in bytes of the memory file saved with this state.
    pub mem_file_size: u64,
    /// Length in bytes of the serialised state.
    pub payload_len: u64,
}

impl Header {
    /// The length of the whole file this header announces (saturating for hostile lengths).
    pub fn file_len(&self) -> u64 {
        self.payload_len.saturating_add(HEADER_LEN + CRC_LEN)
    }

    fn to_bytes(self) -> [u8; HEADER] {
        let mut bytes = [0u8; HEADER];
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&self.version.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.mem_file_size.to_le_bytes());
        bytes[20..28].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes
    }

    /// The fields after the magic; the caller has checked the magic.
    fn from_bytes(bytes: &[u8; HEADER]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        Header {
            version: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            mem_file_size: u64_at(12),
            payload_len: u64_at(20),
        }
    }
}

/// The checksum stored at the end of a state file image made by [`encode`] (or checked by
/// [`decode`]): what tags the memory file saved with it (see `api::memfile`).
pub fn stored_checksum(image: &[u8]) -> u64 {
    image
        .last_chunk::<CRC>()
        .map_or(0, |stored| u64::from_le_bytes(*stored))
}

/// The CRC-64/XZ of `bytes`, as the state file's checksum computes it.
pub fn checksum(bytes: &[u8]) -> u64 {
    CRC64.checksum(bytes)
}

/// Serialises `state` into a complete state file image that records `mem_file_size`.
pub fn encode<T: Serialize + ?Sized>(
    state: &T,
    mem_file_size: u64,
) -> Result<Vec<u8>, SnapshotError> {
    // Serialise straight after a placeholder header, so the payload is never copied.
    let bytes = postcard::to_extend(state, vec![0u8; HEADER])
        .map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let len = bytes.len() - HEADER;
    if len as u64 > MAX_PAYLOAD_LEN {
        return Err(SnapshotError::StateTooLarge { len });
    }
    let header = Header {
        version: FORMAT_VERSION,
        mem_file_size,
        payload_len: len as u64,
    };
    let mut bytes = bytes;
    bytes[..HEADER].copy_from_slice(&header.to_bytes());
    let crc = CRC64.checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Checks what the first bytes of a state file tell against the file's real length: the
/// magic, a complete header, the announced length, the payload limit. `start` holds the
/// file's first `min(file_len, HEADER_LEN)` bytes; `path` is only for messages.
pub fn check_header(start: &[u8], file_len: u64, path: &Path) -> Result<Header, SnapshotError> {
    let magic_len = start.len().min(MAGIC.len());
    if start[..magic_len] != MAGIC[..magic_len] {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    let Some(fixed) = start.first_chunk::<HEADER>() else {
        return Err(SnapshotError::TruncatedHeader {
            path: path.to_path_buf(),
            actual: start.len() as u64,
        });
    };
    let header = Header::from_bytes(fixed);
    let expected = header.file_len();
    if file_len < expected {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual: file_len,
        });
    }
    if file_len > expected {
        return Err(SnapshotError::TrailingData {
            path: path.to_path_buf(),
            expected,
            actual: file_len,
        });
    }
    if header.payload_len > MAX_PAYLOAD_LEN {
        return Err(SnapshotError::PayloadTooLarge {
            path: path.to_path_buf(),
            len: header.payload_len,
        });
    }
    Ok(header)
}

/// Takes a whole state file image apart: header checks, then CRC, then version, then the
/// payload, which must decode into a `T` with no bytes left over. `path` is only for
/// messages. For a state whose shape changed between format versions, see [`decode_with`].
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
) -> Result<(Header, T), SnapshotError> {
    decode_with(bytes, path, |_, payload| decode_exact(payload))
}

/// A payload that must decode into a `T` with no bytes left over.
pub fn decode_exact<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let (state, rest) = postcard::take_from_bytes::<T>(payload).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes left over after the state", rest.len()));
    }
    Ok(state)
}

/// [`decode`] with the payload handed to `payload` with its (supported) format version, for
/// states that read older versions' shapes.
pub fn decode_with<T>(
    bytes: &[u8],
    path: &Path,
    payload: impl FnOnce(u32, &[u8]) -> Result<T, String>,
) -> Result<(Header, T), SnapshotError> {
    let start = &bytes[..bytes.len().min(HEADER)];
    let header = check_header(start, bytes.len() as u64, path)?;
    // check_header saw exactly HEADER_LEN + payload + CRC_LEN bytes, so neither split fails.
    let (Some((body, stored)), Some(payload_bytes)) = (
        bytes.split_last_chunk::<CRC>(),
        bytes.get(HEADER..bytes.len() - CRC),
    ) else {
        return Err(SnapshotError::TruncatedHeader {
            path: path.to_path_buf(),
            actual: bytes.len() as u64,
        });
    };
    let stored = u64::from_le_bytes(*stored);
    let computed = CRC64.checksum(body);
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    if !SUPPORTED_VERSIONS.contains(&header.version) {
        return Err(SnapshotError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: header.version,
        });
    }
    let state = payload(header.version, payload_bytes).map_err(|reason| SnapshotError::Decode {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok((header, state))
}

/// The supported versions for messages: "format version 1" or "format versions 1, 2".
pub(super) fn versions_list() -> String {
    match SUPPORTED_VERSIONS {
        [only] => format!("format version {only}"),
        many => {
            let list: Vec<String> = many.iter().map(u32::to_string).collect();
            format!("format versions {}", list.join(", "))
        }
    }
}
