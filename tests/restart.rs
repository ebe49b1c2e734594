//! A restart loses no call: the real binary is killed (SIGKILL, then SIGTERM) while an invitation rings
//! and started again on the same database. And what a start does to an existing database's history:
//! retention (`[storage] history_days`).

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

/// `[storage] history_days`: at start, calls that ended before the retention are deleted with
/// their users; recent ones and calls in progress stay.
#[tokio::test]
async fn history_past_the_retention_is_deleted() {
    use switchboard::ids::{CallId, UserId};
    use switchboard::signaling::wire::{CallState, EndReason, Mode, UserState};
    use switchboard::signaling::{CallRecord, CallUserRecord};

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("calls.db");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let day = 86_400_000;
    let call = |id: &str, created: u64, ended: Option<u64>| CallRecord {
        call_id: CallId::parse(id).expect("valid"),
        caller: UserId::parse("alice").expect("valid"),
        mode: Mode::Advanced,
        state: if ended.is_some() {
            CallState::Ended
        } else {
            CallState::Started
        },
        extended_data: String::new(),
        timeout_secs: 30,
        create_time: created,
        end_time: ended.unwrap_or(0),
        end_reason: ended.map(|_| EndReason::Ended),
        users: vec![CallUserRecord {
            user_id: UserId::parse("alice").expect("valid"),
            state: if ended.is_some() {
                UserState::Quit
            } else {
                UserState::Accepted
            },
            extended_data: String::new(),
            inviter: UserId::parse("alice").expect("valid"),
            invite_extended_data: String::new(),
            invite_time: created,
            deadline: created + 30_000,
            accept_time: created,
            leave_time: ended.unwrap_or(0),
        }],
    };
    common::pg::with_store(&db, |store| {
        store
            .write_calls(&[
                call("c_old", now - 5 * day, Some(now - 5 * day + 60_000)),
                call("c_recent", now - day, Some(now - day + 60_000)),
                call("c_long", now - 5 * day, None),
            ])
            .expect("writes");
    });
    let port = free_port();
    let mut p = start(
        &db,
        port,
        &[("SWITCHBOARD_STORAGE_HISTORY_DAYS", "3".into())],
    )
    .await;
    let status = |id: &'static str| {
        let url = format!("http://127.0.0.1:{port}/v1/calls/{id}");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token("ops", true))
                .send()
                .await
                .expect("http")
                .status()
                .as_u16()
        }
    };
    let until = Instant::now() + WAIT;
    while status("c_old").await != 404 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status("c_old").await,
        404,
        "the call that ended 5 days ago is deleted"
    );
    assert_eq!(
        status("c_recent").await,
        200,
        "the call that ended yesterday stays"
    );
    assert_eq!(
        status("c_long").await,
        200,
        "a call in progress stays, whatever its age"
    );
    p.child.kill().expect("kill");
    let _ = p.child.wait();
}
