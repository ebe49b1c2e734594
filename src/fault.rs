//! What a panic does, and the test-only fault hook that proves it.
//!
//! **Policy.** A panic in a thread that owns shared state (the storage writer, the WAL checkpointer,
//! the SFU's I/O thread and workers) aborts the process: the state it held can no longer be trusted,
//! and without the thread the server would answer `internal` for its rooms for ever while `/healthz`
//! stayed green. The supervisor restarts the process (systemd `Restart=on-failure`, Kubernetes'
//! restart policy), and a restart loses no call (`tests/restart.rs`). A panic while the signaling
//! core's lock is held poisons the lock, and the next user of the core aborts for the same reason.
//! A panic in one WebSocket session's task is contained: the task ends, and its drop guard
//! disconnects the session, so its user does not stay online.
//!
//! **Contained calls.** The media engine's calls into str0m for one connection (its datagrams, its
//! timers, its SDP and candidates) run through [`contain`]: such a call touches that connection's
//! `Rtc` and nothing else, so a panic in it (a str0m bug reached by one client's input) is caught,
//! counted (`switchboard_contained_panics_total`), and the worker throws that connection away
//! instead of aborting the server with everyone's calls. The fuzz targets (built with
//! `--cfg fuzzing`) let such panics through, so that the fuzzer still reports them.
//!
//! **Fault hook.** With `SWITCHBOARD_TEST_FAULT` set, requests from the user [`FAULT_USER`] panic
//! where the value says: `session_panic` (in the session task, on `query_call_list`),
//! `worker_panic` (in the SFU worker, on `rtc_join`) or `engine_panic` (in the worker's contained
//! str0m call for `rtc_publish`). Nothing happens for any other user or
//! without the variable; it exists so that the tests can inject a real panic into the release
//! binary.

use std::cell::Cell;
use std::sync::{Once, OnceLock};

use crate::ids::UserId;

/// The user whose requests the fault hook turns into panics.
pub const FAULT_USER: &str = "fault-injector";

/// Threads whose panic aborts the process: by name, or by name prefix ending in `-`.
const CRITICAL: &[&str] = &["storage", "checkpoint", "sfu-io", "sfu-worker-"];

fn is_critical(name: &str) -> bool {
    CRITICAL.iter().any(|c| {
        if c.ends_with('-') {
            name.strip_prefix(c).is_some_and(|rest| !rest.is_empty())
        } else {
            name == *c
        }
    })
}

/// Installs the panic policy (once per process): after the usual report, a panic in a critical
/// thread aborts.
pub fn install_panic_policy() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            if is_critical(name) && !in_contained_call() {
                tracing::error!(thread = name, "a critical thread panicked; aborting so that the supervisor restarts the server");
                eprintln!("switchboard: thread {name} panicked; aborting (the supervisor restarts the server)");
                std::process::abort();
            }
        }));
    });
}

thread_local! {
    /// How many [`contain`] calls this thread is inside.
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}

fn in_contained_call() -> bool {
    CONTAINED.with(Cell::get) > 0
}

/// A panic that [`contain`] caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contained;

/// Runs `f`, a call whose panic can only have corrupted state the caller then discards (one
/// media connection's `Rtc`). A panic is reported as usual but does not abort a critical thread;
/// it comes back as `Err(Contained)`. In the fuzz targets it propagates.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, Contained> {
    if cfg!(fuzzing) {
        return Ok(f());
    }
    CONTAINED.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get() - 1));
    r.map_err(|_| {
        metrics::counter!(crate::metrics::CONTAINED_PANICS).increment(1);
        tracing::error!("a media connection's engine panicked; that connection is closed");
        Contained
    })
}

/// Called when the signaling core's lock is found poisoned: a panic happened while the core was
/// half-way through a change.
pub fn core_poisoned() -> ! {
    tracing::error!(
        "the signaling core panicked while locked; aborting so that the supervisor restarts the server"
    );
    eprintln!("switchboard: the signaling core panicked while locked; aborting");
    std::process::abort()
}

/// Called when this node finds that another took the cluster's calls over while it still thought
/// it owned them (it was cut off from the database): its in-memory calls are stale, so it exits
/// (code 75, "temporary failure") and its supervisor starts it again as a follower.
pub fn exit_lost_ownership() -> ! {
    eprintln!("switchboard: another node owns the calls now; exiting to restart clean");
    std::process::exit(75)
}

fn armed(kind: &str) -> bool {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("SWITCHBOARD_TEST_FAULT").ok())
        .as_deref()
        == Some(kind)
}

/// The fault hook in a session task.
pub fn session_request(user: &UserId, op: &str) {
    if op == "query_call_list" && user.as_str() == FAULT_USER && armed("session_panic") {
        panic!("injected session panic (SWITCHBOARD_TEST_FAULT=session_panic)");
    }
}

/// The fault hook inside a contained media-engine call: `rtc_publish` by the fault user panics
/// where str0m would (`SWITCHBOARD_TEST_FAULT=engine_panic`).
pub fn engine_offer(user: &UserId) {
    if user.as_str() == FAULT_USER && armed("engine_panic") {
        panic!("injected media engine panic (SWITCHBOARD_TEST_FAULT=engine_panic)");
    }
}

/// The fault hook in an SFU worker.
pub fn worker_join(user: &UserId) {
    if user.as_str() == FAULT_USER && armed("worker_panic") {
        panic!("injected SFU worker panic (SWITCHBOARD_TEST_FAULT=worker_panic)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threads_that_own_shared_state_are_critical() {
        for name in [
            "storage",
            "checkpoint",
            "sfu-io",
            "sfu-worker-0",
            "sfu-worker-12",
        ] {
            assert!(is_critical(name), "{name}");
        }
        for name in [
            "tokio-runtime-worker",
            "main",
            "storage-2",
            "sfu-worker-",
            "",
        ] {
            assert!(!is_critical(name), "{name}");
        }
    }

    #[test]
    fn a_contained_panic_in_a_critical_thread_comes_back_as_an_error() {
        // If containment failed, the policy would abort this test process.
        install_panic_policy();
        let r = std::thread::Builder::new()
            .name("sfu-worker-9".into())
            .spawn(|| {
                let caught = contain(|| -> u32 { panic!("a str0m bug") });
                let fine = contain(|| 7);
                (caught, fine, in_contained_call())
            })
            .expect("thread")
            .join()
            .expect("the thread did not panic");
        assert_eq!(r, (Err(Contained), Ok(7), false));
    }

    #[test]
    fn the_hook_does_nothing_without_the_variable_or_for_other_users() {
        // The test process has no SWITCHBOARD_TEST_FAULT.
        session_request(
            &UserId::parse(FAULT_USER).expect("valid"),
            "query_call_list",
        );
        worker_join(&UserId::parse(FAULT_USER).expect("valid"));
        engine_offer(&UserId::parse(FAULT_USER).expect("valid"));
    }
}
