//! Places virtio devices on the MMIO bus: one 4 KiB window and one IOAPIC pin each (raised
//! with `KVM_IRQ_LINE`, see [`Trigger::Line`] for why not an irqfd), an ioeventfd per queue,
//! and the `virtio_mmio.device=` arguments that tell the guest kernel where they are.
//!
//! # Snapshots
//!
//! The manager remembers every device it placed, in order: its window, its IRQ, its
//! transport and the device itself by kind ([`VirtioHandle`]). [`MmioDeviceManager::save`]
//! saves them all as a list of [`MmioDeviceState`] in placement order, each with its window,
//! IRQ, transport registers and device state; the device's identity ([`DeviceId`]: the drive
//! id, the interface id, or the vsock device) comes from its own state, and no two may share
//! one. [`MmioDeviceManager::restore`] rebuilds the same bus from such a list: every device
//! at its saved window and IRQ, so the guest, which found its devices at boot through the
//! kernel command line, finds them where they were.
//!
//! Restoring checks the whole list (layout, identities, overrides) before it creates
//! anything, then restores each device before its transport (the transport checks its
//! registers against the device), and places them on the bus once all are restored. Devices must be restored after the VM's interrupt
//! controllers (`KvmVm::set_state`), so that an interrupt a device raises lands in the
//! restored controllers rather than being overwritten by them; and saved from the VMM
//! thread with the vCPUs paused and before the VM's state, so that no queue is being served
//! meanwhile and any interrupt a device raised is already in the saved controllers.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use api::models::{CacheType, Drive, NetworkInterface, VsockConfig};
use event_manager::MutEventSubscriber;
use kvm_ioctls::IoEventAddress;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::MMIO_GAP_START;
use crate::devices::bus::lock;
use crate::devices::legacy::LegacyState;
use crate::devices::virtio::block::{Block, BlockState, BlockStateError};
use crate::devices::virtio::mmio::{
    MmioStateError, MmioTransport, MmioTransportArgs, MmioTransportState, MMIO_WINDOW,
};
use crate::devices::virtio::net::{Net, NetArgs, NetState, NetStateError};
use crate::devices::virtio::persist::VirtioArgs;
use crate::devices::virtio::vsock::{Vsock, VsockArgs, VsockState, VsockStateError};
use crate::devices::virtio::{Interrupt, Trigger, VirtioDevice};
use crate::devices::BusError;
use crate::snapshot::Persist;
use crate::vstate::kvm::KvmVm;
use crate::vstate::vcpu::Buses;

/// The first IOAPIC pin given to virtio devices (1 is the keyboard, 4 the serial port).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// One past the last IOAPIC pin.
const IRQ_END: u32 = 24;
/// How many virtio devices fit: one IOAPIC pin each.
pub const MAX_DEVICES: u32 = IRQ_END - FIRST_VIRTIO_IRQ;
/// Offset of the QueueNotify register in a device's window.
const QUEUE_NOTIFY: u64 = 0x50;

/// Errors while placing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no interrupt line left for {0}; at most {max} virtio devices fit", max = MAX_DEVICES)]
    NoIrq(String),
    #[error("cannot give {0} a handle on the VM for its interrupt: {1}")]
    VmHandle(String, std::io::Error),
    #[error("cannot register queue {1} of {0} for notifications: {2}")]
    Ioeventfd(String, usize, kvm_ioctls::Error),
    #[error("cannot place {0} on the MMIO bus: {1}")]
    Bus(String, BusError),
}

/// A virtio device by kind: what the manager keeps so that the device's own state can be
/// saved and its event handler registered.
#[derive(Clone)]
pub enum VirtioHandle {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Vsock(Arc<Mutex<Vsock>>),
}

impl From<Arc<Mutex<Block>>> for VirtioHandle {
    fn from(device: Arc<Mutex<Block>>) -> Self {
        Self::Block(device)
    }
}

impl From<Arc<Mutex<Net>>> for VirtioHandle {
    fn from(device: Arc<Mutex<Net>>) -> Self {
        Self::Net(device)
    }
}

impl From<Arc<Mutex<Vsock>>> for VirtioHandle {
    fn from(device: Arc<Mutex<Vsock>>) -> Self {
        Self::Vsock(device)
    }
}

impl VirtioHandle {
    /// The device as its transport drives it.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Self::Block(d) => d.clone(),
            Self::Net(d) => d.clone(),
            Self::Vsock(d) => d.clone(),
        }
    }

    /// The device as the event loop drives it.
    pub fn subscriber(&self) -> Arc<Mutex<dyn MutEventSubscriber + Send>> {
        match self {
            Self::Block(d) => d.clone(),
            Self::Net(d) => d.clone(),
            Self::Vsock(d) => d.clone(),
        }
    }

    pub fn id(&self) -> DeviceId {
        match self {
            Self::Block(d) => DeviceId::Drive(lock(d).drive_id.clone()),
            Self::Net(d) => DeviceId::Net(lock(d).iface_id.clone()),
            Self::Vsock(_) => DeviceId::Vsock,
        }
    }

    fn save(&self) -> Result<VirtioDeviceState, DeviceStateError> {
        let state = match self {
            Self::Block(d) => VirtioDeviceState::Block(lock(d).save()?),
            Self::Net(d) => VirtioDeviceState::Net(lock(d).save()?),
            Self::Vsock(d) => VirtioDeviceState::Vsock(lock(d).save()?),
        };
        Ok(state)
    }
}

/// Which device a saved state is: unique within a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceId {
    /// A drive, by `drive_id`.
    Drive(String),
    /// A network interface, by `iface_id`.
    Net(String),
    /// The vsock device (there is at most one).
    Vsock,
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Drive(id) => write!(f, "drive {id}"),
            Self::Net(id) => write!(f, "network interface {id}"),
            Self::Vsock => f.write_str("the vsock device"),
        }
    }
}

/// A virtio device's own state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
}

impl VirtioDeviceState {
    pub fn id(&self) -> DeviceId {
        match self {
            Self::Block(s) => DeviceId::Drive(s.drive_id.clone()),
            Self::Net(s) => DeviceId::Net(s.iface_id.clone()),
            Self::Vsock(_) => DeviceId::Vsock,
        }
    }
}

/// One placed virtio device as saved: where it sits, its transport, the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioDeviceState {
    /// Guest address of its register window.
    pub base: u64,
    /// Its IOAPIC pin.
    pub irq: u32,
    pub transport: MmioTransportState,
    pub device: VirtioDeviceState,
}

impl MmioDeviceState {
    pub fn id(&self) -> DeviceId {
        self.device.id()
    }
}

/// Every device's snapshot state: the legacy devices at their fixed ports, and the virtio
/// devices in the order they were placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub legacy: LegacyState,
    pub virtio: Vec<MmioDeviceState>,
}

/// What a snapshot load changes about the devices: Firecracker's `network_overrides` (a
/// TAP per interface id) and `vsock_override` (the socket path), and a new vsock CID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceOverrides {
    /// `(iface_id, host_dev_name)` pairs.
    pub host_dev_names: Vec<(String, String)>,
    pub vsock_uds_path: Option<PathBuf>,
    pub vsock_guest_cid: Option<u64>,
}

/// The devices as the API describes them (`GET /vm/config`): what a VM restored from a
/// snapshot really has, overrides applied, in placement order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<VsockConfig>,
}

impl DeviceConfig {
    /// Describes devices from their states. A snapshot does not record which drive was the
    /// root device nor its partuuid (they only shaped the kernel command line of a boot that
    /// is over), so every drive reads as not the root device, without a partuuid.
    pub fn from_states<'a>(states: impl IntoIterator<Item = &'a VirtioDeviceState>) -> Self {
        let mut config = Self::default();
        for state in states {
            match state {
                VirtioDeviceState::Block(s) => config.drives.push(Drive {
                    drive_id: s.drive_id.clone(),
                    path_on_host: s.path.clone(),
                    is_root_device: false,
                    is_read_only: s.read_only,
                    partuuid: None,
                    cache_type: match s.flush_to_disk {
                        true => CacheType::Writeback,
                        false => CacheType::Unsafe,
                    },
                    io_engine: None,
                    rate_limiter: None,
                    socket: None,
                }),
                VirtioDeviceState::Net(s) => config.network_interfaces.push(NetworkInterface {
                    iface_id: s.iface_id.clone(),
                    host_dev_name: s.host_dev_name.clone(),
                    guest_mac: s.guest_mac.map(|mac| format_mac(&mac)),
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                }),
                VirtioDeviceState::Vsock(s) => {
                    config.vsock = Some(VsockConfig {
                        vsock_id: None,
                        guest_cid: s.guest_cid,
                        uds_path: s.uds_path.clone(),
                    });
                }
            }
        }
        config
    }
}

/// A MAC address as the API writes it: `06:00:ac:10:00:02`.
fn format_mac(mac: &[u8; 6]) -> String {
    let bytes: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    bytes.join(":")
}

/// Why devices could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("the snapshot places {id} at {base:#x} on IRQ {irq}, which is not a virtio-mmio slot ({MMIO_GAP_START:#x} + n * {MMIO_WINDOW:#x} on IRQ {FIRST_VIRTIO_IRQ} + n, n below {MAX_DEVICES}); the snapshot state is damaged")]
    Layout { id: DeviceId, base: u64, irq: u32 },
    #[error("the snapshot places {id} at {base:#x}, where it already has another device; the snapshot state is damaged")]
    SlotTaken { id: DeviceId, base: u64 },
    #[error("the snapshot holds {0} twice; the snapshot state is damaged")]
    DuplicateId(DeviceId),
    #[error("network_overrides: the snapshot has no network interface {0}")]
    UnknownNetOverride(String),
    #[error("network_overrides: network interface {0} is named more than once")]
    DuplicateNetOverride(String),
    #[error("vsock_override: the snapshot has no vsock device")]
    NoVsock,
    #[error(transparent)]
    Block(#[from] BlockStateError),
    #[error(transparent)]
    Net(#[from] NetStateError),
    #[error(transparent)]
    Vsock(#[from] VsockStateError),
    #[error("{id}: {source}")]
    Transport {
        id: DeviceId,
        source: MmioStateError,
    },
    #[error(transparent)]
    Place(#[from] DeviceError),
}

/// A device the manager placed.
struct Placed {
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
    device: VirtioHandle,
}

/// Hands out MMIO windows and IRQs in order, collects the kernel arguments, and keeps what
/// it placed for snapshots.
#[derive(Default)]
pub struct MmioDeviceManager {
    kernel_args: Vec<String>,
    placed: Vec<Placed>,
}

/// The window and IRQ of slot `slot`.
fn slot_address(slot: u32) -> (u64, u32) {
    (
        MMIO_GAP_START + u64::from(slot) * MMIO_WINDOW,
        FIRST_VIRTIO_IRQ + slot,
    )
}

/// The slot whose window and IRQ these are, if they are one's.
fn slot_of(base: u64, irq: u32) -> Option<u32> {
    let offset = base.checked_sub(MMIO_GAP_START)?;
    let slot = u32::try_from(offset / MMIO_WINDOW).ok()?;
    let aligned = offset % MMIO_WINDOW == 0;
    (aligned && slot < MAX_DEVICES && slot_address(slot) == (base, irq)).then_some(slot)
}

impl MmioDeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `device` (named for errors) behind a new transport, in the next slot.
    pub fn attach(
        &mut self,
        vm: &KvmVm,
        buses: &mut Buses,
        mem: &Arc<GuestMemoryMmap>,
        name: &str,
        device: impl Into<VirtioHandle>,
    ) -> Result<(), DeviceError> {
        let device = device.into();
        let slot = u32::try_from(self.placed.len()).unwrap_or(u32::MAX);
        if slot >= MAX_DEVICES {
            return Err(DeviceError::NoIrq(name.into()));
        }
        let (base, irq) = slot_address(slot);
        let interrupt = line_interrupt(vm, name, irq)?;
        let transport = MmioTransport::new(device.device(), mem.clone(), interrupt);
        self.place(vm, buses, name, (base, irq), transport, device)
    }

    /// Registers the queue kicks of a device's window, puts its transport on the bus and
    /// records it.
    fn place(
        &mut self,
        vm: &KvmVm,
        buses: &mut Buses,
        name: &str,
        (base, irq): (u64, u32),
        transport: MmioTransport,
        device: VirtioHandle,
    ) -> Result<(), DeviceError> {
        for (index, evt) in lock(&device.device()).queue_events().iter().enumerate() {
            let address = IoEventAddress::Mmio(base + QUEUE_NOTIFY);
            vm.fd
                .register_ioevent(evt, &address, index as u32)
                .map_err(|e| DeviceError::Ioeventfd(name.into(), index, e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        buses
            .mmio
            .insert(base, MMIO_WINDOW, transport.clone())
            .map_err(|e| DeviceError::Bus(name.into(), e))?;
        self.kernel_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.placed.push(Placed {
            base,
            irq,
            transport,
            device,
        });
        Ok(())
    }

    /// The arguments announcing every attached device, space separated.
    pub fn kernel_args(&self) -> String {
        self.kernel_args.join(" ")
    }

    /// Every placed device, in placement order.
    pub fn devices(&self) -> Vec<VirtioHandle> {
        self.placed.iter().map(|p| p.device.clone()).collect()
    }

    /// Saves every placed device with its window, IRQ and transport, in placement order.
    /// The vCPUs must be paused and the caller on the VMM thread (see the module docs).
    pub fn save(&self) -> Result<Vec<MmioDeviceState>, DeviceStateError> {
        self.placed
            .iter()
            .map(|p| {
                let transport =
                    lock(&p.transport)
                        .save()
                        .map_err(|source| DeviceStateError::Transport {
                            id: p.device.id(),
                            source,
                        })?;
                Ok(MmioDeviceState {
                    base: p.base,
                    irq: p.irq,
                    transport,
                    device: p.device.save()?,
                })
            })
            .collect()
    }

    /// The placed devices as the API describes them, as they are now (a restored device
    /// with its overrides applied). Reads each device's state under its lock; changes
    /// nothing.
    pub fn config(&self) -> Result<DeviceConfig, DeviceStateError> {
        let states = self
            .placed
            .iter()
            .map(|p| p.device.save())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceConfig::from_states(&states))
    }

    /// Rebuilds saved devices on `buses` and `vm`, each at its saved window and IRQ, with
    /// `overrides` applied. The list and the overrides are checked first, then every device
    /// and transport is restored, and only then is anything placed on the bus, so a damaged
    /// state, a missing disk or TAP leaves the bus as it was. (A KVM or bus failure while
    /// placing can leave earlier devices placed; the caller discards the VM then.) The
    /// restored devices still need their event handlers registered ([`Self::devices`]).
    pub fn restore(
        vm: &KvmVm,
        buses: &mut Buses,
        mem: &Arc<GuestMemoryMmap>,
        states: &[MmioDeviceState],
        overrides: &DeviceOverrides,
    ) -> Result<Self, DeviceStateError> {
        check_layout(states)?;
        check_overrides(states, overrides)?;
        let restored = states
            .iter()
            .map(|state| {
                let interrupt = line_interrupt(vm, &state.id().to_string(), state.irq)?;
                restore_device(state, mem, interrupt, overrides)
            })
            .collect::<Result<Vec<_>, DeviceStateError>>()?;
        let mut manager = Self::new();
        for (state, (device, transport)) in states.iter().zip(restored) {
            let name = state.id().to_string();
            manager.place(vm, buses, &name, (state.base, state.irq), transport, device)?;
        }
        Ok(manager)
    }
}

/// An interrupt raised on IOAPIC pin `irq` of `vm`.
fn line_interrupt(vm: &KvmVm, name: &str, irq: u32) -> Result<Arc<Interrupt>, DeviceError> {
    let trigger = Trigger::Line {
        vm: vm
            .duplicate_fd()
            .map_err(|e| DeviceError::VmHandle(name.into(), e))?,
        gsi: irq,
    };
    Ok(Arc::new(Interrupt::with_trigger(trigger)))
}

/// Every device in a slot of its own, with an identity of its own.
fn check_layout(states: &[MmioDeviceState]) -> Result<(), DeviceStateError> {
    let mut slots = HashSet::new();
    let mut ids = HashSet::new();
    for state in states {
        let id = state.id();
        let Some(slot) = slot_of(state.base, state.irq) else {
            return Err(DeviceStateError::Layout {
                id,
                base: state.base,
                irq: state.irq,
            });
        };
        if !slots.insert(slot) {
            return Err(DeviceStateError::SlotTaken {
                id,
                base: state.base,
            });
        }
        if !ids.insert(id.clone()) {
            return Err(DeviceStateError::DuplicateId(id));
        }
    }
    Ok(())
}

/// Every override names a device the snapshot has, once.
fn check_overrides(
    states: &[MmioDeviceState],
    overrides: &DeviceOverrides,
) -> Result<(), DeviceStateError> {
    let ids: HashSet<DeviceId> = states.iter().map(MmioDeviceState::id).collect();
    let mut named = HashSet::new();
    for (iface_id, _) in &overrides.host_dev_names {
        if !ids.contains(&DeviceId::Net(iface_id.clone())) {
            return Err(DeviceStateError::UnknownNetOverride(iface_id.clone()));
        }
        if !named.insert(iface_id) {
            return Err(DeviceStateError::DuplicateNetOverride(iface_id.clone()));
        }
    }
    let vsock_override = overrides.vsock_uds_path.is_some() || overrides.vsock_guest_cid.is_some();
    if vsock_override && !ids.contains(&DeviceId::Vsock) {
        return Err(DeviceStateError::NoVsock);
    }
    Ok(())
}

/// Restores one device, then its transport, on `interrupt`. Needs no VM: the caller places
/// the result.
fn restore_device(
    state: &MmioDeviceState,
    mem: &Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    overrides: &DeviceOverrides,
) -> Result<(VirtioHandle, MmioTransport), DeviceStateError> {
    let virtio = VirtioArgs {
        mem: mem.clone(),
        interrupt: interrupt.clone(),
    };
    let handle = match &state.device {
        VirtioDeviceState::Block(s) => {
            VirtioHandle::Block(Arc::new(Mutex::new(Block::restore(virtio, s)?)))
        }
        VirtioDeviceState::Net(s) => {
            let host_dev_name = overrides
                .host_dev_names
                .iter()
                .find(|(iface, _)| *iface == s.iface_id)
                .map_or_else(|| s.host_dev_name.clone(), |(_, tap)| tap.clone());
            let args = NetArgs {
                virtio,
                host_dev_name,
            };
            VirtioHandle::Net(Arc::new(Mutex::new(Net::restore(args, s)?)))
        }
        VirtioDeviceState::Vsock(s) => {
            let args = VsockArgs {
                virtio,
                uds_path: overrides
                    .vsock_uds_path
                    .clone()
                    .unwrap_or_else(|| s.uds_path.clone()),
                guest_cid: overrides.vsock_guest_cid,
            };
            VirtioHandle::Vsock(Arc::new(Mutex::new(Vsock::restore(args, s)?)))
        }
    };
    let args = MmioTransportArgs {
        device: handle.device(),
        mem: mem.clone(),
        interrupt,
    };
    let transport = MmioTransport::restore(args, &state.transport).map_err(|source| {
        DeviceStateError::Transport {
            id: state.id(),
            source,
        }
    })?;
    Ok((handle, transport))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::{BootTimer, BootTimerArgs, I8042Args, SerialArgs};
    use crate::devices::legacy::{EventFdTrigger, SerialConsole, I8042};
    use crate::devices::virtio::block::DriveSpec;
    use crate::devices::virtio::status;
    use crate::devices::virtio::vsock::VsockSpec;
    use crate::snapshot::{decode, encode};
    use crate::vstate::test_vm::TestVm;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    const RUNNING: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(crate::vstate::memory::anonymous(&[(GuestAddress(0), 4 << 20)]).unwrap())
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-devmgr-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn block(dir: &std::path::Path, id: &str) -> Arc<Mutex<Block>> {
        let path = dir.join(format!("{id}.img"));
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        let spec = DriveSpec {
            drive_id: id.into(),
            path,
            read_only: false,
            flush_to_disk: false,
        };
        Arc::new(Mutex::new(Block::new(&spec).unwrap()))
    }

    fn write(buses: &Buses, addr: u64, value: u32) {
        assert!(buses.mmio.write(addr, &value.to_le_bytes()), "{addr:#x}");
    }

    fn read(buses: &Buses, addr: u64) -> u32 {
        let mut data = [0u8; 4];
        assert!(buses.mmio.read(addr, &mut data), "{addr:#x}");
        u32::from_le_bytes(data)
    }

    /// The guest driver's handshake through the bus, with rings from `rings` on.
    fn start(buses: &Buses, base: u64, queues: u32, rings: u64) {
        for value in [1, 3] {
            write(buses, base + 0x70, value);
        }
        write(buses, base + 0x24, 1);
        write(buses, base + 0x20, 1);
        write(buses, base + 0x70, 11);
        for queue in 0..queues {
            let ring = rings + u64::from(queue) * 0x4000;
            write(buses, base + 0x30, queue);
            write(buses, base + 0x38, 16);
            write(buses, base + 0x80, ring as u32);
            write(buses, base + 0x90, (ring + 0x1000) as u32);
            write(buses, base + 0xa0, (ring + 0x2000) as u32);
            write(buses, base + 0x44, 1);
        }
        write(buses, base + 0x70, RUNNING);
        assert_eq!(read(buses, base + 0x70), RUNNING);
    }

    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(state: &T) -> T {
        let bytes = encode(state, 0).unwrap();
        decode(&bytes, std::path::Path::new("t")).unwrap().1
    }

    #[test]
    fn slots_pair_a_window_with_its_irq() {
        assert_eq!(slot_of(0xd000_0000, 5), Some(0));
        assert_eq!(slot_of(0xd001_2000, 23), Some(18));
        for (base, irq) in [
            (0xd000_0000, 6),
            (0xd000_0800, 5),
            (0xcfff_f000, 4),
            (0xd001_3000, 24),
            (0, 5),
            (u64::MAX, u32::MAX),
        ] {
            assert_eq!(slot_of(base, irq), None, "{base:#x} {irq}");
        }
    }

    /// A saved list of devices that were never started: a drive, an interface, vsock.
    fn saved_list(dir: &std::path::Path) -> Vec<MmioDeviceState> {
        let drive = lock(&block(dir, "root")).save().unwrap();
        let (backend, _peer) = UnixDatagram::pair().unwrap();
        let spec = crate::devices::virtio::net::NetSpec {
            iface_id: "eth0".into(),
            host_dev_name: "saved/tap".into(),
            guest_mac: None,
        };
        let net = Net::with_backend(&spec, backend).unwrap().save_state();
        let vsock_spec = VsockSpec {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
        };
        let vsock = Vsock::new(&vsock_spec).unwrap().save().unwrap();
        let idle = MmioTransportState {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        };
        let devices = [
            VirtioDeviceState::Block(drive),
            VirtioDeviceState::Net(net),
            VirtioDeviceState::Vsock(vsock),
        ];
        devices
            .into_iter()
            .enumerate()
            .map(|(slot, device)| {
                let (base, irq) = slot_address(slot as u32);
                MmioDeviceState {
                    base,
                    irq,
                    transport: idle.clone(),
                    device,
                }
            })
            .collect()
    }

    #[test]
    fn damaged_layouts_are_refused() {
        let list = saved_list(&temp("layout"));
        check_layout(&list).unwrap();
        let mut bad = list.clone();
        bad[1].irq = 9;
        let err = check_layout(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("the snapshot places network interface eth0 at 0xd0001000 on IRQ 9"),
            "{err}"
        );
        let mut bad = list.clone();
        bad[2].base = MMIO_GAP_START + 19 * MMIO_WINDOW;
        bad[2].irq = 24;
        assert!(matches!(
            check_layout(&bad),
            Err(DeviceStateError::Layout { .. })
        ));
        let mut bad = list.clone();
        (bad[2].base, bad[2].irq) = (bad[0].base, bad[0].irq);
        let err = check_layout(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "the snapshot places the vsock device at 0xd0000000, where it already has another \
             device; the snapshot state is damaged"
        );
        let mut bad = list.clone();
        bad[2] = bad[0].clone();
        (bad[2].base, bad[2].irq) = slot_address(2);
        let err = check_layout(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "the snapshot holds drive root twice; the snapshot state is damaged"
        );
    }

    #[test]
    fn overrides_must_name_saved_devices() {
        let list = saved_list(&temp("overrides"));
        let tap = |iface: &str| (iface.to_string(), "tap9".to_string());
        let ok = DeviceOverrides {
            host_dev_names: vec![tap("eth0")],
            vsock_uds_path: Some("/x".into()),
            vsock_guest_cid: Some(4),
        };
        check_overrides(&list, &ok).unwrap();
        let unknown = DeviceOverrides {
            host_dev_names: vec![tap("eth1")],
            ..Default::default()
        };
        assert_eq!(
            check_overrides(&list, &unknown).unwrap_err().to_string(),
            "network_overrides: the snapshot has no network interface eth1"
        );
        let twice = DeviceOverrides {
            host_dev_names: vec![tap("eth0"), tap("eth0")],
            ..Default::default()
        };
        assert!(matches!(
            check_overrides(&list, &twice),
            Err(DeviceStateError::DuplicateNetOverride(_))
        ));
        let no_vsock = DeviceOverrides {
            vsock_guest_cid: Some(5),
            ..Default::default()
        };
        assert!(matches!(
            check_overrides(&list[..2], &no_vsock),
            Err(DeviceStateError::NoVsock)
        ));
    }

    #[test]
    fn the_tap_comes_from_the_override_or_the_snapshot() {
        let list = saved_list(&temp("tap"));
        let mem = memory();
        let interrupt = || Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        // Both names are invalid, so the TAP open fails before any system call, naming
        // which name was used.
        let err = restore_device(&list[1], &mem, interrupt(), &DeviceOverrides::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("network interface eth0: cannot open TAP saved/tap: "),
            "{err}"
        );
        let overrides = DeviceOverrides {
            host_dev_names: vec![("eth0".into(), "over/ride".into())],
            ..Default::default()
        };
        let err = restore_device(&list[1], &mem, interrupt(), &overrides)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("network interface eth0: cannot open TAP over/ride: "),
            "{err}"
        );
        // A transport that claims a running device the device state does not have.
        let mut bad = list[0].clone();
        bad.transport.status = RUNNING;
        bad.transport.driver_features = 1 << 32;
        let err = restore_device(&bad, &mem, interrupt(), &DeviceOverrides::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("drive root: the saved device status 0xf"),
            "{err}"
        );
    }

    #[test]
    fn a_bus_of_running_devices_is_rebuilt_where_it_was() {
        let dir = temp("bus");
        let mem = memory();
        let vm = TestVm::new(1);
        let mut buses = Buses::default();
        let mut manager = MmioDeviceManager::new();
        let drive = block(&dir, "root");
        let other = block(&dir, "data");
        let vsock = Vsock::new(&VsockSpec {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
        })
        .unwrap();
        let vsock = Arc::new(Mutex::new(vsock));
        manager
            .attach(&vm.vm, &mut buses, &mem, "drive root", drive.clone())
            .unwrap();
        manager
            .attach(&vm.vm, &mut buses, &mem, "drive data", other)
            .unwrap();
        manager
            .attach(&vm.vm, &mut buses, &mem, "vsock", vsock.clone())
            .unwrap();
        let args = manager.kernel_args();
        assert_eq!(
            args,
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        // The guest starts the root drive and vsock; the data drive stays idle. A used-ring
        // interrupt is pending on the drive.
        start(&buses, 0xd000_0000, 1, 0x1_0000);
        start(&buses, 0xd000_2000, 3, 0x10_0000);
        write(&buses, 0xd000_2000 + 0x30, 1);
        assert!(lock(&drive).is_activated() && lock(&vsock).is_activated());
        let interrupt = lock(&drive)
            .common()
            .active
            .as_ref()
            .unwrap()
            .interrupt
            .clone();
        interrupt.signal_used_queue().unwrap();

        let saved = round_trip(&manager.save().unwrap());
        assert_eq!(saved.len(), 3);
        let ids: Vec<String> = saved.iter().map(|s| s.id().to_string()).collect();
        assert_eq!(ids, ["drive root", "drive data", "the vsock device"]);
        assert_eq!(saved[2].transport.queue_sel, 1);

        // Into a new VM, with the vsock socket moved (as a clone would).
        let vm2 = TestVm::new(1);
        let mut buses2 = Buses::default();
        let overrides = DeviceOverrides {
            vsock_uds_path: Some(dir.join("clone.sock")),
            vsock_guest_cid: Some(7),
            ..Default::default()
        };
        let restored =
            MmioDeviceManager::restore(&vm2.vm, &mut buses2, &mem, &saved, &overrides).unwrap();
        assert_eq!(restored.kernel_args(), args);
        for (base, device_type, status) in [
            (0xd000_0000, 2, RUNNING),
            (0xd000_1000, 2, 0),
            (0xd000_2000, 19, RUNNING),
        ] {
            assert_eq!(read(&buses2, base + 0x08), device_type, "{base:#x}");
            assert_eq!(read(&buses2, base + 0x70), status, "{base:#x}");
        }
        assert!(
            !buses2.mmio.read(0xd000_3000, &mut [0u8; 4]),
            "nothing more"
        );
        assert_eq!(
            read(&buses2, 0xd000_0000 + 0x60),
            1,
            "the drive's pending interrupt"
        );
        assert_eq!(read(&buses2, 0xd000_2000 + 0x60), 0);
        let handles = restored.devices();
        let VirtioHandle::Vsock(vsock2) = &handles[2] else {
            panic!("the vsock device is third");
        };
        assert_eq!(lock(vsock2).guest_cid(), 7);
        assert!(lock(vsock2).transport_reset_pending());
        assert!(dir.join("clone.sock").exists());
        // Saving again gives the same state, but for what the overrides changed.
        let mut again = restored.save().unwrap();
        let VirtioDeviceState::Vsock(v) = &mut again[2].device else {
            panic!("the vsock device is third");
        };
        assert_eq!(
            (v.guest_cid, v.uds_path.clone()),
            (7, dir.join("clone.sock"))
        );
        (v.guest_cid, v.uds_path) = (3, dir.join("v.sock"));
        assert_eq!(again, saved);
        // The API sees the restored devices with the overrides applied.
        let config = restored.config().unwrap();
        let drives: Vec<&str> = config.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(drives, ["root", "data"]);
        assert_eq!(config.drives[0].path_on_host, dir.join("root.img"));
        let vsock = config.vsock.unwrap();
        assert_eq!(
            (vsock.guest_cid, vsock.uds_path),
            (7, dir.join("clone.sock"))
        );
    }

    #[test]
    fn device_config_describes_each_state_as_the_api_does() {
        let dir = temp("config");
        let mut list = saved_list(&dir);
        let VirtioDeviceState::Block(drive) = &mut list[0].device else {
            panic!("the drive is first");
        };
        (drive.read_only, drive.flush_to_disk) = (true, true);
        // A restored interface reports the TAP it opened, not the one saved.
        let VirtioDeviceState::Net(saved_net) = &list[1].device else {
            panic!("the interface is second");
        };
        let (backend, _peer) = UnixDatagram::pair().unwrap();
        let virtio = VirtioArgs {
            mem: memory(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        };
        let mut net_state = Net::restore_with_backend(saved_net, "tap9".into(), backend, virtio)
            .unwrap()
            .save_state();
        net_state.guest_mac = Some([0x06, 0, 0xac, 0x10, 0, 0x02]);
        list[1].device = VirtioDeviceState::Net(net_state);

        let config = DeviceConfig::from_states(list.iter().map(|s| &s.device));
        let drive = &config.drives[0];
        assert_eq!(drive.drive_id, "root");
        assert_eq!(drive.path_on_host, dir.join("root.img"));
        assert!(drive.is_read_only && !drive.is_root_device);
        assert_eq!(drive.cache_type, CacheType::Writeback);
        let net = &config.network_interfaces[0];
        assert_eq!(net.iface_id, "eth0");
        assert_eq!(net.host_dev_name, "tap9");
        assert_eq!(net.guest_mac.as_deref(), Some("06:00:ac:10:00:02"));
        let vsock = config.vsock.unwrap();
        assert_eq!((vsock.guest_cid, vsock.uds_path), (3, dir.join("v.sock")));
        assert_eq!(DeviceConfig::from_states([]), DeviceConfig::default());
    }

    #[test]
    fn a_damaged_list_places_nothing() {
        let dir = temp("nothing");
        let mut list = saved_list(&dir);
        list.remove(1);
        let vm = TestVm::new(1);
        let mem = memory();
        let mut buses = Buses::default();
        let mut bad = list.clone();
        bad[1].irq = 5;
        let err = MmioDeviceManager::restore(&vm.vm, &mut buses, &mem, &bad, &Default::default());
        assert!(matches!(err, Err(DeviceStateError::Layout { .. })));
        assert!(!buses.mmio.read(0xd000_0000, &mut [0u8; 4]));
        // A missing disk image is named, with the drive.
        std::fs::remove_file(dir.join("root.img")).unwrap();
        let err = MmioDeviceManager::restore(&vm.vm, &mut buses, &mem, &list, &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("drive root: cannot reopen its disk image"),
            "{err}"
        );
        // A failure in a later device places the earlier ones neither.
        std::fs::write(dir.join("root.img"), vec![0u8; 64 << 10]).unwrap();
        let VirtioDeviceState::Vsock(vsock) = &mut list[1].device else {
            panic!("the vsock device is second");
        };
        vsock.guest_cid = 1;
        let err = MmioDeviceManager::restore(&vm.vm, &mut buses, &mem, &list, &Default::default())
            .err()
            .unwrap();
        assert!(
            matches!(err, DeviceStateError::Vsock(VsockStateError::SavedCid(1))),
            "{err}"
        );
        assert!(!buses.mmio.read(0xd000_0000, &mut [0u8; 4]));
    }

    #[test]
    fn every_device_state_composes_into_one_state_file() {
        let dir = temp("compose");
        let irq = || EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = SerialConsole::restore(
            SerialArgs {
                interrupt: irq(),
                input_ready: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                out: Box::new(std::io::sink()),
            },
            &crate::devices::legacy::SerialConsoleState::from(vm_superio::SerialState::default()),
        )
        .unwrap();
        let i8042 = I8042::new(irq(), irq());
        let timer = BootTimer::new(std::time::Instant::now(), false);
        let states = DeviceStates {
            legacy: LegacyState {
                serial: serial.save().unwrap(),
                i8042: i8042.save().unwrap(),
                boot_timer: timer.save().unwrap(),
            },
            virtio: saved_list(&dir),
        };
        let decoded = round_trip(&states);
        assert_eq!(decoded, states);
        let legacy = &decoded.legacy;
        let args = I8042Args {
            reset: irq(),
            kbd_irq: irq(),
        };
        assert_eq!(
            I8042::restore(args, &legacy.i8042).unwrap().save().unwrap(),
            legacy.i8042
        );
        let args = BootTimerArgs {
            process_start: std::time::Instant::now(),
            print: false,
        };
        let Ok(timer) = BootTimer::restore(args, &legacy.boot_timer);
        assert_eq!(timer.save().unwrap(), legacy.boot_timer);
    }
}
