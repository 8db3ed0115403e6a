//! Fault injection: one seeded draw per request decides whether it is dropped, answered with a
//! 5xx, or has its answer slowed, garbled or lost.

use std::time::Duration;

use crate::state::State;

/// What the fault injector does to one request. Only `Drop` and `ServerError` keep the request
/// from being carried out; the others act on its answer, the request (a create's task made and
/// billed, or its refusal) having had its effect when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer normally.
    None,
    /// Close the connection without a response, the request not carried out.
    Drop,
    /// Carry the request out, then close the connection without a response.
    LostAnswer,
    /// Carry the request out on arrival; send its answer this long after (already divided by
    /// speed).
    Slow(Duration),
    /// Carry the request out; send its answer's status and headers with the body cut in half
    /// (not JSON).
    Malformed,
    /// 5000, 5001 or 5002 with its HTTP status; nothing else happens.
    ServerError(u32),
}

impl State {
    /// Draws the fault of one request. Zero rates draw nothing, so a fault-free mock's sequence
    /// of task durations does not depend on how many requests it served.
    pub(crate) fn draw_fault(&mut self) -> Fault {
        let faults = self.config.faults;
        if self.chance(faults.drop_rate) {
            return Fault::Drop;
        }
        if self.chance(faults.malformed_rate) {
            return Fault::Malformed;
        }
        if self.chance(faults.fault_rate) {
            let code = match self.draw() {
                x if x < 1.0 / 3.0 => 5000,
                x if x < 2.0 / 3.0 => 5001,
                _ => 5002,
            };
            return Fault::ServerError(code);
        }
        if self.chance(faults.slow_rate) {
            return Fault::Slow(self.config.scaled(faults.slow_delay));
        }
        // Drawn last, so a mock without it draws every other fault as before.
        if self.chance(faults.lost_answer_rate) {
            return Fault::LostAnswer;
        }
        Fault::None
    }
}
