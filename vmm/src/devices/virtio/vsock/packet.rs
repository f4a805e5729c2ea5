//! virtio-vsock packets in descriptor chains: the 44-byte little-endian header
//! (`struct virtio_vsock_hdr`, virtio spec 5.10.6) and its payload.
//!
//! Everything here comes from the guest. A transmit chain must be driver-readable and inside
//! guest memory; its header may span descriptors. The header's length field is capped at
//! [`MAX_PAYLOAD`] and must fit in the chain; only stream sockets, only packets from the
//! guest's own cid to the host, only known operations, and no payload on control packets.
//! Faults found after the addresses checked out carry the header, so that the connection it
//! names can be reset. A receive chain must be device-writable and inside guest memory, with
//! room for the header. Chains longer than the ring or cut short (a loop, a next index
//! outside the ring) are refused.

use crate::devices::virtio::WholeChain;
use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{HOST_CID, QUEUE_SIZE};

/// Bytes in a packet header.
pub const HEADER_LEN: usize = 44;
/// Largest payload accepted from or given to the guest (Linux's own limit).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// `VIRTIO_VSOCK_TYPE_STREAM`; SEQPACKET is not offered.
pub const TYPE_STREAM: u16 = 1;
/// Most descriptors a chain may have: a ring's worth.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// SHUTDOWN flags: the sender will receive no more, will send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations (virtio spec 5.10.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    pub fn raw(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A packet header, field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain or its header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("the chain was cut short: it loops or leaves the ring")]
    ChainCut,
    #[error("a transmit descriptor is device-writable")]
    WritableInTx,
    #[error("a receive descriptor is driver-readable")]
    ReadableInRx,
    #[error("a descriptor lies outside guest memory")]
    OutsideMemory,
    #[error("the chain holds {0} bytes, fewer than a {HEADER_LEN}-byte header")]
    ShortChain(usize),
    #[error("source cid {0} is not the guest's")]
    BadSrcCid(u64),
    #[error("destination cid {0} is not the host's")]
    BadDstCid(u64),
    #[error("socket type {} is not a stream", .0.kind)]
    BadType(Header),
    #[error("operation {} is unknown", .0.op)]
    UnknownOp(Header),
    #[error("a payload of {} bytes is over the {MAX_PAYLOAD}-byte limit", .0.len)]
    PayloadTooLong(Header),
    #[error("a payload of {len} bytes reaches past the chain's {1} bytes", len = .0.len)]
    PayloadBeyondChain(Header, usize),
    #[error("a control packet (operation {}) carries a payload", .0.op)]
    PayloadOnControl(Header),
}

impl PacketError {
    /// The header of a packet whose addresses are valid but whose content is not: the
    /// connection it names is reset.
    pub fn reset_target(&self) -> Option<&Header> {
        match self {
            PacketError::BadType(h)
            | PacketError::UnknownOp(h)
            | PacketError::PayloadTooLong(h)
            | PacketError::PayloadBeyondChain(h, _)
            | PacketError::PayloadOnControl(h) => Some(h),
            _ => None,
        }
    }

    /// True for faults of the chain itself rather than of the header in it.
    pub fn is_chain_fault(&self) -> bool {
        matches!(
            self,
            PacketError::TooManyDescriptors
                | PacketError::ChainCut
                | PacketError::WritableInTx
                | PacketError::ReadableInRx
                | PacketError::OutsideMemory
        )
    }
}

/// A checked packet from the guest; its payload is in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPacket {
    pub header: Header,
    pub op: Op,
    pub payload_len: usize,
}

/// The checked buffers of one chain, all in one direction and inside guest memory. Kept
/// between chains so that parsing allocates nothing; it never holds more than a ring's worth.
#[derive(Debug)]
pub struct Segments {
    list: Vec<(GuestAddress, usize)>,
    total: usize,
}

impl Default for Segments {
    fn default() -> Self {
        Self {
            list: Vec::with_capacity(MAX_DESCRIPTORS),
            total: 0,
        }
    }
}

impl Segments {
    /// Takes the chain's descriptors, which must all be device-writable (`writable`) or all
    /// driver-readable, and inside guest memory.
    pub fn load<I>(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: I,
        writable: bool,
    ) -> Result<(), PacketError>
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        self.list.clear();
        self.total = 0;
        let mut descriptors = WholeChain::new(chain);
        for desc in &mut descriptors {
            if self.list.len() == MAX_DESCRIPTORS {
                return Err(PacketError::TooManyDescriptors);
            }
            match (desc.is_write_only(), writable) {
                (true, false) => return Err(PacketError::WritableInTx),
                (false, true) => return Err(PacketError::ReadableInRx),
                _ => {}
            }
            let len = desc.len() as usize;
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                return Err(PacketError::OutsideMemory);
            }
            self.list.push((desc.addr(), len));
            // At most 256 lengths below 2^32 each: no overflow in a 64-bit usize.
            self.total += len;
        }
        if descriptors.was_cut() {
            return Err(PacketError::ChainCut);
        }
        Ok(())
    }

    /// Bytes the chain holds.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Calls `f(address, range in the stream)` for each piece of `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), PacketError>,
    ) -> Result<(), PacketError> {
        let (mut start, end) = (offset, offset + len);
        let mut seg_start = 0usize;
        for &(addr, seg_len) in &self.list {
            let seg_end = seg_start + seg_len;
            if start < end && start < seg_end {
                let n = (end.min(seg_end)) - start;
                let at = addr
                    .checked_add((start - seg_start) as u64)
                    .ok_or(PacketError::OutsideMemory)?;
                f(at, start - offset..start - offset + n)?;
                start += n;
            }
            seg_start = seg_end;
        }
        if start < end {
            return Err(PacketError::ShortChain(self.total));
        }
        Ok(())
    }

    /// Copies bytes `[offset, offset + buf.len())` of the chain into `buf`.
    pub fn read(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), PacketError> {
        self.for_each_piece(offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
                .map_err(|_| PacketError::OutsideMemory)
        })
    }

    /// Copies `data` into the chain at `offset`.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        data: &[u8],
    ) -> Result<(), PacketError> {
        self.for_each_piece(offset, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr)
                .map_err(|_| PacketError::OutsideMemory)
        })
    }
}

/// Parses a transmit chain from a guest with context id `guest_cid`; the payload lands in
/// `payload` (at least [`MAX_PAYLOAD`] bytes).
pub fn parse_tx<I>(
    segments: &mut Segments,
    mem: &GuestMemoryMmap,
    chain: I,
    guest_cid: u64,
    payload: &mut [u8],
) -> Result<TxPacket, PacketError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    segments.load(mem, chain, false)?;
    if segments.total() < HEADER_LEN {
        return Err(PacketError::ShortChain(segments.total()));
    }
    let mut raw = [0u8; HEADER_LEN];
    segments.read(mem, 0, &mut raw)?;
    let header = Header::from_bytes(&raw);
    let op = check_header(&header, guest_cid)?;
    let len = header.len as usize;
    if len > MAX_PAYLOAD || len > payload.len() {
        return Err(PacketError::PayloadTooLong(header));
    }
    if HEADER_LEN + len > segments.total() {
        return Err(PacketError::PayloadBeyondChain(header, segments.total()));
    }
    if op != Op::Rw && len != 0 {
        return Err(PacketError::PayloadOnControl(header));
    }
    segments.read(mem, HEADER_LEN, &mut payload[..len])?;
    Ok(TxPacket {
        header,
        op,
        payload_len: len,
    })
}

/// Checks who sent the packet and to whom first, then what it is.
fn check_header(header: &Header, guest_cid: u64) -> Result<Op, PacketError> {
    if header.src_cid != guest_cid {
        return Err(PacketError::BadSrcCid(header.src_cid));
    }
    if header.dst_cid != HOST_CID {
        return Err(PacketError::BadDstCid(header.dst_cid));
    }
    if header.kind != TYPE_STREAM {
        return Err(PacketError::BadType(*header));
    }
    Op::from_raw(header.op).ok_or(PacketError::UnknownOp(*header))
}

/// Takes a receive chain; returns the payload bytes it has room for (capped at
/// [`MAX_PAYLOAD`]).
pub fn load_rx<I>(
    segments: &mut Segments,
    mem: &GuestMemoryMmap,
    chain: I,
) -> Result<usize, PacketError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    segments.load(mem, chain, true)?;
    if segments.total() < HEADER_LEN {
        return Err(PacketError::ShortChain(segments.total()));
    }
    Ok((segments.total() - HEADER_LEN).min(MAX_PAYLOAD))
}

/// Writes a packet into the chain last given to [`load_rx`]; returns the used length.
pub fn write_rx(
    segments: &Segments,
    mem: &GuestMemoryMmap,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    segments.write(mem, 0, &header.to_bytes())?;
    segments.write(mem, HEADER_LEN, payload)?;
    // The chain was checked to hold both, and a payload is at most 64 KiB.
    Ok((HEADER_LEN + payload.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM_SIZE: usize = 0x40_0000;
    const GUEST_CID: u64 = 3;
    const BUF: u64 = 0x10_0000;

    /// Descriptors as (guest address, length, device-writable).
    type Chain = Vec<(u64, u32, bool)>;

    fn memory() -> GuestMemoryMmap {
        crate::vstate::memory::anonymous(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn header(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1025,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// Runs `parse_tx` on one chain of (addr, len, writable) descriptors.
    fn parse_chain(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
    ) -> Result<(TxPacket, Vec<u8>), PacketError> {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        parse_raw(mem, &raw)
    }

    fn parse_raw(
        mem: &GuestMemoryMmap,
        raw: &[RawDescriptor],
    ) -> Result<(TxPacket, Vec<u8>), PacketError> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        let mut payload = vec![0u8; MAX_PAYLOAD];
        let mut segments = Segments::default();
        parse_tx(&mut segments, mem, chain, GUEST_CID, &mut payload).map(|p| {
            let data = payload[..p.payload_len].to_vec();
            (p, data)
        })
    }

    fn put(mem: &GuestMemoryMmap, h: &Header, payload: &[u8]) {
        mem.write_slice(&h.to_bytes(), GuestAddress(BUF)).unwrap();
        mem.write_slice(payload, GuestAddress(BUF + HEADER_LEN as u64))
            .unwrap();
    }

    #[test]
    fn header_round_trips_in_wire_order() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 9,
            len: 10,
            kind: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0xaabb_ccdd,
            fwd_cnt: 0xffff_ffff,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08, "little endian");
        assert_eq!(&b[28..32], &[1, 0, 5, 0], "type then op");
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn packet_with_header_and_payload_in_one_or_many_descriptors() {
        let mem = memory();
        put(&mem, &header(5, 11), b"hello world");
        let (p, data) = parse_chain(&mem, &[(BUF, 55, false)]).unwrap();
        assert_eq!((p.op, data.as_slice()), (Op::Rw, &b"hello world"[..]));
        // Header split over two descriptors, payload in a third (Linux puts it separately).
        let (p, data) = parse_chain(
            &mem,
            &[
                (BUF, 20, false),
                (BUF + 20, 24, false),
                (BUF + 44, 11, false),
            ],
        )
        .unwrap();
        assert_eq!(
            (p.header.src_port, data.as_slice()),
            (5000, &b"hello world"[..])
        );
    }

    #[test]
    fn hostile_transmit_chains_are_refused() {
        let mem = memory();
        let beyond = MEM_SIZE as u64 + 0x1000;
        put(&mem, &header(5, 8), b"12345678");
        let cases: Vec<(&str, Chain, PacketError)> = vec![
            (
                "header in a writable descriptor",
                vec![(BUF, 52, true)],
                PacketError::WritableInTx,
            ),
            (
                "writable descriptor after the header",
                vec![(BUF, 44, false), (BUF + 44, 8, true)],
                PacketError::WritableInTx,
            ),
            (
                "short header",
                vec![(BUF, 40, false)],
                PacketError::ShortChain(40),
            ),
            (
                "descriptor outside memory",
                vec![(beyond, 52, false)],
                PacketError::OutsideMemory,
            ),
            (
                "descriptor straddling the end of memory",
                vec![(BUF, 44, false), (MEM_SIZE as u64 - 4, 8, false)],
                PacketError::OutsideMemory,
            ),
            (
                "payload beyond the buffers",
                vec![(BUF, 48, false)],
                PacketError::PayloadBeyondChain(header(5, 8), 48),
            ),
        ];
        for (name, chain, expected) in cases {
            assert_eq!(parse_chain(&mem, &chain).unwrap_err(), expected, "{name}");
        }
    }

    #[test]
    fn hostile_headers_are_refused_and_named() {
        let mem = memory();
        let mut h = header(5, 0);
        let mut cases: Vec<(&str, Header, PacketError)> = Vec::new();
        h.len = MAX_PAYLOAD as u32 + 1;
        cases.push(("len over the cap", h, PacketError::PayloadTooLong(h)));
        h.len = u32::MAX;
        cases.push(("len u32::MAX", h, PacketError::PayloadTooLong(h)));
        let mut h = header(5, 0);
        h.kind = 2;
        cases.push(("seqpacket", h, PacketError::BadType(h)));
        let mut h = header(5, 0);
        h.src_cid = 4;
        cases.push(("another guest's cid", h, PacketError::BadSrcCid(4)));
        let mut h = header(5, 0);
        h.dst_cid = 7;
        cases.push(("not for the host", h, PacketError::BadDstCid(7)));
        for op in [0u16, 8, 0xffff] {
            let h = header(op, 0);
            cases.push(("unknown op", h, PacketError::UnknownOp(h)));
        }
        let h = header(1, 4);
        cases.push(("payload on a request", h, PacketError::PayloadOnControl(h)));
        for (name, h, expected) in cases {
            put(&mem, &h, &[0u8; 4]);
            let err = parse_chain(&mem, &[(BUF, 0x2_0000, false)]).unwrap_err();
            assert_eq!(err, expected, "{name}");
        }
    }

    #[test]
    fn only_faults_with_good_addresses_reset_a_connection() {
        let h = header(9, 0);
        assert_eq!(PacketError::UnknownOp(h).reset_target(), Some(&h));
        assert_eq!(PacketError::BadSrcCid(4).reset_target(), None);
        assert_eq!(PacketError::ShortChain(3).reset_target(), None);
        assert!(PacketError::OutsideMemory.is_chain_fault());
    }

    #[test]
    fn descriptor_loop_ends_in_a_refusal_or_a_bounded_packet() {
        let mem = memory();
        put(&mem, &header(5, 0), b"");
        let raw = [
            RawDescriptor::from(Descriptor::new(BUF, 8, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(BUF + 8, 8, F_NEXT, 0)),
        ];
        // The chain repeats until the ring size bounds it; its bytes are the same 16
        // repeated, whose "header" has garbage addresses.
        assert!(parse_raw(&mem, &raw).is_err());
    }

    #[test]
    fn receive_chains_are_checked_and_filled() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let raw = [
            RawDescriptor::from(Descriptor::new(BUF, 30, F_WRITE | F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(BUF + 0x1000, 100, F_WRITE, 0)),
            RawDescriptor::from(Descriptor::new(BUF, 100, 0, 0)),
            RawDescriptor::from(Descriptor::new(BUF, 40, F_WRITE, 0)),
            RawDescriptor::from(Descriptor::new(MEM_SIZE as u64, 100, F_WRITE, 0)),
        ];
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut segments = Segments::default();
        let mut chains = q.iter(&mem).unwrap();
        let room = load_rx(&mut segments, &mem, chains.next().unwrap()).unwrap();
        assert_eq!(room, 130 - HEADER_LEN);
        let h = header(5, 6);
        assert_eq!(write_rx(&segments, &mem, &h, b"abcdef").unwrap(), 50);
        let mut back = [0u8; HEADER_LEN];
        mem.read_slice(&mut back[..30], GuestAddress(BUF)).unwrap();
        mem.read_slice(&mut back[30..], GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(Header::from_bytes(&back), h);
        let mut data = [0u8; 6];
        mem.read_slice(&mut data, GuestAddress(BUF + 0x1000 + 14))
            .unwrap();
        assert_eq!(&data, b"abcdef");
        let errors: Vec<PacketError> = chains
            .map(|c| load_rx(&mut segments, &mem, c).unwrap_err())
            .collect();
        assert_eq!(
            errors,
            [
                PacketError::ReadableInRx,
                PacketError::ShortChain(40),
                PacketError::OutsideMemory
            ]
        );
    }

    #[test]
    fn chains_longer_than_the_ring_are_refused() {
        let mem = memory();
        let segs: Vec<Descriptor> = (0..=MAX_DESCRIPTORS)
            .map(|i| Descriptor::new(BUF + i as u64, 1, 0, 0))
            .collect();
        let mut segments = Segments::default();
        assert_eq!(
            segments.load(&mem, segs.into_iter(), false),
            Err(PacketError::TooManyDescriptors)
        );
    }
}
