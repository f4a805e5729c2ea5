//! Linux boot protocol: loading the kernel (ELF `vmlinux` or `bzImage`) and initrd with
//! linux-loader, the command line, the e820 map and the zero page.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::{ram_ranges, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS": the setup header's magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The bzImage 64-bit entry point is 0x200 bytes into the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Errors while placing the kernel, initrd and boot data in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("boot-source.kernel_image_path: cannot open {0}: {1}")]
    OpenKernel(PathBuf, std::io::Error),
    #[error("boot-source.kernel_image_path: cannot read {0}: {1}")]
    ReadKernel(PathBuf, std::io::Error),
    #[error("boot-source.kernel_image_path: {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    #[error("boot-source.kernel_image_path: cannot load {0}: {1}")]
    LoadKernel(PathBuf, linux_loader::loader::Error),
    #[error("boot-source.initrd_path: cannot open {0}: {1}")]
    OpenInitrd(PathBuf, std::io::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel; give the guest more memory")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot copy initrd {0} into guest memory: {1}")]
    ReadInitrd(PathBuf, vm_memory::GuestMemoryError),
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line to guest memory: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write boot parameters to guest memory: {0}")]
    WriteBootParams(linux_loader::configurator::Error),
}

/// Where the loaded kernel starts and what the boot parameters need from it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: GuestAddress,
    /// A bzImage's own setup header, to be passed back in the zero page.
    pub setup_header: Option<setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub address: GuestAddress,
    pub size: u64,
}

/// The kernel formats Ember boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers, before any guest exists.
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    read_kernel_format(&mut file, path)
}

/// Reads the magic numbers at the start of an opened kernel image.
fn read_kernel_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    const HEAD_LEN: usize = 0x206;
    let mut head = Vec::with_capacity(HEAD_LEN);
    file.by_ref()
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| BootError::ReadKernel(path.into(), e))?;
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.len() == HEAD_LEN
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]])
            == SETUP_HEADER_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat(path.into()))
}

/// Loads the kernel at [`HIMEM_START`] and returns its entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    // Both loaders seek to absolute offsets, so the bytes read here need no rewind.
    let format = read_kernel_format(&mut file, path)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |e| BootError::LoadKernel(path.into(), e);
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_err)?,
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_err)?,
    };
    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
    };
    Ok(LoadedKernel {
        entry,
        end: GuestAddress(result.kernel_end),
        setup_header: result.setup_header,
    })
}

/// Opens the initrd and returns it with its size; it must be a regular file.
pub fn open_initrd(path: &Path) -> Result<(File, u64), BootError> {
    let open_err = |e| BootError::OpenInitrd(path.into(), e);
    let file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(std::io::Error::other("not a regular file")));
    }
    Ok((file, meta.len()))
}

/// Copies the initrd to the top of low RAM (below the MMIO gap), page aligned.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: GuestAddress,
) -> Result<LoadedInitrd, BootError> {
    let (mut file, size) = open_initrd(path)?;
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size,
    };
    let low_ram_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let address = low_ram_end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if address < kernel_end.raw_value() {
        return Err(too_large());
    }
    let count = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, count)
        .map_err(|e| BootError::ReadInitrd(path.into(), e))?;
    Ok(LoadedInitrd {
        address: GuestAddress(address),
        size,
    })
}

/// Writes the command line at [`CMDLINE_START`] and returns its length without the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, args: &str) -> Result<usize, BootError> {
    let mut cmdline = Cmdline::new(api::models::MAX_BOOT_ARGS_LEN).map_err(BootError::Cmdline)?;
    cmdline.insert_str(args).map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::WriteCmdline)?;
    Ok(args.len())
}

/// The e820 map for a guest of `mem_size` bytes: conventional memory up to the EBDA, then
/// everything from 1 MiB except the MMIO gap. The EBDA and the legacy hole stay reserved.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) = if start.raw_value() == 0 {
            (HIMEM_START, size - HIMEM_START)
        } else {
            (start.raw_value(), size)
        };
        map.push(entry(start, size, E820_RAM));
    }
    map
}

/// `boot_params` is plain old data (packed, no pointers), so any byte pattern is valid.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: `boot_params` is a `repr(C, packed)` struct of integers and arrays of integers, with
// no padding and no invalid bit patterns, which is what `ByteValued` requires.
unsafe impl ByteValued for ZeroPage {}

/// Fills and writes the zero page: loader identity, command line, initrd and e820 map.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let mut params = ZeroPage::default();
    let p = &mut params.0;
    if let Some(header) = kernel.setup_header {
        p.hdr = header;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = SETUP_HEADER_MAGIC;
    p.hdr.kernel_alignment = 0x0100_0000;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        // The initrd lies below the MMIO gap, so both values fit in 32 bits.
        p.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        p.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem_size);
    p.e820_entries = map.len() as u8;
    p.e820_table[..map.len()].copy_from_slice(&map);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::WriteBootParams)
}

/// Reads back the zero page (used by tests).
#[cfg(test)]
fn read_zero_page(mem: &GuestMemoryMmap) -> boot_params {
    mem.read_obj::<ZeroPage>(GuestAddress(ZERO_PAGE_START))
        .unwrap()
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn guest(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (a, s as usize))
            .collect();
        crate::vstate::memory::anonymous(&ranges).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ember-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn e820_covers_ram_and_skips_holes() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (HIMEM_START - EBDA_START));
        let big = e820_map(8 << 30);
        assert_eq!(big.len(), 4);
        let last = big[3];
        assert_eq!({ last.addr }, super::super::MMIO_GAP_END);
        assert!(big
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= 1 << 32));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let path = temp_file("garbage", b"this is not a kernel");
        let err = detect_kernel_format(&path).unwrap_err().to_string();
        assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
        let empty = temp_file("empty", b"");
        assert!(matches!(
            detect_kernel_format(&empty),
            Err(BootError::UnknownKernelFormat(_))
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = guest(64 << 20);
        let path = temp_file("initrd", &[7u8; 10_000]);
        let initrd = load_initrd(&mem, &path, GuestAddress(HIMEM_START + 0x1000)).unwrap();
        assert_eq!(initrd.address.raw_value() % PAGE_SIZE, 0);
        assert!(initrd.address.raw_value() + initrd.size <= 64 << 20);
        assert_eq!(mem.read_obj::<u8>(initrd.address).unwrap(), 7);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = guest(16 << 20);
        let path = temp_file("big-initrd", &vec![0u8; 15 << 20]);
        let err = load_initrd(&mem, &path, GuestAddress(4 << 20)).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_map() {
        let mem = guest(128 << 20);
        let len = load_cmdline(&mem, "console=ttyS0 quiet").unwrap();
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            end: GuestAddress(HIMEM_START),
            setup_header: None,
        };
        let initrd = LoadedInitrd {
            address: GuestAddress(0x400_0000),
            size: 1234,
        };
        write_zero_page(&mem, 128 << 20, &kernel, len, Some(initrd)).unwrap();
        let p = read_zero_page(&mem);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x400_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!(p.e820_entries, 3);
        let mut text = vec![0u8; len];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(text, b"console=ttyS0 quiet");
    }
}
