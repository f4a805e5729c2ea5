//! Ember's VMM: builds a microVM from a [`VmConfig`] (KVM VM, guest memory, kernel, legacy
//! devices, vCPUs) and runs it on an event-manager loop until the guest stops.
//!
//! Threads: the caller's thread runs the event loop (console input, guest resets, vCPU
//! stops, API requests through [`rpc`]); each vCPU runs on its own thread and dispatches
//! its port and MMIO exits directly to the buses, and is paused and resumed through its
//! [`vstate::vcpu::VcpuHandle`].

pub mod arch;
pub mod bound_sockets;
pub mod device_manager;
pub mod devices;
pub mod metrics;
pub mod persist;
pub mod rpc;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use api::models::{
    parse_mac, BootSource, CacheType, Drive, MachineConfig, ModelError, NetworkInterface, VmConfig,
    VsockConfig, MAX_BOOT_ARGS_LEN,
};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use arch::x86_64::boot::{self, BootError, LoadedKernel};
use arch::x86_64::mptable::{self, MpTableError};
use arch::x86_64::regs::{self, RegsError};
use arch::x86_64::BOOT_TIMER_PORT;
use device_manager::{DeviceError, MmioDeviceManager};
use devices::bus::lock;
use devices::legacy::{
    i8042, serial, BootTimer, BootTimerArgs, EventFdTrigger, I8042Args, LegacyState, SerialArgs,
    SerialConsole, SerialInput, I8042,
};
use devices::virtio::block::{Block, BlockError, DriveSpec};
use devices::virtio::net::{Net, NetError, NetSpec};
use devices::virtio::vsock::{self as vsock_device, Vsock, VsockError, VsockSpec};
use devices::BusError;
use metrics::{DeviceCounters, VcpuExitCounters};
use vstate::kvm::{self, KvmError, KvmVm};
use vstate::memory::{self, MemoryError};
use vstate::vcpu::{Buses, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};

/// Anything that stops a VM from being built or run. Messages say what failed, on what.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ModelError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error("cannot create an eventfd for {0}: {1}")]
    EventFd(&'static str, std::io::Error),
    #[error("cannot connect {0} to guest IRQ {1}: {2}")]
    Irqfd(&'static str, u32, kvm_ioctls::Error),
    #[error("cannot place {0} on the I/O bus: {1}")]
    Bus(&'static str, BusError),
    #[error("the VMM event loop failed: {0}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("drives: no drive {0:?}; PUT /drives/{0} before the VM starts")]
    NoSuchDrive(String),
    #[error("the VM has not been started")]
    NotStarted,
    #[error("the VM is already running")]
    AlreadyStarted,
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Snapshot(#[from] persist::PersistError),
    #[error("boot-source.boot_args: with the device arguments the kernel command line is {0} bytes; the limit is {max}", max = MAX_BOOT_ARGS_LEN - 1)]
    CmdlineTooLong(usize),
}

impl VmmError {
    /// True for errors in what the user asked for (fix the configuration), as opposed to
    /// failures of the host or of running the guest.
    pub fn is_config_error(&self) -> bool {
        if let VmmError::Vsock(e) = self {
            return e.is_config_error();
        }
        matches!(
            self,
            VmmError::Config(_)
                | VmmError::Boot(
                    BootError::OpenKernel(..)
                        | BootError::ReadKernel(..)
                        | BootError::UnknownKernelFormat(..)
                        | BootError::OpenInitrd(..)
                        | BootError::InitrdTooLarge { .. }
                )
                | VmmError::Memory(MemoryError::TooLarge { .. })
                | VmmError::Block(BlockError::OpenDisk(..) | BlockError::NotAFile(..))
                | VmmError::Net(NetError::OpenTap(..))
                | VmmError::CmdlineTooLong(_)
                | VmmError::Kvm(KvmError::TooManyVcpus { .. })
        )
    }
}

/// How a VM's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest rebooted or powered off (i8042 reset, KVM system event).
    GuestStopped,
    /// The guest triple-faulted: a crash, or a `reboot=t` reboot. Holds the vCPU and its
    /// registers at that moment.
    GuestTripleFault { vcpu: u8, state: String },
    /// Running vCPU `vcpu` failed.
    Failed { vcpu: u8, message: String },
}

/// Options that are not part of the VM's configuration.
#[derive(Debug, Clone, Copy)]
pub struct VmmOptions {
    /// When the `ember` process started; the boot timer measures from here.
    pub process_start: Instant,
    /// Print the guest's boot time when it reports boot complete.
    pub print_boot_time: bool,
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a vCPU may take to answer a pause or resume request. Generous: a nested TCG
/// host can take long to deliver a signal to a busy vCPU thread.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A built microVM, ready to run.
pub struct Vmm {
    // Field order matters for drop: vCPUs go before the VM, the VM before guest memory.
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    /// Held so the VM and its memory slots outlive the vCPU threads; saved in snapshots.
    vm: KvmVm,
    guest_memory: Arc<GuestMemoryMmap>,
    /// The configuration the VM was built with (vCPUs, memory), recorded in snapshots.
    machine: MachineConfig,
    event_manager: EventManager<Subscriber>,
    exits: Arc<Mutex<ExitWatcher>>,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    boot_timer: Arc<Mutex<BootTimer>>,
    /// The virtio devices as placed, for snapshots.
    mmio: MmioDeviceManager,
    drives: Vec<Arc<Mutex<Block>>>,
    counters: DeviceCounters,
    exit_counters: Arc<VcpuExitCounters>,
}

/// Checks a configuration without touching KVM: models, then the files it names.
pub fn check_config(config: &VmConfig) -> Result<(), VmmError> {
    config.validate()?;
    check_config_present(config)
}

/// Checks the sections given so far (the API builds a configuration piece by piece): the
/// models, then the files they name; a missing boot source is not an error yet.
pub fn check_config_present(config: &VmConfig) -> Result<(), VmmError> {
    config.validate_present()?;
    memory::check_size(config.machine_config.mem_size_mib)?;
    if let Some(boot) = &config.boot_source {
        boot::detect_kernel_format(&boot.kernel_image_path)?;
        if let Some(initrd) = &boot.initrd_path {
            boot::open_initrd(initrd)?;
        }
    }
    for drive in &config.drives {
        Block::open_disk(&drive_spec(drive))?;
    }
    if let Some(vsock) = &config.vsock {
        vsock_device::unix::check_path(&vsock.uds_path)?;
    }
    Ok(())
}

fn drive_spec(drive: &Drive) -> DriveSpec {
    DriveSpec {
        drive_id: drive.drive_id.clone(),
        path: drive.path_on_host.clone(),
        read_only: drive.is_read_only,
        flush_to_disk: drive.cache_type == CacheType::Writeback,
    }
}

impl Vmm {
    /// Builds the VM from a checked configuration, with guest output written to `console`.
    pub fn build(
        config: &VmConfig,
        options: VmmOptions,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, VmmError> {
        check_config(config)?;
        let machine = &config.machine_config;
        let boot_source = config.boot_source.as_ref().ok_or(ModelError::Invalid {
            field: "boot-source".into(),
            reason: "missing".into(),
        })?;
        let vm = kvm::create_vm(kvm::open_kvm(machine.vcpu_count)?)?;
        let track_dirty = machine.track_dirty_pages;
        let guest_memory = Arc::new(memory::create_guest_memory(
            machine.mem_size_mib,
            track_dirty,
        )?);
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

        let legacy = legacy_devices(&vm, reset, options, console, None)?;
        event_manager.add_subscriber(legacy.console_input);
        let mut devices = DeviceSetup::new(&vm, legacy.buses, &guest_memory, &mut event_manager);
        devices.counters.boot_timer = Some(legacy.boot_timer.clone());
        let root_args = devices.attach_drives(&config.drives)?;
        devices.attach_network(&config.network_interfaces)?;
        if let Some(vsock) = &config.vsock {
            devices.attach_vsock(vsock)?;
        }
        let (buses, mmio, drives, counters) = devices.finish();
        let device_args = mmio.kernel_args();

        let cmdline = compose_cmdline(&[&device_args, &root_args, boot_source.boot_args()])?;
        let mem_bytes = (machine.mem_size_mib as u64) << 20;
        let kernel = load_guest_image(&guest_memory, mem_bytes, boot_source, &cmdline)?;
        mptable::write(&guest_memory, machine.vcpu_count)?;
        regs::write_boot_structures(&guest_memory)?;
        let exit_counters = Arc::new(VcpuExitCounters::default());
        let vcpus = (0..machine.vcpu_count)
            .map(|i| {
                let evt = stopped_evt.try_clone().map_err(eventfd_err("vCPU stops"))?;
                let (stops, exits) = (stop_tx.clone(), exit_counters.clone());
                let vcpu = Vcpu::new(&vm, i, buses.clone(), stops, evt, exits)?;
                vcpu.configure(&vm, kernel.entry, machine.vcpu_count)?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        Ok(Self {
            vcpus,
            handles: Vec::new(),
            vm,
            guest_memory,
            machine: machine.clone(),
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

    /// Starts the vCPU threads (each installs its seccomp filter before it enters the
    /// guest), then installs the VMM filter on the calling thread, which from here on
    /// serves the devices: guest-driven work only ever runs filtered.
    pub fn start(&mut self) -> Result<(), VmmError> {
        for vcpu in std::mem::take(&mut self.vcpus) {
            self.handles.push(vcpu.start()?);
        }
        seccomp::install(seccomp::ThreadKind::Vmm)?;
        Ok(())
    }

    /// Starts the vCPU threads parked, as a paused VM (a snapshot restored without
    /// `resume_vm`): no vCPU enters the guest until [`Vmm::resume`]. Then installs the VMM
    /// filter, as [`Vmm::start`] does.
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        for vcpu in std::mem::take(&mut self.vcpus) {
            self.handles.push(vcpu.start_paused()?);
        }
        for handle in &self.handles {
            handle.wait_for(VcpuEvent::Pause, VCPU_ANSWER_TIMEOUT)?;
        }
        seccomp::install(seccomp::ThreadKind::Vmm)?;
        Ok(())
    }

    /// Serves events for up to `timeout_ms` (-1: until at least one arrives); `Some` once
    /// the VM has ended.
    pub fn run_events(&mut self, timeout_ms: i32) -> Result<Option<VmOutcome>, VmmError> {
        self.event_manager
            .run_with_timeout(timeout_ms)
            .map_err(VmmError::EventLoop)?;
        let outcome = lock(&self.exits).outcome.take();
        if outcome.is_some() {
            let _ = std::io::stdout().flush();
        }
        Ok(outcome)
    }

    /// Makes the event loop wake up when `fd` is written (the API's request signal).
    pub fn add_wakeup(&mut self, fd: EventFd) {
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(Wakeup(fd))));
    }

    /// Stops every vCPU outside the guest and waits until all are parked.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.tell_vcpus(VcpuEvent::Pause)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        self.tell_vcpus(VcpuEvent::Resume)
    }

    fn tell_vcpus(&mut self, event: VcpuEvent) -> Result<(), VmmError> {
        if self.handles.is_empty() {
            return Err(VmmError::NotStarted);
        }
        for handle in &self.handles {
            handle.send(event)?;
        }
        for handle in &self.handles {
            handle.wait_for(event, VCPU_ANSWER_TIMEOUT)?;
        }
        Ok(())
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (ember-init powers off cleanly).
    pub fn send_ctrl_alt_del(&mut self) {
        lock(&self.i8042).ctrl_alt_del();
    }

    /// Points drive `drive_id` at a new backing file and tells the guest its size may have
    /// changed.
    pub fn update_drive(&mut self, drive_id: &str, path: &Path) -> Result<(), VmmError> {
        let drive = self
            .drives
            .iter()
            .find(|d| lock(d).drive_id == drive_id)
            .ok_or_else(|| VmmError::NoSuchDrive(drive_id.to_string()))?;
        lock(drive).swap_backing_file(path)?;
        Ok(())
    }

    /// The devices' counters and the boot timer, for metrics.
    pub fn device_counters(&self) -> DeviceCounters {
        self.counters.clone()
    }

    /// vCPU exits by kind, summed over the vCPUs.
    pub fn exit_counters(&self) -> Arc<VcpuExitCounters> {
        self.exit_counters.clone()
    }
}

/// Wakes the event loop when its eventfd is written; the reader of the event acts on it.
struct Wakeup(EventFd);

impl MutEventSubscriber for Wakeup {
    fn init(&mut self, ops: &mut EventOps) {
        // A fresh eventfd; registering cannot fail short of running out of memory.
        let _ = ops.add(Events::new(&self.0, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

fn eventfd_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmError {
    move |e| VmmError::EventFd(what, e)
}

/// Loads kernel, initrd and command line, and writes the zero page.
fn load_guest_image(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    boot_source: &BootSource,
    cmdline: &str,
) -> Result<LoadedKernel, VmmError> {
    let kernel = boot::load_kernel(mem, &boot_source.kernel_image_path)?;
    let initrd = match &boot_source.initrd_path {
        Some(path) => Some(boot::load_initrd(mem, path, kernel.end)?),
        None => None,
    };
    let cmdline_len = boot::load_cmdline(mem, cmdline)?;
    boot::write_zero_page(mem, mem_bytes, &kernel, cmdline_len, initrd)?;
    Ok(kernel)
}

/// The guest command line: device and root arguments first, so that the user's boot
/// arguments can override them.
fn compose_cmdline(parts: &[&str]) -> Result<String, VmmError> {
    let cmdline = parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if cmdline.len() >= MAX_BOOT_ARGS_LEN {
        return Err(VmmError::CmdlineTooLong(cmdline.len()));
    }
    Ok(cmdline)
}

/// What attaching virtio devices needs: the VM, the buses being filled, guest memory, the
/// MMIO slot allocator and the event loop the devices run on.
struct DeviceSetup<'a> {
    vm: &'a KvmVm,
    buses: Buses,
    mem: &'a Arc<GuestMemoryMmap>,
    mmio: MmioDeviceManager,
    event_manager: &'a mut EventManager<Subscriber>,
    drives: Vec<Arc<Mutex<Block>>>,
    counters: DeviceCounters,
}

impl<'a> DeviceSetup<'a> {
    fn new(
        vm: &'a KvmVm,
        buses: Buses,
        mem: &'a Arc<GuestMemoryMmap>,
        event_manager: &'a mut EventManager<Subscriber>,
    ) -> Self {
        Self {
            vm,
            buses,
            mem,
            mmio: MmioDeviceManager::new(),
            event_manager,
            drives: Vec::new(),
            counters: DeviceCounters::default(),
        }
    }

    /// Attaches the drives, the root device first so that it is /dev/vda, and returns the
    /// kernel arguments that make it the root filesystem (empty without a root device).
    fn attach_drives(&mut self, drives: &[Drive]) -> Result<String, VmmError> {
        let root = drives.iter().find(|d| d.is_root_device);
        for drive in root
            .into_iter()
            .chain(drives.iter().filter(|d| !d.is_root_device))
        {
            let block = Block::new(&drive_spec(drive))?;
            let counters = block.counters.clone();
            self.counters
                .drives
                .push((drive.drive_id.clone(), counters));
            let block = Arc::new(Mutex::new(block));
            let name = format!("drive {}", drive.drive_id);
            self.mmio
                .attach(self.vm, &mut self.buses, self.mem, &name, block.clone())?;
            self.drives.push(block.clone());
            self.event_manager.add_subscriber(block);
        }
        Ok(root.map_or_else(String::new, |d| {
            let device = d
                .partuuid
                .as_ref()
                .map_or_else(|| "/dev/vda".to_string(), |u| format!("PARTUUID={u}"));
            format!("root={device} {}", if d.is_read_only { "ro" } else { "rw" })
        }))
    }

    /// Attaches a virtio-net device per interface, each on its TAP.
    fn attach_network(&mut self, interfaces: &[NetworkInterface]) -> Result<(), VmmError> {
        for iface in interfaces {
            let spec = NetSpec {
                iface_id: iface.iface_id.clone(),
                host_dev_name: iface.host_dev_name.clone(),
                // Validated with the configuration; an unparsable MAC cannot get here.
                guest_mac: iface.guest_mac.as_deref().and_then(parse_mac),
            };
            let net = Net::new(&spec)?;
            let counters = net.counters.clone();
            self.counters.nets.push((iface.iface_id.clone(), counters));
            let net = Arc::new(Mutex::new(net));
            let name = format!("network interface {}", iface.iface_id);
            self.mmio
                .attach(self.vm, &mut self.buses, self.mem, &name, net.clone())?;
            self.event_manager.add_subscriber(net);
        }
        Ok(())
    }

    /// Attaches the vsock device, which starts listening for host clients at once.
    fn attach_vsock(&mut self, config: &VsockConfig) -> Result<(), VmmError> {
        let spec = VsockSpec {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
        };
        let vsock = Vsock::new(&spec)?;
        self.counters.vsock = Some(vsock.counters.clone());
        let vsock = Arc::new(Mutex::new(vsock));
        self.mmio.attach(
            self.vm,
            &mut self.buses,
            self.mem,
            "the vsock device",
            vsock.clone(),
        )?;
        self.event_manager.add_subscriber(vsock);
        Ok(())
    }

    /// The finished buses, shared by the vCPUs, the device manager (kernel arguments,
    /// snapshots), the drives and the device counters.
    fn finish(
        self,
    ) -> (
        Arc<Buses>,
        MmioDeviceManager,
        Vec<Arc<Mutex<Block>>>,
        DeviceCounters,
    ) {
        (Arc::new(self.buses), self.mmio, self.drives, self.counters)
    }
}

/// The legacy devices and what the VMM keeps of them.
struct LegacyDevices {
    buses: Buses,
    /// Feeds stdin to the serial console.
    console_input: Subscriber,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    boot_timer: Arc<Mutex<BootTimer>>,
}

/// Serial console (IRQ 4), i8042 and the boot timer on the port I/O bus: new, or restored
/// from `saved` (a snapshot load).
fn legacy_devices(
    vm: &KvmVm,
    reset: EventFdTrigger,
    options: VmmOptions,
    console: Box<dyn Write + Send>,
    saved: Option<&LegacyState>,
) -> Result<LegacyDevices, VmmError> {
    let mut buses = Buses::default();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err("the serial IRQ"))?;
    vm.fd
        .register_irqfd(&serial_irq, serial::SERIAL_IRQ)
        .map_err(|e| VmmError::Irqfd("the serial console", serial::SERIAL_IRQ, e))?;
    let input_ready = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err("serial input"))?;
    let serial_args = SerialArgs {
        interrupt: EventFdTrigger(serial_irq),
        input_ready: input_ready
            .try_clone()
            .map_err(eventfd_err("serial input"))?,
        out: console,
    };
    let console = Arc::new(Mutex::new(match saved {
        Some(saved) => persist::restore_serial(serial_args, &saved.serial)?,
        None => SerialConsole::new(
            serial_args.interrupt,
            serial_args.input_ready,
            serial_args.out,
        ),
    }));
    buses
        .pio
        .insert(serial::SERIAL_BASE, serial::SERIAL_LEN, console.clone())
        .map_err(|e| VmmError::Bus("the serial console", e))?;
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err("the keyboard IRQ"))?;
    vm.fd
        .register_irqfd(&kbd_irq, i8042::I8042_KBD_IRQ)
        .map_err(|e| VmmError::Irqfd("the i8042 keyboard", i8042::I8042_KBD_IRQ, e))?;
    let i8042_args = I8042Args {
        reset,
        kbd_irq: EventFdTrigger(kbd_irq),
    };
    let i8042 = Arc::new(Mutex::new(match saved {
        Some(saved) => persist::restore_i8042(i8042_args, &saved.i8042)?,
        None => I8042::new(i8042_args.reset, i8042_args.kbd_irq),
    }));
    buses
        .pio
        .insert(i8042::I8042_BASE, i8042::I8042_LEN, i8042.clone())
        .map_err(|e| VmmError::Bus("the i8042 controller", e))?;
    let timer_args = BootTimerArgs {
        process_start: options.process_start,
        print: options.print_boot_time,
    };
    let timer = match saved {
        Some(saved) => persist::restore_boot_timer(timer_args, &saved.boot_timer),
        None => BootTimer::new(timer_args.process_start, timer_args.print),
    };
    let boot_timer = Arc::new(Mutex::new(timer));
    buses
        .pio
        .insert(u64::from(BOOT_TIMER_PORT), 1, boot_timer.clone())
        .map_err(|e| VmmError::Bus("the boot timer", e))?;
    let input = SerialInput::new(console.clone(), std::io::stdin(), input_ready);
    Ok(LegacyDevices {
        buses,
        console_input: Arc::new(Mutex::new(input)),
        serial: console,
        i8042,
        boot_timer,
    })
}

/// Watches the events that end a VM: the i8042 reset line and vCPU stops.
struct ExitWatcher {
    reset_evt: EventFd,
    vcpu_evt: EventFd,
    vcpu_stops: Receiver<(u8, VcpuStop)>,
    outcome: Option<VmOutcome>,
}

impl ExitWatcher {
    fn new(vcpu_stops: Receiver<(u8, VcpuStop)>) -> Result<Self, VmmError> {
        Ok(Self {
            reset_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err("guest resets"))?,
            vcpu_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err("vCPU stops"))?,
            vcpu_stops,
            outcome: None,
        })
    }

    /// The first reason to stop wins; later ones are consequences of it.
    fn record(&mut self, outcome: VmOutcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset_evt, &self.vcpu_evt] {
            // Both fds were just created and are valid; registering cannot fail short of
            // the process running out of memory, and then nothing would work anyway.
            let _ = ops.add(Events::new(fd, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == std::os::fd::AsRawFd::as_raw_fd(&self.reset_evt) {
            let _ = self.reset_evt.read();
            self.record(VmOutcome::GuestStopped);
            return;
        }
        let _ = self.vcpu_evt.read();
        while let Ok((vcpu, stop)) = self.vcpu_stops.try_recv() {
            self.record(match stop {
                VcpuStop::Reset => VmOutcome::GuestStopped,
                VcpuStop::TripleFault(state) => VmOutcome::GuestTripleFault { vcpu, state },
                VcpuStop::Failed(message) => VmOutcome::Failed { vcpu, message },
            });
        }
    }
}
