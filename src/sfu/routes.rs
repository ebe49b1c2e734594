//! The I/O thread's routing decisions: which worker a datagram goes to, and which source
//! addresses it remembers. Pure: time is passed in, nothing touches a socket.
//!
//! Invariants:
//!
//! - A **STUN binding request** that names a server ufrag is routed by that ufrag (its first four
//!   hex digits are the owning worker's index), every time, whatever its source. Routing it
//!   writes nothing: a flood of requests from spoofed sources costs no memory here.
//! - A **route** (source address → worker) is written only by [`RouteTable::confirm`], which the
//!   I/O thread calls when a worker reports that one of its connections accepted a binding request
//!   from that address: the ufrag named a real connection and the MESSAGE-INTEGRITY matched its
//!   password (str0m's `Rtc::accepts`). So a source that does not know a connection's
//!   credentials can neither create a route nor displace one.
//! - Everything else (DTLS, SRTP, RTCP, STUN without a server ufrag) goes only where a route says.
//! - The table holds at most `max` routes; a confirmation past that is refused (and counted by
//!   the caller). A route with no traffic and no confirmation for [`ROUTE_IDLE`] is dropped by
//!   [`RouteTable::expire`]; workers also drop the routes of the connections they close
//!   ([`RouteTable::forget`]), and only their own: a stale forget cannot remove the route another
//!   worker confirmed since.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::net::{UfragRoutes, is_stun, stun_local_ufrag, worker_for};
use std::sync::Arc;

/// A route with neither traffic nor a confirming binding request for this long is dropped. Live
/// connections send far more often (ICE consent checks every few seconds; a worker closes a
/// connection idle for 20 s), so only routes of dead or vanished peers age out.
pub(crate) const ROUTE_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Route {
    worker: usize,
    last_seen: Instant,
}

/// What [`RouteTable::confirm`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirmed {
    /// A new route.
    Added,
    /// The route existed for this worker; its age was reset.
    Refreshed,
    /// The address was routed to another worker and now goes to this one (an authenticated
    /// connection of this worker uses it now).
    Moved,
    /// The table is full: no route was added.
    Full,
}

/// Source address → worker.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: HashMap<SocketAddr, Route>,
    n_workers: usize,
    max: usize,
    idle: Duration,
    restarted: Arc<UfragRoutes>,
}

impl RouteTable {
    /// An empty table for `n_workers` workers holding at most `max` routes.
    pub(crate) fn new(n_workers: usize, max: usize, idle: Duration) -> Self {
        Self {
            routes: HashMap::new(),
            n_workers,
            max,
            idle,
            restarted: Arc::default(),
        }
    }

    /// Routes restarted connections' ufrags by `restarted` too (see [`UfragRoutes`]).
    pub(crate) fn with_restarted(mut self, restarted: Arc<UfragRoutes>) -> Self {
        self.restarted = restarted;
        self
    }

    /// The worker a datagram from `src` goes to, if any. Traffic on a route keeps it alive.
    pub(crate) fn route(&mut self, src: SocketAddr, data: &[u8], now: Instant) -> Option<usize> {
        if is_stun(data)
            && let Some(w) = stun_local_ufrag(data)
                .and_then(|u| worker_for(u, &self.restarted))
                .filter(|w| *w < self.n_workers)
        {
            return Some(w);
        }
        let r = self.routes.get_mut(&src)?;
        r.last_seen = now;
        Some(r.worker)
    }

    /// A worker accepted a binding request from `src` for one of its connections.
    pub(crate) fn confirm(&mut self, src: SocketAddr, worker: usize, now: Instant) -> Confirmed {
        if worker >= self.n_workers {
            return Confirmed::Full;
        }
        if let Some(r) = self.routes.get_mut(&src) {
            let moved = r.worker != worker;
            *r = Route {
                worker,
                last_seen: now,
            };
            return if moved {
                Confirmed::Moved
            } else {
                Confirmed::Refreshed
            };
        }
        if self.routes.len() >= self.max {
            return Confirmed::Full;
        }
        self.routes.insert(
            src,
            Route {
                worker,
                last_seen: now,
            },
        );
        Confirmed::Added
    }

    /// `worker` closed the connection that used `src`: drop the route if it is still that
    /// worker's. Returns whether a route was removed.
    pub(crate) fn forget(&mut self, src: SocketAddr, worker: usize) -> bool {
        if self.routes.get(&src).is_some_and(|r| r.worker == worker) {
            self.routes.remove(&src);
            return true;
        }
        false
    }

    /// Drops routes idle for longer than the table's idle limit; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let before = self.routes.len();
        let idle = self.idle;
        self.routes
            .retain(|_, r| now.saturating_duration_since(r.last_seen) <= idle);
        before - self.routes.len()
    }

    /// Routes held.
    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }

    /// The worker `src` is routed to, without touching its age (for tests).
    #[cfg(test)]
    fn get(&self, src: &SocketAddr) -> Option<usize> {
        self.routes.get(src).map(|r| r.worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding request whose USERNAME is `user`.
    fn binding(user: &str) -> Vec<u8> {
        let mut attrs = vec![0x00, 0x06];
        attrs.extend_from_slice(&(user.len() as u16).to_be_bytes());
        attrs.extend_from_slice(user.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut d = vec![0x00, 0x01];
        d.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        d.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        d.extend_from_slice(&[9; 12]);
        d.extend_from_slice(&attrs);
        d
    }

    fn addr(i: u32) -> SocketAddr {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 | (i >> 16));
        SocketAddr::new(ip.into(), (i & 0xffff) as u16)
    }

    const DTLS: &[u8] = &[22, 0xfe, 0xfd, 0, 0];

    #[test]
    fn stays_bounded_under_200k_spoofed_sources() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(4, 1000, ROUTE_IDLE);
        for i in 0..200_000u32 {
            // Valid-looking ufrags for every worker, and some naming no worker at all.
            let user = format!("{:04x}spoofspoofsp:x", i % 6);
            let w = t.route(addr(i), &binding(&user), t0);
            assert_eq!(w, (i % 6 < 4).then_some((i % 6) as usize));
            // Whatever else they send afterwards goes nowhere.
            assert_eq!(t.route(addr(i), DTLS, t0), None);
        }
        assert_eq!(t.len(), 0, "routing STUN writes nothing");
    }

    #[test]
    fn confirmations_beyond_the_cap_are_refused() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(2, 3, ROUTE_IDLE);
        for i in 0..3 {
            assert_eq!(t.confirm(addr(i), 1, t0), Confirmed::Added);
        }
        assert_eq!(t.confirm(addr(3), 1, t0), Confirmed::Full);
        assert_eq!(t.len(), 3);
        // A known address is still refreshed when full.
        assert_eq!(t.confirm(addr(0), 1, t0), Confirmed::Refreshed);
        // A worker index that does not exist is never routed.
        assert_eq!(t.confirm(addr(9), 7, t0), Confirmed::Full);
    }

    #[test]
    fn unconfirmed_sources_leave_nothing_and_idle_routes_expire() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(2, 100, ROUTE_IDLE);
        t.route(addr(1), &binding("0001abc:x"), t0);
        assert_eq!(t.get(&addr(1)), None);
        t.confirm(addr(2), 1, t0);
        t.confirm(addr(3), 0, t0);
        // addr(2) keeps sending; addr(3) falls silent.
        let mid = t0 + ROUTE_IDLE / 2;
        assert_eq!(t.route(addr(2), DTLS, mid), Some(1));
        assert_eq!(t.expire(t0 + ROUTE_IDLE), 0, "not idle long enough yet");
        let late = t0 + ROUTE_IDLE + Duration::from_millis(1);
        assert_eq!(t.expire(late), 1);
        assert_eq!(t.get(&addr(3)), None);
        assert_eq!(t.get(&addr(2)), Some(1));
        assert_eq!(t.route(addr(3), DTLS, late), None);
    }

    #[test]
    fn a_confirmed_route_survives_spoofed_requests_from_its_address() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(4, 100, ROUTE_IDLE);
        let real = addr(42);
        assert_eq!(t.confirm(real, 2, t0), Confirmed::Added);
        // A spoofer sends binding requests with the real client's source address and
        // valid-looking ufrags of other workers: each is routed by its ufrag (where the worker
        // finds no such connection, or the integrity check fails) and the route stays.
        for w in 0..4 {
            let spoof = binding(&format!("{w:04x}guessedufrag:x"));
            assert_eq!(t.route(real, &spoof, t0), Some(w));
        }
        assert_eq!(t.route(real, DTLS, t0), Some(2));
        // The real client's own checks still reach its worker.
        assert_eq!(t.route(real, &binding("0002realufrag:x"), t0), Some(2));
    }

    #[test]
    fn forget_removes_only_the_forgetting_workers_route() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(2, 100, ROUTE_IDLE);
        t.confirm(addr(5), 0, t0);
        // The address moved to worker 1 (its client reconnected there) before worker 0 closed
        // its old connection.
        assert_eq!(t.confirm(addr(5), 1, t0), Confirmed::Moved);
        assert!(!t.forget(addr(5), 0));
        assert_eq!(t.get(&addr(5)), Some(1));
        assert!(t.forget(addr(5), 1));
        assert_eq!(t.len(), 0);
    }
}
