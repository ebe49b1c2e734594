//! Webhook delivery: one task drains the durable outbox, receiver by receiver, in queue order.
//!
//! An event leaves the outbox when its receiver answered 2xx, or when it is given up on
//! ([`after_attempt`]): refused `[webhooks] max_attempts` times or `max_age` old, it moves to the dead
//! letters (`GET /v1/admin/webhooks/dead`) and the receiver's later events go ahead. Any other failure
//! schedules a retry with exponential backoff and holds back that receiver's later events, so each
//! receiver sees every call's events in order. Redirects are not followed (a receiver is the URL
//! configured, nothing it points to). Delivery is at least once: a crash after the POST and before
//! the row is deleted sends the event again, with the same event ID.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::hub::{Hub, now_ms};
use crate::metrics as m;
use crate::storage::OutboxRow;
use crate::webhooks::{
    EVENT_HEADER, EVENT_ID_HEADER, GiveUp, Next, Outcome, SIGNATURE_HEADER, after_attempt, expired,
    sign,
};

/// The delivery client: bounded time, no redirects.
fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

fn give_up(hub: &Hub) -> GiveUp {
    let w = &hub.config().webhooks;
    GiveUp {
        max_attempts: w.max_attempts,
        max_age_ms: w.max_age.saturating_mul(1000),
    }
}

/// Starts delivering (when `[webhooks] urls` is set); stops at shutdown.
pub fn spawn(hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    if hub.config().webhooks.urls.is_empty() {
        return;
    }
    let key = hub.config().webhooks.signing_key.clone().into_bytes();
    let http = client(Duration::from_secs(10));
    tokio::spawn(async move {
        loop {
            let delivered = round(&hub, &http, &key).await;
            if delivered {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    });
}

/// Delivers what is due until the outbox is empty or `timeout` passes (the end of a drain).
pub async fn drain(hub: &Arc<Hub>, timeout: Duration) {
    if hub.config().webhooks.urls.is_empty() {
        return;
    }
    let key = hub.config().webhooks.signing_key.clone().into_bytes();
    let http = client(Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        hub.flush().await;
        let left = hub
            .store()
            .call(|s| s.webhook_backlog())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        if left == 0 {
            return;
        }
        if !round(hub, &http, &key).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One pass: for each receiver, deliver its due events in order until one fails. Returns whether
/// anything was delivered.
async fn round(hub: &Arc<Hub>, http: &reqwest::Client, key: &[u8]) -> bool {
    let now = now_ms();
    let due = match hub
        .store()
        .call(move |s| s.due_webhooks_per_url(now, 64))
        .await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the webhook outbox failed");
            return false;
        }
        Err(_) => return false,
    };
    let give_up = give_up(hub);
    let mut delivered = false;
    let mut failed_urls: Vec<String> = Vec::new();
    for row in due {
        if failed_urls.contains(&row.url) {
            continue;
        }
        let seq = row.seq;
        let (attempts, refusals) = (row.attempts, row.refusals);
        if let Some(reason) = expired(row.created_ms, now_ms(), give_up) {
            dead_letter(hub, &row, attempts, refusals, reason).await;
            continue;
        }
        let outcome = send(http, key, &row).await;
        let now = now_ms();
        match after_attempt(outcome, attempts, refusals, row.created_ms, now, give_up) {
            Next::Remove => {
                delivered = true;
                metrics::counter!(m::WEBHOOK_DELIVERIES, "result" => "ok").increment(1);
                let _ = hub.store().call(move |s| s.webhook_delivered(seq)).await;
            }
            Next::Retry {
                at_ms,
                attempts,
                refusals,
            } => {
                metrics::counter!(m::WEBHOOK_DELIVERIES, "result" => "retry").increment(1);
                let _ = hub
                    .store()
                    .call(move |s| s.webhook_retry(seq, at_ms, attempts, refusals))
                    .await;
                failed_urls.push(row.url);
            }
            Next::Dead(reason) => {
                let refusals = refusals + u32::from(outcome == Outcome::Refused);
                dead_letter(hub, &row, attempts + 1, refusals, reason).await;
            }
        }
    }
    if let Ok(Ok(n)) = hub.store().call(|s| s.webhook_backlog()).await {
        metrics::gauge!(m::WEBHOOK_BACKLOG).set(n as f64);
    }
    delivered
}

/// Moves `row` to the dead letters; the receiver's next event is tried in the same round.
async fn dead_letter(
    hub: &Arc<Hub>,
    row: &OutboxRow,
    attempts: u32,
    refusals: u32,
    reason: crate::webhooks::DeadReason,
) {
    let seq = row.seq;
    let moved = hub
        .store()
        .call(move |s| {
            let moved = s.webhook_dead(seq, attempts, refusals, reason.as_str(), now_ms())?;
            Ok::<_, crate::storage::StoreError>((moved, s.dead_webhook_count()?))
        })
        .await;
    match moved {
        Ok(Ok((_, total))) => {
            tracing::warn!(
                url = %row.url, event = %row.event_id, attempts, refusals,
                reason = reason.as_str(), "webhook event given up on, moved to the dead letters"
            );
            metrics::counter!(m::WEBHOOK_DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
            metrics::gauge!(m::WEBHOOK_DEAD).set(total as f64);
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, event = %row.event_id, "moving a webhook event to the dead letters failed")
        }
        Err(_) => {}
    }
}

async fn send(http: &reqwest::Client, key: &[u8], row: &OutboxRow) -> Outcome {
    let event_name = serde_json::from_str::<serde_json::Value>(&row.body)
        .ok()
        .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let signature = sign(key, now_ms() / 1000, row.body.as_bytes());
    let r = http
        .post(&row.url)
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header(EVENT_ID_HEADER, &row.event_id)
        .header(EVENT_HEADER, event_name)
        .body(row.body.clone())
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => Outcome::Delivered,
        Ok(resp) => {
            tracing::warn!(url = %row.url, status = %resp.status(), event = %row.event_id, "webhook refused");
            Outcome::Refused
        }
        Err(e) if e.is_connect() => {
            tracing::warn!(url = %row.url, error = %e, event = %row.event_id, "webhook receiver unreachable");
            Outcome::Unreachable
        }
        Err(e) => {
            tracing::warn!(url = %row.url, error = %e, event = %row.event_id, "webhook delivery failed");
            Outcome::Refused
        }
    }
}
