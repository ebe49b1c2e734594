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
//! **Fault hook.** With `SWITCHBOARD_TEST_FAULT` set, requests from the user [`FAULT_USER`] panic
//! where the value says: `session_panic` (in the session task, on `query_call_list`) or
//! `worker_panic` (in the SFU worker, on `rtc_join`). Nothing happens for any other user or
//! without the variable; it exists so that the tests can inject a real panic into the release
//! binary.

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
            if is_critical(name) {
                tracing::error!(thread = name, "a critical thread panicked; aborting so that the supervisor restarts the server");
                eprintln!("switchboard: thread {name} panicked; aborting (the supervisor restarts the server)");
                std::process::abort();
            }
        }));
    });
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
    fn the_hook_does_nothing_without_the_variable_or_for_other_users() {
        // The test process has no SWITCHBOARD_TEST_FAULT.
        session_request(
            &UserId::parse(FAULT_USER).expect("valid"),
            "query_call_list",
        );
        worker_join(&UserId::parse(FAULT_USER).expect("valid"));
    }
}
