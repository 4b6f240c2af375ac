//! RFC 3339 / ISO 8601 timestamps in UTC, computed from Unix time without a calendar crate.
//! Used in heartbeats (`connected_since`, `server_time`), the admin API and JSON logs.

use std::time::{Duration, SystemTime};

/// `YYYY-MM-DDTHH:MM:SSZ` for a time since the Unix epoch (times before it print as the epoch).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (date, h, m, s) = split(d);
    format!("{date}T{h:02}:{m:02}:{s:02}Z")
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, with milliseconds.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (date, h, m, s) = split(d);
    format!("{date}T{h:02}:{m:02}:{s:02}.{:03}Z", d.subsec_millis())
}

fn split(d: Duration) -> (String, u64, u64, u64) {
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, mo, day) = civil_from_days(days);
    (
        format!("{y:04}-{mo:02}-{day:02}"),
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
    )
}

/// Year, month, day of a count of days since 1970-01-01 (proleptic Gregorian; Howard
/// Hinnant's civil-from-days).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe.saturating_add(era.saturating_mul(400)) + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn matches_known_instants() {
        // Reference values from Python's datetime.
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(1_795_435_200)), "2026-11-23T12:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_795_468_629)), "2026-11-23T21:17:09Z");
        assert_eq!(rfc3339(at(4_102_444_799)), "2099-12-31T23:59:59Z");
        let t = at(1_795_468_629) + Duration::from_millis(7);
        assert_eq!(rfc3339_millis(t), "2026-11-23T21:17:09.007Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn days_walk_through_month_and_leap_boundaries() {
        // Day by day for 1,000 years, the date advances by exactly one calendar day.
        let mut prev = civil_from_days(-1);
        for day in 0..365_250 {
            let cur = civil_from_days(day);
            let (py, pm, pd) = prev;
            let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match pm {
                2 if leap(py) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let next = if pd < len {
                (py, pm, pd + 1)
            } else if pm < 12 {
                (py, pm + 1, 1)
            } else {
                (py + 1, 1, 1)
            };
            assert_eq!(cur, next, "day {day}");
            prev = cur;
        }
    }
}
