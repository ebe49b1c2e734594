//! The real `switchboard` binary as a child process, for tests that kill it or check its exit code.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::auth::TokenAuthority;
use switchboard::client::signal::SignalClient;

use super::SECRET;

/// A running server process.
pub struct Proc {
    pub child: Child,
    pub port: u16,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `switchboard serve` on `port` with the database at `db`, extra environment `env`, and
/// waits until it is ready.
pub async fn start(db: &Path, port: u16, env: &[(&str, String)]) -> Proc {
    start_logging(db, port, env, None).await
}

/// Like [`start`], with the server's stderr (its log) written to `log`.
pub async fn start_logging(
    db: &Path,
    port: u16,
    env: &[(&str, String)],
    log: Option<&Path>,
) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.arg("serve")
        .env("SWITCHBOARD_AUTH_SECRET", SECRET)
        .env("SWITCHBOARD_STORAGE_PATH", db)
        .env("SWITCHBOARD_SERVER_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_MEDIA_UDP_PORT", "0")
        .env("SWITCHBOARD_MEDIA_TCP_PORT", "0")
        .env("RUST_LOG", "warn")
        .env_remove("SWITCHBOARD_TEST_STORAGE")
        .env_remove("SWITCHBOARD_TEST_POSTGRES")
        .stdout(Stdio::null())
        .stderr(match log.and_then(|p| std::fs::File::create(p).ok()) {
            Some(f) => Stdio::from(f),
            None => Stdio::inherit(),
        });
    if let Some(url) = super::pg::url_for(db) {
        cmd.env("SWITCHBOARD_STORAGE_URL", url)
            .env("SWITCHBOARD_SERVER_NODE_ID", super::pg::NODE);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("binary starts");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Proc { child, port }
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn client(&self, user: &str) -> SignalClient {
        SignalClient::connect(
            &format!("ws://127.0.0.1:{}/v1/signal", self.port),
            &token(user, false),
        )
        .await
        .expect("connects")
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token signed with the tests' secret.
pub fn token(user: &str, admin: bool) -> String {
    TokenAuthority::new(SECRET).issue(
        &user.parse().expect("id"),
        None,
        admin,
        super::now_secs(),
        3600,
    )
}
