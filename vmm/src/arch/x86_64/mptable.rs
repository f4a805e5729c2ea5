//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its
//! CPUs, the IOAPIC and the ISA interrupt routing. It sits in the EBDA, where Linux scans.
//!
//! Layout: floating pointer (16 bytes), then the configuration table header (44 bytes) and
//! its entries: one per CPU, the ISA bus, the IOAPIC, one per IOAPIC pin, and LINT0/LINT1.

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::{APIC_START, EBDA_START, IOAPIC_START, LOW_MEM_END};

/// IOAPIC pins, all routed 1:1 from ISA IRQs.
pub const IOAPIC_PINS: u8 = 24;
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature with FPU and APIC feature bits, as firmware reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors while building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table; the limit is {max}", max = max_cpus())]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Size of the table for `cpus` processors.
fn table_len(cpus: usize) -> usize {
    FLOATING_POINTER_LEN + HEADER_LEN + 20 * cpus + 8 + 8 + 8 * usize::from(IOAPIC_PINS) + 2 * 8
}

/// The most CPUs whose table fits between the EBDA start and the end of low memory.
pub fn max_cpus() -> usize {
    let space = (LOW_MEM_END - EBDA_START) as usize;
    (space - table_len(0)) / 20
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// Builds the table's bytes for `cpus` processors, to be placed at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || usize::from(cpus) > max_cpus() {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // Type, polarity/trigger "conforms to bus" (0), source bus 0 IRQ `pin` -> IOAPIC pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
    }
    // LINT0 of every local APIC takes ExtINT from the PIC; LINT1 takes NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let header_addr = base + FLOATING_POINTER_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN + entries.len());
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[MP_SPEC_REV, 0]); // checksum patched below
    header.extend_from_slice(b"EMBER   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&[0; 4]); // OEM table pointer
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut table = Vec::with_capacity(table_len(usize::from(cpus)));
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(header_addr as u32).to_le_bytes());
    table.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&header);
    Ok(table)
}

/// Writes the table for `cpus` processors at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let table = build(cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid_for_every_cpu_count() {
        for cpus in 1..=32u8 {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(t.len(), table_len(usize::from(cpus)));
            assert_eq!(sum(&t[..16]), 0, "floating pointer, {cpus} cpus");
            assert_eq!(sum(&t[16..]), 0, "config table, {cpus} cpus");
        }
    }

    #[test]
    fn structure_points_and_counts_right() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(u64::from(ptr), EBDA_START + 16);
        assert_eq!(&t[16..20], b"PCMP");
        let len = u16::from_le_bytes(t[20..22].try_into().unwrap());
        assert_eq!(usize::from(len), t.len() - 16);
        let count = u16::from_le_bytes(t[16 + 34..16 + 36].try_into().unwrap());
        assert_eq!(count, 4 + 2 + 24 + 2);
        // First processor entry is the enabled bootstrap CPU with APIC id 0.
        assert_eq!(
            &t[60..64],
            &[
                ENTRY_PROCESSOR,
                0,
                APIC_VERSION,
                CPU_ENABLED | CPU_BOOTSTRAP
            ]
        );
        assert_eq!(&t[80..84], &[ENTRY_PROCESSOR, 1, APIC_VERSION, CPU_ENABLED]);
    }

    #[test]
    fn thirty_two_cpus_fit_in_the_ebda_and_more_do_not() {
        assert!(max_cpus() >= 32);
        assert!(table_len(32) as u64 <= LOW_MEM_END - EBDA_START);
        assert!(matches!(
            build(0, EBDA_START),
            Err(MpTableError::TooManyCpus(0))
        ));
        let too_many = u8::try_from(max_cpus() + 1).unwrap();
        assert!(build(too_many, EBDA_START).is_err());
    }

    #[test]
    fn written_table_is_found_in_the_ebda() {
        let mem = crate::vstate::memory::anonymous(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut magic = [0u8; 4];
        mem.read_slice(&mut magic, GuestAddress(EBDA_START))
            .unwrap();
        assert_eq!(&magic, b"_MP_");
    }
}
