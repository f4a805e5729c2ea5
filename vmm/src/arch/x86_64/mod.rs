//! The x86_64 guest: physical memory layout, boot parameters and per-vCPU set-up.
//!
//! Layout of guest physical memory (addresses are fixed; sizes follow `mem_size_mib`):
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT
//! 0x0000_7000  boot_params (the "zero page")
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, then PDPT (0xa000) and PD (0xb000): identity map of the first 1 GiB
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: the MP table
//! 0x0010_0000  kernel (HIMEM_START)
//! ...          initrd, at the top of low RAM
//! 0xd000_0000  MMIO gap (768 MiB): virtio-mmio devices, IOAPIC, LAPIC, KVM's TSS
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3.25 GiB
//! ```

pub mod boot;
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;

use vm_memory::GuestAddress;

/// Where the GDT lives.
pub const GDT_START: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const IDT_START: u64 = 0x520;
/// The boot_params structure handed to the kernel in %rsi.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-table pages for the identity map used on 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the Extended BIOS Data Area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (640 KiB).
pub const LOW_MEM_END: u64 = 0xa0000;
/// Kernels are loaded at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM needs three pages for the real-mode TSS, inside the gap, out of the guest's way.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The identity-map page Intel's VMX needs, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// The IOAPIC and local APIC base addresses the MP table announces.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// I/O port the guest writes [`BOOT_COMPLETE_MAGIC`] to when it is up (see `devices::legacy`).
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The value that marks boot complete on [`BOOT_TIMER_PORT`].
pub const BOOT_COMPLETE_MAGIC: u8 = 123;

/// The guest RAM ranges for a guest of `mem_size` bytes: one range below the MMIO gap and,
/// when the guest is larger than the gap's start, a second one from 4 GiB up.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(ranges[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(ranges[0].1 + ranges[1].1, 4 << 30);
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let regions = [
            (GDT_START, 4 * 8),
            (IDT_START, 8),
            (ZERO_PAGE_START, 4096),
            (PML4_START, 4096),
            (PDPTE_START, 4096),
            (PDE_START, 4096),
            (CMDLINE_START, api::models::MAX_BOOT_ARGS_LEN as u64),
            (EBDA_START, LOW_MEM_END - EBDA_START),
        ];
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
            assert!(a.0 + a.1 <= HIMEM_START);
        }
        const { assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 4096) };
    }
}
