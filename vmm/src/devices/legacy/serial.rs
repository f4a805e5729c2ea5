//! The 8250 UART on 0x3f8 / IRQ 4, through vm-superio: guest output goes to a writer (the
//! `ember` process's stdout), host input (stdin) is fed into the receive FIFO from the VMM
//! event loop.
//!
//! Input flow control: when the guest's FIFO is full, stdin is dropped from the epoll set
//! until the guest drains the FIFO (vm-superio's `in_buffer_empty` event), so a fast writer
//! on stdin neither spins the loop nor loses bytes.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::lock;
use crate::devices::BusDevice;

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
