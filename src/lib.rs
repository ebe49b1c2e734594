//! Switchboard: a self-hosted calling server.
//!
//! The layout follows the flow of a call (see `../shared/STYLE.md` and `docs/architecture.md`):
//!
//! - [`signaling`]: the call-invitation state machine, a pure core with time passed in.
//! - [`server`]: the async shell: axum HTTP/WebSocket, the session registry, timers, the admin API.
//! - [`storage`]: the embedded SQLite store: call history, the usage ledger, the webhook outbox.
//! - [`sfu`]: the media plane: rooms, forwarding, str0m in RTP mode on one UDP port.
//! - [`codec`]: bitstream inspection (keyframes, resolutions).
//! - [`config`], [`auth`], [`ids`], [`metrics`]: shared foundations.
//!
//! Imports only go down: `server` uses `signaling` and `storage`; the pure cores use nothing above them.

pub mod auth;
pub mod client;
pub mod codec;
pub mod config;
pub mod ids;
pub mod metrics;
pub mod sfu;
