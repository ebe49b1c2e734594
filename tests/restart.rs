//! A restart loses no call: the real binary is killed (SIGKILL, then SIGTERM) while an invitation rings
//! and started again on the same database.

mod common;

use std::time::{Duration, Instant};

use common::WAIT;
use common::process::{free_port, start, token};
use serde_json::{Value, json};

async fn restart_keeps_ringing_calls(signal: Option<i32>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("calls.db");
    let port = free_port();
    let mut p = start(&db, port, &[]).await;
    let a = p.client("alice").await;
    let mut c = p.client("carol").await;
    let r = a
        .request(
            "call_invite",
            json!({"invitees": ["bob", "carol"], "timeout": 8, "extended_data": "x"}),
        )
        .await
        .expect("invite");
    let call = r["call_id"].as_str().expect("id").to_owned();
    c.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    let invited_at = Instant::now();
    match signal {
        None => {
            p.child.kill().expect("SIGKILL");
            p.child.wait().expect("exits");
        }
        Some(sig) => {
            // Nothing is in progress (the call only rings), so the drain ends at once.
            let status = p.signal_and_wait(sig, Duration::from_secs(20));
            assert!(status.success(), "a graceful stop exits 0: {status}");
        }
    }
    drop((a, c));

    let p = start(&db, port, &[]).await;
    // Bob was offline: he now gets the invitation with the time that is left.
    let mut b = p.client("bob").await;
    let inv = b.next_event(WAIT).await.expect("replayed");
    assert_eq!(inv.name, "call_invitation_received");
    assert_eq!(inv.data["call_id"], call);
    let left = inv.data["timeout"].as_u64().expect("timeout");
    let elapsed = invited_at.elapsed().as_secs();
    assert!(
        left <= 8 - elapsed && left + 2 >= 8 - elapsed,
        "{left} s left after {elapsed} s"
    );
    // Carol had received it before the crash: it rings again.
    let mut c = p.client("carol").await;
    let inv = c.next_event(WAIT).await.expect("replayed");
    assert_eq!(inv.name, "call_invitation_received");
    // History is complete.
    let a = p.client("alice").await;
    let list = a
        .request("query_call_list", json!({"count": 5}))
        .await
        .expect("history");
    assert_eq!(list["calls"][0]["call_id"], call);
    assert_eq!(list["calls"][0]["state"], "started");
    let one: Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v1/calls/{call}", p.port))
        .bearer_auth(token("ops", true))
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    assert_eq!(one["users"].as_array().map(Vec::len), Some(3));
    // The timers were re-armed: the invitation times out when it was due.
    let t = b
        .wait_for("call_invitation_timeout", Duration::from_secs(12))
        .await
        .expect("times out");
    assert_eq!(t.data["call_id"], call);
    let at = invited_at.elapsed();
    assert!(
        at >= Duration::from_secs(7) && at <= Duration::from_secs(10),
        "timed out at {at:?}"
    );
    c.wait_for("call_invitation_timeout", WAIT)
        .await
        .expect("times out");
    let mut p = p;
    p.child.kill().expect("kill");
    let _ = p.child.wait();
}

#[tokio::test]
async fn kill_9_during_ringing_loses_no_call() {
    restart_keeps_ringing_calls(None).await;
}

#[tokio::test]
async fn sigterm_during_ringing_loses_no_call_and_exits_0() {
    restart_keeps_ringing_calls(Some(libc::SIGTERM)).await;
}
