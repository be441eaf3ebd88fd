//! Reconcile: what the processor says about attempts a restored database may not know, and the
//! findings it could not place.

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::attempt::ProcessorAttempt;
use crate::domain::ids::{PaymentId, ScheduleId};
use crate::domain::money::Money;
use crate::domain::payment::PaymentState;
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::payments::outcome::settle_success;
use crate::store::sql::payments::{Locked, lock_payment};
use crate::store::sql::{
    Backend, Record, SqlStore, commit, currency, db_err, event, get, id, new_id, opt_time, parsed,
    query, query_scalar, time,
};
use crate::store::{Audit, Finding, Reconciled, Result, StoreError, WriteTx};

pub(crate) fn finding_from(row: &impl Record) -> Result<Finding> {
    const T: &str = "reconcile_findings";
    let kind = parsed(
        T,
        "kind",
        get::<String>(row, T, "kind")?.parse::<crate::domain::reconcile::FindingKind>(),
    )?;
    Ok(Finding {
        id: id(row, T, "id")?,
        kind: kind.as_str().to_string(),
        explanation: kind.explain().to_string(),
        idempotency_key: get(row, T, "idempotency_key")?,
        reference: get(row, T, "reference")?,
        payment_id: get(row, T, "payment_id")?,
        schedule_id: get(row, T, "schedule_id")?,
        occurrence: get(row, T, "occurrence")?,
        attempt: get(row, T, "attempt")?,
        amount: Money::from_minor(get(row, T, "amount")?, currency(row, T)?),
        charged_at: time(row, T, "charged_at")?,
        found_at: time(row, T, "found_at")?,
        acknowledged_at: opt_time(row, T, "acknowledged_at")?,
        acknowledged_by: get(row, T, "acknowledged_by")?,
        note: get(row, T, "note")?,
    })
}

pub(crate) const FINDING_COLS: &str = "id, kind, idempotency_key, reference, payment_id, schedule_id, occurrence, attempt, amount, currency, charged_at, found_at, acknowledged_at, acknowledged_by, note";

/// Lists a charge `reconcile` could not place; a second run finds it listed already.
pub(crate) async fn insert_finding<B: Backend>(
    tx: &mut WriteTx<B>,
    found: &ProcessorAttempt,
    kind: crate::domain::reconcile::FindingKind,
    payment_id: Option<PaymentId>,
    audit: &Audit,
) -> Result<()> {
    let done = query("INSERT INTO reconcile_findings (id, idempotency_key, kind, reference, payment_id, schedule_id, occurrence, attempt, amount, currency, charged_at, found_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (idempotency_key) DO NOTHING")
        .bind(DbId(new_id()))
        .bind(&found.idempotency_key)
        .bind(kind.as_str())
        .bind(&found.reference)
        .bind(payment_id)
        .bind(found.schedule_id)
        .bind(&found.occurrence)
        .bind(found.attempt)
        .bind(found.amount.minor())
        .bind(found.amount.currency().code())
        .bind(DbTime(found.created_at))
        .bind(DbTime(audit.at))
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a reconcile finding"))?
        .rows_affected();
    if done > 0 {
        event(
            tx,
            audit,
            "reconcile",
            found.schedule_id,
            "finding",
            serde_json::json!({
                "kind": kind.as_str(), "reference": found.reference, "attempt": found.attempt,
                "occurrence": found.occurrence, "payment_id": payment_id,
            }),
        )
        .await?;
    }
    Ok(())
}

/// Writes (or completes) the history of one attempt the processor reports: the attempt
/// row under its key, and the request in the card's history so the card limits count it.
pub(crate) async fn record_found_attempt<B: Backend>(
    tx: &mut WriteTx<B>,
    l: &Locked,
    found: &ProcessorAttempt,
    audit: &Audit,
) -> Result<()> {
    let payment = &l.held.payment;
    let outcome = if found.approved {
        "approved"
    } else {
        "declined"
    };
    let existing: Option<DbId> =
        query_scalar("SELECT id FROM payment_attempts WHERE idempotency_key = $1")
            .bind(&found.idempotency_key)
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading an attempt"))?;
    if existing.is_some() {
        // Its request is in the card's history already, unfinished: finish it.
        query("UPDATE processor_calls SET outcome = $1, detail = $2, finished_at = $3 WHERE payment_id = $4 AND attempt = $5 AND kind = 'charge' AND outcome IS NULL")
            .bind(outcome)
            .bind(found.decline_code().unwrap_or(&found.reference))
            .bind(DbTime(found.created_at))
            .bind(payment.id)
            .bind(found.attempt)
            .execute(tx.conn())
            .await
            .map_err(db_err("recording a reconciled request"))?;
        query("UPDATE payment_attempts SET outcome = $1, decline_code = $2, processor_reference = $3, finished_at = $4, resend_stopped = TRUE WHERE idempotency_key = $5")
            .bind(outcome)
            .bind(found.decline_code())
            .bind(&found.reference)
            .bind(DbTime(found.created_at))
            .bind(&found.idempotency_key)
            .execute(tx.conn())
            .await
            .map_err(db_err("recording a reconciled attempt"))?;
    } else {
        query("INSERT INTO payment_attempts (id, payment_id, attempt, payment_method_id, idempotency_key, amount, currency, started_at, outcome, decline_code, processor_reference, finished_at, first_sent_at, sends, resend_stopped) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $8, $8, 1, TRUE)")
            .bind(DbId(new_id()))
            .bind(payment.id)
            .bind(found.attempt)
            .bind(l.card.id)
            .bind(&found.idempotency_key)
            .bind(found.amount.minor())
            .bind(found.amount.currency().code())
            .bind(DbTime(found.created_at))
            .bind(outcome)
            .bind(found.decline_code())
            .bind(&found.reference)
            .execute(tx.conn())
            .await
            .map_err(db_err("recording a reconciled attempt"))?;
    }
    if existing.is_none() {
        query("INSERT INTO processor_calls (id, payment_id, attempt, payment_method_id, fingerprint, kind, actor, started_at, outcome, detail, finished_at) VALUES ($1, $2, $3, $4, $5, 'charge', $6, $7, $8, $9, $7)")
            .bind(DbId(new_id()))
            .bind(payment.id)
            .bind(found.attempt)
            .bind(l.card.id)
            .bind(l.card.fingerprint.as_deref())
            .bind(&audit.actor)
            .bind(DbTime(found.created_at))
            .bind(outcome)
            .bind(found.decline_code().unwrap_or(&found.reference))
            .execute(tx.conn())
            .await
            .map_err(db_err("recording a reconciled request"))?;
    }
    Ok(())
}

pub(crate) async fn newest_attempt<B: Backend>(db: &SqlStore<B>) -> Result<Option<Timestamp>> {
    let mut newest: Option<Timestamp> = None;
    for sql in [
        "SELECT MAX(started_at) FROM payment_attempts",
        "SELECT MAX(started_at) FROM processor_calls",
    ] {
        let t: Option<DbTime> = query_scalar(sql)
            .fetch_one(&db.pool)
            .await
            .map_err(db_err("finding the newest record"))?;
        newest = newest.max(t.map(|t| t.0));
    }
    Ok(newest)
}

pub(crate) async fn known_keys<B: Backend>(
    db: &SqlStore<B>,
    keys: &[String],
) -> Result<std::collections::HashSet<String>> {
    let mut known = std::collections::HashSet::new();
    for chunk in keys.chunks(500) {
        let marks = (1..=chunk.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT idempotency_key FROM payment_attempts WHERE idempotency_key IN ({marks}) \
             UNION SELECT idempotency_key FROM reconcile_findings WHERE idempotency_key IN ({marks})"
        );
        let mut q = query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
        for k in chunk {
            q = q.bind(k);
        }
        known.extend(
            q.fetch_all(&db.pool)
                .await
                .map_err(db_err("comparing attempts with the processor's"))?,
        );
    }
    Ok(known)
}

pub(crate) async fn reconcile_attempt<B: Backend>(
    db: &SqlStore<B>,
    found: &ProcessorAttempt,
    last_try: bool,
    audit: &Audit,
) -> Result<Reconciled> {
    use crate::domain::reconcile::{Decision, OurPayment, Recorded, decide};
    let mut tx = db.begin_write().await?;
    let listed: Option<DbId> =
        query_scalar("SELECT id FROM reconcile_findings WHERE idempotency_key = $1")
            .bind(&found.idempotency_key)
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading findings"))?;
    if listed.is_some() {
        return Ok(Reconciled::Finding);
    }
    // The payment the attempt was made for: by its id, or (planned again after the
    // restore under another id) by its schedule and occurrence, which the key names.
    let payment_id: Option<PaymentId> = query_scalar("SELECT id FROM payments WHERE id = $1 OR (schedule_id = $2 AND occurrence = $3) ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1")
        .bind(found.payment_id)
        .bind(found.schedule_id)
        .bind(&found.occurrence)
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("finding the attempt's payment"))?;
    let locked = match payment_id {
        Some(pid) => lock_payment(&mut tx, pid).await?,
        None => None,
    };
    let ours = match &locked {
        None => None,
        Some(l) => {
            let outcome: Option<Option<String>> =
                query_scalar("SELECT outcome FROM payment_attempts WHERE idempotency_key = $1")
                    .bind(&found.idempotency_key)
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading an attempt"))?;
            let in_flight: Option<i64> = query_scalar("SELECT attempt FROM payment_attempts WHERE payment_id = $1 AND attempt = $2 AND first_sent_at IS NOT NULL AND outcome IS NULL")
                .bind(l.held.payment.id)
                .bind(l.held.payment.attempt)
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading an attempt"))?;
            Some(OurPayment {
                current_in_flight: in_flight.is_some(),
                state: l.held.payment.state,
                attempt: l.held.payment.attempt,
                reference: l.held.payment.processor_reference.clone(),
                recorded: outcome.map(|o| match o.as_deref() {
                    Some("approved") => Recorded::Approved,
                    Some("declined") => Recorded::Declined,
                    _ => Recorded::Open,
                }),
            })
        }
    };
    let decision = decide(found, ours.as_ref());
    let done = match (decision, locked) {
        (Decision::Known, _) => Reconciled::Known,
        (Decision::Ignore, _) => Reconciled::Ignored,
        (Decision::Finding(crate::domain::reconcile::FindingKind::NoPayment), _) if !last_try => {
            let schedule: Option<ScheduleId> =
                query_scalar("SELECT id FROM schedules WHERE id = $1")
                    .bind(found.schedule_id)
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a schedule"))?;
            if schedule.is_some() {
                return Ok(Reconciled::Unplanned);
            }
            insert_finding(
                &mut tx,
                found,
                crate::domain::reconcile::FindingKind::NoPayment,
                None,
                audit,
            )
            .await?;
            Reconciled::Finding
        }
        (Decision::Finding(kind), l) => {
            insert_finding(
                &mut tx,
                found,
                kind,
                l.as_ref().map(|l| l.held.payment.id),
                audit,
            )
            .await?;
            Reconciled::Finding
        }
        (Decision::Record { .. }, None) => {
            return Err(StoreError::Internal(
                "reconcile decided to record onto a payment it did not find".into(),
            ));
        }
        (Decision::Record { moves_to }, Some(mut l)) => {
            record_found_attempt(&mut tx, &l, found, audit).await?;
            let (payment_id, from) = (l.held.payment.id, l.held.payment.state);
            let state = match moves_to {
                None => from,
                Some(PaymentState::Succeeded) => {
                    // The money moved at the amount the processor reports; credit the
                    // lost attempt reserved is not known, so none is used.
                    query("UPDATE payments SET attempt = $1, amount = $2, credit_applied = 0 WHERE id = $3")
                        .bind(found.attempt)
                        .bind(found.amount.minor())
                        .bind(payment_id)
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("recording a reconciled success"))?;
                    l.held.payment.attempt = found.attempt;
                    l.held.payment.amount = Some(found.amount);
                    l.held.credit_applied = 0;
                    // The receipt and the allocations carry the moment the money moved.
                    let charged = Audit {
                        actor: audit.actor.clone(),
                        at: found.created_at,
                    };
                    settle_success(
                        &mut tx,
                        &l,
                        PaymentState::Succeeded,
                        &found.reference,
                        &charged,
                    )
                    .await?;
                    PaymentState::Succeeded
                }
                Some(state) => {
                    let reason = format!(
                        "reconcile: the processor declined attempt {} ({}) after the backup this database was restored from; retry it with `autopay payment retry` or resolve it",
                        found.attempt,
                        found.decline_code().unwrap_or("no code")
                    );
                    query("UPDATE payments SET state = $1, attempt = $2, amount = $3, credit_applied = 0, decline_code = $4, reason = $5, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $6 WHERE id = $7")
                        .bind(state.as_str())
                        .bind(found.attempt)
                        .bind(found.amount.minor())
                        .bind(found.decline_code())
                        .bind(&reason)
                        .bind(DbTime(audit.at))
                        .bind(payment_id)
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("recording a reconciled decline"))?;
                    state
                }
            };
            event(&mut tx, audit, "payment", payment_id, "reconciled", serde_json::json!({
                "attempt": found.attempt, "approved": found.approved, "reference": found.reference,
                "from": from.as_str(), "to": state.as_str(),
            })).await?;
            Reconciled::Recorded { payment_id, state }
        }
    };
    commit(tx).await?;
    Ok(done)
}

pub(crate) async fn findings<B: Backend>(
    db: &SqlStore<B>,
    open_only: bool,
) -> Result<Vec<Finding>> {
    let filter = if open_only {
        " WHERE acknowledged_at IS NULL"
    } else {
        ""
    };
    let rows = query(sqlx::AssertSqlSafe(format!(
        "SELECT {FINDING_COLS} FROM reconcile_findings{filter} ORDER BY charged_at, id"
    )))
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("reading findings"))?;
    rows.iter().map(finding_from).collect()
}

pub(crate) async fn acknowledge_finding<B: Backend>(
    db: &SqlStore<B>,
    id: Uuid,
    note: &str,
    audit: &Audit,
) -> Result<Finding> {
    let mut tx = db.begin_write().await?;
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {FINDING_COLS} FROM reconcile_findings WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(DbId(id))
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a finding"))?
    .ok_or_else(|| {
        StoreError::NotFound(format!(
            "no finding has id {id}; list them with `autopay reconcile --findings`"
        ))
    })?;
    let finding = finding_from(&row)?;
    if let Some(at) = finding.acknowledged_at {
        return Err(StoreError::Conflict(format!(
            "finding {id} was acknowledged at {at} by {}; nothing changed",
            finding.acknowledged_by.as_deref().unwrap_or("someone")
        )));
    }
    query("UPDATE reconcile_findings SET acknowledged_at = $1, acknowledged_by = $2, note = $3 WHERE id = $4")
        .bind(DbTime(audit.at))
        .bind(&audit.actor)
        .bind(note)
        .bind(DbId(id))
        .execute(tx.conn())
        .await
        .map_err(db_err("acknowledging a finding"))?;
    event(
        &mut tx,
        audit,
        "reconcile",
        id,
        "acknowledged",
        serde_json::json!({ "note": note }),
    )
    .await?;
    commit(tx).await?;
    Ok(Finding {
        acknowledged_at: Some(audit.at),
        acknowledged_by: Some(audit.actor.clone()),
        note: Some(note.to_string()),
        ..finding
    })
}
