//! Credit-based flow control of one connection (virtio spec 5.10.6.3).
//!
//! Each side tells the other how big its receive buffer is (`buf_alloc`) and how many bytes
//! it has consumed so far (`fwd_cnt`, a free-running u32). A sender may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight. All counters wrap, so every difference is
//! taken with wrapping arithmetic, and a peer whose numbers make no sense (it claims to have
//! consumed more than was sent) simply gets no credit.

/// Guest bytes a connection buffers for its host socket at most: what we advertise as
/// `buf_alloc`, and the bound on what a guest can make us hold per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Freed bytes after which the guest is told without being asked. Below `BUF_ALLOC`, so a
/// guest that ran out of credit always hears back once its data has gone out.
pub const UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// The flow-control state of one connection, both directions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credit {
    /// The guest's receive buffer and how much of it the guest has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    sent: u32,
    /// Guest bytes passed on to the host socket (freed from our buffer).
    fwd_cnt: u32,
    /// The `fwd_cnt` last told to the guest.
    advertised_fwd_cnt: u32,
}

impl Credit {
    /// Records what a guest packet says about the guest's receive buffer.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.sent.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `n` payload bytes sent to the guest; `n` never exceeds [`Self::peer_credit`].
    pub fn record_sent(&mut self, n: u32) {
        debug_assert!(n <= self.peer_credit());
        self.sent = self.sent.wrapping_add(n);
    }

    /// Records `n` guest bytes written to the host socket.
    pub fn record_forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// True when enough buffer was freed since the guest last heard that it should be told.
    pub fn update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.advertised_fwd_cnt) >= UPDATE_THRESHOLD
    }

    /// The (`buf_alloc`, `fwd_cnt`) pair for a packet to the guest, remembered as told.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.advertised_fwd_cnt = self.fwd_cnt;
        (BUF_ALLOC, self.fwd_cnt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_the_peer_buffer_minus_what_is_in_flight() {
        let mut c = Credit::default();
        assert_eq!(c.peer_credit(), 0, "no credit before the guest speaks");
        c.update_peer(4096, 0);
        assert_eq!(c.peer_credit(), 4096);
        c.record_sent(4000);
        assert_eq!(c.peer_credit(), 96);
        c.record_sent(96);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer(4096, 1000);
        assert_eq!(c.peer_credit(), 1000);
    }

    #[test]
    fn counters_wrap_around_u32() {
        let mut c = Credit {
            sent: u32::MAX - 99,
            peer_fwd_cnt: u32::MAX - 99,
            ..Credit::default()
        };
        c.update_peer(1000, u32::MAX - 99);
        c.record_sent(600);
        assert_eq!(c.sent, 500, "wrapped");
        assert_eq!(c.peer_credit(), 400);
        c.update_peer(1000, 400);
        assert_eq!(c.peer_credit(), 900, "fwd_cnt wrapped too");
        c.fwd_cnt = u32::MAX - 10;
        c.advertised_fwd_cnt = u32::MAX - 10;
        c.record_forwarded(UPDATE_THRESHOLD);
        assert!(c.update_due(), "difference across the wrap");
    }

    #[test]
    fn a_shrinking_or_lying_peer_gets_no_credit_not_a_huge_one() {
        let mut c = Credit::default();
        c.update_peer(4096, 0);
        c.record_sent(4096);
        c.update_peer(1024, 0);
        assert_eq!(c.peer_credit(), 0, "buffer shrank below what is in flight");
        c.update_peer(4096, 5000);
        assert_eq!(
            c.peer_credit(),
            0,
            "claims to have consumed more than was sent"
        );
    }

    #[test]
    fn never_more_than_the_peer_credit_over_many_rounds() {
        let mut c = Credit::default();
        let mut consumed = 0u32;
        c.update_peer(10_000, consumed);
        for round in 0..1000u32 {
            let want = 3_000 + round % 7_000;
            let n = want.min(c.peer_credit());
            c.record_sent(n);
            assert!(c.sent.wrapping_sub(consumed) <= 10_000);
            consumed = consumed.wrapping_add(n / 2 + round % 3);
            consumed = consumed.min(c.sent);
            c.update_peer(10_000, consumed);
        }
    }

    #[test]
    fn updates_are_due_after_a_quarter_of_the_buffer_is_freed() {
        let mut c = Credit::default();
        assert_eq!(c.stamp(), (BUF_ALLOC, 0));
        c.record_forwarded(UPDATE_THRESHOLD - 1);
        assert!(!c.update_due());
        c.record_forwarded(1);
        assert!(c.update_due());
        assert_eq!(c.stamp(), (BUF_ALLOC, UPDATE_THRESHOLD));
        assert!(!c.update_due(), "told");
    }
}
