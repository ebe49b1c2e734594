//! The operator kit against the real binary: signed webhooks delivered in order with redelivery after
//! a receiver outage and after kill -9, events a receiver keeps refusing dead-lettered, and a drain
//! that ends calls cleanly and exits 0.

mod common;
mod sfu_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::WAIT;
use common::media::MediaUser;
use common::process::{Proc, free_port, start, start_logging, token};
use serde_json::{Value, json};
use sfu_support::{Pump, pump_until};
use switchboard::client::rtc::TrackSpec;
use switchboard::webhooks::{EVENT_ID_HEADER, SIGNATURE_HEADER, verify};

const KEY: &str = "webhook-signing-key";

/// One received delivery.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    body: Value,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Delivery>>>,
    /// While true, answer 503.
    failing: Arc<Mutex<bool>>,
    bad_signatures: Arc<Mutex<u32>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now = common::now_secs();
    if verify(KEY.as_bytes(), sig, body.as_bytes(), now, 300).is_err() {
        *r.bad_signatures.lock().expect("lock") += 1;
        return StatusCode::UNAUTHORIZED;
    }
    if *r.failing.lock().expect("lock") {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let id = headers
        .get(EVENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert_eq!(
        body["id"],
        id.as_str(),
        "the header and body carry the same event id"
    );
    r.got.lock().expect("lock").push(Delivery { id, body });
    StatusCode::NO_CONTENT
}

/// Starts a receiver on `port` (0 for any); returns its address and a handle to stop it.
async fn receiver(r: Receiver, port: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(r);
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind receiver");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (addr, h)
}

fn webhook_env(addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        (
            "SWITCHBOARD_WEBHOOKS_URLS",
            format!("[\"http://{addr}/hook\"]"),
        ),
        ("SWITCHBOARD_WEBHOOKS_SIGNING_KEY", KEY.into()),
    ]
}

/// Events (name, call_id) received, de-duplicated by event ID, in order of first arrival.
fn events(r: &Receiver) -> Vec<(String, String)> {
    let got = r.got.lock().expect("lock");
    let mut seen = std::collections::HashSet::new();
    got.iter()
        .filter(|d| seen.insert(d.id.clone()))
        .map(|d| {
            (
                d.body["event"].as_str().unwrap_or("").to_owned(),
                d.body["data"]["call_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The server's /metrics page.
async fn metrics_text(p: &Proc) -> String {
    reqwest::get(p.url("/metrics"))
        .await
        .expect("http")
        .text()
        .await
        .expect("text")
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn make_calls(p: &Proc, n: usize) -> Vec<String> {
    let a = p.client("alice").await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = a
            .request("call_invite", json!({"invitees": ["bob"], "timeout": 30}))
            .await
            .expect("invite");
        let id = r["call_id"].as_str().expect("id").to_owned();
        a.request("call_cancel", json!({"call_id": id}))
            .await
            .expect("cancel");
        ids.push(id);
    }
    ids
}

/// For each call: call_started, invitation_unanswered (bob is offline), call_ended, in that order.
fn assert_lifecycles(got: &[(String, String)], calls: &[String]) {
    for c in calls {
        let names: Vec<&str> = got
            .iter()
            .filter(|(_, id)| id == c)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(
            names,
            vec!["call_started", "invitation_unanswered", "call_ended"],
            "events of {c}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_ordered_per_call_and_redelivered_after_an_outage() {
    let r = Receiver::default();
    let (addr, _h) = receiver(r.clone(), 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = start(&dir.path().join("db"), free_port(), &webhook_env(addr)).await;

    let first = make_calls(&p, 3).await;
    assert!(
        wait_until(WAIT, || events(&r).len() >= 9).await,
        "{:?}",
        events(&r)
    );
    assert_lifecycles(&events(&r), &first);
    let ended = r
        .got
        .lock()
        .expect("lock")
        .iter()
        .find(|d| d.body["event"] == "call_ended")
        .map(|d| d.body.clone())
        .expect("call_ended");
    assert_eq!(ended["data"]["reason"], "cancelled");
    assert!(ended["created_at"].as_u64().is_some());

    // The receiver fails for a while: nothing is lost, and order per call holds once it recovers.
    *r.failing.lock().expect("lock") = true;
    let second = make_calls(&p, 3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(events(&r).len(), 9, "nothing accepted while failing");
    *r.failing.lock().expect("lock") = false;
    assert!(
        wait_until(Duration::from_secs(20), || events(&r).len() >= 18).await,
        "redelivered: {:?}",
        events(&r)
    );
    assert_lifecycles(&events(&r), &second);
    assert_eq!(*r.bad_signatures.lock().expect("lock"), 0);
    // Retries were counted, and the backlog gauge comes back to zero.
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics_text(&p).await;
        if text.contains("switchboard_webhook_backlog 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains("switchboard_webhook_deliveries_total{result=\"retry\"}"));
    assert!(text.contains("switchboard_webhook_backlog 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_queued_while_the_receiver_is_down_survive_kill_9() {
    let r = Receiver::default();
    // Reserve a port for the receiver but don't listen yet: deliveries fail.
    let hook_port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], hook_port).into();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let port = free_port();
    let mut p = start(&db, port, &webhook_env(addr)).await;
    let calls = make_calls(&p, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.child.kill().expect("SIGKILL");
    p.child.wait().expect("exits");
    drop(p);
    // The receiver comes up and the server restarts: every event arrives, in order per call.
    let (_addr, _h) = receiver(r.clone(), hook_port).await;
    let _p = start(&db, port, &webhook_env(addr)).await;
    assert!(
        wait_until(Duration::from_secs(20), || events(&r).len() >= 12).await,
        "{:?}",
        events(&r)
    );
    assert_lifecycles(&events(&r), &calls);
}

/// A receiver that answers every event with `status` (a redirect to `/ok` when it is 302) while
/// `refusing` is set, and otherwise records it; `/ok` counts the requests that followed a redirect.
#[derive(Clone, Default)]
struct Refuser {
    inner: Receiver,
    refusing: Arc<Mutex<Option<StatusCode>>>,
    followed: Arc<Mutex<u32>>,
}

async fn refuse(
    State(r): State<Refuser>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let refusing = *r.refusing.lock().expect("lock");
    match refusing {
        Some(StatusCode::FOUND) => {
            (StatusCode::FOUND, [("location", "/ok")], "moved").into_response()
        }
        Some(status) => status.into_response(),
        None => receive(State(r.inner), headers, body).await.into_response(),
    }
}

async fn followed(State(r): State<Refuser>) -> StatusCode {
    *r.followed.lock().expect("lock") += 1;
    StatusCode::NO_CONTENT
}

async fn dead_letters(p: &Proc) -> Value {
    reqwest::Client::new()
        .get(p.url("/v1/admin/webhooks/dead?limit=100"))
        .bearer_auth(token("ops", true))
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_receiver_keeps_refusing_is_dead_lettered_and_the_later_ones_go_ahead() {
    for status in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::FOUND] {
        let r = Refuser::default();
        *r.refusing.lock().expect("lock") = Some(status);
        let app = axum::Router::new()
            .route("/hook", post(refuse))
            .route("/ok", post(followed).get(followed))
            .with_state(r.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = l.local_addr().expect("addr");
        let _h = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = webhook_env(addr);
        env.push(("SWITCHBOARD_WEBHOOKS_MAX_ATTEMPTS", "2".into()));
        let p = start(&dir.path().join("db"), free_port(), &env).await;

        // Three events of a call, each refused twice: all three are given up on, in order.
        let refused = make_calls(&p, 1).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut dead = dead_letters(&p).await;
        while dead["total"] != 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            dead = dead_letters(&p).await;
        }
        assert_eq!(dead["total"], 3, "{status}: {dead}");
        let letters = dead["dead_letters"].as_array().expect("list");
        let mut names: Vec<&str> = letters
            .iter()
            .map(|d| d["body"]["event"].as_str().unwrap_or(""))
            .collect();
        names.reverse();
        assert_eq!(
            names,
            vec!["call_started", "invitation_unanswered", "call_ended"],
            "{status}: oldest first once reversed"
        );
        for d in letters {
            assert_eq!(d["reason"], "max_attempts", "{d}");
            assert_eq!(d["attempts"], 2, "{d}");
            assert_eq!(d["refusals"], 2, "{d}");
            assert_eq!(d["url"], format!("http://{addr}/hook"));
            assert_eq!(d["body"]["data"]["call_id"], refused[0].as_str());
        }
        assert_eq!(
            *r.followed.lock().expect("lock"),
            0,
            "redirects are not followed"
        );

        // The receiver takes events again: the next call's arrive, the dead ones never do.
        *r.refusing.lock().expect("lock") = None;
        let later = make_calls(&p, 1).await;
        assert!(
            wait_until(WAIT, || events(&r.inner).len() >= 3).await,
            "{status}: {:?}",
            events(&r.inner)
        );
        assert_lifecycles(&events(&r.inner), &later);
        assert!(
            events(&r.inner).iter().all(|(_, c)| c != &refused[0]),
            "{status}: a dead letter is not delivered"
        );
        let text = metrics_text(&p).await;
        assert!(
            text.contains("switchboard_webhook_dead_letters_total{reason=\"max_attempts\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("switchboard_webhook_dead_letters 3"),
            "{text}"
        );

        // A bad limit is a clear 400; without an admin token, 401.
        let http = reqwest::Client::new();
        let bad = http
            .get(p.url("/v1/admin/webhooks/dead?limit=0"))
            .bearer_auth(token("ops", true))
            .send()
            .await
            .expect("http");
        assert_eq!(bad.status(), 400);
        let user = http
            .get(p.url("/v1/admin/webhooks/dead"))
            .bearer_auth(token("alice", false))
            .send()
            .await
            .expect("http");
        assert_eq!(user.status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_a_receiver_taken_out_of_the_config_are_dropped_at_start() {
    // Queue events for a receiver that never answers, then restart without it.
    let hook_port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], hook_port).into();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let port = free_port();
    let mut p = start(&db, port, &webhook_env(addr)).await;
    make_calls(&p, 2).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics_text(&p).await;
        if text.contains("switchboard_webhook_backlog 6") {
            break;
        }
        assert!(Instant::now() < deadline, "six events queued: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.child.kill().expect("SIGKILL");
    p.child.wait().expect("exits");
    drop(p);
    let other = Receiver::default();
    let (other_addr, _h) = receiver(other.clone(), 0).await;
    let p = start(&db, port, &webhook_env(other_addr)).await;
    let text = metrics_text(&p).await;
    assert!(
        text.contains("switchboard_webhook_dropped_total 6"),
        "{text}"
    );
    // The new receiver gets only what happens from now on.
    let calls = make_calls(&p, 1).await;
    assert!(wait_until(WAIT, || events(&other).len() >= 3).await);
    assert_eq!(events(&other).len(), 3);
    assert_lifecycles(&events(&other), &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_calls_cleanly_loses_no_billing_or_webhook_and_exits_0() {
    let r = Receiver::default();
    let (addr, _h) = receiver(r.clone(), 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let mut env = webhook_env(addr);
    env.push(("SWITCHBOARD_SERVER_DRAIN_TIMEOUT", "2".into()));
    env.push(("SWITCHBOARD_BILLING_CHECKPOINT", "60".into()));
    let mut p = start(&db, free_port(), &env).await;

    // A call with media in progress.
    let a = p.client("alice").await;
    let mut b = p.client("bob").await;
    let r0 = a
        .request("call_invite", json!({"invitees": ["bob"], "timeout": 30}))
        .await
        .expect("invite");
    let call_id = r0["call_id"].as_str().expect("id").to_owned();
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    b.request("call_accept", json!({"call_id": call_id}))
        .await
        .expect("accept");
    let (mut alice, _) = MediaUser::join(a, "alice", &call_id).await.expect("join");
    let (mut bob, _) = MediaUser::join(b, "bob", &call_id).await.expect("join");
    alice.publish(&[TrackSpec::video()]).await;
    let pa = alice.publisher.take().expect("published");
    let media_started = Instant::now();
    let mut got = 0;
    pump_until(
        &pa,
        Pump {
            video: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(10),
        || {
            got += bob.drain_packets().len();
            got >= 30
        },
    )
    .await;
    assert!(got >= 30, "media flows before the drain");
    // Two more calls accepted before the drain: one whose room erin opened here (frank has not
    // joined yet), one whose room nobody opened.
    let mut accepted = Vec::new();
    for (caller, callee) in [("erin", "frank"), ("gina", "hank")] {
        let x = p.client(caller).await;
        let mut y = p.client(callee).await;
        let r = x
            .request("call_invite", json!({"invitees": [callee], "timeout": 30}))
            .await
            .expect("invite");
        let id = r["call_id"].as_str().expect("id").to_owned();
        y.wait_for("call_invitation_received", WAIT)
            .await
            .expect("rings");
        y.request("call_accept", json!({"call_id": id}))
            .await
            .expect("accept");
        accepted.push((x, y, id));
    }
    let (erin, frank, opened) = &accepted[0];
    let (gina, _hank, unopened) = &accepted[1];
    erin.request("rtc_join", json!({"call_id": opened}))
        .await
        .expect("erin opens the room");

    // Drain over the admin API: not ready, no new calls or joins, the call goes on until the timeout.
    let http = reqwest::Client::new();
    let d = http
        .post(p.url("/v1/admin/drain"))
        .bearer_auth(token("ops", true))
        .send()
        .await
        .expect("http");
    assert_eq!(d.status(), 202);
    let drain_started = Instant::now();
    assert_eq!(
        http.get(p.url("/readyz"))
            .send()
            .await
            .expect("http")
            .status(),
        503
    );
    let c = p.client("carol").await;
    let e = c
        .request("call_invite", json!({"invitees": ["dave"]}))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some("invalid_state"));
    // A room in progress takes its participants (frank joins erin); a room the drain would have
    // to open is refused.
    frank
        .request("rtc_join", json!({"call_id": opened}))
        .await
        .expect("a participant joins a room in progress during the drain");
    let _ = erin;
    let e = gina
        .request("rtc_join", json!({"call_id": unopened}))
        .await
        .expect_err("no new room during a drain");
    assert_eq!(e.code(), Some("invalid_state"));
    let pump = tokio::spawn(async move {
        pump_until(
            &pa,
            Pump {
                video: Some(0),
                ..Pump::default()
            },
            Duration::from_secs(4),
            || false,
        )
        .await;
    });
    let end = alice
        .wait_event("call_invitation_ended", Duration::from_secs(10), |_| true)
        .await
        .expect("the call ends");
    assert_eq!(end.data["reason"], "server_shutdown");
    assert!(
        drain_started.elapsed() >= Duration::from_millis(1800),
        "the call went on for the drain timeout"
    );
    let exit = loop {
        if let Ok(Some(s)) = p.child.try_wait() {
            break s;
        }
        assert!(
            drain_started.elapsed() < Duration::from_secs(30),
            "the server exits after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    let _ = pump.await;
    let media_ms = media_started.elapsed().as_millis() as u64;

    // Billing: bob's receiving time was flushed to the ledger (the checkpoint is 60 s, so only the
    // drain can have written it).
    let mut store = switchboard::storage::Store::open(&db).expect("db opens");
    let rows = store
        .usage(0, u64::MAX / 2, Some(&call_id.parse().expect("id")), None)
        .expect("ledger");
    let bob_ms: u64 = rows
        .iter()
        .filter(|r| r.user_id.as_str() == "bob")
        .map(|r| r.ms)
        .sum();
    assert!(
        bob_ms > 2000 && bob_ms <= media_ms,
        "bob billed {bob_ms} ms of {media_ms}"
    );
    // Webhooks: the call's whole lifecycle was delivered before exit.
    let got = events(&r);
    let names: Vec<&str> = got
        .iter()
        .filter(|(_, id)| *id == call_id)
        .map(|(n, _)| n.as_str())
        .collect();
    for want in [
        "call_started",
        "participant_joined",
        "track_published",
        "usage_recorded",
        "call_ended",
    ] {
        assert!(names.contains(&want), "{want} delivered: {names:?}");
    }
    let ended = r
        .got
        .lock()
        .expect("lock")
        .iter()
        .find(|d| d.body["event"] == "call_ended")
        .map(|d| d.body["data"]["reason"].clone());
    assert_eq!(ended, Some(json!("server_shutdown")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_lifecycle_event_and_no_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("server.log");
    let env = vec![
        ("SWITCHBOARD_LOG_FORMAT", "json".to_owned()),
        ("SWITCHBOARD_LOG_LEVEL", "info".to_owned()),
        ("RUST_LOG", String::new()),
    ];
    let mut p = start_logging(&dir.path().join("db"), free_port(), &env, Some(&log)).await;
    let calls = make_calls(&p, 1).await;
    let status = p.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success());
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let about = |msg: &str| {
        lines
            .iter()
            .filter(|l| {
                l["fields"]["message"] == msg && l["fields"]["call_id"] == calls[0].as_str()
            })
            .count()
    };
    assert_eq!(about("call started"), 1, "{text}");
    assert_eq!(about("invitee offline"), 1, "{text}");
    assert_eq!(about("call ended"), 1, "{text}");
    let ended = lines
        .iter()
        .find(|l| l["fields"]["message"] == "call ended")
        .expect("ended line");
    assert!(
        ended["fields"]["users"]
            .as_str()
            .is_some_and(|u| u.contains("alice") && u.contains("bob"))
    );
    // The token the client used appears nowhere (nor any JWT).
    assert!(!text.contains(&token("alice", false)[..20]));
    assert!(!text.contains("eyJ"), "no JWT in the log");
}
