//! ICE-TCP (RFC 6544): the passive TCP candidate's listener, RFC 4571 framing, and the bounded
//! per-connection write queues.
//!
//! A client whose network blocks UDP connects to `[media] tcp_port` and sends its ICE checks,
//! DTLS and SRTP as RFC 4571 frames (a 16-bit big-endian length, then the packet). One TCP
//! connection carries one client peer connection. Routing mirrors the UDP path of
//! [`super::net`]: the first frame must be a STUN binding request, whose server ufrag names the
//! worker (its first four hex digits); every frame of that TCP connection then goes to that
//! worker, tagged with the connection's remote address and [`Protocol::Tcp`], and the worker's
//! str0m connection checks the ufrag and MESSAGE-INTEGRITY as it does for UDP.
//!
//! Bounds: at most `[media] max_tcp_connections` at once (more are closed at accept); a frame
//! over [`MAX_FRAME`] closes the connection; the first binding request must come within
//! [`FIRST_FRAME_TIMEOUT`]; a connection that sends nothing for [`IDLE_TIMEOUT`] is closed (a
//! live client sends consent checks every few seconds). Toward the client, a worker never waits:
//! it `try_send`s onto a queue of [`WRITE_QUEUE`] packets and drops (and counts) what does not
//! fit, as a full UDP socket would; a write that makes no progress for [`WRITE_STALL`] closes
//! the connection. A slow TCP client so loses its own packets and never stalls a worker.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use str0m::net::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::WorkerMsg;
use super::net::{self, DatagramBatch};

/// Largest frame accepted from a client (the UDP path's largest datagram).
pub(crate) const MAX_FRAME: usize = 2048;
/// Packets queued toward one client before further ones are dropped.
pub(crate) const WRITE_QUEUE: usize = 512;
/// A write to the client that makes no progress this long closes the connection.
pub(crate) const WRITE_STALL: Duration = Duration::from_secs(10);
/// The first frame (a binding request) must arrive within this.
pub(crate) const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with nothing from the client for this long is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches a worker may have queued before frames for it are dropped (as on the UDP path).
const MAX_BACKLOG: u64 = 256;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 4096;

/// Queues toward ICE-TCP clients, by the client's address: workers look a transmit's destination
/// up here. An entry lives while its connection does; a worker removes the entries of a
/// connection it closes, which closes the TCP connection too.
/// Each entry carries its connection's serial, so that a closing connection removes only its own.
pub(crate) type TcpWriters = DashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)>;

/// Why a frame stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A frame of length 0 or over [`MAX_FRAME`].
    BadLength(usize),
}

/// Splits an RFC 4571 byte stream into frames. Pure: feed it what the socket read.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Appends `data` and returns the byte ranges (in [`FrameReader::buffer`]) of every complete
    /// frame, in order. Call [`FrameReader::consume`] after using them.
    pub(crate) fn push(&mut self, data: &[u8]) -> Result<Vec<(usize, usize)>, FrameError> {
        self.buf.extend_from_slice(data);
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some(hdr) = self.buf.get(at..at + 2) {
            let len = usize::from(u16::from_be_bytes([hdr[0], hdr[1]]));
            if len == 0 || len > MAX_FRAME {
                return Err(FrameError::BadLength(len));
            }
            if self.buf.len() < at + 2 + len {
                break;
            }
            frames.push((at + 2, len));
            at += 2 + len;
        }
        Ok(frames)
    }

    /// The bytes the ranges of [`FrameReader::push`] index.
    pub(crate) fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the complete frames just returned, keeping a partial one.
    pub(crate) fn consume(&mut self, frames: &[(usize, usize)]) {
        if let Some((start, len)) = frames.last() {
            self.buf.drain(..start + len);
        }
    }

    /// Bytes held of an incomplete frame (at most 2 + [`MAX_FRAME`] + one read).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// RFC 4571 framing of one outgoing packet.
pub(crate) fn frame(packet: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(packet.len()).ok()?;
    let mut v = Vec::with_capacity(packet.len() + 2);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(packet);
    Some(v)
}

/// Binds the ICE-TCP listener on `[media] bind`:`tcp_port`.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<StdListener> {
    let l = StdListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The ICE-TCP plane: its own thread with a single-threaded runtime, so that media never
/// competes with signaling for the main runtime.
pub(crate) struct TcpPlane {
    pub listener: StdListener,
    pub workers: Vec<std_mpsc::Sender<WorkerMsg>>,
    pub backlogs: Vec<Arc<AtomicU64>>,
    pub writers: Arc<TcpWriters>,
    pub stop: Arc<AtomicBool>,
    pub max_conns: usize,
    pub counters: Arc<TcpCounters>,
    pub restarted: Arc<net::UfragRoutes>,
}

/// ICE-TCP counters (also exported as metrics).
#[derive(Debug, Default)]
pub struct TcpCounters {
    /// TCP connections open now.
    pub open: AtomicUsize,
    /// Connections closed at accept because `max_tcp_connections` were open.
    pub refused: AtomicU64,
    /// Frames received from clients.
    pub frames_in: AtomicU64,
    /// Packets queued toward clients.
    pub frames_out: AtomicU64,
    /// Packets dropped because a client's queue was full (a slow TCP client).
    pub dropped_slow: AtomicU64,
}

struct Shared {
    restarted: Arc<net::UfragRoutes>,
    workers: Vec<std_mpsc::Sender<WorkerMsg>>,
    backlogs: Vec<Arc<AtomicU64>>,
    writers: Arc<TcpWriters>,
    counters: Arc<TcpCounters>,
}

impl TcpPlane {
    pub(crate) fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "ICE-TCP runtime failed to start");
                return;
            }
        };
        let TcpPlane {
            listener,
            workers,
            backlogs,
            writers,
            stop,
            max_conns,
            counters,
            restarted,
        } = self;
        let shared = Arc::new(Shared {
            restarted,
            workers,
            backlogs,
            writers,
            counters,
        });
        rt.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "ICE-TCP listener failed");
                    return;
                }
            };
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut serial = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else { continue };
                        if shared.counters.open.load(Ordering::Relaxed) >= max_conns {
                            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(crate::metrics::TCP_REFUSED).increment(1);
                            drop(stream);
                            continue;
                        }
                        shared.counters.open.fetch_add(1, Ordering::Relaxed);
                        metrics::gauge!(crate::metrics::TCP_CONNECTIONS).increment(1.0);
                        let shared = shared.clone();
                        serial += 1;
                        tokio::spawn(async move {
                            connection(&shared, stream, peer, serial).await;
                            shared.counters.open.fetch_sub(1, Ordering::Relaxed);
                            metrics::gauge!(crate::metrics::TCP_CONNECTIONS).decrement(1.0);
                        });
                    }
                }
            }
        });
    }
}

async fn connection(shared: &Shared, stream: TcpStream, peer: SocketAddr, serial: u64) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    // The queue's only lasting sender is this connection's entry in `writers`: when a worker
    // closes its connection it removes the entry, the queue closes, and the writer ends, which
    // ends reading too.
    shared.writers.insert(peer, (serial, tx));
    let mut writer = tokio::spawn(async move {
        while let Some(packet) = rx.recv().await {
            match tokio::time::timeout(WRITE_STALL, wr.write_all(&packet)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut frames = FrameReader::default();
    let mut worker: Option<usize> = None;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let wait = if worker.is_some() {
            IDLE_TIMEOUT
        } else {
            FIRST_FRAME_TIMEOUT
        };
        let n = tokio::select! {
            r = tokio::time::timeout(wait, rd.read(&mut chunk)) => match r {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            },
            _ = &mut writer => {
                remove(&shared.writers, peer, serial);
                return;
            }
        };
        let Some(data) = chunk.get(..n) else { break };
        let Ok(ranges) = frames.push(data) else {
            tracing::debug!(%peer, "ICE-TCP frame of a bad length; closing");
            break;
        };
        if ranges.is_empty() {
            continue;
        }
        let buf = frames.buffer();
        if worker.is_none() {
            // The first frame must be a binding request that names a worker.
            let first = ranges.first().and_then(|(s, l)| buf.get(*s..s + l));
            match first
                .and_then(net::stun_local_ufrag)
                .and_then(|u| net::worker_for(u, &shared.restarted))
            {
                Some(w) if w < shared.workers.len() => worker = Some(w),
                _ => {
                    tracing::debug!(%peer, "ICE-TCP connection did not start with a binding request");
                    break;
                }
            }
        }
        let Some(w) = worker else { break };
        shared
            .counters
            .frames_in
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        let (Some(backlog), Some(wtx)) = (shared.backlogs.get(w), shared.workers.get(w)) else {
            break;
        };
        if backlog.load(Ordering::Relaxed) < MAX_BACKLOG {
            let mut batch = DatagramBatch {
                buf: Vec::with_capacity(ranges.iter().map(|r| r.1).sum()),
                items: Vec::with_capacity(ranges.len()),
                at: Instant::now(),
                proto: Protocol::Tcp,
            };
            for (s, l) in &ranges {
                if let Some(d) = buf.get(*s..s + l) {
                    let start = batch.buf.len();
                    batch.buf.extend_from_slice(d);
                    batch.items.push((peer, start, *l));
                }
            }
            backlog.fetch_add(1, Ordering::Relaxed);
            if wtx.send(WorkerMsg::Datagrams(batch)).is_err() {
                backlog.fetch_sub(1, Ordering::Relaxed);
                break;
            }
        } else {
            metrics::counter!(crate::metrics::PACKETS_DROPPED, "reason" => "worker_backlog")
                .increment(ranges.len() as u64);
        }
        frames.consume(&ranges);
    }
    // Reading ended: close the queue (the writer flushes what it holds, then shuts down).
    remove(&shared.writers, peer, serial);
    let _ = writer.await;
}

fn remove(writers: &TcpWriters, peer: SocketAddr, serial: u64) {
    writers.remove_if(&peer, |_, (s, _)| *s == serial);
}

/// Queues `packet` toward the ICE-TCP client at `dest`. Never waits: a full queue (a slow
/// client) or an unknown address drops the packet; returns whether it was queued.
pub(crate) fn send(
    writers: &TcpWriters,
    counters: &TcpCounters,
    dest: SocketAddr,
    packet: &[u8],
) -> bool {
    let Some(w) = writers.get(&dest) else {
        return false;
    };
    let (_, w) = &*w;
    let Some(f) = frame(packet) else {
        return false;
    };
    match w.try_send(f) {
        Ok(()) => {
            counters.frames_out.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(_) => {
            counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::TCP_DROPPED_SLOW).increment(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_and_several_in_one_read() {
        let mut r = FrameReader::default();
        let mut stream = Vec::new();
        for p in [&b"abc"[..], b"de", &[7u8; 300]] {
            stream.extend(frame(p).expect("frame"));
        }
        // One byte at a time: each frame comes out once, whole, in order.
        let mut got: Vec<Vec<u8>> = Vec::new();
        for b in &stream {
            let ranges = r.push(std::slice::from_ref(b)).expect("valid");
            for (s, l) in &ranges {
                got.push(r.buffer()[*s..s + l].to_vec());
            }
            r.consume(&ranges);
        }
        assert_eq!(got, vec![b"abc".to_vec(), b"de".to_vec(), vec![7u8; 300]]);
        assert_eq!(r.pending(), 0);
        // All at once, plus half of a fourth frame that stays pending.
        let mut all = stream.clone();
        all.extend_from_slice(&[0, 5, b'x']);
        let ranges = r.push(&all).expect("valid");
        assert_eq!(ranges.len(), 3);
        r.consume(&ranges);
        assert_eq!(r.pending(), 3);
        let ranges = r.push(b"yzwv").expect("valid");
        assert_eq!(ranges.len(), 1);
        assert_eq!(&r.buffer()[ranges[0].0..ranges[0].0 + 5], b"xyzwv");
    }

    #[test]
    fn a_zero_or_oversized_frame_is_refused() {
        let mut r = FrameReader::default();
        assert_eq!(r.push(&[0, 0]), Err(FrameError::BadLength(0)));
        let mut r = FrameReader::default();
        let big = (MAX_FRAME as u16 + 1).to_be_bytes();
        assert_eq!(r.push(&big), Err(FrameError::BadLength(MAX_FRAME + 1)));
        // The largest allowed frame is fine.
        let mut r = FrameReader::default();
        let ok = frame(&vec![1u8; MAX_FRAME]).expect("frame");
        assert_eq!(r.push(&ok).expect("valid").len(), 1);
        assert!(
            frame(&vec![0u8; 70_000]).is_none(),
            "over 16 bits cannot be framed"
        );
    }

    #[test]
    fn sending_never_waits_and_drops_past_the_queue() {
        let writers = TcpWriters::default();
        let counters = TcpCounters::default();
        let dest: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        assert!(
            !send(&writers, &counters, dest, b"x"),
            "no connection: dropped"
        );
        let (tx, mut rx) = mpsc::channel(WRITE_QUEUE);
        writers.insert(dest, (1, tx));
        for _ in 0..WRITE_QUEUE {
            assert!(send(&writers, &counters, dest, b"pkt"));
        }
        assert!(
            !send(&writers, &counters, dest, b"pkt"),
            "a full queue drops"
        );
        assert_eq!(counters.dropped_slow.load(Ordering::Relaxed), 1);
        assert_eq!(rx.try_recv().expect("queued"), vec![0, 3, b'p', b'k', b't']);
    }
}
