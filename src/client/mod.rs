//! Clients of Switchboard written in Rust, for the integration tests and the load generator.
//!
//! - [`signal`]: the WebSocket signaling protocol.

pub mod signal;
