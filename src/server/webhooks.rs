//! Webhook delivery: one task drains the durable outbox, receiver by receiver, in queue order.
//!
//! An event leaves the outbox only when its receiver answered 2xx. A failure (an error status, a
//! timeout, a refused connection) schedules a retry with exponential backoff and holds back that
//! receiver's later events, so each receiver sees every call's events in order. Delivery is at least
//! once: a crash after the POST and before the row is deleted sends the event again, with the same
//! event ID.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::hub::{Hub, now_ms};
use crate::metrics as m;
use crate::storage::OutboxRow;
use crate::webhooks::{EVENT_HEADER, EVENT_ID_HEADER, SIGNATURE_HEADER, backoff_ms, sign};

/// Starts delivering (when `[webhooks] urls` is set); stops at shutdown.
pub fn spawn(hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    if hub.config().webhooks.urls.is_empty() {
        return;
    }
    let key = hub.config().webhooks.signing_key.clone().into_bytes();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
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
    let mut delivered = false;
    let mut failed_urls: Vec<String> = Vec::new();
    for row in due {
        if failed_urls.contains(&row.url) {
            continue;
        }
        if send(http, key, &row).await {
            delivered = true;
            metrics::counter!(m::WEBHOOK_DELIVERIES, "result" => "ok").increment(1);
            let seq = row.seq;
            let _ = hub.store().call(move |s| s.webhook_delivered(seq)).await;
        } else {
            let next = now_ms() + backoff_ms(row.attempts);
            metrics::counter!(m::WEBHOOK_DELIVERIES, "result" => "retry").increment(1);
            let seq = row.seq;
            let _ = hub.store().call(move |s| s.webhook_retry(seq, next)).await;
            failed_urls.push(row.url);
        }
    }
    if let Ok(Ok(n)) = hub.store().call(|s| s.webhook_backlog()).await {
        metrics::gauge!(m::WEBHOOK_BACKLOG).set(n as f64);
    }
    delivered
}

async fn send(http: &reqwest::Client, key: &[u8], row: &OutboxRow) -> bool {
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
        Ok(resp) if resp.status().is_success() => true,
        Ok(resp) => {
            tracing::warn!(url = %row.url, status = %resp.status(), event = %row.event_id, "webhook refused");
            false
        }
        Err(e) => {
            tracing::warn!(url = %row.url, error = %e, event = %row.event_id, "webhook delivery failed");
            false
        }
    }
}
