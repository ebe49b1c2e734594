//! The billing report's query: the query string of GET /v1/billing/usage, checked, then a report
//! built from ledger rows derived from the input and written as JSON and CSV.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::billing::report::{UsageParams, UsageRow, build};
use switchboard::ids::{CallId, UserId};

fuzz_target!(|data: &[u8]| {
    let Ok(params) = serde_urlencoded::from_bytes::<UsageParams>(data) else {
        return;
    };
    let now = 1_800_000_000_000u64;
    let Ok(req) = params.check(now) else {
        return;
    };
    assert!(req.query.to_ms > req.query.from_ms);
    let rows = usage_rows(data, req.query.from_ms);
    let report = build(&rows, &req.query);
    let json = report.to_json();
    assert!(serde_json_ok(&json), "the report is JSON");
    let _ = (report.calls_csv(), report.users_csv());
});

/// Ledger rows as the store holds them (start < end, ms <= end - start), around `from`.
fn usage_rows(data: &[u8], from: u64) -> Vec<UsageRow> {
    const TIERS: [&str; 6] = ["audio", "hd", "full_hd", "2k", "4k", "4k_plus"];
    data.chunks_exact(6)
        .take(64)
        .filter_map(|c| {
            let call_id = CallId::parse(&format!("c_{:012x}{:032x}", c[0], c[1])).ok()?;
            let user_id = UserId::parse(&format!("u{}", c[2] % 8)).ok()?;
            let start = from
                .saturating_sub(60_000)
                .saturating_add(u64::from(u16::from_be_bytes([c[3], c[4]])) * 1000);
            let span = u64::from(c[5]) * 997 + 1;
            let end = start.checked_add(span)?;
            Some(UsageRow {
                call_id,
                user_id,
                tier: TIERS[usize::from(c[2]) % TIERS.len()].to_owned(),
                start_ms: start,
                end_ms: end,
                ms: span - u64::from(c[0] % 2) * span / 3,
            })
        })
        .collect()
}

fn serde_json_ok(s: &str) -> bool {
    s.starts_with('{') && s.ends_with('}')
}
