//! The i8042 keyboard controller on ports 0x60 (data) and 0x64 (status/command), with an AT
//! keyboard behind it.
//!
//! vm-superio's `I8042Device` only implements the CPU-reset command and reads back zero,
//! which makes Linux's i8042 driver wait out its command timeouts (about a second of every
//! boot) before giving up. This device answers the controller and keyboard commands Linux
//! sends at probe time, so the driver binds at once; the reset command ends the VM
//! (`reboot=k`), and [`I8042::ctrl_alt_del`] types Ctrl-Alt-Del for a clean guest shutdown.
//!
//! Snapshots save the controller's registers, the bytes waiting for the guest and what the
//! next data byte means ([`I8042State`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::devices::BusDevice;
use crate::snapshot::Persist;

/// The controller's port range starts at 0x60; the command port is 0x64 (offset 4).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// The keyboard's ISA interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_NOT_INHIBITED: u8 = 0x10;

// Control register ("command byte") bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM_FLAG: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;
const CB_TRANSLATE: u8 = 0x40;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands (port 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;
/// Output port: A20 enabled, not in reset.
const OUTPORT_DEFAULT: u8 = 0x03;
/// No aux (mouse) port: its interface test reports "clock line stuck low".
const AUX_ABSENT: u8 = 0x01;
/// Bytes the output buffer holds before further ones are dropped.
const OUTPUT_CAPACITY: usize = 16;

/// Ctrl, Alt, Delete pressed, then Delete, Alt, Ctrl released, in scancode set 2.
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// The same keys in scancode set 1, which the guest's driver expects while the controller
/// translates (CB_TRANSLATE, on by default and left on by Linux).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// What the next byte written to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    None,
    ControlByte,
    OutputPort,
    KbdOutputBuffer,
    KbdParameter,
}

/// The controller and its keyboard.
pub struct I8042 {
    reset: EventFdTrigger,
    kbd_irq: EventFdTrigger,
    control: u8,
    status_flags: u8,
    outport: u8,
    output: VecDeque<u8>,
    pending: Pending,
}

impl I8042 {
    /// `reset`: fired on the CPU-reset command; `kbd_irq`: the irqfd of IRQ 1.
    pub fn new(reset: EventFdTrigger, kbd_irq: EventFdTrigger) -> Self {
        Self {
            reset,
            kbd_irq,
            control: CB_KBD_INT | CB_SYSTEM_FLAG | CB_AUX_DISABLED | CB_TRANSLATE,
            status_flags: SB_SYSTEM_FLAG | SB_KBD_NOT_INHIBITED,
            outport: OUTPORT_DEFAULT,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            pending: Pending::None,
        }
    }

    /// Types Ctrl-Alt-Del; Linux passes it to init as SIGINT.
    pub fn ctrl_alt_del(&mut self) {
        let codes: &[u8] = if self.control & CB_TRANSLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL
        };
        for &code in codes {
            self.push_output(code);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_empty() {
            0
        } else {
            SB_OUT_FULL
        };
        self.status_flags | full
    }

    /// Queues a byte for the guest and raises IRQ 1 if the guest enabled it.
    fn push_output(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_CAPACITY {
            return;
        }
        self.output.push_back(byte);
        self.raise_irq();
    }

    fn raise_irq(&self) {
        if self.control & CB_KBD_INT != 0 && self.control & CB_KBD_DISABLED == 0 {
            // A lost edge only delays the byte until the guest next polls the status.
            let _ = self.kbd_irq.trigger();
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        if !self.output.is_empty() {
            self.raise_irq();
        }
        byte
    }

    fn write_command(&mut self, command: u8) {
        self.status_flags |= SB_LAST_WAS_COMMAND;
        self.pending = Pending::None;
        match command {
            CMD_READ_CTR => self.push_output(self.control),
            CMD_WRITE_CTR => self.pending = Pending::ControlByte,
            CMD_DISABLE_AUX => self.control |= CB_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CB_AUX_DISABLED,
            CMD_TEST_AUX => self.push_output(AUX_ABSENT),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_TEST_KBD => self.push_output(INTERFACE_TEST_OK),
            CMD_DISABLE_KBD => self.control |= CB_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CB_KBD_DISABLED,
            CMD_READ_OUTPORT => self.push_output(self.outport),
            CMD_WRITE_OUTPORT => self.pending = Pending::OutputPort,
            CMD_WRITE_KBD_OUTBUF => self.pending = Pending::KbdOutputBuffer,
            CMD_RESET_CPU => {
                // A lost reset notification leaves the guest spinning in its reboot loop,
                // which retries the command.
                let _ = self.reset.trigger();
            }
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status_flags &= !SB_LAST_WAS_COMMAND;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::ControlByte => {
                self.control = byte;
                self.status_flags = (self.status_flags & !SB_SYSTEM_FLAG) | (byte & CB_SYSTEM_FLAG);
            }
            Pending::OutputPort => self.outport = byte,
            Pending::KbdOutputBuffer => self.push_output(byte),
            Pending::KbdParameter => self.push_output(KBD_ACK),
            Pending::None => self.keyboard_command(byte),
        }
    }

    /// Commands for the keyboard itself, which answers through the output buffer.
    fn keyboard_command(&mut self, command: u8) {
        match command {
            KBD_RESET => {
                self.push_output(KBD_ACK);
                self.push_output(KBD_SELF_TEST_OK);
            }
            KBD_GET_ID => {
                self.push_output(KBD_ACK);
                KBD_ID.iter().for_each(|b| self.push_output(*b));
            }
            KBD_ECHO => self.push_output(KBD_ECHO),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                self.push_output(KBD_ACK);
                self.pending = Pending::KbdParameter;
            }
            _ => self.push_output(KBD_ACK),
        }
    }
}

/// The controller as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The control register ("command byte").
    pub control: u8,
    /// The status register's stored bits (output-buffer-full follows `output`).
    pub status_flags: u8,
    pub outport: u8,
    /// Bytes the guest has yet to read, oldest first.
    pub output: Vec<u8>,
    pub pending: Pending,
}

/// What restoring the controller needs: the same two lines as [`I8042::new`].
pub struct I8042Args {
    pub reset: EventFdTrigger,
    pub kbd_irq: EventFdTrigger,
}

/// Why a saved controller cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042StateError {
    #[error("the i8042's saved output buffer holds {0} bytes, more than its {OUTPUT_CAPACITY}; the snapshot state is damaged")]
    OutputOverflow(usize),
    #[error("the i8042's saved status {0:#04x} has bits the controller does not store; the snapshot state is damaged")]
    StatusBits(u8),
}

const STORED_STATUS: u8 = SB_SYSTEM_FLAG | SB_LAST_WAS_COMMAND | SB_KBD_NOT_INHIBITED;

/// The controller. No interrupt is raised on restore: one the guest had not taken yet is in
/// the restored interrupt controller, and the guest polls the status port anyway.
impl Persist for I8042 {
    type State = I8042State;
    type Args = I8042Args;
    type Error = I8042StateError;

    fn save(&self) -> Result<I8042State, I8042StateError> {
        Ok(I8042State {
            control: self.control,
            status_flags: self.status_flags,
            outport: self.outport,
            output: self.output.iter().copied().collect(),
            pending: self.pending,
        })
    }

    fn restore(args: I8042Args, state: &I8042State) -> Result<Self, I8042StateError> {
        if state.output.len() > OUTPUT_CAPACITY {
            return Err(I8042StateError::OutputOverflow(state.output.len()));
        }
        if state.status_flags & !STORED_STATUS != 0 {
            return Err(I8042StateError::StatusBits(state.status_flags));
        }
        let mut dev = I8042::new(args.reset, args.kbd_irq);
        dev.control = state.control;
        dev.status_flags = state.status_flags;
        dev.outport = state.outport;
        dev.output.extend(&state.output);
        dev.pending = state.pending;
        Ok(dev)
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            DATA_OFFSET => self.write_data(*value),
            COMMAND_OFFSET => self.write_command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    struct Rig {
        dev: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventFdTrigger(reset.try_clone().unwrap()),
            EventFdTrigger(irq.try_clone().unwrap()),
        );
        Rig { dev, reset, irq }
    }

    impl Rig {
        fn command(&mut self, c: u8) {
            self.dev.write(COMMAND_OFFSET, &[c]);
        }
        fn data(&mut self, d: u8) {
            self.dev.write(DATA_OFFSET, &[d]);
        }
        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.dev.read(COMMAND_OFFSET, &mut b);
            b[0]
        }
        fn read_all(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.status() & SB_OUT_FULL != 0 {
                let mut b = [0];
                self.dev.read(DATA_OFFSET, &mut b);
                out.push(b[0]);
            }
            out
        }
    }

    #[test]
    fn linux_probe_sequence_gets_answers() {
        let mut r = rig();
        assert_eq!(r.read_all(), Vec::<u8>::new(), "flush finds nothing");
        r.command(CMD_READ_CTR);
        let ctr = r.read_all();
        assert_eq!(ctr.len(), 1);
        r.command(CMD_WRITE_CTR);
        r.data(ctr[0] & !CB_KBD_INT);
        r.command(CMD_READ_CTR);
        assert_eq!(r.read_all(), vec![ctr[0] & !CB_KBD_INT]);
        r.command(CMD_SELF_TEST);
        assert_eq!(r.read_all(), vec![SELF_TEST_OK]);
        r.command(CMD_TEST_KBD);
        assert_eq!(r.read_all(), vec![INTERFACE_TEST_OK]);
        assert!(r.reset.read().is_err(), "no reset during probe");
    }

    #[test]
    fn keyboard_answers_reset_id_and_parameters() {
        let mut r = rig();
        r.data(KBD_RESET);
        assert_eq!(r.read_all(), vec![KBD_ACK, KBD_SELF_TEST_OK]);
        r.data(KBD_GET_ID);
        assert_eq!(r.read_all(), vec![KBD_ACK, 0xab, 0x83]);
        r.data(KBD_SET_LEDS);
        r.data(0x07);
        assert_eq!(r.read_all(), vec![KBD_ACK, KBD_ACK]);
        assert!(r.irq.read().unwrap() > 0, "output raised IRQ 1");
    }

    #[test]
    fn no_irq_when_the_guest_disabled_it() {
        let mut r = rig();
        r.command(CMD_WRITE_CTR);
        r.data(CB_SYSTEM_FLAG);
        r.data(KBD_ECHO);
        assert!(r.irq.read().is_err());
        assert_eq!(r.read_all(), vec![KBD_ECHO]);
    }

    #[test]
    fn reset_command_fires_the_reset_event() {
        let mut r = rig();
        r.command(CMD_RESET_CPU);
        assert_eq!(r.reset.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_is_typed_and_bounded() {
        let mut r = rig();
        r.dev.ctrl_alt_del();
        // Translated (the default): scancode set 1, releases with bit 7.
        assert_eq!(r.read_all(), CTRL_ALT_DEL_SET1);
        r.command(CMD_WRITE_CTR);
        r.data(CB_KBD_INT | CB_SYSTEM_FLAG);
        r.dev.ctrl_alt_del();
        let typed = r.read_all();
        assert_eq!(&typed[..4], &[0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(typed.len(), 11);
        for _ in 0..10 {
            r.dev.ctrl_alt_del();
        }
        assert_eq!(r.read_all().len(), OUTPUT_CAPACITY);
    }

    fn round_trip(state: &I8042State) -> I8042State {
        let bytes = crate::snapshot::encode(state, 0).unwrap();
        crate::snapshot::decode(&bytes, std::path::Path::new("t"))
            .unwrap()
            .1
    }

    fn restored(state: &I8042State) -> Result<Rig, I8042StateError> {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let args = I8042Args {
            reset: EventFdTrigger(reset.try_clone().unwrap()),
            kbd_irq: EventFdTrigger(irq.try_clone().unwrap()),
        };
        let dev = I8042::restore(args, state)?;
        Ok(Rig { dev, reset, irq })
    }

    #[test]
    fn a_controller_mid_command_round_trips() {
        let mut r = rig();
        // Translation off, keyboard answers waiting, and a parameter byte expected next.
        r.command(CMD_WRITE_CTR);
        r.data(CB_KBD_INT | CB_SYSTEM_FLAG);
        r.data(KBD_GET_ID);
        r.data(KBD_SET_LEDS);
        let saved = r.dev.save().unwrap();
        assert_eq!(saved.pending, Pending::KbdParameter);
        assert_eq!(saved.output, vec![KBD_ACK, 0xab, 0x83, KBD_ACK]);
        let decoded = round_trip(&saved);
        assert_eq!(decoded, saved);
        let mut back = restored(&decoded).unwrap();
        assert_eq!(back.dev.save().unwrap(), saved);
        assert!(back.irq.read().is_err(), "no interrupt on restore");
        assert_eq!(back.status() & SB_OUT_FULL, SB_OUT_FULL);
        back.data(0x07);
        assert_eq!(back.read_all(), vec![KBD_ACK, 0xab, 0x83, KBD_ACK, KBD_ACK]);
        back.dev.ctrl_alt_del();
        assert_eq!(back.read_all().len(), 11, "set 2, as the guest configured");
        back.command(CMD_RESET_CPU);
        assert_eq!(back.reset.read().unwrap(), 1);
    }

    #[test]
    fn damaged_controller_states_are_refused() {
        let saved = rig().dev.save().unwrap();
        let mut bad = saved.clone();
        bad.output = vec![0; OUTPUT_CAPACITY + 1];
        assert_eq!(
            restored(&bad).err(),
            Some(I8042StateError::OutputOverflow(OUTPUT_CAPACITY + 1))
        );
        let mut bad = saved.clone();
        bad.status_flags |= SB_OUT_FULL;
        let err = restored(&bad).err().unwrap();
        assert_eq!(err, I8042StateError::StatusBits(bad.status_flags));
        assert!(err.to_string().contains("snapshot state is damaged"));
        // Every control and output-port byte is one the guest could write.
        let mut odd = saved;
        odd.control = 0xff;
        odd.outport = 0;
        let mut r = restored(&odd).unwrap();
        r.data(KBD_ECHO);
        assert!(
            r.irq.read().is_err(),
            "keyboard disabled by the control byte"
        );
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut r = rig();
        r.dev.write(DATA_OFFSET, &[1, 2]);
        r.dev.write(2, &[0xfe]);
        let mut b = [0u8; 2];
        r.dev.read(3, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert!(r.reset.read().is_err());
    }
}
