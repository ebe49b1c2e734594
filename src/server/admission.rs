//! Who may open a session: the caps of `[sessions]` (in total, per user, per IP address) and the
//! per-address upgrade rate, checked before the WebSocket upgrade so that a refused client costs one
//! HTTP response.
//!
//! A granted [`Ticket`] holds its place until it is dropped, which the session task does when it ends
//! for any reason (a panic included), so the counts cannot leak. The per-address table only keeps
//! addresses with a live session or a recent upgrade: it is pruned (at most once a second) when it
//! grows, so its size is bounded by the live sessions plus the addresses seen in the last
//! [`FORGET_AFTER`] and a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::session::RateLimiter;
use crate::config::SessionsConfig;
use crate::ids::UserId;

/// An idle address (no session) is forgotten once its upgrade bucket has been full this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(10);
/// The address table is pruned when it holds more entries than this.
const PRUNE_ABOVE: usize = 4096;

/// The client an upgrade counts against: the TCP peer, or, when the peer is one of `trusted`
/// (`[http] trusted_proxies`), the last address its `X-Forwarded-For` headers name that is not a
/// trusted proxy itself (read from the right, as each proxy appends the peer it saw). Entries a
/// proxy would not write (not an address) end the walk: the last trusted hop is then the client,
/// so a client cannot pick the address it is counted against by sending the header itself.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    for header in forwarded_for.rev() {
        let Ok(text) = std::str::from_utf8(header) else {
            return client;
        };
        for entry in text.rsplit(',') {
            let Some(ip) = parse_forwarded_entry(entry.trim()) else {
                return client;
            };
            client = ip.to_canonical();
            if !is_trusted(&client) {
                return client;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, or an address with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`).
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The server holds `[sessions] max_total` sessions.
    #[error("the server has too many sessions")]
    Total,
    /// The user holds `[sessions] max_per_user` sessions.
    #[error("too many sessions for this user")]
    User,
    /// The address holds `[sessions] max_per_ip` sessions.
    #[error("too many sessions from this address")]
    Ip,
    /// The address starts upgrades faster than `[sessions] upgrade_rate`.
    #[error("too many connection attempts from this address")]
    Rate,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::User => "user",
            Refusal::Ip => "ip",
            Refusal::Rate => "rate",
        }
    }
}

struct Address {
    sessions: usize,
    bucket: RateLimiter,
    last: Instant,
}

#[derive(Default)]
struct Counts {
    /// When the address table was last pruned (at most once a second: a prune walks all of it).
    pruned_at: Option<Instant>,
    total: usize,
    users: HashMap<UserId, usize>,
    addresses: HashMap<IpAddr, Address>,
}

/// The admission counts of one server.
pub struct Admission {
    cfg: SessionsConfig,
    counts: Mutex<Counts>,
}

/// A granted place; dropping it gives the place back.
pub struct Ticket {
    admission: Arc<Admission>,
    user: UserId,
    ip: IpAddr,
}

impl Admission {
    /// Empty counts under `cfg`.
    pub fn new(cfg: SessionsConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The critical sections below cannot panic; a poisoned lock still holds consistent counts.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a session of `user` from `ip` at `now`, or says which cap refuses it.
    pub fn admit(
        self: &Arc<Self>,
        user: &UserId,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let cfg = &self.cfg;
        let mut c = self.counts();
        if c.addresses.len() > PRUNE_ABOVE
            && c.pruned_at
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            c.pruned_at = Some(now);
            c.addresses.retain(|_, a| {
                a.sessions > 0 || now.saturating_duration_since(a.last) < FORGET_AFTER
            });
        }
        let addr = c.addresses.entry(ip).or_insert_with(|| Address {
            sessions: 0,
            bucket: RateLimiter::new(cfg.upgrade_rate, cfg.upgrade_burst, now),
            last: now,
        });
        addr.last = now;
        if !addr.bucket.allow(now) {
            return Err(Refusal::Rate);
        }
        if addr.sessions >= cfg.max_per_ip {
            return Err(Refusal::Ip);
        }
        if c.total >= cfg.max_total {
            return Err(Refusal::Total);
        }
        if c.users.get(user).copied().unwrap_or(0) >= cfg.max_per_user {
            return Err(Refusal::User);
        }
        c.total += 1;
        *c.users.entry(user.clone()).or_default() += 1;
        if let Some(a) = c.addresses.get_mut(&ip) {
            a.sessions += 1;
        }
        Ok(Ticket {
            admission: Arc::clone(self),
            user: user.clone(),
            ip,
        })
    }

    /// (sessions held, users with a session, addresses in the table).
    pub fn sizes(&self) -> (usize, usize, usize) {
        let c = self.counts();
        (c.total, c.users.len(), c.addresses.len())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.users.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.users.remove(&self.user);
            }
        }
        if let Some(a) = c.addresses.get_mut(&self.ip) {
            a.sessions = a.sessions.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SessionsConfig {
        SessionsConfig {
            max_total: 5,
            max_per_user: 2,
            max_per_ip: 3,
            upgrade_rate: 1,
            upgrade_burst: 100,
            ..SessionsConfig::default()
        }
    }

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid")
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().expect("a network")).collect()
    }

    fn client(peer: &str, headers: &[&str], trusted: &[&str]) -> IpAddr {
        let peer: IpAddr = peer.parse().expect("an address");
        client_ip(peer, headers.iter().map(|h| h.as_bytes()), &nets(trusted))
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_nobody_else_can() {
        let proxy = ["10.0.0.0/8", "::1/128"];
        // Through one proxy: the address it appended.
        assert_eq!(
            client("10.0.0.5", &["198.51.100.7"], &proxy),
            ip_of("198.51.100.7")
        );
        // Through two: the proxy nearest the client is trusted too, so the one before it.
        assert_eq!(
            client("10.0.0.5", &["203.0.113.9, 198.51.100.7, 10.0.0.9"], &proxy),
            ip_of("198.51.100.7")
        );
        // Several headers are one list, in order.
        assert_eq!(
            client(
                "10.0.0.5",
                &["203.0.113.9", "198.51.100.7:5000, 10.1.1.1"],
                &proxy
            ),
            ip_of("198.51.100.7")
        );
        // A client's own header to the left of the proxy's entry changes nothing...
        assert_eq!(
            client("10.0.0.5", &["1.2.3.4, 198.51.100.7"], &proxy),
            ip_of("198.51.100.7")
        );
        // ...and a client that is not a trusted proxy is counted as itself whatever it sends.
        assert_eq!(
            client("192.0.2.1", &["198.51.100.7"], &proxy),
            ip_of("192.0.2.1")
        );
        assert_eq!(
            client("192.0.2.1", &["198.51.100.7"], &[]),
            ip_of("192.0.2.1")
        );
        // A proxy without the header, or with garbage in it: the last trusted hop.
        assert_eq!(client("10.0.0.5", &[], &proxy), ip_of("10.0.0.5"));
        assert_eq!(
            client("10.0.0.5", &["10.0.0.7, bogus"], &proxy),
            ip_of("10.0.0.5")
        );
        assert_eq!(
            client("10.0.0.5", &["bogus, 10.0.0.7"], &proxy),
            ip_of("10.0.0.7")
        );
        // IPv6, bracketed with a port, and v4-mapped peers.
        assert_eq!(
            client("::1", &["[2001:db8::1]:443"], &proxy),
            ip_of("2001:db8::1")
        );
        assert_eq!(
            client("::ffff:10.0.0.5", &["198.51.100.7"], &proxy),
            ip_of("198.51.100.7")
        );
        // Every hop trusted: the first one.
        assert_eq!(
            client("10.0.0.5", &["10.0.0.1, 10.0.0.2"], &proxy),
            ip_of("10.0.0.1")
        );
    }

    fn ip_of(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn each_cap_refuses_one_past_it_and_a_dropped_ticket_gives_its_place_back() {
        let a = Admission::new(cfg());
        let t0 = Instant::now();
        let alice1 = a.admit(&uid("alice"), ip(1), t0).expect("first");
        let _alice2 = a.admit(&uid("alice"), ip(1), t0).expect("second");
        assert_eq!(a.admit(&uid("alice"), ip(2), t0).err(), Some(Refusal::User));
        let _bob = a.admit(&uid("bob"), ip(1), t0).expect("third from ip 1");
        assert_eq!(a.admit(&uid("carol"), ip(1), t0).err(), Some(Refusal::Ip));
        let _carol = a.admit(&uid("carol"), ip(2), t0).expect("other address");
        let _dave = a.admit(&uid("dave"), ip(3), t0).expect("fifth");
        assert_eq!(a.admit(&uid("erin"), ip(4), t0).err(), Some(Refusal::Total));
        drop(alice1);
        assert_eq!(a.sizes().0, 4);
        let _again = a
            .admit(&uid("alice"), ip(4), t0)
            .expect("a place was given back");
    }

    #[test]
    fn upgrades_per_address_follow_the_bucket() {
        let a = Admission::new(SessionsConfig {
            upgrade_rate: 2,
            upgrade_burst: 3,
            ..SessionsConfig::default()
        });
        let t0 = Instant::now();
        let mut kept = Vec::new();
        for i in 0..3 {
            kept.push(
                a.admit(&uid(&format!("u{i}")), ip(1), t0)
                    .expect("in the burst"),
            );
        }
        assert_eq!(a.admit(&uid("u9"), ip(1), t0).err(), Some(Refusal::Rate));
        // Another address has its own bucket.
        kept.push(a.admit(&uid("u9"), ip(2), t0).expect("other address"));
        // Half a second later, one more token (rate 2/s).
        let t1 = t0 + Duration::from_millis(500);
        kept.push(a.admit(&uid("u8"), ip(1), t1).expect("refilled"));
        assert_eq!(a.admit(&uid("u7"), ip(1), t1).err(), Some(Refusal::Rate));
    }

    #[test]
    fn the_address_table_stays_bounded_under_many_addresses() {
        let a = Admission::new(SessionsConfig::default());
        let t0 = Instant::now();
        for i in 0..50_000u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i)));
            // Each one connects and leaves at once; time passes.
            let now = t0 + Duration::from_millis(u64::from(i));
            drop(a.admit(&uid("u"), ip, now).expect("admitted"));
        }
        let (total, users, addresses) = a.sizes();
        assert_eq!((total, users), (0, 0));
        // Addresses idle for FORGET_AFTER are pruned (once a second): at most those of the last
        // 11 s (11 000 at one a millisecond) survive.
        assert!(addresses <= 11_000, "{addresses}");
    }
}
