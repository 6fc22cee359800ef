//! Timestamps as the API serves them: RFC 3339 in UTC, always with a fractional part.
//!
//! Whole milliseconds are written with three digits (`2020-05-05T08:41:39.142Z`, as the
//! Go service and MongoDB do); finer values keep the precision they have.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// Formats a timestamp with at least millisecond precision.
pub fn format(t: &DateTime<Utc>) -> String {
    let nanos = t.timestamp_subsec_nanos();
    let precision = if nanos.is_multiple_of(1_000_000) {
        SecondsFormat::Millis
    } else if nanos.is_multiple_of(1_000) {
        SecondsFormat::Micros
    } else {
        SecondsFormat::Nanos
    };
    t.to_rfc3339_opts(precision, true)
}

/// The current time truncated to milliseconds, the precision every backend keeps.
pub fn now_millis() -> DateTime<Utc> {
    from_nanos(Utc::now().timestamp_millis().saturating_mul(1_000_000))
}

/// Nanoseconds since the Unix epoch (saturating far outside the year range of i64 ns).
pub fn to_nanos(t: &DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// Exact nanoseconds since the Unix epoch, for arithmetic on any pair of representable
/// times without overflow or saturation (unlike [`to_nanos`]).
pub fn to_nanos_exact(t: &DateTime<Utc>) -> i128 {
    i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos())
}

/// The instant `nanos` nanoseconds after the Unix epoch.
pub fn from_nanos(nanos: i64) -> DateTime<Utc> {
    Utc.timestamp_nanos(nanos)
}

/// serde `with` adapter for [`format`].
pub mod serde_rfc3339 {
    use super::*;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_milliseconds_keep_three_digits() {
        let t = from_nanos(1_588_668_099_142_000_000);
        assert_eq!(format(&t), "2020-05-05T08:41:39.142Z");
    }

    #[test]
    fn whole_seconds_still_have_a_fraction() {
        let t = from_nanos(1_588_668_099_000_000_000);
        assert_eq!(format(&t), "2020-05-05T08:41:39.000Z");
    }

    #[test]
    fn sub_millisecond_precision_is_kept() {
        let t = from_nanos(1_588_668_099_142_000_001);
        assert_eq!(format(&t), "2020-05-05T08:41:39.142000001Z");
        assert_eq!(to_nanos(&t), 1_588_668_099_142_000_001);
    }
}
