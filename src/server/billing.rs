//! The billing shell: one task owns the [`TierMeter`], feeds it what the media plane forwards, fires its
//! checkpoints, writes the closed segments to the ledger, and tells users when their tier changes.
//!
//! Segments are written through the storage thread (`INSERT OR IGNORE` on `(call, user, start)`), so a
//! segment is never written twice, and a crash loses at most the running segment: at most `checkpoint`
//! seconds per user. While the database fails, the storage thread keeps closed segments (merging
//! contiguous ones) and writes them once it works again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::hub::{Hub, NoticeSink, now_ms};
use crate::billing::{ConsumerUpdate, TierMeter, UsageRecord};
use crate::config::BillingConfig;
use crate::ids::{CallId, UserId};
use crate::metrics as m;
use crate::signaling::Notice;
use crate::storage::Job;

enum Msg {
    Update(ConsumerUpdate),
    EndCall(CallId, u64),
    Flush(oneshot::Sender<()>),
}

/// A handle to the billing task.
#[derive(Clone, Debug)]
pub struct Biller {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Biller {
    /// Starts the task. It flushes every running segment and stops when `shutdown` turns true.
    pub fn spawn(
        hub: Arc<Hub>,
        config: &BillingConfig,
        shutdown: watch::Receiver<bool>,
    ) -> (Biller, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let meter = TierMeter::new(config);
        let handle = tokio::spawn(run(hub, meter, rx, shutdown));
        (Biller { tx }, handle)
    }

    /// What one subscriber receives on one track changed.
    pub fn update(&self, u: ConsumerUpdate) {
        let _ = self.tx.send(Msg::Update(u));
    }

    /// A call ended: close its users' segments.
    pub fn end_call(&self, call_id: CallId, at_ms: u64) {
        let _ = self.tx.send(Msg::EndCall(call_id, at_ms));
    }

    /// Closes every running segment now (metering goes on in new ones) and waits until the ledger has
    /// them.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl NoticeSink for Biller {
    fn notice(&self, now: u64, notice: &Notice) {
        if let Notice::CallEnded { call_id, .. } = notice {
            self.end_call(call_id.clone(), now);
        }
    }
}

async fn run(
    hub: Arc<Hub>,
    mut meter: TierMeter,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut billed = BilledCounter::default();
    let mut write = |hub: &Hub, closed: Vec<UsageRecord>| {
        billed.add(&closed);
        write(hub, closed);
    };
    loop {
        let wait = meter
            .next_deadline()
            .map_or(Duration::from_secs(3600), |d| {
                Duration::from_millis(d.saturating_sub(now_ms()))
            });
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Update(u)) => {
                    let (call, user) = (u.call_id.clone(), u.user_id.clone());
                    let before = state(&meter, &call, &user);
                    let closed = meter.apply(u);
                    write(&hub, closed);
                    let after = state(&meter, &call, &user);
                    if before != after {
                        tell_user(&hub, &call, &user, after);
                        gauges(&meter);
                    }
                }
                Some(Msg::EndCall(call, at)) => {
                    write(&hub, meter.end_call(&call, at));
                    gauges(&meter);
                }
                Some(Msg::Flush(done)) => {
                    write(&hub, meter.checkpoint_now(now_ms()));
                    hub.flush().await;
                    let _ = done.send(());
                }
                None => break,
            },
            _ = tokio::time::sleep(wait) => {
                write(&hub, meter.tick(now_ms()));
            }
            _ = shutdown.changed() => {
                write(&hub, meter.flush(now_ms()));
                hub.flush().await;
                break;
            }
        }
    }
}

fn state(meter: &TierMeter, call: &CallId, user: &UserId) -> Option<(String, u64)> {
    let tier = meter.current_tier(call, user)?.to_owned();
    Some((tier, meter.current_pixels(call, user).unwrap_or(0)))
}

/// The `billing_tier` event: the tier (and aggregate pixels) the user is metered in now, or `null` when
/// they receive nothing.
fn tell_user(hub: &Hub, call: &CallId, user: &UserId, now: Option<(String, u64)>) {
    let data = match now {
        Some((tier, pixels)) => json!({"call_id": call, "tier": tier, "pixels": pixels}),
        None => json!({"call_id": call, "tier": null, "pixels": 0}),
    };
    hub.send_to_user(user, "billing_tier", Arc::from(data.to_string()));
}

fn gauges(meter: &TierMeter) {
    for (tier, n) in meter.users_per_tier() {
        metrics::gauge!(m::USERS_IN_TIER, "tier" => tier.to_owned()).set(n as f64);
    }
}

/// Billed time per tier, kept in milliseconds so whole seconds are exported without losing fractions.
#[derive(Default)]
struct BilledCounter {
    ms: std::collections::HashMap<String, u64>,
}

impl BilledCounter {
    fn add(&mut self, closed: &[UsageRecord]) {
        for r in closed {
            let total = self.ms.entry(r.tier.clone()).or_default();
            *total += r.duration_ms();
            metrics::counter!(m::BILLED_SECONDS, "tier" => r.tier.clone()).absolute(*total / 1000);
        }
    }
}

fn write(hub: &Hub, closed: Vec<UsageRecord>) {
    if closed.is_empty() {
        return;
    }
    let now = now_ms();
    let events: Vec<_> = if hub.config().webhooks.urls.is_empty() {
        Vec::new()
    } else {
        closed
            .iter()
            .map(|r| crate::webhooks::from_usage(now, r))
            .collect()
    };
    // Written with the storage thread's next batch; kept and retried there while storage fails.
    let _ = hub.store().submit(Job::Usage(closed, events));
}
