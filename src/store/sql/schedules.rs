//! Schedules: a member's authorization to be charged, and the planner's cursor over it.

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::money::Money;
use crate::domain::notice::{
    ScheduleChange as ScheduleChangeNotice, ScheduleFacts, ScheduleSuspended,
};
use crate::domain::payment::{AmountRule, PaymentState, Transition};
use crate::domain::schedule::{OccurrenceKey, Recurrence};
use crate::domain::status::ScheduleStatus;
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::cards::card_in;
use crate::store::sql::members::{lock_owner, member_by_id_in};
use crate::store::sql::outbox::notify_notice;
use crate::store::sql::payments::UNCLAIMED;
use crate::store::sql::{
    Backend, Record, corrupt, currency, db_err, event, get, id, opt_time, parsed, query,
    query_scalar, state_list, step, time,
};
use crate::store::{Audit, Member, Result, Schedule, StoreError, WriteTx};

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

pub(crate) async fn schedule_in<B: Backend>(
    tx: &mut WriteTx<B>,
    schedule_id: Uuid,
) -> Result<Schedule> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLS} FROM schedules WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(DbId(schedule_id))
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a schedule"))?;
    match row {
        Some(row) => schedule_from(&row),
        None => Err(schedule_not_found(schedule_id)),
    }
}

/// A schedule and its member, locked member first.
pub(crate) async fn schedule_locked<B: Backend>(
    tx: &mut WriteTx<B>,
    schedule_id: Uuid,
) -> Result<(Member, Schedule)> {
    let member = lock_owner(tx, "schedules", schedule_id)
        .await?
        .ok_or_else(|| schedule_not_found(schedule_id))?;
    let schedule = schedule_in(tx, schedule_id).await?;
    Ok((member, schedule))
}

pub(crate) fn schedule_not_found(id: Uuid) -> StoreError {
    StoreError::NotFound(format!(
        "no schedule has id {id}; list schedules with `autopay schedule list`"
    ))
}

/// Cancels a schedule's payments that no worker holds (docs/architecture.md's cancellation
/// triggers). `unknown` and `processing` payments are left to be settled.
pub(crate) async fn cancel_unclaimed<B: Backend>(
    tx: &mut WriteTx<B>,
    schedule_id: Uuid,
    reason: &str,
    at: Timestamp,
) -> Result<u64> {
    // Both unclaimed states cancel alike (domain::payment's Cancel).
    let cancelled = step(PaymentState::Scheduled, Transition::Cancel)?;
    let done = query(sqlx::AssertSqlSafe(format!(
        "UPDATE payments SET state = $4, reason = $1, next_attempt_at = NULL, updated_at = $2 WHERE schedule_id = $3 AND state IN ({})",
        state_list(&UNCLAIMED)
    )))
        .bind(reason)
        .bind(DbTime(at))
        .bind(DbId(schedule_id))
        .bind(cancelled.as_str())
        .execute(tx.conn())
        .await
        .map_err(db_err("cancelling unclaimed payments"))?;
    Ok(done.rows_affected())
}

pub(crate) async fn suspend_schedule<B: Backend>(
    tx: &mut WriteTx<B>,
    schedule_id: Uuid,
    reason: &str,
    member: &Member,
    audit: &Audit,
) -> Result<()> {
    let version: Option<i64> = query_scalar("UPDATE schedules SET status = 'suspended', status_reason = $1, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $2 WHERE id = $3 AND status IN ('active', 'paused') RETURNING version")
        .bind(reason)
        .bind(DbTime(audit.at))
        .bind(DbId(schedule_id))
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("suspending a schedule"))?;
    let Some(version) = version else {
        return Ok(());
    };
    let cancelled = cancel_unclaimed(tx, schedule_id, "schedule suspended", audit.at).await?;
    event(
        tx,
        audit,
        "schedule",
        schedule_id,
        "suspended",
        serde_json::json!({ "reason": reason, "cancelled_payments": cancelled }),
    )
    .await?;
    let notice = ScheduleSuspended {
        schedule_id,
        to: member.addressee(),
        reason: reason.to_string(),
        version,
    }
    .notice();
    notify_notice(tx, &notice, member, audit.at).await
}

pub(crate) fn amount_words(amount: &AmountRule) -> String {
    match amount {
        AmountRule::Fixed { amount } => amount.display_with_code(),
        AmountRule::Balance => "your statement balance".to_string(),
    }
}

/// Tells the member about a change to their automatic payments, in the change's own
/// transaction.
pub(crate) async fn confirm_schedule<B: Backend>(
    tx: &mut WriteTx<B>,
    change: &ScheduleChangeNotice,
    schedule: &Schedule,
    at: Timestamp,
) -> Result<()> {
    let member = member_by_id_in(tx, schedule.member_id).await?;
    let card = card_in(tx, schedule.card_id).await?;
    let facts = ScheduleFacts {
        schedule_id: schedule.id,
        to: member.addressee(),
        rule: schedule.recurrence.describe(),
        amount: amount_words(&schedule.amount),
        card: card.label(),
        time_zone: schedule.time_zone.clone(),
        at,
        next_payment_at: schedule.next_run_at,
    };
    notify_notice(tx, &facts.notice(change), &member, at).await
}
