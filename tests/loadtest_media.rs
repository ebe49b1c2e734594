//! The media load generator against an in-process server: 1 room × (1 publisher + 2
//! subscribers) for 2 seconds, through the real signaling and media flow.

mod common;

use std::time::Duration;

use common::{SECRET, TestServer};
use switchboard::loadtest::media::{MediaLoad, run};
use switchboard::loadtest::synth::VideoSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_two_subscribers_through_the_real_server() {
    let server = TestServer::start().await;
    let video = VideoSpec::parse("640x360@15:300k").expect("valid spec");
    let report = run(MediaLoad {
        url: format!("http://{}", server.addr),
        metrics_url: format!("http://{}", server.addr),
        secret: SECRET.into(),
        rooms: 1,
        publishers: 1,
        subscribers: 2,
        video: Some(video),
        simulcast: false,
        audio: true,
        duration: Duration::from_secs(2),
        ramp: Duration::ZERO,
        verify_every: 1,
        bind_ip: "127.0.0.1".parse().expect("ip"),
        progress: false,
    })
    .await
    .expect("the run completes");
    println!("{}", report.text());

    assert_eq!(report.users, 3);
    assert_eq!(report.users_connected, 3, "{:?}", report.failures);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.sent_packets > 0);
    assert!(report.received_packets > 0);
    // Two subscribers each receive what the one publisher sends (both tracks).
    assert!(report.server.forwarded_packets >= report.received_packets / 2);
    assert!(
        report.latency_us.count > 0,
        "sampled packets were decrypted and timed"
    );
    assert_eq!(report.verify_failures, 0);
    assert!(report.expected > 0 && report.expected >= report.received_packets / 2);
    assert!(
        report.join_ms.count == 2,
        "both subscribers got media: {:?}",
        report.join_ms
    );
    // The server measured the synthetic bitstream's resolution.
    assert_eq!(
        report.measured_layers.len(),
        1,
        "{:?}",
        report.measured_layers
    );
    let l = &report.measured_layers[0];
    assert_eq!((l.width, l.height), (640, 360));
    assert!(report.server.cpu_us_per_packet.is_some());
    server.stop().await;
}
