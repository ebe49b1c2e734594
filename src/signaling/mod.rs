//! Call-invitation signaling (PROTOCOL.md sections 1–3).
//!
//! - [`wire`]: frames, typed op arguments, events and error codes, exactly as on the wire.
//! - [`core`]: the state machine. Pure: `now` comes in, events and effects come out.
//!
//! The async shell that owns sockets, timers and storage lives in [`crate::server`]; it feeds this core
//! one input at a time (one order per call) and carries out what comes back.

pub mod core;
pub mod quota;
pub mod wire;

#[cfg(test)]
mod tests;

pub use self::core::{
    CallRecord, CallUserRecord, Delivery, Effect, Notice, Output, Rules, Signaling,
};
pub use self::wire::{ApiError, ErrorCode, Event, Op, Reply, Request};

use crate::ids::SessionId;

/// What [`Signaling::apply`] did with an op.
#[derive(Debug)]
pub enum Applied {
    /// The core handled it.
    Done(Output, Reply),
    /// Not a call-state op (queries, media): the shell handles it.
    NotMine(Op),
}

impl Signaling {
    /// Applies one call-state op from `session` at `now`.
    pub fn apply(&mut self, now: u64, session: SessionId, op: Op) -> Applied {
        let (out, reply) = match op {
            Op::CallInvite(a) => self.call_invite(now, session, a),
            Op::CallingInvite(a) => self.calling_invite(now, session, a),
            Op::CallCancel(a) => self.call_cancel(now, session, a),
            Op::CallAccept(a) => self.call_answer(now, session, a, true),
            Op::CallReject(a) => self.call_answer(now, session, a, false),
            Op::CallJoin(a) => self.call_join(now, session, a),
            Op::CallQuit(a) => self.call_quit(now, session, a),
            Op::CallEnd(a) => self.call_end(now, session, a),
            other => return Applied::NotMine(other),
        };
        Applied::Done(out, reply)
    }
}
