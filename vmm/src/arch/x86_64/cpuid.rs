//! Per-vCPU CPUID: what KVM supports on this host, with the topology fixed up so that the
//! guest sees one socket of `vcpu_count` single-threaded cores and its own APIC id on each
//! vCPU, plus the hypervisor bit and KVM's signature leaf.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const FEAT_ECX_TSC_DEADLINE: u32 = 1 << 24;
const FEAT_ECX_HYPERVISOR: u32 = 1 << 31;
const FEAT_EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// KVM's hypervisor signature, "KVMKVMKVM\0\0\0", as EBX/ECX/EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// The CPU vendor, which decides the topology leaves the guest reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Reads the vendor string from leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == LEAF_VENDOR) {
        Some(e) if [e.ebx, e.edx, e.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e] => {
            Vendor::Intel
        }
        Some(e) if [e.ebx, e.edx, e.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163] => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `count` things (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// What KVM offers beyond `KVM_GET_SUPPORTED_CPUID`, which leaves out features it emulates.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmulatedFeatures {
    /// The LAPIC TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`): cheaper than the
    /// one-shot APIC timer for a tickless guest.
    pub tsc_deadline: bool,
}

/// Fixes up the host-supported entries for vCPU `index` of `count`.
pub fn fix_entries(
    entries: &mut Vec<kvm_cpuid_entry2>,
    index: u8,
    count: u8,
    emulated: EmulatedFeatures,
) {
    let vendor = vendor(entries);
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC id [31:24], logical processors [23:16], CLFLUSH 64 bytes.
                e.ebx = (apic_id << 24) | (count32 << 16) | (8 << 8);
                e.ecx |= FEAT_ECX_HYPERVISOR;
                if emulated.tsc_deadline {
                    e.ecx |= FEAT_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= FEAT_EDX_HTT;
                } else {
                    e.edx &= !FEAT_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let cache_level = (e.eax >> 5) & 0x7;
                // Cores per package [31:26]; threads sharing the cache [25:14]: one thread per
                // core, so only the last-level (L3) cache is shared by all.
                let sharing = if cache_level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count32 - 1) << 26) | (sharing << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => fix_topology_leaf(e, apic_id, count),
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZE_IDS if vendor == Vendor::Amd => {
                // ApicIdSize [15:12] and number of cores minus one [7:0].
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count32 - 1);
            }
            LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // compute unit id; one thread per unit
                e.ecx = 0; // node 0, one node per processor
            }
            _ => {}
        }
    }
    ensure_hypervisor_leaf(entries);
}

/// Leaf 0xb / 0x1f: sub-leaf 0 is the SMT level (one thread), sub-leaf 1 the core level.
fn fix_topology_leaf(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u8) {
    e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    e.edx = apic_id;
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
        }
        1 => {
            e.eax = id_bits(count);
            e.ebx = u32::from(count);
            e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
        }
        _ => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = e.index;
        }
    }
}

/// Makes sure leaf 0x40000000 carries KVM's signature, so the guest finds its PV features.
fn ensure_hypervisor_leaf(entries: &mut Vec<kvm_cpuid_entry2>) {
    if let Some(e) = entries.iter_mut().find(|e| e.function == LEAF_HYPERVISOR) {
        [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
        return;
    }
    entries.push(kvm_cpuid_entry2 {
        function: LEAF_HYPERVISOR,
        eax: LEAF_HYPERVISOR + 1,
        ebx: KVM_SIGNATURE[0],
        ecx: KVM_SIGNATURE[1],
        edx: KVM_SIGNATURE[2],
        ..Default::default()
    });
}

/// The CPUID for vCPU `index` of `count`, from the host-supported set.
pub fn vcpu_cpuid(
    supported: &CpuId,
    index: u8,
    count: u8,
    emulated: EmulatedFeatures,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let mut entries = supported.as_slice().to_vec();
    fix_entries(&mut entries, index, count, emulated);
    CpuId::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        let mut v = leaf(LEAF_VENDOR, 0);
        [v.ebx, v.edx, v.ecx] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];
        let mut l2 = leaf(LEAF_CACHE_PARAMS, 2);
        l2.eax = 2 << 5 | 0x3;
        let mut l3 = leaf(LEAF_CACHE_PARAMS, 3);
        l3.eax = 3 << 5 | 0x3;
        vec![
            v,
            leaf(LEAF_FEATURES, 0),
            l2,
            l3,
            leaf(LEAF_TOPOLOGY, 0),
            leaf(LEAF_TOPOLOGY, 1),
            leaf(LEAF_TOPOLOGY, 2),
        ]
    }

    fn amd() -> Vec<kvm_cpuid_entry2> {
        let mut v = leaf(LEAF_VENDOR, 0);
        [v.ebx, v.edx, v.ecx] = [0x6874_7541, 0x6974_6e65, 0x444d_4163];
        vec![
            v,
            leaf(LEAF_FEATURES, 0),
            leaf(LEAF_EXT_FEATURES, 0),
            leaf(LEAF_AMD_SIZE_IDS, 0),
            leaf(LEAF_AMD_EXT_APIC_ID, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn tsc_deadline_is_offered_only_when_kvm_emulates_it() {
        let mut e = intel();
        fix_entries(&mut e, 0, 1, EmulatedFeatures::default());
        assert_eq!(find(&e, LEAF_FEATURES, 0).ecx & FEAT_ECX_TSC_DEADLINE, 0);
        fix_entries(&mut e, 0, 1, EmulatedFeatures { tsc_deadline: true });
        assert_ne!(find(&e, LEAF_FEATURES, 0).ecx & FEAT_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn vendors_are_recognised() {
        assert_eq!(vendor(&intel()), Vendor::Intel);
        assert_eq!(vendor(&amd()), Vendor::Amd);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = intel();
        fix_entries(&mut e, 3, 4, EmulatedFeatures::default());
        let l1 = find(&e, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & FEAT_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & FEAT_EDX_HTT, 0);
        let mut single = intel();
        fix_entries(&mut single, 0, 1, EmulatedFeatures::default());
        assert_eq!(find(&single, LEAF_FEATURES, 0).edx & FEAT_EDX_HTT, 0);
    }

    #[test]
    fn intel_cache_and_topology_leaves_match_core_count() {
        let mut e = intel();
        fix_entries(&mut e, 2, 6, EmulatedFeatures::default());
        assert_eq!(find(&e, LEAF_CACHE_PARAMS, 2).eax >> 26, 5);
        assert_eq!((find(&e, LEAF_CACHE_PARAMS, 2).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, LEAF_CACHE_PARAMS, 3).eax >> 14) & 0xfff, 5);
        let smt = find(&e, LEAF_TOPOLOGY, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_TYPE_SMT, 2)
        );
        let core = find(&e, LEAF_TOPOLOGY, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (3, 6, LEVEL_TYPE_CORE, 2)
        );
        let past = find(&e, LEAF_TOPOLOGY, 2);
        assert_eq!((past.ebx, past.ecx >> 8), (0, 0));
    }

    #[test]
    fn amd_leaves_count_cores() {
        let mut e = amd();
        fix_entries(&mut e, 1, 4, EmulatedFeatures::default());
        assert_ne!(find(&e, LEAF_EXT_FEATURES, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
        let sizes = find(&e, LEAF_AMD_SIZE_IDS, 0);
        assert_eq!((sizes.ecx & 0xff, (sizes.ecx >> 12) & 0xf), (3, 2));
        assert_eq!(find(&e, LEAF_AMD_EXT_APIC_ID, 0).eax, 1);
    }

    #[test]
    fn hypervisor_leaf_is_added_or_fixed() {
        let mut e = amd();
        fix_entries(&mut e, 0, 1, EmulatedFeatures::default());
        let h = find(&e, LEAF_HYPERVISOR, 0);
        assert_eq!([h.ebx, h.ecx, h.edx], KVM_SIGNATURE);
        let bytes: Vec<u8> = KVM_SIGNATURE.iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [
                id_bits(1),
                id_bits(2),
                id_bits(3),
                id_bits(4),
                id_bits(5),
                id_bits(32)
            ],
            [0, 1, 2, 2, 3, 5]
        );
    }
}
