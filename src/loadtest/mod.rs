//! `switchboard loadtest`: puts a real load on a running server and reports what it measured.
//!
//! - [`media`] (the default scenario): rooms of publishers and subscribers doing the real call
//!   flow (invite, accept, `rtc_join`, publish/subscribe with DTLS-SRTP through the server's UDP
//!   port) with synthetic VP8 and Opus ([`synth`]), driven by one media thread ([`engine`]).
//! - [`janus`] and [`relay`]: the same media load against Janus's VideoRoom (through its HTTP
//!   API) and against a plain UDP relay (no SRTP: the floor), for `scripts/bench-compare`.
//! - [`signaling`]: invite → accept → end cycles over real WebSockets, and idle sessions for memory.
//! - [`report`]: percentiles, loss, and the server's CPU per forwarded packet from `/metrics`.
//! - [`udp`]: batched socket IO with kernel receive timestamps.

pub mod engine;
pub mod janus;
pub mod media;
pub mod relay;
pub mod report;
pub mod signaling;
pub mod synth;
pub mod udp;
