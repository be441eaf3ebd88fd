//! Claims: which due payments a worker takes, under a lease, and when work next falls due.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::ids::{PaymentId, ScheduleId};
use crate::domain::payment::{PaymentState, Transition};
use crate::sqltypes::DbTime;
use crate::store::sql::payments::attempt::charging_paused_in;
use crate::store::sql::payments::{PAYMENT_COLS, payment_from};
use crate::store::sql::{
    Backend, ROWS_PER_STATEMENT, SqlStore, commit, db_err, event, parsed, placeholders, query,
    query_as, query_scalar, step,
};
use crate::store::{Audit, ClaimRules, Lease, Result, StoreError, Work, WorkKind, WriteTx};

/// Why a payment claimed late was not charged (the lateness rule, applied at the claim).
pub(crate) const LATE_REASON: &str = "not charged within payments.max_lateness of its due time";

/// Why an earlier occurrence was not charged (the coalesce rule, applied at the claim).
pub(crate) const COALESCED_REASON: &str = "coalesced into a later payment of the same schedule";

/// Which of the unclaimed `candidates` (id, schedule, due, next attempt) are not charged when
/// claimed, and why: older than `payments.max_lateness`, or (with `payments.misfire =
/// coalesce`) an earlier occurrence of a recurring schedule whose later occurrence is due too.
/// One statement checks every candidate for a later occurrence.
async fn late_or_coalesced<B: Backend>(
    tx: &mut WriteTx<B>,
    rules: &ClaimRules,
    cutoff: Timestamp,
    now: Timestamp,
    candidates: &[&Candidate],
) -> Result<HashMap<PaymentId, &'static str>> {
    let mut missed = HashMap::new();
    let mut first_attempts = Vec::new();
    for c in candidates {
        if c.next_attempt_at.unwrap_or(c.due_at) < cutoff {
            missed.insert(c.id, LATE_REASON);
        } else if rules.misfire == crate::domain::schedule::Misfire::Coalesce
            && c.next_attempt_at.is_none()
        {
            // Only a first attempt the planner wrote is coalesced: a retry or an operator's
            // retry has a next_attempt_at of its own.
            first_attempts.push(c.id);
        }
    }
    for chunk in first_attempts.chunks(ROWS_PER_STATEMENT) {
        let mut check =
            query_scalar::<B, PaymentId>(sqlx::AssertSqlSafe(coalesced_sql(chunk.len())))
                .bind(DbTime(now));
        for id in chunk {
            check = check.bind(*id);
        }
        for id in check
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("looking for later occurrences"))?
        {
            missed.insert(id, COALESCED_REASON);
        }
    }
    Ok(missed)
}

/// A payment a claim may take: due to charge, or an attempt to settle.
struct Candidate {
    id: PaymentId,
    from: PaymentState,
    due_at: Timestamp,
    next_attempt_at: Option<Timestamp>,
}

/// Claims up to `rules.limit` payments in one transaction, set-based: the candidates in two
/// reads (attempts to settle, then due charges in their index's order), the lateness and
/// misfire rules in one more, and one `UPDATE … RETURNING` for every group of payments that
/// moves the same way, all under one lease token (a lease is this claim of this payment; a
/// later claim of any of them gets a token of its own).
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
    let token = Uuid::new_v4();
    let mut tx = db.begin_write().await?;
    let paused = charging_paused_in(&mut tx).await?;
    let mut work = Vec::new();
    loop {
        let want = i64::from(rules.limit) - work.len() as i64;
        if want <= 0 {
            break;
        }
        let candidates = candidates(&mut tx, now, want, paused, rules.settle).await?;
        if candidates.is_empty() {
            break;
        }
        // A payment a pause kept waiting meets the lateness and misfire rules when it is
        // claimed, as it would have when it was planned.
        let unclaimed: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.from.is_unclaimed())
            .collect();
        let missed = late_or_coalesced(&mut tx, rules, cutoff, now, &unclaimed).await?;
        let mut by_move: BTreeMap<(PaymentState, PaymentState), Vec<PaymentId>> = BTreeMap::new();
        let mut miss_by_move: BTreeMap<(PaymentState, &'static str), Vec<PaymentId>> =
            BTreeMap::new();
        for c in &candidates {
            match missed.get(&c.id) {
                Some(reason) => miss_by_move
                    .entry((step(c.from, Transition::Late)?, reason))
                    .or_default()
                    .push(c.id),
                None => {
                    // An unknown outcome, or a claim that expired mid-call: settle the same
                    // attempt, never a new key.
                    let transition = if c.from.is_unclaimed() {
                        Transition::Claim
                    } else {
                        Transition::Settle
                    };
                    by_move
                        .entry((c.from, step(c.from, transition)?))
                        .or_default()
                        .push(c.id)
                }
            }
        }
        for ((state, reason), ids) in &miss_by_move {
            record_missed(&mut tx, *state, reason, ids, &audit).await?;
        }
        let mut claimed: HashMap<PaymentId, (PaymentState, crate::store::Payment)> = HashMap::new();
        for ((from, to), ids) in &by_move {
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut update = query(sqlx::AssertSqlSafe(format!(
                    "UPDATE payments SET state = $1, lease_owner = $2, lease_token = $3, lease_expires_at = $4, \
                     unknown_since = CASE WHEN $5 THEN COALESCE(unknown_since, $6) ELSE unknown_since END, updated_at = $6 \
                     WHERE id IN ({}) RETURNING {PAYMENT_COLS}",
                    placeholders(7, chunk.len())
                )))
                .bind(to.as_str())
                .bind(owner)
                .bind(token.to_string())
                .bind(DbTime(until))
                .bind(*from == PaymentState::Processing)
                .bind(DbTime(now));
                for id in chunk {
                    update = update.bind(*id);
                }
                for row in update
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("claiming payments"))?
                {
                    let payment = payment_from(&row)?;
                    claimed.insert(payment.id, (*from, payment));
                }
            }
        }
        // In the order the candidates were read (RETURNING promises none).
        for c in &candidates {
            let Some((from, payment)) = claimed.remove(&c.id) else {
                continue;
            };
            let taken_over = from == PaymentState::Processing;
            if taken_over {
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
                kind: if from.is_unclaimed() {
                    WorkKind::Charge
                } else {
                    WorkKind::Settle
                },
                payment,
                taken_over,
            });
        }
        if missed.is_empty() {
            break;
        }
    }
    commit(tx).await?;
    Ok(work)
}

/// What a claim may take, in order: attempts to settle first (few: the unknown outcomes due
/// for a lookup and the claims that expired mid-call), then due charges, read in their order
/// from the `payments_claimable` index rather than sorted, however many are due.
///
/// The first read is written as one `state IN (…)` term and a `CASE`, not as an `OR` of two
/// states, so that it reads only the `payments_settle` index: given the `OR`, PostgreSQL
/// combined two scans of `payments_due`, visiting an entry for every payment ever charged
/// that a vacuum had not removed yet.
async fn candidates<B: Backend>(
    tx: &mut WriteTx<B>,
    now: Timestamp,
    want: i64,
    paused: bool,
    settle: bool,
) -> Result<Vec<Candidate>> {
    type Row = (PaymentId, String, ScheduleId, DbTime, Option<DbTime>);
    let mut rows: Vec<Row> = Vec::new();
    if settle {
        rows = query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, state, schedule_id, due_at, next_attempt_at FROM payments WHERE \
         state IN ('unknown', 'processing') AND CASE WHEN state = 'unknown' \
         THEN (next_attempt_at IS NULL OR next_attempt_at <= $1) AND (lease_expires_at IS NULL OR lease_expires_at <= $1) \
         ELSE lease_expires_at <= $1 END \
         ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2{}",
        B::SKIP_LOCKED
    )))
        .bind(DbTime(now))
        .bind(want)
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("finding payments to settle"))?;
    }
    let more = want - rows.len() as i64;
    if more > 0 && !paused {
        let due: Vec<Row> = query_as(B::claim_due_sql())
            .bind(DbTime(now))
            .bind(more)
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("finding due payments"))?;
        rows.extend(due);
    }
    rows.into_iter()
        .map(|(id, state, _schedule, due_at, next_attempt_at)| {
            Ok(Candidate {
                id,
                from: parsed("payments", "state", state.parse())?,
                due_at: due_at.0,
                next_attempt_at: next_attempt_at.map(|t| t.0),
            })
        })
        .collect()
}

/// Records payments the lateness or misfire rule keeps from being charged.
async fn record_missed<B: Backend>(
    tx: &mut WriteTx<B>,
    state: PaymentState,
    reason: &str,
    ids: &[PaymentId],
    audit: &Audit,
) -> Result<()> {
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut update = query(sqlx::AssertSqlSafe(format!(
            "UPDATE payments SET state = $1, reason = $2, next_attempt_at = NULL, updated_at = $3 WHERE id IN ({})",
            placeholders(4, chunk.len())
        )))
        .bind(state.as_str())
        .bind(reason)
        .bind(DbTime(audit.at));
        for id in chunk {
            update = update.bind(*id);
        }
        update
            .execute(tx.conn())
            .await
            .map_err(db_err("recording payments as missed"))?;
    }
    for id in ids {
        event(
            tx,
            audit,
            "payment",
            *id,
            "missed",
            serde_json::json!({ "reason": reason }),
        )
        .await?;
    }
    Ok(())
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
            .bind(lease.payment_id)
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

/// The misfire check for a batch: which of `n` candidates (ids from `$2` on) have a later
/// first payment of the same recurring schedule due by now (`$1`), read among that schedule's
/// payments (by `schedule_id`). `q.state || ''` keeps `payments_due` out of the planner's
/// choice: on the 1st of the month its statistics still say few payments are scheduled, and
/// PostgreSQL read every scheduled payment for each check.
pub(crate) fn coalesced_sql(n: usize) -> String {
    format!(
        "SELECT c.id FROM payments c WHERE c.id IN ({}) AND EXISTS (SELECT 1 FROM payments q JOIN schedules s ON s.id = q.schedule_id \
         WHERE q.schedule_id = c.schedule_id AND s.kind = 'recurring' AND q.state || '' = 'scheduled' AND q.next_attempt_at IS NULL \
         AND q.due_at > c.due_at AND q.due_at <= $1)",
        placeholders(2, n)
    )
}

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
