//! Payment schedules: the recurrence rules members pick ("the 1st of every
//! month at 09:00 America/Los_Angeles"), their validation, and the lazy
//! expansion of a rule into dated, zoned occurrences that the planner charges.
//!
//! Everything here is pure calendar arithmetic on top of `jiff`: no I/O, no
//! clock reads (the caller resolves "now" before building a schedule).
//!
//! Conventions decided here:
//! - Supported dates are 0001-01-01 ..= 9999-12-31, so every date prints as
//!   `YYYY-MM-DD` and an [`OccurrenceKey`] always parses back.
//! - Local times are resolved like RFC 5545 (jiff's `compatible`
//!   disambiguation): a time skipped by DST moves forward by the gap, a
//!   repeated time means its first occurrence.
//! - Business-day moves never pass [`MAX_NON_BUSINESS_RUN_DAYS`], so a moved
//!   occurrence can never overtake the next one (nominal dates of month-based
//!   rules are at least 28 days apart).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ZonedDateTime};
use serde::{Deserialize, Serialize};

/// Largest `n` accepted by `Every { n, unit: Days }`.
pub const MAX_EVERY_DAYS: u32 = 366;
/// Largest `n` accepted by `Every { n, unit: Weeks }`.
pub const MAX_EVERY_WEEKS: u32 = 52;
/// Largest `n` accepted by `Every { n, unit: Months }` (12 = yearly).
pub const MAX_EVERY_MONTHS: u32 = 12;
/// Longest run of consecutive non-business days (weekends plus holidays) a
/// business-day schedule accepts. Longer runs are refused at construction;
/// this also caps the search for the next business day, so a holiday list
/// covering everything cannot loop. It must stay below 28 days (the
/// shortest gap between two nominal dates of a month-based rule) so that
/// moved occurrences keep their order.
pub const MAX_NON_BUSINESS_RUN_DAYS: i64 = 21;

const MIN_YEAR: i16 = 1;
const MAX_YEAR: i16 = 9999;
const SECONDS_PER_DAY: i64 = 86_400;

/// Unit of an `Every { n, unit }` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Days,
    Weeks,
    Months,
}

impl Unit {
    /// Largest interval accepted for this unit.
    pub fn max_interval(self) -> u32 {
        match self {
            Unit::Days => MAX_EVERY_DAYS,
            Unit::Weeks => MAX_EVERY_WEEKS,
            Unit::Months => MAX_EVERY_MONTHS,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Unit::Days => "days",
            Unit::Weeks => "weeks",
            Unit::Months => "months",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Unit::Days => "day",
            Unit::Weeks => "week",
            Unit::Months => "month",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Unit {
    type Err = RecurrenceError;

    /// Accepts `days`, `weeks`, `months`, also singular and in any case,
    /// because CLI users type "every 1 week" as readily as "every 2 weeks".
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Unit::Days, Unit::Weeks, Unit::Months]
            .into_iter()
            .find(|u| s.eq_ignore_ascii_case(u.as_str()) || s.eq_ignore_ascii_case(u.singular()))
            .ok_or_else(|| RecurrenceError::InvalidUnit {
                input: super::text::escape(s),
            })
    }
}

/// What dates a schedule falls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Rule {
    /// A single payment on `on`; the spec's start is replaced by `on`.
    Once { on: Date },
    /// Day `day` (1..=31) of every month, clamped to the month's last day.
    Monthly { day: u8 },
    /// Every `n` units from the start date; month steps keep the start's day
    /// as anchor.
    Every { n: u32, unit: Unit },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rule::Once { on } => write!(f, "once on {on}"),
            Rule::Monthly { day } => write!(f, "monthly on day {day}"),
            Rule::Every { n: 1, unit } => write!(f, "every {}", unit.singular()),
            Rule::Every { n, unit } => write!(f, "every {n} {unit}"),
        }
    }
}

/// What happens to a recurring schedule's occurrences that fell due while nothing charged
/// (downtime, a charging pause): `payments.misfire`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Misfire {
    /// One charge for the latest; the earlier ones are recorded as missed.
    Coalesce,
    /// A charge for each (within `payments.max_lateness`).
    Each,
}

/// An extra payment before the rule's first date, charging the usual amount.
///
/// Its local date is compared with the first regular occurrence's nominal
/// date: after it is refused, on it merges into that occurrence (due at the
/// earlier instant). It is never moved to a business day, since the member
/// picked it explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstPayment {
    /// At this instant (the caller's "now" when the schedule was created).
    Now(Timestamp),
    /// On this local date, at the schedule's time of day.
    On(Date),
}

/// When the regular occurrences stop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum End {
    #[default]
    Never,
    /// Last nominal date allowed, inclusive.
    Until(Date),
    /// Number of regular occurrences; a separate first payment is not
    /// counted.
    Count(u32),
}

/// The plain description of a schedule, as stored and as given by callers.
/// [`Recurrence::new`] validates and normalizes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecurrenceSpec {
    pub rule: Rule,
    /// Local time of day, whole minutes only.
    pub at: Time,
    /// IANA time zone name, e.g. `America/New_York`.
    pub time_zone: String,
    /// First date the rule may fall on.
    pub start: Date,
    #[serde(default)]
    pub first_payment: Option<FirstPayment>,
    #[serde(default)]
    pub end: End,
    #[serde(default)]
    pub business_days: bool,
    /// Only consulted when `business_days` is set.
    #[serde(default)]
    pub holidays: Vec<Date>,
}

/// Why a schedule or a CLI value was refused. Messages name the problem and
/// the fix, because they are shown to members as-is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecurrenceError {
    #[error("unknown time zone '{name}'; use an IANA name such as America/New_York")]
    UnknownTimeZone { name: String },
    #[error("day {day} is out of range; use 1 to 31")]
    DayOutOfRange { day: u8 },
    #[error("every {n} {unit} is out of range; use 1 to {max} {unit}")]
    IntervalOutOfRange { n: u32, unit: Unit, max: u32 },
    #[error("time of day {at} is not a whole minute; use HH:MM such as 09:00")]
    TimeNotWholeMinutes { at: Time },
    #[error("date {date} is outside the supported range; use a date from 0001-01-01 to 9999-12-31")]
    DateOutOfRange { date: Date },
    #[error(
        "no date for '{rule}' on or after {start} within the supported range; use an earlier start date"
    )]
    NoOccurrence { rule: Rule, start: Date },
    #[error("an end count of 0 never charges; use a count of 1 or more")]
    ZeroCount,
    #[error(
        "--until {until} is before the first payment date {first}; use a date on or after {first}"
    )]
    UntilBeforeFirst { until: Date, first: Date },
    #[error(
        "first payment on {first_payment} is after the schedule's first date {first}; pick a first payment on or before {first}, or drop it"
    )]
    FirstPaymentAfterFirstDate { first_payment: Date, first: Date },
    #[error(
        "a one-time schedule cannot have a separate first payment; drop the first payment or use a recurring rule"
    )]
    FirstPaymentWithOnce,
    #[error(
        "business days apply only to monthly and every-N-months rules, not '{rule}'; drop the business-day option or use a month-based rule"
    )]
    BusinessDaysNotSupported { rule: Rule },
    #[error(
        "holidays and weekends leave no business day for more than {max} days starting {from}; check the holiday list (at most {max} consecutive non-business days)",
        max = MAX_NON_BUSINESS_RUN_DAYS
    )]
    NoBusinessDay { from: Date },
    #[error("invalid time of day '{input}'; use 24-hour HH:MM such as 09:00")]
    InvalidTimeOfDay { input: String },
    #[error("invalid date '{input}'; use YYYY-MM-DD such as 2026-12-01")]
    InvalidDate { input: String },
    #[error("unknown unit '{input}'; use days, weeks or months")]
    InvalidUnit { input: String },
    #[error("invalid occurrence key '{input}'; expected YYYY-MM-DD or first:YYYY-MM-DD")]
    InvalidOccurrenceKey { input: String },
}

/// Parses a CLI time of day: 24-hour `HH:MM` (a one-digit hour is accepted).
pub fn parse_time_of_day(s: &str) -> Result<Time, RecurrenceError> {
    let invalid = || RecurrenceError::InvalidTimeOfDay {
        input: super::text::escape(s),
    };
    let (h, m) = s.split_once(':').ok_or_else(invalid)?;
    if !(1..=2).contains(&h.len()) || m.len() != 2 {
        return Err(invalid());
    }
    let hour = parse_digits(h).ok_or_else(invalid)?;
    let minute = parse_digits(m).ok_or_else(invalid)?;
    let hour = i8::try_from(hour).map_err(|_| invalid())?;
    let minute = i8::try_from(minute).map_err(|_| invalid())?;
    Time::new(hour, minute, 0, 0).map_err(|_| invalid())
}

/// Parses a CLI date: exactly `YYYY-MM-DD`, and the day must exist. Errors (here and in the
/// other parsers) repeat the input with control and direction characters escaped.
pub fn parse_date(s: &str) -> Result<Date, RecurrenceError> {
    let invalid = || RecurrenceError::InvalidDate {
        input: super::text::escape(s),
    };
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(invalid());
    }
    let year = parse_digits(&s[0..4]).ok_or_else(invalid)?;
    let month = parse_digits(&s[5..7]).ok_or_else(invalid)?;
    let day = parse_digits(&s[8..10]).ok_or_else(invalid)?;
    let year = i16::try_from(year).map_err(|_| invalid())?;
    let month = i8::try_from(month).map_err(|_| invalid())?;
    let day = i8::try_from(day).map_err(|_| invalid())?;
    if year < MIN_YEAR {
        return Err(invalid());
    }
    Date::new(year, month, day).map_err(|_| invalid())
}

/// ASCII digits only: `str::parse` would also take a sign.
fn parse_digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether an occurrence is the optional first payment or a regular one.
/// `First` orders before `Regular` so that keys sort in due order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OccurrenceKind {
    First,
    Regular,
}

/// Identity of an occurrence within its schedule, stable across
/// business-day moves. Displayed as `2026-12-01` (regular) or
/// `first:2026-11-30`; that string is what the database stores.
///
/// Ordering is by nominal date, then `First` before `Regular`, which is the
/// schedule's due order (it is not the lexicographic order of the strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct OccurrenceKey {
    pub kind: OccurrenceKind,
    pub nominal: Date,
}

const FIRST_KEY_PREFIX: &str = "first:";

impl fmt::Display for OccurrenceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            OccurrenceKind::First => write!(f, "{FIRST_KEY_PREFIX}{}", self.nominal),
            OccurrenceKind::Regular => write!(f, "{}", self.nominal),
        }
    }
}

impl FromStr for OccurrenceKey {
    type Err = RecurrenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, date) = match s.strip_prefix(FIRST_KEY_PREFIX) {
            Some(rest) => (OccurrenceKind::First, rest),
            None => (OccurrenceKind::Regular, s),
        };
        let nominal = parse_date(date).map_err(|_| RecurrenceError::InvalidOccurrenceKey {
            input: super::text::escape(s),
        })?;
        Ok(OccurrenceKey { kind, nominal })
    }
}

impl From<OccurrenceKey> for String {
    fn from(key: OccurrenceKey) -> String {
        key.to_string()
    }
}

impl TryFrom<String> for OccurrenceKey {
    type Error = RecurrenceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl Ord for OccurrenceKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.nominal
            .cmp(&other.nominal)
            .then(self.kind.cmp(&other.kind))
    }
}

impl PartialOrd for OccurrenceKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One payment of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occurrence {
    pub key: OccurrenceKey,
    /// Position among regular occurrences, from 0; `None` for a separate
    /// first payment.
    pub index: Option<u32>,
    /// Local date the payment is due, after any business-day move (for a
    /// first payment merged into occurrence 0 at an earlier instant, the
    /// date of that instant).
    pub due_date: Date,
    /// Local due date-time in the schedule's zone.
    pub local: ZonedDateTime,
    pub due_at: Timestamp,
}

/// How the rule's dates are generated; precomputed so that the k-th nominal
/// date is O(1) and never derived from the previous (clamped) one.
#[derive(Clone, Copy, Debug)]
enum Cadence {
    Once(Date),
    /// `start + k * step` days.
    Days {
        start: Date,
        step: i64,
    },
    /// Month `first_month + k * step` (months since year 0), on `day`
    /// clamped to the month's length.
    MonthDay {
        first_month: i64,
        step: i64,
        day: i8,
    },
}

/// The first payment after resolving it against the rule's first date.
#[derive(Clone, Debug)]
enum FirstResolved {
    None,
    /// Its own occurrence, due strictly before the first regular one.
    Separate(ZonedDateTime),
    /// Folded into regular occurrence 0, which is due no later than this.
    Merged(Timestamp),
}

/// A validated schedule. Build with [`Recurrence::new`]; serializes as its
/// [`RecurrenceSpec`] and re-validates when deserialized.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "RecurrenceSpec", try_from = "RecurrenceSpec")]
pub struct Recurrence {
    spec: RecurrenceSpec,
    tz: TimeZone,
    cadence: Cadence,
    first_date: Date,
    first: FirstResolved,
}

impl PartialEq for Recurrence {
    /// Everything else is derived from the normalized spec.
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for Recurrence {}

impl From<Recurrence> for RecurrenceSpec {
    fn from(r: Recurrence) -> RecurrenceSpec {
        r.spec
    }
}

impl TryFrom<RecurrenceSpec> for Recurrence {
    type Error = RecurrenceError;

    fn try_from(spec: RecurrenceSpec) -> Result<Self, Self::Error> {
        Recurrence::new(spec)
    }
}

impl Recurrence {
    /// Validates `spec` and normalizes it: the zone name becomes its
    /// canonical IANA spelling, holidays are sorted and deduplicated, and a
    /// `Once` rule's start becomes its date.
    pub fn new(mut spec: RecurrenceSpec) -> Result<Recurrence, RecurrenceError> {
        let tz = TimeZone::get(&spec.time_zone).map_err(|_| RecurrenceError::UnknownTimeZone {
            name: super::text::escape(&spec.time_zone),
        })?;
        if let Some(name) = tz.iana_name()
            && name != spec.time_zone
        {
            spec.time_zone = name.to_owned();
        }

        if spec.at.second() != 0 || spec.at.subsec_nanosecond() != 0 {
            return Err(RecurrenceError::TimeNotWholeMinutes { at: spec.at });
        }

        match spec.rule {
            Rule::Once { on } => spec.start = on,
            Rule::Monthly { day } if !(1..=31).contains(&day) => {
                return Err(RecurrenceError::DayOutOfRange { day });
            }
            Rule::Every { n, unit } if n == 0 || n > unit.max_interval() => {
                return Err(RecurrenceError::IntervalOutOfRange {
                    n,
                    unit,
                    max: unit.max_interval(),
                });
            }
            Rule::Monthly { .. } | Rule::Every { .. } => {}
        }
        check_supported(spec.start)?;

        if spec.business_days && !supports_business_days(spec.rule) {
            return Err(RecurrenceError::BusinessDaysNotSupported { rule: spec.rule });
        }
        spec.holidays.sort_unstable();
        spec.holidays.dedup();
        if spec.business_days {
            check_holiday_runs(&spec.holidays)?;
        }

        let cadence = cadence_for(&spec);
        let first_date = nominal_date(cadence, 0).ok_or(RecurrenceError::NoOccurrence {
            rule: spec.rule,
            start: spec.start,
        })?;

        match spec.end {
            End::Count(0) => return Err(RecurrenceError::ZeroCount),
            End::Until(until) if until < first_date => {
                return Err(RecurrenceError::UntilBeforeFirst {
                    until,
                    first: first_date,
                });
            }
            End::Never | End::Until(_) | End::Count(_) => {}
        }

        let mut recurrence = Recurrence {
            spec,
            tz,
            cadence,
            first_date,
            first: FirstResolved::None,
        };
        // Regular occurrence 0 is needed to resolve the first payment, and
        // must exist anyway: a schedule that can never be charged is refused.
        let regular0 = recurrence.regular(0).ok_or(RecurrenceError::NoOccurrence {
            rule: recurrence.spec.rule,
            start: recurrence.spec.start,
        })?;
        recurrence.first = recurrence.resolve_first_payment(&regular0)?;
        Ok(recurrence)
    }

    fn resolve_first_payment(
        &self,
        regular0: &Occurrence,
    ) -> Result<FirstResolved, RecurrenceError> {
        let Some(first_payment) = self.spec.first_payment else {
            return Ok(FirstResolved::None);
        };
        if matches!(self.spec.rule, Rule::Once { .. }) {
            return Err(RecurrenceError::FirstPaymentWithOnce);
        }
        let local = match first_payment {
            FirstPayment::Now(ts) => ts.to_zoned_datetime(self.tz.clone()),
            FirstPayment::On(date) => {
                check_supported(date)?;
                self.zoned(date)
                    .ok_or(RecurrenceError::DateOutOfRange { date })?
            }
        };
        let date = local.date();
        check_supported(date)?;
        if date > self.first_date {
            return Err(RecurrenceError::FirstPaymentAfterFirstDate {
                first_payment: date,
                first: self.first_date,
            });
        }
        // The second test only matters in zones whose clocks jump back over
        // midnight; merging keeps due order strict there too.
        if date == self.first_date || local.timestamp() >= regular0.due_at {
            Ok(FirstResolved::Merged(local.timestamp()))
        } else {
            Ok(FirstResolved::Separate(local))
        }
    }

    /// The normalized spec this schedule was built from.
    pub fn spec(&self) -> RecurrenceSpec {
        self.spec.clone()
    }

    pub fn rule(&self) -> Rule {
        self.spec.rule
    }

    pub fn at(&self) -> Time {
        self.spec.at
    }

    /// Canonical IANA name of the schedule's zone.
    pub fn time_zone_name(&self) -> &str {
        &self.spec.time_zone
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    pub fn start(&self) -> Date {
        self.spec.start
    }

    pub fn end(&self) -> End {
        self.spec.end
    }

    pub fn first_payment(&self) -> Option<FirstPayment> {
        self.spec.first_payment
    }

    pub fn business_days(&self) -> bool {
        self.spec.business_days
    }

    /// Sorted, without duplicates.
    pub fn holidays(&self) -> &[Date] {
        &self.spec.holidays
    }

    /// Nominal date of the first regular occurrence.
    pub fn first_date(&self) -> Date {
        self.first_date
    }

    /// The same schedule in another zone. Everything is re-validated: a
    /// `FirstPayment::Now` instant may land on a different local date there.
    pub fn with_time_zone(&self, tz: &str) -> Result<Recurrence, RecurrenceError> {
        let mut spec = self.spec.clone();
        tz.clone_into(&mut spec.time_zone);
        Recurrence::new(spec)
    }

    /// All occurrences in due order: the separate first payment, if any,
    /// then the regular ones until the end rule (or the end of the
    /// supported calendar).
    pub fn occurrences(&self) -> Occurrences<'_> {
        self.occurrences_starting(0)
    }

    /// The occurrences due at or after `from`, in due order. Skips ahead
    /// arithmetically rather than walking the schedule from its start.
    pub fn occurrences_from(&self, from: Timestamp) -> impl Iterator<Item = Occurrence> {
        // A due date is at most MAX_NON_BUSINESS_RUN_DAYS after its nominal
        // date, and zone offsets shift a local date by at most a day or so;
        // seeking a few days earlier than that is always safe.
        let local_from = from.to_zoned_datetime(self.tz.clone()).date();
        let seek = local_from
            .checked_sub(Span::new().days(MAX_NON_BUSINESS_RUN_DAYS + 3))
            .unwrap_or(local_from);
        self.occurrences_starting(self.seek_index(seek))
            .filter(move |o| o.due_at >= from)
    }

    /// The occurrence following `key`: the first one whose key orders after
    /// it. For a key this schedule produced, that is the next element of
    /// [`Recurrence::occurrences`]; a foreign key (say, from before an edit)
    /// still yields the next occurrence after its date.
    pub fn next_after(&self, key: &OccurrenceKey) -> Option<Occurrence> {
        self.occurrences_starting(self.seek_index(key.nominal))
            .find(|o| o.key > *key)
    }

    /// Human text, e.g. "monthly on day 31 at 09:00 America/New_York,
    /// business days, until 2027-06-30".
    pub fn describe(&self) -> String {
        let spec = &self.spec;
        let mut out = match spec.rule {
            Rule::Every { .. } => format!("{} from {}", spec.rule, spec.start),
            Rule::Once { .. } | Rule::Monthly { .. } => spec.rule.to_string(),
        };
        out.push_str(&format!(" at {} {}", hh_mm(spec.at), spec.time_zone));
        if spec.business_days {
            out.push_str(", business days");
            match spec.holidays.len() {
                0 => {}
                1 => out.push_str(" (1 holiday)"),
                n => out.push_str(&format!(" ({n} holidays)")),
            }
        }
        match spec.first_payment {
            None => {}
            Some(FirstPayment::On(date)) => out.push_str(&format!(", first payment {date}")),
            Some(FirstPayment::Now(ts)) => {
                let local = ts.to_zoned_datetime(self.tz.clone());
                out.push_str(&format!(
                    ", first payment {} {}",
                    local.date(),
                    hh_mm(local.time())
                ));
            }
        }
        match spec.end {
            End::Never => {}
            End::Until(date) => out.push_str(&format!(", until {date}")),
            End::Count(1) => out.push_str(", 1 payment"),
            End::Count(n) => out.push_str(&format!(", {n} payments")),
        }
        out
    }

    fn occurrences_starting(&self, index: u32) -> Occurrences<'_> {
        Occurrences {
            recurrence: self,
            next_index: index,
            first_pending: index == 0,
            done: false,
        }
    }

    /// A regular index `k` such that every index below it has a nominal
    /// date before `date`. Conservative (may be lower than the tightest
    /// bound); callers filter what follows.
    fn seek_index(&self, date: Date) -> u32 {
        let k = match self.cadence {
            Cadence::Once(_) => 0,
            Cadence::Days { start, step } => days_between(start, date).max(0) / step,
            Cadence::MonthDay {
                first_month, step, ..
            } => (month_index(date) - first_month).max(0) / step,
        };
        u32::try_from(k).unwrap_or(u32::MAX)
    }

    /// Regular occurrence `k`, or `None` past the end rule or the calendar.
    fn regular(&self, k: u32) -> Option<Occurrence> {
        if let End::Count(n) = self.spec.end
            && k >= n
        {
            return None;
        }
        let nominal = nominal_date(self.cadence, k)?;
        if let End::Until(until) = self.spec.end
            && nominal > until
        {
            return None;
        }
        let mut due_date = if self.spec.business_days {
            self.next_business_day(nominal)?
        } else {
            nominal
        };
        let mut local = self.zoned(due_date)?;
        if k == 0
            && let FirstResolved::Merged(ts) = self.first
            && ts < local.timestamp()
        {
            local = ts.to_zoned_datetime(self.tz.clone());
            due_date = local.date();
        }
        Some(Occurrence {
            key: OccurrenceKey {
                kind: OccurrenceKind::Regular,
                nominal,
            },
            index: Some(k),
            due_date,
            due_at: local.timestamp(),
            local,
        })
    }

    fn separate_first(&self) -> Option<Occurrence> {
        let FirstResolved::Separate(local) = &self.first else {
            return None;
        };
        Some(Occurrence {
            key: OccurrenceKey {
                kind: OccurrenceKind::First,
                nominal: local.date(),
            },
            index: None,
            due_date: local.date(),
            due_at: local.timestamp(),
            local: local.clone(),
        })
    }

    /// `date` at the schedule's time, RFC 5545 style (jiff `compatible`).
    fn zoned(&self, date: Date) -> Option<ZonedDateTime> {
        self.tz
            .to_zoned_datetime(date.to_datetime(self.spec.at))
            .ok()
    }

    fn is_business_day(&self, date: Date) -> bool {
        is_business_day(date, &self.spec.holidays)
    }

    /// `None` only when the calendar ends. Construction guarantees a
    /// business day within the cap; were it ever missed, the nominal date
    /// is kept rather than dropping a payment.
    fn next_business_day(&self, nominal: Date) -> Option<Date> {
        let mut date = nominal;
        for _ in 0..=MAX_NON_BUSINESS_RUN_DAYS {
            if self.is_business_day(date) {
                return Some(date);
            }
            date = date.tomorrow().ok()?;
        }
        Some(nominal)
    }
}

/// Lazy iterator over a schedule's occurrences; see
/// [`Recurrence::occurrences`]. Each step is O(1) date arithmetic plus one
/// zone conversion (O(log holidays) with business days).
#[derive(Clone, Debug)]
pub struct Occurrences<'a> {
    recurrence: &'a Recurrence,
    next_index: u32,
    first_pending: bool,
    done: bool,
}

impl Iterator for Occurrences<'_> {
    type Item = Occurrence;

    fn next(&mut self) -> Option<Occurrence> {
        if self.first_pending {
            self.first_pending = false;
            if let Some(first) = self.recurrence.separate_first() {
                return Some(first);
            }
        }
        if self.done {
            return None;
        }
        let Some(occurrence) = self.recurrence.regular(self.next_index) else {
            self.done = true;
            return None;
        };
        match self.next_index.checked_add(1) {
            Some(next) => self.next_index = next,
            None => self.done = true,
        }
        Some(occurrence)
    }
}

impl std::iter::FusedIterator for Occurrences<'_> {}

fn supports_business_days(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::Monthly { .. }
            | Rule::Every {
                unit: Unit::Months,
                ..
            }
    )
}

fn check_supported(date: Date) -> Result<(), RecurrenceError> {
    if date.year() < MIN_YEAR || date.year() > MAX_YEAR {
        return Err(RecurrenceError::DateOutOfRange { date });
    }
    Ok(())
}

fn is_business_day(date: Date, holidays: &[Date]) -> bool {
    !matches!(date.weekday(), Weekday::Saturday | Weekday::Sunday)
        && holidays.binary_search(&date).is_err()
}

/// Refuses holiday lists that, with weekends, close more than
/// MAX_NON_BUSINESS_RUN_DAYS days in a row. Only runs containing a holiday
/// need checking: weekends alone close two days.
fn check_holiday_runs(holidays: &[Date]) -> Result<(), RecurrenceError> {
    let closed = |d: Date| !is_business_day(d, holidays);
    let mut checked_through: Option<Date> = None;
    for &holiday in holidays {
        if checked_through.is_some_and(|end| holiday <= end) {
            continue;
        }
        let mut from = holiday;
        let mut to = holiday;
        let mut len = 1;
        while len <= MAX_NON_BUSINESS_RUN_DAYS
            && let Ok(prev) = from.yesterday()
            && closed(prev)
        {
            from = prev;
            len += 1;
        }
        while len <= MAX_NON_BUSINESS_RUN_DAYS
            && let Ok(next) = to.tomorrow()
            && closed(next)
        {
            to = next;
            len += 1;
        }
        if len > MAX_NON_BUSINESS_RUN_DAYS {
            return Err(RecurrenceError::NoBusinessDay { from });
        }
        checked_through = Some(to);
    }
    Ok(())
}

fn cadence_for(spec: &RecurrenceSpec) -> Cadence {
    let start = spec.start;
    match spec.rule {
        Rule::Once { on } => Cadence::Once(on),
        Rule::Monthly { day } => {
            // Validated to 1..=31 before we get here.
            let day = i8::try_from(day).unwrap_or(31);
            let in_start_month = day.min(start.days_in_month());
            let first_month = if in_start_month >= start.day() {
                month_index(start)
            } else {
                month_index(start) + 1
            };
            Cadence::MonthDay {
                first_month,
                step: 1,
                day,
            }
        }
        Rule::Every { n, unit } => {
            let n = i64::from(n);
            match unit {
                Unit::Days => Cadence::Days { start, step: n },
                Unit::Weeks => Cadence::Days { start, step: 7 * n },
                Unit::Months => Cadence::MonthDay {
                    first_month: month_index(start),
                    step: n,
                    day: start.day(),
                },
            }
        }
    }
}

/// Nominal date of regular occurrence `k`, computed from the anchor alone.
fn nominal_date(cadence: Cadence, k: u32) -> Option<Date> {
    let k = i64::from(k);
    let date = match cadence {
        Cadence::Once(on) => (k == 0).then_some(on)?,
        Cadence::Days { start, step } => {
            let days = Span::new().try_days(k.checked_mul(step)?).ok()?;
            start.checked_add(days).ok()?
        }
        Cadence::MonthDay {
            first_month,
            step,
            day,
        } => {
            let month = first_month.checked_add(k.checked_mul(step)?)?;
            date_in_month(month, day)?
        }
    };
    (date.year() <= MAX_YEAR).then_some(date)
}

/// Months since 0000-01.
fn month_index(date: Date) -> i64 {
    i64::from(date.year()) * 12 + i64::from(date.month()) - 1
}

/// `day` of the month at `index`, clamped to the month's last day.
fn date_in_month(index: i64, day: i8) -> Option<Date> {
    let year = i16::try_from(index.div_euclid(12)).ok()?;
    let month = i8::try_from(index.rem_euclid(12) + 1).ok()?;
    let first = Date::new(year, month, 1).ok()?;
    Date::new(year, month, day.min(first.days_in_month())).ok()
}

fn days_between(from: Date, to: Date) -> i64 {
    from.duration_until(to).as_secs() / SECONDS_PER_DAY
}

fn hh_mm(t: Time) -> String {
    format!("{:02}:{:02}", t.hour(), t.minute())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::{date, time};
    use jiff::tz::AmbiguousOffset;
    use proptest::prelude::*;

    /// Length of the DST gap `date` at `at` falls into in `tz`, if any; the
    /// tests use it to predict RFC 5545 moves.
    fn gap_seconds(tz: &TimeZone, date: Date, at: Time) -> Option<i64> {
        match tz.to_ambiguous_timestamp(date.to_datetime(at)).offset() {
            AmbiguousOffset::Gap { before, after } => {
                Some(i64::from(after.seconds()) - i64::from(before.seconds()))
            }
            AmbiguousOffset::Unambiguous { .. } | AmbiguousOffset::Fold { .. } => None,
        }
    }

    const NEW_YORK: &str = "America/New_York";

    fn spec(rule: Rule, start: Date) -> RecurrenceSpec {
        RecurrenceSpec {
            rule,
            at: time(9, 0, 0, 0),
            time_zone: "UTC".to_owned(),
            start,
            first_payment: None,
            end: End::Never,
            business_days: false,
            holidays: Vec::new(),
        }
    }

    fn nominals(r: &Recurrence, n: usize) -> Vec<Date> {
        r.occurrences().take(n).map(|o| o.key.nominal).collect()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn monthly_on_the_31st_falls_on_each_months_last_day_and_returns_to_31() {
        let r = Recurrence::new(spec(Rule::Monthly { day: 31 }, date(2027, 1, 1))).unwrap();
        assert_eq!(
            nominals(&r, 4),
            [
                date(2027, 1, 31),
                date(2027, 2, 28),
                date(2027, 3, 31),
                date(2027, 4, 30)
            ]
        );
    }

    #[test]
    fn monthly_on_the_31st_falls_on_february_29_in_a_leap_year() {
        let r = Recurrence::new(spec(Rule::Monthly { day: 31 }, date(2028, 1, 15))).unwrap();
        assert_eq!(
            nominals(&r, 3),
            [date(2028, 1, 31), date(2028, 2, 29), date(2028, 3, 31)]
        );
    }

    #[test]
    fn monthly_on_the_29th_uses_february_28_outside_leap_years_only() {
        let r = Recurrence::new(spec(Rule::Monthly { day: 29 }, date(2027, 2, 1))).unwrap();
        let feb: Vec<Date> = r
            .occurrences()
            .take(25)
            .map(|o| o.key.nominal)
            .filter(|d| d.month() == 2)
            .collect();
        assert_eq!(
            feb,
            [date(2027, 2, 28), date(2028, 2, 29), date(2029, 2, 28)]
        );
    }

    #[test]
    fn monthly_first_date_is_the_day_on_or_after_the_start() {
        let on_day = Recurrence::new(spec(Rule::Monthly { day: 15 }, date(2026, 3, 15))).unwrap();
        assert_eq!(on_day.first_date(), date(2026, 3, 15));
        let after_day =
            Recurrence::new(spec(Rule::Monthly { day: 15 }, date(2026, 3, 16))).unwrap();
        assert_eq!(after_day.first_date(), date(2026, 4, 15));
        let clamped = Recurrence::new(spec(Rule::Monthly { day: 31 }, date(2026, 2, 28))).unwrap();
        assert_eq!(clamped.first_date(), date(2026, 2, 28));
    }

    #[test]
    fn every_month_from_january_31_keeps_the_31st_as_anchor() {
        let rule = Rule::Every {
            n: 1,
            unit: Unit::Months,
        };
        let r = Recurrence::new(spec(rule, date(2026, 1, 31))).unwrap();
        assert_eq!(
            nominals(&r, 4),
            [
                date(2026, 1, 31),
                date(2026, 2, 28),
                date(2026, 3, 31),
                date(2026, 4, 30)
            ]
        );
    }

    #[test]
    fn every_three_months_from_november_30_keeps_the_anchor_across_february() {
        let rule = Rule::Every {
            n: 3,
            unit: Unit::Months,
        };
        let r = Recurrence::new(spec(rule, date(2027, 11, 30))).unwrap();
        assert_eq!(
            nominals(&r, 4),
            [
                date(2027, 11, 30),
                date(2028, 2, 29),
                date(2028, 5, 30),
                date(2028, 8, 30)
            ]
        );
    }

    #[test]
    fn every_two_weeks_steps_fourteen_days_from_the_start() {
        let rule = Rule::Every {
            n: 2,
            unit: Unit::Weeks,
        };
        let r = Recurrence::new(spec(rule, date(2026, 12, 24))).unwrap();
        assert_eq!(
            nominals(&r, 3),
            [date(2026, 12, 24), date(2027, 1, 7), date(2027, 1, 21)]
        );
    }

    #[test]
    fn every_three_days_steps_three_days_from_the_start() {
        let rule = Rule::Every {
            n: 3,
            unit: Unit::Days,
        };
        let r = Recurrence::new(spec(rule, date(2028, 2, 27))).unwrap();
        assert_eq!(
            nominals(&r, 3),
            [date(2028, 2, 27), date(2028, 3, 1), date(2028, 3, 4)]
        );
    }

    #[test]
    fn once_yields_a_single_occurrence_on_its_date_and_ignores_start() {
        let mut s = spec(
            Rule::Once {
                on: date(2026, 12, 1),
            },
            date(2020, 1, 1),
        );
        s.time_zone = NEW_YORK.to_owned();
        let r = Recurrence::new(s).unwrap();
        assert_eq!(r.start(), date(2026, 12, 1));
        let all: Vec<Occurrence> = r.occurrences().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].key.to_string(), "2026-12-01");
        assert_eq!(all[0].index, Some(0));
        assert_eq!(all[0].due_at, ts("2026-12-01T14:00:00Z"));
        assert_eq!(r.next_after(&all[0].key), None);
    }

    #[test]
    fn spring_forward_gap_moves_0230_to_0330_edt() {
        let mut s = spec(
            Rule::Once {
                on: date(2027, 3, 14),
            },
            date(2027, 3, 14),
        );
        s.time_zone = NEW_YORK.to_owned();
        s.at = time(2, 30, 0, 0);
        let o = Recurrence::new(s).unwrap().occurrences().next().unwrap();
        assert_eq!(o.local.time(), time(3, 30, 0, 0));
        assert_eq!(o.local.offset().seconds(), -4 * 3600);
        assert_eq!(o.due_date, date(2027, 3, 14));
        assert_eq!(o.due_at, ts("2027-03-14T07:30:00Z"));
    }

    #[test]
    fn fall_back_fold_runs_0130_once_at_its_first_edt_occurrence() {
        let mut s = spec(
            Rule::Every {
                n: 1,
                unit: Unit::Days,
            },
            date(2026, 10, 31),
        );
        s.time_zone = NEW_YORK.to_owned();
        s.at = time(1, 30, 0, 0);
        s.end = End::Until(date(2026, 11, 2));
        let all: Vec<Occurrence> = Recurrence::new(s).unwrap().occurrences().collect();
        let on_nov_1: Vec<&Occurrence> = all
            .iter()
            .filter(|o| o.due_date == date(2026, 11, 1))
            .collect();
        assert_eq!(on_nov_1.len(), 1);
        assert_eq!(on_nov_1[0].local.offset().seconds(), -4 * 3600);
        assert_eq!(on_nov_1[0].due_at, ts("2026-11-01T05:30:00Z"));
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn half_hour_gap_in_lord_howe_moves_the_time_by_thirty_minutes() {
        // Lord Howe springs forward 02:00 -> 02:30 on the first Sunday of October.
        let mut s = spec(
            Rule::Once {
                on: date(2026, 10, 4),
            },
            date(2026, 10, 4),
        );
        s.time_zone = "Australia/Lord_Howe".to_owned();
        s.at = time(2, 10, 0, 0);
        let o = Recurrence::new(s).unwrap().occurrences().next().unwrap();
        assert_eq!(o.local.time(), time(2, 40, 0, 0));
        assert_eq!(o.due_at, ts("2026-10-03T15:40:00Z"));
    }

    #[test]
    fn occurrences_from_decades_later_seeks_instead_of_walking() {
        let rule = Rule::Every {
            n: 1,
            unit: Unit::Days,
        };
        let r = Recurrence::new(spec(rule, date(2000, 1, 1))).unwrap();
        let o = r
            .occurrences_from(ts("2090-06-15T09:00:00Z"))
            .next()
            .unwrap();
        assert_eq!(o.key.nominal, date(2090, 6, 15));
        assert_eq!(o.index, Some(33_038));
        assert_eq!(r.next_after(&o.key).unwrap().key.nominal, date(2090, 6, 16));
    }

    #[test]
    fn business_days_move_a_saturday_to_monday_and_keep_the_nominal_date() {
        assert_eq!(date(2026, 8, 1).weekday(), Weekday::Saturday);
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 8, 1));
        s.business_days = true;
        s.time_zone = NEW_YORK.to_owned();
        let o = Recurrence::new(s).unwrap().occurrences().next().unwrap();
        assert_eq!(o.key.to_string(), "2026-08-01");
        assert_eq!(o.due_date, date(2026, 8, 3));
        assert_eq!(o.local.date(), date(2026, 8, 3));
        assert_eq!(o.due_at, ts("2026-08-03T13:00:00Z"));
    }

    #[test]
    fn business_days_move_past_a_holiday_after_a_weekend() {
        // Sat 2026-09-05, Sun 09-06, Labor Day Mon 09-07.
        assert_eq!(date(2026, 9, 5).weekday(), Weekday::Saturday);
        let mut s = spec(Rule::Monthly { day: 5 }, date(2026, 9, 1));
        s.business_days = true;
        s.holidays = vec![date(2026, 9, 7)];
        let all: Vec<Occurrence> = Recurrence::new(s).unwrap().occurrences().take(2).collect();
        assert_eq!(all[0].key.nominal, date(2026, 9, 5));
        assert_eq!(all[0].due_date, date(2026, 9, 8));
        // Monday 2026-10-05 needs no move.
        assert_eq!(all[1].due_date, date(2026, 10, 5));
        assert_eq!(all[1].key.nominal, date(2026, 10, 5));
    }

    #[test]
    fn business_days_are_refused_for_a_weekly_rule() {
        let mut s = spec(
            Rule::Every {
                n: 1,
                unit: Unit::Weeks,
            },
            date(2026, 1, 1),
        );
        s.business_days = true;
        let err = Recurrence::new(s).unwrap_err();
        assert!(matches!(
            err,
            RecurrenceError::BusinessDaysNotSupported { .. }
        ));
        assert!(err.to_string().contains("every week"), "{err}");
    }

    #[test]
    fn a_holiday_list_closing_every_day_is_refused_instead_of_looping() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 1, 1));
        s.business_days = true;
        s.holidays = date(2026, 1, 1)
            .series(Span::new().days(1))
            .take(400)
            .collect();
        let err = Recurrence::new(s).unwrap_err();
        assert_eq!(
            err,
            RecurrenceError::NoBusinessDay {
                from: date(2026, 1, 1)
            }
        );
    }

    #[test]
    fn a_twenty_day_closure_is_accepted_and_a_longer_one_refused() {
        // Weekdays Tue 2026-12-15 ..= Fri 2027-01-01 closed, then a weekend:
        // 20 days without a business day.
        let closure: Vec<Date> = date(2026, 12, 15)
            .series(Span::new().days(1))
            .take_while(|d| *d <= date(2027, 1, 1))
            .filter(|d| is_business_day(*d, &[]))
            .collect();
        let mut s = spec(Rule::Monthly { day: 15 }, date(2026, 12, 1));
        s.business_days = true;
        s.holidays = closure.clone();
        let all: Vec<Occurrence> = Recurrence::new(s.clone())
            .unwrap()
            .occurrences()
            .take(2)
            .collect();
        assert_eq!(all[0].key.nominal, date(2026, 12, 15));
        assert_eq!(all[0].due_date, date(2027, 1, 4));
        assert_eq!(all[1].due_date, date(2027, 1, 15));

        // Closing Monday too joins the weekend before: 23 days.
        s.holidays.push(date(2026, 12, 14));
        assert_eq!(
            Recurrence::new(s).unwrap_err(),
            RecurrenceError::NoBusinessDay {
                from: date(2026, 12, 12)
            }
        );
    }

    #[test]
    fn first_payment_now_is_a_separate_occurrence_before_the_first_date() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 11, 15));
        s.time_zone = NEW_YORK.to_owned();
        s.first_payment = Some(FirstPayment::Now(ts("2026-11-15T17:03:27Z")));
        let r = Recurrence::new(s).unwrap();
        let all: Vec<Occurrence> = r.occurrences().take(2).collect();
        assert_eq!(all[0].key.to_string(), "first:2026-11-15");
        assert_eq!(all[0].index, None);
        assert_eq!(all[0].due_at, ts("2026-11-15T17:03:27Z"));
        assert_eq!(all[0].local.time(), time(12, 3, 27, 0));
        assert_eq!(all[1].key.to_string(), "2026-12-01");
        assert_eq!(all[1].index, Some(0));
        assert_eq!(r.next_after(&all[0].key), Some(all[1].clone()));
    }

    #[test]
    fn first_payment_now_uses_the_local_date_in_the_zone() {
        // 03:00Z on the 16th is still the 15th in New York.
        let mut s = spec(Rule::Monthly { day: 16 }, date(2026, 11, 15));
        s.time_zone = NEW_YORK.to_owned();
        s.first_payment = Some(FirstPayment::Now(ts("2026-11-16T03:00:00Z")));
        let first = Recurrence::new(s).unwrap().occurrences().next().unwrap();
        assert_eq!(first.key.to_string(), "first:2026-11-15");
    }

    #[test]
    fn first_payment_on_a_date_is_due_at_the_schedules_time() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 12, 1));
        s.first_payment = Some(FirstPayment::On(date(2026, 11, 20)));
        let first = Recurrence::new(s).unwrap().occurrences().next().unwrap();
        assert_eq!(first.key.to_string(), "first:2026-11-20");
        assert_eq!(first.due_at, ts("2026-11-20T09:00:00Z"));
    }

    #[test]
    fn first_payment_on_the_first_date_merges_into_the_regular_occurrence() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 12, 1));
        s.first_payment = Some(FirstPayment::On(date(2026, 12, 1)));
        let all: Vec<Occurrence> = Recurrence::new(s).unwrap().occurrences().take(2).collect();
        assert_eq!(all[0].key.to_string(), "2026-12-01");
        assert_eq!(all[0].index, Some(0));
        assert_eq!(all[0].due_at, ts("2026-12-01T09:00:00Z"));
        assert_eq!(all[1].key.to_string(), "2027-01-01");
    }

    #[test]
    fn first_payment_now_on_the_first_date_merges_at_the_earlier_instant() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 12, 1));
        s.first_payment = Some(FirstPayment::Now(ts("2026-12-01T06:15:00Z")));
        let r = Recurrence::new(s.clone()).unwrap();
        let o = r.occurrences().next().unwrap();
        assert_eq!(o.key.kind, OccurrenceKind::Regular);
        assert_eq!(o.due_at, ts("2026-12-01T06:15:00Z"));
        assert_eq!(o.due_date, date(2026, 12, 1));

        s.first_payment = Some(FirstPayment::Now(ts("2026-12-01T11:00:00Z")));
        let later = Recurrence::new(s).unwrap().occurrences().next().unwrap();
        assert_eq!(later.key.kind, OccurrenceKind::Regular);
        assert_eq!(later.due_at, ts("2026-12-01T09:00:00Z"));
    }

    #[test]
    fn first_payment_after_the_first_date_is_refused() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 12, 1));
        s.first_payment = Some(FirstPayment::On(date(2026, 12, 2)));
        let err = Recurrence::new(s).unwrap_err();
        assert_eq!(
            err,
            RecurrenceError::FirstPaymentAfterFirstDate {
                first_payment: date(2026, 12, 2),
                first: date(2026, 12, 1)
            }
        );
    }

    #[test]
    fn first_payment_with_a_once_rule_is_refused() {
        let mut s = spec(
            Rule::Once {
                on: date(2026, 12, 1),
            },
            date(2026, 12, 1),
        );
        s.first_payment = Some(FirstPayment::On(date(2026, 11, 1)));
        assert_eq!(
            Recurrence::new(s).unwrap_err(),
            RecurrenceError::FirstPaymentWithOnce
        );
    }

    #[test]
    fn count_limits_regular_occurrences_and_ignores_the_first_payment() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 12, 1));
        s.first_payment = Some(FirstPayment::On(date(2026, 11, 20)));
        s.end = End::Count(3);
        let keys: Vec<String> = Recurrence::new(s)
            .unwrap()
            .occurrences()
            .map(|o| o.key.to_string())
            .collect();
        assert_eq!(
            keys,
            ["first:2026-11-20", "2026-12-01", "2027-01-01", "2027-02-01"]
        );
    }

    #[test]
    fn until_is_inclusive_on_the_nominal_date() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 8, 1));
        s.business_days = true;
        // The last nominal date (Sat 2026-08-01) is due after --until.
        s.end = End::Until(date(2026, 8, 1));
        let all: Vec<Occurrence> = Recurrence::new(s.clone()).unwrap().occurrences().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].due_date, date(2026, 8, 3));

        s.end = End::Until(date(2026, 10, 1));
        assert_eq!(Recurrence::new(s).unwrap().occurrences().count(), 3);
    }

    #[test]
    fn until_before_the_first_date_is_refused() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 1, 2));
        s.end = End::Until(date(2026, 1, 31));
        let err = Recurrence::new(s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--until 2026-01-31 is before the first payment date 2026-02-01; use a date on or after 2026-02-01"
        );
    }

    #[test]
    fn unknown_time_zone_is_refused_with_an_example_name() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 1, 1));
        s.time_zone = "America/New_Yrok".to_owned();
        assert_eq!(
            Recurrence::new(s).unwrap_err().to_string(),
            "unknown time zone 'America/New_Yrok'; use an IANA name such as America/New_York"
        );
    }

    #[test]
    fn time_zone_names_are_stored_in_canonical_spelling() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 1, 1));
        s.time_zone = "america/new_york".to_owned();
        assert_eq!(Recurrence::new(s).unwrap().time_zone_name(), NEW_YORK);
    }

    #[test]
    fn monthly_day_0_and_32_are_refused() {
        for day in [0, 32] {
            let err = Recurrence::new(spec(Rule::Monthly { day }, date(2026, 1, 1))).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("day {day} is out of range; use 1 to 31")
            );
        }
    }

    #[test]
    fn interval_bounds_are_enforced_per_unit() {
        let ok = |n, unit| Recurrence::new(spec(Rule::Every { n, unit }, date(2026, 1, 1))).is_ok();
        assert!(ok(366, Unit::Days) && ok(52, Unit::Weeks) && ok(12, Unit::Months));
        assert!(!ok(0, Unit::Days) && !ok(367, Unit::Days));
        assert!(!ok(53, Unit::Weeks) && !ok(13, Unit::Months));
    }

    #[test]
    fn count_zero_and_seconds_in_the_time_of_day_are_refused() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 1, 1));
        s.end = End::Count(0);
        assert_eq!(Recurrence::new(s).unwrap_err(), RecurrenceError::ZeroCount);
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 1, 1));
        s.at = time(9, 0, 30, 0);
        assert!(matches!(
            Recurrence::new(s).unwrap_err(),
            RecurrenceError::TimeNotWholeMinutes { .. }
        ));
    }

    #[test]
    fn schedules_stop_at_the_end_of_the_supported_calendar() {
        let r = Recurrence::new(spec(Rule::Monthly { day: 31 }, date(9999, 11, 1))).unwrap();
        // jiff instants end late on 9999-12-30 UTC, so 9999-12-31 09:00 has
        // no instant and iteration stops quietly before it.
        assert_eq!(nominals(&r, 5), [date(9999, 11, 30)]);
        let err = Recurrence::new(spec(Rule::Monthly { day: 1 }, date(9999, 12, 2))).unwrap_err();
        assert!(matches!(err, RecurrenceError::NoOccurrence { .. }));
    }

    #[test]
    fn occurrence_key_round_trips_through_its_string() {
        for s in ["2026-12-01", "first:2026-11-30"] {
            let key: OccurrenceKey = s.parse().unwrap();
            assert_eq!(key.to_string(), s);
        }
        let first: OccurrenceKey = "first:2026-11-30".parse().unwrap();
        assert_eq!(first.kind, OccurrenceKind::First);
        assert!(first < "2026-12-01".parse().unwrap());
        assert!(first < "2026-11-30".parse().unwrap());
        for bad in ["", "first:", "2026-13-01", "last:2026-11-30", "2026-1-1"] {
            assert!(bad.parse::<OccurrenceKey>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&first).unwrap();
        assert_eq!(json, "\"first:2026-11-30\"");
        assert_eq!(serde_json::from_str::<OccurrenceKey>(&json).unwrap(), first);
    }

    #[test]
    fn recurrence_round_trips_through_json_and_revalidates() {
        let mut s = spec(Rule::Monthly { day: 31 }, date(2026, 1, 1));
        s.time_zone = NEW_YORK.to_owned();
        s.business_days = true;
        s.holidays = vec![date(2026, 12, 25), date(2026, 7, 3), date(2026, 12, 25)];
        s.first_payment = Some(FirstPayment::Now(ts("2025-12-20T15:00:00Z")));
        s.end = End::Until(date(2027, 6, 30));
        let r = Recurrence::new(s).unwrap();
        assert_eq!(r.holidays(), [date(2026, 7, 3), date(2026, 12, 25)]);
        let json = serde_json::to_string(&r).unwrap();
        let back: Recurrence = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.occurrences().collect::<Vec<_>>(),
            r.occurrences().collect::<Vec<_>>()
        );

        let bad = json.replace(NEW_YORK, "Mars/Olympus_Mons");
        let err = serde_json::from_str::<Recurrence>(&bad).unwrap_err();
        assert!(err.to_string().contains("unknown time zone"), "{err}");
    }

    #[test]
    fn spec_json_uses_readable_tags_and_defaults_optional_fields() {
        let json = r#"{"rule":{"kind":"every","n":2,"unit":"weeks"},"at":"09:00",
            "time_zone":"UTC","start":"2026-12-24","end":{"count":2}}"#;
        let r: Recurrence = serde_json::from_str(json).unwrap();
        assert_eq!(
            r.rule(),
            Rule::Every {
                n: 2,
                unit: Unit::Weeks
            }
        );
        assert_eq!(r.end(), End::Count(2));
        assert_eq!(r.first_payment(), None);
        assert_eq!(r.occurrences().count(), 2);
    }

    #[test]
    fn with_time_zone_keeps_local_times_and_revalidates() {
        let mut s = spec(Rule::Monthly { day: 1 }, date(2026, 12, 1));
        s.time_zone = NEW_YORK.to_owned();
        let r = Recurrence::new(s).unwrap();
        let la = r.with_time_zone("America/Los_Angeles").unwrap();
        let o = la.occurrences().next().unwrap();
        assert_eq!(o.local.time(), time(9, 0, 0, 0));
        assert_eq!(o.due_at, ts("2026-12-01T17:00:00Z"));
        assert!(matches!(
            r.with_time_zone("Nowhere/Special"),
            Err(RecurrenceError::UnknownTimeZone { .. })
        ));
    }

    #[test]
    fn occurrences_from_skips_everything_due_before_the_instant() {
        let r = Recurrence::new(spec(Rule::Monthly { day: 1 }, date(2026, 1, 1))).unwrap();
        let keys: Vec<String> = r
            .occurrences_from(ts("2030-03-01T09:00:00Z"))
            .take(2)
            .map(|o| o.key.to_string())
            .collect();
        assert_eq!(keys, ["2030-03-01", "2030-04-01"]);
        let after: Vec<String> = r
            .occurrences_from(ts("2030-03-01T09:00:01Z"))
            .take(1)
            .map(|o| o.key.to_string())
            .collect();
        assert_eq!(after, ["2030-04-01"]);
    }

    #[test]
    fn next_after_a_foreign_key_returns_the_next_occurrence_by_date() {
        let r = Recurrence::new(spec(Rule::Monthly { day: 10 }, date(2026, 1, 1))).unwrap();
        let key: OccurrenceKey = "2026-03-05".parse().unwrap();
        assert_eq!(r.next_after(&key).unwrap().key.to_string(), "2026-03-10");
    }

    #[test]
    fn describe_names_rule_time_zone_options_and_end() {
        let mut s = spec(Rule::Monthly { day: 31 }, date(2026, 1, 1));
        s.time_zone = NEW_YORK.to_owned();
        s.business_days = true;
        s.end = End::Until(date(2027, 6, 30));
        assert_eq!(
            Recurrence::new(s).unwrap().describe(),
            "monthly on day 31 at 09:00 America/New_York, business days, until 2027-06-30"
        );
        let mut s = spec(
            Rule::Every {
                n: 2,
                unit: Unit::Weeks,
            },
            date(2026, 12, 24),
        );
        s.first_payment = Some(FirstPayment::On(date(2026, 12, 20)));
        s.end = End::Count(6);
        assert_eq!(
            Recurrence::new(s).unwrap().describe(),
            "every 2 weeks from 2026-12-24 at 09:00 UTC, first payment 2026-12-20, 6 payments"
        );
    }

    #[test]
    fn cli_parsers_accept_strict_formats_and_explain_failures() {
        assert_eq!(parse_time_of_day("09:00").unwrap(), time(9, 0, 0, 0));
        assert_eq!(parse_time_of_day("23:59").unwrap(), time(23, 59, 0, 0));
        for bad in [
            "24:00", "9", "09:60", "09:00:00", "9am", "-1:00", "+9:00", "",
        ] {
            assert!(parse_time_of_day(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_time_of_day("25:00").unwrap_err().to_string(),
            "invalid time of day '25:00'; use 24-hour HH:MM such as 09:00"
        );
        assert_eq!(parse_date("2028-02-29").unwrap(), date(2028, 2, 29));
        for bad in [
            "2027-02-29",
            "2026-1-01",
            "26-01-01",
            "2026/01/01",
            "0000-01-01",
        ] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_date("2026-13-01").unwrap_err().to_string(),
            "invalid date '2026-13-01'; use YYYY-MM-DD such as 2026-12-01"
        );
    }

    #[test]
    fn unit_parses_and_displays_its_plural_names() {
        for unit in [Unit::Days, Unit::Weeks, Unit::Months] {
            assert_eq!(unit.to_string().parse::<Unit>().unwrap(), unit);
            let json = serde_json::to_string(&unit).unwrap();
            assert_eq!(json, format!("\"{unit}\""));
        }
        assert_eq!("Week".parse::<Unit>().unwrap(), Unit::Weeks);
        assert!("fortnights".parse::<Unit>().is_err());
    }

    const ZONES: [&str; 6] = [
        "America/New_York",
        "America/Los_Angeles",
        "Europe/London",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "UTC",
    ];

    fn any_date() -> impl Strategy<Value = Date> {
        (2000i16..2100, 1i8..=12, 1i8..=31).prop_map(|(y, m, d)| {
            let first = date(y, m, 1);
            date(y, m, d.min(first.days_in_month()))
        })
    }

    fn any_time() -> impl Strategy<Value = Time> {
        // Early hours are overweighted: that is where DST gaps and folds are.
        prop_oneof![(0i8..4, 0i8..60), (0i8..24, 0i8..60)].prop_map(|(h, m)| time(h, m, 0, 0))
    }

    fn any_month_rule() -> impl Strategy<Value = Rule> {
        prop_oneof![
            (1u8..=31).prop_map(|day| Rule::Monthly { day }),
            (1u32..=12).prop_map(|n| Rule::Every {
                n,
                unit: Unit::Months
            }),
        ]
    }

    const SAMPLE: usize = 40;

    proptest! {
        #[test]
        fn monthly_schedules_hold_their_invariants(
            day in 1u8..=31,
            start in any_date(),
            at in any_time(),
            zone in 0..ZONES.len(),
            first_back_minutes in proptest::option::of(0i64..60 * 24 * 40),
            cut in 0usize..SAMPLE,
            nudge_seconds in -3 * 86_400i64..3 * 86_400,
        ) {
            let mut s = spec(Rule::Monthly { day }, start);
            s.at = at;
            s.time_zone = ZONES[zone].to_owned();
            if let Some(back) = first_back_minutes {
                let midnight = start.to_zoned_datetime(TimeZone::get(ZONES[zone]).unwrap()).unwrap();
                let now = midnight.timestamp() - jiff::SignedDuration::from_mins(back);
                s.first_payment = Some(FirstPayment::Now(now));
            }
            let r = Recurrence::new(s).unwrap();
            let all: Vec<Occurrence> = r.occurrences().take(SAMPLE).collect();
            prop_assert_eq!(all.len(), SAMPLE);

            for pair in all.windows(2) {
                prop_assert!(pair[0].due_at < pair[1].due_at, "{:?}", pair);
                prop_assert!(pair[0].key < pair[1].key);
                prop_assert_eq!(r.next_after(&pair[0].key), Some(pair[1].clone()));
            }
            for o in &all {
                prop_assert_eq!(o.due_at, o.local.timestamp());
                if o.key.kind == OccurrenceKind::First {
                    continue;
                }
                let nominal = o.key.nominal;
                let expected_day = i8::try_from(day).unwrap().min(nominal.days_in_month());
                prop_assert_eq!(nominal.day(), expected_day);
                prop_assert!(nominal >= start);
                let merged_early = o.index == Some(0) && o.due_at < r.zoned(nominal).unwrap().timestamp();
                if merged_early {
                    prop_assert_eq!(o.due_date, nominal);
                    continue;
                }
                prop_assert_eq!(o.due_date, nominal);
                prop_assert_eq!(o.local.date(), nominal);
                match gap_seconds(r.time_zone(), nominal, at) {
                    None => prop_assert_eq!(o.local.time(), at),
                    Some(gap) => {
                        let shift = nominal.to_datetime(at).duration_until(o.local.datetime());
                        prop_assert_eq!(shift.as_secs(), gap);
                    }
                }
            }
            // The first regular date is the anchor's first date on or after start.
            let first_regular = all.iter().find(|o| o.index == Some(0)).unwrap();
            let previous_month = date_in_month(month_index(first_regular.key.nominal) - 1, i8::try_from(day).unwrap()).unwrap();
            prop_assert!(previous_month < start);

            let from = all[cut].due_at + jiff::SignedDuration::from_secs(nudge_seconds);
            let expected: Vec<&Occurrence> = all.iter().filter(|o| o.due_at >= from).take(5).collect();
            let got: Vec<Occurrence> = r.occurrences_from(from).take(expected.len()).collect();
            prop_assert_eq!(got.iter().collect::<Vec<_>>(), expected);
        }

        #[test]
        fn business_day_moves_land_on_the_next_business_day(
            rule in any_month_rule(),
            start in any_date(),
            zone in 0..ZONES.len(),
            holiday_offsets in proptest::collection::vec(0i64..500, 0..60),
        ) {
            let holidays: Vec<Date> = holiday_offsets
                .iter()
                .map(|&d| start.checked_add(Span::new().days(d)).unwrap())
                .collect();
            let mut s = spec(rule, start);
            s.time_zone = ZONES[zone].to_owned();
            s.business_days = true;
            s.holidays = holidays.clone();
            let r = match Recurrence::new(s) {
                Err(RecurrenceError::NoBusinessDay { .. }) => return Ok(()),
                other => other.unwrap(),
            };
            let all: Vec<Occurrence> = r.occurrences().take(18).collect();
            for o in &all {
                let nominal = o.key.nominal;
                prop_assert!(o.due_date >= nominal);
                prop_assert!(days_between(nominal, o.due_date) <= MAX_NON_BUSINESS_RUN_DAYS);
                prop_assert!(is_business_day(o.due_date, r.holidays()));
                prop_assert!(!matches!(o.due_date.weekday(), Weekday::Saturday | Weekday::Sunday));
                prop_assert!(!holidays.contains(&o.due_date));
                let mut d = nominal;
                while d < o.due_date {
                    prop_assert!(!is_business_day(d, r.holidays()), "skipped business day {}", d);
                    d = d.tomorrow().unwrap();
                }
                if holidays.is_empty() {
                    prop_assert!(days_between(nominal, o.due_date) <= 2);
                }
            }
            for pair in all.windows(2) {
                prop_assert!(pair[0].due_at < pair[1].due_at);
                prop_assert_eq!(r.next_after(&pair[0].key), Some(pair[1].clone()));
            }
        }

        #[test]
        fn end_rules_bound_the_regular_occurrences(
            (unit, n) in prop_oneof![Just(Unit::Days), Just(Unit::Weeks), Just(Unit::Months)]
                .prop_flat_map(|unit| (Just(unit), 1..=unit.max_interval())),
            start in any_date(),
            count in 1u32..50,
            until_offset in 0i64..2000,
        ) {
            let rule = Rule::Every { n, unit };
            let mut s = spec(rule, start);
            s.end = End::Count(count);
            let counted = Recurrence::new(s.clone()).unwrap();
            let all: Vec<Occurrence> = counted.occurrences().collect();
            prop_assert_eq!(all.len(), usize::try_from(count).unwrap());
            prop_assert_eq!(counted.next_after(&all[all.len() - 1].key), None);

            let until = start.checked_add(Span::new().days(until_offset)).unwrap();
            s.end = End::Until(until);
            let bounded = Recurrence::new(s.clone()).unwrap();
            s.end = End::Never;
            let unbounded = Recurrence::new(s).unwrap();
            let within: Vec<Occurrence> = bounded.occurrences().collect();
            prop_assert!(within.iter().all(|o| o.key.nominal <= until));
            let next = unbounded.occurrences().nth(within.len()).unwrap();
            prop_assert!(next.key.nominal > until);
            prop_assert_eq!(&within[..], &unbounded.occurrences().take(within.len()).collect::<Vec<_>>()[..]);

            let json = serde_json::to_string(&bounded).unwrap();
            prop_assert_eq!(serde_json::from_str::<Recurrence>(&json).unwrap(), bounded);
        }
    }
}
