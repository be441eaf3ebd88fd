//! Schedules: a member's authorization to be charged, and the planner's cursor over it.

use crate::domain::money::Money;
use crate::domain::payment::AmountRule;
use crate::domain::schedule::{OccurrenceKey, Recurrence};
use crate::domain::status::ScheduleStatus;
use crate::store::sql::{Record, corrupt, currency, get, id, opt_time, parsed, time};
use crate::store::{Result, Schedule};

pub(crate) const SCHEDULE_COLS: &str = "id, member_id, payment_method_id, kind, recurrence, amount_rule, fixed_amount, currency, time_zone, next_run_at, next_occurrence, status, status_reason, consecutive_failures, version, authorized_at, authorized_via, authorized_by, terms_version, cancelled_at, cancelled_by, created_at, updated_at";

/// Due schedules in order, after `SELECT {SCHEDULE_COLS}`: read from `schedules_due_order`.
pub(crate) const DUE_SCHEDULES_SQL: &str = " FROM schedules WHERE status = 'active' AND next_run_at <= $1 ORDER BY next_run_at, id LIMIT $2";

pub(crate) fn schedule_from(row: &impl Record) -> Result<Schedule> {
    const T: &str = "schedules";
    let cur = currency(row, T)?;
    let recurrence: Recurrence = parsed(
        T,
        "recurrence",
        serde_json::from_str(&get::<String>(row, T, "recurrence")?),
    )?;
    let amount = match get::<String>(row, T, "amount_rule")?.as_str() {
        "balance" => AmountRule::Balance,
        _ => AmountRule::Fixed {
            amount: Money::from_minor(
                get::<Option<i64>>(row, T, "fixed_amount")?
                    .ok_or_else(|| corrupt(T, "fixed_amount", "missing"))?,
                cur,
            ),
        },
    };
    Ok(Schedule {
        id: id(row, T, "id")?,
        member_id: id(row, T, "member_id")?,
        card_id: id(row, T, "payment_method_id")?,
        kind: parsed(T, "kind", get::<String>(row, T, "kind")?.parse())?,
        recurrence,
        amount,
        currency: cur,
        time_zone: get(row, T, "time_zone")?,
        next_run_at: opt_time(row, T, "next_run_at")?,
        next_occurrence: match get::<Option<String>>(row, T, "next_occurrence")? {
            Some(s) => Some(parsed(T, "next_occurrence", s.parse::<OccurrenceKey>())?),
            None => None,
        },
        status: parsed(
            T,
            "status",
            get::<String>(row, T, "status")?.parse::<ScheduleStatus>(),
        )?,
        status_reason: get(row, T, "status_reason")?,
        consecutive_failures: get(row, T, "consecutive_failures")?,
        version: get(row, T, "version")?,
        authorized_at: time(row, T, "authorized_at")?,
        authorized_via: parsed(
            T,
            "authorized_via",
            get::<String>(row, T, "authorized_via")?.parse(),
        )?,
        authorized_by: get(row, T, "authorized_by")?,
        terms_version: get(row, T, "terms_version")?,
        cancelled_at: opt_time(row, T, "cancelled_at")?,
        cancelled_by: get(row, T, "cancelled_by")?,
        created_at: time(row, T, "created_at")?,
        updated_at: time(row, T, "updated_at")?,
    })
}
