//! Token verification: any bearer string a client presents, against a fixed secret and clock.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard::auth::TokenAuthority;

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret-0123456789";

fn authority() -> &'static TokenAuthority {
    static A: OnceLock<TokenAuthority> = OnceLock::new();
    A.get_or_init(|| TokenAuthority::new(SECRET).with_max_ttl(86_400))
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    // Arbitrary input never carries a valid HMAC under a secret it does not know.
    assert!(authority().verify_at(token, 1_800_000_000).is_err());
});
