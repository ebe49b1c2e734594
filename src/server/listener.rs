//! The HTTP accept loop: what one TCP connection may hold of the server, and for how long
//! (`[http]` in the configuration).
//!
//! - **A cap on open connections.** Each accepted connection takes a permit of a semaphore of
//!   `max_connections`; the permit lives in the connection's I/O object, so a connection upgraded to
//!   a WebSocket session keeps holding it until the socket closes. When no permit is left, the new
//!   connection is answered a fixed 503 (best effort, one non-blocking write) and closed at once: it
//!   never reaches hyper, a handler or a timer.
//! - **A header-read timeout** (hyper's, with a Tokio timer): a request head must be complete within
//!   `header_read_timeout` of the server starting to wait for it (the connection's opening, or the end
//!   of the previous response), so half a header (slowloris) or an idle kept-alive connection is
//!   closed.
//! - **An idle timeout** ([`GuardedIo`]): while the connection is still HTTP, a read or write that
//!   makes no progress for `idle_timeout` fails, which closes the connection (a stalled body upload, a
//!   client that stops reading a response, a 101 nobody takes). After a WebSocket upgrade the session's
//!   heartbeat governs instead: a session silent for twice the heartbeat is closed.
//!
//! Graceful shutdown is axum's: when the shutdown future resolves, accepting stops, every connection
//! is asked to finish its request in flight and close, and [`serve`] returns when all have (upgraded
//! WebSockets are no longer HTTP connections; their sessions watch the server's own shutdown signal).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

use crate::config::HttpConfig;
use crate::metrics as m;

/// The answer to a connection over the cap.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
connection: close\r\n\
content-length: 82\r\n\
\r\n\
{\"error\":{\"code\":\"unavailable\",\"message\":\"too many connections; try again later\"}}";

/// Limits of one listener, from `[http]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`HttpConfig::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`HttpConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`HttpConfig::max_connections`].
    pub max_connections: usize,
}

impl From<&HttpConfig> for Limits {
    fn from(c: &HttpConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(c.header_read_timeout),
            idle_timeout: Duration::from_secs(c.idle_timeout),
            max_connections: c.max_connections,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the connections still serving a
/// request finish and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a receiver: `send` asks them to finish, `closed` waits for them.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or the peer gave up before accept: wait a little, go on.
                if !is_connection_error(&e) {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refuse(tcp);
            continue;
        };
        // Signaling frames are small and latency-bound: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let io = GuardedIo::new(tcp, permit, limits.idle_timeout);
        tokio::spawn(connection(io, remote, app.clone(), limits, stop_rx.clone()));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

/// Errors of `accept` that concern one connection only.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection over the cap: a 503 if the socket takes it at once, then closed.
fn refuse(tcp: TcpStream) {
    metrics::counter!(m::HTTP_CONNECTIONS_REFUSED).increment(1);
    let _ = tcp.try_write(REFUSAL);
    drop(tcp);
}

/// Serves one connection with hyper until it closes, is upgraded, or the server stops.
async fn connection(
    io: GuardedIo,
    remote: SocketAddr,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let upgraded = Arc::clone(&io.upgraded);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        use tower_service::Service as _;
        req.extensions_mut().insert(ConnectInfo(remote));
        // Router is always ready and its error is Infallible.
        let mut app = app.clone();
        app.call(req.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                match r {
                    Ok(()) => {}
                    Err(e) if e.is_timeout() => {
                        metrics::counter!(m::HTTP_TIMEOUTS, "kind" => "header").increment(1);
                    }
                    Err(e) => tracing::debug!(error = %e, %remote, "HTTP connection ended"),
                }
                break;
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    // If the connection became a WebSocket, its I/O lives on in the session: no idle timer there.
    upgraded.store(true, Ordering::Release);
}

/// A TCP stream that holds a connection permit and fails a read or write that makes no progress for
/// `idle` while the connection is HTTP (until `upgraded` is set).
pub struct GuardedIo {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    /// The last time a byte moved either way.
    last_progress: Instant,
    /// Made when a read or write first waits (and dropped after an upgrade): an idle WebSocket
    /// session carries no timer of its own here.
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
    /// Set when hyper is done with the connection (it was upgraded, or it is closing).
    upgraded: Arc<AtomicBool>,
}

impl GuardedIo {
    fn new(tcp: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        metrics::gauge!(m::HTTP_CONNECTIONS).increment(1.0);
        let now = Instant::now();
        Self {
            tcp,
            _permit: permit,
            idle,
            last_progress: now,
            read_timer: None,
            write_timer: None,
            upgraded: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Called when an operation is pending: fails it once the connection has been idle too long.
    fn check_idle(
        timer: &mut Option<Pin<Box<Sleep>>>,
        deadline: Instant,
        upgraded: &AtomicBool,
        cx: &mut Context<'_>,
    ) -> Poll<io::Error> {
        if upgraded.load(Ordering::Acquire) {
            *timer = None;
            return Poll::Pending;
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!(m::HTTP_TIMEOUTS, "kind" => "idle").increment(1);
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP connection idle for [http] idle_timeout",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for GuardedIo {
    fn drop(&mut self) {
        metrics::gauge!(m::HTTP_CONNECTIONS).decrement(1.0);
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last_progress = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = this.last_progress + this.idle;
                Self::check_idle(&mut this.read_timer, deadline, &this.upgraded, cx).map(Err)
            }
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write(cx, data) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.last_progress = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = this.last_progress + this.idle;
                Self::check_idle(&mut this.write_timer, deadline, &this.upgraded, cx).map(Err)
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.last_progress = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = this.last_progress + this.idle;
                Self::check_idle(&mut this.write_timer, deadline, &this.upgraded, cx).map(Err)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
