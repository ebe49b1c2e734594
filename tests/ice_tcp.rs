//! ICE-TCP (`[media] ice_tcp`, src/sfu/tcp.rs) against hostile and broken TCP clients: every
//! resource a client can make the listener hold is bounded, and bad framing closes the connection.
//! (A real browser getting media over ICE-TCP is the `udp-blocked` scenario of tests/browser.)

mod common;

use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A binding request for `username`, RFC 4571-framed.
fn framed_binding_request(username: &str) -> Vec<u8> {
    let d = common::binding_request(username);
    let mut f = (d.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(&d);
    f
}

/// Reads until the server closes the connection; returns what it sent. Fails after `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection");
    got
}

/// Waits until the gauge `name` reads `want` (the listener counts asynchronously).
async fn gauge_reaches(s: &TestServer, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = s.metric(name).await.unwrap_or(0.0);
        if v == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} = {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// The metrics registry is global to the process: the two halves run one after the other in one
// test, so that neither sees the other's connections in `switchboard_tcp_connections`.
#[tokio::test]
async fn the_ice_tcp_listener_refuses_bad_clients_and_bounds_connections() {
    bad_framing_and_a_first_frame_that_is_not_a_binding_request_close_the_connection().await;
    connections_past_max_tcp_connections_are_closed_at_accept().await;
}

async fn bad_framing_and_a_first_frame_that_is_not_a_binding_request_close_the_connection() {
    let s = TestServer::start().await;
    let addr = s.media_tcp.expect("ICE-TCP is on by default");

    // DTLS (or anything) before a binding request.
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(&[0, 4, 22, 254, 253, 0]).await.expect("write");
    let got = closed_by_server(&mut c, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "nothing is answered: {got:?}");

    // A zero-length frame, and one over the 2048-byte limit.
    for header in [[0u8, 0], 4000u16.to_be_bytes()] {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(&header).await.expect("write");
        c.write_all(&[1u8; 64]).await.expect("write");
        closed_by_server(&mut c, Duration::from_secs(5)).await;
    }

    // A binding request for a ufrag no connection has: routed by its worker prefix, refused by
    // the worker (no such connection), so nothing comes back and the listener keeps the socket
    // only until the idle timeout; the server stays healthy.
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(&framed_binding_request("0000nosuchufrag:client"))
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
    assert!(r.is_err(), "no answer to an unknown ufrag: {r:?}");
    let (code, _) = s.admin_get("/v1/rooms").await;
    assert_eq!(code, 200);
    drop(c);
    gauge_reaches(&s, "switchboard_tcp_connections", 0.0).await;
}

async fn connections_past_max_tcp_connections_are_closed_at_accept() {
    let s = TestServer::start_with(|c| c.media.max_tcp_connections = 2).await;
    let addr = s.media_tcp.expect("ICE-TCP");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        // A valid-looking start keeps each open (until the idle timeout).
        c.write_all(&framed_binding_request("0000abcdefgh:x"))
            .await
            .expect("write");
        held.push(c);
    }
    gauge_reaches(&s, "switchboard_tcp_connections", 2.0).await;
    let mut third = TcpStream::connect(addr).await.expect("the kernel accepts");
    closed_by_server(&mut third, Duration::from_secs(5)).await;
    assert!(s.metric("switchboard_tcp_refused_total").await >= Some(1.0));
    // Closing one frees its slot.
    drop(held.pop());
    gauge_reaches(&s, "switchboard_tcp_connections", 1.0).await;
    let mut again = TcpStream::connect(addr).await.expect("connect");
    again
        .write_all(&framed_binding_request("0000abcdefgh:y"))
        .await
        .expect("write");
    let r = tokio::time::timeout(Duration::from_millis(500), again.read(&mut [0u8; 8])).await;
    assert!(
        r.is_err(),
        "a freed slot takes a new connection (it stays open): {r:?}"
    );
}

#[tokio::test]
async fn ice_tcp_off_binds_no_tcp_port() {
    let s = TestServer::start_with(|c| c.media.ice_tcp = false).await;
    assert!(s.media_tcp.is_none());
}
