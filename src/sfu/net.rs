//! The one UDP socket: binding, host candidates, the I/O thread (batched `recvmmsg` and routing
//! to workers) and batched `sendmmsg`.
//!
//! Routing invariant: the I/O thread alone owns the address → worker table
//! ([`super::routes::RouteTable`]). A STUN binding request is routed by the server ufrag in its
//! USERNAME (which starts with the owning worker's index in four hex digits) and writes nothing;
//! an entry is learned only when a worker reports that a connection accepted a binding request
//! from that address ([`IoMsg::Learn`]), and forgotten when the worker closes the connection
//! ([`IoMsg::Forget`]) or after [`super::routes::ROUTE_IDLE`] without traffic. Anything else from
//! an unknown address is dropped.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::routes::{Confirmed, ROUTE_IDLE, RouteTable};
use super::{Counters, WorkerMsg};
use crate::config::MediaConfig;
use crate::mmsg::sockaddr_to_std;

/// Datagrams read per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// Largest datagram accepted.
const MAX_DATAGRAM: usize = 2048;
/// Batches a worker may have queued before the I/O thread drops new ones for it.
const MAX_BACKLOG: u64 = 256;

/// How often the I/O thread drops idle routes.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Messages to the I/O thread.
pub(crate) enum IoMsg {
    /// A connection of `worker` accepted a binding request from `addr` (ufrag and
    /// MESSAGE-INTEGRITY checked): route that address's datagrams there.
    Learn { worker: usize, addr: SocketAddr },
    /// `worker` closed the connection that used these source addresses.
    Forget {
        worker: usize,
        addrs: Vec<SocketAddr>,
    },
}

/// Datagrams for one worker from one `recvmmsg` round, in one buffer.
pub(crate) struct DatagramBatch {
    /// Concatenated payloads.
    pub buf: Vec<u8>,
    /// Source and byte range of each datagram in `buf`.
    pub items: Vec<(SocketAddr, usize, usize)>,
    /// When the round's `recvmmsg` returned (or the TCP read, for ICE-TCP).
    pub at: Instant,
    /// UDP from the I/O thread, or TCP from an ICE-TCP connection (see [`super::tcp`]).
    pub proto: str0m::net::Protocol,
}

/// Binds the media socket with large kernel buffers and a read timeout (for shutdown checks).
pub(crate) fn bind(cfg: &MediaConfig) -> io::Result<UdpSocket> {
    let addr = SocketAddr::new(cfg.bind, cfg.udp_port);
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    // Best effort too: without receive stamps the `socket` stage goes unmeasured.
    if let Err(e) = crate::mmsg::enable_receive_stamps(std::os::fd::AsRawFd::as_raw_fd(&socket)) {
        tracing::warn!(error = %e, "no kernel receive timestamps on the media socket");
    }
    Ok(socket.into())
}

/// The addresses announced as host candidates: `public_ips`, else the bound address, else (for
/// an unspecified bind) every non-loopback interface address of the same family, falling back
/// to loopback.
pub(crate) fn host_candidates(cfg: &MediaConfig, local: SocketAddr) -> Vec<SocketAddr> {
    let port = local.port();
    if !cfg.public_ips.is_empty() {
        return cfg
            .public_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
    }
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let mut v: Vec<SocketAddr> = interface_addrs()
        .into_iter()
        .filter(|ip| ip.is_ipv4() == local.is_ipv4() && !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if v.is_empty() {
        let lo: IpAddr = if local.is_ipv4() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        };
        v.push(SocketAddr::new(lo, port));
    }
    v
}

fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family tells its size.
            let fam = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if fam == libc::AF_INET {
                // SAFETY: family AF_INET means sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if fam == libc::AF_INET6 {
                // SAFETY: family AF_INET6 means sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `ifap` came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// The server-side ufrag of a STUN binding request (the part of USERNAME before ':'), if the
/// datagram is one.
pub(crate) fn stun_local_ufrag(d: &[u8]) -> Option<&str> {
    // Header: type(2) length(2) cookie(4) transaction(12). Binding request = 0x0001.
    if d.len() < 20 || d.get(0..2)? != [0x00, 0x01] || d.get(4..8)? != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*d.get(2)?, *d.get(3)?]));
    let attrs = d.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let typ = u16::from_be_bytes([*attrs.get(i)?, *attrs.get(i + 1)?]);
        let alen = usize::from(u16::from_be_bytes([*attrs.get(i + 2)?, *attrs.get(i + 3)?]));
        let val = attrs.get(i + 4..i + 4 + alen)?;
        if typ == 0x0006 {
            let user = std::str::from_utf8(val).ok()?;
            return user.split(':').next();
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// Server ufrags that do not encode their worker: str0m picks fresh random credentials on an ICE
/// restart, so a worker registers a restarted connection's ufrag here (and removes it when the
/// connection closes or restarts again). At most one entry per connection.
pub(crate) type UfragRoutes = dashmap::DashMap<String, usize>;

/// The worker a binding request for server ufrag `ufrag` goes to: a restarted connection's
/// registered worker, else the one the ufrag's first four hex digits name.
pub(crate) fn worker_for(ufrag: &str, restarted: &UfragRoutes) -> Option<usize> {
    match restarted.get(ufrag) {
        Some(w) => Some(*w),
        None => worker_of_ufrag(ufrag),
    }
}

/// STUN attribute types this module writes or skips.
const ATTR_PRIORITY: u16 = 0x0024;
const ATTR_USE_CANDIDATE: u16 = 0x0025;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_FINGERPRINT: u16 = 0x8028;
/// The highest candidate priority ICE allows (2^31 - 1).
const TOP_PRIORITY: u32 = 0x7fff_ffff;

/// A binding request re-signed as a nomination of its own path: its attributes up to
/// MESSAGE-INTEGRITY, with PRIORITY raised to the highest value and USE-CANDIDATE set, then
/// MESSAGE-INTEGRITY (HMAC-SHA1 with `password`, the server's ICE password the client signed
/// with) and FINGERPRINT computed again. `None` if `d` is not a well-formed binding request.
///
/// This is how the worker follows a NAT rebinding (see `Worker::datagrams`): str0m, as ICE-lite,
/// switches its send path only to a nominated pair of higher priority, and the check from the
/// new port (a peer-reflexive candidate, lower priority than the host one, often without
/// USE-CANDIDATE) would otherwise wait 15 s for the old pair to expire. The caller has checked
/// the original's integrity first, so only the client that holds the credentials can move its
/// path.
pub(crate) fn promote_binding_request(d: &[u8], password: &[u8]) -> Option<Vec<u8>> {
    use hmac::{Hmac, Mac};
    if d.len() < 20 || d.get(0..2)? != [0x00, 0x01] || d.get(4..8)? != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*d.get(2)?, *d.get(3)?]));
    let attrs = d.get(20..20 + len)?;
    let mut out = Vec::with_capacity(d.len() + 32);
    out.extend_from_slice(d.get(..20)?);
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let typ = u16::from_be_bytes([*attrs.get(i)?, *attrs.get(i + 1)?]);
        let alen = usize::from(u16::from_be_bytes([*attrs.get(i + 2)?, *attrs.get(i + 3)?]));
        let padded = 4 + alen.div_ceil(4) * 4;
        let whole = attrs.get(i..i + padded)?;
        if typ == ATTR_MESSAGE_INTEGRITY || typ == ATTR_FINGERPRINT {
            break;
        }
        if typ != ATTR_PRIORITY && typ != ATTR_USE_CANDIDATE {
            out.extend_from_slice(whole);
        }
        i += padded;
    }
    out.extend_from_slice(&ATTR_PRIORITY.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&TOP_PRIORITY.to_be_bytes());
    out.extend_from_slice(&ATTR_USE_CANDIDATE.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    // MESSAGE-INTEGRITY covers the header with a length that counts it (RFC 8489 14.5).
    let with_mi = u16::try_from(out.len() - 20 + 24).ok()?;
    out.get_mut(2..4)?.copy_from_slice(&with_mi.to_be_bytes());
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(password).ok()?;
    mac.update(&out);
    let tag = mac.finalize().into_bytes();
    out.extend_from_slice(&ATTR_MESSAGE_INTEGRITY.to_be_bytes());
    out.extend_from_slice(&20u16.to_be_bytes());
    out.extend_from_slice(&tag);
    // FINGERPRINT: CRC-32 of everything before it, with the length counting it, XOR 0x5354554e.
    let with_fp = u16::try_from(out.len() - 20 + 8).ok()?;
    out.get_mut(2..4)?.copy_from_slice(&with_fp.to_be_bytes());
    let crc = crc32fast::hash(&out) ^ 0x5354_554e;
    out.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
    Some(out)
}

/// The worker index a server ufrag encodes (its first four hex digits).
pub(crate) fn worker_of_ufrag(ufrag: &str) -> Option<usize> {
    let hex = ufrag.get(0..4)?;
    usize::from_str_radix(hex, 16).ok()
}

/// Whether a datagram is STUN (RFC 7983: first byte 0..=3).
pub(crate) fn is_stun(d: &[u8]) -> bool {
    d.first().is_some_and(|b| *b < 4)
}

/// The thread that reads the socket and routes datagrams to workers.
pub(crate) struct IoThread {
    pub socket: Arc<UdpSocket>,
    pub workers: Vec<mpsc::Sender<WorkerMsg>>,
    pub backlogs: Vec<Arc<AtomicU64>>,
    pub control: mpsc::Receiver<IoMsg>,
    pub stop: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
    /// Most routes held (`[media] max_routes`).
    pub max_routes: usize,
    pub restarted: Arc<UfragRoutes>,
}

impl IoThread {
    pub(crate) fn run(self) {
        let fd = self.socket.as_raw_fd();
        let mut bufs = vec![[0u8; MAX_DATAGRAM]; RECV_BATCH];
        let n_workers = self.workers.len();
        let mut routes = RouteTable::new(n_workers, self.max_routes, ROUTE_IDLE)
            .with_restarted(self.restarted.clone());
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut reported_len = 0usize;
        let mut unroutable = 0u64;
        let mut dropped_backlog = 0u64;
        metrics::gauge!(crate::metrics::UDP_ROUTES).set(0.0);
        let mut ctrl = vec![[0u8; crate::mmsg::STAMP_CTRL_LEN]; RECV_BATCH];
        while !self.stop.load(Ordering::Relaxed) {
            // SAFETY: plain data, zero is valid.
            let mut addrs: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr() as *mut libc::c_void,
                    iov_len: MAX_DATAGRAM,
                })
                .collect();
            let mut msgs: [MaybeUninit<libc::mmsghdr>; RECV_BATCH] =
                [const { MaybeUninit::zeroed() }; RECV_BATCH];
            for (i, m) in msgs.iter_mut().enumerate() {
                // SAFETY: zeroed mmsghdr is valid plain data; we set its pointers.
                let h = unsafe { m.assume_init_mut() };
                h.msg_hdr.msg_name = &mut addrs[i] as *mut libc::sockaddr_storage as *mut _;
                h.msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut iovs[i] as *mut libc::iovec;
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = ctrl[i].as_mut_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_controllen = crate::mmsg::STAMP_CTRL_LEN as _;
            }
            // SAFETY: msgs points to RECV_BATCH initialized headers with valid buffers. The
            // blocking call returns after the socket's read timeout when idle.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    msgs.as_mut_ptr() as *mut libc::mmsghdr,
                    RECV_BATCH as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            let at = Instant::now();
            let read_ns = crate::mmsg::realtime_ns();
            // Before routing this batch: a worker reports an accepted binding request before the
            // response leaves the server, so the peer's next datagrams (DTLS) find the route.
            let mut refused = 0u64;
            while let Ok(msg) = self.control.try_recv() {
                match msg {
                    IoMsg::Learn { worker, addr } => {
                        if routes.confirm(addr, worker, at) == Confirmed::Full {
                            refused += 1;
                        }
                    }
                    IoMsg::Forget { worker, addrs } => {
                        for a in addrs {
                            routes.forget(a, worker);
                        }
                    }
                }
            }
            if refused > 0 {
                metrics::counter!(crate::metrics::UDP_ROUTES_REFUSED).increment(refused);
            }
            if at >= next_sweep {
                next_sweep = at + SWEEP_EVERY;
                let expired = routes.expire(at);
                if expired > 0 {
                    metrics::counter!(crate::metrics::UDP_ROUTES_EXPIRED).increment(expired as u64);
                }
            }
            if routes.len() != reported_len {
                reported_len = routes.len();
                metrics::gauge!(crate::metrics::UDP_ROUTES).set(reported_len as f64);
                self.counters
                    .udp_routes
                    .store(reported_len as u64, Ordering::Relaxed);
            }
            if n <= 0 {
                continue;
            }
            let n = n as usize;
            let socket_wait =
                metrics::histogram!(crate::metrics::PACKET_STAGE, "stage" => "socket");
            self.counters
                .datagrams_in
                .fetch_add(n as u64, Ordering::Relaxed);
            let mut batches: Vec<Option<DatagramBatch>> = (0..n_workers).map(|_| None).collect();
            for i in 0..n {
                // SAFETY: the first `n` headers were filled by recvmmsg.
                let h = unsafe { msgs[i].assume_init_ref() };
                // SAFETY: recvmmsg just filled this header; its control buffer is ctrl[i].
                if let Some(stamp) = unsafe { crate::mmsg::kernel_stamp_ns(&h.msg_hdr) } {
                    // The same clock both ways (CLOCK_REALTIME); a step of it reads as 0.
                    socket_wait.record(read_ns.saturating_sub(stamp) as f64 / 1e9);
                }
                let len = (h.msg_len as usize).min(MAX_DATAGRAM);
                let Some(src) = sockaddr_to_std(&addrs[i]) else {
                    continue;
                };
                let data = &bufs[i][..len];
                let Some(w) = routes.route(src, data, at) else {
                    unroutable += 1;
                    continue;
                };
                let Some(slot) = batches.get_mut(w) else {
                    continue;
                };
                let b = slot.get_or_insert_with(|| DatagramBatch {
                    buf: Vec::with_capacity(len * 4),
                    items: Vec::with_capacity(8),
                    at,
                    proto: str0m::net::Protocol::Udp,
                });
                let start = b.buf.len();
                b.buf.extend_from_slice(data);
                b.items.push((src, start, len));
            }
            for (w, b) in batches.into_iter().enumerate() {
                let Some(b) = b else { continue };
                let (Some(backlog), Some(tx)) = (self.backlogs.get(w), self.workers.get(w)) else {
                    continue;
                };
                if backlog.load(Ordering::Relaxed) >= MAX_BACKLOG {
                    dropped_backlog += b.items.len() as u64;
                    continue;
                }
                backlog.fetch_add(1, Ordering::Relaxed);
                if tx.send(WorkerMsg::Datagrams(b)).is_err() {
                    backlog.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if unroutable > 0 {
                metrics::counter!(crate::metrics::PACKETS_DROPPED, "reason" => "unroutable")
                    .increment(unroutable);
                unroutable = 0;
            }
            if dropped_backlog > 0 {
                metrics::counter!(crate::metrics::PACKETS_DROPPED, "reason" => "worker_backlog")
                    .increment(dropped_backlog);
                self.counters
                    .packets_dropped
                    .fetch_add(dropped_backlog, Ordering::Relaxed);
                dropped_backlog = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun_with_username(user: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        // A SOFTWARE attribute first, odd length to exercise padding.
        attrs.extend_from_slice(&[0x80, 0x22, 0x00, 0x03, b'a', b'b', b'c', 0]);
        attrs.extend_from_slice(&[0x00, 0x06]);
        attrs.extend_from_slice(&(user.len() as u16).to_be_bytes());
        attrs.extend_from_slice(user);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut d = vec![0x00, 0x01];
        d.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        d.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        d.extend_from_slice(&[7; 12]);
        d.extend_from_slice(&attrs);
        d
    }

    #[test]
    fn reads_the_server_ufrag_and_worker_from_a_binding_request() {
        let d = stun_with_username(b"0003abcdefgh:clientufrag");
        assert!(is_stun(&d));
        assert_eq!(stun_local_ufrag(&d), Some("0003abcdefgh"));
        assert_eq!(worker_of_ufrag("0003abcdefgh"), Some(3));
        assert_eq!(worker_of_ufrag("zz"), None);
    }

    #[test]
    fn an_unspecified_bind_announces_the_interface_addresses_from_getifaddrs() {
        let cfg = MediaConfig::default();
        for local in ["0.0.0.0:7000", "[::]:7000"] {
            let local: SocketAddr = local.parse().expect("addr");
            let got = host_candidates(&cfg, local);
            assert!(!got.is_empty(), "{local}: at least the loopback fallback");
            for a in &got {
                assert_eq!(a.port(), 7000);
                assert_eq!(a.is_ipv4(), local.is_ipv4(), "{a} is of the bound family");
                assert!(!a.ip().is_unspecified());
            }
        }
        // The raw list (read through getifaddrs and freed again) has this host's loopback.
        assert!(interface_addrs().iter().any(|ip| ip.is_loopback()));
    }

    #[test]
    fn a_promoted_binding_request_is_a_signed_nomination_of_top_priority() {
        use hmac::{Hmac, Mac};
        let d = stun_with_username(b"0003abcdefgh:clientufrag");
        let p = promote_binding_request(&d, b"serverpassword").expect("a binding request");
        // Same header (type, cookie, transaction), USERNAME kept.
        assert_eq!(&p[..2], &d[..2]);
        assert_eq!(&p[4..20], &d[4..20]);
        assert_eq!(stun_local_ufrag(&p), Some("0003abcdefgh"));
        let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        assert_eq!(
            len + 20,
            p.len(),
            "the header length counts every attribute"
        );
        // Walk the attributes.
        let mut attrs = Vec::new();
        let mut i = 20;
        while i + 4 <= p.len() {
            let typ = u16::from_be_bytes([p[i], p[i + 1]]);
            let alen = usize::from(u16::from_be_bytes([p[i + 2], p[i + 3]]));
            attrs.push((typ, i, alen));
            i += 4 + alen.div_ceil(4) * 4;
        }
        let find = |t: u16| attrs.iter().find(|a| a.0 == t).copied().expect("attribute");
        let (_, at, _) = find(ATTR_PRIORITY);
        assert_eq!(&p[at + 4..at + 8], &TOP_PRIORITY.to_be_bytes());
        assert_eq!(find(ATTR_USE_CANDIDATE).2, 0);
        // MESSAGE-INTEGRITY verifies with the password over what precedes it (length up to it).
        let (_, mi, _) = find(ATTR_MESSAGE_INTEGRITY);
        let mut signed = p[..mi].to_vec();
        signed[2..4].copy_from_slice(&((mi + 24 - 20) as u16).to_be_bytes());
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"serverpassword").expect("key");
        mac.update(&signed);
        assert_eq!(&p[mi + 4..mi + 24], &mac.finalize().into_bytes()[..]);
        // FINGERPRINT is last and matches.
        let (typ, fp, _) = *attrs.last().expect("attrs");
        assert_eq!(typ, ATTR_FINGERPRINT);
        let crc = crc32fast::hash(&p[..fp]) ^ 0x5354_554e;
        assert_eq!(&p[fp + 4..fp + 8], &crc.to_be_bytes());
        // Not a binding request, or cut short: refused.
        assert_eq!(promote_binding_request(&d[..10], b"x"), None);
        let mut response = d.clone();
        response[0] = 0x01;
        assert_eq!(promote_binding_request(&response, b"x"), None);
    }

    #[test]
    fn malformed_stun_is_refused_without_panicking() {
        let d = stun_with_username(b"0001x:y");
        for cut in 0..d.len() {
            let _ = stun_local_ufrag(&d[..cut]);
        }
        let mut bad_len = d.clone();
        bad_len[3] = 0xff;
        assert_eq!(stun_local_ufrag(&bad_len), None);
        let mut not_binding = d.clone();
        not_binding[1] = 0x11;
        assert_eq!(stun_local_ufrag(&not_binding), None);
        assert!(!is_stun(&[0x80, 0x60]));
    }
}
