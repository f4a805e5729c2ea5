//! Whole-microVM snapshots: [`MicrovmState`] composes the parts' states (machine
//! configuration, memory layout, VM, vCPUs, devices), [`Vmm::save_snapshot`] writes it with
//! the guest's memory, and [`Vmm::restore`] builds a new VM from the two files.
//!
//! # Saving
//!
//! On the VMM thread (under its seccomp filter) with every vCPU paused. Devices first, then
//! the VM's interrupt controllers and clock, then each vCPU on its own thread: device state
//! goes before KVM state so that an interrupt a device raised while being saved is already in
//! the controllers when they are read (see [`crate::device_manager`]). The whole state is
//! encoded before any file is written, so a state that cannot be encoded leaves the disk as
//! it was. Then the memory file is written, and the state file, recording the memory file's
//! size, each to a temporary file next to its target and flushed ([`prepare_file`]); only
//! once both are on disk are they renamed into place, memory file first. A full disk or any
//! error while writing leaves the previous files at both paths intact and the VM paused and
//! resumable.
//!
//! With dirty page tracking on ([`crate::vstate::dirty`]), the dirty pages are read before
//! the files are written (which clears KVM's log) and cleared from the VMM's bitmaps once
//! both files are in place, or handed back to them if anything failed, so that the next Diff
//! has every page written since the last snapshot that succeeded. A Diff writes only those
//! pages into a sparse memory file, and its state records, besides the kind, checksums of a
//! few pages it left out ([`MemoryFileKind::Diff`]).
//!
//! # Restoring
//!
//! In a fresh process, before anything runs and before the VMM thread's seccomp filter goes
//! on: the caller has loaded and checked the state file and the memory file
//! ([`crate::snapshot::load_state`], [`crate::snapshot::check_memory_file`]). The state is
//! checked against itself (vCPU count, memory layout, memory file size) before KVM is
//! touched; a Diff's memory file must be merged (its sampled pages read back as they were);
//! then the VM and its controllers are restored, the memory file is mapped
//! privately, the devices and vCPUs are restored, and the caller starts the vCPUs paused or
//! running.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use api::models::{MachineConfig, VmConfig, MAX_VCPUS};
use api::requests::{SnapshotLoadParams, SnapshotType};
use event_manager::{EventManager, SubscriberOps};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::ram_ranges;
use crate::device_manager::{
    DeviceOverrides, DeviceStateError, DeviceStates, MmioDeviceManager, VirtioHandle,
};
use crate::devices::bus::lock;
use crate::devices::legacy::{
    BootTimer, BootTimerArgs, BootTimerState, I8042Args, I8042State, LegacyState, SerialArgs,
    SerialConsole, SerialConsoleState, I8042,
};
use crate::devices::virtio::block::Block;
use crate::metrics::{DeviceCounters, VcpuExitCounters};
use crate::snapshot::{
    checksum, decode_exact, encode, load_state_with, prepare_file, stored_checksum, LoadedState,
    Persist, SnapshotError,
};
use crate::vstate::dirty::{self, DirtyError, DirtyPages};
use crate::vstate::kvm::{open_kvm, KvmVm};
use crate::vstate::memory;
use crate::vstate::vcpu::{check_vcpu_states, Vcpu, VcpuError, VcpuState, VcpuStateError};
use crate::vstate::vm_state::{VmState, VmStateError};
use crate::{
    eventfd_err, legacy_devices, EventFdTrigger, ExitWatcher, Subscriber, Vmm, VmmError,
    VmmOptions, VCPU_ANSWER_TIMEOUT,
};

/// The machine configuration a snapshot was taken with. Its own type, not the API's
/// `MachineConfig`, whose optional fields are skipped when absent, which the state file's
/// encoding (not self-describing) cannot carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMachine {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
}

/// One guest RAM region: its guest address and size. The regions lie back to back in the
/// memory file, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub base: u64,
    pub size: u64,
}

/// Everything a snapshot's state file holds (format version 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicrovmState {
    pub machine: SavedMachine,
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
    /// What the memory file saved with this state holds.
    pub memory_file: MemoryFileKind,
}

/// What a snapshot's memory file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryFileKind {
    /// Every page of guest memory.
    Full,
    /// Only the pages written since the previous snapshot of this VM (or since its boot or
    /// restore); the others are holes. Loadable once merged onto the previous snapshot's
    /// memory file. `samples` are pages it does not hold, to tell a merged file from one
    /// that is not (see [`check_diff_merged`]).
    Diff { samples: Vec<PageSample> },
}

/// A page of guest memory that a diff memory file does not hold, by its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSample {
    /// Offset of the page in the memory file.
    pub offset: u64,
    /// CRC-64/XZ of the page's [`memory::PAGE_SIZE`] bytes.
    pub crc: u64,
}

/// Refuses a memory file tagged with another state file's checksum (see `api::memfile`);
/// an untagged one passes.
fn check_pair(
    loaded: &LoadedState<MicrovmState>,
    mem_file: &File,
    mem_path: &Path,
) -> Result<(), PersistError> {
    let tagged = api::memfile::pair_tag(mem_file)
        .map_err(|e| PersistError::ReadMemory(mem_path.to_path_buf(), e))?;
    match tagged {
        Some(tagged) if tagged != loaded.checksum => Err(PersistError::OtherState {
            state: loaded.path.clone(),
            mem: mem_path.to_path_buf(),
            tagged,
            expected: loaded.checksum,
            hint: match loaded.state.memory_file {
                MemoryFileKind::Diff { .. } => {
                    " (for a Diff snapshot: merge its memory file onto this one first, with emberctl snapshot merge)"
                }
                MemoryFileKind::Full => {
                    " (a diff merged into it since, or a save interrupted between its two renames)"
                }
            },
        }),
        _ => Ok(()),
    }
}

/// How many clean pages a diff snapshot samples.
const DIFF_SAMPLES: usize = 16;

/// The state of format version 1: a [`MicrovmState`] before the memory file's kind was
/// recorded; its memory files are full.
#[derive(Deserialize)]
struct MicrovmStateV1 {
    machine: SavedMachine,
    memory: Vec<MemoryRegionState>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DeviceStates,
}

impl MicrovmState {
    /// Decodes the payload of a state file of format `version`, older ones included.
    pub fn decode_payload(version: u32, payload: &[u8]) -> Result<Self, String> {
        if version > 1 {
            return decode_exact(payload);
        }
        let v1: MicrovmStateV1 = decode_exact(payload)?;
        Ok(MicrovmState {
            machine: v1.machine,
            memory: v1.memory,
            vm: v1.vm,
            vcpus: v1.vcpus,
            devices: v1.devices,
            memory_file: MemoryFileKind::Full,
        })
    }
}

/// Why a snapshot could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot save the devices: {0}")]
    SaveDevices(DeviceStateError),
    #[error("cannot save the legacy devices: {0}")]
    SaveLegacy(String),
    #[error("cannot save the VM's state: {0}")]
    SaveVm(VmStateError),
    #[error("cannot save the vCPUs' state: {0}")]
    SaveVcpu(VcpuError),
    #[error("cannot write the snapshot: {0}")]
    Write(SnapshotError),
    #[error(transparent)]
    Load(SnapshotError),
    #[error("{0}")]
    Request(String),
    #[error("snapshot state {path}: {reason}; the snapshot state is damaged")]
    BadState { path: PathBuf, reason: String },
    #[error("cannot restore the VM's interrupt controllers and clock: {0}")]
    RestoreVm(VmStateError),
    #[error("cannot restore the devices: {0}")]
    RestoreDevices(DeviceStateError),
    #[error("cannot restore the legacy devices: {0}")]
    RestoreLegacy(String),
    #[error("cannot describe the restored devices for GET /vm/config: {0}")]
    DescribeDevices(DeviceStateError),
    #[error("cannot restore the vCPUs: {0}")]
    RestoreVcpu(VcpuStateError),
    #[error("a Diff snapshot needs dirty page tracking; enable track_dirty_pages in PUT /machine-config before boot, or in PUT /snapshot/load, or take a Full snapshot")]
    DiffWithoutTracking,
    #[error("cannot read the dirty pages: {0}")]
    DirtyPages(DirtyError),
    #[error("cannot read memory file {0}: {1}")]
    ReadMemory(PathBuf, std::io::Error),
    #[error("memory file {0} is being merged (emberctl snapshot merge holds it): load it once the merge is done")]
    MemoryBeingMerged(PathBuf),
    #[error("memory file {mem} was written with another state file than {state} (its tag names state checksum {tagged:#018x}, this state file's is {expected:#018x}){hint}; load each memory file with the state file saved with it")]
    OtherState {
        state: PathBuf,
        mem: PathBuf,
        tagged: u64,
        expected: u64,
        hint: &'static str,
    },
    #[error("snapshot state {state} is a Diff snapshot and memory file {mem} does not hold the pages the diff left out (the page at offset {offset:#x} differs): merge the diff memory file onto the memory file of the snapshot it follows (emberctl snapshot merge --base BASE_MEM --diff DIFF_MEM) and load the merged file")]
    DiffNotMerged {
        state: PathBuf,
        mem: PathBuf,
        offset: u64,
    },
}

impl Vmm {
    /// Writes a snapshot of this paused VM: guest memory to `mem_path` (every page, or for
    /// a Diff only those written since the last snapshot), then the state to `state_path`
    /// (see the module docs). With dirty page tracking on, the dirty pages are cleared once
    /// both files are in place, and kept for the next snapshot if anything fails. On error
    /// the VM is still paused and can be resumed, and the files previously at both paths are
    /// intact, unless renaming the state file into place fails after the memory file was
    /// (the error says which).
    pub fn save_snapshot(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        kind: SnapshotType,
    ) -> Result<(), VmmError> {
        if self.handles.is_empty() {
            return Err(VmmError::NotStarted);
        }
        let tracking = self.machine.track_dirty_pages;
        if kind == SnapshotType::Diff && !tracking {
            return Err(PersistError::DiffWithoutTracking.into());
        }
        let state = self.capture()?;
        let dirty = match tracking {
            true => Some(
                DirtyPages::fetch(&self.vm.fd, &self.guest_memory)
                    .map_err(PersistError::DirtyPages)?,
            ),
            false => None,
        };
        let written = self.write_snapshot(
            state,
            dirty.as_ref().filter(|_| kind == SnapshotType::Diff),
            state_path,
            mem_path,
        );
        match (&dirty, &written) {
            (Some(dirty), Ok(())) => dirty.forget(&self.guest_memory),
            (Some(dirty), Err(_)) => dirty.give_back(&self.guest_memory),
            (None, _) => {}
        }
        written
    }

    /// Writes the memory file (the `diff` pages only, when given) and the state file
    /// recording its kind, both prepared before either is renamed into place.
    fn write_snapshot(
        &self,
        mut state: MicrovmState,
        diff: Option<&DirtyPages>,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<(), VmmError> {
        let mem_size: u64 = state.memory.iter().map(|r| r.size).sum();
        if let Some(dirty) = diff {
            let samples = dirty::clean_samples(&self.guest_memory, dirty, DIFF_SAMPLES)
                .into_iter()
                .map(|(offset, page)| PageSample {
                    offset,
                    crc: checksum(&page),
                })
                .collect();
            state.memory_file = MemoryFileKind::Diff { samples };
        }
        let bytes = encode(&state, mem_size).map_err(PersistError::Write)?;
        let mem_file = prepare_file(mem_path, |file| {
            match diff {
                Some(dirty) => dirty::write_diff(&self.guest_memory, dirty, file)?,
                None => memory::dump(&self.guest_memory, file)?,
            }
            api::memfile::set_pair_tag(file, stored_checksum(&bytes)).map(|_| ())
        })
        .map_err(PersistError::Write)?;
        let state_file =
            prepare_file(state_path, |file| file.write_all(&bytes)).map_err(PersistError::Write)?;
        // Both files are on disk under temporary names: only a failed rename (not a full
        // disk) can now leave the new memory file beside the old state file.
        mem_file.commit().map_err(PersistError::Write)?;
        state_file.commit().map_err(PersistError::Write)?;
        Ok(())
    }

    /// The VM's whole state: devices, then the VM, then the vCPUs (see the module docs).
    fn capture(&self) -> Result<MicrovmState, PersistError> {
        let legacy = LegacyState {
            serial: lock(&self.serial)
                .save()
                .map_err(|e| PersistError::SaveLegacy(e.to_string()))?,
            i8042: lock(&self.i8042)
                .save()
                .map_err(|e| PersistError::SaveLegacy(e.to_string()))?,
            boot_timer: lock(&self.boot_timer)
                .save()
                .map_err(|e| PersistError::SaveLegacy(e.to_string()))?,
        };
        let virtio = self.mmio.save().map_err(PersistError::SaveDevices)?;
        let vm = self.vm.save().map_err(PersistError::SaveVm)?;
        let vcpus = self
            .handles
            .iter()
            .map(|h| h.save_state(VCPU_ANSWER_TIMEOUT))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PersistError::SaveVcpu)?;
        Ok(MicrovmState {
            machine: SavedMachine {
                vcpu_count: self.machine.vcpu_count,
                mem_size_mib: self.machine.mem_size_mib as u64,
            },
            memory: memory::layout(&self.guest_memory)
                .into_iter()
                .map(|(base, size)| MemoryRegionState { base, size })
                .collect(),
            vm,
            vcpus,
            devices: DeviceStates { legacy, virtio },
            memory_file: MemoryFileKind::Full,
        })
    }

    /// Loads the snapshot a `PUT /snapshot/load` names: reads and checks the state file and
    /// the memory file completely, then builds the VM from them with the overrides applied.
    /// Nothing runs yet: the caller starts it per `resume_vm`.
    pub fn load_snapshot(
        params: &SnapshotLoadParams,
        options: VmmOptions,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, VmmError> {
        let mem_path = params
            .mem_file()
            .map_err(|fault| PersistError::Request(fault.0))?;
        let loaded = load_state_with(&params.snapshot_path, MicrovmState::decode_payload)
            .map_err(PersistError::Load)?;
        let mem_file = loaded
            .open_memory_file(mem_path)
            .map_err(PersistError::Load)?;
        if let MemoryFileKind::Diff { samples } = &loaded.state.memory_file {
            check_diff_merged(samples, &mem_file, &loaded.path, mem_path)?;
        }
        check_pair(&loaded, &mem_file, mem_path)?;
        // Held as long as the file is mapped (the mapping keeps the file open): a merge
        // onto it would change this VM's memory under it, and is refused.
        match api::memfile::lock(&mem_file, libc::LOCK_SH) {
            Ok(true) => {}
            Ok(false) => return Err(PersistError::MemoryBeingMerged(mem_path.to_path_buf()).into()),
            Err(e) => return Err(PersistError::ReadMemory(mem_path.to_path_buf(), e).into()),
        }
        let overrides = DeviceOverrides {
            host_dev_names: params
                .network_overrides
                .iter()
                .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
                .collect(),
            vsock_uds_path: params.vsock_override.as_ref().map(|v| v.uds_path.clone()),
            vsock_guest_cid: params.vsock_override.as_ref().and_then(|v| v.guest_cid),
        };
        let track_dirty = params.track_dirty_pages;
        Self::restore(&loaded, mem_file, &overrides, options, console, track_dirty)
    }

    /// What this VM really has, as `GET /vm/config` reports it after a snapshot load:
    /// its machine configuration (dirty page tracking as loaded) and its devices as they
    /// are now, overrides applied; no boot source, since it did not boot from a kernel.
    pub fn restored_config(&self) -> Result<VmConfig, VmmError> {
        let devices = self.mmio.config().map_err(PersistError::DescribeDevices)?;
        Ok(VmConfig {
            machine_config: self.machine.clone(),
            drives: devices.drives,
            network_interfaces: devices.network_interfaces,
            vsock: devices.vsock,
            ..VmConfig::default()
        })
    }

    /// Builds a VM from a loaded snapshot and its checked memory file (see the module docs),
    /// tracking dirty pages from here on when `track_dirty`; its vCPUs are restored but not
    /// started: [`Vmm::start`] or [`Vmm::start_paused`].
    pub fn restore(
        loaded: &LoadedState<MicrovmState>,
        mem_file: File,
        overrides: &DeviceOverrides,
        options: VmmOptions,
        console: Box<dyn Write + Send>,
        track_dirty: bool,
    ) -> Result<Self, VmmError> {
        let state = &loaded.state;
        check_state(loaded)?;
        let vcpu_count = state.machine.vcpu_count;
        let vm =
            KvmVm::restore(open_kvm(vcpu_count)?, &state.vm).map_err(PersistError::RestoreVm)?;
        let layout: Vec<_> = state.memory.iter().map(|r| (r.base, r.size)).collect();
        let guest_memory = Arc::new(memory::map_file_private(mem_file, &layout, track_dirty)?);
        vm.register_memory(&guest_memory, track_dirty)?;

        let mut event_manager = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        let (stop_tx, stop_rx) = channel();
        let exits = ExitWatcher::new(stop_rx)?;
        let reset = EventFdTrigger(exits.reset_evt.try_clone().map_err(eventfd_err("i8042"))?);
        let stopped_evt = exits
            .vcpu_evt
            .try_clone()
            .map_err(eventfd_err("vCPU stops"))?;
        let exits = Arc::new(Mutex::new(exits));
        event_manager.add_subscriber(exits.clone());

        let legacy = legacy_devices(&vm, reset, options, console, Some(&state.devices.legacy))?;
        event_manager.add_subscriber(legacy.console_input);
        let mut buses = legacy.buses;
        let mmio = MmioDeviceManager::restore(
            &vm,
            &mut buses,
            &guest_memory,
            &state.devices.virtio,
            overrides,
        )
        .map_err(PersistError::RestoreDevices)?;
        let (counters, drives) =
            register_restored(&mmio, &mut event_manager, legacy.boot_timer.clone());
        let buses = Arc::new(buses);
        let exit_counters = Arc::new(VcpuExitCounters::default());
        let vcpus = state
            .vcpus
            .iter()
            .map(|saved| {
                let evt = stopped_evt.try_clone().map_err(eventfd_err("vCPU stops"))?;
                let (stops, exits) = (stop_tx.clone(), exit_counters.clone());
                let vcpu = Vcpu::new(&vm, saved.index, buses.clone(), stops, evt, exits)?;
                Vcpu::restore(vcpu, saved).map_err(|e| VmmError::from(PersistError::RestoreVcpu(e)))
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        Ok(Self {
            vcpus,
            handles: Vec::new(),
            vm,
            guest_memory,
            machine: MachineConfig {
                vcpu_count,
                mem_size_mib: usize::try_from(state.machine.mem_size_mib).unwrap_or(usize::MAX),
                track_dirty_pages: track_dirty,
                ..MachineConfig::default()
            },
            event_manager,
            exits,
            serial: legacy.serial,
            i8042: legacy.i8042,
            boot_timer: legacy.boot_timer,
            mmio,
            drives,
            counters,
            exit_counters,
        })
    }
}

/// Hands every restored virtio device to the event loop; returns the device counters (for
/// metrics) and the drives (for `PATCH /drives`).
fn register_restored(
    mmio: &MmioDeviceManager,
    event_manager: &mut EventManager<Subscriber>,
    boot_timer: Arc<Mutex<BootTimer>>,
) -> (DeviceCounters, Vec<Arc<Mutex<Block>>>) {
    let mut counters = DeviceCounters {
        boot_timer: Some(boot_timer),
        ..DeviceCounters::default()
    };
    let mut drives = Vec::new();
    for device in mmio.devices() {
        event_manager.add_subscriber(device.subscriber());
        match device {
            VirtioHandle::Block(block) => {
                let (id, c) = {
                    let b = lock(&block);
                    (b.drive_id.clone(), b.counters.clone())
                };
                counters.drives.push((id, c));
                drives.push(block);
            }
            VirtioHandle::Net(net) => {
                let n = lock(&net);
                counters.nets.push((n.iface_id.clone(), n.counters.clone()));
            }
            VirtioHandle::Vsock(vsock) => counters.vsock = Some(lock(&vsock).counters.clone()),
        }
    }
    (counters, drives)
}

/// The state agrees with itself and with the memory file's recorded size: vCPU count in
/// range and matching the saved vCPUs, memory regions exactly those a VM of that size has,
/// together as large as the memory file. Checked before KVM is touched.
fn check_state(loaded: &LoadedState<MicrovmState>) -> Result<(), PersistError> {
    let state = &loaded.state;
    let bad = |reason: String| PersistError::BadState {
        path: loaded.path.clone(),
        reason,
    };
    let vcpus = state.machine.vcpu_count;
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(bad(format!("it has {vcpus} vCPUs")));
    }
    check_vcpu_states(&state.vcpus, usize::from(vcpus)).map_err(|e| bad(e.to_string()))?;
    let bytes = state
        .machine
        .mem_size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| {
            bad(format!(
                "its memory size {} MiB overflows",
                state.machine.mem_size_mib
            ))
        })?;
    let expected: Vec<MemoryRegionState> = ram_ranges(bytes)
        .into_iter()
        .map(|(base, size)| MemoryRegionState { base: base.0, size })
        .collect();
    if state.memory != expected {
        return Err(bad(format!(
            "its memory regions {:?} are not those of a {} MiB guest",
            state.memory, state.machine.mem_size_mib
        )));
    }
    if bytes != loaded.mem_file_size() {
        return Err(bad(format!(
            "it describes {bytes} bytes of guest memory but records a {}-byte memory file",
            loaded.mem_file_size()
        )));
    }
    Ok(())
}

/// A Diff snapshot's memory file must hold, where the diff has holes, the pages of the
/// snapshot it follows: each sampled page must read back with its checksum. An unmerged diff
/// reads zeros there (a sample is never an all-zero page), and so does a merge onto the
/// wrong base, most likely.
fn check_diff_merged(
    samples: &[PageSample],
    mem_file: &File,
    state_path: &Path,
    mem_path: &Path,
) -> Result<(), PersistError> {
    use std::os::unix::fs::FileExt;
    let mut page = vec![0u8; memory::PAGE_SIZE];
    for sample in samples {
        mem_file
            .read_exact_at(&mut page, sample.offset)
            .map_err(|e| PersistError::ReadMemory(mem_path.to_path_buf(), e))?;
        if checksum(&page) != sample.crc {
            return Err(PersistError::DiffNotMerged {
                state: state_path.to_path_buf(),
                mem: mem_path.to_path_buf(),
                offset: sample.offset,
            });
        }
    }
    Ok(())
}

/// The serial console from its saved state.
pub(crate) fn restore_serial(
    args: SerialArgs,
    state: &SerialConsoleState,
) -> Result<SerialConsole, PersistError> {
    SerialConsole::restore(args, state).map_err(|e| PersistError::RestoreLegacy(e.to_string()))
}

/// The i8042 controller from its saved state.
pub(crate) fn restore_i8042(args: I8042Args, state: &I8042State) -> Result<I8042, PersistError> {
    I8042::restore(args, state).map_err(|e| PersistError::RestoreLegacy(e.to_string()))
}

/// The boot timer from its saved state (it cannot fail).
pub(crate) fn restore_boot_timer(args: BootTimerArgs, state: &BootTimerState) -> BootTimer {
    match BootTimer::restore(args, state) {
        Ok(timer) => timer,
        Err(never) => match never {},
    }
}
