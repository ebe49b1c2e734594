//! Every flow of PROTOCOL.md section 3 against the real server over real WebSockets, plus the frame
//! rules of section 2 and the HTTP calls of section 6.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT};
use futures_util::future::join_all;
use serde_json::{Value, json};
use switchboard::client::signal::{ClientError, SignalClient};
use tokio_tungstenite::tungstenite::Message;

fn code(r: Result<Value, ClientError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e.code().unwrap_or("not an api error").to_owned(),
    }
}

async fn invite(c: &SignalClient, invitees: &[&str], mode: &str, timeout: u64) -> String {
    let r = c
        .request(
            "call_invite",
            json!({"invitees": invitees, "mode": mode, "timeout": timeout}),
        )
        .await
        .expect("invite");
    r["call_id"].as_str().expect("call_id").to_owned()
}

fn user_state(ev: &Value, user: &str) -> Option<String> {
    ev["users"]
        .as_array()?
        .iter()
        .find(|u| u["user_id"] == user)
        .and_then(|u| u["state"].as_str())
        .map(str::to_owned)
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade() {
    let s = TestServer::start().await;
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer nonsense"), Some("Basic abc")] {
        let mut req = http
            .get(s.http("/v1/signal"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.expect("http");
        assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        let body: Value = r.json().await.expect("json body");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(body["error"]["message"].is_string());
    }
    // A token signed with another secret is refused by the WebSocket client too.
    let other = switchboard::auth::TokenAuthority::new("other").issue(
        &"alice".parse().expect("id"),
        None,
        false,
        common::now_secs(),
        60,
    );
    assert!(SignalClient::connect(&s.ws_url(), &other).await.is_err());
    // The token query parameter works for browsers.
    let url = format!("{}?token={}", s.ws_url(), s.token("alice"));
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token accepted");
    drop(ws);
    s.stop().await;
}

#[tokio::test]
async fn session_event_comes_first_and_seq_has_no_gaps() {
    let s = TestServer::start().await;
    let mut a = s.client("alice").await;
    assert_eq!(a.session["user_id"], "alice");
    assert_eq!(a.session["heartbeat"], 30);
    assert!(a.session["server_time"].as_u64().is_some());
    assert!(a.session["session_id"].is_string());
    let b = s.client("bob").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    b.request("call_reject", json!({"call_id": call}))
        .await
        .expect("reject");
    let e1 = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("event");
    let e2 = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("event");
    let e3 = a
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("event");
    assert_eq!((e1.seq, e2.seq, e3.seq), (2, 3, 4));
    s.stop().await;
}

#[tokio::test]
async fn one_to_one_call_invite_accept_and_room_completion_flow() {
    let s = TestServer::start_with(|c| c.signaling.room_empty_timeout = 1).await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    let r = a
        .request(
            "call_invite",
            json!({"invitees": ["bob"], "timeout": 60, "extended_data": "{\"type\":1}"}),
        )
        .await
        .expect("invite");
    let call = r["call_id"].as_str().expect("id").to_owned();
    assert!(call.len() >= 34, "at least 128 random bits: {call}");
    assert_eq!(r["timeout"], 60);
    // The reply came after the state change it caused.
    let ev = a.drain_events();
    assert_eq!(ev[0].name, "call_user_state_changed");
    assert_eq!(user_state(&ev[0].data, "bob").as_deref(), Some("received"));

    let inv = b
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    assert_eq!(inv.data["call_id"], call);
    assert_eq!(inv.data["caller"], "alice");
    assert_eq!(inv.data["inviter"], "alice");
    assert_eq!(inv.data["mode"], "general");
    assert_eq!(inv.data["extended_data"], "{\"type\":1}");
    assert!(
        inv.data["timeout"]
            .as_u64()
            .is_some_and(|t| (59..=60).contains(&t))
    );
    assert_eq!(inv.data["users"].as_array().map(Vec::len), Some(2));

    let r = b
        .request(
            "call_accept",
            json!({"call_id": call, "extended_data": "ok"}),
        )
        .await
        .expect("accept");
    assert_eq!(r["call_id"], call);
    let ch = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    assert_eq!(user_state(&ch.data, "bob").as_deref(), Some("accepted"));
    assert_eq!(ch.data["users"][0]["extended_data"], "ok");

    // Nobody joins the room: after room_empty_timeout the call completes.
    let end = a
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("completes");
    assert_eq!(end.data["reason"], "completed");
    let end = b
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("completes");
    assert_eq!(end.data["reason"], "completed");
    s.stop().await;
}

#[tokio::test]
async fn decline_cancel_and_timeout_end_general_calls() {
    // Alice rings Bob again right after he declines: no re-invite cooldown here (its own test is in
    // tests/hostile.rs).
    let s = TestServer::start_with(|c| c.signaling.reinvite_cooldown = 0).await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    // Decline.
    let call = invite(&a, &["bob"], "general", 30).await;
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    b.request(
        "call_reject",
        json!({"call_id": call, "extended_data": "busy now"}),
    )
    .await
    .expect("reject");
    let end = a
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("ends");
    assert_eq!(end.data["reason"], "rejected");
    assert_eq!(
        code(b.request("call_accept", json!({"call_id": call})).await),
        "invalid_state"
    );
    // Cancel.
    let _ = (a.drain_events(), b.drain_events());
    let call = invite(&a, &["bob"], "general", 30).await;
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    a.request(
        "call_cancel",
        json!({"call_id": call, "extended_data": "sorry"}),
    )
    .await
    .expect("cancel");
    let c = b
        .wait_for("call_invitation_cancelled", WAIT)
        .await
        .expect("cancelled");
    assert_eq!(c.data["inviter"], "alice");
    assert_eq!(c.data["extended_data"], "sorry");
    assert_eq!(c.data["mode"], "general");
    let end = a
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("ends");
    assert_eq!(end.data["reason"], "cancelled");
    // Timeout on both sides.
    let _ = (a.drain_events(), b.drain_events());
    let call = invite(&a, &["bob"], "general", 1).await;
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    let t = b
        .wait_for("call_invitation_timeout", WAIT)
        .await
        .expect("times out");
    assert_eq!(t.data["call_id"], call);
    let ch = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    let ch = if user_state(&ch.data, "bob").as_deref() == Some("timeout") {
        ch
    } else {
        a.wait_for("call_user_state_changed", WAIT)
            .await
            .expect("told")
    };
    assert_eq!(user_state(&ch.data, "bob").as_deref(), Some("timeout"));
    let end = a
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("ends");
    assert_eq!(end.data["reason"], "timeout");
    s.stop().await;
}

#[tokio::test]
async fn busy_users_are_rejected_by_the_server() {
    let s = TestServer::start().await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    let mut c = s.client("carol").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    b.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    // Carol calls Bob during the call: Bob is busy at once.
    let call2 = invite(&c, &["bob"], "general", 30).await;
    let ch = c
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    assert_eq!(user_state(&ch.data, "bob").as_deref(), Some("busy"));
    let end = c
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("ends");
    assert_eq!(end.data["call_id"], call2);
    assert!(
        !b.drain_events()
            .iter()
            .any(|e| e.name == "call_invitation_received")
    );
    // Alice, in a call, cannot call anyone.
    let err = a
        .request("call_invite", json!({"invitees": ["dave"]}))
        .await
        .expect_err("busy");
    match err {
        ClientError::Api { code, details, .. } => {
            assert_eq!(code, "busy");
            assert_eq!(details, Some(json!({"call_id": call})));
        }
        other => panic!("{other}"),
    }
    let _ = a.drain_events();
    s.stop().await;
}

#[tokio::test]
async fn advanced_mode_group_call_invite_more_join_quit_end() {
    let s = TestServer::start().await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    let mut c = s.client("carol").await;
    let d = s.client("dave").await;
    let call = invite(&a, &["bob"], "advanced", 30).await;
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    b.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    let r = b
        .request(
            "calling_invite",
            json!({"call_id": call, "invitees": ["carol", "alice"], "extended_data": "x"}),
        )
        .await
        .expect("invite more");
    assert_eq!(
        r["error_users"],
        json!([{"user_id": "alice", "reason": "already_in_call"}])
    );
    let inv = c
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    assert_eq!(inv.data["inviter"], "bob");
    assert_eq!(inv.data["caller"], "alice");
    c.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    let r = d
        .request("call_join", json!({"call_id": call}))
        .await
        .expect("join by id");
    assert_eq!(r["users"].as_array().map(Vec::len), Some(4));
    assert!(r["create_time"].as_u64().is_some() && r["join_time"].as_u64().is_some());
    let q = c
        .request("call_quit", json!({"call_id": call}))
        .await
        .expect("quit");
    assert!(q["quit_time"].as_u64().is_some() && q["accept_time"].as_u64().is_some());
    let ch = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    let _ = ch;
    let e = d
        .request("call_end", json!({"call_id": call, "extended_data": "bye"}))
        .await
        .expect("end");
    assert!(e["end_time"].as_u64().is_some());
    for cl in [&mut a, &mut b] {
        let end = cl
            .wait_for("call_invitation_ended", WAIT)
            .await
            .expect("ended");
        assert_eq!(end.data["reason"], "ended");
        assert_eq!(end.data["operated_user_id"], "dave");
        assert_eq!(end.data["extended_data"], "bye");
    }
    // Carol quit before the end, so she is not told.
    assert!(
        !c.drain_events()
            .iter()
            .any(|e| e.name == "call_invitation_ended")
    );
    s.stop().await;
}

#[tokio::test]
async fn error_codes_for_the_wrong_side_mode_and_state() {
    let s = TestServer::start().await;
    let a = s.client("alice").await;
    let b = s.client("bob").await;
    let z = s.client("zed").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    assert_eq!(
        code(a.request("call_accept", json!({"call_id": call})).await),
        "not_invitee"
    );
    assert_eq!(
        code(b.request("call_cancel", json!({"call_id": call})).await),
        "not_inviter"
    );
    assert_eq!(
        code(z.request("call_accept", json!({"call_id": call})).await),
        "call_not_found"
    );
    assert_eq!(
        code(a.request("call_quit", json!({"call_id": call})).await),
        "mode_not_supported"
    );
    assert_eq!(
        code(a.request("call_end", json!({"call_id": call})).await),
        "mode_not_supported"
    );
    assert_eq!(
        code(z.request("call_join", json!({"call_id": call})).await),
        "mode_not_supported"
    );
    let ten: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    assert_eq!(
        code(z.request("call_invite", json!({"invitees": ten})).await),
        "too_many_users"
    );
    assert_eq!(
        code(z.request("call_invite", json!({"invitees": ["zed"]})).await),
        "bad_request"
    );
    b.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    assert_eq!(
        code(a.request("call_cancel", json!({"call_id": call})).await),
        "invalid_state"
    );
    assert_eq!(
        code(b.request("call_reject", json!({"call_id": call})).await),
        "invalid_state"
    );
    s.stop().await;
}

#[tokio::test]
async fn every_device_rings_and_one_answer_stops_the_others() {
    let s = TestServer::start().await;
    let a = s.client("alice").await;
    let mut a2 = s.client("alice").await;
    let mut b1 = s.client("bob").await;
    let mut b2 = s.client("bob").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    let created = a2
        .wait_for("call_invitation_created", WAIT)
        .await
        .expect("other device");
    assert_eq!(created.data["call_id"], call);
    b1.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings 1");
    b2.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings 2");
    b1.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    let ch = b2
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    let ch = if user_state(&ch.data, "bob").as_deref() == Some("accepted") {
        ch
    } else {
        b2.wait_for("call_user_state_changed", WAIT)
            .await
            .expect("told")
    };
    assert_eq!(user_state(&ch.data, "bob").as_deref(), Some("accepted"));
    assert_eq!(
        code(b2.request("call_accept", json!({"call_id": call})).await),
        "invalid_state"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_invitee_who_comes_online_late_gets_the_invitation_with_the_time_left() {
    let s = TestServer::start().await;
    let mut a = s.client("alice").await;
    let call = invite(&a, &["bob"], "general", 10).await;
    let ch = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    assert_eq!(user_state(&ch.data, "bob").as_deref(), Some("offline"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut b = s.client("bob").await;
    let inv = b.next_event(WAIT).await.expect("replayed first");
    assert_eq!(inv.name, "call_invitation_received");
    assert_eq!(inv.seq, 2);
    assert_eq!(inv.data["call_id"], call);
    let left = inv.data["timeout"].as_u64().expect("timeout");
    assert!((7..=8).contains(&left), "{left} s left");
    let ch = a
        .wait_for("call_user_state_changed", WAIT)
        .await
        .expect("told");
    assert_eq!(user_state(&ch.data, "bob").as_deref(), Some("received"));
    s.stop().await;
}

#[tokio::test]
async fn a_caller_gone_past_the_grace_cancels_the_invitation() {
    let s = TestServer::start_with(|c| c.signaling.disconnect_grace = 1).await;
    let a = s.client("alice").await;
    let mut b = s.client("bob").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    a.close();
    let c = b
        .wait_for("call_invitation_cancelled", WAIT)
        .await
        .expect("cancelled");
    assert_eq!(c.data["call_id"], call);
    let (status, body) = s.admin_get(&format!("/v1/calls/{call}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["end_reason"], "caller_gone");
    s.stop().await;
}

#[tokio::test]
async fn call_history_pages_newest_first() {
    let s = TestServer::start().await;
    let a = s.client("alice").await;
    let mut made = Vec::new();
    for _ in 0..7 {
        let call = invite(&a, &["bob"], "general", 30).await;
        a.request("call_cancel", json!({"call_id": call}))
            .await
            .expect("cancel");
        made.push(call);
    }
    made.reverse();
    let mut seen = Vec::new();
    let mut flag = 0;
    loop {
        let r = a
            .request("query_call_list", json!({"count": 3, "next_flag": flag}))
            .await
            .expect("list");
        for c in r["calls"].as_array().expect("calls") {
            assert_eq!(c["state"], "ended");
            assert_eq!(c["caller"], "alice");
            assert!(c["end_time"].as_u64().is_some_and(|t| t > 0));
            seen.push(c["call_id"].as_str().expect("id").to_owned());
        }
        flag = r["next_flag"].as_u64().expect("next_flag");
        if flag == 0 {
            break;
        }
    }
    assert_eq!(seen, made);
    assert_eq!(
        code(a.request("query_call_list", json!({"count": 0})).await),
        "bad_request"
    );
    assert_eq!(
        code(a.request("query_call_list", json!({"count": 101})).await),
        "bad_request"
    );
    s.stop().await;
}

#[tokio::test]
async fn query_users_and_ping() {
    let s = TestServer::start().await;
    let a = s.client("alice").await;
    let b = s.client("bob").await;
    b.close();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = a
        .request(
            "query_users",
            json!({"user_ids": ["alice", "bob", "nobody"]}),
        )
        .await
        .expect("users");
    assert_eq!(
        r["users"],
        json!([
            {"user_id": "alice", "user_name": "alice", "online": true},
            {"user_id": "bob", "user_name": "bob", "online": false},
            {"user_id": "nobody", "user_name": "", "online": false}
        ])
    );
    assert_eq!(
        code(
            a.request("query_users", json!({"user_ids": ["no spaces"]}))
                .await
        ),
        "bad_request"
    );
    let p = a.request("ping", json!({})).await.expect("ping");
    assert!(p["server_time"].as_u64().is_some());
    s.stop().await;
}

#[tokio::test]
async fn a_thousand_malformed_frames_get_bad_request_and_harm_nobody() {
    let s = TestServer::start_with(|c| {
        c.signaling.rate = 100_000;
        c.signaling.burst = 100_000;
    })
    .await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    let kinds: Vec<String> = vec![
        "not json".into(),
        "".into(),
        "{".into(),
        "[]".into(),
        "null".into(),
        "42".into(),
        "\"text\"".into(),
        r#"{"op":"ping"}"#.into(),
        r#"{"id":"7","op":"ping"}"#.into(),
        r#"{"id":-3,"op":"ping"}"#.into(),
        r#"{"id":1.5,"op":"ping"}"#.into(),
        r#"{"id":18446744073709551616,"op":"ping"}"#.into(),
    ];
    let with_id: Vec<String> = vec![
        r#"{"id":ID}"#.into(),
        r#"{"id":ID,"op":null}"#.into(),
        r#"{"id":ID,"op":"teleport"}"#.into(),
        r#"{"id":ID,"op":"call_invite"}"#.into(),
        r#"{"id":ID,"op":"call_invite","args":5}"#.into(),
        r#"{"id":ID,"op":"call_invite","args":{"invitees":"bob"}}"#.into(),
        r#"{"id":ID,"op":"call_invite","args":{"invitees":[1,2]}}"#.into(),
        r#"{"id":ID,"op":"call_invite","args":{"invitees":["bob"],"timeout":"x"}}"#.into(),
        r#"{"id":ID,"op":"call_invite","args":{"invitees":["bob"],"timeout":100000}}"#.into(),
        r#"{"id":ID,"op":"call_invite","args":{"invitees":["bob"],"mode":"loud"}}"#.into(),
        r#"{"id":ID,"op":"call_accept","args":{"call_id":42}}"#.into(),
        r#"{"id":ID,"op":"call_accept","args":{"call_id":"has space"}}"#.into(),
        r#"{"id":ID,"op":"query_call_list","args":{"count":-1}}"#.into(),
        r#"{"id":ID,"op":"query_users","args":{"user_ids":[null]}}"#.into(),
        r#"{"id":ID,"op":"rtc_subscription","args":{"call_id":"c_1","track_id":"t","enabled":"yes"}}"#.into(),
    ];
    let mut frames: Vec<(u64, String)> = Vec::new();
    let mut next_id = 1000u64;
    for i in 0..1000 {
        if i % 2 == 0 {
            frames.push((0, kinds[i / 2 % kinds.len()].clone()));
        } else {
            next_id += 1;
            let f = with_id[i / 2 % with_id.len()].replace("ID", &next_id.to_string());
            frames.push((next_id, f));
        }
    }
    let mut bad = 0;
    for (id, f) in frames {
        let reply = a
            .send_and_wait(id, Message::Text(f.clone().into()))
            .await
            .unwrap_or_else(|e| panic!("no reply to {f}: {e}"));
        assert_eq!(reply["ok"], false, "{f}");
        assert_eq!(reply["error"]["code"], "bad_request", "{f}");
        if id != 0 {
            assert_eq!(reply["id"], id, "{f}");
        }
        bad += 1;
    }
    assert_eq!(bad, 1000);
    // The session still works, and the other saw nothing.
    a.request("ping", json!({})).await.expect("alive");
    assert!(b.drain_events().is_empty());
    b.request("ping", json!({})).await.expect("alive");
    let (status, _) = s.admin_get("/v1/calls").await;
    assert_eq!(status, 200);
    let _ = a.drain_events();
    s.stop().await;
}

#[tokio::test]
async fn binary_and_oversize_frames_close_the_session() {
    let s = TestServer::start_with(|c| c.signaling.max_frame = 4096).await;
    let mut a = s.client("alice").await;
    a.send_raw(Message::Binary(vec![1, 2, 3].into()))
        .expect("sent");
    let (code, _) = a.wait_closed(WAIT).await.expect("closed");
    assert_eq!(code, 1003);
    let mut b = s.client("bob").await;
    let big = format!(
        r#"{{"id":1,"op":"ping","args":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    );
    b.send_raw(Message::Text(big.into())).expect("sent");
    let (code, _) = b.wait_closed(WAIT).await.expect("closed");
    assert_eq!(code, 1009);
    // Others are fine.
    let c = s.client("carol").await;
    c.request("ping", json!({})).await.expect("alive");
    s.stop().await;
}

#[tokio::test]
async fn the_excess_over_the_rate_is_rate_limited() {
    let s = TestServer::start_with(|c| {
        c.signaling.rate = 5;
        c.signaling.burst = 10;
    })
    .await;
    let a = s.client("alice").await;
    let replies = join_all((0..30).map(|_| a.request("ping", json!({})))).await;
    let limited = replies
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Some("rate_limited")))
        .count();
    let ok = replies.iter().filter(|r| r.is_ok()).count();
    assert!((10..=12).contains(&ok), "{ok} allowed");
    assert_eq!(ok + limited, 30);
    s.stop().await;
}

#[tokio::test]
async fn a_silent_session_is_closed_after_twice_the_heartbeat() {
    let s = TestServer::start_with(|c| c.signaling.heartbeat = 1).await;
    let mut quiet = s.client("alice").await;
    let talker = s.client("bob").await;
    let started = std::time::Instant::now();
    let keepalive = async {
        for _ in 0..6 {
            talker.request("ping", json!({})).await.expect("alive");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let (closed, _) = tokio::join!(quiet.wait_closed(Duration::from_secs(5)), keepalive);
    let (code, _) = closed.expect("closed");
    assert_eq!(code, 4000);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    talker
        .request("ping", json!({}))
        .await
        .expect("the talker stays");
    s.stop().await;
}

#[tokio::test]
async fn admin_api_lists_shows_and_ends_calls() {
    let s = TestServer::start().await;
    let mut a = s.client("alice").await;
    let b = s.client("bob").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    b.request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    // Without the admin claim: 401.
    let r = reqwest::Client::new()
        .get(s.http("/v1/calls"))
        .bearer_auth(s.token("alice"))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 401);
    let (status, list) = s
        .admin_get("/v1/calls?state=started&user_id=bob&limit=5")
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["calls"][0]["call_id"], call);
    let (status, one) = s.admin_get(&format!("/v1/calls/{call}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["users"].as_array().map(Vec::len), Some(2));
    assert_eq!(one["state"], "started");
    assert!(one.get("room").is_some());
    let (status, _) = s.admin_get("/v1/calls/c_nope").await;
    assert_eq!(status, 404);
    let (status, body) = s.admin_get("/v1/calls?state=weird").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    let r = reqwest::Client::new()
        .post(s.http(&format!("/v1/calls/{call}/end")))
        .bearer_auth(s.admin_token())
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    let end = a
        .wait_for("call_invitation_ended", WAIT)
        .await
        .expect("ended");
    assert_eq!(end.data["reason"], "admin");
    let r = reqwest::Client::new()
        .post(s.http(&format!("/v1/calls/{call}/end")))
        .bearer_auth(s.admin_token())
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 409);
    s.stop().await;
}

#[tokio::test]
async fn health_metrics_and_dev_tokens() {
    let s = TestServer::start().await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(s.http("/healthz"))
            .send()
            .await
            .expect("http")
            .status(),
        200
    );
    assert_eq!(
        http.get(s.http("/readyz"))
            .send()
            .await
            .expect("http")
            .status(),
        200
    );
    let a = s.client("alice").await;
    let call = invite(&a, &["bob"], "general", 30).await;
    a.request("call_cancel", json!({"call_id": call}))
        .await
        .expect("cancel");
    let text = http
        .get(s.http("/metrics"))
        .send()
        .await
        .expect("http")
        .text()
        .await
        .expect("text");
    for name in [
        "switchboard_sessions_connected",
        "switchboard_users_online",
        "switchboard_calls_started_total",
        "switchboard_calls_ended_total{reason=\"cancelled\"}",
        "switchboard_invitee_outcomes_total{state=\"cancelled\"}",
        "switchboard_op_duration_seconds_bucket",
        "process_cpu_seconds_total",
        "# HELP switchboard_calls_started_total Calls created.",
        "# TYPE process_cpu_seconds_total counter",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    // Dev tokens exist only in dev mode.
    let r = http
        .post(s.http("/v1/dev/token"))
        .json(&json!({"user_id": "alice"}))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 404);
    s.stop().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = common::config(dir.path());
    // Dev mode refuses a real secret: it runs with the public dev secret.
    c.auth.secret = switchboard::auth::DEV_SECRET.into();
    let s = TestServer::start_in(dir, c, true).await;
    let r: Value = http
        .post(s.http("/v1/dev/token"))
        .json(&json!({"user_id": "alice", "name": "Alice"}))
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    let token = r["token"].as_str().expect("token");
    let c = SignalClient::connect(&s.ws_url(), token)
        .await
        .expect("connects");
    assert_eq!(c.session["user_id"], "alice");
    let r = http
        .post(s.http("/v1/dev/token"))
        .json(&json!({"user_id": "bad id"}))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 400);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away() {
    let s = TestServer::start().await;
    let mut a = s.client("alice").await;
    let stopping = tokio::spawn(s.stop());
    let (code, _) = a.wait_closed(WAIT).await.expect("closed");
    assert_eq!(code, 1001);
    stopping.await.expect("stopped");
}
