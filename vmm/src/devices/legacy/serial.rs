//! The 8250 UART on 0x3f8 / IRQ 4, through vm-superio: guest output goes to a writer (the
//! `ember` process's stdout), host input (stdin) is fed into the receive FIFO from the VMM
//! event loop.
//!
//! Input flow control: when the guest's FIFO is full, stdin is dropped from the epoll set
//! until the guest drains the FIFO (vm-superio's `in_buffer_empty` event), so a fast writer
//! on stdin neither spins the loop nor loses bytes.
//!
//! Snapshots save the UART's registers and the bytes waiting in its receive FIFO
//! ([`SerialConsoleState`], vm-superio's `SerialState` with serde); output has no state, as
//! every byte the guest writes goes straight to the writer.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, SerialState};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::lock;
use crate::devices::BusDevice;
use crate::snapshot::Persist;

/// COM1.
pub const SERIAL_BASE: u64 = 0x3f8;
pub const SERIAL_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;

/// Tells the input side that the guest has emptied the receive FIFO.
pub struct InputReady(EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Best effort: a failed write only delays input until the next stdin event.
        let _ = self.0.write(1);
    }
}

type Uart = Serial<EventFdTrigger, InputReady, Box<dyn Write + Send>>;

/// The UART behind the bus interface.
pub struct SerialConsole {
    uart: Uart,
}

impl SerialConsole {
    /// `interrupt`: the irqfd for IRQ 4; `input_ready`: signalled when the FIFO empties.
    pub fn new(
        interrupt: EventFdTrigger,
        input_ready: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            uart: Serial::with_events(interrupt, InputReady(input_ready), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit.
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        self.uart
            .enqueue_raw_bytes(&bytes[..room])
            .unwrap_or_default()
    }

    fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        // Output errors (stdout closed) must not stop the guest: the byte is dropped.
        let _ = self.uart.write(offset, *value);
    }
}

/// Bytes the UART's receive FIFO holds (vm-superio's, which it does not export).
pub const FIFO_SIZE: usize = 64;

/// The UART as saved: its registers and the received bytes the guest has not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialConsoleState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialConsoleState> for SerialState {
    fn from(s: &SerialConsoleState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What restoring the UART needs: the same three things as [`SerialConsole::new`].
pub struct SerialArgs {
    /// The irqfd of IRQ 4.
    pub interrupt: EventFdTrigger,
    /// Signalled when the guest empties the receive FIFO.
    pub input_ready: EventFd,
    pub out: Box<dyn Write + Send>,
}

/// Why the UART cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("the serial port's saved receive FIFO holds {0} bytes, more than the {FIFO_SIZE} it has room for; the snapshot state is damaged")]
    FifoOverflow(usize),
    #[error("cannot raise the restored serial port's interrupt: {0}")]
    Interrupt(io::Error),
}

/// The UART. Any register values restore (they are bytes the guest could have written);
/// only a FIFO longer than the UART's is refused. vm-superio raises the interrupt again on
/// restore when one is pending and enabled, which the guest's driver takes as any other.
impl Persist for SerialConsole {
    type State = SerialConsoleState;
    type Args = SerialArgs;
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialConsoleState, SerialStateError> {
        Ok(self.uart.state().into())
    }

    fn restore(args: SerialArgs, state: &SerialConsoleState) -> Result<Self, SerialStateError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialStateError::FifoOverflow(state.in_buffer.len()));
        }
        let events = InputReady(args.input_ready);
        let uart = Serial::from_state(&state.into(), args.interrupt, events, args.out).map_err(
            |e| match e {
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    SerialStateError::Interrupt(e)
                }
                vm_superio::serial::Error::FullFifo => {
                    SerialStateError::FifoOverflow(state.in_buffer.len())
                }
            },
        )?;
        Ok(Self { uart })
    }
}

/// Feeds a host input stream (normally stdin) into the UART.
pub struct SerialInput<R: Read + AsRawFd + Send> {
    console: Arc<Mutex<SerialConsole>>,
    input: R,
    input_ready: EventFd,
    /// Input is registered with epoll (false while the FIFO is full or after EOF).
    listening: bool,
    eof: bool,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    pub fn new(console: Arc<Mutex<SerialConsole>>, input: R, input_ready: EventFd) -> Self {
        Self {
            console,
            input,
            input_ready,
            listening: false,
            eof: false,
        }
    }

    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    fn listen(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.listening || self.eof {
            return;
        }
        let events = Events::new_raw(self.input_fd(), EventSet::IN);
        // Registration fails for inputs epoll cannot watch (a regular file, /dev/null):
        // such a VM simply has no console input.
        let done = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        self.listening = on && done.is_ok();
    }

    fn forward_input(&mut self, ops: &mut EventOps) {
        let capacity = lock(&self.console).fifo_capacity();
        if capacity == 0 {
            self.listen(ops, false);
            return;
        }
        let mut buf = [0u8; 64];
        let want = capacity.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                self.listen(ops, false);
                self.eof = true;
            }
            Ok(n) => {
                lock(&self.console).enqueue(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                self.listen(ops, false);
                self.eof = true;
            }
        }
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        // The FIFO-drained notification is essential; without it input would stall forever.
        if ops
            .add(Events::new(&self.input_ready, EventSet::IN))
            .is_err()
        {
            self.eof = true;
            return;
        }
        self.listen(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
            self.listen(ops, true);
        } else if events.fd() == self.input_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.forward_input(ops);
            } else {
                self.listen(ops, false);
                self.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::net::UnixStream;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console(out: SharedBuf) -> (Arc<Mutex<SerialConsole>>, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialConsole::new(
            EventFdTrigger(irq.try_clone().unwrap()),
            ready.try_clone().unwrap(),
            Box::new(out),
        );
        (Arc::new(Mutex::new(dev)), irq, ready)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let out = SharedBuf::default();
        let (dev, _irq, _ready) = console(out.clone());
        for b in b"hi\n" {
            dev.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    fn restore_args(out: SharedBuf) -> (SerialArgs, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let args = SerialArgs {
            interrupt: EventFdTrigger(irq.try_clone().unwrap()),
            input_ready: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            out: Box::new(out),
        };
        (args, irq)
    }

    fn round_trip(state: &SerialConsoleState) -> SerialConsoleState {
        let bytes = crate::snapshot::encode(state, 0).unwrap();
        crate::snapshot::decode(&bytes, std::path::Path::new("t"))
            .unwrap()
            .1
    }

    #[test]
    fn registers_and_waiting_input_round_trip() {
        let (dev, _irq, _ready) = console(SharedBuf::default());
        let mut d = dev.lock().unwrap();
        // The guest sets 8N1 at 115200 (DLAB, divisor 1), a scratch byte and the receive
        // interrupt; the host typed three bytes the guest has not read.
        d.write(3, &[0x83]);
        d.write(0, &[1]);
        d.write(1, &[0]);
        d.write(3, &[0x03]);
        d.write(7, &[0x5a]);
        d.write(1, &[0x01]);
        d.enqueue(b"abc");
        let saved = d.save().unwrap();
        assert_eq!(saved.in_buffer, b"abc");
        assert_eq!((saved.line_control, saved.scratch), (0x03, 0x5a));
        let decoded = round_trip(&saved);
        assert_eq!(decoded, saved);

        let out = SharedBuf::default();
        let (args, irq) = restore_args(out.clone());
        let mut restored = SerialConsole::restore(args, &decoded).unwrap();
        assert_eq!(restored.save().unwrap(), saved);
        assert_eq!(
            irq.read().unwrap(),
            1,
            "data waits and its interrupt is enabled"
        );
        let mut byte = [0u8];
        for expected in b"abc" {
            restored.read(0, &mut byte);
            assert_eq!(byte[0], *expected);
        }
        restored.write(0, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
    }

    #[test]
    fn an_overfull_fifo_is_refused_and_odd_registers_are_harmless() {
        let (dev, _irq, _ready) = console(SharedBuf::default());
        let saved = dev.lock().unwrap().save().unwrap();
        let mut bad = saved.clone();
        bad.in_buffer = vec![b'x'; FIFO_SIZE + 1];
        let (args, _irq) = restore_args(SharedBuf::default());
        let err = SerialConsole::restore(args, &bad).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the serial port's saved receive FIFO holds 65 bytes, more than the 64 it has \
             room for; the snapshot state is damaged"
        );
        for value in [0x00, 0x5a, 0xa5, 0xff] {
            let odd = SerialConsoleState {
                baud_divisor_low: value,
                baud_divisor_high: value,
                interrupt_enable: value,
                interrupt_identification: value,
                line_control: value,
                line_status: value,
                modem_control: value,
                modem_status: value,
                scratch: value,
                in_buffer: vec![value; FIFO_SIZE],
            };
            let (args, _irq) = restore_args(SharedBuf::default());
            let mut dev = SerialConsole::restore(args, &odd).unwrap();
            let mut byte = [0u8];
            for offset in 0..SERIAL_LEN {
                dev.read(offset, &mut byte);
                dev.write(offset, &[value]);
            }
            let room = dev.fifo_capacity();
            assert_eq!(dev.enqueue(&[1; 100]), room.min(100));
        }
    }

    #[test]
    fn host_input_reaches_the_guest_fifo() {
        let (dev, _irq, ready) = console(SharedBuf::default());
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(
            dev.clone(),
            guest_side,
            ready,
        ))));
        host.write_all(b"ok").unwrap();
        em.run_with_timeout(1000).unwrap();
        let mut d = dev.lock().unwrap();
        // Line status register: data ready; then the receive buffer yields the bytes.
        let mut lsr = [0u8];
        d.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut byte = [0u8];
        d.read(0, &mut byte);
        assert_eq!(byte, [b'o']);
    }
}
