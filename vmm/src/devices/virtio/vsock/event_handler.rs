//! The vsock device on the VMM event loop. `init` watches the activation fd, the host
//! listener and the handshake timer; activation adds the queue kicks. Host streams come and
//! go with their connections: the muxer (un)watches them through the [`EventOps`] of the
//! event being processed, each tagged with its token in the event's data.
//!
//! After every event the receive queue is filled with whatever became ready, so a tx kick,
//! an rx kick (new buffers), a host stream and a timer tick all end the same way.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Vsock;
use super::muxer::Watcher;
use super::{EVQ, RX, TX};

/// How often deadlines are checked while a handshake waits.
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Host streams on the event loop, each reporting its token.
struct OpsWatcher<'a, 'b>(&'a mut EventOps<'b>);

impl Watcher for OpsWatcher<'_, '_> {
    fn watch(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.0
            .add(Events::with_data_raw(fd, token, set))
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn unwatch(&mut self, fd: RawFd) {
        // Fails only for an fd that is not watched, which leaves nothing to undo.
        let _ = self.0.remove(Events::empty_raw(fd));
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_activation(ops);
        // Both fds are ours and new; failing to watch them leaves the host side deaf, and
        // only an exhausted process fails here.
        let _ = ops.add(Events::new_raw(self.muxer.listener_fd(), EventSet::IN));
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut watcher = OpsWatcher(ops);
        if std::mem::take(&mut self.teardown_pending) {
            self.muxer.teardown(&mut watcher);
        }
        let fd = events.fd();
        let now = Instant::now();
        let mut tx_used = false;
        let mut ev_used = false;
        if self.common.handle_activation(&events, watcher.0) {
            // A restored device's transport reset goes to the guest before anything else.
            ev_used = self.process_evq();
            tx_used = self.process_tx(&mut watcher);
        } else if fd == self.common.queue_events[TX].as_raw_fd() {
            let _ = self.common.queue_events[TX].read();
            self.guest_kicked(TX, now);
            tx_used = self.process_tx(&mut watcher);
        } else if fd == self.common.queue_events[RX].as_raw_fd() {
            // New receive buffers: filled below.
            let _ = self.common.queue_events[RX].read();
            self.guest_kicked(RX, now);
        } else if fd == self.common.queue_events[EVQ].as_raw_fd() {
            let _ = self.common.queue_events[EVQ].read();
            self.guest_kicked(EVQ, now);
            ev_used = self.process_evq();
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: a tick already consumed reads as WouldBlock.
            let _ = self.timer.wait();
            self.muxer.sweep(now, &mut watcher);
        } else if fd == self.muxer.listener_fd() {
            self.muxer.accept_clients(&mut watcher, now);
        } else {
            let set = events.event_set();
            // A hang-up or error shows up on the next read or write.
            let gone = set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR);
            let readable = gone || set.contains(EventSet::IN);
            let writable = gone || set.contains(EventSet::OUT);
            self.muxer
                .host_event(events.data(), readable, writable, &mut watcher, now);
        }
        self.expire_reset_wait(now);
        let rx_used = self.process_rx(&mut watcher);
        self.common
            .signal_used(&[(RX, rx_used), (TX, tx_used), (EVQ, ev_used)]);
        self.sync_timer();
    }
}

impl Vsock {
    /// Runs the timer only while something has a deadline.
    fn sync_timer(&mut self) {
        let wanted = self.muxer.has_deadlines() || self.reset_wait_running();
        if wanted == self.timer_armed {
            return;
        }
        let result = if wanted {
            self.timer.reset(TIMER_TICK, Some(TIMER_TICK))
        } else {
            self.timer.clear()
        };
        if result.is_ok() {
            self.timer_armed = wanted;
        }
    }
}
