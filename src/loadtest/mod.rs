//! `switchboard loadtest`: puts a real load on a running server and reports what it measured.
//!
//! - [`signaling`]: invite → accept → end cycles over real WebSockets, and idle sessions for memory.

pub mod signaling;
