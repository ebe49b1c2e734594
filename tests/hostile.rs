//! Hostile clients against a real server: session floods (caps per user, per address and in total,
//! upgrades per address), malformed-frame floods, and a client that stops reading. Each one must
//! cost the server a bounded amount and leave it serving everyone else.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a raw WebSocket for `user`, or gives the HTTP status that refused the upgrade.
async fn raw(s: &TestServer, user: &str) -> Result<Ws, u16> {
    raw_at(&s.ws_url(), &s.token(user)).await
}

async fn raw_at(url: &str, token: &str) -> Result<Ws, u16> {
    raw_via(url, token, None).await
}

/// `raw_at` with an `X-Forwarded-For` header, as a reverse proxy sends it.
async fn raw_via(url: &str, token: &str, forwarded_for: Option<&str>) -> Result<Ws, u16> {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    if let Some(xff) = forwarded_for {
        req.headers_mut().insert(
            "x-forwarded-for",
            HeaderValue::from_str(xff).expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

/// Reads text frames until the server closes; returns the texts and the close code.
async fn until_close(ws: &mut Ws) -> (Vec<Value>, Option<u16>) {
    let mut texts = Vec::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                texts.push(serde_json::from_str(&t).expect("json"));
            }
            Ok(Some(Ok(Message::Close(f)))) => return (texts, f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => return (texts, None),
        }
    }
    (texts, None)
}

async fn metric(s: &TestServer, line_prefix: &str) -> f64 {
    metric_at(&s.http("/metrics"), line_prefix).await
}

/// The sum of the samples whose line starts with `line_prefix`. (Servers started in this process
/// share one metrics registry: only counters that grow are compared here; gauges are read from a
/// server process of its own.)
async fn metric_at(url: &str, line_prefix: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("http")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn sessions_over_a_cap_are_refused_429_before_the_upgrade() {
    let s = TestServer::start_with(|c| {
        c.sessions.max_per_user = 2;
        c.sessions.max_per_ip = 4;
        c.sessions.max_total = 1000;
    })
    .await;
    let a1 = raw(&s, "alice").await.expect("first device");
    let _a2 = raw(&s, "alice").await.expect("second device");
    assert_eq!(raw(&s, "alice").await.err(), Some(429), "a third device");
    let _b = raw(&s, "bob").await.expect("another user");
    let _c = raw(&s, "carol").await.expect("fourth from this address");
    assert_eq!(
        raw(&s, "dave").await.err(),
        Some(429),
        "a fifth from one address"
    );
    // A session that ends gives its place back.
    drop(a1);
    let deadline = Instant::now() + WAIT;
    loop {
        match raw(&s, "alice").await {
            Ok(_) => break,
            Err(code) => {
                assert_eq!(code, 429);
                assert!(Instant::now() < deadline, "the place was never given back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(metric(&s, "switchboard_sessions_refused_total").await >= 2.0);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_caps_count_the_forwarded_client() {
    let cap = |c: &mut switchboard::config::Config| {
        c.sessions.max_per_ip = 1;
        c.sessions.max_total = 1000;
    };
    // 127.0.0.1 (this test) is a trusted proxy: each client it names has a place of its own...
    let s = TestServer::start_with(|c| {
        cap(c);
        c.http.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")];
    })
    .await;
    let url = s.ws_url();
    let _a = raw_via(&url, &s.token("a"), Some("198.51.100.1"))
        .await
        .expect("a client");
    let _b = raw_via(&url, &s.token("b"), Some("198.51.100.2"))
        .await
        .expect("another client behind the same proxy");
    // ...and a second session of one client is over its cap, whatever it put in the header itself.
    assert_eq!(
        raw_via(&url, &s.token("c"), Some("203.0.113.9, 198.51.100.1"))
            .await
            .err(),
        Some(429)
    );
    // Without trusted_proxies the header is ignored: the peer's own address is counted.
    let s = TestServer::start_with(cap).await;
    let url = s.ws_url();
    let _a = raw_via(&url, &s.token("a"), Some("198.51.100.1"))
        .await
        .expect("first");
    assert_eq!(
        raw_via(&url, &s.token("b"), Some("198.51.100.2"))
            .await
            .err(),
        Some(429),
        "an untrusted header picks no address"
    );
}

#[tokio::test]
async fn upgrades_from_one_address_are_rate_limited() {
    let s = TestServer::start_with(|c| {
        c.sessions.upgrade_rate = 1;
        c.sessions.upgrade_burst = 3;
    })
    .await;
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(raw(&s, &format!("u{i}")).await.expect("in the burst"));
    }
    assert_eq!(raw(&s, "u9").await.err(), Some(429));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    kept.push(raw(&s, "u9").await.expect("the bucket refilled"));
}

#[tokio::test]
async fn a_malformed_frame_flood_uses_up_the_rate_and_is_closed_4029() {
    let s = TestServer::start_with(|c| {
        c.signaling.rate = 1;
        c.signaling.burst = 5;
    })
    .await;
    let mut ws = raw(&s, "mallory").await.expect("connects");
    // Malformed frames (no op) use up the bucket as requests do: after five, a well-formed
    // request is refused.
    for i in 0..5 {
        let _ = ws
            .send(Message::Text(format!("{{\"id\":{i}}}").into()))
            .await;
    }
    let _ = ws
        .send(Message::Text(
            json!({"id": 99, "op": "query_call_list", "args": {"count": 1}})
                .to_string()
                .into(),
        ))
        .await;
    let mut codes = Vec::new();
    while codes.len() < 6 {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v.get("id").is_some() {
                    codes.push((v["id"].clone(), v["error"]["code"].clone()));
                }
            }
            other => panic!("no reply: {other:?}"),
        }
    }
    assert_eq!(codes[5], (json!(99), json!("rate_limited")), "{codes:?}");
    assert!(
        codes[..5].iter().all(|(_, c)| c == "bad_request"),
        "{codes:?}"
    );
    // A client that goes on ignoring `rate_limited` is closed.
    for i in 0..60 {
        let _ = ws
            .send(Message::Text(format!("{{\"id\":{i}}}").into()))
            .await;
    }
    let (texts, code) = until_close(&mut ws).await;
    assert_eq!(code, Some(4029), "a session that keeps flooding is closed");
    // burst + 10 s × rate = 15 refusals in the window, the first of them above.
    assert!(
        texts.len() <= 15,
        "at most the flood limit before the close: {texts:?}"
    );
    // Everyone else is still served.
    let alice = s.client("alice").await;
    alice
        .request("query_call_list", json!({"count": 1}))
        .await
        .expect("served");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = common::process::start(
        &dir.path().join("db.sqlite"),
        common::process::free_port(),
        &[
            ("SWITCHBOARD_SIGNALING_RATE", "1000000".into()),
            ("SWITCHBOARD_SIGNALING_BURST", "1000000".into()),
            ("SWITCHBOARD_SESSIONS_OUTBOUND_QUEUE", "16".into()),
            ("SWITCHBOARD_SESSIONS_WRITE_TIMEOUT", "1".into()),
        ],
    )
    .await;
    let metrics = p.url("/metrics");
    let url = format!("ws://127.0.0.1:{}/v1/signal", p.port);
    let ws = raw_at(&url, &common::process::token("sloth", false))
        .await
        .expect("connects");
    let (mut sink, stream) = ws.split();
    assert_eq!(
        metric_at(&metrics, "switchboard_sessions_connected").await,
        1.0
    );
    // Ask for many replies and read none of them.
    let writer = tokio::spawn(async move {
        let frame = format!(
            "{{\"id\":1,\"op\":\"nope\",\"args\":{{\"pad\":\"{}\"}}}}",
            "x".repeat(2000)
        );
        for _ in 0..20_000 {
            if sink
                .send(Message::Text(frame.clone().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_at(&metrics, "switchboard_sessions_connected").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "a session whose client does not read stays open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = metric_at(
        &metrics,
        "switchboard_sessions_closed_total{reason=\"slow_reader\"}",
    )
    .await
        + metric_at(
            &metrics,
            "switchboard_sessions_closed_total{reason=\"write_timeout\"}",
        )
        .await;
    assert!(closed >= 1.0, "counted as a slow reader");
    writer.abort();
    drop(stream);
    let alice = p.client("alice").await;
    alice
        .request("query_call_list", json!({"count": 1}))
        .await
        .expect("served");
}

/// The spam of issue 10: ring a victim for 600 s, re-invite the moment they reject, churn calls.
/// The victim rings once per cooldown at most, and the spammer's calls run out within the minute.
#[tokio::test]
async fn an_invitation_spammer_cannot_keep_a_victim_ringing() {
    let s = TestServer::start().await;
    let spammer = s.client("spammer").await;
    let mut victim = s.client("victim").await;
    let before = metric(&s, "switchboard_invitations_refused_total").await;
    let r = spammer
        .request(
            "call_invite",
            json!({"invitees": ["victim"], "timeout": 600}),
        )
        .await
        .expect("the first call rings");
    let call = r["call_id"].as_str().expect("id").to_owned();
    victim
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    victim
        .request("call_reject", json!({"call_id": call}))
        .await
        .expect("reject");
    // Re-inviting at once is refused, naming the victim; the victim does not ring again.
    let e = spammer
        .request(
            "call_invite",
            json!({"invitees": ["victim"], "timeout": 600}),
        )
        .await
        .expect_err("cooldown");
    assert_eq!(e.code(), Some("rate_limited"), "{e}");
    let switchboard::client::signal::ClientError::Api { details, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(
        details
            .as_ref()
            .map(|d| d["error_users"][0]["reason"].clone()),
        Some(json!("recently_declined"))
    );
    assert!(
        victim
            .wait_for("call_invitation_received", Duration::from_millis(500))
            .await
            .is_err(),
        "the victim does not ring again"
    );
    // Churning calls at others runs out: nine more (ten in the minute), then rate_limited with
    // the time to wait.
    for i in 0..9 {
        let r = spammer
            .request("call_invite", json!({"invitees": [format!("other{i}")]}))
            .await
            .expect("within the minute's calls");
        spammer
            .request("call_cancel", json!({"call_id": r["call_id"]}))
            .await
            .expect("cancel");
    }
    let e = spammer
        .request("call_invite", json!({"invitees": ["other9"]}))
        .await
        .expect_err("calls_per_minute");
    let switchboard::client::signal::ClientError::Api { code, details, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(code, "rate_limited");
    let details = details.clone().expect("details");
    assert_eq!(details["limit"], "calls_per_minute");
    let wait = details["retry_after"].as_u64().expect("retry_after");
    assert!((50..=60).contains(&wait), "retry after {wait} s");
    // Everyone else still calls.
    let other = s.client("someone").await;
    other
        .request("call_invite", json!({"invitees": ["victim"]}))
        .await
        .expect("others may ring the victim");
    let after = metric(&s, "switchboard_invitations_refused_total").await;
    assert!(
        after - before >= 2.0,
        "refusals counted: {before} -> {after}"
    );
}
