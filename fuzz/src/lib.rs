//! What the engine targets share: a runtime, a one-worker engine on 127.0.0.1, and a sink that
//! drops the engine's events.

use switchboard::billing::ConsumerUpdate;
use switchboard::config::MediaConfig;
use switchboard::ids::{CallId, SessionId};
use switchboard::sfu::{MediaSink, RtcEvent};

/// A sink that drops everything.
pub struct Quiet;

impl MediaSink for Quiet {
    fn deliver(&self, _session: SessionId, _event: RtcEvent) {}
    fn room_changed(&self, _room: &CallId, _participants: usize, _at_ms: u64) {}
    fn consumer_changed(&self, _update: ConsumerUpdate) {}
}

/// A runtime with one worker thread, for the engine's async API.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One media worker on a free port of 127.0.0.1.
pub fn one_worker() -> MediaConfig {
    MediaConfig {
        udp_port: 0,
        tcp_port: 0,
        workers: 1,
        ..MediaConfig::default()
    }
}
