//! Clients of Switchboard written in Rust, for the integration tests and the load generator.
//!
//! - [`signal`]: the WebSocket signaling protocol.
//! - [`rtc`]: a WebRTC publisher and subscriber on the `webrtc` 0.21 crate, an independent stack from
//!   the server's str0m.

pub mod rtc;
pub mod signal;
