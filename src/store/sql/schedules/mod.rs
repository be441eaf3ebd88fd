//! Schedules: a member's authorization to be charged, and the planner's cursor over it.

pub(crate) mod plan;

use jiff::Timestamp;

use crate::domain::ids::{MemberId, ScheduleId};
use crate::domain::money::Money;
use crate::domain::notice::{
    ScheduleChange as ScheduleChangeNotice, ScheduleFacts, ScheduleSuspended,
};
use crate::domain::payment::{AmountRule, PaymentState, Transition};
use crate::domain::schedule::{OccurrenceKey, Recurrence};
use crate::domain::status::{CardStatus, MemberStatus, ScheduleStatus};
use crate::sqltypes::DbTime;
use crate::store::sql::cards::{card_in, card_unusable};
use crate::store::sql::members::{lock_owner, member_by_id_in};
use crate::store::sql::outbox::notify_notice;
use crate::store::sql::payments::UNCLAIMED;
use crate::store::sql::{
    Backend, Record, SqlStore, commit, corrupt, currency, db_err, event, get, is_unique_violation,
    opt_time, parsed, query, query_scalar, state_list, step, time,
};
use crate::store::{
    Audit, Member, NewSchedule, Result, Schedule, ScheduleChange, ScheduleResume, StoreError,
    WriteTx,
};

pub(crate) const SCHEDULE_COLS: &str = "id, member_id, payment_method_id, kind, recurrence, amount_rule, fixed_amount, currency, time_zone, next_run_at, next_occurrence, status, status_reason, consecutive_failures, version, authorized_at, authorized_via, authorized_by, terms_version, cancelled_at, cancelled_by, created_at, updated_at";

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
        id: get(row, T, "id")?,
        member_id: get(row, T, "member_id")?,
        card_id: get(row, T, "payment_method_id")?,
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
    schedule_id: ScheduleId,
) -> Result<Schedule> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLS} FROM schedules WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(schedule_id)
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
    schedule_id: ScheduleId,
) -> Result<(Member, Schedule)> {
    let member = lock_owner(tx, "schedules", schedule_id)
        .await?
        .ok_or_else(|| schedule_not_found(schedule_id))?;
    let schedule = schedule_in(tx, schedule_id).await?;
    Ok((member, schedule))
}

pub(crate) fn schedule_not_found(id: ScheduleId) -> StoreError {
    StoreError::NotFound(format!(
        "no schedule has id {id}; list schedules with `autopay schedule list`"
    ))
}

/// Cancels a schedule's payments that no worker holds (docs/architecture.md's cancellation
/// triggers). `unknown` and `processing` payments are left to be settled.
pub(crate) async fn cancel_unclaimed<B: Backend>(
    tx: &mut WriteTx<B>,
    schedule_id: ScheduleId,
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
        .bind(schedule_id)
        .bind(cancelled.as_str())
        .execute(tx.conn())
        .await
        .map_err(db_err("cancelling unclaimed payments"))?;
    Ok(done.rows_affected())
}

pub(crate) async fn suspend_schedule<B: Backend>(
    tx: &mut WriteTx<B>,
    schedule_id: ScheduleId,
    reason: &str,
    member: &Member,
    audit: &Audit,
) -> Result<()> {
    let version: Option<i64> = query_scalar("UPDATE schedules SET status = 'suspended', status_reason = $1, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $2 WHERE id = $3 AND status IN ('active', 'paused') RETURNING version")
        .bind(reason)
        .bind(DbTime(audit.at))
        .bind(schedule_id)
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

pub(crate) async fn add_schedule<B: Backend>(
    db: &SqlStore<B>,
    new: &NewSchedule,
    audit: &Audit,
) -> Result<Schedule> {
    let mut tx = db.begin_write().await?;
    // The member's row, locked first: a `member close` running at the same time
    // either sees this schedule and cancels it, or happens before and is seen here.
    let member = member_by_id_in(&mut tx, new.member_id).await?;
    let card = card_in(&mut tx, new.card_id).await?;
    if card.member_id != new.member_id {
        return Err(StoreError::Conflict(format!(
            "card {} belongs to another member; use one of this member's cards (`autopay card list --account N`)",
            card.id
        )));
    }
    if card.status != CardStatus::Active {
        return Err(StoreError::Conflict(format!(
            "card {} is {}; add a new card with `autopay card add` and use it",
            card.id, card.status
        )));
    }
    if member.status != MemberStatus::Active {
        return Err(StoreError::Conflict(format!(
            "member {} is closed; a closed member cannot set up payments",
            new.member_id
        )));
    }
    let currency = new.currency;
    let recurrence = serde_json::to_string(&new.recurrence)
        .map_err(|e| StoreError::Internal(format!("cannot store a recurrence: {e}")))?;
    let row = query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO schedules (id, member_id, payment_method_id, kind, recurrence, amount_rule, fixed_amount, currency, time_zone, next_run_at, next_occurrence, status, version, authorized_at, authorized_via, authorized_by, terms_version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, $13, $14, $15, $16, $13, $13) RETURNING {SCHEDULE_COLS}"
    )))
    .bind(ScheduleId::new())
    .bind(new.member_id)
    .bind(new.card_id)
    .bind(new.kind.as_str())
    .bind(recurrence)
    .bind(new.amount.kind())
    .bind(new.amount.fixed_amount().map(|m| m.minor()))
    .bind(currency.code())
    .bind(new.recurrence.time_zone_name())
    .bind(new.next_run_at.map(DbTime))
    .bind(new.next_occurrence.as_ref().map(|k| k.to_string()))
    .bind(if new.next_run_at.is_some() { "active" } else { "completed" })
    .bind(DbTime(audit.at))
    .bind(new.authorized_via.as_str())
    .bind(&audit.actor)
    .bind(&new.terms_version)
    .fetch_one(tx.conn())
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(
                "this member already has a statement-balance schedule; a member may have only one. Cancel it (`autopay schedule cancel ID`) or give this schedule a fixed --amount".into(),
            )
        } else {
            StoreError::from_sqlx(e, "adding a schedule")
        }
    })?;
    let schedule = schedule_from(&row)?;
    confirm_schedule(
        &mut tx,
        &ScheduleChangeNotice::Setup {
            first_payment_at: schedule.next_run_at,
            authorized_at: schedule.authorized_at,
        },
        &schedule,
        audit.at,
    )
    .await?;
    event(&mut tx, audit, "schedule", schedule.id, "authorized", serde_json::json!({
        "member_id": new.member_id, "card_id": new.card_id, "rule": new.recurrence.describe(),
        "amount": new.amount, "via": new.authorized_via.as_str(), "terms_version": new.terms_version,
    })).await?;
    commit(tx).await?;
    Ok(schedule)
}

pub(crate) async fn schedule<B: Backend>(
    db: &SqlStore<B>,
    schedule_id: ScheduleId,
) -> Result<Schedule> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLS} FROM schedules WHERE id = $1"
    )))
    .bind(schedule_id)
    .fetch_optional(&db.pool)
    .await
    .map_err(db_err("reading a schedule"))?;
    match row {
        Some(row) => schedule_from(&row),
        None => Err(schedule_not_found(schedule_id)),
    }
}

pub(crate) async fn list_schedules<B: Backend>(
    db: &SqlStore<B>,
    member_id: Option<MemberId>,
) -> Result<Vec<Schedule>> {
    query(sqlx::AssertSqlSafe(format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE ($1 IS NULL OR member_id = $1) ORDER BY created_at, id")))
        .bind(member_id)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("listing schedules"))?
        .iter()
        .map(schedule_from)
        .collect()
}

pub(crate) async fn update_schedule<B: Backend>(
    db: &SqlStore<B>,
    change: &ScheduleChange,
    audit: &Audit,
) -> Result<Schedule> {
    let mut tx = db.begin_write().await?;
    let (_, current) = schedule_locked(&mut tx, change.id).await?;
    if current.version != change.expected_version {
        return Err(StoreError::Conflict(format!(
            "schedule {} changed while this update was prepared (version {} is now {}); run the command again",
            change.id, change.expected_version, current.version
        )));
    }
    if !current.status.is_live() {
        return Err(StoreError::Conflict(format!(
            "schedule {} is {}; it can no longer be changed. Set up a new one with `autopay schedule add`",
            change.id, current.status
        )));
    }
    // Whether or not the card changes, a schedule is never left (or put back) on a card
    // that cannot be charged: its member would be told of charges that never come.
    let card = card_in(&mut tx, change.card_id).await?;
    if card.member_id != current.member_id {
        return Err(StoreError::Conflict(format!(
            "card {} belongs to another member; use one of this member's cards",
            card.id
        )));
    }
    if card.status != CardStatus::Active {
        return Err(card_unusable(&card, change.id));
    }
    let status = if change.lift_suspension && current.status == ScheduleStatus::Suspended {
        ScheduleStatus::Active
    } else {
        current.status
    };
    let (next_run_at, next_occurrence) = if status == ScheduleStatus::Active {
        (
            change.next_run_at,
            change.next_occurrence.as_ref().map(|k| k.to_string()),
        )
    } else {
        (
            current.next_run_at,
            current.next_occurrence.as_ref().map(|k| k.to_string()),
        )
    };
    let recurrence = serde_json::to_string(&change.recurrence)
        .map_err(|e| StoreError::Internal(format!("cannot store a recurrence: {e}")))?;
    let row = query(sqlx::AssertSqlSafe(format!(
        "UPDATE schedules SET payment_method_id = $1, recurrence = $2, amount_rule = $3, fixed_amount = $4, time_zone = $5, next_run_at = $6, next_occurrence = $7, status = $8, status_reason = CASE WHEN $8 = status THEN status_reason ELSE NULL END, consecutive_failures = CASE WHEN $8 = status THEN consecutive_failures ELSE 0 END, version = version + 1, updated_at = $9 WHERE id = $10 RETURNING {SCHEDULE_COLS}"
    )))
    .bind(change.card_id)
    .bind(recurrence)
    .bind(change.amount.kind())
    .bind(change.amount.fixed_amount().map(|m| m.minor()))
    .bind(change.recurrence.time_zone_name())
    .bind(next_run_at.map(DbTime))
    .bind(next_occurrence)
    .bind(status.as_str())
    .bind(DbTime(audit.at))
    .bind(change.id)
    .fetch_one(tx.conn())
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict("this member already has a statement-balance schedule; a member may have only one".into())
        } else {
            StoreError::from_sqlx(e, "updating a schedule")
        }
    })?;
    let updated = schedule_from(&row)?;
    // Re-plan unclaimed payments: the next attempt uses the new card, and its amount
    // is computed afresh when it is claimed.
    let replanned = query("UPDATE payments SET payment_method_id = $1, schedule_version = $2, amount = NULL, updated_at = $3 WHERE schedule_id = $4 AND state IN ('scheduled', 'retry_wait')")
        .bind(change.card_id)
        .bind(updated.version)
        .bind(DbTime(audit.at))
        .bind(change.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("re-planning payments"))?
        .rows_affected();
    confirm_schedule(
        &mut tx,
        &ScheduleChangeNotice::Changed {
            version: updated.version,
            changes: change.summary.clone(),
        },
        &updated,
        audit.at,
    )
    .await?;
    event(
        &mut tx,
        audit,
        "schedule",
        change.id,
        "changed",
        serde_json::json!({
            "version": updated.version, "changes": change.summary, "replanned_payments": replanned,
            "resumed": status != current.status,
        }),
    )
    .await?;
    commit(tx).await?;
    Ok(updated)
}

pub(crate) async fn pause_schedule<B: Backend>(
    db: &SqlStore<B>,
    schedule_id: ScheduleId,
    audit: &Audit,
) -> Result<Schedule> {
    let mut tx = db.begin_write().await?;
    let (_, current) = schedule_locked(&mut tx, schedule_id).await?;
    if current.status != ScheduleStatus::Active {
        return Err(StoreError::Conflict(format!(
            "schedule {schedule_id} is {}; only an active schedule can be paused",
            current.status
        )));
    }
    let row = query(sqlx::AssertSqlSafe(format!(
        "UPDATE schedules SET status = 'paused', status_reason = 'paused by operator', next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $2 RETURNING {SCHEDULE_COLS}"
    )))
    .bind(DbTime(audit.at))
    .bind(schedule_id)
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("pausing a schedule"))?;
    let cancelled = cancel_unclaimed(&mut tx, schedule_id, "schedule paused", audit.at).await?;
    let paused = schedule_from(&row)?;
    confirm_schedule(
        &mut tx,
        &ScheduleChangeNotice::Paused {
            version: paused.version,
        },
        &paused,
        audit.at,
    )
    .await?;
    event(
        &mut tx,
        audit,
        "schedule",
        schedule_id,
        "paused",
        serde_json::json!({ "cancelled_payments": cancelled }),
    )
    .await?;
    commit(tx).await?;
    Ok(paused)
}

pub(crate) async fn resume_schedule<B: Backend>(
    db: &SqlStore<B>,
    resume: &ScheduleResume,
    audit: &Audit,
) -> Result<Schedule> {
    let mut tx = db.begin_write().await?;
    let (_, current) = schedule_locked(&mut tx, resume.id).await?;
    let card = card_in(&mut tx, current.card_id).await?;
    if card.status != CardStatus::Active {
        return Err(card_unusable(&card, resume.id));
    }
    if !matches!(
        current.status,
        ScheduleStatus::Paused | ScheduleStatus::Suspended
    ) {
        return Err(StoreError::Conflict(format!(
            "schedule {} is {}; only a paused or suspended schedule can be resumed",
            resume.id, current.status
        )));
    }
    if current.version != resume.expected_version {
        return Err(StoreError::Conflict(format!(
            "schedule {} changed meanwhile; run the command again",
            resume.id
        )));
    }
    let status = if resume.next_run_at.is_some() {
        "active"
    } else {
        "completed"
    };
    let row = query(sqlx::AssertSqlSafe(format!(
        "UPDATE schedules SET status = $1, status_reason = NULL, consecutive_failures = 0, next_run_at = $2, next_occurrence = $3, version = version + 1, updated_at = $4 WHERE id = $5 RETURNING {SCHEDULE_COLS}"
    )))
    .bind(status)
    .bind(resume.next_run_at.map(DbTime))
    .bind(resume.next_occurrence.as_ref().map(|k| k.to_string()))
    .bind(DbTime(audit.at))
    .bind(resume.id)
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("resuming a schedule"))?;
    event(
        &mut tx,
        audit,
        "schedule",
        resume.id,
        "resumed",
        serde_json::json!({
            "from": current.status.as_str(), "next_run_at": resume.next_run_at,
        }),
    )
    .await?;
    B::wake_others(&mut tx).await?;
    commit(tx).await?;
    schedule_from(&row)
}

pub(crate) async fn cancel_schedule<B: Backend>(
    db: &SqlStore<B>,
    schedule_id: ScheduleId,
    audit: &Audit,
) -> Result<Schedule> {
    let mut tx = db.begin_write().await?;
    let (_, current) = schedule_locked(&mut tx, schedule_id).await?;
    // A completed schedule may still have a payment waiting for a retry: cancelling
    // stops that too.
    let waiting: i64 = query_scalar("SELECT COUNT(*) FROM payments WHERE schedule_id = $1 AND state IN ('scheduled', 'retry_wait')")
        .bind(schedule_id)
        .fetch_one(tx.conn())
        .await
        .map_err(db_err("counting waiting payments"))?;
    let cancellable =
        current.status.is_live() || (current.status == ScheduleStatus::Completed && waiting > 0);
    if !cancellable {
        return Err(StoreError::Conflict(format!(
            "schedule {schedule_id} is already {}",
            current.status
        )));
    }
    let row = query(sqlx::AssertSqlSafe(format!(
        "UPDATE schedules SET status = 'cancelled', status_reason = 'cancelled by operator', cancelled_at = $1, cancelled_by = $2, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $3 RETURNING {SCHEDULE_COLS}"
    )))
    .bind(DbTime(audit.at))
    .bind(&audit.actor)
    .bind(schedule_id)
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("cancelling a schedule"))?;
    let cancelled = cancel_unclaimed(&mut tx, schedule_id, "schedule cancelled", audit.at).await?;
    let ended = schedule_from(&row)?;
    confirm_schedule(&mut tx, &ScheduleChangeNotice::Cancelled, &ended, audit.at).await?;
    event(
        &mut tx,
        audit,
        "schedule",
        schedule_id,
        "cancelled",
        serde_json::json!({ "cancelled_payments": cancelled }),
    )
    .await?;
    commit(tx).await?;
    Ok(ended)
}
