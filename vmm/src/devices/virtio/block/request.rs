//! virtio-blk requests: a descriptor chain parsed into a [`Request`] (header, data buffers,
//! status byte), then executed against the disk file.
//!
//! The chain comes from the guest and is checked before any I/O: header readable and 16
//! bytes, data buffers in the direction the request type needs, non-empty and inside guest
//! memory, the byte range inside the disk, status byte writable. A request that fails these
//! checks gets IOERR (UNSUPP for unknown types) in its status byte when it has one. A chain
//! cut short (a loop, a next index outside the ring) has none the device can trust.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use crate::devices::virtio::WholeChain;
use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the device id returned by GET_ID.
pub const ID_BYTES: usize = 20;

const HEADER_LEN: u32 = 16;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
}

/// Why a descriptor chain is not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the chain has fewer than two descriptors")]
    TooShort,
    #[error("the chain was cut short: it loops, leaves the ring or passes 4 GiB")]
    ChainCut,
    #[error("the header descriptor is device-writable")]
    HeaderWritable,
    #[error("the header descriptor holds {0} bytes, fewer than 16")]
    HeaderTooShort(u32),
    #[error("the header lies outside guest memory")]
    HeaderOutsideMemory,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("the status descriptor is not device-writable or is empty")]
    BadStatus,
    #[error("a data descriptor has the wrong direction for this request")]
    DataDirection,
    #[error("a data descriptor is empty")]
    EmptyData,
    #[error("a data descriptor lies outside guest memory")]
    DataOutsideMemory,
    #[error("the request's length is not a whole number of sectors")]
    PartialSector,
    #[error("the request reaches past the end of the disk")]
    PastEnd,
    #[error("the GET_ID buffer is missing")]
    MissingIdBuffer,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

/// A descriptor as this module needs it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// The outcome of parsing: the request, or the error and where to report it.
pub type ParseResult = Result<Request, (RequestError, Option<GuestAddress>)>;

impl Request {
    /// Parses and checks a chain against guest memory and a disk of `capacity` sectors.
    pub fn parse(chain: DescriptorChain<&GuestMemoryMmap>, capacity: u64) -> ParseResult {
        let mem = chain.memory();
        let mut whole = WholeChain::new(chain.clone());
        let descs: Vec<Desc> = whole
            .by_ref()
            .map(|d| Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        // Its last descriptor is not the status byte the driver meant: nowhere to report.
        if whole.was_cut() {
            return Err((RequestError::ChainCut, None));
        }
        // Where an error can be reported: a writable, non-empty last descriptor.
        let status = descs
            .last()
            .filter(|d| d.writable && d.len >= 1)
            .map(|d| d.addr);
        Self::parse_descs(mem, &descs, capacity).map_err(|e| (e, status))
    }

    fn parse_descs(
        mem: &GuestMemoryMmap,
        descs: &[Desc],
        capacity: u64,
    ) -> Result<Self, RequestError> {
        let [header, data @ .., status] = descs else {
            return Err(RequestError::TooShort);
        };
        if header.writable {
            return Err(RequestError::HeaderWritable);
        }
        if header.len < HEADER_LEN {
            return Err(RequestError::HeaderTooShort(header.len));
        }
        let kind_raw: u32 = mem
            .read_obj(header.addr)
            .map_err(|_| RequestError::HeaderOutsideMemory)?;
        let sector_addr = header
            .addr
            .checked_add(8)
            .ok_or(RequestError::HeaderOutsideMemory)?;
        let sector: u64 = mem
            .read_obj(sector_addr)
            .map_err(|_| RequestError::HeaderOutsideMemory)?;
        let kind = match kind_raw {
            T_IN => RequestKind::Read,
            T_OUT => RequestKind::Write,
            T_FLUSH => RequestKind::Flush,
            T_GET_ID => RequestKind::GetId,
            other => return Err(RequestError::UnsupportedType(other)),
        };
        if !status.writable
            || status.len < 1
            || !GuestMemoryBackend::check_range(mem, status.addr, 1)
        {
            return Err(RequestError::BadStatus);
        }
        let data = if kind == RequestKind::Flush {
            &[][..]
        } else {
            data
        };
        let device_writes = matches!(kind, RequestKind::Read | RequestKind::GetId);
        for d in data {
            if d.writable != device_writes {
                return Err(RequestError::DataDirection);
            }
            if d.len == 0 {
                return Err(RequestError::EmptyData);
            }
            if !GuestMemoryBackend::check_range(mem, d.addr, d.len as usize) {
                return Err(RequestError::DataOutsideMemory);
            }
        }
        match kind {
            RequestKind::Read | RequestKind::Write => check_range(sector, data, capacity)?,
            RequestKind::GetId if data.is_empty() => return Err(RequestError::MissingIdBuffer),
            _ => {}
        }
        let data = data.iter().map(|d| (d.addr, d.len)).collect();
        Ok(Self {
            kind,
            sector,
            data,
            status: status.addr,
        })
    }

    /// Bytes of data the request moves.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, len)| u64::from(*len)).sum()
    }
}

/// The request's bytes must be whole sectors and end within the disk.
fn check_range(sector: u64, data: &[Desc], capacity: u64) -> Result<(), RequestError> {
    let len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector);
    }
    let end = sector
        .checked_add(len >> SECTOR_SHIFT)
        .ok_or(RequestError::PastEnd)?;
    if end > capacity {
        return Err(RequestError::PastEnd);
    }
    Ok(())
}

/// The disk behind a block device.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    /// Size in sectors (a trailing partial sector is not addressable).
    pub capacity: u64,
    pub read_only: bool,
    /// Honour FLUSH with fdatasync (cache_type "Writeback").
    pub flush_to_disk: bool,
    pub id: [u8; ID_BYTES],
}

/// What executing a request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    /// Bytes written into guest memory, status byte included.
    pub used_len: u32,
}

impl Disk {
    /// Performs the request and writes its status byte.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> Outcome {
        let (status, written) = match self.perform(mem, request) {
            Ok(written) => (S_OK, written),
            Err(status) => (status, 0),
        };
        // The status address was checked at parse time; a failure here means the guest
        // changed its memory layout, which it cannot, so there is nothing more to do.
        let _ = mem.write_obj(status, request.status);
        Outcome {
            status,
            used_len: written.saturating_add(1),
        }
    }

    /// Returns the bytes written to guest memory, or the status to report.
    fn perform(&mut self, mem: &GuestMemoryMmap, request: &Request) -> Result<u32, u8> {
        match request.kind {
            RequestKind::Read => {
                self.seek(request.sector)?;
                for (addr, len) in &request.data {
                    mem.read_exact_volatile_from(*addr, &mut self.file, *len as usize)
                        .map_err(|_| S_IOERR)?;
                }
                u32::try_from(request.data_len()).map_err(|_| S_IOERR)
            }
            RequestKind::Write if self.read_only => Err(S_IOERR),
            RequestKind::Write => {
                self.seek(request.sector)?;
                for (addr, len) in &request.data {
                    mem.write_all_volatile_to(*addr, &mut self.file, *len as usize)
                        .map_err(|_| S_IOERR)?;
                }
                Ok(0)
            }
            RequestKind::Flush => {
                if self.flush_to_disk && !self.read_only {
                    self.file.sync_data().map_err(|_| S_IOERR)?;
                }
                Ok(0)
            }
            RequestKind::GetId => {
                let (addr, len) = request.data[0];
                let n = (len as usize).min(ID_BYTES);
                mem.write_slice(&self.id[..n], addr).map_err(|_| S_IOERR)?;
                Ok(n as u32)
            }
        }
    }

    fn seek(&mut self, sector: u64) -> Result<(), u8> {
        self.file
            .seek(SeekFrom::Start(sector << SECTOR_SHIFT))
            .map(|_| ())
            .map_err(|_| S_IOERR)
    }
}
