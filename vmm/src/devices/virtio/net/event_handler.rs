//! The network device on the VMM event loop: activation registers the queue kicks and the
//! backend (edge-triggered: each wake-up drains it until it would block or the guest runs
//! out of buffers); kicks and backend readiness run the queues. A backend found gone (a
//! deleted TAP) is taken off the loop, so its error state cannot wake us again.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{FrameBackend, Net, RX, TX};

impl<B: FrameBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_activation(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.common.handle_activation(&events, ops) {
            if !self.backend_lost {
                let backend = Events::new_raw(
                    self.backend.as_raw_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                );
                // After a device reset the backend is registered already; EEXIST is fine.
                let _ = ops.add(backend);
                self.backend_watched = true;
            }
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
        if self.backend_lost && self.backend_watched {
            let _ = ops.remove(Events::empty_raw(self.backend.as_raw_fd()));
            self.backend_watched = false;
        }
    }
}

impl<B: FrameBackend> Net<B> {
    fn run(&mut self, rx: bool, tx: bool) {
        let tx_used = tx && self.process_tx();
        let rx_used = rx && self.process_rx();
        self.common.signal_used(&[(RX, rx_used), (TX, tx_used)]);
    }
}
