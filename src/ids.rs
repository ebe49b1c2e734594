//! Typed identifiers.
//!
//! Every ID that crosses the wire is validated once, where it enters (a token's `sub`, an op's argument),
//! and is a distinct type from then on, so a `CallId` can never be passed where a `UserId` is expected.
//! The text is shared (`Arc<str>`): IDs are cloned into many events and cost one refcount bump each.

use std::fmt;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty or longer than the limit.
    #[error("must be 1 to {max} characters")]
    Length {
        /// The longest allowed length.
        max: usize,
    },
    /// The string has a character outside the allowed set.
    #[error("may only contain A-Z a-z 0-9 _ . @ -")]
    Charset,
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The longest valid ID, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `s`: 1 to `MAX_LEN` characters of `A-Za-z0-9_.@-`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate(s, Self::MAX_LEN)?;
                Ok(Self(Arc::from(s)))
            }

            /// The ID as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

string_id!(
    /// A user, as named by the `sub` claim of their token.
    UserId,
    64
);
string_id!(
    /// A call, chosen by the server; also the name of the call's media room.
    CallId,
    64
);
string_id!(
    /// A published track in a room.
    TrackId,
    64
);

impl CallId {
    /// A new call ID for a call created at `now_ms`: `c_`, the time in 12 hex digits (48 bits of
    /// milliseconds), and 128 random bits in hex. The random part makes it unguessable (holding a
    /// call ID is what lets a user `call_join`); the time first makes IDs sort by creation, so the
    /// history's index on call IDs grows at its end instead of at random places (one page written
    /// per batch of new calls rather than one per call).
    pub fn generate(now_ms: u64) -> Self {
        Self(Arc::from(format!(
            "c_{:012x}{}",
            now_ms & 0xffff_ffff_ffff,
            random_hex(16)
        )))
    }
}

impl TrackId {
    /// A new track ID: `t_` and 64 random bits in hex.
    pub fn random() -> Self {
        Self(Arc::from(format!("t_{}", random_hex(8))))
    }
}

/// One device's WebSocket session. Numbered by the server; never reused within a process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s_{:x}", self.0)
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn validate(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError::Length { max });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
    {
        return Err(IdError::Charset);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_contract_charset_and_length() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("a.b-c_d@e").is_ok());
        assert!(UserId::parse(&"x".repeat(64)).is_ok());
        assert_eq!(
            UserId::parse(&"x".repeat(65)),
            Err(IdError::Length { max: 64 })
        );
        assert_eq!(UserId::parse(""), Err(IdError::Length { max: 64 }));
        assert_eq!(UserId::parse("al ice"), Err(IdError::Charset));
        assert_eq!(UserId::parse("ålice"), Err(IdError::Charset));
    }

    #[test]
    fn call_ids_carry_128_random_bits_sort_by_time_and_are_valid_ids() {
        let t = 1_800_000_000_000;
        let a = CallId::generate(t);
        let b = CallId::generate(t);
        assert_ne!(a, b, "the same millisecond still gives different IDs");
        assert_eq!(a.as_str().len(), 2 + 12 + 32);
        assert_eq!(&a.as_str()[..14], "c_01a3185c5000");
        let random = &a.as_str()[14..];
        assert!(random.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(CallId::parse(a.as_str()).is_ok());
        assert!(CallId::generate(t) < CallId::generate(t + 1));
        assert!(CallId::generate(t + 1) < CallId::generate(t + 1_000_000));
    }

    #[test]
    fn ids_deserialize_with_validation() {
        let ok: UserId = serde_json::from_str("\"bob\"").expect("valid id");
        assert_eq!(ok.as_str(), "bob");
        assert!(serde_json::from_str::<UserId>("\"b o b\"").is_err());
    }
}
