//! A participant driven through the real signaling: a `SignalClient` for ops, a webrtc-0.21
//! subscriber that answers every `rtc_offer`, and a publisher offered with `rtc_publish`.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::client::rtc::{IceConfig, Publisher, Received, Subscriber, TrackSpec};
use switchboard::client::signal::{ServerEvent, SignalClient};
use tokio::sync::mpsc;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A user in a call's room.
pub struct MediaUser {
    pub user: String,
    pub call_id: String,
    pub sig: Arc<SignalClient>,
    /// Events other than `rtc_offer` (which the agent answers), in server order.
    pub events: mpsc::UnboundedReceiver<ServerEvent>,
    pub packets: mpsc::UnboundedReceiver<Received>,
    pub publisher: Option<Publisher>,
}

impl MediaUser {
    /// Joins the call's room (`rtc_join`) and starts an agent that answers subscriber offers.
    /// Returns the join result too.
    pub async fn join(
        mut sig: SignalClient,
        user: &str,
        call_id: &str,
    ) -> Result<(MediaUser, Value), switchboard::client::signal::ClientError> {
        let mut raw_events = sig.take_events();
        let sig = Arc::new(sig);
        let (ev_tx, events) = mpsc::unbounded_channel();
        let (pkt_tx, packets) = mpsc::unbounded_channel();
        let mut sub = Subscriber::new(LOCALHOST).await.expect("subscriber pc");
        let agent_sig = Arc::clone(&sig);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = raw_events.recv() => {
                        let Some(ev) = ev else { return };
                        if ev.name == "rtc_offer" {
                            let sdp = ev.data["sdp"].as_str().unwrap_or_default().to_owned();
                            let call_id = ev.data["call_id"].clone();
                            let Ok(answer) = sub.accept_offer(sdp).await else { return };
                            if agent_sig
                                .request("rtc_answer", json!({"call_id": call_id, "sdp": answer}))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        if ev_tx.send(ev).is_err() {
                            return;
                        }
                    }
                    p = sub.next() => {
                        let Some(p) = p else { return };
                        if pkt_tx.send(p).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let joined = sig
            .request("rtc_join", json!({ "call_id": call_id }))
            .await?;
        Ok((
            MediaUser {
                user: user.to_owned(),
                call_id: call_id.to_owned(),
                sig,
                events,
                packets,
                publisher: None,
            },
            joined,
        ))
    }

    /// Publishes tracks over `rtc_publish` and waits for the publisher connection.
    pub async fn publish(&mut self, specs: &[TrackSpec]) {
        self.publish_with(specs, &IceConfig::default()).await
    }

    /// Like `publish`, with these ICE servers and policy (e.g. relay only, through TURN).
    pub async fn publish_with(&mut self, specs: &[TrackSpec], ice: &IceConfig) {
        let local = std::net::SocketAddr::new(LOCALHOST, 0);
        let mut p = Publisher::with_ice(local, &self.user, specs, ice)
            .await
            .expect("publisher pc");
        let offer = p.offer().await.expect("offer");
        let r = self
            .sig
            .request(
                "rtc_publish",
                json!({"call_id": self.call_id, "sdp": offer}),
            )
            .await
            .expect("server answers the publisher offer");
        let answer = r["sdp"].as_str().expect("answer sdp").to_owned();
        p.set_answer(answer).await.expect("client takes answer");
        p.wait_connected(Duration::from_secs(10))
            .await
            .expect("publisher connects");
        self.publisher = Some(p);
    }

    /// Waits for an event named `name` that satisfies `f`.
    pub async fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Option<ServerEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .ok()??;
            if ev.name == name && f(&ev.data) {
                return Some(ev);
            }
        }
    }

    /// Received packets so far.
    pub fn drain_packets(&mut self) -> Vec<Received> {
        let mut v = Vec::new();
        while let Ok(p) = self.packets.try_recv() {
            v.push(p);
        }
        v
    }
}
