//! The planner's side of schedules: which are due, and writing their due occurrences as payments.

use std::collections::{BTreeMap, HashSet};

use jiff::Timestamp;

use crate::domain::ids::{PaymentId, ScheduleId};
use crate::domain::status::ScheduleStatus;
use crate::sqltypes::DbTime;
use crate::store::sql::schedules::{SCHEDULE_COLS, schedule_from};
use crate::store::sql::{
    Backend, ROWS_PER_STATEMENT, SqlStore, commit, db_err, event, get, locked_rows, placeholders,
    query, sorted,
};
use crate::store::{Audit, PlanStep, PlannedPayment, Result, Schedule, WriteTx};

/// Due schedules in order, after `SELECT {SCHEDULE_COLS}`: read from `schedules_due_order`.
pub(crate) const DUE_SCHEDULES_SQL: &str = " FROM schedules WHERE status = 'active' AND next_run_at <= $1 ORDER BY next_run_at, id LIMIT $2";

/// The plans of a batch of due schedules, inside `tx`, set-based: one statement reads and
/// locks every schedule (in id order, the order any other transaction locks them in), one
/// multi-row `INSERT` writes every payment, one `UPDATE` moves the cursors of all schedules
/// that move to the same place (on the 1st of the month, nearly all), and the audit events go
/// in with the commit. For each step, false when its schedule changed since it was read (or
/// the same schedule came twice: the second is late by definition).
pub(crate) async fn apply_plans_in<B: Backend>(
    tx: &mut WriteTx<B>,
    steps: &[PlanStep],
    audit: &Audit,
) -> Result<Vec<bool>> {
    let ids = sorted(steps.iter().map(|s| s.schedule_id));
    let mut current = locked_rows(tx, "schedules", SCHEDULE_COLS, ids, schedule_from).await?;
    let mut applied = Vec::with_capacity(steps.len());
    let mut taken: Vec<(&PlanStep, Schedule)> = Vec::with_capacity(steps.len());
    for step in steps {
        // Taken out once planned, so a second step for the same schedule finds nothing.
        let fresh = current.remove(&step.schedule_id).filter(|c| {
            c.status == ScheduleStatus::Active
                && c.version == step.expected_version
                && c.next_occurrence.as_ref() == Some(&step.expected_next)
        });
        applied.push(fresh.is_some());
        if let Some(schedule) = fresh {
            taken.push((step, schedule));
        }
    }
    let inserted = insert_payments(tx, &taken, audit.at).await?;
    move_cursors(tx, &taken, audit.at).await?;
    for (step, schedule) in &taken {
        let planned: Vec<serde_json::Value> = step
            .payments
            .iter()
            .filter(|p| inserted.contains(&(schedule.id, p.occurrence.to_string())))
            .map(|p| {
                serde_json::json!({ "occurrence": p.occurrence.to_string(), "state": planned_state(p) })
            })
            .collect();
        event(
            tx,
            audit,
            "schedule",
            schedule.id,
            "planned",
            serde_json::json!({
                "payments": planned, "next_run_at": step.next_run_at, "status": cursor_status(step),
            }),
        )
        .await?;
    }
    Ok(applied)
}

/// A planned payment's first state: `missed` when a rule says it is not to be charged.
fn planned_state(p: &PlannedPayment) -> &'static str {
    if p.missed.is_some() {
        "missed"
    } else {
        "scheduled"
    }
}

/// A schedule with a next run stays active; one without is completed.
fn cursor_status(step: &PlanStep) -> &'static str {
    if step.next_run_at.is_some() {
        "active"
    } else {
        "completed"
    }
}

/// Writes the steps' payments, many to a statement; an occurrence already written (by another
/// planner) is left alone. Returns the (schedule, occurrence) pairs written.
async fn insert_payments<B: Backend>(
    tx: &mut WriteTx<B>,
    taken: &[(&PlanStep, Schedule)],
    at: Timestamp,
) -> Result<HashSet<(ScheduleId, String)>> {
    /// Values per payment row, each row `(…, 1, …)` with its attempt number written out.
    const VALUES: usize = 11;
    let rows: Vec<(&Schedule, &PlannedPayment)> = taken
        .iter()
        .flat_map(|(step, schedule)| step.payments.iter().map(move |p| (schedule, p)))
        .collect();
    let mut inserted = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let values = (0..chunk.len())
            .map(|i| {
                let b = i * VALUES;
                // created_at and updated_at take the same value.
                format!(
                    "({}, 1, {}, ${})",
                    placeholders(b + 1, 7),
                    placeholders(b + 8, 4),
                    b + 11
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut insert = query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO payments (id, schedule_id, member_id, occurrence, due_at, currency, state, attempt, payment_method_id, schedule_version, reason, created_at, updated_at) \
             VALUES {values} ON CONFLICT (schedule_id, occurrence) DO NOTHING RETURNING schedule_id, occurrence"
        )));
        for (schedule, p) in chunk {
            insert = insert
                .bind(PaymentId::new())
                .bind(schedule.id)
                .bind(schedule.member_id)
                .bind(p.occurrence.to_string())
                .bind(DbTime(p.due_at))
                .bind(schedule.currency.code())
                .bind(planned_state(p))
                .bind(schedule.card_id)
                .bind(schedule.version)
                .bind(p.missed.clone())
                .bind(DbTime(at));
        }
        for row in insert
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("planning payments"))?
        {
            inserted.insert((
                get::<ScheduleId>(&row, "payments", "schedule_id")?,
                get::<String>(&row, "payments", "occurrence")?,
            ));
        }
    }
    Ok(inserted)
}

/// Moves each schedule's cursor to its next run: one `UPDATE` for all the schedules that move
/// to the same run, occurrence and status.
async fn move_cursors<B: Backend>(
    tx: &mut WriteTx<B>,
    taken: &[(&PlanStep, Schedule)],
    at: Timestamp,
) -> Result<()> {
    type Cursor = (Option<Timestamp>, Option<String>, &'static str);
    let mut groups: BTreeMap<Cursor, Vec<ScheduleId>> = BTreeMap::new();
    for (step, schedule) in taken {
        let cursor = (
            step.next_run_at,
            step.next_occurrence.as_ref().map(|k| k.to_string()),
            cursor_status(step),
        );
        groups.entry(cursor).or_default().push(schedule.id);
    }
    for ((next_run_at, next_occurrence, status), ids) in groups {
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut update = query(sqlx::AssertSqlSafe(format!(
                "UPDATE schedules SET next_run_at = $1, next_occurrence = $2, status = $3, updated_at = $4 WHERE id IN ({})",
                placeholders(5, chunk.len())
            )))
            .bind(next_run_at.map(DbTime))
            .bind(next_occurrence.clone())
            .bind(status)
            .bind(DbTime(at));
            for id in chunk {
                update = update.bind(*id);
            }
            update
                .execute(tx.conn())
                .await
                .map_err(db_err("moving schedules' cursors"))?;
        }
    }
    Ok(())
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
    let moved = apply_plans_in(&mut tx, std::slice::from_ref(step), audit).await?;
    commit(tx).await?;
    Ok(moved.first() == Some(&true))
}

pub(crate) async fn apply_plans<B: Backend>(
    db: &SqlStore<B>,
    steps: &[PlanStep],
    audit: &Audit,
) -> Result<Vec<bool>> {
    let mut tx = db.begin_write().await?;
    let moved = apply_plans_in(&mut tx, steps, audit).await?;
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
