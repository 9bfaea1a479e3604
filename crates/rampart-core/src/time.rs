//! Timestamps as Rampart writes them: RFC 3339, UTC, `Z` suffix.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};

/// A duration in microseconds, as event time counts (saturating at `i64::MAX`).
pub fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Formats microseconds since the Unix epoch as RFC 3339 UTC (`2024-07-31T13:06:24Z`, with a
/// fraction only when there is one).
pub fn format_micros(micros: i64) -> String {
    match Utc.timestamp_micros(micros).single() {
        Some(t) => format_utc(t),
        None => format!("invalid timestamp ({micros} us)"),
    }
}

/// Formats a UTC time as RFC 3339 with a `Z` suffix.
pub fn format_utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Parses an RFC 3339 timestamp to microseconds since the epoch. A date and time without a
/// zone (`2024-07-31 13:06:24.5`, `T` or space between them) is taken as UTC, as log exporters
/// commonly write it.
pub fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_micros());
    }
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.and_utc().timestamp_micros())
}

/// The current wall-clock time, formatted.
pub fn now() -> String {
    format_utc(Utc::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_seconds_and_fractions() {
        let us = parse_rfc3339_micros("2024-07-31T13:06:24Z").expect("valid");
        assert_eq!(format_micros(us), "2024-07-31T13:06:24Z");
        let us = parse_rfc3339_micros("2024-07-31T15:06:24.5+02:00").expect("valid");
        assert_eq!(format_micros(us), "2024-07-31T13:06:24.500Z");
        assert_eq!(parse_rfc3339_micros("yesterday"), None);
        let us = parse_rfc3339_micros("2025-01-20 15:59:33.000000000").expect("zoneless is UTC");
        assert_eq!(format_micros(us), "2025-01-20T15:59:33Z");
    }
}
