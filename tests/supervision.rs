//! Nothing broken is left running: a panic is injected into the real binary
//! (`SWITCHBOARD_TEST_FAULT`, see `src/fault.rs`). A panicking SFU worker aborts the process for
//! the supervisor to restart (instead of leaving its rooms answering `internal` while `/healthz`
//! stays green); a panicking session task disconnects its session (its user does not stay online);
//! a panic inside the engine's call for one connection (a str0m bug reached by a client's SDP or
//! datagrams) closes that connection and nothing else.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::WAIT;
use common::process::{free_port, start};
use serde_json::json;
use switchboard::client::signal::{ClientError, SignalClient};

/// `f` calls `bob`, who accepts; returns the call ID once `f` has seen the acceptance.
async fn accepted_call(f: &mut SignalClient, bob: &mut SignalClient) -> String {
    let r = f
        .request("call_invite", json!({"invitees": ["bob"], "timeout": 60}))
        .await
        .expect("invite");
    let call = r["call_id"].as_str().expect("call_id").to_owned();
    bob.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    bob.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    f.wait_for("call_user_state_changed", WAIT)
        .await
        .expect("accepted");
    call
}

#[tokio::test]
async fn a_panicking_sfu_worker_aborts_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = start(
        &dir.path().join("db.sqlite"),
        free_port(),
        &[("SWITCHBOARD_TEST_FAULT", "worker_panic".into())],
    )
    .await;
    let mut f = p.client("fault-injector").await;
    let mut bob = p.client("bob").await;
    let call = accepted_call(&mut f, &mut bob).await;
    // Bob's join works: only the fault user's join panics.
    bob.request("rtc_join", json!({"call_id": call}))
        .await
        .expect("bob joins");
    let _ = f
        .request("rtc_join", json!({"call_id": call}))
        .await
        .expect_err("the worker panicked");
    let status = p.signal_and_wait(0, Duration::from_secs(10));
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "a worker panic aborts the process: {status}"
    );
}

#[tokio::test]
async fn a_panic_in_one_connections_engine_call_closes_that_connection_and_the_server_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = start(
        &dir.path().join("db.sqlite"),
        free_port(),
        &[("SWITCHBOARD_TEST_FAULT", "engine_panic".into())],
    )
    .await;
    let mut f = p.client("fault-injector").await;
    let mut bob = p.client("bob").await;
    let call = accepted_call(&mut f, &mut bob).await;
    for c in [&mut f, &mut bob] {
        c.request("rtc_join", json!({"call_id": call}))
            .await
            .expect("joins");
    }
    // A browser's offer that str0m parses; the hook panics where str0m's negotiation runs.
    let offer = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/worker_sdp/chrome_audio_video.sdp"
    ))
    .expect("seed offer");
    let offer = offer.split("\n a=candidate").next().expect("offer part");
    match f
        .request("rtc_publish", json!({"call_id": call, "sdp": offer}))
        .await
    {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, "bad_request", "{message}");
            assert!(message.contains("closed the connection"), "{message}");
        }
        other => panic!("expected the contained panic's bad_request, got {other:?}"),
    }
    // The process lives and serves: bob's connection is still there and a fresh offer of his
    // is answered; the panic was counted.
    let r = bob
        .request("rtc_publish", json!({"call_id": call, "sdp": offer}))
        .await
        .expect("bob's offer is answered");
    assert!(
        r["sdp"].as_str().is_some_and(|s| s.contains("m=video")),
        "{r}"
    );
    let metrics = common::metrics_text(&p.url("/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchboard_contained_panics_total") && l.ends_with(" 1")),
        "the panic was counted"
    );
    assert!(
        matches!(p.child.try_wait(), Ok(None)),
        "the server is still running"
    );
}

#[tokio::test]
async fn a_panicking_session_task_takes_its_user_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = start(
        &dir.path().join("db.sqlite"),
        free_port(),
        &[
            ("SWITCHBOARD_TEST_FAULT", "session_panic".into()),
            ("SWITCHBOARD_SIGNALING_DISCONNECT_GRACE", "1".into()),
        ],
    )
    .await;
    let f = p.client("fault-injector").await;
    let mut bob = p.client("bob").await;
    let r = f
        .request("call_invite", json!({"invitees": ["bob"], "timeout": 60}))
        .await
        .expect("invite");
    let call = r["call_id"].as_str().expect("call_id").to_owned();
    bob.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    // The caller's session task panics on this request.
    let started = Instant::now();
    let _ = f.request("query_call_list", json!({"count": 1})).await;
    // The session is gone, so the caller is gone once the grace period passes: bob's ringing stops.
    let ev = bob
        .wait_for("call_invitation_cancelled", Duration::from_secs(10))
        .await
        .expect("the caller went offline with its session");
    assert_eq!(ev.data["call_id"], call);
    assert!(started.elapsed() < Duration::from_secs(8));
    // The server goes on serving.
    let r = bob
        .request("query_call_list", json!({"count": 1}))
        .await
        .expect("served");
    assert_eq!(r["calls"][0]["end_reason"], "caller_gone", "{r}");
    let (status, _) = (
        reqwest::get(p.url("/healthz"))
            .await
            .expect("http")
            .status(),
        (),
    );
    assert_eq!(status, 200);
}
