//! What one TCP connection may hold of the server ([http]), and the rules of secrets, tokens and dev
//! mode, against a real server: half-sent request heads (slowloris) and unfinished WebSocket upgrades
//! are closed after `header_read_timeout`, a stalled request body after `idle_timeout`, connections
//! over `max_connections` are answered 503 and closed; `serve --dev` refuses a real secret and a
//! non-loopback address, `serve` refuses a short secret; tokens longer-lived than
//! `[auth] max_token_ttl` and `?token=` outside /v1/signal are refused.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{SECRET, TestServer, now_secs};
use switchboard::auth::TokenAuthority;
use switchboard::ids::UserId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or `limit` passes); returns what it sent and
/// whether it closed.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

async fn metric(s: &TestServer, line_prefix: &str) -> f64 {
    let body = reqwest::get(s.http("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    body.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn half_sent_request_heads_and_upgrades_are_closed_after_the_header_timeout() {
    let s = TestServer::start_with(|c| c.http.header_read_timeout = 1).await;
    let before = metric(&s, "switchboard_http_timeouts_total{kind=\"header\"}").await;
    // 100 slowloris connections: half a request head each, one more header line now and then.
    let mut slow = Vec::new();
    for i in 0..100 {
        let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
        let head = if i % 2 == 0 {
            "GET /healthz HTTP/1.1\r\nHost: x\r\n".to_owned()
        } else {
            // An upgrade to a session that never finishes its request head.
            format!(
                "GET /v1/signal HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Authorization: Bearer {}\r\n",
                s.token("mallory")
            )
        };
        tcp.write_all(head.as_bytes()).await.expect("write");
        slow.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for tcp in &mut slow {
        // Trickling bytes does not buy time: the clock is for the whole head.
        let _ = tcp.write_all(b"X-Slow: 1\r\n").await;
    }
    let started = Instant::now();
    let mut closed = 0;
    for tcp in &mut slow {
        let (_, was_closed) = read_until_closed(tcp, Duration::from_secs(5)).await;
        closed += usize::from(was_closed);
    }
    assert_eq!(closed, 100, "every half-sent head is closed");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after about the 1 s header timeout, not later ({:?})",
        started.elapsed()
    );
    let after = metric(&s, "switchboard_http_timeouts_total{kind=\"header\"}").await;
    assert!(after - before >= 100.0, "counted: {before} -> {after}");
    // A client that sends its head in time is served as always.
    let r = reqwest::get(s.http("/healthz")).await.expect("healthz");
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_that_sends_no_next_request_is_closed() {
    let s = TestServer::start_with(|c| c.http.header_read_timeout = 1).await;
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.expect("response");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Kept alive, then silent: closed after the header timeout.
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(4)).await;
    assert!(closed, "an idle kept-alive connection is closed");
    s.stop().await;
}

#[tokio::test]
async fn a_stalled_request_body_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = common::config(dir.path());
    c.auth.secret = String::new();
    c.http.idle_timeout = 1;
    let s = TestServer::start_in(dir, c, true).await;
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    // POST /v1/dev/token reads its JSON body: promise 1000 bytes, send 10, stop.
    tcp.write_all(
        b"POST /v1/dev/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"user_id\"",
    )
    .await
    .expect("write");
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "a stalled upload is closed");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "after about the 1 s idle timeout ({:?})",
        started.elapsed()
    );
    s.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_answered_503_and_closed() {
    let s = TestServer::start_with(|c| c.http.max_connections = 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(s.addr).await.expect("connect"));
    }
    // Let the server accept them all before the sixth.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sixth = TcpStream::connect(s.addr).await.expect("connect");
    let (got, closed) = read_until_closed(&mut sixth, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(closed, "refused connections are closed at once");
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"unavailable\""), "{text}");
    // A held connection is still served (the cap refuses new ones only) ...
    held[0]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (got, _) = read_until_closed(&mut held[0], Duration::from_secs(3)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // ... and once connections close, new ones are taken again.
    held.clear();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match reqwest::get(s.http("/healthz")).await {
            Ok(r) if r.status() == 200 => break,
            r => assert!(Instant::now() < deadline, "not served again: {r:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

/// Runs `switchboard <args>` with only `env` set among SWITCHBOARD_* variables; returns its exit
/// status success and stderr.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args)
        .current_dir(dir.path())
        .env("SWITCHBOARD_STORAGE_PATH", dir.path().join("db"))
        .env("SWITCHBOARD_MEDIA_UDP_PORT", "0")
        .env("SWITCHBOARD_MEDIA_TCP_PORT", "0");
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SWITCHBOARD_STORAGE_PATH", dir.path().join("db"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dev_mode_refuses_a_real_secret_and_a_non_loopback_address() {
    let (ok, err) = run_binary(
        &["serve", "--dev"],
        &[
            ("SWITCHBOARD_AUTH_SECRET", SECRET),
            ("SWITCHBOARD_SERVER_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert!(!ok, "serve --dev with a real secret must not start");
    assert!(
        err.contains("auth.secret") && err.contains("/v1/dev/token"),
        "{err}"
    );
    // `token --dev` with a real secret would sign with the dev secret: refused the same way.
    let (ok, err) = run_binary(
        &["token", "--dev", "--user", "alice"],
        &[("SWITCHBOARD_AUTH_SECRET", SECRET)],
    );
    assert!(!ok, "{err}");
    let (ok, err) = run_binary(
        &["serve", "--dev"],
        &[("SWITCHBOARD_SERVER_LISTEN", "0.0.0.0:0")],
    );
    assert!(
        !ok,
        "serve --dev on 0.0.0.0 must not start without --dev-allow-remote"
    );
    assert!(
        err.contains("server.listen") && err.contains("--dev-allow-remote"),
        "{err}"
    );
    let (ok, err) = run_binary(&["serve", "--dev-allow-remote"], &[]);
    assert!(!ok, "--dev-allow-remote needs --dev: {err}");
}

#[test]
fn serve_refuses_a_secret_shorter_than_32_bytes() {
    let (ok, err) = run_binary(
        &["serve"],
        &[
            ("SWITCHBOARD_AUTH_SECRET", "integration-test-secret"),
            ("SWITCHBOARD_SERVER_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert!(!ok, "a 23-byte secret must be refused");
    assert!(err.contains("at least 32 bytes, got 23"), "{err}");
    let (ok, err) = run_binary(
        &["token", "--user", "alice", "--ttl", "2d"],
        &[("SWITCHBOARD_AUTH_SECRET", SECRET)],
    );
    assert!(!ok, "token --ttl over auth.max_token_ttl is refused");
    assert!(err.contains("max_token_ttl"), "{err}");
}

#[tokio::test]
async fn long_lived_tokens_and_tokens_in_admin_urls_are_refused() {
    let s = TestServer::start_with(|c| c.auth.max_token_ttl = 3600).await;
    let tokens = TokenAuthority::new(SECRET);
    let now = now_secs();
    let alice = UserId::parse("alice").expect("valid");
    let ops = UserId::parse("ops").expect("valid");
    let http = reqwest::Client::new();

    // A session token valid for two hours: refused at the upgrade.
    let long = tokens.issue(&alice, None, false, now, 7200);
    let r = http
        .get(s.http("/v1/signal"))
        .query(&[("token", long.as_str())])
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 401);
    let body = r.text().await.expect("body");
    assert!(body.contains("lifetime"), "{body}");
    // Within the cap the same request reaches the upgrade (400: it is not a WebSocket handshake).
    let short = tokens.issue(&alice, None, false, now, 3600);
    let r = http
        .get(s.http("/v1/signal"))
        .query(&[("token", short.as_str())])
        .send()
        .await
        .expect("http");
    assert_ne!(r.status(), 401, "a token within the cap verifies");

    // An admin token in the URL of the admin API: not looked at (401); in the header: served.
    let admin = tokens.issue(&ops, None, true, now, 600);
    let r = http
        .get(s.http("/v1/calls"))
        .query(&[("token", admin.as_str())])
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 401, "?token= is for /v1/signal only");
    let r = http
        .get(s.http("/v1/calls"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 200);
    // A user's token on the admin API: 401, as PROTOCOL.md section 6 says (not 403).
    let r = http
        .get(s.http("/v1/calls"))
        .bearer_auth(&short)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 401);
    s.stop().await;
}
