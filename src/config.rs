//! Configuration: `config/switchboard.toml`, overridden key by key from `SWITCHBOARD_<SECTION>_<KEY>`.
//!
//! Loading is strict: an unknown key, a value of the wrong type or one out of range stops the server at
//! start with a message that names the key (`signaling.max_invitees: must be 1..=100`). Every default here
//! is also written, commented, in `config/switchboard.toml`; `tests::shipped_file_matches_defaults` keeps
//! the two in step.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A key is unknown, of the wrong type, or out of range.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, as `section.key`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP and WebSocket listener.
    pub server: ServerConfig,
    /// HTTP connection timeouts and caps.
    pub http: HttpConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Call invitation rules and session limits.
    pub signaling: SignalingConfig,
    /// Caps on sessions and what a session may make the server hold.
    pub sessions: SessionsConfig,
    /// The embedded database.
    pub storage: StorageConfig,
    /// The SFU's UDP port and workers.
    pub media: MediaConfig,
    /// Resolution tiers and ledger checkpoints.
    pub billing: BillingConfig,
    /// Operator webhooks.
    pub webhooks: WebhooksConfig,
    /// TURN servers handed to clients.
    pub turn: TurnConfig,
    /// Several nodes as one service (Redis).
    pub cluster: ClusterConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP/WebSocket listener.
    pub listen: SocketAddr,
    /// Seconds a drain lets calls in progress continue before ending them.
    pub drain_timeout: u64,
    /// This node's name in a shared store: the calls it runs are marked with it, and after a
    /// restart it takes back only those. Empty: the host name with a PostgreSQL store, nothing with
    /// SQLite (one node).
    pub node_id: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7880)),
            drain_timeout: 300,
            node_id: String::new(),
        }
    }
}

/// `[http]`: what one TCP connection may hold of the server, and for how long.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Seconds a connection has to send a complete request head, counted from when the server starts
    /// waiting for it: the connection's opening, or the end of the previous response (so it is also
    /// how long a kept-alive connection may sit between requests).
    pub header_read_timeout: u64,
    /// Seconds an HTTP connection may go without a byte moving either way while a request body is
    /// read or a response written. Upgraded WebSockets are governed by the heartbeat instead.
    pub idle_timeout: u64,
    /// Most TCP connections open at once, WebSocket sessions included; beyond it a new connection is
    /// answered 503 and closed at once.
    pub max_connections: usize,
    /// Reverse proxies (addresses or CIDR networks) whose `X-Forwarded-For` names the client: for a
    /// connection from one of them, the `[sessions]` per-address caps count the last address in that
    /// header that is not itself a trusted proxy. Empty: every client is the TCP peer.
    #[serde(deserialize_with = "addresses_or_networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: 10,
            idle_timeout: 60,
            max_connections: 50_000,
            trusted_proxies: Vec::new(),
        }
    }
}

/// A list of `10.0.0.5` (one address) or `10.0.0.0/8` (a network).
fn addresses_or_networks<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    items
        .iter()
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{item:?} is neither an IP address nor a network (10.0.0.0/8)"
                    ))
                })
        })
        .collect()
}

/// Shortest `[auth] secret` outside dev mode, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret for access tokens. Required unless `--dev`, at least [`MIN_SECRET_BYTES`].
    pub secret: String,
    /// Longest lifetime, in seconds, a token may have (`exp` - `iat`, and `exp` - now).
    pub max_token_ttl: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: String::new(),
            max_token_ttl: 86_400,
        }
    }
}

/// What the server does when a busy user is invited or invites (PROTOCOL.md 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusyPolicy {
    /// The server refuses: the invitee's state becomes `busy`, a busy caller's invite fails.
    Reject,
    /// The server lets it through and clients decide.
    Allow,
}

/// `[signaling]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalingConfig {
    /// `reject` or `allow`.
    pub busy_policy: BusyPolicy,
    /// Seconds an invitation rings when `call_invite` names no timeout.
    pub default_timeout: u32,
    /// Most invitees in one `call_invite` or `calling_invite`.
    pub max_invitees: usize,
    /// Most users in one call, the caller included.
    pub max_call_users: usize,
    /// Most bytes of `extended_data`.
    pub max_extended_data: usize,
    /// Seconds a user may have no live session before they count as gone.
    pub disconnect_grace: u64,
    /// Seconds a general-mode call's room may stay empty before the call ends `completed`.
    pub room_empty_timeout: u64,
    /// Seconds between client keepalives; a session silent for twice this is closed.
    pub heartbeat: u64,
    /// Requests per second a session may send (token bucket rate).
    pub rate: u32,
    /// Requests a session may send at once (token bucket size).
    pub burst: u32,
    /// Largest WebSocket frame, in bytes.
    pub max_frame: usize,
    /// Calls one user may create per minute (0: no limit).
    pub calls_per_minute: u32,
    /// Invitations one user may send per minute, each invitee counted (0: no limit).
    pub invitations_per_minute: u32,
    /// Seconds after a callee rejects a user's invitation before that user may ring them again
    /// (0: no wait).
    pub reinvite_cooldown: u64,
}

impl Default for SignalingConfig {
    fn default() -> Self {
        Self {
            busy_policy: BusyPolicy::Reject,
            default_timeout: 90,
            max_invitees: 9,
            max_call_users: 10,
            max_extended_data: 4096,
            disconnect_grace: 30,
            room_empty_timeout: 30,
            heartbeat: 30,
            rate: 50,
            burst: 100,
            max_frame: 65536,
            calls_per_minute: 10,
            invitations_per_minute: 30,
            reinvite_cooldown: 30,
        }
    }
}

/// `[sessions]`: what clients may make the server hold. Upgrades over a cap are answered 429
/// `rate_limited` before the WebSocket opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Most live sessions in total.
    pub max_total: usize,
    /// Most live sessions of one user (devices and tabs).
    pub max_per_user: usize,
    /// Most live sessions from one IP address.
    pub max_per_ip: usize,
    /// WebSocket upgrades one IP address may start per second (token bucket rate)...
    pub upgrade_rate: u32,
    /// ...and at once (bucket size).
    pub upgrade_burst: u32,
    /// Frames (events and replies) queued for one session; a session whose client reads so slowly
    /// that the queue fills is closed with 4008.
    pub outbound_queue: usize,
    /// Seconds one write to a session's socket may take; a client that stops reading is dropped.
    pub write_timeout: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_total: 100_000,
            max_per_user: 10,
            max_per_ip: 200,
            upgrade_rate: 20,
            upgrade_burst: 40,
            outbound_queue: 1024,
            write_timeout: 10,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Path of the SQLite database; its directory is created if missing. Unused with `url`.
    pub path: PathBuf,
    /// A PostgreSQL database to keep everything in instead (`postgres://user:password@host/db`),
    /// shared by every node that names it. Empty: the SQLite file at `path`.
    pub url: String,
    /// Days an ended call stays in the history; 0 keeps it forever. The billing ledger is kept.
    pub history_days: u32,
    /// Seconds a failing write is retried (while the clients whose ops it carries wait) before
    /// their ops are answered `unavailable` and the changes undone.
    pub write_timeout: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/switchboard.db"),
            url: String::new(),
            history_days: 0,
            write_timeout: 3,
        }
    }
}

/// `[media]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// The one UDP port for all media.
    pub udp_port: u16,
    /// Whether the server also takes ICE over TCP (RFC 6544 passive candidates on `tcp_port`), for
    /// clients whose network blocks UDP.
    pub ice_tcp: bool,
    /// The TCP port for ICE-TCP (same `bind` and `public_ips` as UDP). 0 binds any free port.
    pub tcp_port: u16,
    /// Most ICE-TCP connections held at once (each is one client peer connection); further ones
    /// are closed at accept.
    pub max_tcp_connections: usize,
    /// Address the UDP socket binds to.
    pub bind: IpAddr,
    /// Addresses announced as host candidates (for 1:1 NAT). Empty: the bind address, or when that is
    /// unspecified, every local interface address.
    pub public_ips: Vec<IpAddr>,
    /// Media worker threads; 0 means one per core.
    pub workers: usize,
    /// Most source addresses the media I/O thread routes (each confirmed by a connection's ICE
    /// check); further ones are refused until some age out.
    pub max_routes: usize,
    /// Most tracks one participant may publish (sending audio/video m-lines of its offer).
    pub max_tracks_per_participant: usize,
    /// Most m-lines in one `rtc_publish` offer.
    pub max_mlines_per_offer: usize,
    /// Most distinct remote ICE candidates per peer connection (in SDP and trickled).
    pub max_remote_candidates: usize,
    /// Most bytes of an `rtc_publish` offer or `rtc_answer` answer.
    pub max_sdp_bytes: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            udp_port: 7882,
            ice_tcp: true,
            tcp_port: 7881,
            max_tcp_connections: 4096,
            bind: IpAddr::from([127, 0, 0, 1]),
            public_ips: Vec::new(),
            workers: 0,
            max_routes: 65_536,
            max_tracks_per_participant: 8,
            max_mlines_per_offer: 16,
            max_remote_candidates: 32,
            max_sdp_bytes: 65_536,
        }
    }
}

/// One billing tier: a name and the largest aggregate pixel count it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// The tier's name as it appears in reports.
    pub name: String,
    /// Largest aggregate `width × height` in this tier; absent on the last, unbounded tier. The first
    /// tier is the audio tier and has 0.
    pub max_pixels: Option<u64>,
}

/// `[billing]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// Seconds between ledger checkpoints of a running interval.
    pub checkpoint: u64,
    /// Ordered tiers; the first is audio-only (0 pixels), the last is unbounded.
    pub tiers: Vec<TierConfig>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        let tier = |name: &str, max: Option<u64>| TierConfig {
            name: name.to_owned(),
            max_pixels: max,
        };
        Self {
            checkpoint: 10,
            tiers: vec![
                tier("audio", Some(0)),
                tier("hd", Some(921_600)),
                tier("full_hd", Some(2_073_600)),
                tier("2k", Some(3_686_400)),
                tier("4k", Some(8_847_360)),
                tier("4k_plus", None),
            ],
        }
    }
}

/// `[webhooks]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Receivers; every event goes to each.
    pub urls: Vec<String>,
    /// HMAC-SHA256 key for the signature header. Required when `urls` is not empty.
    pub signing_key: String,
    /// Failed deliveries of one event to one receiver before it is dead-lettered.
    pub max_attempts: u32,
    /// Seconds after its creation an undelivered event is dead-lettered.
    pub max_age: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            signing_key: String::new(),
            max_attempts: 100,
            max_age: 86_400,
        }
    }
}

/// `[turn]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// `turn:`, `turns:` (and `stun:`) URLs given to clients in `rtc_join`'s `ice_servers`.
    pub urls: Vec<String>,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`). Required with `urls`.
    pub secret: String,
    /// Seconds a handed-out credential stays valid.
    pub ttl: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            secret: String::new(),
            ttl: 86_400,
        }
    }
}

/// `[cluster]`: several nodes behind one address, on one PostgreSQL store and one Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Redis for the node registry, routing between nodes and room placement
    /// (`redis://host:6379/0`, `rediss://…`, `redis+unix:///run/redis.sock`). Empty: one node.
    pub redis_url: String,
    /// The URL clients and other nodes reach this node's HTTP at (`http://10.0.0.5:7880`). Empty:
    /// `http://` and the listen address.
    pub advertise: String,
    /// Seconds after its last heartbeat that a node counts as gone (its registry entry expires);
    /// heartbeats go out five times in that span.
    pub node_ttl: u64,
    /// Whether rooms may be placed on this node. `false`: a node for signaling only (it still
    /// takes WebSockets, and may own the calls).
    pub takes_rooms: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            advertise: String::new(),
            node_ttl: 5,
            takes_rooms: true,
        }
    }
}

impl ClusterConfig {
    /// Whether this node is one of several.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `switchboard=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

impl Config {
    /// Reads `path` (if any), applies `SWITCHBOARD_*` overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "defaults".to_owned()),
        };
        Self::from_toml_and_env(&text, &origin, env)
    }

    /// Parses TOML text, applies overrides, validates. `origin` names the text in errors.
    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: origin.to_owned(),
                    message: e.message().to_owned(),
                })?;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            apply_override(&mut table, rest, &value)?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Invalid {
                    key: if key == "." { "config".into() } else { key },
                    message: e.into_inner().message().to_owned(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.signaling;
        range(
            "signaling.default_timeout",
            s.default_timeout as u64,
            1,
            600,
        )?;
        range("signaling.max_invitees", s.max_invitees as u64, 1, 100)?;
        range("signaling.max_call_users", s.max_call_users as u64, 2, 1000)?;
        range(
            "signaling.max_extended_data",
            s.max_extended_data as u64,
            0,
            1 << 20,
        )?;
        range("signaling.disconnect_grace", s.disconnect_grace, 0, 3600)?;
        range(
            "signaling.room_empty_timeout",
            s.room_empty_timeout,
            0,
            86_400,
        )?;
        range("signaling.heartbeat", s.heartbeat, 1, 3600)?;
        range("signaling.rate", s.rate as u64, 1, 1_000_000)?;
        range("signaling.burst", s.burst as u64, 1, 1_000_000)?;
        range("signaling.max_frame", s.max_frame as u64, 1024, 16 << 20)?;
        range(
            "signaling.calls_per_minute",
            u64::from(s.calls_per_minute),
            0,
            100_000,
        )?;
        range(
            "signaling.invitations_per_minute",
            u64::from(s.invitations_per_minute),
            0,
            1_000_000,
        )?;
        range(
            "signaling.reinvite_cooldown",
            s.reinvite_cooldown,
            0,
            86_400,
        )?;
        if s.invitations_per_minute > 0 && (s.invitations_per_minute as usize) < s.max_invitees {
            return invalid(
                "signaling.invitations_per_minute",
                &format!(
                    "{} is below max_invitees ({}): a full invitation could never be sent",
                    s.invitations_per_minute, s.max_invitees
                ),
            );
        }
        let ss = &self.sessions;
        range("sessions.max_total", ss.max_total as u64, 1, 10_000_000)?;
        range("sessions.max_per_user", ss.max_per_user as u64, 1, 10_000)?;
        range("sessions.max_per_ip", ss.max_per_ip as u64, 1, 10_000_000)?;
        range(
            "sessions.upgrade_rate",
            u64::from(ss.upgrade_rate),
            1,
            1_000_000,
        )?;
        range(
            "sessions.upgrade_burst",
            u64::from(ss.upgrade_burst),
            1,
            1_000_000,
        )?;
        range(
            "sessions.outbound_queue",
            ss.outbound_queue as u64,
            16,
            1_000_000,
        )?;
        range("sessions.write_timeout", ss.write_timeout, 1, 600)?;
        range("server.drain_timeout", self.server.drain_timeout, 0, 86_400)?;
        range("billing.checkpoint", self.billing.checkpoint, 1, 3600)?;
        range("storage.write_timeout", self.storage.write_timeout, 1, 60)?;
        let md = &self.media;
        range("media.max_routes", md.max_routes as u64, 64, 1 << 24)?;
        range(
            "media.max_tcp_connections",
            md.max_tcp_connections as u64,
            1,
            1 << 20,
        )?;
        range(
            "media.max_tracks_per_participant",
            md.max_tracks_per_participant as u64,
            1,
            256,
        )?;
        range(
            "media.max_mlines_per_offer",
            md.max_mlines_per_offer as u64,
            1,
            512,
        )?;
        if md.max_tracks_per_participant > md.max_mlines_per_offer {
            return invalid(
                "media.max_tracks_per_participant",
                "must not exceed media.max_mlines_per_offer (each track needs an m-line)",
            );
        }
        range(
            "media.max_remote_candidates",
            md.max_remote_candidates as u64,
            1,
            1024,
        )?;
        range(
            "media.max_sdp_bytes",
            md.max_sdp_bytes as u64,
            1024,
            1 << 20,
        )?;
        let h = &self.http;
        range("http.header_read_timeout", h.header_read_timeout, 1, 3600)?;
        range("http.idle_timeout", h.idle_timeout, 1, 86_400)?;
        range(
            "http.max_connections",
            h.max_connections as u64,
            1,
            1_000_000,
        )?;
        range(
            "auth.max_token_ttl",
            self.auth.max_token_ttl,
            60,
            366 * 86_400,
        )?;
        range(
            "webhooks.max_attempts",
            u64::from(self.webhooks.max_attempts),
            1,
            100_000,
        )?;
        range("webhooks.max_age", self.webhooks.max_age, 60, 90 * 86_400)?;
        if self.media.udp_port == 0 {
            // Port 0 is allowed: tests bind an ephemeral port and read it back.
        }
        if self.storage.path.as_os_str().is_empty() {
            return invalid("storage.path", "must not be empty");
        }
        if let Err(e) = crate::storage::backend_of(&self.storage.url) {
            let why = e.to_string();
            return invalid("storage.url", why.trim_start_matches("storage.url: "));
        }
        let node = &self.server.node_id;
        if node.len() > 64
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(
                "server.node_id",
                "at most 64 characters of letters, digits, '-', '_' and '.'",
            );
        }
        let cl = &self.cluster;
        if cl.enabled() {
            if !(cl.redis_url.starts_with("redis://")
                || cl.redis_url.starts_with("rediss://")
                || cl.redis_url.starts_with("redis+unix://")
                || cl.redis_url.starts_with("unix://"))
            {
                return invalid(
                    "cluster.redis_url",
                    "must be a redis://, rediss:// or redis+unix:// URL",
                );
            }
            if !matches!(
                crate::storage::backend_of(&self.storage.url),
                Ok(crate::storage::Kind::Postgres)
            ) {
                return invalid(
                    "cluster.redis_url",
                    "several nodes share one PostgreSQL store: set [storage] url too",
                );
            }
        }
        let advertised = ["", "http://", "https://"].iter().any(|p| {
            if p.is_empty() {
                cl.advertise.is_empty()
            } else {
                cl.advertise.starts_with(p)
            }
        });
        if !advertised {
            return invalid("cluster.advertise", "must be an http:// or https:// URL");
        }
        range("cluster.node_ttl", cl.node_ttl, 2, 600)?;
        let tiers = &self.billing.tiers;
        if tiers.len() < 2 {
            return invalid(
                "billing.tiers",
                "needs an audio tier and at least one video tier",
            );
        }
        if tiers[0].max_pixels != Some(0) {
            return invalid(
                "billing.tiers",
                "the first tier is the audio tier: max_pixels = 0",
            );
        }
        if tiers.last().is_some_and(|t| t.max_pixels.is_some()) {
            return invalid(
                "billing.tiers",
                "the last tier must have no max_pixels (unbounded)",
            );
        }
        let mut prev = 0;
        for (i, t) in tiers.iter().enumerate() {
            if t.name.is_empty() || tiers[..i].iter().any(|o| o.name == t.name) {
                return invalid("billing.tiers", "tier names must be non-empty and distinct");
            }
            if i > 0 && i + 1 < tiers.len() {
                match t.max_pixels {
                    Some(m) if m > prev => prev = m,
                    _ => {
                        return invalid(
                            "billing.tiers",
                            "max_pixels must rise strictly from tier to tier",
                        );
                    }
                }
            }
        }
        range("turn.ttl", self.turn.ttl, 60, 30 * 86_400)?;
        for url in &self.turn.urls {
            let scheme_ok = ["turn:", "turns:", "stun:", "stuns:"]
                .iter()
                .any(|p| url.starts_with(p) && url.len() > p.len());
            if !scheme_ok || url.chars().any(char::is_whitespace) {
                return invalid(
                    "turn.urls",
                    "each URL must be turn:, turns:, stun: or stuns: and a host (RFC 7064/7065)",
                );
            }
        }
        if self.turn.urls.len() > 16 {
            return invalid("turn.urls", "at most 16 URLs");
        }
        if self.turn.urls.iter().any(|u| u.starts_with("turn")) && self.turn.secret.is_empty() {
            return invalid(
                "turn.secret",
                "required when turn.urls has a turn: or turns: URL",
            );
        }
        if !self.webhooks.urls.is_empty() && self.webhooks.signing_key.is_empty() {
            return invalid("webhooks.signing_key", "required when webhooks.urls is set");
        }
        for url in &self.webhooks.urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return invalid(
                    "webhooks.urls",
                    "each URL must start with http:// or https://",
                );
            }
        }
        Ok(())
    }

    /// The rules of `serve` about the secret and dev mode, checked once `--dev` is known (the file alone
    /// cannot say): outside dev mode the secret must be at least [`MIN_SECRET_BYTES`]; in dev mode a
    /// configured secret other than the public dev secret is refused (dev tokens would be signed with
    /// it), and so is a listen address other than loopback unless `allow_remote`.
    pub fn check_mode(&self, dev: bool, allow_remote: bool) -> Result<(), ConfigError> {
        let secret = &self.auth.secret;
        if dev {
            if !secret.is_empty() && secret != crate::auth::DEV_SECRET {
                return invalid(
                    "auth.secret",
                    "--dev serves POST /v1/dev/token, which would sign tokens for anyone with this \
                     secret: unset the secret for development, or leave out --dev",
                );
            }
            if !self.server.listen.ip().is_loopback() && !allow_remote {
                return invalid(
                    "server.listen",
                    &format!(
                        "--dev listens only on a loopback address (127.0.0.1, ::1), not {}: \
                         anyone who reaches it gets tokens; add --dev-allow-remote to do it anyway",
                        self.server.listen
                    ),
                );
            }
        } else if secret.is_empty() {
            return invalid(
                "auth.secret",
                "not set: set SWITCHBOARD_AUTH_SECRET or [auth] secret in the config file (or run \
                 with --dev for local development)",
            );
        } else if secret.len() < MIN_SECRET_BYTES {
            return invalid(
                "auth.secret",
                &format!(
                    "must be at least {MIN_SECRET_BYTES} bytes, got {}: generate one with \
                     `openssl rand -hex 32`",
                    secret.len()
                ),
            );
        }
        Ok(())
    }

    /// The number of media workers to run.
    pub fn media_workers(&self) -> usize {
        if self.media.workers > 0 {
            self.media.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

fn range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return invalid(key, &format!("must be {lo}..={hi}, got {v}"));
    }
    Ok(())
}

fn invalid<T>(key: &str, message: &str) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        key: key.to_owned(),
        message: message.to_owned(),
    })
}

/// Sections, so that `SWITCHBOARD_SIGNALING_BUSY_POLICY` splits into `signaling` and `busy_policy`.
const SECTIONS: &[&str] = &[
    "server",
    "http",
    "auth",
    "signaling",
    "sessions",
    "storage",
    "media",
    "billing",
    "webhooks",
    "turn",
    "cluster",
    "log",
];

/// Keys whose value is a list of strings.
const LIST_KEYS: &[(&str, &str)] = &[
    ("media", "public_ips"),
    ("http", "trusted_proxies"),
    ("webhooks", "urls"),
    ("turn", "urls"),
];

/// `signaling_busy_policy` → (`signaling`, `busy_policy`), for a known section.
fn split_env_name(lower: &str) -> Option<(&'static str, String)> {
    SECTIONS.iter().find_map(|s| {
        lower
            .strip_prefix(s)
            .and_then(|k| k.strip_prefix('_'))
            .filter(|k| !k.is_empty())
            .map(|k| (*s, k.to_owned()))
    })
}

/// `SWITCHBOARD_*` variables that name no configuration section, which loading ignores (so that, for
/// example, a Kubernetes service named `switchboard` does not stop the server). A variable naming a
/// known section with an unknown key is an error instead.
pub fn ignored_env(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    env.into_iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
            split_env_name(&rest).is_none().then_some(name)
        })
        .collect()
}

fn apply_override(table: &mut toml::Table, rest: &str, raw: &str) -> Result<(), ConfigError> {
    let lower = rest.to_ascii_lowercase();
    let Some((section, key)) = split_env_name(&lower) else {
        // Not ours (e.g. Kubernetes' SWITCHBOARD_PORT service link): ignored, see `ignored_env`.
        return Ok(());
    };
    let mut value = parse_env_value(raw);
    // A list key given one plain value (`PUBLIC_IPS=203.0.113.7`) or nothing is a list of that.
    if LIST_KEYS.contains(&(section, key.as_str()))
        && let toml::Value::String(one) = &value
    {
        value = toml::Value::Array(if one.trim().is_empty() {
            Vec::new()
        } else {
            vec![toml::Value::String(one.trim().to_owned())]
        });
    }
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(section_table) = entry.as_table_mut() else {
        return invalid(section, "must be a table");
    };
    section_table.insert(key, value);
    Ok(())
}

/// An environment value is read as a TOML value when it is one (`42`, `true`, `["a","b"]`,
/// `[{name="audio",max_pixels=0}]`); a comma in anything else makes a list of strings (`PUBLIC_IPS=1.2.3.4,5.6.7.8`);
/// otherwise it is a string.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    if let Ok(mut t) = doc.parse::<toml::Table>()
        && let Some(v) = t.remove("v")
    {
        return v;
    }
    if raw.contains(',') {
        return toml::Value::Array(
            raw.split(',')
                .map(|s| toml::Value::String(s.trim().to_owned()))
                .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
                .collect(),
        );
    }
    toml::Value::String(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn shipped_file_matches_defaults() {
        let text = include_str!("../config/switchboard.toml");
        let shipped = Config::from_toml_and_env(text, "switchboard.toml", []).expect("valid");
        let defaults = Config::default();
        assert_eq!(
            toml::to_string(&shipped).expect("serializes"),
            toml::to_string(&defaults).expect("serializes"),
            "config/switchboard.toml must set every key to its default"
        );
        // Every key of every section is written (commented or not) in the shipped file.
        let table = toml::Value::try_from(&defaults).expect("to value");
        for (section, keys) in table.as_table().expect("table") {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing"
            );
            for key in keys.as_table().expect("section table").keys() {
                assert!(
                    text.contains(&format!("{key} =")),
                    "{section}.{key} is not documented in config/switchboard.toml"
                );
            }
        }
    }

    #[test]
    fn env_overrides_split_section_and_key() {
        let c = Config::from_toml_and_env(
            "",
            "t",
            env(&[
                ("SWITCHBOARD_AUTH_SECRET", "s3cret"),
                ("SWITCHBOARD_SERVER_LISTEN", "0.0.0.0:9000"),
                ("SWITCHBOARD_SIGNALING_BUSY_POLICY", "allow"),
                ("SWITCHBOARD_SIGNALING_MAX_INVITEES", "3"),
                ("SWITCHBOARD_MEDIA_PUBLIC_IPS", "10.0.0.1,10.0.0.2"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.auth.secret, "s3cret");
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.signaling.busy_policy, BusyPolicy::Allow);
        assert_eq!(c.signaling.max_invitees, 3);
        assert_eq!(c.media.public_ips.len(), 2);
        // One value, or none, for a list key.
        let c = Config::from_toml_and_env(
            "",
            "t",
            env(&[
                ("SWITCHBOARD_MEDIA_PUBLIC_IPS", "203.0.113.7"),
                ("SWITCHBOARD_WEBHOOKS_URLS", ""),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.media.public_ips,
            vec!["203.0.113.7".parse::<IpAddr>().expect("ip")]
        );
        assert!(c.webhooks.urls.is_empty());
        let c = Config::from_toml_and_env(
            "",
            "t",
            env(&[("SWITCHBOARD_MEDIA_PUBLIC_IPS", "[\"203.0.113.7\"]")]),
        )
        .expect("valid");
        assert_eq!(c.media.public_ips.len(), 1);
        let c = Config::from_toml_and_env(
            "",
            "t",
            env(&[(
                "SWITCHBOARD_HTTP_TRUSTED_PROXIES",
                "[\"10.0.0.10\", \"fd00::/8\"]",
            )]),
        )
        .expect("valid");
        assert_eq!(
            c.http.trusted_proxies,
            vec![
                "10.0.0.10/32".parse::<ipnet::IpNet>().expect("net"),
                "fd00::/8".parse().expect("net"),
            ]
        );
        let err = Config::from_toml_and_env(
            "",
            "t",
            env(&[("SWITCHBOARD_HTTP_TRUSTED_PROXIES", "10.0.0.300")]),
        )
        .expect_err("not an address");
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = Config::from_toml_and_env("[signaling]\nmax_invitees = 0\n", "t", [])
            .expect_err("out of range");
        assert!(e.to_string().starts_with("signaling.max_invitees:"), "{e}");

        let e = Config::from_toml_and_env("[signaling]\nbusy_policy = \"maybe\"\n", "t", [])
            .expect_err("bad enum");
        assert!(e.to_string().starts_with("signaling.busy_policy"), "{e}");

        let e =
            Config::from_toml_and_env("[server]\nlisten = 5\n", "t", []).expect_err("wrong type");
        assert!(e.to_string().starts_with("server.listen"), "{e}");

        let e = Config::from_toml_and_env("[signaling]\nbogus = 1\n", "t", [])
            .expect_err("unknown key");
        assert!(e.to_string().contains("signaling"), "{e}");

        let e = Config::from_toml_and_env("", "t", env(&[("SWITCHBOARD_AUTH_SECRTE", "x")]))
            .expect_err("unknown key in a known section");
        assert!(e.to_string().contains("secrte"), "{e}");
        // Variables that name no section are not ours: ignored, and listed for a warning.
        let vars = env(&[
            ("SWITCHBOARD_PORT", "tcp://10.0.0.1:7880"),
            ("SWITCHBOARD_PYTHON", "/usr/bin/python3"),
            ("SWITCHBOARD_AUTH_SECRET", "s"),
        ]);
        assert!(Config::from_toml_and_env("", "t", vars.clone()).is_ok());
        assert_eq!(
            ignored_env(vars),
            vec![
                "SWITCHBOARD_PORT".to_owned(),
                "SWITCHBOARD_PYTHON".to_owned()
            ]
        );

        let e = Config::from_toml_and_env("[webhooks]\nurls = [\"http://x\"]\n", "t", [])
            .expect_err("no key");
        assert!(e.to_string().starts_with("webhooks.signing_key"), "{e}");
    }

    #[test]
    fn media_limits_are_bounded() {
        for (toml, key) in [
            ("max_routes = 10", "media.max_routes"),
            ("max_tcp_connections = 0", "media.max_tcp_connections"),
            (
                "max_tracks_per_participant = 0",
                "media.max_tracks_per_participant",
            ),
            ("max_mlines_per_offer = 0", "media.max_mlines_per_offer"),
            ("max_remote_candidates = 0", "media.max_remote_candidates"),
            ("max_sdp_bytes = 100", "media.max_sdp_bytes"),
            ("max_sdp_bytes = 2000000", "media.max_sdp_bytes"),
            (
                "max_tracks_per_participant = 20\nmax_mlines_per_offer = 10",
                "media.max_tracks_per_participant",
            ),
        ] {
            let e = Config::from_toml_and_env(&format!("[media]\n{toml}\n"), "t", [])
                .expect_err("out of range");
            assert!(e.to_string().starts_with(key), "{toml}: {e}");
        }
        let c = Config::from_toml_and_env(
            "[media]\nmax_tracks_per_participant = 2\nmax_sdp_bytes = 1024\n",
            "t",
            [],
        )
        .expect("valid");
        assert_eq!(c.media.max_tracks_per_participant, 2);
    }

    #[test]
    fn the_secret_and_dev_mode_are_checked_together() {
        let mut c = Config::default();
        let e = c.check_mode(false, false).expect_err("no secret");
        assert!(e.to_string().starts_with("auth.secret: not set"), "{e}");
        c.auth.secret = "integration-test-secret".into();
        let e = c.check_mode(false, false).expect_err("23 bytes");
        assert!(e.to_string().contains("at least 32 bytes, got 23"), "{e}");
        c.auth.secret = "x".repeat(32);
        c.check_mode(false, false).expect("32 bytes");
        // Dev mode with a real secret: refused.
        let e = c.check_mode(true, true).expect_err("dev with a secret");
        assert!(e.to_string().contains("/v1/dev/token"), "{e}");
        c.auth.secret.clear();
        c.check_mode(true, false).expect("dev on loopback");
        c.auth.secret = crate::auth::DEV_SECRET.into();
        c.check_mode(true, false)
            .expect("the public dev secret itself");
        c.server.listen = "0.0.0.0:7880".parse().expect("addr");
        let e = c.check_mode(true, false).expect_err("dev on 0.0.0.0");
        assert!(e.to_string().contains("--dev-allow-remote"), "{e}");
        c.check_mode(true, true).expect("explicitly allowed");
        c.server.listen = "[::1]:7880".parse().expect("addr");
        c.check_mode(true, false).expect("::1 is loopback");
    }

    #[test]
    fn http_auth_and_webhook_limits_are_bounded() {
        for (text, key) in [
            (
                "[http]\nheader_read_timeout = 0\n",
                "http.header_read_timeout",
            ),
            ("[http]\nidle_timeout = 0\n", "http.idle_timeout"),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
            ("[auth]\nmax_token_ttl = 10\n", "auth.max_token_ttl"),
            ("[webhooks]\nmax_attempts = 0\n", "webhooks.max_attempts"),
            (
                "[signaling]\ninvitations_per_minute = 5\n",
                "signaling.invitations_per_minute",
            ),
            (
                "[signaling]\nreinvite_cooldown = 100000\n",
                "signaling.reinvite_cooldown",
            ),
            ("[webhooks]\nmax_age = 1\n", "webhooks.max_age"),
            ("[turn]\nttl = 10\n", "turn.ttl"),
            (
                "[turn]\nurls = [\"http://t\"]\nsecret = \"s\"\n",
                "turn.urls",
            ),
            ("[turn]\nurls = [\"turn:\"]\nsecret = \"s\"\n", "turn.urls"),
            ("[turn]\nurls = [\"turn:t:3478\"]\n", "turn.secret"),
        ] {
            let e = Config::from_toml_and_env(text, "t", []).expect_err(key);
            assert!(e.to_string().starts_with(key), "{e}");
        }
        let c =
            Config::from_toml_and_env("", "t", env(&[("SWITCHBOARD_HTTP_MAX_CONNECTIONS", "7")]))
                .expect("valid");
        assert_eq!(c.http.max_connections, 7);
    }

    #[test]
    fn tiers_must_rise_and_end_unbounded() {
        let bad =
            "[billing]\ntiers = [{name=\"audio\",max_pixels=0},{name=\"hd\",max_pixels=10}]\n";
        let e = Config::from_toml_and_env(bad, "t", []).expect_err("bounded last tier");
        assert!(e.to_string().starts_with("billing.tiers"), "{e}");
        let bad = "[billing]\ntiers = [{name=\"audio\",max_pixels=0},{name=\"a\",max_pixels=10},{name=\"b\",max_pixels=5},{name=\"c\"}]\n";
        assert!(Config::from_toml_and_env(bad, "t", []).is_err());
    }
}
