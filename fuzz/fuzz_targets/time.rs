//! RFC 3339 timestamps (`tube_proto::time`). tube-proto only formats them (there is no parser
//! to fuzz), so this target checks the formatter against an independent parser over any time
//! and any day count.
//!
//! - `rfc3339`, `rfc3339_millis` and `civil_from_days` never panic, for any time (times before
//!   the epoch print as the epoch) and any `i64` day count.
//! - The text is `YYYY-MM-DDTHH:MM:SSZ` (`.mmm` before the `Z` with millis) with a real
//!   calendar date, and reading it back gives the same second (and millisecond).
//! - `civil_from_days` gives a valid date that converts back to the same day count (Howard
//!   Hinnant's inverse, in i128), and the next day count gives the next calendar day.

#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tube_proto::time::{civil_from_days, rfc3339, rfc3339_millis};

#[derive(Debug, Arbitrary)]
struct Input {
    secs: u64,
    nanos: u32,
    before_epoch: bool,
    days: i64,
}

fuzz_target!(|input: Input| {
    let d = Duration::new(input.secs, input.nanos % 1_000_000_000);
    let t = if input.before_epoch {
        UNIX_EPOCH.checked_sub(d)
    } else {
        UNIX_EPOCH.checked_add(d)
    };
    if let Some(t) = t {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let text = rfc3339(t);
        assert_eq!(
            read_back(&text, false),
            Some((since.as_secs(), 0)),
            "{text}"
        );
        let text = rfc3339_millis(t);
        assert_eq!(
            read_back(&text, true),
            Some((since.as_secs(), since.subsec_millis())),
            "{text}"
        );
    }

    let (y, m, day) = civil_from_days(input.days);
    assert!((1..=12).contains(&m) && (1..=days_in_month(i128::from(y), m)).contains(&day));
    if (i64::MIN / 2..=i64::MAX / 2).contains(&input.days) {
        assert_eq!(
            days_from_civil(i128::from(y), m, day),
            i128::from(input.days),
            "{y}-{m}-{day}"
        );
        let next = civil_from_days(input.days + 1);
        let want = if day < days_in_month(i128::from(y), m) {
            (y, m, day + 1)
        } else if m < 12 {
            (y, m + 1, 1)
        } else {
            (y + 1, 1, 1)
        };
        assert_eq!(next, want, "day after {y}-{m}-{day}");
    }
});

/// Parses `YYYY-MM-DDTHH:MM:SS[.mmm]Z` into (seconds since the epoch, milliseconds).
fn read_back(text: &str, millis: bool) -> Option<(u64, u32)> {
    let rest = text.strip_suffix('Z')?;
    let (rest, ms) = if millis {
        let (rest, ms) = rest.rsplit_once('.')?;
        (ms.len() == 3).then_some(())?;
        (rest, ms.parse::<u32>().ok()?)
    } else {
        (rest, 0)
    };
    let (date, clock) = rest.split_once('T')?;
    let mut date = date.split('-');
    let (y, m, d) = (date.next()?, date.next()?, date.next()?);
    (date.next().is_none() && y.len() >= 4 && m.len() == 2 && d.len() == 2).then_some(())?;
    let mut clock = clock.split(':');
    let (h, mi, s) = (clock.next()?, clock.next()?, clock.next()?);
    (clock.next().is_none() && [h, mi, s].iter().all(|p| p.len() == 2)).then_some(())?;
    let (y, m, d): (i128, u32, u32) = (digits(y)?, digits(m)?, digits(d)?);
    let (h, mi, s): (i128, i128, i128) = (digits(h)?, digits(mi)?, digits(s)?);
    let valid = (1..=12).contains(&m)
        && (1..=days_in_month(y, m)).contains(&d)
        && h < 24
        && mi < 60
        && s < 60;
    valid.then_some(())?;
    let secs = days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + s;
    Some((u64::try_from(secs).ok()?, ms))
}

/// A number written with ASCII digits only (no sign, no blanks).
fn digits<T: std::str::FromStr>(p: &str) -> Option<T> {
    p.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
    p.parse().ok()
}

fn days_in_month(y: i128, m: u32) -> u32 {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i128, m: u32, d: u32) -> i128 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i128::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i128::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
