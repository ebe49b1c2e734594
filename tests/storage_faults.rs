//! A failing database never gets an `ok`: the real binary runs on a SQLite file that another process
//! (this test, through its own connection) holds locked. Ops that change calls are answered
//! `unavailable` after `[storage] write_timeout`, their events are never sent, nothing of them is in
//! the history, `/readyz` is red and `switchboard_storage_up` is 0; once the lock is released the
//! server works again with the calls as they were last stored.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::WAIT;
use common::process::{Proc, free_port, start, token};
use serde_json::{Value, json};

/// Holds the database's write lock, as another process would.
fn lock(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).expect("opens");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c.execute_batch("BEGIN EXCLUSIVE").expect("locks");
    c
}

async fn get(p: &Proc, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(p.url(path))
        .bearer_auth(token("ops", true))
        .send()
        .await
        .expect("http");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn storage_up(p: &Proc) -> Option<f64> {
    let (_, text) = get(p, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("switchboard_storage_up "))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_ready(p: &Proc, ready: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = get(p, "/readyz").await;
        if (status == 200) == ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status}, wanted ready={ready}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_locked_database_gets_no_ok_and_loses_nothing_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("calls.db");
    let p = start(
        &db,
        free_port(),
        &[("SWITCHBOARD_STORAGE_WRITE_TIMEOUT", "2".into())],
    )
    .await;
    let alice = p.client("alice").await;
    let mut bob = p.client("bob").await;
    let mut carol = p.client("carol").await;
    let dave = p.client("dave").await;

    // A call stored before the outage: alice rings bob.
    let r = alice
        .request("call_invite", json!({"invitees": ["bob"], "timeout": 120}))
        .await
        .expect("invite while storage works");
    let stored = r["call_id"].as_str().expect("call_id").to_owned();
    bob.wait_for("call_invitation_received", WAIT)
        .await
        .expect("bob rings");
    assert_eq!(storage_up(&p).await, Some(1.0));

    let locker = lock(&db);

    // A new call cannot be stored: no ok, no call id, carol is never rung.
    let started = Instant::now();
    let e = dave
        .request("call_invite", json!({"invitees": ["carol"], "timeout": 60}))
        .await
        .expect_err("an invite that is not stored is not ok");
    assert_eq!(e.code(), Some("unavailable"), "{e:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the write was retried while the client waited ({:?})",
        started.elapsed()
    );
    assert!(
        carol.next_event(Duration::from_millis(500)).await.is_err(),
        "carol was rung for a call that does not exist"
    );
    // A change to the stored call cannot be stored either: bob's accept is refused, alice hears nothing.
    let e = bob
        .request("call_accept", json!({"call_id": stored}))
        .await
        .expect_err("an accept that is not stored is not ok");
    assert_eq!(e.code(), Some("unavailable"), "{e:?}");
    wait_ready(&p, false).await;
    assert_eq!(storage_up(&p).await, Some(0.0));
    let (status, body) = get(&p, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("switchboard_storage_rollbacks_total") && !l.ends_with(" 0")),
        "rollbacks are counted"
    );

    drop(locker);
    wait_ready(&p, true).await;
    assert_eq!(storage_up(&p).await, Some(1.0));

    // What is stored is what the clients were told: one ringing call, nothing for carol.
    let (status, body) = get(&p, "/v1/calls?limit=10").await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).expect("json");
    let calls = list["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "{list}");
    assert_eq!(calls[0]["call_id"], stored);
    let (status, body) = get(&p, &format!("/v1/calls/{stored}")).await;
    assert_eq!(status, 200, "{body}");
    let call: Value = serde_json::from_str(&body).expect("json");
    let bob_state = call["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["user_id"] == "bob"))
        .map(|u| u["state"].clone());
    assert_eq!(bob_state, Some(json!("received")), "{call}");

    // And the server works again: bob can accept the call he was refused, alice hears it.
    let mut alice = alice;
    bob.request("call_accept", json!({"call_id": stored}))
        .await
        .expect("accept once storage works");
    alice
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("alice hears the accept");
    // Dave's invitation, refused during the outage, now rings carol and is stored.
    let r = dave
        .request("call_invite", json!({"invitees": ["carol"], "timeout": 60}))
        .await
        .expect("invite once storage works");
    let id = r["call_id"].as_str().expect("call_id").to_owned();
    carol
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("carol rings");
    let (status, _) = get(&p, &format!("/v1/calls/{id}")).await;
    assert_eq!(status, 200, "an ok'd call is stored");
}
