//! `google.protobuf.Timestamp` ⇄ `time::OffsetDateTime`: the one conversion of follow.

use prost_types::Timestamp;
use time::OffsetDateTime;

/// `t` as a protobuf timestamp (exact: nanoseconds are kept).
pub fn timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        // Always below 10^9, so it fits.
        nanos: i32::try_from(t.nanosecond()).unwrap_or(i32::MAX),
    }
}

/// A protobuf timestamp as a UTC time; `None` when it is out of range or not normalized.
pub fn from_timestamp(t: &Timestamp) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()?
        .replace_nanosecond(u32::try_from(t.nanos).ok()?)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_out_of_range() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_123_456_789).unwrap();
        assert_eq!(from_timestamp(&timestamp(t)), Some(t));
        for bad in [
            Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
            Timestamp {
                seconds: 0,
                nanos: -1,
            },
            Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            },
        ] {
            assert_eq!(from_timestamp(&bad), None, "{bad:?}");
        }
    }
}
