//! The planner's side of schedules: which are due, and writing their due occurrences as payments.

use jiff::Timestamp;

use crate::domain::status::ScheduleStatus;
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::schedules::{SCHEDULE_COLS, schedule_from, schedule_in};
use crate::store::sql::{Backend, SqlStore, commit, db_err, event, new_id, query};
use crate::store::{Audit, PlanStep, Result, Schedule, WriteTx};

/// Due schedules in order, after `SELECT {SCHEDULE_COLS}`: read from `schedules_due_order`.
pub(crate) const DUE_SCHEDULES_SQL: &str = " FROM schedules WHERE status = 'active' AND next_run_at <= $1 ORDER BY next_run_at, id LIMIT $2";

/// One schedule's plan, inside `tx`: false when the schedule changed since it was read.
pub(crate) async fn apply_plan_in<B: Backend>(
    tx: &mut WriteTx<B>,
    step: &PlanStep,
    audit: &Audit,
) -> Result<bool> {
    let current = schedule_in(tx, step.schedule_id).await?;
    if current.status != ScheduleStatus::Active
        || current.version != step.expected_version
        || current.next_occurrence.as_ref() != Some(&step.expected_next)
    {
        return Ok(false);
    }
    let mut planned = Vec::new();
    for p in &step.payments {
        let state = if p.missed.is_some() {
            "missed"
        } else {
            "scheduled"
        };
        let inserted = query("INSERT INTO payments (id, schedule_id, member_id, occurrence, due_at, currency, state, attempt, payment_method_id, schedule_version, reason, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $11, $11) ON CONFLICT (schedule_id, occurrence) DO NOTHING")
            .bind(DbId(new_id()))
            .bind(DbId(current.id))
            .bind(DbId(current.member_id))
            .bind(p.occurrence.to_string())
            .bind(DbTime(p.due_at))
            .bind(current.currency.code())
            .bind(state)
            .bind(DbId(current.card_id))
            .bind(current.version)
            .bind(p.missed.as_deref())
            .bind(DbTime(audit.at))
            .execute(tx.conn())
            .await
            .map_err(db_err("planning a payment"))?
            .rows_affected();
        if inserted > 0 {
            planned.push(
                serde_json::json!({ "occurrence": p.occurrence.to_string(), "state": state }),
            );
        }
    }
    let status = if step.next_run_at.is_some() {
        "active"
    } else {
        "completed"
    };
    query("UPDATE schedules SET next_run_at = $1, next_occurrence = $2, status = $3, updated_at = $4 WHERE id = $5")
        .bind(step.next_run_at.map(DbTime))
        .bind(step.next_occurrence.as_ref().map(|k| k.to_string()))
        .bind(status)
        .bind(DbTime(audit.at))
        .bind(DbId(current.id))
        .execute(tx.conn())
        .await
        .map_err(db_err("moving a schedule's cursor"))?;
    event(
        tx,
        audit,
        "schedule",
        current.id,
        "planned",
        serde_json::json!({
            "payments": planned, "next_run_at": step.next_run_at, "status": status,
        }),
    )
    .await?;
    Ok(true)
}

pub(crate) async fn due_schedules<B: Backend>(
    db: &SqlStore<B>,
    now: Timestamp,
    limit: u32,
) -> Result<Vec<Schedule>> {
    query(sqlx::AssertSqlSafe(format!(
        "SELECT {SCHEDULE_COLS}{DUE_SCHEDULES_SQL}"
    )))
    .bind(DbTime(now))
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("reading due schedules"))?
    .iter()
    .map(schedule_from)
    .collect()
}

pub(crate) async fn apply_plan<B: Backend>(
    db: &SqlStore<B>,
    step: &PlanStep,
    audit: &Audit,
) -> Result<bool> {
    let mut tx = db.begin_write().await?;
    let moved = apply_plan_in(&mut tx, step, audit).await?;
    commit(tx).await?;
    Ok(moved)
}

pub(crate) async fn apply_plans<B: Backend>(
    db: &SqlStore<B>,
    steps: &[PlanStep],
    audit: &Audit,
) -> Result<Vec<bool>> {
    let mut tx = db.begin_write().await?;
    let mut moved = Vec::with_capacity(steps.len());
    for step in steps {
        moved.push(apply_plan_in(&mut tx, step, audit).await?);
    }
    commit(tx).await?;
    Ok(moved)
}

pub(crate) async fn schedules_due_between<B: Backend>(
    db: &SqlStore<B>,
    after: Timestamp,
    until: Timestamp,
) -> Result<Vec<Schedule>> {
    query(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM schedules s JOIN members m ON m.id = s.member_id WHERE s.status = 'active' AND m.reminders = TRUE AND m.status = 'active' AND s.next_run_at > $1 AND s.next_run_at <= $2 ORDER BY s.next_run_at, s.id",
        SCHEDULE_COLS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", ")
    )))
    .bind(DbTime(after))
    .bind(DbTime(until))
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("finding schedules to remind"))?
    .iter()
    .map(schedule_from)
    .collect()
}
