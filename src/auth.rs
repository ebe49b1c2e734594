//! Access tokens: HS256 JWTs signed with the configured secret (PROTOCOL.md section 1).
//!
//! Claims: `sub` (a valid [`UserId`]), optional `name` (≤ 64 characters), required `exp`, optional `nbf`
//! and `iat`, and `admin: true` for the admin API. Verification is strict about the algorithm, so a
//! token signed `none` or with another algorithm is refused.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// The development secret used by `serve --dev`. Never use it for anything reachable from outside.
pub const DEV_SECRET: &str = "switchboard-dev-secret-DO-NOT-USE-IN-PRODUCTION";

/// Longest display name.
pub const MAX_NAME_CHARS: usize = 64;

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("missing access token")]
    Missing,
    /// The token has expired.
    #[error("access token expired")]
    Expired,
    /// The token's `nbf` is in the future.
    #[error("access token not yet valid")]
    NotYetValid,
    /// The signature does not match the configured secret, or the algorithm is not HS256.
    #[error("access token signature invalid")]
    BadSignature,
    /// The token lives longer than `[auth] max_token_ttl` allows.
    #[error("access token lifetime exceeds the server's maximum of {0} s")]
    TooLong(u64),
    /// The token is not a well-formed JWT with valid claims.
    #[error("malformed access token: {0}")]
    Malformed(String),
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user ID.
    pub sub: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// May use the admin API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// Who a verified token says the bearer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user.
    pub user_id: UserId,
    /// Display name, if the token has one.
    pub name: Option<String>,
    /// Whether the token carries `admin: true`.
    pub admin: bool,
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Longest accepted lifetime, seconds (`[auth] max_token_ttl`); `None` accepts any.
    max_ttl: Option<u64>,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuthority(..)")
    }
}

impl TokenAuthority {
    /// An authority for `secret`.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_ttl: None,
        }
    }

    /// Refuses tokens whose `exp` is more than `secs` after their `iat` or after the time of
    /// verification (a token without `iat` is judged by the second alone).
    pub fn with_max_ttl(mut self, secs: u64) -> Self {
        self.max_ttl = Some(secs);
        self
    }

    /// A token for `user` valid for `ttl_secs` from `now_secs`.
    pub fn issue(
        &self,
        user: &UserId,
        name: Option<&str>,
        admin: bool,
        now_secs: u64,
        ttl_secs: u64,
    ) -> String {
        let claims = Claims {
            sub: user.to_string(),
            name: name.map(str::to_owned),
            exp: now_secs.saturating_add(ttl_secs),
            nbf: None,
            iat: Some(now_secs),
            admin,
        };
        // Encoding HS256 with an in-memory key cannot fail for a serializable struct.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Verifies a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.verify_at(token, now)
    }

    /// [`verify`](Self::verify) with the lifetime cap judged at `now_secs` (`exp` and `nbf` are
    /// checked against the system clock by the JWT library).
    pub fn verify_at(&self, token: &str, now_secs: u64) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                    AuthError::BadSignature
                }
                _ => AuthError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;
        if let Some(max) = self.max_ttl {
            let from_now = claims.exp.saturating_sub(now_secs);
            let from_iat = claims.iat.map_or(0, |iat| claims.exp.saturating_sub(iat));
            if from_now > max || from_iat > max {
                return Err(AuthError::TooLong(max));
            }
        }
        let user_id =
            UserId::parse(&claims.sub).map_err(|e| AuthError::Malformed(format!("sub {e}")))?;
        if let Some(name) = &claims.name
            && name.chars().count() > MAX_NAME_CHARS
        {
            return Err(AuthError::Malformed(format!(
                "name longer than {MAX_NAME_CHARS} characters"
            )));
        }
        Ok(Identity {
            user_id,
            name: claims.name,
            admin: claims.admin,
        })
    }
}

/// Parses a TTL such as `90`, `90s`, `15m`, `1h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 15m, 1h, 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("duration {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::parse("alice").expect("valid")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[test]
    fn issued_tokens_verify_with_the_same_secret_only() {
        let a = TokenAuthority::new("one");
        let t = a.issue(&alice(), Some("Alice"), true, now(), 60);
        let id = a.verify(&t).expect("valid");
        assert_eq!(id.user_id, alice());
        assert_eq!(id.name.as_deref(), Some("Alice"));
        assert!(id.admin);
        assert!(matches!(
            TokenAuthority::new("two").verify(&t),
            Err(AuthError::BadSignature)
        ));
    }

    #[test]
    fn expired_and_garbage_tokens_are_refused() {
        let a = TokenAuthority::new("k");
        let t = a.issue(&alice(), None, false, now() - 100, 10);
        assert!(matches!(a.verify(&t), Err(AuthError::Expired)));
        assert!(matches!(
            a.verify("not.a.jwt"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(a.verify(""), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn tokens_with_invalid_sub_or_without_exp_are_refused() {
        let key = EncodingKey::from_secret(b"k");
        let a = TokenAuthority::new("k");
        let bad_sub = serde_json::json!({"sub": "no spaces allowed", "exp": now() + 60});
        let t = jsonwebtoken::encode(&Header::default(), &bad_sub, &key).expect("encodes");
        assert!(matches!(a.verify(&t), Err(AuthError::Malformed(_))));
        let no_exp = serde_json::json!({"sub": "alice"});
        let t = jsonwebtoken::encode(&Header::default(), &no_exp, &key).expect("encodes");
        assert!(matches!(a.verify(&t), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn other_algorithms_are_refused() {
        let a = TokenAuthority::new("k");
        let claims = serde_json::json!({"sub": "alice", "exp": now() + 60});
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .expect("encodes");
        assert!(matches!(a.verify(&t), Err(AuthError::BadSignature)));
    }

    #[test]
    fn tokens_living_longer_than_the_cap_are_refused() {
        let key = EncodingKey::from_secret(b"k");
        let a = TokenAuthority::new("k").with_max_ttl(3600);
        let now = now();
        let sign = |c: serde_json::Value| {
            jsonwebtoken::encode(&Header::default(), &c, &key).expect("encodes")
        };
        // Exactly the cap is fine; one second more is not, judged from iat or from now.
        let ok = a.issue(&alice(), None, false, now, 3600);
        assert!(a.verify_at(&ok, now).is_ok());
        let long = a.issue(&alice(), None, false, now, 3601);
        assert!(matches!(
            a.verify_at(&long, now),
            Err(AuthError::TooLong(3600))
        ));
        let no_iat = sign(serde_json::json!({"sub": "alice", "exp": now + 7200}));
        assert!(matches!(
            a.verify_at(&no_iat, now),
            Err(AuthError::TooLong(_))
        ));
        assert!(a.verify_at(&no_iat, now + 3600).is_ok(), "judged from now");
        // An old iat with a far exp: a long-lived token, even when little of it is left.
        let old = sign(serde_json::json!({"sub": "alice", "iat": now - 86_400, "exp": now + 60}));
        assert!(matches!(a.verify_at(&old, now), Err(AuthError::TooLong(_))));
        // Without a cap (clients, tests) any lifetime verifies.
        assert!(TokenAuthority::new("k").verify_at(&long, now).is_ok());
    }

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
