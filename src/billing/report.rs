//! Usage reports over a billing period (pure): ledger rows in, totals per (user, tier) and per
//! (call, user, tier) out, as JSON (serde) or CSV (RFC 4180).
//!
//! Rules:
//! - A row counts for the part of its `[start_ms, end_ms)` span that overlaps the period `[from, to)`,
//!   in proportion to its milliseconds (a ledger row's `ms` is normally its span; a row merged by the
//!   storage layer may carry fewer). The proportion is taken cumulatively from the row's start, so the
//!   parts of one row in adjacent periods always add up to the row's `ms` exactly.
//! - Billable minutes are `ceil(ms / 60_000)` of the total per (user, tier) over the whole period: a
//!   user who received 30 s of `hd` in each of four calls pays 2 minutes, not 4. The per-call rows show
//!   the same rounding of their own totals for information; they are not summed for billing.
//! - Output is sorted (user, tier) and (call, user, tier), by tier name, so reports are reproducible.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::UsageRecord;
use crate::ids::{CallId, UserId};

/// One ledger row as the storage layer reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The call.
    pub call_id: CallId,
    /// The user who received.
    pub user_id: UserId,
    /// The tier's name.
    pub tier: String,
    /// Start of the span, epoch milliseconds, inclusive.
    pub start_ms: u64,
    /// End of the span, epoch milliseconds, exclusive.
    pub end_ms: u64,
    /// Milliseconds of usage in the span.
    pub ms: u64,
}

impl From<&UsageRecord> for UsageRow {
    fn from(r: &UsageRecord) -> Self {
        Self {
            call_id: r.call_id.clone(),
            user_id: r.user_id.clone(),
            tier: r.tier.clone(),
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            ms: r.duration_ms(),
        }
    }
}

/// What to report: the period `[from_ms, to_ms)` and optional filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportQuery {
    /// Start of the period, epoch milliseconds, inclusive.
    pub from_ms: u64,
    /// End of the period, epoch milliseconds, exclusive.
    pub to_ms: u64,
    /// Only this call.
    pub call_id: Option<CallId>,
    /// Only this user.
    pub user_id: Option<UserId>,
}

/// Usage of one user in one tier over the period: the billable figure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTierUsage {
    /// The user.
    pub user_id: UserId,
    /// The tier.
    pub tier: String,
    /// Milliseconds received in this tier during the period.
    pub ms: u64,
    /// `ceil(ms / 60000)`.
    pub billable_minutes: u64,
}

/// Usage of one user in one tier in one call over the period (for information).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallUserTierUsage {
    /// The call.
    pub call_id: CallId,
    /// The user.
    pub user_id: UserId,
    /// The tier.
    pub tier: String,
    /// Milliseconds received in this tier in this call during the period.
    pub ms: u64,
    /// `ceil(ms / 60000)` of this row alone.
    pub billable_minutes: u64,
}

/// A usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Start of the period, inclusive.
    pub from_ms: u64,
    /// End of the period, exclusive.
    pub to_ms: u64,
    /// Per (user, tier), sorted.
    pub users: Vec<UserTierUsage>,
    /// Per (call, user, tier), sorted.
    pub calls: Vec<CallUserTierUsage>,
}

/// `ceil(ms / 60000)`.
pub fn billable_minutes(ms: u64) -> u64 {
    ms.div_ceil(60_000)
}

/// The part of `row.ms` that falls in `[from, to)`, by time overlap (see the module docs).
pub fn clip(row: &UsageRow, from_ms: u64, to_ms: u64) -> u64 {
    let span = row.end_ms.saturating_sub(row.start_ms);
    let lo = row.start_ms.max(from_ms);
    let hi = row.end_ms.min(to_ms);
    if span == 0 || hi <= lo {
        return 0;
    }
    // ms × elapsed / span, cumulative from the row's start; u128 cannot overflow.
    let upto =
        |t: u64| -> u128 { u128::from(row.ms) * u128::from(t - row.start_ms) / u128::from(span) };
    u64::try_from(upto(hi) - upto(lo)).unwrap_or(u64::MAX)
}

/// Aggregates `rows` for `query`.
pub fn build(rows: &[UsageRow], query: &ReportQuery) -> UsageReport {
    let mut users: BTreeMap<(&UserId, &str), u64> = BTreeMap::new();
    let mut calls: BTreeMap<(&CallId, &UserId, &str), u64> = BTreeMap::new();
    for row in rows {
        if query.call_id.as_ref().is_some_and(|c| *c != row.call_id)
            || query.user_id.as_ref().is_some_and(|u| *u != row.user_id)
        {
            continue;
        }
        let ms = clip(row, query.from_ms, query.to_ms);
        if ms == 0 {
            continue;
        }
        let u = users.entry((&row.user_id, row.tier.as_str())).or_default();
        *u = u.saturating_add(ms);
        let c = calls
            .entry((&row.call_id, &row.user_id, row.tier.as_str()))
            .or_default();
        *c = c.saturating_add(ms);
    }
    UsageReport {
        from_ms: query.from_ms,
        to_ms: query.to_ms,
        users: users
            .into_iter()
            .map(|((user_id, tier), ms)| UserTierUsage {
                user_id: user_id.clone(),
                tier: tier.to_owned(),
                ms,
                billable_minutes: billable_minutes(ms),
            })
            .collect(),
        calls: calls
            .into_iter()
            .map(|((call_id, user_id, tier), ms)| CallUserTierUsage {
                call_id: call_id.clone(),
                user_id: user_id.clone(),
                tier: tier.to_owned(),
                ms,
                billable_minutes: billable_minutes(ms),
            })
            .collect(),
    }
}

impl UsageReport {
    /// The report as JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Per (call, user, tier) rows as CSV: a header line, CRLF line ends, RFC 4180 quoting.
    pub fn calls_csv(&self) -> String {
        let mut out = String::from("call_id,user_id,tier,ms,billable_minutes\r\n");
        for r in &self.calls {
            csv_line(
                &mut out,
                &[
                    r.call_id.as_str(),
                    r.user_id.as_str(),
                    &r.tier,
                    &r.ms.to_string(),
                    &r.billable_minutes.to_string(),
                ],
            );
        }
        out
    }

    /// Per (user, tier) rows as CSV: a header line, CRLF line ends, RFC 4180 quoting.
    pub fn users_csv(&self) -> String {
        let mut out = String::from("user_id,tier,ms,billable_minutes\r\n");
        for r in &self.users {
            csv_line(
                &mut out,
                &[
                    r.user_id.as_str(),
                    &r.tier,
                    &r.ms.to_string(),
                    &r.billable_minutes.to_string(),
                ],
            );
        }
        out
    }
}

/// The query parameters of `GET /v1/billing/usage`, as sent (all optional strings).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UsageParams {
    /// Start of the period (see [`parse_time`]); the start of this month when absent.
    #[serde(default)]
    pub from: Option<String>,
    /// End of the period; now when absent.
    #[serde(default)]
    pub to: Option<String>,
    /// Only this call.
    #[serde(default)]
    pub call_id: Option<String>,
    /// Only this user.
    #[serde(default)]
    pub user_id: Option<String>,
    /// `json` (default) or `csv`.
    #[serde(default)]
    pub format: Option<String>,
    /// For CSV: rows per `call` (default) or per `user`.
    #[serde(default)]
    pub group: Option<String>,
}

/// A checked usage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRequest {
    /// What to report.
    pub query: ReportQuery,
    /// CSV instead of JSON.
    pub csv: bool,
    /// CSV rows per user instead of per call.
    pub by_user: bool,
}

impl UsageParams {
    /// Checks the parameters at `now_ms`; the error is the message of a 400.
    pub fn check(&self, now_ms: u64) -> Result<UsageRequest, String> {
        let nonempty =
            |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
        let from = match nonempty(&self.from) {
            Some(f) => parse_time(&f).map_err(|e| format!("from: {e}"))?,
            None => month_start(now_ms),
        };
        let to = match nonempty(&self.to) {
            Some(t) => parse_time(&t).map_err(|e| format!("to: {e}"))?,
            None => now_ms,
        };
        if to <= from {
            return Err("to must be after from".into());
        }
        let call_id = match nonempty(&self.call_id) {
            Some(c) => Some(CallId::parse(&c).map_err(|e| format!("call_id {e}"))?),
            None => None,
        };
        let user_id = match nonempty(&self.user_id) {
            Some(u) => Some(UserId::parse(&u).map_err(|e| format!("user_id {e}"))?),
            None => None,
        };
        let csv = match self.format.as_deref() {
            None | Some("") | Some("json") => false,
            Some("csv") => true,
            Some(f) => return Err(format!("format {f:?}: use json or csv")),
        };
        let by_user = match self.group.as_deref() {
            None | Some("") | Some("call") => false,
            Some("user") => true,
            Some(g) => return Err(format!("group {g:?}: use call or user")),
        };
        Ok(UsageRequest {
            query: ReportQuery {
                from_ms: from,
                to_ms: to,
                call_id,
                user_id,
            },
            csv,
            by_user,
        })
    }
}

/// Parses a report bound: a date (`2026-11-01`, midnight UTC), an RFC 3339 time
/// (`2026-11-01T12:00:00Z`), or epoch milliseconds.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let t = d
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .ok_or_else(|| format!("{s:?} is not a valid date"))?;
        return u64::try_from(t).map_err(|_| format!("{s:?} is before 1970"));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return u64::try_from(t.timestamp_millis()).map_err(|_| format!("{s:?} is before 1970"));
    }
    Err(format!(
        "{s:?} is not a date (2026-11-01), an RFC 3339 time (2026-11-01T12:00:00Z) or epoch milliseconds"
    ))
}

/// The start of the current month (UTC) for `now_ms`: the default start of a report.
pub fn month_start(now_ms: u64) -> u64 {
    use chrono::Datelike;
    let Some(now) = chrono::DateTime::from_timestamp_millis(now_ms as i64) else {
        return 0;
    };
    chrono::NaiveDate::from_ymd_opt(now.year(), now.month(), 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(0, |t| t.and_utc().timestamp_millis().max(0) as u64)
}

/// Appends one CSV record. A field with a comma, a double quote, CR or LF is enclosed in double quotes
/// with its double quotes doubled (RFC 4180 2.6, 2.7); a field that starts with `=`, `+`, `-` or `@` is
/// left as it is (IDs may start with `-`; spreadsheet formula escaping is the reader's business).
fn csv_line(out: &mut String, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if f.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&f.replace('"', "\"\""));
            out.push('"');
        } else {
            let _ = write!(out, "{f}");
        }
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_params_default_to_this_month_and_refuse_what_they_cannot_read() {
        let now = 1_793_491_200_000 + 5 * 86_400_000; // 2026-11-06
        let r = UsageParams::default().check(now).expect("defaults");
        assert_eq!((r.query.from_ms, r.query.to_ms), (1_793_491_200_000, now));
        assert!(!r.csv && !r.by_user);
        let p = |q: &str| serde_urlencoded::from_str::<UsageParams>(q).expect("query");
        let r = p("from=2026-11-01&to=2026-11-02&format=csv&group=user&user_id=alice")
            .check(now)
            .expect("valid");
        assert!(r.csv && r.by_user);
        assert_eq!(r.query.user_id.as_ref().map(UserId::as_str), Some("alice"));
        for (q, want) in [
            ("from=2026-11-02&to=2026-11-01", "to must be after from"),
            ("from=yesterday", "from: "),
            ("format=xml", "format \"xml\""),
            ("group=tier", "group \"tier\""),
            ("user_id=has%20space", "user_id"),
            ("call_id=a%2Fb", "call_id"),
        ] {
            let e = p(q).check(now).expect_err(q);
            assert!(e.starts_with(want), "{q}: {e}");
        }
    }

    #[test]
    fn report_bounds_parse_dates_times_and_millis() {
        assert_eq!(parse_time("2026-11-01"), Ok(1_793_491_200_000));
        assert_eq!(parse_time("2026-11-01T00:00:01Z"), Ok(1_793_491_201_000));
        assert_eq!(
            parse_time("2026-11-01T01:00:00+01:00"),
            Ok(1_793_491_200_000)
        );
        assert_eq!(parse_time("1793491200000"), Ok(1_793_491_200_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01").is_err());
        assert_eq!(
            month_start(1_793_491_200_000 + 5 * 86_400_000),
            1_793_491_200_000
        );
    }

    fn row(call: &str, user: &str, tier: &str, start: u64, end: u64) -> UsageRow {
        UsageRow {
            call_id: CallId::parse(call).expect("call"),
            user_id: UserId::parse(user).expect("user"),
            tier: tier.to_owned(),
            start_ms: start,
            end_ms: end,
            ms: end - start,
        }
    }

    fn period(from_ms: u64, to_ms: u64) -> ReportQuery {
        ReportQuery {
            from_ms,
            to_ms,
            ..ReportQuery::default()
        }
    }

    #[test]
    fn minutes_round_up_per_user_and_tier_over_the_period() {
        assert_eq!(billable_minutes(0), 0);
        assert_eq!(billable_minutes(1), 1);
        assert_eq!(billable_minutes(60_000), 1);
        assert_eq!(billable_minutes(60_001), 2);
        // 30 s of hd in each of four calls: 2 billable minutes, while each call row shows 1.
        let rows: Vec<UsageRow> = (0..4)
            .map(|i| {
                row(
                    &format!("c{i}"),
                    "bob",
                    "hd",
                    i * 100_000,
                    i * 100_000 + 30_000,
                )
            })
            .collect();
        let r = build(&rows, &period(0, 1_000_000));
        assert_eq!(
            r.users,
            vec![UserTierUsage {
                user_id: UserId::parse("bob").expect("user"),
                tier: "hd".into(),
                ms: 120_000,
                billable_minutes: 2,
            }]
        );
        assert_eq!(r.calls.len(), 4);
        assert!(
            r.calls
                .iter()
                .all(|c| c.ms == 30_000 && c.billable_minutes == 1)
        );
    }

    #[test]
    fn rows_are_clipped_to_the_period_by_overlap() {
        let rows = vec![
            row("c1", "bob", "hd", 0, 10_000),      // half inside
            row("c1", "bob", "hd", 10_000, 20_000), // inside
            row("c1", "bob", "2k", 25_000, 40_000), // one third inside
            row("c1", "bob", "4k", 30_000, 31_000), // after the period
        ];
        let r = build(&rows, &period(5_000, 30_000));
        let got: Vec<(&str, u64)> = r.users.iter().map(|u| (u.tier.as_str(), u.ms)).collect();
        assert_eq!(got, vec![("2k", 5_000), ("hd", 15_000)]);
    }

    #[test]
    fn proportional_clipping_of_a_short_row_adds_up_across_adjacent_periods() {
        // A merged row: 1000 ms of usage spread over a 3000 ms span.
        let r = UsageRow {
            ms: 1_000,
            ..row("c1", "bob", "hd", 0, 3_000)
        };
        let parts: Vec<u64> = [(0, 1_000), (1_000, 2_000), (2_000, 3_000)]
            .iter()
            .map(|&(a, b)| clip(&r, a, b))
            .collect();
        assert_eq!(parts, vec![333, 333, 334]);
        assert_eq!(parts.iter().sum::<u64>(), 1_000);
        assert_eq!(clip(&r, 3_000, 9_000), 0);
        assert_eq!(
            clip(
                &UsageRow {
                    ms: u64::MAX,
                    ..row("c1", "bob", "hd", 0, u64::MAX)
                },
                0,
                u64::MAX
            ),
            u64::MAX
        );
    }

    #[test]
    fn filters_select_a_call_or_a_user() {
        let rows = vec![
            row("c1", "bob", "hd", 0, 1_000),
            row("c2", "bob", "hd", 0, 2_000),
            row("c1", "carol", "hd", 0, 4_000),
        ];
        let by_call = build(
            &rows,
            &ReportQuery {
                call_id: Some(CallId::parse("c1").expect("call")),
                ..period(0, 10_000)
            },
        );
        assert_eq!(
            by_call.users.iter().map(|u| u.ms).collect::<Vec<_>>(),
            vec![1_000, 4_000]
        );
        let by_user = build(
            &rows,
            &ReportQuery {
                user_id: Some(UserId::parse("bob").expect("user")),
                ..period(0, 10_000)
            },
        );
        assert_eq!(by_user.users.len(), 1);
        assert_eq!(by_user.users[0].ms, 3_000);
        assert_eq!(by_user.calls.len(), 2);
    }

    #[test]
    fn csv_has_a_header_crlf_lines_and_rfc_4180_quoting() {
        let rows = vec![
            row("c1", "bob", "hd, \"plus\"", 0, 61_000),
            row("c1", "bob", "line\nbreak", 0, 1_000),
            row("c1", "bob", "plain", 0, 60_000),
        ];
        let r = build(&rows, &period(0, 100_000));
        assert_eq!(
            r.users_csv(),
            "user_id,tier,ms,billable_minutes\r\n\
             bob,\"hd, \"\"plus\"\"\",61000,2\r\n\
             bob,\"line\nbreak\",1000,1\r\n\
             bob,plain,60000,1\r\n"
        );
        assert_eq!(
            r.calls_csv().lines().next(),
            Some("call_id,user_id,tier,ms,billable_minutes")
        );
        assert!(r.calls_csv().contains("c1,bob,plain,60000,1\r\n"));
    }

    #[test]
    fn json_round_trips() {
        let rows = vec![row("c1", "bob", "hd", 0, 90_000)];
        let r = build(&rows, &period(0, 100_000));
        let json = r.to_json();
        assert!(json.contains("\"billable_minutes\":2"), "{json}");
        let back: UsageReport = serde_json::from_str(&json).expect("json");
        assert_eq!(back, r);
    }

    #[test]
    fn records_from_the_meter_become_rows_with_their_span_as_ms() {
        let rec = UsageRecord {
            call_id: CallId::parse("c1").expect("call"),
            user_id: UserId::parse("bob").expect("user"),
            tier: "hd".into(),
            start_ms: 10,
            end_ms: 250,
        };
        let r = UsageRow::from(&rec);
        assert_eq!(
            (r.start_ms, r.end_ms, r.ms, r.tier.as_str()),
            (10, 250, 240, "hd")
        );
    }
}
