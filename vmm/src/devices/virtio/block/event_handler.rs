//! The block device on the VMM event loop: activation registers the queue's kick fd, and
//! each kick runs the queue.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_activation(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.common.handle_activation(&events, ops) {
            self.kick();
        } else if events.fd() == self.common.queue_events[0].as_raw_fd() {
            let _ = self.common.queue_events[0].read();
            self.kick();
        }
    }
}

impl Block {
    fn kick(&mut self) {
        let used = self.process_queue();
        self.common.signal_used(&[(0, used)]);
    }
}
