//! TURN with the Rust client: the server hands out TURN REST credentials in `rtc_join`
//! (`ice_servers`), and a webrtc-crate publisher that may use relay candidates only reaches the
//! server through a real coturn (Debian's `turnserver`, `use-auth-secret`) with them.

mod common;
mod sfu_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use common::media::MediaUser;
use serde_json::json;
use sfu_support::{Pump, is_video, pump_until};
use switchboard::client::rtc::{IceConfig, TrackSpec};

const SECRET: &str = "turn-secret-of-the-rust-test";

/// coturn on 127.0.0.1 at a free port, checking credentials against `secret`.
struct Coturn {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Coturn {
    fn start(secret: &str) -> Coturn {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        let log = dir.path().join("turnserver.log");
        let out = std::fs::File::create(&log).expect("log file");
        // -n: no /etc/turnserver.conf; everything is on the command line.
        let child = Command::new("turnserver")
            .arg("-n")
            .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
            .args(["--listening-port", &port.to_string()])
            .args(["--min-port", "41000", "--max-port", "41999"])
            .args(["--use-auth-secret", "--static-auth-secret", secret])
            .args(["--realm", "switchboard.test", "--fingerprint"])
            .args(["--no-tls", "--no-dtls", "--no-tcp", "--no-cli"])
            .args(["--allow-loopback-peers", "--simple-log", "--verbose"])
            .arg("--pidfile")
            .arg(dir.path().join("turnserver.pid"))
            .args(["--log-file", "stdout"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver runs (apt-get install coturn; scripts/test installs it)");
        let c = Coturn {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.log().contains("listener opened on") {
            assert!(
                Instant::now() < deadline,
                "coturn did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn url(&self) -> String {
        format!("turn:127.0.0.1:{}?transport=udp", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a call where alice publishes relay-only through coturn (whose secret is `coturn_secret`)
/// and returns how many of alice's audio and video packets bob received.
async fn relayed_call(coturn_secret: &str) -> (usize, usize, String) {
    let turn = Coturn::start(coturn_secret);
    let url = turn.url();
    let s = TestServer::start_with(|c| {
        c.turn.urls = vec![url.clone()];
        c.turn.secret = SECRET.to_owned();
    })
    .await;
    let (a, b, call_id) = s.call("alice", "bob", "general").await;
    let (mut alice, joined) = MediaUser::join(a, "alice", &call_id)
        .await
        .expect("alice joins");
    let (mut bob, _) = MediaUser::join(b, "bob", &call_id)
        .await
        .expect("bob joins");
    let servers = &joined["ice_servers"];
    assert_eq!(servers[0]["urls"], json!([url]), "{joined}");
    assert!(
        servers[0]["username"]
            .as_str()
            .is_some_and(|u| u.ends_with(":alice")),
        "{joined}"
    );
    let mut ice = IceConfig::from_join(&joined);
    assert_eq!(ice.servers.len(), 1);
    ice.relay_only = true;
    alice
        .publish_with(&[TrackSpec::audio(), TrackSpec::video()], &ice)
        .await;
    let pa = alice.publisher.take().expect("published");
    let mut got = Vec::new();
    pump_until(
        &pa,
        Pump {
            video: Some(1),
            audio: Some(0),
            layers: &[(None, 320, 240)],
            ..Pump::default()
        },
        Duration::from_secs(8),
        || {
            got.extend(bob.drain_packets());
            got.iter().filter(|p| is_video(p)).count() >= 20
        },
    )
    .await;
    let video = got.iter().filter(|p| is_video(p)).count();
    let audio = got.iter().filter(|p| p.payload.starts_with(b"a:")).count();
    (audio, video, turn.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_publisher_reaches_the_server_through_coturn_with_the_handed_out_credential() {
    let (audio, video, log) = relayed_call(SECRET).await;
    assert!(video >= 20 && audio >= 5, "audio {audio}, video {video}");
    // The allocation was made with alice's TURN REST username.
    assert!(log.contains(":alice>"), "{log}");
}
