//! Payments: one occurrence of a schedule, claimed, charged and settled; the rows a step of
//! one locks, in the one order, and its sent attempt.

pub(crate) mod attempt;
pub(crate) mod claim;
pub(crate) mod group;
pub(crate) mod operator;
pub(crate) mod outcome;

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::attempt::{AttemptRef, CallOutcome, ChargeRequest, SentAttempt};
use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::money::Money;
use crate::domain::payment::PaymentState;
use crate::sqltypes::DbId;
use crate::store::sql::cards::card_in;
use crate::store::sql::members::member_by_id_in;
use crate::store::sql::schedules::schedule_in;
use crate::store::sql::{
    Backend, Record, SqlStore, currency, db_err, get, opt_time, parsed, query, query_as,
    state_list, time,
};
use crate::store::{
    Allocation, Call, Card, Lease, Member, Payment, Result, Schedule, SentFacts, StoreError,
    WriteTx,
};

pub(crate) const PAYMENT_COLS: &str = "id, schedule_id, member_id, occurrence, due_at, amount, currency, state, attempt, payment_method_id, schedule_version, next_attempt_at, processor_reference, decline_code, reason, created_at, updated_at";

pub(crate) fn payment_from(row: &impl Record) -> Result<Payment> {
    const T: &str = "payments";
    let cur = currency(row, T)?;
    Ok(Payment {
        id: get(row, T, "id")?,
        schedule_id: get(row, T, "schedule_id")?,
        member_id: get(row, T, "member_id")?,
        occurrence: get(row, T, "occurrence")?,
        due_at: time(row, T, "due_at")?,
        amount: get::<Option<i64>>(row, T, "amount")?.map(|m| Money::from_minor(m, cur)),
        currency: cur,
        state: parsed(
            T,
            "state",
            get::<String>(row, T, "state")?.parse::<PaymentState>(),
        )?,
        attempt: get(row, T, "attempt")?,
        card_id: get(row, T, "payment_method_id")?,
        schedule_version: get(row, T, "schedule_version")?,
        next_attempt_at: opt_time(row, T, "next_attempt_at")?,
        processor_reference: get(row, T, "processor_reference")?,
        decline_code: get(row, T, "decline_code")?,
        reason: get(row, T, "reason")?,
        created_at: time(row, T, "created_at")?,
        updated_at: time(row, T, "updated_at")?,
    })
}

/// The states whose payment no worker holds and whose attempt was never sent.
pub(crate) const UNCLAIMED: [PaymentState; 2] = [PaymentState::Scheduled, PaymentState::RetryWait];

/// The states whose payment keeps its amount and credit reserved.
pub(crate) const RESERVING: [PaymentState; 3] = [
    PaymentState::Processing,
    PaymentState::Unknown,
    PaymentState::NeedsReview,
];

/// A payment with the engine's bookkeeping that `Payment` does not show.
pub(crate) struct Held {
    pub(crate) payment: Payment,
    pub(crate) credit_applied: i64,
    pub(crate) unknown_since: Option<Timestamp>,
    pub(crate) lease_expires_at: Option<Timestamp>,
}

impl Held {
    /// Whether the lease still runs at `now`: a request is written only under a live
    /// lease (an expired one may be taken over at any moment).
    pub(crate) fn lease_runs(&self, now: Timestamp) -> bool {
        self.lease_expires_at.is_some_and(|t| t > now)
    }
}

pub(crate) fn held_from(row: &impl Record) -> Result<Held> {
    Ok(Held {
        payment: payment_from(row)?,
        credit_applied: get(row, "payments", "credit_applied")?,
        unknown_since: opt_time(row, "payments", "unknown_since")?,
        lease_expires_at: opt_time(row, "payments", "lease_expires_at")?,
    })
}

/// The payment if this lease still holds it in one of `states`.
pub(crate) async fn leased_payment<B: Backend>(
    tx: &mut WriteTx<B>,
    lease: &Lease,
    states: &[PaymentState],
) -> Result<Option<Held>> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLS}, credit_applied, unknown_since, lease_expires_at FROM payments WHERE id = $1 AND lease_token = $2 AND state IN ({}){}",
        state_list(states), B::FOR_UPDATE
    )))
    .bind(lease.payment_id)
    .bind(lease.token.to_string())
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a claimed payment"))?;
    row.as_ref().map(held_from).transpose()
}

/// The rows one step of a claimed payment needs, locked in the one order every
/// transaction follows (docs/architecture.md): member, schedule, card, then the payment.
pub(crate) struct Locked {
    pub(crate) lease: Lease,
    pub(crate) member: Member,
    pub(crate) schedule: Schedule,
    pub(crate) card: Card,
    pub(crate) held: Held,
}

/// Locks the member, schedule and card of a payment, in the one order every transaction
/// follows; None when there is no such payment. The payment itself is locked after them.
pub(crate) async fn lock_owners<B: Backend>(
    tx: &mut WriteTx<B>,
    payment_id: PaymentId,
) -> Result<Option<(Member, Schedule, Card)>> {
    // Read without a lock only to learn which rows to lock first.
    let owners: Option<(MemberId, ScheduleId, CardId)> =
        query_as("SELECT member_id, schedule_id, payment_method_id FROM payments WHERE id = $1")
            .bind(payment_id)
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading a payment"))?;
    let Some((member_id, schedule_id, card_id)) = owners else {
        return Ok(None);
    };
    let member = member_by_id_in(tx, member_id).await?;
    let schedule = schedule_in(tx, schedule_id).await?;
    let card = card_in(tx, card_id).await?;
    Ok(Some((member, schedule, card)))
}

/// Locks a claimed payment's rows in order; None when `lease` no longer holds it in one
/// of `states`.
pub(crate) async fn lock_leased<B: Backend>(
    tx: &mut WriteTx<B>,
    lease: &Lease,
    states: &[PaymentState],
) -> Result<Option<Locked>> {
    let Some((member, schedule, card)) = lock_owners(tx, lease.payment_id).await? else {
        return Ok(None);
    };
    let Some(held) = leased_payment(tx, lease, states).await? else {
        return Ok(None);
    };
    if held.payment.card_id != card.id {
        // Only an unclaimed payment is moved to another card, so the lease is gone.
        return Ok(None);
    }
    Ok(Some(Locked {
        lease: *lease,
        member,
        schedule,
        card,
        held,
    }))
}

/// Locks a payment's rows in the one order (member, schedule, card, payment) whoever
/// holds it: for `reconcile`, which runs while no daemon does.
pub(crate) async fn lock_payment<B: Backend>(
    tx: &mut WriteTx<B>,
    payment_id: PaymentId,
) -> Result<Option<Locked>> {
    let Some((member, schedule, card)) = lock_owners(tx, payment_id).await? else {
        return Ok(None);
    };
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLS}, credit_applied, unknown_since, lease_expires_at FROM payments WHERE id = $1{}", B::FOR_UPDATE
    )))
    .bind(payment_id)
    .fetch_one(tx.conn())
    .await
    .map_err(db_err("reading a payment"))?;
    let held = held_from(&row)?;
    if held.payment.card_id != card.id {
        return Err(StoreError::Contention(format!(
            "payment {payment_id} moved to another card while it was being reconciled; run reconcile again"
        )));
    }
    let token = Uuid::nil();
    Ok(Some(Locked {
        lease: Lease { payment_id, token },
        member,
        schedule,
        card,
        held,
    }))
}

/// The stored attempt of a payment's current attempt number, when it was sent.
pub(crate) struct AttemptRow {
    pub(crate) key: String,
    pub(crate) request: Option<ChargeRequest>,
    pub(crate) first_sent_at: Timestamp,
    pub(crate) sends: i64,
    pub(crate) unknown_cycles: i64,
    pub(crate) resend_stopped: bool,
}

pub(crate) async fn attempt_row<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
) -> Result<Option<AttemptRow>> {
    const T: &str = "payment_attempts";
    let row = query("SELECT idempotency_key, request, first_sent_at, sends, unknown_cycles, resend_stopped FROM payment_attempts WHERE payment_id = $1 AND attempt = $2 AND first_sent_at IS NOT NULL")
        .bind(payment.id)
        .bind(payment.attempt)
        .fetch_optional(tx.conn())
        .await
        .map_err(db_err("reading an attempt"))?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(AttemptRow {
        key: get(&row, T, "idempotency_key")?,
        request: get::<Option<sqlx::types::Json<ChargeRequest>>>(&row, T, "request")?.map(|j| j.0),
        first_sent_at: time(&row, T, "first_sent_at")?,
        sends: get(&row, T, "sends")?,
        unknown_cycles: get(&row, T, "unknown_cycles")?,
        resend_stopped: get(&row, T, "resend_stopped")?,
    }))
}

pub(crate) fn sent_facts(held: &Held, row: &AttemptRow) -> SentFacts {
    SentFacts {
        reference: AttemptRef {
            payment_id: held.payment.id,
            attempt: held.payment.attempt,
            customer: row.request.as_ref().and_then(|r| r.customer.clone()),
            idempotency_key: row.key.clone(),
            first_sent_at: row.first_sent_at,
        },
        attempt: SentAttempt {
            first_sent_at: row.first_sent_at,
            sends: u32::try_from(row.sends).unwrap_or(u32::MAX),
            unknown_since: held.unknown_since,
            unknown_cycles: u32::try_from(row.unknown_cycles).unwrap_or(u32::MAX),
            // An attempt stored before requests were kept can only be looked up.
            resend_stopped: row.resend_stopped || row.request.is_none(),
        },
    }
}

pub(crate) async fn payment<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
) -> Result<Payment> {
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLS} FROM payments WHERE id = $1"
    )))
    .bind(payment_id)
    .fetch_optional(&db.pool)
    .await
    .map_err(db_err("reading a payment"))?;
    match row {
        Some(row) => payment_from(&row),
        None => Err(StoreError::NotFound(format!(
            "no payment has id {payment_id}; list payments with `autopay payment list`"
        ))),
    }
}

pub(crate) async fn list_payments<B: Backend>(
    db: &SqlStore<B>,
    member_id: Option<MemberId>,
    state: Option<PaymentState>,
) -> Result<Vec<Payment>> {
    query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLS} FROM payments WHERE ($1 IS NULL OR member_id = $1) AND ($2 IS NULL OR state = $2) ORDER BY due_at, id"
    )))
    .bind(member_id)
    .bind(state.map(|s| s.as_str()))
    .fetch_all(&db.pool)
    .await
    .map_err(db_err("listing payments"))?
    .iter()
    .map(payment_from)
    .collect()
}

pub(crate) async fn allocations<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
) -> Result<Vec<Allocation>> {
    let rows = query("SELECT payment_id, bill_id, credit_id, amount, currency FROM payment_allocations WHERE payment_id = $1 ORDER BY created_at, id")
        .bind(payment_id)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("reading allocations"))?;
    rows.iter()
        .map(|row| {
            const T: &str = "payment_allocations";
            Ok(Allocation {
                payment_id: get(row, T, "payment_id")?,
                bill_id: get::<Option<DbId>>(row, T, "bill_id")?.map(|i| i.0),
                credit_id: get::<Option<DbId>>(row, T, "credit_id")?.map(|i| i.0),
                amount: Money::from_minor(get(row, T, "amount")?, currency(row, T)?),
            })
        })
        .collect()
}

pub(crate) async fn calls<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
) -> Result<Vec<Call>> {
    const T: &str = "processor_calls";
    let rows = query("SELECT attempt, kind, actor, started_at, outcome, detail, finished_at FROM processor_calls WHERE payment_id = $1 ORDER BY started_at, id")
        .bind(payment_id)
        .fetch_all(&db.pool)
        .await
        .map_err(db_err("reading the attempt history"))?;
    rows.iter()
        .map(|row| {
            Ok(Call {
                attempt: get(row, T, "attempt")?,
                kind: get(row, T, "kind")?,
                actor: get(row, T, "actor")?,
                started_at: time(row, T, "started_at")?,
                outcome: match get::<Option<String>>(row, T, "outcome")? {
                    Some(o) => Some(parsed(T, "outcome", o.parse::<CallOutcome>())?),
                    None => None,
                },
                detail: get(row, T, "detail")?,
                finished_at: opt_time(row, T, "finished_at")?,
            })
        })
        .collect()
}
