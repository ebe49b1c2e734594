//! Shared harness: a real server on 127.0.0.1:0 with its own database, and clients that speak to it.
#![allow(dead_code)]

pub mod media;
pub mod pg;
pub mod process;
pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use switchboard::auth::TokenAuthority;
use switchboard::client::signal::SignalClient;
use switchboard::config::Config;
use switchboard::ids::UserId;
use switchboard::server::{Options, Server};
use tokio::task::JoinHandle;

/// At least 32 bytes, as the server requires outside dev mode.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub addr: SocketAddr,
    /// The ICE-TCP listener (`[media] ice_tcp`).
    pub media_tcp: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
    handle: JoinHandle<()>,
    tokens: TokenAuthority,
}

pub fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.auth.secret = SECRET.into();
    c.storage.path = dir.join("switchboard.db");
    if let Some(url) = pg::url_for(&c.storage.path) {
        c.storage.url = url;
        c.server.node_id = pg::NODE.into();
    }
    c.server.listen = "127.0.0.1:0".parse().expect("addr");
    c.media.udp_port = 0;
    c.media.tcp_port = 0;
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(dir.path());
        edit(&mut c);
        Self::start_in(dir, c, false).await
    }

    pub async fn start_in(dir: tempfile::TempDir, c: Config, dev: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tokens = TokenAuthority::new(&c.auth.secret);
        let server = Server::start(c, Options { dev })
            .await
            .expect("server starts");
        let stop = server.shutdown_sender();
        let media_tcp = server.media_tcp_addr();
        let handle = tokio::spawn(async move {
            server
                .serve(listener, std::future::pending())
                .await
                .expect("serves");
        });
        Self {
            addr,
            media_tcp,
            dir,
            stop,
            handle,
            tokens,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/signal", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn token(&self, user: &str) -> String {
        let now = now_secs();
        self.tokens.issue(
            &UserId::parse(user).expect("valid"),
            Some(user),
            false,
            now,
            3600,
        )
    }

    pub fn admin_token(&self) -> String {
        let now = now_secs();
        self.tokens
            .issue(&UserId::parse("ops").expect("valid"), None, true, now, 3600)
    }

    pub async fn client(&self, user: &str) -> SignalClient {
        SignalClient::connect(&self.ws_url(), &self.token(user))
            .await
            .expect("connects")
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .get(self.http(path))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .expect("http");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The value of one unlabelled series of `/metrics` (the admin token is sent; `/metrics` may
    /// or may not need it).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::Client::new()
            .get(self.http("/metrics"))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub async fn stop(self) -> tempfile::TempDir {
        let _ = self.stop.send(true);
        let _ = self.handle.await;
        self.dir
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TestServer {
    /// `caller` invites `callee` (`mode`, 30 s), `callee` hears it ring and accepts. Returns both
    /// sessions and the call ID.
    pub async fn call(
        &self,
        caller: &str,
        callee: &str,
        mode: &str,
    ) -> (SignalClient, SignalClient, String) {
        let a = self.client(caller).await;
        let mut b = self.client(callee).await;
        let r = a
            .request(
                "call_invite",
                serde_json::json!({"invitees": [callee], "mode": mode, "timeout": 30}),
            )
            .await
            .expect("invite");
        let call_id = r["call_id"].as_str().expect("call_id").to_owned();
        b.wait_for("call_invitation_received", WAIT)
            .await
            .expect("rings");
        b.request("call_accept", serde_json::json!({"call_id": call_id}))
            .await
            .expect("accept");
        (a, b, call_id)
    }
}

/// A STUN binding request with this USERNAME and a random transaction ID (no MESSAGE-INTEGRITY):
/// routed by its server ufrag, refused by any connection.
pub fn binding_request(username: &str) -> Vec<u8> {
    let mut attrs = vec![0x00, 0x06];
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    let mut d = vec![0x00, 0x01];
    d.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    d.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    d.extend_from_slice(&rand::random::<[u8; 12]>());
    d.extend_from_slice(&attrs);
    d
}

/// The Prometheus text a server's `/metrics` URL serves.
pub async fn metrics_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}
