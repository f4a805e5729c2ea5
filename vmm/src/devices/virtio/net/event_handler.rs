//! The network device on the VMM event loop: activation registers the queue kicks and the
//! backend (edge-triggered: each wake-up drains it until it would block or the guest runs
//! out of buffers); kicks and backend readiness run the queues.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{FrameBackend, Net, RX, TX};

impl<B: FrameBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        // Failing to watch the activation fd leaves the device dead to the guest; nothing
        // else can break.
        let _ = ops.add(Events::new(&self.common.activate_event, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.common.activate_event.as_raw_fd() {
            let _ = self.common.activate_event.read();
            // After a device reset these are registered already; EEXIST is fine.
            let _ = ops.add(Events::new(&self.common.queue_events[RX], EventSet::IN));
            let _ = ops.add(Events::new(&self.common.queue_events[TX], EventSet::IN));
            let backend = Events::new_raw(
                self.backend.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            );
            let _ = ops.add(backend);
            self.run(true, true);
        } else if fd == self.common.queue_events[TX].as_raw_fd() {
            let _ = self.common.queue_events[TX].read();
            self.run(false, true);
        } else if fd == self.common.queue_events[RX].as_raw_fd() {
            let _ = self.common.queue_events[RX].read();
            self.run(true, false);
        } else if fd == self.backend.as_raw_fd() {
            self.run(true, false);
        }
    }
}

impl<B: FrameBackend> Net<B> {
    fn run(&mut self, rx: bool, tx: bool) {
        let mut notify = false;
        if tx {
            notify |= self.process_tx();
        }
        if rx {
            notify |= self.process_rx();
        }
        if notify {
            self.common.signal_used_queue();
        }
    }
}
