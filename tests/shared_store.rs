//! Two server processes on one PostgreSQL database (`[storage] url`), as two nodes of a deployment:
//! every webhook event is delivered once, in order per call, whichever node queued it; the ledger is
//! one ledger, never doubled; and kill -9 of a node loses at most one billing checkpoint of usage.
//! Needs the test PostgreSQL server (`SWITCHBOARD_TEST_POSTGRES`, started by scripts/test); without
//! it the test is skipped, except under CI, where it fails.

mod common;
mod sfu_support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::WAIT;
use common::media::MediaUser;
use common::process::{Proc, free_port, start};
use serde_json::{Value, json};
use sfu_support::{Pump, pump_until};
use switchboard::client::rtc::TrackSpec;
use switchboard::webhooks::EVENT_ID_HEADER;

/// Every delivery as it arrived: (event ID, event name, call ID).
#[derive(Clone, Default)]
struct Hook(Arc<Mutex<Vec<(String, String, String)>>>);

async fn receive(State(h): State<Hook>, headers: HeaderMap, body: String) -> StatusCode {
    let id = headers
        .get(EVENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let name = v["event"].as_str().unwrap_or("").to_owned();
    let call = v["data"]["call_id"].as_str().unwrap_or("").to_owned();
    h.0.lock().expect("lock").push((id, name, call));
    StatusCode::NO_CONTENT
}

async fn hook() -> (Hook, SocketAddr) {
    let h = Hook::default();
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(h.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (h, addr)
}

async fn node(url: &str, name: &str, hook: SocketAddr, dir: &std::path::Path) -> Proc {
    let env = [
        ("SWITCHBOARD_STORAGE_URL", url.to_owned()),
        ("SWITCHBOARD_SERVER_NODE_ID", name.to_owned()),
        (
            "SWITCHBOARD_WEBHOOKS_URLS",
            format!("[\"http://{hook}/hook\"]"),
        ),
        (
            "SWITCHBOARD_WEBHOOKS_SIGNING_KEY",
            "shared-store-test-key".to_owned(),
        ),
        ("SWITCHBOARD_BILLING_CHECKPOINT", "1".to_owned()),
    ];
    start(&dir.join(format!("{name}.db")), free_port(), &env).await
}

/// Runs a `switchboard` command against the store at `url`; returns its stdout (it must succeed).
fn cli(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .env("SWITCHBOARD_STORAGE_URL", url)
        .env("SWITCHBOARD_AUTH_SECRET", common::SECRET)
        .env_remove("SWITCHBOARD_TEST_POSTGRES")
        .env_remove("SWITCHBOARD_TEST_STORAGE")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "switchboard {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Calls that ring an offline user and are cancelled: call_started, invitation_unanswered,
/// call_ended each.
async fn calls(p: &Proc, caller: &str, callee: &str, n: usize) -> Vec<String> {
    let c = p.client(caller).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = c
            .request("call_invite", json!({"invitees": [callee], "timeout": 30}))
            .await
            .expect("invite");
        let id = r["call_id"].as_str().expect("id").to_owned();
        c.request("call_cancel", json!({"call_id": id}))
            .await
            .expect("cancel");
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_history_one_ledger_and_one_outbox() {
    let Some(_) = common::pg::server() else {
        eprintln!("no test PostgreSQL (SWITCHBOARD_TEST_POSTGRES): skipped");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = common::pg::schema_url(&dir.path().join("shared")).expect("schema");
    // An operator migrates the empty database first (serve would too), and can ask again.
    for _ in 0..2 {
        let out = cli(&url, &["migrate"]);
        assert!(
            out.contains("postgres database")
                && out.contains("schema version 3 (this build knows 3)"),
            "{out}"
        );
    }
    let (hook, addr) = hook().await;
    let mut a = node(&url, "node-a", addr, dir.path()).await;
    let b = node(&url, "node-b", addr, dir.path()).await;

    // Calls on both nodes at once.
    let (on_a, on_b) = tokio::join!(calls(&a, "alice", "bob", 8), calls(&b, "carol", "dave", 8));
    let all: Vec<String> = on_a.iter().chain(&on_b).cloned().collect();
    let want = all.len() * 3;
    let deadline = Instant::now() + Duration::from_secs(20);
    while hook.0.lock().expect("lock").len() < want {
        assert!(
            Instant::now() < deadline,
            "only {} of {want} deliveries arrived",
            hook.0.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A moment for any second delivery to show up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got = hook.0.lock().expect("lock").clone();
    let mut seen = HashSet::new();
    let twice: Vec<&String> = got
        .iter()
        .map(|(id, _, _)| id)
        .filter(|id| !seen.insert(*id))
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(got.len(), want);
    for c in &all {
        let names: Vec<&str> = got
            .iter()
            .filter(|(_, _, call)| call == c)
            .map(|(_, n, _)| n.as_str())
            .collect();
        assert_eq!(
            names,
            ["call_started", "invitation_unanswered", "call_ended"],
            "events of {c}, in order"
        );
    }
    // One history: either node answers for the other's calls.
    let http = reqwest::Client::new();
    let admin = common::process::token("ops", true);
    for (p, id) in [(&a, &on_b[0]), (&b, &on_a[0])] {
        let r = http
            .get(p.url(&format!("/v1/calls/{id}")))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("http");
        assert_eq!(r.status(), 200, "{id} read from the other node");
    }

    // A call with media on node A, billed every second; then node A is killed (-9).
    let caller = a.client("erin").await;
    let mut callee = a.client("frank").await;
    let r = caller
        .request("call_invite", json!({"invitees": ["frank"], "timeout": 30}))
        .await
        .expect("invite");
    let call_id = r["call_id"].as_str().expect("id").to_owned();
    callee
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    callee
        .request("call_accept", json!({"call_id": call_id}))
        .await
        .expect("accept");
    let (mut erin, _) = MediaUser::join(caller, "erin", &call_id)
        .await
        .expect("join");
    let (mut frank, _) = MediaUser::join(callee, "frank", &call_id)
        .await
        .expect("join");
    erin.publish(&[TrackSpec::video()]).await;
    let publisher = erin.publisher.take().expect("published");
    let mut first: Option<Instant> = None;
    pump_until(
        &publisher,
        Pump {
            video: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(15),
        || {
            if !frank.drain_packets().is_empty() && first.is_none() {
                first = Some(Instant::now());
            }
            first.is_some_and(|t| t.elapsed() >= Duration::from_millis(4500))
        },
    )
    .await;
    let media_start = first.expect("media reached frank");
    a.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    let media_ms = media_start.elapsed().as_millis() as u64;

    let rows = common::pg::with_postgres(&url, |s| {
        s.usage(0, u64::MAX / 2, Some(&call_id.parse().expect("id")), None)
            .expect("ledger")
    });
    let frank_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.user_id.as_str() == "frank" && r.tier != "audio")
        .collect();
    let billed: u64 = frank_rows.iter().map(|r| r.ms).sum();
    // Never doubled: segments of one subscriber do not overlap.
    let mut spans: Vec<(u64, u64)> = frank_rows.iter().map(|r| (r.start_ms, r.end_ms)).collect();
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "overlapping ledger segments: {spans:?}"
    );
    eprintln!("billed {billed} ms of {media_ms} ms of video before kill -9");
    // At most one checkpoint (1 s) lost to kill -9, with 0.7 s for the first frame to be measured.
    assert!(
        billed + 1_700 >= media_ms && billed <= media_ms + 500,
        "billed {billed} ms of {media_ms} ms of video: {rows:?}"
    );

    // The billing report reads the shared ledger, from any node's configuration.
    let report: Value = serde_json::from_str(&cli(
        &url,
        &["billing", "report", "--from", "0", "--call-id", &call_id],
    ))
    .expect("a JSON report");
    let text = report.to_string();
    assert!(text.contains("frank"), "{report}");

    // Node B still serves, and delivers what node A queued before it died.
    let mut per_call: HashMap<String, Vec<String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        per_call.clear();
        for (_, n, c) in hook.0.lock().expect("lock").iter() {
            per_call.entry(c.clone()).or_default().push(n.clone());
        }
        if per_call.get(&call_id).is_some_and(|n| {
            n.iter()
                .any(|e| e == "participant_joined" || e == "call_started")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node B did not deliver node A's events: {per_call:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = b.client("gina").await;
    c.request("call_invite", json!({"invitees": ["hal"], "timeout": 30}))
        .await
        .expect("node B still takes calls");
}
