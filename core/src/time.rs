//! Event timestamps: microseconds since the Unix epoch, UTC.

use chrono::{DateTime, NaiveDate};

use crate::validate::EventError;

const MICROS_PER_SEC: i64 = 1_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Earliest accepted event time: 2000-01-01T00:00:00Z.
pub const MIN_EVENT_TIME: Timestamp = Timestamp(946_684_800 * MICROS_PER_SEC);
/// First rejected event time: 2100-01-01T00:00:00Z.
pub const MAX_EVENT_TIME: Timestamp = Timestamp(4_102_444_800 * MICROS_PER_SEC);

/// A UTC instant with microsecond precision (the data set's CDC sources carry micros).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Timestamp(pub i64);

impl ArchivedTimestamp {
    pub fn get(&self) -> Timestamp {
        Timestamp(self.0.to_native())
    }
}

impl Timestamp {
    pub fn from_secs(secs: i64) -> Self {
        Self(secs * MICROS_PER_SEC)
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    pub fn secs(self) -> i64 {
        self.0.div_euclid(MICROS_PER_SEC)
    }

    /// Seconds from `earlier` to `self` as f32 (negative when `earlier` is later).
    pub fn secs_since(self, earlier: Timestamp) -> f32 {
        ((self.0 - earlier.0) as f64 / MICROS_PER_SEC as f64) as f32
    }

    /// Day of the week in UTC, Monday = 0 … Sunday = 6.
    pub fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (3 with Monday = 0).
        (self.secs().div_euclid(SECS_PER_DAY) + 3).rem_euclid(7) as u32
    }

    /// Hour of the day in UTC, 0 … 23.
    pub fn hour(self) -> u32 {
        (self.secs().rem_euclid(SECS_PER_DAY) / 3600) as u32
    }

    /// Parses every accepted form: the data set's `2019-10-01 00:00:00 UTC`,
    /// RFC 3339 / ISO-8601 with offset (Debezium's ZonedTimestamp), and epoch
    /// microseconds written as digits.
    pub fn parse(text: &str) -> Result<Self, EventError> {
        let text = text.trim();
        let bad = || EventError::BadTimestamp {
            value: truncate(text),
        };
        let ts = if let Some(ts) = parse_dataset_form(text) {
            ts
        } else if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            Timestamp(text.parse::<i64>().map_err(|_| bad())?)
        } else if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
            Timestamp(dt.timestamp_micros())
        } else if let Ok(dt) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f %z") {
            Timestamp(dt.timestamp_micros())
        } else {
            return Err(bad());
        };
        ts.check_range()
    }

    /// Epoch microseconds as sent by producers that use integers.
    pub fn from_epoch_micros(micros: i64) -> Result<Self, EventError> {
        Timestamp(micros).check_range()
    }

    fn check_range(self) -> Result<Self, EventError> {
        if self < MIN_EVENT_TIME || self >= MAX_EVENT_TIME {
            return Err(EventError::TimestampOutOfRange { micros: self.0 });
        }
        Ok(self)
    }

    /// The data set's CSV form, `2019-10-01 00:00:00 UTC` (sub-second part dropped).
    pub fn write_dataset_form(self, out: &mut Vec<u8>) {
        let secs = self.secs();
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let date =
            NaiveDate::from_num_days_from_ce_opt(days as i32 + 719_163).unwrap_or(NaiveDate::MIN);
        use chrono::Datelike;
        push_digits(out, date.year() as u32, 4);
        out.push(b'-');
        push_digits(out, date.month(), 2);
        out.push(b'-');
        push_digits(out, date.day(), 2);
        out.push(b' ');
        push_digits(out, (sod / 3600) as u32, 2);
        out.push(b':');
        push_digits(out, (sod / 60 % 60) as u32, 2);
        out.push(b':');
        push_digits(out, (sod % 60) as u32, 2);
        out.extend_from_slice(b" UTC");
    }

    pub fn to_dataset_form(self) -> String {
        let mut out = Vec::with_capacity(23);
        self.write_dataset_form(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// RFC 3339 in UTC with microseconds, for JSON output.
    pub fn to_rfc3339(self) -> String {
        DateTime::from_timestamp_micros(self.0)
            .map(|dt| dt.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .unwrap_or_default()
    }
}

fn push_digits(out: &mut Vec<u8>, mut value: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Fast path for the exact 23-byte `YYYY-MM-DD HH:MM:SS UTC` layout that every
/// row of the data set uses; anything else goes to chrono's general parsers.
fn parse_dataset_form(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    if b.len() != 23 || &b[19..] != b" UTC" {
        return None;
    }
    if b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let date = NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let time = date.and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)?;
    Some(Timestamp(time.and_utc().timestamp_micros()))
}

pub(crate) fn truncate(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_forms_agree() {
        let expect = Timestamp::from_secs(1_569_888_000); // 2019-10-01T00:00:00Z
        for text in [
            "2019-10-01 00:00:00 UTC",
            "2019-10-01T00:00:00Z",
            "2019-10-01T02:00:00+02:00",
            "2019-10-01T00:00:00.000000Z",
            "1569888000000000",
            "2019-10-01 00:00:00 +0000",
        ] {
            assert_eq!(Timestamp::parse(text).unwrap(), expect, "{text}");
        }
    }

    #[test]
    fn weekday_and_hour() {
        let t = Timestamp::parse("2019-10-01 13:45:00 UTC").unwrap(); // a Tuesday
        assert_eq!(t.weekday(), 1);
        assert_eq!(t.hour(), 13);
        let sunday = Timestamp::parse("2019-10-06 23:59:59 UTC").unwrap();
        assert_eq!(sunday.weekday(), 6);
        assert_eq!(sunday.hour(), 23);
    }

    #[test]
    fn dataset_form_round_trips() {
        for text in [
            "2019-10-01 00:00:00 UTC",
            "2024-02-29 23:59:59 UTC",
            "2000-01-01 00:00:00 UTC",
        ] {
            assert_eq!(Timestamp::parse(text).unwrap().to_dataset_form(), text);
        }
    }

    #[test]
    fn rejects_bad_and_out_of_range() {
        assert!(matches!(
            Timestamp::parse("yesterday"),
            Err(EventError::BadTimestamp { .. })
        ));
        assert!(matches!(
            Timestamp::parse("2019-13-01 00:00:00 UTC"),
            Err(EventError::BadTimestamp { .. })
        ));
        assert!(matches!(
            Timestamp::parse("1899-10-01 00:00:00 UTC"),
            Err(EventError::TimestampOutOfRange { .. })
        ));
        assert!(matches!(
            Timestamp::parse("0"),
            Err(EventError::TimestampOutOfRange { .. })
        ));
        assert!(Timestamp::parse("99999999999999999999999").is_err());
    }
}
