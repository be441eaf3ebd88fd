//! Claims: which due payments a worker takes, under a lease, and when work next falls due.

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::payment::{PaymentState, Transition};
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::payments::attempt::charging_paused_in;
use crate::store::sql::payments::{PAYMENT_COLS, payment_from};
use crate::store::sql::{
    Backend, SqlStore, commit, db_err, event, parsed, query, query_as, query_scalar, step,
};
use crate::store::{Audit, ClaimRules, Lease, Result, StoreError, Work, WorkKind, WriteTx};

/// Why a payment claimed late was not charged (the lateness rule, applied at the claim).
pub(crate) const LATE_REASON: &str = "not charged within payments.max_lateness of its due time";

/// Why an earlier occurrence was not charged (the coalesce rule, applied at the claim).
pub(crate) const COALESCED_REASON: &str = "coalesced into a later payment of the same schedule";

/// Why a due payment is not charged when claimed, if it is not: older than
/// `payments.max_lateness`, or (with `payments.misfire = coalesce`) an earlier occurrence of
/// a recurring schedule whose later occurrence is due too.
pub(crate) async fn late_or_coalesced<B: Backend>(
    tx: &mut WriteTx<B>,
    rules: &ClaimRules,
    cutoff: Timestamp,
    now: Timestamp,
    schedule_id: DbId,
    due_at: Timestamp,
    next_attempt_at: Option<Timestamp>,
) -> Result<Option<&'static str>> {
    if next_attempt_at.unwrap_or(due_at) < cutoff {
        return Ok(Some(LATE_REASON));
    }
    // Only a first attempt the planner wrote is coalesced: a retry or an operator's
    // retry has a next_attempt_at of its own.
    if rules.misfire != crate::domain::schedule::Misfire::Coalesce || next_attempt_at.is_some() {
        return Ok(None);
    }
    let later: Option<DbId> = query_scalar(LATER_PAYMENT_SQL)
        .bind(schedule_id)
        .bind(DbTime(due_at))
        .bind(DbTime(now))
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("looking for a later occurrence"))?;
    Ok(later.map(|_| COALESCED_REASON))
}

pub(crate) async fn claim_work<B: Backend>(
    db: &SqlStore<B>,
    owner: &str,
    now: Timestamp,
    rules: &ClaimRules,
) -> Result<Vec<Work>> {
    let until = now
        .checked_add(
            jiff::SignedDuration::try_from(rules.lease)
                .map_err(|e| StoreError::Internal(e.to_string()))?,
        )
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    let audit = Audit {
        actor: owner.to_string(),
        at: now,
    };
    let cutoff = crate::domain::charge::lateness_cutoff(now, rules.max_lateness);
    let mut tx = db.begin_write().await?;
    let paused = charging_paused_in(&mut tx).await?;
    let mut work = Vec::new();
    loop {
        let want = i64::from(rules.limit) - work.len() as i64;
        if want <= 0 {
            break;
        }
        // Attempts to settle first (few: the unknown outcomes due for a lookup and
        // the claims that expired mid-call), then due charges, read in their order
        // from the payments_claimable index rather than sorted, however many are due.
        let mut candidates: Vec<(DbId, String, DbId, DbTime, Option<DbTime>)> = query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, state, schedule_id, due_at, next_attempt_at FROM payments WHERE \
             (state = 'unknown' AND (next_attempt_at IS NULL OR next_attempt_at <= $1) AND (lease_expires_at IS NULL OR lease_expires_at <= $1)) \
             OR (state = 'processing' AND lease_expires_at <= $1) \
             ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2{}", B::SKIP_LOCKED
        )))
        .bind(DbTime(now))
        .bind(want)
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("finding payments to settle"))?;
        let more = want - candidates.len() as i64;
        if more > 0 && !paused {
            let due: Vec<(DbId, String, DbId, DbTime, Option<DbTime>)> =
                query_as(B::claim_due_sql())
                    .bind(DbTime(now))
                    .bind(more)
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("finding due payments"))?;
            candidates.extend(due);
        }
        if candidates.is_empty() {
            break;
        }
        let mut missed = 0;
        for (payment_id, state, schedule_id, due_at, next_attempt_at) in candidates {
            let from: PaymentState = parsed("payments", "state", state.parse())?;
            if from.is_unclaimed() {
                // A payment a pause kept waiting meets the lateness and misfire rules
                // when it is claimed, as it would have when it was planned.
                if let Some(reason) = late_or_coalesced(
                    &mut tx,
                    rules,
                    cutoff,
                    now,
                    schedule_id,
                    due_at.0,
                    next_attempt_at.map(|t| t.0),
                )
                .await?
                {
                    let state = step(from, Transition::Late)?;
                    query("UPDATE payments SET state = $1, reason = $2, next_attempt_at = NULL, updated_at = $3 WHERE id = $4")
                        .bind(state.as_str())
                        .bind(reason)
                        .bind(DbTime(now))
                        .bind(payment_id)
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("recording a payment as missed"))?;
                    event(
                        &mut tx,
                        &audit,
                        "payment",
                        payment_id.0,
                        "missed",
                        serde_json::json!({ "reason": reason }),
                    )
                    .await?;
                    missed += 1;
                    continue;
                }
            }
            let (transition, kind) = if from.is_unclaimed() {
                (Transition::Claim, WorkKind::Charge)
            } else {
                // An unknown outcome, or a claim that expired mid-call: settle the
                // same attempt, never a new key.
                (Transition::Settle, WorkKind::Settle)
            };
            let token = Uuid::new_v4();
            let row = query(sqlx::AssertSqlSafe(format!(
                "UPDATE payments SET state = $1, lease_owner = $2, lease_token = $3, lease_expires_at = $4, \
                 unknown_since = CASE WHEN $5 THEN COALESCE(unknown_since, $6) ELSE unknown_since END, updated_at = $6 \
                 WHERE id = $7 RETURNING {PAYMENT_COLS}"
            )))
            .bind(step(from, transition)?.as_str())
            .bind(owner)
            .bind(token.to_string())
            .bind(DbTime(until))
            .bind(from == PaymentState::Processing)
            .bind(DbTime(now))
            .bind(payment_id)
            .fetch_one(tx.conn())
            .await
            .map_err(db_err("claiming a payment"))?;
            let payment = payment_from(&row)?;
            if from == PaymentState::Processing {
                event(
                    &mut tx,
                    &audit,
                    "payment",
                    payment.id,
                    "lease_expired",
                    serde_json::json!({ "attempt": payment.attempt }),
                )
                .await?;
            }
            work.push(Work {
                lease: Lease {
                    payment_id: payment.id,
                    token,
                },
                kind,
                payment,
                taken_over: from == PaymentState::Processing,
            });
        }
        if missed == 0 {
            break;
        }
    }
    commit(tx).await?;
    Ok(work)
}

pub(crate) async fn renew_leases<B: Backend>(
    db: &SqlStore<B>,
    leases: &[Lease],
    until: Timestamp,
) -> Result<u64> {
    let mut held = 0;
    for lease in leases {
        held += query("UPDATE payments SET lease_expires_at = $1 WHERE id = $2 AND lease_token = $3 AND state = 'processing'")
            .bind(DbTime(until))
            .bind(DbId(lease.payment_id))
            .bind(lease.token.to_string())
            .execute(&db.pool)
            .await
            .map_err(db_err("renewing a lease"))?
            .rows_affected();
    }
    Ok(held)
}

pub(crate) async fn next_wakeup<B: Backend>(db: &SqlStore<B>) -> Result<Option<Timestamp>> {
    let paused = crate::store::sql::control::control(db)
        .await?
        .charging_paused
        .is_some();
    let mut earliest: Option<Timestamp> = None;
    let mut queries = vec![
        "SELECT MIN(next_run_at) FROM schedules WHERE status = 'active'",
        // An unknown outcome is settled at its lookup time, once no operator holds it.
        "SELECT MIN(CASE WHEN lease_expires_at IS NOT NULL AND lease_expires_at > next_attempt_at THEN lease_expires_at ELSE next_attempt_at END) FROM payments WHERE state = 'unknown'",
        "SELECT MIN(lease_expires_at) FROM payments WHERE state = 'processing'",
    ];
    if !paused {
        // While charging is paused no charge can be claimed: nothing to wake for.
        queries.push("SELECT MIN(COALESCE(next_attempt_at, due_at)) FROM payments WHERE state IN ('scheduled', 'retry_wait')");
    }
    for sql in queries {
        let t: Option<DbTime> = query_scalar(sql)
            .fetch_one(&db.pool)
            .await
            .map_err(db_err("finding the next due work"))?;
        if let Some(t) = t {
            earliest = Some(earliest.map_or(t.0, |e| e.min(t.0)));
        }
    }
    Ok(earliest)
}

pub(crate) async fn due_backlog<B: Backend>(
    db: &SqlStore<B>,
    now: Timestamp,
) -> Result<(i64, Option<Timestamp>)> {
    let (count, oldest): (i64, Option<DbTime>) = query_as("SELECT COUNT(*), MIN(COALESCE(next_attempt_at, due_at)) FROM payments WHERE state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1")
        .bind(DbTime(now))
        .fetch_one(&db.pool)
        .await
        .map_err(db_err("counting the due backlog"))?;
    Ok((count, oldest.map(|t| t.0)))
}

/// The earliest due charges, read in their order from the `payments_claimable` index
/// (its cost does not grow with how many are due): the text of `Backend::claim_due_sql`
/// (`crate::store::sql::Backend`), with the backend's index hint and row-lock suffix.
pub(crate) fn claim_due_sql(claim_index: &str, skip_locked: &str) -> String {
    format!(
        "SELECT id, state, schedule_id, due_at, next_attempt_at FROM payments{claim_index} WHERE state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1 ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2{skip_locked}"
    )
}

/// The misfire check: a later first payment of the same recurring schedule, due by now,
/// read among that schedule's payments (by `schedule_id`). `q.state || ''` keeps
/// `payments_due` out of the planner's choice: on the 1st of the month its statistics
/// still say few payments are scheduled, and PostgreSQL read every scheduled payment
/// for each check.
pub(crate) const LATER_PAYMENT_SQL: &str = "SELECT q.id FROM payments q JOIN schedules s ON s.id = q.schedule_id WHERE q.schedule_id = $1 AND s.kind = 'recurring' \
     AND q.state || '' = 'scheduled' AND q.next_attempt_at IS NULL AND q.due_at > $2 AND q.due_at <= $3 LIMIT 1";

#[cfg(test)]
mod tests {
    /// The claim's text per backend is the one the SQL had before it was built per backend.
    #[test]
    fn the_claim_reads_as_before_in_each_dialect() {
        let before = |index: &str, skip: &str| {
            [
                "SELECT id, state, schedule_id, due_at, next_attempt_at FROM payments",
                index,
                " WHERE state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1",
                " ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2",
                skip,
            ]
            .concat()
        };
        use crate::store::sql::Backend;
        assert_eq!(
            <sqlx::Sqlite as Backend>::claim_due_sql(),
            before(" INDEXED BY payments_claimable", "")
        );
        assert_eq!(
            <sqlx::Postgres as Backend>::claim_due_sql(),
            before("", " FOR UPDATE SKIP LOCKED")
        );
    }
}
