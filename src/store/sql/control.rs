//! Control: the schema and its migrations, the installation's pauses and marks, status and
//! activity, periodic jobs, audit events, and the processor's webhook events.

use jiff::Timestamp;
use std::collections::BTreeMap;
use uuid::Uuid;

use crate::domain::payment::PaymentState;
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::payments::claim::{due_backlog, next_wakeup};
use crate::store::sql::{
    Backend, SqlStore, commit, db_err, event, execute_script, get, id, opt_time, query, query_as,
    query_scalar, time,
};
use crate::store::{
    Activity, AttemptStats, Audit, Control, Event, MIN_BINARY_SCHEMA, MigrationReport, Pause,
    RECONCILE_SCHEMA, Result, SCHEMA_VERSION, SchemaState, StatusReport, StoreError, WriteTx,
};

pub(crate) fn pause_from(
    at: Option<Timestamp>,
    by: Option<String>,
    reason: Option<String>,
) -> Option<Pause> {
    at.map(|since| Pause {
        since,
        by,
        reason: reason.unwrap_or_default(),
    })
}

pub(crate) async fn control<B: Backend>(db: &SqlStore<B>) -> Result<Control> {
    let row = query("SELECT installation_id, min_binary_schema, charging_paused_at, charging_paused_by, charging_paused_reason, mail_paused_at, mail_paused_reason, reconcile_required_since FROM control WHERE id = 1")
        .fetch_optional(&db.pool)
        .await
        .map_err(db_err("reading control"))?
        .ok_or_else(|| StoreError::Schema("the database has no installation id; run `autopay migrate`".into()))?;
    const T: &str = "control";
    Ok(Control {
        installation_id: id(&row, T, "installation_id")?,
        min_binary_schema: get(&row, T, "min_binary_schema")?,
        charging_paused: pause_from(
            opt_time(&row, T, "charging_paused_at")?,
            get(&row, T, "charging_paused_by")?,
            get(&row, T, "charging_paused_reason")?,
        ),
        mail_paused: pause_from(
            opt_time(&row, T, "mail_paused_at")?,
            None,
            get(&row, T, "mail_paused_reason")?,
        ),
        reconcile_required_since: opt_time(&row, T, "reconcile_required_since")?,
    })
}

pub(crate) async fn counts<B: Backend>(
    pool: &sqlx::Pool<B>,
    sql: &'static str,
) -> Result<BTreeMap<String, i64>> {
    let rows = query(sql)
        .fetch_all(pool)
        .await
        .map_err(db_err("counting"))?;
    let mut out = BTreeMap::new();
    for row in rows {
        out.insert(
            get::<String>(&row, "status", "k")?,
            get::<i64>(&row, "status", "n")?,
        );
    }
    Ok(out)
}

/// Runs a housekeeping `DELETE` whose one parameter is the cut-off time; returns how many
/// rows went.
pub(crate) async fn delete_before<B: Backend>(
    tx: &mut WriteTx<B>,
    sql: &'static str,
    before: Timestamp,
    doing: &'static str,
) -> Result<u64> {
    Ok(query(sql)
        .bind(DbTime(before))
        .execute(tx.conn())
        .await
        .map_err(db_err(doing))?
        .rows_affected())
}

pub(crate) async fn migrate<B: Backend>(
    db: &SqlStore<B>,
    now: Timestamp,
) -> Result<MigrationReport> {
    let mut tx = db.begin_write().await?;
    B::lock_for_migration(&mut tx).await?;
    execute_script(B::BOOTSTRAP, tx.conn())
        .await
        .map_err(db_err("creating the migrations table"))?;
    let done: Vec<i64> = query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("reading applied migrations"))?;
    let mut applied = Vec::new();
    for (version, name, sql) in B::MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        execute_script(sql, tx.conn()).await.map_err(|e| {
            StoreError::Schema(format!(
                "migration {version} ({name}) failed: {e}; nothing was changed"
            ))
        })?;
        query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(*version)
            .bind(*name)
            .bind(DbTime(now))
            .execute(tx.conn())
            .await
            .map_err(db_err("recording a migration"))?;
        applied.push(format!("{version:04}_{name}"));
    }
    let existing: Option<DbId> = query_scalar("SELECT installation_id FROM control WHERE id = 1")
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("reading the installation id"))?;
    let installation_id = match existing {
        Some(id) => id.0,
        None => {
            let id = Uuid::now_v7();
            query("INSERT INTO control (id, installation_id, min_binary_schema, created_at) VALUES (1, $1, $2, $3)")
                .bind(DbId(id))
                .bind(MIN_BINARY_SCHEMA)
                .bind(DbTime(now))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording the installation id"))?;
            id
        }
    };
    commit(tx).await?;
    Ok(MigrationReport {
        applied,
        schema_version: SCHEMA_VERSION,
        installation_id,
    })
}

pub(crate) async fn schema_state<B: Backend>(db: &SqlStore<B>) -> Result<SchemaState> {
    let applied: Option<i64> = match query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&db.pool)
        .await
    {
        Ok(v) => v,
        Err(e) => match StoreError::from_sqlx(e, "reading the schema version") {
            StoreError::Schema(_) => None,
            other => return Err(other),
        },
    };
    let applied = applied.unwrap_or(0);
    let min_binary = if applied == 0 {
        0
    } else {
        query_scalar::<_, i64>("SELECT min_binary_schema FROM control WHERE id = 1")
            .fetch_optional(&db.pool)
            .await
            .map_err(db_err("reading control"))?
            .unwrap_or(0)
    };
    Ok(SchemaState {
        applied,
        min_binary,
    })
}

pub(crate) async fn status<B: Backend>(db: &SqlStore<B>) -> Result<StatusReport> {
    let control = control(db).await?;
    let members_bouncing: i64 =
        query_scalar("SELECT COUNT(*) FROM members WHERE email_bouncing = TRUE")
            .fetch_one(&db.pool)
            .await
            .map_err(db_err("counting"))?;
    let findings_open: i64 =
        query_scalar("SELECT COUNT(*) FROM reconcile_findings WHERE acknowledged_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .map_err(db_err("counting findings"))?;
    let processor_events = counts(&db.pool, "SELECT type AS k, COUNT(*) AS n FROM webhook_events WHERE type IN ('charge.refunded', 'charge.dispute.created') GROUP BY type").await?;
    Ok(StatusReport {
        backend: format!("{:?}", B::KIND).to_lowercase(),
        schema_version: schema_state(db).await?.applied,
        control,
        members: counts(
            &db.pool,
            "SELECT status AS k, COUNT(*) AS n FROM members GROUP BY status",
        )
        .await?,
        schedules: counts(
            &db.pool,
            "SELECT status AS k, COUNT(*) AS n FROM schedules GROUP BY status",
        )
        .await?,
        payments: counts(
            &db.pool,
            "SELECT state AS k, COUNT(*) AS n FROM payments GROUP BY state",
        )
        .await?,
        bills: counts(
            &db.pool,
            "SELECT status AS k, COUNT(*) AS n FROM bills GROUP BY status",
        )
        .await?,
        notifications: counts(
            &db.pool,
            "SELECT state AS k, COUNT(*) AS n FROM notifications GROUP BY state",
        )
        .await?,
        members_bouncing,
        findings_open,
        processor_events,
    })
}

pub(crate) async fn events<B: Backend>(db: &SqlStore<B>, entity_id: &str) -> Result<Vec<Event>> {
    let rows = query("SELECT id, at, actor, entity, entity_id, action, detail FROM events WHERE entity_id = $1 ORDER BY at, id")
        .bind(entity_id)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("reading events"))?;
    rows.iter()
        .map(|row| {
            const T: &str = "events";
            Ok(Event {
                id: id(row, T, "id")?,
                at: time(row, T, "at")?,
                actor: get(row, T, "actor")?,
                entity: get(row, T, "entity")?,
                entity_id: get(row, T, "entity_id")?,
                action: get(row, T, "action")?,
                detail: get::<sqlx::types::Json<serde_json::Value>>(row, T, "detail")?.0,
            })
        })
        .collect()
}

pub(crate) async fn set_charging_pause<B: Backend>(
    db: &SqlStore<B>,
    reason: Option<&str>,
    audit: &Audit,
) -> Result<Control> {
    let mut tx = db.begin_write().await?;
    let done = match reason {
        Some(reason) => query("UPDATE control SET charging_paused_at = COALESCE(charging_paused_at, $1), charging_paused_by = $2, charging_paused_reason = $3 WHERE id = 1")
            .bind(DbTime(audit.at))
            .bind(&audit.actor)
            .bind(reason)
            .execute(tx.conn())
            .await,
        None => query("UPDATE control SET charging_paused_at = NULL, charging_paused_by = NULL, charging_paused_reason = NULL WHERE id = 1")
            .execute(tx.conn())
            .await,
    }
    .map_err(db_err("changing the charging pause"))?;
    if done.rows_affected() == 0 {
        return Err(StoreError::Schema(
            "the database has no installation id; run `autopay migrate`".into(),
        ));
    }
    let installation: DbId = query_scalar("SELECT installation_id FROM control WHERE id = 1")
        .fetch_one(tx.conn())
        .await
        .map_err(db_err("reading control"))?;
    event(
        &mut tx,
        audit,
        "control",
        installation.0,
        if reason.is_some() {
            "charging_paused"
        } else {
            "charging_resumed"
        },
        serde_json::json!({ "reason": reason }),
    )
    .await?;
    B::wake_others(&mut tx).await?;
    commit(tx).await?;
    control(db).await
}

pub(crate) async fn attempt_stats<B: Backend>(
    db: &SqlStore<B>,
    since: Timestamp,
) -> Result<AttemptStats> {
    let row = query("SELECT COUNT(*) AS attempts, CAST(COALESCE(SUM(CASE WHEN outcome = 'declined' THEN 1 ELSE 0 END), 0) AS BIGINT) AS declines, CAST(COALESCE(SUM(CASE WHEN outcome IN ('unknown', 'busy', 'mismatch') THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors FROM processor_calls WHERE kind = 'charge' AND outcome IS NOT NULL AND started_at >= $1")
        .bind(DbTime(since))
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("reading attempt statistics"))?;
    const T: &str = "processor_calls";
    Ok(AttemptStats {
        attempts: get(&row, T, "attempts")?,
        declines: get(&row, T, "declines")?,
        errors: get(&row, T, "errors")?,
    })
}

pub(crate) async fn record_job_run<B: Backend>(
    db: &SqlStore<B>,
    job: &str,
    worker: &str,
    at: Timestamp,
) -> Result<()> {
    let mut tx = db.begin_write().await?;
    query("INSERT INTO job_runs (job, worker, last_run) VALUES ($1, $2, $3) ON CONFLICT (job, worker) DO UPDATE SET last_run = excluded.last_run")
        .bind(job)
        .bind(worker)
        .bind(DbTime(at))
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a periodic job's run"))?;
    commit(tx).await
}

pub(crate) async fn activity<B: Backend>(
    db: &SqlStore<B>,
    now: Timestamp,
    since: Timestamp,
) -> Result<Activity> {
    let (due_now, oldest_due) = due_backlog(db, now).await?;
    let next_due = next_wakeup(db).await?;
    let jobs: Vec<(String, DbTime)> =
        query_as("SELECT job, MAX(last_run) FROM job_runs GROUP BY job ORDER BY job")
            .fetch_all(&db.pool)
            .await
            .map_err(db_err("reading the periodic jobs' runs"))?;
    let recent = |state: PaymentState| {
        query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM payments WHERE state = $1 AND updated_at >= $2",
        )
        .bind(state.as_str())
        .bind(DbTime(since))
        .fetch_one(&db.pool)
    };
    let failed = recent(PaymentState::Failed)
        .await
        .map_err(db_err("counting recent failures"))?;
    let unknown = recent(PaymentState::Unknown)
        .await
        .map_err(db_err("counting recent failures"))?;
    let needs_review = recent(PaymentState::NeedsReview)
        .await
        .map_err(db_err("counting recent failures"))?;
    Ok(Activity {
        due_now,
        oldest_due,
        next_due,
        jobs: jobs.into_iter().map(|(j, t)| (j, t.0)).collect(),
        failed,
        unknown,
        needs_review,
    })
}

pub(crate) async fn database_clock<B: Backend>(db: &SqlStore<B>) -> Result<Option<Timestamp>> {
    let Some(sql) = B::CLOCK_QUERY else {
        return Ok(None);
    };
    let t: DbTime = query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("reading the database's clock"))?;
    Ok(Some(t.0))
}

pub(crate) async fn prune_job_runs<B: Backend>(db: &SqlStore<B>, before: Timestamp) -> Result<u64> {
    let mut tx = db.begin_write().await?;
    let mut done = delete_before(
        &mut tx,
        "DELETE FROM job_runs WHERE last_run < $1",
        before,
        "deleting old job runs",
    )
    .await?;
    // Handled webhook events are kept while the processor may deliver them again
    // (Stripe: three days); refunds and disputes stay, for `status`.
    done += delete_before(&mut tx, "DELETE FROM webhook_events WHERE received_at < $1 AND type NOT IN ('charge.refunded', 'charge.dispute.created')", before, "deleting old webhook events").await?;
    commit(tx).await?;
    Ok(done)
}

pub(crate) async fn set_reconcile_mark<B: Backend>(
    db: &SqlStore<B>,
    since: Option<Timestamp>,
    audit: &Audit,
) -> Result<()> {
    let mut tx = db.begin_write().await?;
    match since {
        Some(t) => query("UPDATE control SET reconcile_required_since = CASE WHEN reconcile_required_since IS NOT NULL AND reconcile_required_since < $1 THEN reconcile_required_since ELSE $1 END, min_binary_schema = CASE WHEN min_binary_schema < $2 THEN $2 ELSE min_binary_schema END WHERE id = 1")
            .bind(DbTime(t))
            .bind(RECONCILE_SCHEMA),
        None => query("UPDATE control SET reconcile_required_since = NULL, min_binary_schema = $1 WHERE id = 1")
            .bind(MIN_BINARY_SCHEMA),
    }
    .execute(tx.conn())
    .await
    .map_err(db_err("marking the database"))?;
    let action = if since.is_some() {
        "reconcile_required"
    } else {
        "reconciled"
    };
    event(
        &mut tx,
        audit,
        "control",
        Uuid::nil(),
        action,
        serde_json::json!({ "since": since }),
    )
    .await?;
    commit(tx).await
}

pub(crate) async fn webhook_seen<B: Backend>(db: &SqlStore<B>, id: &str) -> Result<bool> {
    let n: i64 = query_scalar("SELECT COUNT(*) FROM webhook_events WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("reading webhook events"))?;
    Ok(n > 0)
}

pub(crate) async fn record_webhook<B: Backend>(
    db: &SqlStore<B>,
    id: &str,
    kind: &str,
    outcome: &str,
    at: Timestamp,
) -> Result<bool> {
    let mut tx = db.begin_write().await?;
    let added = query("INSERT INTO webhook_events (id, type, received_at, outcome) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .bind(kind)
        .bind(DbTime(at))
        .bind(outcome)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a webhook event"))?
        .rows_affected() > 0;
    commit(tx).await?;
    Ok(added)
}
