//! Throwaway Redis servers for the cluster tests (scripts/redis-test-server: a Unix socket in a
//! directory of their own, nothing on disk). Each test starts its own, so tests running at once
//! share no keys or channels, and a test may restart its server.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running Redis server; stopped when dropped.
pub struct Redis {
    dir: PathBuf,
    pub url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-test-server")
}

/// Whether redis-server is installed; under CI it must be.
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "redis-server is not installed: CI runs the cluster tests (scripts/test installs it)"
    );
    found
}

impl Redis {
    /// Starts a server in `dir`.
    pub fn start(dir: &Path) -> Self {
        let out = Command::new(script())
            .arg("start")
            .arg(dir)
            .output()
            .expect("redis-test-server runs");
        assert!(
            out.status.success(),
            "redis-test-server start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Self {
            dir: dir.to_owned(),
            url,
        }
    }

    /// Stops the server (its data goes with it) and starts a new one at the same address.
    pub fn restart(&mut self) {
        self.stop();
        let again = Self::start(&self.dir);
        self.url = again.url.clone();
        std::mem::forget(again);
    }

    /// Like [`restart`](Self::restart), on a thread of its own (the URL stays the same).
    pub fn restart_in_background(&self) -> std::thread::JoinHandle<()> {
        let dir = self.dir.clone();
        std::thread::spawn(move || {
            let _ = Command::new(script()).arg("stop").arg(&dir).status();
            let ok = Command::new(script())
                .arg("start")
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "redis-test-server start again");
        })
    }

    /// Stops the server.
    pub fn stop(&self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
