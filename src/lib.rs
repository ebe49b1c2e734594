//! Switchboard: a self-hosted calling server.
//!
//! The layout follows the flow of a call (see `../shared/STYLE.md` and `docs/architecture.md`):
//!
//! - [`signaling`]: the call-invitation state machine, a pure core with time passed in.
//! - [`server`]: the async shell: axum HTTP/WebSocket, the session registry, timers, the admin API.
//! - [`storage`]: the embedded SQLite store: call history, the usage ledger, the webhook outbox.
//! - [`sfu`]: the media plane: rooms, forwarding, str0m in RTP mode on one UDP port.
//! - [`codec`]: video resolution measured from RTP payloads (VP8, VP9, H.264, AV1), never claimed.
//! - [`billing`]: the tier meter (pure, time passed in) and usage reports.
//! - [`webhooks`]: operator webhook events, signatures and retry policy.
//! - [`loadtest`]: the load generator.
//! - [`client`]: Rust clients for tests and the load generator.
//! - [`config`], [`auth`], [`ids`], [`metrics`]: shared foundations.
//!
//! Imports only go down: `server` uses `signaling` and `storage`; the pure cores use nothing above them.

pub mod auth;
pub mod billing;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod loadtest;
pub mod metrics;
mod mmsg;
pub mod server;
pub mod sfu;
pub mod signaling;
pub mod storage;
pub mod turn;
pub mod webhooks;
