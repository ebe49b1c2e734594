//! The `switchboard` binary: `serve`, `token`, and the operator tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use switchboard::auth::{DEV_SECRET, TokenAuthority, parse_ttl};
use switchboard::config::{Config, LogFormat};
use switchboard::ids::UserId;
use switchboard::server::{Options, Server};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A self-hosted calling server: call invitations, an SFU, and billing by resolution tier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML). Every key can also be set as SWITCHBOARD_<SECTION>_<KEY>.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Development mode: a fixed, public development secret, storage under ./data, dev tokens at
    /// POST /v1/dev/token. Never use it for a server others can reach.
    #[arg(long)]
    dev: bool,
    /// With --dev: allow a listen address other than loopback (127.0.0.1, ::1). Anyone who reaches
    /// the server can then mint tokens for any user.
    #[arg(long, requires = "dev")]
    dev_allow_remote: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ConfigArgs),
    /// Print an access token signed with the configured secret.
    Token {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The user ID (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Grant the admin API.
        #[arg(long)]
        admin: bool,
    },
    /// Put a real load on a running server and report what was measured.
    Loadtest(LoadtestArgs),
    /// Create or migrate the database schema ([storage] path or url) and exit. `serve` does the same
    /// at start; this lets an operator do it first, with the server stopped or running.
    Migrate(ConfigArgs),
    /// Billing reports from the usage ledger.
    Billing {
        #[command(subcommand)]
        command: BillingCommand,
    },
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Usage per (user, tier) and per (call, user, tier) over a period, with billable minutes. Reads the
    /// database at [storage] path or url (safe while the server runs; segments still running on the
    /// server are included up to their last checkpoint).
    Report {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Start of the period: 2026-11-01 (UTC), 2026-11-01T12:00:00Z, or epoch ms. Default: the
        /// start of this month.
        #[arg(long)]
        from: Option<String>,
        /// End of the period (exclusive). Default: now.
        #[arg(long)]
        to: Option<String>,
        /// Only this call.
        #[arg(long)]
        call_id: Option<String>,
        /// Only this user.
        #[arg(long)]
        user_id: Option<String>,
        /// json or csv.
        #[arg(long, default_value = "json")]
        format: String,
        /// CSV table: per `call` (call, user, tier) or per `user` (user, tier).
        #[arg(long, default_value = "call")]
        group: String,
    },
}

#[derive(Args)]
struct LoadtestArgs {
    /// What to load: `media` (rooms of publishers and subscribers, the default) or `signaling`
    /// (invite → accept → end cycles, idle sessions).
    #[arg(long, default_value = "media")]
    scenario: String,
    /// The server's HTTP address. Signaling: several, comma-separated, for a cluster's nodes (each
    /// call's caller on one, its callee on the next).
    #[arg(long, default_value = "http://127.0.0.1:7880")]
    url: String,
    /// Media: the node whose /metrics give the server's CPU and forwarded packets (in a cluster,
    /// the rooms' node; default: --url).
    #[arg(long)]
    metrics_url: Option<String>,
    /// The server's token secret (the load generator mints its own tokens). Defaults to the dev
    /// secret, for a server started with --dev.
    #[arg(long, env = "SWITCHBOARD_AUTH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// How long to measure: 30s, 2m.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Media: rooms (calls).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Media: publishers per room (each also receives the other publishers).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Media: subscribe-only participants per room (a room holds at most 10 users).
    #[arg(long, default_value_t = 2)]
    subscribers: usize,
    /// Media: the video each publisher sends, WIDTHxHEIGHT@FPS:BITRATE, or `none`.
    #[arg(long, default_value = "1280x720@30:1500k")]
    video: String,
    /// Media: send three simulcast layers (quarter, half, full resolution).
    #[arg(long)]
    simulcast: bool,
    /// Media: also send Opus audio (20 ms packets with audio levels).
    #[arg(long)]
    audio: bool,
    /// Media: spread the joins over this long (0 = all at once).
    #[arg(long, default_value = "0")]
    ramp: String,
    /// Media: decrypt and time one received packet in this many (1 = every packet). Every
    /// packet is counted for loss either way.
    #[arg(long, default_value_t = 1)]
    verify_every: u32,
    /// Media: the address the simulated peers bind.
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// Media: no progress bar.
    #[arg(long)]
    quiet: bool,
    /// Media: what serves the rooms: `switchboard` (signaling and /metrics at --url), `janus`
    /// (Janus VideoRoom, its HTTP API at --url) or `relay` (the plain UDP relay at --url,
    /// host:port).
    #[arg(long, default_value = "switchboard")]
    target: String,
    /// Media, janus and relay targets: the server's process ID, for its CPU time and memory
    /// (from /proc); Switchboard's come from its /metrics.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Run the plain UDP relay on this address until interrupted, instead of a load.
    #[arg(long, value_name = "ADDR")]
    serve_relay: Option<std::net::SocketAddr>,
    /// Signaling: warm-up before measuring.
    #[arg(long, default_value = "2s")]
    warmup: String,
    /// Signaling: caller/callee pairs cycling concurrently.
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Signaling: idle sessions to hold open (server memory per session is reported).
    #[arg(long, default_value_t = 0)]
    idle: usize,
}

/// The configuration for `serve` (`serving`: the listen address matters) or `token`.
fn load_config(args: &ConfigArgs, serving: bool) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    // A short secret, --dev with a real secret, --dev on a non-loopback address: refused.
    config
        .check_mode(args.dev, args.dev_allow_remote || !serving)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    if args.dev {
        config.auth.secret = DEV_SECRET.to_owned();
    }
    Ok(config)
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG wins when set and not empty; otherwise [log] level.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&config.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn serve(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load_config(&args, true)?;
    init_logging(&config);
    for name in switchboard::config::ignored_env(std::env::vars()) {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no configuration section");
    }
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let local = listener.local_addr()?;
    if args.dev {
        print_dev_banner(&local.to_string(), args.dev_allow_remote);
    }
    let server = Server::start(config, Options { dev: args.dev }).await?;
    tracing::info!(http = %local, "switchboard is serving");
    server.serve(listener, shutdown_signal()).await?;
    tracing::info!("switchboard stopped");
    Ok(())
}

fn print_dev_banner(addr: &str, remote: bool) {
    if remote {
        eprintln!(
            "\n  --dev-allow-remote: this development server listens on {addr}, beyond loopback.\n  \
             Anyone who reaches it can mint tokens for any user at POST /v1/dev/token."
        );
    }
    eprintln!(
        "\n  ************************************************************************\n  \
         *  DEVELOPMENT MODE: tokens are signed with a fixed, public dev secret. *\n  \
         *  Never expose this server to anyone else.                            *\n  \
         ************************************************************************\n\n  \
         Open http://{addr}/ in two browser windows and call yourself.\n  \
         Get a token:  curl -s -XPOST http://{addr}/v1/dev/token -d '{{\"user_id\":\"alice\"}}' \
         -H 'content-type: application/json'\n  \
         or:           cargo run --release -- token --dev --user alice\n"
    );
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}

fn token(
    cfg: ConfigArgs,
    user: String,
    name: Option<String>,
    ttl: String,
    admin: bool,
) -> anyhow::Result<()> {
    let config = load_config(&cfg, false)?;
    let user = UserId::parse(&user).map_err(|e| anyhow::anyhow!("--user {e}"))?;
    let ttl = parse_ttl(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let max = config.auth.max_token_ttl;
    if ttl > max {
        bail!(
            "--ttl: {ttl} s is longer than auth.max_token_ttl ({max} s): the server would refuse it"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let t = TokenAuthority::new(&config.auth.secret).issue(&user, name.as_deref(), admin, now, ttl);
    println!("{t}");
    Ok(())
}

/// A duration like 10s or 2m; "0" is zero.
fn parse_duration(what: &str, s: &str) -> anyhow::Result<std::time::Duration> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    Ok(std::time::Duration::from_secs(
        parse_ttl(s).map_err(|e| anyhow::anyhow!("--{what}: {e}"))?,
    ))
}

async fn loadtest(args: LoadtestArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use switchboard::loadtest::{media, signaling, synth::VideoSpec};
    let duration = parse_duration("duration", &args.duration)?;
    let secret = args.secret.unwrap_or_else(|| DEV_SECRET.to_owned());
    if let Some(addr) = args.serve_relay {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let relay =
            tokio::task::spawn_blocking(move || switchboard::loadtest::relay::serve(addr, &s2));
        eprintln!("plain UDP relay on {addr}");
        shutdown_signal().await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let forwarded = relay.await??;
        eprintln!("relay forwarded {forwarded} datagrams");
        return Ok(());
    }
    match args.scenario.as_str() {
        "media" => {
            let video = match args.video.as_str() {
                "none" => None,
                v => Some(VideoSpec::parse(v).map_err(|e| anyhow::anyhow!("--video: {e}"))?),
            };
            let cfg = media::MediaLoad {
                metrics_url: args.metrics_url.clone().unwrap_or_else(|| args.url.clone()),
                url: args.url,
                secret,
                rooms: args.rooms,
                publishers: args.publishers,
                subscribers: args.subscribers,
                video,
                simulcast: args.simulcast,
                audio: args.audio,
                duration,
                ramp: parse_duration("ramp", &args.ramp)?,
                verify_every: args.verify_every.max(1),
                bind_ip: args.bind_ip,
                progress: !args.quiet && !args.json && std::io::stderr().is_terminal(),
            };
            let report = match args.target.as_str() {
                "switchboard" => media::run(cfg).await?,
                "relay" => {
                    let pid = args.server_pid;
                    tokio::task::spawn_blocking(move || {
                        switchboard::loadtest::relay::run(&cfg, pid)
                    })
                    .await?
                    .map_err(|e| anyhow::anyhow!(e))?
                }
                "janus" => switchboard::loadtest::janus::run(cfg, args.server_pid).await?,
                other => bail!("unknown --target {other:?}: use switchboard, janus or relay"),
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        "signaling" => {
            let report = signaling::run(signaling::SignalingLoad {
                url: args.url,
                secret,
                pairs: args.pairs,
                idle: args.idle,
                duration,
                warmup: parse_duration("warmup", &args.warmup)?,
            })
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        other => bail!("unknown --scenario {other:?}: use media or signaling"),
    }
}

fn billing_report(
    cfg: ConfigArgs,
    from: Option<String>,
    to: Option<String>,
    call_id: Option<String>,
    user_id: Option<String>,
    format: &str,
    group: &str,
) -> anyhow::Result<()> {
    use switchboard::billing::report::{ReportQuery, build, month_start, parse_time};
    let config = Config::load(cfg.config.as_deref(), std::env::vars())
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let from = match from {
        Some(f) => parse_time(&f).map_err(|e| anyhow::anyhow!("--from: {e}"))?,
        None => month_start(now),
    };
    let to = match to {
        Some(t) => parse_time(&t).map_err(|e| anyhow::anyhow!("--to: {e}"))?,
        None => now,
    };
    if to <= from {
        bail!("--to must be after --from");
    }
    let call_id = call_id
        .map(|c| switchboard::ids::CallId::parse(&c))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--call-id {e}"))?;
    let user_id = user_id
        .map(|u| UserId::parse(&u))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--user-id {e}"))?;
    if switchboard::storage::backend_of(&config.storage.url)? == switchboard::storage::Kind::Sqlite
        && !config.storage.path.exists()
    {
        bail!(
            "no database at {} (storage.path)",
            config.storage.path.display()
        );
    }
    let mut store = switchboard::storage::Store::connect(&config.storage)?;
    let rows = store.usage(from, to, call_id.as_ref(), user_id.as_ref())?;
    let report = build(
        &rows,
        &ReportQuery {
            from_ms: from,
            to_ms: to,
            call_id,
            user_id,
        },
    );
    match (format, group) {
        ("json", _) => println!("{}", serde_json::to_string_pretty(&report)?),
        ("csv", "call") => print!("{}", report.calls_csv()),
        ("csv", "user") => print!("{}", report.users_csv()),
        ("csv", g) => bail!("--group {g:?}: use call or user"),
        (f, _) => bail!("--format {f:?}: use json or csv"),
    }
    Ok(())
}

fn migrate(cfg: ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(cfg.config.as_deref(), std::env::vars())
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let mut store = switchboard::storage::Store::connect(&config.storage)?;
    let version = store.schema_version()?;
    let where_ = match store.backend() {
        "sqlite" => config.storage.path.display().to_string(),
        _ => "storage.url".to_owned(),
    };
    println!(
        "{} database ({where_}): schema version {version} (this build knows {})",
        store.backend(),
        store.known_schema_version()
    );
    Ok(())
}

fn raise_fd_limit() {
    // Every session is a socket; allow as many as the hard limit permits.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    let result = match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(serve(args))),
        Command::Token {
            cfg,
            user,
            name,
            ttl,
            admin,
        } => token(cfg, user, name, ttl, admin),
        Command::Billing {
            command:
                BillingCommand::Report {
                    cfg,
                    from,
                    to,
                    call_id,
                    user_id,
                    format,
                    group,
                },
        } => billing_report(cfg, from, to, call_id, user_id, &format, &group),
        Command::Migrate(cfg) => migrate(cfg),
        Command::Loadtest(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(loadtest(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
