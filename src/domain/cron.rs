//! The daemon's periodic jobs run on six-field UTC cron expressions, seconds first
//! (`"0 * * * * *"`: every minute at second 0). A [`CronRule`] that exists parses.

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::Timestamp;

/// A six-field UTC cron expression.
#[derive(Clone)]
pub struct CronRule {
    expression: String,
    cron: Cron,
}

impl CronRule {
    /// Parses an expression of six fields (seconds, minutes, hours, day of month, month, day of
    /// week), in UTC.
    pub fn parse(s: &str) -> Result<CronRule, String> {
        let s = s.trim();
        let fields = s.split_whitespace().count();
        if fields != 6 {
            return Err(format!(
                "a UTC cron expression with six fields, seconds first, such as \"0 * * * * *\" (this one has {fields})"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .build()
            .parse(s)
            .map_err(|e| {
                format!("a UTC cron expression with six fields, seconds first, such as \"0 * * * * *\" ({e})")
            })?;
        Ok(CronRule {
            expression: s.to_string(),
            cron,
        })
    }

    /// `0 * * * * *`: every minute.
    pub fn every_minute() -> CronRule {
        #[allow(clippy::expect_used)]
        CronRule::parse("0 * * * * *").expect("a constant six-field expression parses")
    }

    /// The expression as written.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The latest fire time at or before `t`, if there is one within the search range.
    pub fn previous_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        let at = to_chrono(t)?;
        let found = self.cron.find_previous_occurrence(&at, true).ok()?;
        Timestamp::from_second(found.timestamp()).ok()
    }

    /// The first fire time after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let at = to_chrono(t)?;
        let found = self.cron.find_next_occurrence(&at, false).ok()?;
        Timestamp::from_second(found.timestamp()).ok()
    }
}

fn to_chrono(t: Timestamp) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(t.as_second(), 0).single()
}

impl fmt::Debug for CronRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronRule({})", self.expression)
    }
}

impl fmt::Display for CronRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

impl PartialEq for CronRule {
    fn eq(&self, other: &CronRule) -> bool {
        self.expression == other.expression
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn six_fields_parse_and_five_or_garbage_are_refused_with_an_example() {
        assert!(CronRule::parse("0 * * * * *").is_ok());
        assert!(CronRule::parse("0 30 3 * * *").is_ok());
        let five = CronRule::parse("* * * * *").unwrap_err();
        assert!(
            five.contains("six fields") && five.contains("has 5"),
            "{five}"
        );
        let bad = CronRule::parse("0 61 * * * *").unwrap_err();
        assert!(bad.contains("six fields"), "{bad}");
    }

    #[test]
    fn every_minute_is_a_rule() {
        assert_eq!(CronRule::every_minute().expression(), "0 * * * * *");
    }

    #[test]
    fn previous_and_next_fire_times_are_found_in_utc() {
        let daily = CronRule::parse("0 30 3 * * *").unwrap();
        assert_eq!(
            daily.previous_at_or_before(at("2026-12-03T09:00:00Z")),
            Some(at("2026-12-03T03:30:00Z"))
        );
        assert_eq!(
            daily.previous_at_or_before(at("2026-12-03T03:30:00Z")),
            Some(at("2026-12-03T03:30:00Z"))
        );
        assert_eq!(
            daily.next_after(at("2026-12-03T03:30:00Z")),
            Some(at("2026-12-04T03:30:00Z"))
        );
    }
}
