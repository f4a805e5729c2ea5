//! The block device on the VMM event loop: activation registers the queue's kick fd, and
//! each kick runs the queue.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        // Failing to watch the activation fd leaves the device dead to the guest, which
        // then times out on its requests; nothing else can break.
        let _ = ops.add(Events::new(&self.common.activate_event, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.common.activate_event.as_raw_fd() {
            let _ = self.common.activate_event.read();
            // A re-activation after a device reset finds the fd registered already.
            let _ = ops.add(Events::new(&self.common.queue_events[0], EventSet::IN));
            self.kick();
        } else if fd == self.common.queue_events[0].as_raw_fd() {
            let _ = self.common.queue_events[0].read();
            self.kick();
        }
    }
}

impl Block {
    fn kick(&mut self) {
        if self.process_queue() {
            self.common.signal_used_queue();
        }
    }
}
