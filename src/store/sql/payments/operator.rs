//! Changes from outside the engine: an operator's retry, take, lookup and resolution of a
//! payment, and what the processor's webhooks report about one.

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::attempt::{CallOutcome, LookupAnswer, Step as AttemptStep};
use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::payment::{PaymentState, Transition};
use crate::domain::status::CardStatus;
use crate::sqltypes::DbTime;
use crate::store::sql::cards::{card_in, disable_card};
use crate::store::sql::members::member_by_id_in;
use crate::store::sql::outbox::notify_notice;
use crate::store::sql::payments::attempt::{finish_call, open_call};
use crate::store::sql::payments::outcome::{
    apply_step, declined_notice, finish_attempt, record_advice, settle_success,
    settle_without_charge,
};
use crate::store::sql::payments::{
    PAYMENT_COLS, attempt_row, held_from, lock_leased, lock_owners, payment_from, sent_facts,
};
use crate::store::sql::schedules::suspend_schedule;
use crate::store::sql::{
    Backend, SqlStore, commit, db_err, event, get, opt_time, query, query_as, query_scalar, short,
    step,
};
use crate::store::{
    Audit, Lease, Next, OutcomePolicy, Payment, Resolve, Result, Settler, StoreError, Taken,
    WriteTx,
};

/// Clears an operator's lease, leaving the payment as it was.
pub(crate) async fn release_lease<B: Backend>(tx: &mut WriteTx<B>, lease: &Lease) -> Result<bool> {
    let done = query("UPDATE payments SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_token = $2 AND state IN ('unknown', 'needs_review')")
        .bind(lease.payment_id)
        .bind(lease.token.to_string())
        .execute(tx.conn())
        .await
        .map_err(db_err("giving a payment back"))?;
    B::wake_others(tx).await?;
    Ok(done.rows_affected() > 0)
}

/// An operator's retry starts a new attempt (new key): the old one is settled.
pub(crate) async fn start_new_attempt<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    reason: &str,
    audit: &Audit,
) -> Result<PaymentState> {
    let state = step(payment.state, Transition::OperatorRetry)?;
    query("UPDATE payments SET state = $1, attempt = attempt + 1, next_attempt_at = $2, amount = NULL, credit_applied = 0, reason = $3, unknown_since = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $2 WHERE id = $4")
        .bind(state.as_str())
        .bind(DbTime(audit.at))
        .bind(reason)
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("retrying a payment"))?;
    event(tx, audit, "payment", payment.id, "retried", serde_json::json!({ "from": payment.state.as_str(), "reason": reason, "new_attempt": payment.attempt + 1 })).await?;
    B::wake_others(tx).await?;
    Ok(state)
}

pub(crate) async fn record_lookup<B: Backend>(
    db: &SqlStore<B>,
    lease: &Lease,
    answer: &LookupAnswer,
    by: Settler,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    use crate::domain::attempt::OperatorStep;
    let mut tx = db.begin_write().await?;
    let states: &[PaymentState] = match by {
        Settler::Daemon => &[PaymentState::Processing],
        Settler::Operator => &[PaymentState::Unknown, PaymentState::NeedsReview],
    };
    let Some(l) = lock_leased(&mut tx, lease, states).await? else {
        return Ok(Next::LeaseLost);
    };
    let payment = &l.held.payment;
    let row = attempt_row(&mut tx, payment).await?.ok_or_else(|| {
        StoreError::Internal(format!(
            "payment {} has no sent attempt to look up",
            payment.id
        ))
    })?;
    let call = open_call(&mut tx, payment, &l.card, "lookup", audit).await?;
    let detail = match answer {
        LookupAnswer::Found { reference, .. } => Some(reference.as_str()),
        LookupAnswer::NotFound => None,
        LookupAnswer::Unknown { detail } => Some(detail.as_str()),
    };
    finish_call(
        &mut tx,
        call,
        CallOutcome::of_lookup(answer),
        detail,
        audit.at,
    )
    .await?;
    let facts = sent_facts(&l.held, &row);
    let next = match by {
        Settler::Daemon => {
            let next = crate::domain::attempt::after_lookup(
                answer,
                &facts.attempt,
                &policy.keys,
                audit.at,
            );
            apply_step(&mut tx, &l, &row, next, by, policy, audit).await?
        }
        Settler::Operator => match crate::domain::attempt::operator_after_lookup(
            answer,
            &facts.attempt,
            &policy.keys,
            audit.at,
        ) {
            OperatorStep::Record(AttemptStep::Charged { reference }) => {
                finish_attempt(
                    &mut tx,
                    payment,
                    "approved",
                    None,
                    Some(&reference),
                    audit.at,
                )
                .await?;
                let state = step(
                    payment.state,
                    Transition::OperatorResolve(crate::domain::payment::Resolution::Succeeded),
                )?;
                settle_success(&mut tx, &l, state, &reference, audit).await?;
                Next::Moved(state)
            }
            OperatorStep::Record(AttemptStep::Declined { signal, reference }) => {
                let signal = signal.or_brand(l.card.brand);
                finish_attempt(
                    &mut tx,
                    payment,
                    "declined",
                    Some(&signal.code),
                    reference.as_deref(),
                    audit.at,
                )
                .await?;
                record_advice(&mut tx, payment, &signal).await?;
                let decline = crate::domain::decline::classify(&signal);
                if decline.action == crate::domain::decline::DeclineAction::DisableCard {
                    // The bank said never again: no new attempt on this card.
                    let state = step(
                        payment.state,
                        Transition::OperatorResolve(crate::domain::payment::Resolution::Failed),
                    )?;
                    settle_without_charge(
                        &mut tx,
                        payment,
                        state,
                        decline.member_reason,
                        payment.amount.map(|m| m.minor()),
                        Some(&decline.code),
                        audit,
                    )
                    .await?;
                    let n = declined_notice(
                        &l,
                        &decline.code,
                        decline.member_reason,
                        payment.amount,
                        None,
                    );
                    notify_notice(&mut tx, &n, &l.member, audit.at).await?;
                    disable_card(&mut tx, &l.card, decline.member_reason, &l.member, audit).await?;
                    Next::Moved(state)
                } else {
                    Next::Moved(start_new_attempt(&mut tx, payment, "retried by an operator: the processor recorded the last attempt as declined", audit).await?)
                }
            }
            OperatorStep::NewAttempt => {
                finish_attempt(&mut tx, payment, "not_charged", None, None, audit.at).await?;
                Next::Moved(start_new_attempt(&mut tx, payment, "retried by an operator: the processor has no record of the last attempt and its key can no longer charge", audit).await?)
            }
            OperatorStep::TooEarly { until } => {
                release_lease(&mut tx, lease).await?;
                Next::NotYet { until: Some(until), why: "the processor has no record of the attempt yet, and its key may still charge".into() }
            }
            OperatorStep::Record(other) => {
                return Err(StoreError::Internal(format!(
                    "an operator's lookup cannot lead to {other:?}"
                )));
            }
        },
    };
    commit(tx).await?;
    Ok(next)
}

pub(crate) async fn retry_payment<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
    force: bool,
    audit: &Audit,
) -> Result<Payment> {
    let mut tx = db.begin_write().await?;
    let not_found = || {
        StoreError::NotFound(format!(
            "no payment has id {payment_id}; list payments with `autopay payment list`"
        ))
    };
    let owners: Option<(MemberId, CardId)> =
        query_as("SELECT member_id, payment_method_id FROM payments WHERE id = $1")
            .bind(payment_id)
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading a payment"))?;
    let (member_id, card_id) = owners.ok_or_else(not_found)?;
    // The documented lock order: member, card, then the payment.
    member_by_id_in(&mut tx, member_id).await?;
    let card = card_in(&mut tx, card_id).await?;
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLS} FROM payments WHERE id = $1{}",
        B::FOR_UPDATE
    )))
    .bind(payment_id)
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a payment"))?
    .ok_or_else(not_found)?;
    let payment = payment_from(&row)?;
    if payment.state == PaymentState::NeedsReview {
        return Err(StoreError::Conflict(format!(
            "payment {payment_id} needs review: its last attempt may have charged, so it is settled first (`autopay payment retry` does this when run from the command line)"
        )));
    }
    if !matches!(payment.state, PaymentState::Failed | PaymentState::Missed) {
        return Err(StoreError::Conflict(format!(
            "payment {payment_id} is {}; only failed, missed or needs_review payments can be retried",
            payment.state
        )));
    }
    let refused_before_any_call = ["over_limit", "card_attempt_limit", "card_decline_limit"];
    let hard = payment.state == PaymentState::Failed
        && payment
            .decline_code
            .as_deref()
            .is_some_and(|c| !refused_before_any_call.contains(&c));
    if hard && !force {
        return Err(StoreError::Conflict(format!(
            "payment {payment_id} failed with a hard decline ({}); retrying the same card rarely helps. Add --force to retry anyway, or move the schedule to another card",
            payment.decline_code.as_deref().unwrap_or("")
        )));
    }
    if card.status != CardStatus::Active {
        return Err(StoreError::Conflict(format!(
            "card {} is {}; give the schedule another card with `autopay schedule update {} --card NEW_CARD`",
            card.id, card.status, payment.schedule_id
        )));
    }
    start_new_attempt(
        &mut tx,
        &payment,
        if force {
            "retried by an operator (--force)"
        } else {
            "retried by an operator"
        },
        audit,
    )
    .await?;
    commit(tx).await?;
    super::payment(db, payment_id).await
}

pub(crate) async fn take_for_operator<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
    lease: std::time::Duration,
    audit: &Audit,
) -> Result<Taken> {
    let until = audit
        .at
        .checked_add(
            jiff::SignedDuration::try_from(lease)
                .map_err(|e| StoreError::Internal(e.to_string()))?,
        )
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    let mut tx = db.begin_write().await?;
    let row = query(sqlx::AssertSqlSafe(format!(
        "SELECT {PAYMENT_COLS}, credit_applied, unknown_since, lease_owner, lease_expires_at FROM payments WHERE id = $1{}", B::FOR_UPDATE
    )))
    .bind(payment_id)
    .fetch_optional(tx.conn())
    .await
    .map_err(db_err("reading a payment"))?
    .ok_or_else(|| StoreError::NotFound(format!("no payment has id {payment_id}; list payments with `autopay payment list`")))?;
    let held = held_from(&row)?;
    let holder: Option<String> = get(&row, "payments", "lease_owner")?;
    let held_until = opt_time(&row, "payments", "lease_expires_at")?;
    if let (Some(holder), Some(held_until)) = (holder, held_until)
        && held_until > audit.at
    {
        return Err(StoreError::Unavailable(format!(
            "payment {payment_id} is being settled by {} until {held_until}; try again after that",
            short(&holder)
        )));
    }
    if !matches!(
        held.payment.state,
        PaymentState::Unknown | PaymentState::NeedsReview
    ) {
        return Err(StoreError::Conflict(format!(
            "payment {payment_id} is {}; only unknown or needs_review payments are settled by an operator",
            held.payment.state
        )));
    }
    let token = Uuid::new_v4();
    query("UPDATE payments SET lease_owner = $1, lease_token = $2, lease_expires_at = $3 WHERE id = $4")
        .bind(&audit.actor)
        .bind(token.to_string())
        .bind(DbTime(until))
        .bind(payment_id)
        .execute(tx.conn())
        .await
        .map_err(db_err("taking a payment for review"))?;
    let sent = attempt_row(&mut tx, &held.payment)
        .await?
        .map(|r| sent_facts(&held, &r));
    commit(tx).await?;
    Ok(Taken {
        lease: Lease { payment_id, token },
        payment: held.payment,
        sent,
    })
}

pub(crate) async fn give_back<B: Backend>(db: &SqlStore<B>, lease: &Lease) -> Result<bool> {
    let mut tx = db.begin_write().await?;
    let done = release_lease(&mut tx, lease).await?;
    commit(tx).await?;
    Ok(done)
}

pub(crate) async fn resolve_payment<B: Backend>(
    db: &SqlStore<B>,
    resolve: &Resolve,
    audit: &Audit,
) -> Result<Payment> {
    use crate::domain::payment::Resolution;
    let mut tx = db.begin_write().await?;
    let Some(l) = lock_leased(
        &mut tx,
        &resolve.lease,
        &[PaymentState::Unknown, PaymentState::NeedsReview],
    )
    .await?
    else {
        return Err(StoreError::Conflict(format!(
            "payment {} changed while it was being resolved; run the command again",
            resolve.lease.payment_id
        )));
    };
    let payment = &l.held.payment;
    let state = step(
        payment.state,
        Transition::OperatorResolve(resolve.resolution),
    )?;
    match resolve.resolution {
        Resolution::Succeeded => {
            if payment.amount.is_none() {
                return Err(StoreError::Conflict(format!(
                    "payment {} has no amount recorded for its attempt; resolve it as failed or cancelled and retry it",
                    payment.id
                )));
            }
            finish_attempt(
                &mut tx,
                payment,
                "approved",
                None,
                Some(&resolve.reference),
                audit.at,
            )
            .await?;
            settle_success(&mut tx, &l, state, &resolve.reference, audit).await?;
        }
        Resolution::Failed | Resolution::Cancelled => {
            // The attempt charged nothing: its reservations are released.
            finish_attempt(&mut tx, payment, "not_charged", None, None, audit.at).await?;
            query("UPDATE payments SET state = $1, reason = $2, processor_reference = $3, credit_applied = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $4 WHERE id = $5")
                .bind(state.as_str())
                .bind(&resolve.reason)
                .bind(&resolve.reference)
                .bind(DbTime(audit.at))
                .bind(payment.id)
                .execute(tx.conn())
                .await
                .map_err(db_err("resolving a payment"))?;
        }
    }
    event(
        &mut tx,
        audit,
        "payment",
        payment.id,
        "resolved",
        serde_json::json!({
            "as": format!("{:?}", resolve.resolution).to_lowercase(), "attempt": payment.attempt,
            "reference": resolve.reference, "reason": resolve.reason,
        }),
    )
    .await?;
    commit(tx).await?;
    super::payment(db, payment.id).await
}

pub(crate) async fn settle_soon<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
    attempt: i64,
    at: Timestamp,
) -> Result<bool> {
    let mut tx = db.begin_write().await?;
    let moved = query("UPDATE payments SET next_attempt_at = $1 WHERE id = $2 AND attempt = $3 AND state = 'unknown' AND (next_attempt_at IS NULL OR next_attempt_at > $1)")
        .bind(DbTime(at))
        .bind(payment_id)
        .bind(attempt)
        .execute(tx.conn())
        .await
        .map_err(db_err("bringing a lookup forward"))?
        .rows_affected() > 0;
    if moved {
        B::wake_others(&mut tx).await?;
    }
    commit(tx).await?;
    Ok(moved)
}

pub(crate) async fn record_processor_event<B: Backend>(
    db: &SqlStore<B>,
    payment_id: PaymentId,
    what: &str,
    detail: &serde_json::Value,
    action: crate::domain::dispute::DisputeAction,
    audit: &Audit,
) -> Result<()> {
    use crate::domain::dispute::{DisputeAction, member_reason};
    let mut tx = db.begin_write().await?;
    let Some((member, _, card)) = lock_owners(&mut tx, payment_id).await? else {
        return Err(StoreError::NotFound(format!(
            "no payment has id {payment_id}"
        )));
    };
    event(&mut tx, audit, "payment", payment_id, what, detail.clone()).await?;
    match action {
        DisputeAction::Record => {}
        DisputeAction::DisableCard => {
            disable_card(&mut tx, &card, member_reason(action), &member, audit).await?
        }
        DisputeAction::SuspendSchedules => {
            let schedules: Vec<ScheduleId> = query_scalar("SELECT id FROM schedules WHERE payment_method_id = $1 AND status IN ('active', 'paused') ORDER BY id")
                .bind(card.id)
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("reading the card's schedules"))?;
            for s in schedules {
                suspend_schedule(&mut tx, s, member_reason(action), &member, audit).await?;
            }
        }
    }
    commit(tx).await?;
    Ok(())
}
