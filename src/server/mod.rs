//! The async shell: HTTP and WebSocket (axum), the session registry and timers ([`hub`]), and the
//! wiring of storage and the media plane. [`Server::start`] builds everything from a [`Config`];
//! [`Server::serve`] runs until a shutdown future resolves, so tests can start and stop servers on
//! `127.0.0.1:0`.
//!
//! Shutdown (as mini-redis does it): one `watch` channel every task selects on; sessions close with
//! 1001, the timer stops, queued storage work is committed and the WAL checkpointed before `serve`
//! returns.

pub mod admission;
pub mod billing;
pub mod http;
pub mod hub;
pub mod listener;
pub mod media;
pub mod openapi;
pub mod peers;
pub mod remote;
pub mod session;
pub mod web;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::signaling::{Rules, Signaling};
use crate::storage::{Store, StoreError, StoreThread};
use hub::{Hub, now_ms};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database could not be opened or read.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    /// A socket could not be bound.
    #[error("cannot bind {what}: {source}")]
    Bind {
        /// Which socket.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(std::io::Error),
    /// The media engine could not start.
    #[error("media: {0}")]
    Media(#[from] crate::sfu::SfuError),
    /// The configuration does not fit the mode (a short secret, `--dev` with a real secret).
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The cluster link could not start (Redis, or a node name in use).
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The signaling shell.
    pub hub: Arc<Hub>,
    /// The billing task.
    pub biller: billing::Biller,
    /// Verifies and issues tokens.
    pub tokens: Arc<TokenAuthority>,
    /// `--dev`: dev tokens are served.
    pub dev: bool,
    /// Renders /metrics.
    pub metrics: PrometheusHandle,
    /// True once shutdown began.
    pub shutdown: watch::Receiver<bool>,
    /// The media plane.
    pub media: Arc<media::MediaPlane>,
    /// Asks the server to drain and stop (POST /v1/admin/drain).
    pub drain_requested: Arc<tokio::sync::Notify>,
    /// Session caps (`[sessions]`).
    pub admission: Arc<admission::Admission>,
}

impl AppState {
    /// Whether a drain is under way.
    pub fn draining(&self) -> bool {
        self.hub.draining()
    }
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Development mode: dev tokens are served.
    pub dev: bool,
}

/// A built server, ready to serve.
pub struct Server {
    state: AppState,
    shutdown_tx: watch::Sender<bool>,
    store_thread: Option<std::thread::JoinHandle<()>>,
    biller_task: Option<tokio::task::JoinHandle<()>>,
}

/// How often ended calls past `[storage] history_days` are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Calls deleted per storage job: live writes wait for at most one such batch.
const PRUNE_BATCH: usize = 500;

/// History retention: at start and every [`PRUNE_EVERY`], deletes the calls that ended more than
/// `[storage] history_days` ago, a batch per storage job. Nothing runs when the setting is 0.
fn spawn_history_pruning(hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let days = hub.config().storage.history_days;
    if days == 0 {
        return;
    }
    let keep_ms = u64::from(days) * 86_400_000;
    tokio::spawn(async move {
        loop {
            let before = now_ms().saturating_sub(keep_ms);
            let mut pruned = 0;
            loop {
                match hub
                    .store()
                    .call(move |s| s.prune_history(before, PRUNE_BATCH))
                    .await
                {
                    Ok(Ok(n)) => {
                        pruned += n;
                        if n < PRUNE_BATCH {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        metrics::counter!(crate::metrics::STORAGE_ERRORS, "op" => "prune_history")
                            .increment(1);
                        tracing::warn!(error = %e, "pruning the call history failed");
                        break;
                    }
                    Err(_) => return,
                }
            }
            if pruned > 0 {
                tracing::info!(
                    calls = pruned,
                    days,
                    "deleted ended calls past the history retention"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(PRUNE_EVERY) => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    });
}

/// The name this node writes its calls under: `[server] node_id`, else the host name, with a
/// PostgreSQL store; nothing with SQLite (one node owns the file).
pub fn node_name(config: &Config, backend: &str) -> String {
    if backend != "postgres" {
        return String::new();
    }
    if !config.server.node_id.is_empty() {
        return config.server.node_id.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "switchboard".to_owned()
    } else {
        name
    }
}

impl Server {
    /// Opens storage, restores calls, and builds the hub.
    pub async fn start(config: Config, opts: Options) -> Result<Server, ServerError> {
        crate::fault::install_panic_policy();
        // The secret's rules; the listen address is checked by `serve`, which binds it (tests bind
        // their own listeners).
        config.check_mode(opts.dev, true)?;
        let config = Arc::new(config);
        // A cluster's nodes label their series with their name.
        let metrics = crate::metrics::install_for(&if config.cluster.enabled() {
            node_name(&config, "postgres")
        } else {
            String::new()
        });
        // The PostgreSQL driver blocks (on a runtime of its own): open on a blocking thread.
        let setup = Arc::clone(&config);
        let clustered = config.cluster.enabled();
        let (store, restored, dropped, dead, node) = tokio::task::spawn_blocking(move || {
            let mut store = Store::connect(&setup.storage)?;
            let node = node_name(&setup, store.backend());
            store.set_node(node.clone());
            store.set_webhook_urls(setup.webhooks.urls.clone());
            // Events for a receiver taken out of [webhooks] urls would wait for ever: nobody
            // delivers them.
            let dropped = store.drop_unconfigured_webhooks()?;
            let dead = store.dead_webhook_count()?;
            // In a cluster the calls are restored by the node that takes them over.
            let restored = if clustered {
                Vec::new()
            } else {
                store.started_calls()?
            };
            Ok::<_, StoreError>((store, restored, dropped, dead, node))
        })
        .await
        .map_err(|_| ServerError::Storage(StoreError::Closed))??;
        tracing::info!(backend = store.backend(), "storage open");
        if dropped > 0 {
            tracing::warn!(
                events = dropped,
                "dropped webhook events for receivers no longer in [webhooks] urls"
            );
            metrics::counter!(crate::metrics::WEBHOOK_DROPPED).increment(dropped as u64);
        }
        metrics::gauge!(crate::metrics::WEBHOOK_DEAD).set(dead as f64);
        let n_restored = restored.len();
        let mut core = Signaling::new(Rules::from_config(&config.signaling));
        core.restore(restored, now_ms());
        let (store, store_thread) =
            StoreThread::spawn_with(store, Duration::from_secs(config.storage.write_timeout));
        let hub = Hub::new(core, store, Arc::clone(&config));
        hub.init_gauges();
        if n_restored > 0 {
            tracing::info!(calls = n_restored, "restored calls in progress");
        }
        let (shutdown_tx, shutdown) = watch::channel(false);
        let tokens = Arc::new(
            TokenAuthority::new(&config.auth.secret).with_max_ttl(config.auth.max_token_ttl),
        );
        let (biller, biller_task) =
            billing::Biller::spawn(Arc::clone(&hub), &config.billing, shutdown.clone());
        hub.add_notice_sink(Arc::new(biller.clone()));
        let sink = Arc::new(media::Sink::new(Arc::clone(&hub), biller.clone()));
        let sfu = crate::sfu::Sfu::start(&config.media, sink)?;
        match sfu.tcp_addr() {
            Some(tcp) => {
                tracing::info!(udp = %sfu.local_addr(), tcp = %tcp, "media plane listening")
            }
            None => tracing::info!(udp = %sfu.local_addr(), "media plane listening"),
        }
        let media = Arc::new(media::MediaPlane::new(sfu, Arc::clone(&hub)));
        hub.set_room_control(Some(Arc::clone(&media) as Arc<dyn hub::RoomControl>));
        webhooks::spawn(Arc::clone(&hub), shutdown.clone());
        spawn_history_pruning(Arc::clone(&hub), shutdown.clone());
        let cluster = if clustered {
            let c = crate::cluster::Cluster::connect(
                &config,
                &node,
                media.sfu().local_addr().to_string(),
            )
            .await?;
            hub.set_cluster(Arc::clone(&c));
            tracing::info!(node = %node, index = c.index(), "cluster: joined");
            Some(c)
        } else {
            None
        };
        let state = AppState {
            hub,
            biller,
            tokens,
            dev: opts.dev,
            metrics,
            shutdown,
            media,
            drain_requested: Arc::new(tokio::sync::Notify::new()),
            admission: admission::Admission::new(config.sessions.clone()),
        };
        if let Some(c) = cluster {
            c.start(remote::Remote::new(state.clone()), state.shutdown.clone());
        }
        Ok(Server {
            state,
            shutdown_tx,
            store_thread: Some(store_thread),
            biller_task: Some(biller_task),
        })
    }

    /// The shared state (tests use it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The media engine's UDP address.
    pub fn media_addr(&self) -> SocketAddr {
        self.state.media.sfu().local_addr()
    }

    /// The media engine's ICE-TCP address (`[media] ice_tcp` on).
    pub fn media_tcp_addr(&self) -> Option<SocketAddr> {
        self.state.media.sfu().tcp_addr()
    }

    /// The router.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves or a drain is requested (POST /v1/admin/drain),
    /// then drains (see [`drain`]) and shuts down cleanly. Sending `true` on
    /// [`shutdown_sender`](Self::shutdown_sender) stops at once, without a drain.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let hub = Arc::clone(&self.state.hub);
        let timers = tokio::spawn(Arc::clone(&hub).run_timers(self.state.shutdown.clone()));
        let app = self.router();
        let tx = self.shutdown_tx.clone();
        let mut stop = self.state.shutdown.clone();
        let state = self.state.clone();
        let graceful = async move {
            let drain_now = tokio::select! {
                _ = shutdown => true,
                _ = state.drain_requested.notified() => true,
                _ = stop.changed() => false,
            };
            if drain_now {
                drain(&state).await;
            }
            let _ = tx.send(true);
        };
        let limits = listener::Limits::from(&hub.config().http);
        let result = listener::serve(listener, app, limits, graceful).await;
        let _ = self.shutdown_tx.send(true);
        // Sessions see the shutdown and close; give them a moment to flush their close frames.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.session_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = timers.await;
        if let Some(b) = self.biller_task.take() {
            let _ = b.await;
        }
        self.state.media.shutdown().await;
        hub.set_room_control(None);
        hub.clear_notice_sinks();
        hub.flush().await;
        let _ = hub.store().submit(crate::storage::Job::Stop);
        if let Some(t) = self.store_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        result.map_err(ServerError::Http)
    }

    /// A sender that starts shutdown when `true` is sent (admin drain, tests).
    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown_tx.clone()
    }
}

/// A drain before stopping: readiness fails and no new calls, joins or answers are taken; calls in
/// progress go on until they end or `[server] drain_timeout` passes, then end with `server_shutdown`;
/// billing segments are closed and the webhook outbox is given a few seconds to empty (what is left
/// stays queued for the next start). Calls that only ring are kept: they ring again after the restart.
/// Marks the drain as begun (not ready, no new calls or rooms), at once: `POST /v1/admin/drain`
/// answers only after this, and [`drain`] follows. Idempotent.
pub fn begin_drain(state: &AppState) {
    let hub = &state.hub;
    match hub.cluster() {
        Some(cluster) => {
            hub.start_node_drain();
            cluster.set_draining(true);
        }
        None => hub.start_drain(),
    }
}

/// The drain, run once when the server is told to stop (SIGTERM, or the admin API).
pub async fn drain(state: &AppState) {
    let hub = &state.hub;
    begin_drain(state);
    if hub.cluster().is_some() {
        return drain_node(state).await;
    }
    let timeout = Duration::from_secs(hub.config().server.drain_timeout);
    tracing::info!(calls = hub.calls_in_progress(), ?timeout, "draining");
    let deadline = tokio::time::Instant::now() + timeout;
    while hub.calls_in_progress() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = hub.calls_in_progress();
    if left > 0 {
        tracing::info!(calls = left, "drain timeout: ending calls in progress");
    }
    hub.end_in_progress(crate::signaling::wire::EndReason::ServerShutdown);
    hub.flush().await;
    state.biller.flush().await;
    webhooks::drain(hub, Duration::from_secs(10)).await;
    tracing::info!("drain complete");
}

/// A drain of one node of a cluster: the calls are the cluster's, so none is ended. The node takes
/// no new rooms (the registry says it drains) and no new sessions (`/readyz` 503); its rooms go on
/// until they empty or `drain_timeout` passes; then it stops, its sessions reconnect to other nodes,
/// the participants of rooms still here are told to join again (`rtc_restart`, by the owner), and if
/// it owned the calls another node takes them over.
async fn drain_node(state: &AppState) {
    let hub = &state.hub;
    let timeout = Duration::from_secs(hub.config().server.drain_timeout);
    tracing::info!(
        participants = state.media.participant_count(),
        ?timeout,
        "draining this node"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    while state.media.participant_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hub.flush().await;
    state.biller.flush().await;
    webhooks::drain(hub, Duration::from_secs(10)).await;
    tracing::info!("drain complete");
}

/// Routes of PROTOCOL.md sections 1 and 6.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .route("/v1/signal", get(http::signal))
        .route("/v1/dev/token", post(http::dev_token))
        .route("/v1/calls", get(http::list_calls))
        .route("/v1/calls/{call_id}", get(http::get_call))
        .route("/v1/calls/{call_id}/end", post(http::end_call))
        .route("/v1/billing/usage", get(http::billing_usage))
        .route("/v1/rooms", get(http::list_rooms))
        .route("/v1/rooms/{call_id}", get(http::get_room))
        .route(
            "/v1/rooms/{call_id}/participants/{user_id}",
            axum::routing::delete(http::remove_participant),
        )
        .route("/v1/admin/drain", post(http::start_drain))
        .route("/v1/admin/webhooks/dead", get(http::dead_webhooks))
        .route("/v1/cluster", get(http::cluster))
        .route("/v1/cluster/nodes/{node_id}/drain", post(http::drain_node))
        .route("/v1/openapi.json", get(openapi::openapi))
        .merge(web::routes())
        .fallback(http::not_found)
        .with_state(state)
}
