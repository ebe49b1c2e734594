//! TURN servers handed to clients in `rtc_join` (docs/protocol.md section 4).
//!
//! Credentials are time-limited, in the TURN REST style that coturn checks with `use-auth-secret` and
//! `static-auth-secret`: the username is `<expiry unix seconds>:<user_id>` and the password is
//! base64(HMAC-SHA1(secret, username)). The TURN server needs no call to us: it recomputes the password
//! from the shared secret and refuses a username whose time has passed.
//!
//! Pure: the time is passed in.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha1::Sha1;

use crate::config::TurnConfig;
use crate::ids::UserId;

/// One entry of `ice_servers`, shaped as a browser's `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    /// The configured `turn:`/`turns:`/`stun:` URLs.
    pub urls: Vec<String>,
    /// `<expiry>:<user_id>`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub credential: String,
}

/// The ICE servers for `user` at `now_unix` (seconds): none when no TURN URL is configured, else one
/// entry holding every URL, valid for `ttl` seconds.
pub fn ice_servers(cfg: &TurnConfig, user: &UserId, now_unix: u64) -> Vec<IceServer> {
    if cfg.urls.is_empty() {
        return Vec::new();
    }
    let username = format!("{}:{}", now_unix.saturating_add(cfg.ttl), user.as_str());
    vec![IceServer {
        urls: cfg.urls.clone(),
        credential: credential(&cfg.secret, &username),
        username,
    }]
}

/// The TURN REST password for `username`.
pub fn credential(secret: &str, username: &str) -> String {
    // HMAC takes a key of any length; new_from_slice cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(urls: &[&str]) -> TurnConfig {
        TurnConfig {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            secret: "north".into(),
            ttl: 3600,
        }
    }

    #[test]
    fn no_urls_no_servers() {
        assert!(ice_servers(&cfg(&[]), &UserId::parse("ann").unwrap(), 1000).is_empty());
    }

    #[test]
    fn username_carries_the_expiry_and_the_user() {
        let s = ice_servers(
            &cfg(&["turn:t.example:3478?transport=udp", "turns:t.example:5349"]),
            &UserId::parse("ann").unwrap(),
            1_700_000_000,
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].urls.len(), 2);
        assert_eq!(s[0].username, "1700003600:ann");
        assert_eq!(s[0].credential, credential("north", "1700003600:ann"));
    }

    #[test]
    fn credential_is_base64_hmac_sha1_as_coturn_computes_it() {
        // `echo -n "1700003600:ann" | openssl dgst -sha1 -hmac north -binary | base64`
        assert_eq!(
            credential("north", "1700003600:ann"),
            "TwqKCcbzejRFa1sgGqGS7SEzCGg="
        );
        assert_ne!(
            credential("south", "1700003600:ann"),
            credential("north", "1700003600:ann")
        );
    }
}
