//! Outcomes: what follows an answer (a success and its allocations, a decline, an unknown
//! outcome, a review), written in the answer's transaction.

use jiff::Timestamp;

use crate::domain::attempt::Step as AttemptStep;
use crate::domain::decline::DeclineSignal;
use crate::domain::money::Money;
use crate::domain::notice::{Declined, Notice, Receipt};
use crate::domain::payment::{PaymentState, Transition};
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::bills::{consume_credits, insert_credit, pay_bills};
use crate::store::sql::cards::disable_card;
use crate::store::sql::outbox::notify_notice;
use crate::store::sql::payments::attempt::{card_limit, prepare_resend};
use crate::store::sql::payments::{AttemptRow, Held, Locked};
use crate::store::sql::schedules::suspend_schedule;
use crate::store::sql::{Backend, db_err, event, money_err, query, query_scalar, short, step};
use crate::store::{Audit, Member, Next, OutcomePolicy, Payment, Result, Settler, WriteTx};

/// Who paused charging when the processor refused autopay's credentials: readiness and
/// alerts treat it like the circuit breaker (not an operator's deliberate pause).
pub(crate) const PAUSED_BY_PROCESSOR: &str = "processor";

pub(crate) async fn finish_attempt<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    outcome: &str,
    code: Option<&str>,
    reference: Option<&str>,
    at: Timestamp,
) -> Result<()> {
    query("UPDATE payment_attempts SET outcome = $1, decline_code = $2, processor_reference = $3, finished_at = $4 WHERE payment_id = $5 AND attempt = $6")
        .bind(outcome)
        .bind(code)
        .bind(reference)
        .bind(DbTime(at))
        .bind(payment.id)
        .bind(payment.attempt)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording the attempt"))?;
    Ok(())
}

/// The advice that came with a declined attempt's code, for `payment show`.
pub(crate) async fn record_advice<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    signal: &DeclineSignal,
) -> Result<()> {
    query("UPDATE payment_attempts SET advice_code = $1, network_advice_code = $2, network_decline_code = $3 WHERE payment_id = $4 AND attempt = $5")
        .bind(signal.advice_code.as_deref())
        .bind(signal.network_advice_code.as_deref())
        .bind(signal.network_decline_code.as_deref())
        .bind(payment.id)
        .bind(payment.attempt)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a decline's advice"))?;
    Ok(())
}

/// Ends a payment without calling the processor, recording the amount it would have
/// been (if any) and a decline code (if any; otherwise the last one stays).
pub(crate) async fn settle_without_charge<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    state: PaymentState,
    reason: &str,
    amount: Option<i64>,
    decline_code: Option<&str>,
    audit: &Audit,
) -> Result<()> {
    query("UPDATE payments SET state = $1, reason = $2, amount = $3, decline_code = COALESCE($4, decline_code), credit_applied = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $5 WHERE id = $6")
        .bind(state.as_str())
        .bind(reason)
        .bind(amount)
        .bind(decline_code)
        .bind(DbTime(audit.at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("settling a payment"))?;
    event(
        tx,
        audit,
        "payment",
        payment.id,
        state.as_str(),
        serde_json::json!({ "reason": reason, "attempt": payment.attempt }),
    )
    .await
}

/// A charge that happened: the payment moves to `state` (succeeded), its value pays
/// bills oldest first (credits it used included), anything beyond what was owed becomes
/// a credit, and the member gets a receipt. Nothing here can refuse: the money has moved.
pub(crate) async fn settle_success<B: Backend>(
    tx: &mut WriteTx<B>,
    l: &Locked,
    state: PaymentState,
    reference: &str,
    audit: &Audit,
) -> Result<()> {
    let payment = &l.held.payment;
    let amount = payment.amount.unwrap_or(Money::zero(payment.currency));
    let credit_used = Money::from_minor(l.held.credit_applied, payment.currency);
    query("UPDATE payments SET state = $1, processor_reference = $2, decline_code = NULL, reason = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $3 WHERE id = $4")
        .bind(state.as_str())
        .bind(reference)
        .bind(DbTime(audit.at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a success"))?;
    consume_credits(tx, payment, credit_used, audit.at).await?;
    let value = amount.checked_add(credit_used).map_err(money_err)?;
    let (bills, left) = pay_bills(tx, payment, value, audit.at).await?;
    if left.is_positive() {
        insert_credit(
            tx,
            payment.member_id,
            left,
            "overpayment",
            payment.id,
            "paid beyond what was owed",
            audit,
        )
        .await?;
    }
    if l.schedule.consecutive_failures != 0 {
        query("UPDATE schedules SET consecutive_failures = 0 WHERE id = $1")
            .bind(payment.schedule_id)
            .execute(tx.conn())
            .await
            .map_err(db_err("resetting failures"))?;
    }
    let receipt = Receipt {
        payment_id: payment.id,
        schedule_id: payment.schedule_id,
        to: l.member.addressee(),
        amount,
        currency_of_amount: amount,
        credit_used,
        charged_at: audit.at,
        card: l.card.label(),
        confirmation: reference.to_string(),
        bills,
        next_payment_at: l.schedule.next_run_at,
        time_zone: l.schedule.time_zone.clone(),
    };
    notify_notice(tx, &receipt.notice(), &l.member, audit.at).await?;
    event(
        tx,
        audit,
        "payment",
        payment.id,
        "succeeded",
        serde_json::json!({
            "attempt": payment.attempt, "reference": reference, "amount": amount.amount_string(),
        }),
    )
    .await
}

/// A payment that failed counts against its schedule; enough in a row suspend it.
pub(crate) async fn count_failure<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    suspend_after: u32,
    member: &Member,
    audit: &Audit,
) -> Result<()> {
    let failures: i64 = query_scalar("UPDATE schedules SET consecutive_failures = consecutive_failures + 1 WHERE id = $1 RETURNING consecutive_failures")
        .bind(payment.schedule_id)
        .fetch_one(tx.conn())
        .await
        .map_err(db_err("counting failures"))?;
    if crate::domain::decline::suspends(u32::try_from(failures).unwrap_or(u32::MAX), suspend_after)
    {
        suspend_schedule(
            tx,
            payment.schedule_id,
            &format!("{failures} payments failed in a row"),
            member,
            audit,
        )
        .await?;
    }
    Ok(())
}

/// The notice of a payment that was not charged.
pub(crate) fn declined_notice(
    l: &Locked,
    code: &str,
    reason: &str,
    amount: Option<Money>,
    next_try_at: Option<Timestamp>,
) -> Notice {
    let payment = &l.held.payment;
    Declined {
        payment_id: payment.id,
        schedule_id: payment.schedule_id,
        to: l.member.addressee(),
        amount,
        currency: payment.currency.code(),
        card: l.card.label(),
        decline_code: code.to_string(),
        reason: reason.to_string(),
        attempt: payment.attempt,
        next_try_at,
        time_zone: l.schedule.time_zone.clone(),
    }
    .notice()
}

/// A claimed payment handed back untouched: scheduled again, its amount and credit no
/// longer reserved, its lease dropped.
pub(crate) async fn release_payment<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    reason: &str,
    audit: &Audit,
) -> Result<()> {
    let state = step(payment.state, Transition::Release)?;
    query("UPDATE payments SET state = $1, amount = NULL, credit_applied = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $2 WHERE id = $3")
        .bind(state.as_str())
        .bind(DbTime(audit.at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("releasing a payment"))?;
    event(
        tx,
        audit,
        "payment",
        payment.id,
        "released",
        serde_json::json!({ "reason": reason }),
    )
    .await
}

/// An amount no charge may be made for (over the limit, under the processor's minimum):
/// the payment ends by `transition` with `code`, nothing is sent, the member is told.
pub(crate) async fn refuse_amount<B: Backend>(
    tx: &mut WriteTx<B>,
    l: &Locked,
    transition: Transition,
    code: &str,
    reason: &str,
    amount: Money,
    audit: &Audit,
) -> Result<PaymentState> {
    let payment = &l.held.payment;
    let state = step(payment.state, transition)?;
    settle_without_charge(
        tx,
        payment,
        state,
        code,
        Some(amount.minor()),
        Some(code),
        audit,
    )
    .await?;
    let n = declined_notice(l, code, reason, Some(amount), None);
    notify_notice(tx, &n, &l.member, audit.at).await?;
    Ok(state)
}

/// A decline: a retry with a new key when it is soft and tries are left, otherwise a
/// failure (and a disabled card when the bank says never again); the member is told.
pub(crate) async fn apply_decline<B: Backend>(
    tx: &mut WriteTx<B>,
    l: &Locked,
    signal: &DeclineSignal,
    reference: Option<&str>,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<PaymentState> {
    use crate::domain::charge::DeclineStep;
    let payment = &l.held.payment;
    let signal = signal.clone().or_brand(l.card.brand);
    finish_attempt(
        tx,
        payment,
        "declined",
        Some(&signal.code),
        reference,
        audit.at,
    )
    .await?;
    record_advice(tx, payment, &signal).await?;
    let decline = crate::domain::decline::classify(&signal);
    let (_, requests) = card_limit(tx, &l.card, audit.at).await?;
    let next = crate::domain::charge::after_decline(
        &decline,
        u32::try_from(payment.attempt).unwrap_or(u32::MAX),
        requests,
        &policy.retry,
        audit.at,
    );
    let (transition, retry_at, next_attempt) = match next {
        DeclineStep::RetryAt(at) => (Transition::SoftDecline, Some(at), 1_i64),
        DeclineStep::Fail | DeclineStep::DisableCard => (Transition::HardDecline, None, 0),
    };
    let state = step(payment.state, transition)?;
    // A retry is the next attempt, with a new key; a failure keeps the attempt it ended.
    query("UPDATE payments SET state = $1, attempt = attempt + $2, next_attempt_at = $3, amount = CASE WHEN $2 = 1 THEN NULL ELSE amount END, credit_applied = 0, decline_code = $4, reason = $5, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, unknown_since = NULL, updated_at = $6 WHERE id = $7")
        .bind(state.as_str())
        .bind(next_attempt)
        .bind(retry_at.map(DbTime))
        .bind(&decline.code)
        .bind(decline.member_reason)
        .bind(DbTime(audit.at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a decline"))?;
    let n = declined_notice(
        l,
        &decline.code,
        decline.member_reason,
        payment.amount,
        retry_at,
    );
    notify_notice(tx, &n, &l.member, audit.at).await?;
    match next {
        DeclineStep::RetryAt(_) => {}
        DeclineStep::DisableCard => {
            disable_card(tx, &l.card, decline.member_reason, &l.member, audit).await?
        }
        DeclineStep::Fail => {
            count_failure(tx, payment, policy.suspend_after, &l.member, audit).await?
        }
    }
    Ok(state)
}

/// Still unknown: the payment waits for its next lookup, keeping its reservations.
pub(crate) async fn hold_unknown<B: Backend>(
    tx: &mut WriteTx<B>,
    held: &Held,
    look_at: Timestamp,
    cycles: Option<(u32, bool)>,
    reason: &str,
    audit: &Audit,
) -> Result<PaymentState> {
    let payment = &held.payment;
    let state = step(payment.state, Transition::OutcomeUnknown)?;
    if let Some((cycles, stopped)) = cycles {
        query("UPDATE payment_attempts SET unknown_cycles = $1, resend_stopped = $2 WHERE payment_id = $3 AND attempt = $4")
            .bind(i64::from(cycles))
            .bind(stopped)
            .bind(payment.id)
            .bind(payment.attempt)
            .execute(tx.conn())
            .await
            .map_err(db_err("recording an unknown outcome"))?;
    }
    query("UPDATE payments SET state = $1, reason = $2, unknown_since = COALESCE(unknown_since, $3), next_attempt_at = $4, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $3 WHERE id = $5")
        .bind(state.as_str())
        .bind(short(reason))
        .bind(DbTime(audit.at))
        .bind(DbTime(look_at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording an unknown outcome"))?;
    event(tx, audit, "payment", payment.id, "unknown", serde_json::json!({ "attempt": payment.attempt, "reason": short(reason), "look_at": look_at })).await?;
    Ok(state)
}

/// Only an operator can decide now: the payment keeps its reservations and waits.
pub(crate) async fn send_to_review<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    reason: &str,
    audit: &Audit,
) -> Result<PaymentState> {
    let state = step(payment.state, Transition::Review)?;
    query("UPDATE payments SET state = $1, reason = $2, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $3 WHERE id = $4")
        .bind(state.as_str())
        .bind(short(reason))
        .bind(DbTime(audit.at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a payment for review"))?;
    event(
        tx,
        audit,
        "payment",
        payment.id,
        "needs_review",
        serde_json::json!({ "attempt": payment.attempt, "reason": short(reason) }),
    )
    .await?;
    Ok(state)
}

/// Carries out what follows an answer (domain::attempt's `Step`).
pub(crate) async fn apply_step<B: Backend>(
    tx: &mut WriteTx<B>,
    l: &Locked,
    row: &AttemptRow,
    next: AttemptStep,
    by: Settler,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let payment = &l.held.payment;
    match next {
        AttemptStep::Charged { reference } => {
            finish_attempt(tx, payment, "approved", None, Some(&reference), audit.at).await?;
            let state = step(payment.state, Transition::Approved)?;
            settle_success(tx, l, state, &reference, audit).await?;
            Ok(Next::Moved(state))
        }
        AttemptStep::Declined { signal, reference } => Ok(Next::Moved(
            apply_decline(tx, l, &signal, reference.as_deref(), policy, audit).await?,
        )),
        AttemptStep::Resend => prepare_resend(tx, l, row, by, policy, audit).await,
        AttemptStep::WaitAndResend => Ok(Next::WaitAndResend),
        AttemptStep::Unknown {
            look_at,
            unknown_cycles,
            stop_resending,
            reason,
        } => {
            let state = hold_unknown(
                tx,
                &l.held,
                look_at,
                Some((unknown_cycles, stop_resending)),
                &reason,
                audit,
            )
            .await?;
            Ok(Next::Moved(state))
        }
        AttemptStep::Review { reason } => Ok(Next::Moved(
            send_to_review(tx, payment, &reason, audit).await?,
        )),
        AttemptStep::Release { reason } => {
            // The request did nothing: the attempt is forgotten (the next claim begins
            // it afresh, with the same key), the payment goes back untouched, and
            // charging stops until an operator has fixed the credentials.
            query("DELETE FROM payment_attempts WHERE payment_id = $1 AND attempt = $2")
                .bind(payment.id)
                .bind(payment.attempt)
                .execute(tx.conn())
                .await
                .map_err(db_err("forgetting a refused attempt"))?;
            release_payment(tx, payment, &reason, audit).await?;
            let paused = query("UPDATE control SET charging_paused_at = $1, charging_paused_by = $2, charging_paused_reason = $3 WHERE id = 1 AND charging_paused_at IS NULL")
                .bind(DbTime(audit.at))
                .bind(PAUSED_BY_PROCESSOR)
                .bind(&reason)
                .execute(tx.conn())
                .await
                .map_err(db_err("pausing charging"))?
                .rows_affected();
            if paused > 0 {
                let installation: DbId =
                    query_scalar("SELECT installation_id FROM control WHERE id = 1")
                        .fetch_one(tx.conn())
                        .await
                        .map_err(db_err("reading control"))?;
                event(
                    tx,
                    audit,
                    "control",
                    installation.0,
                    "charging_paused",
                    serde_json::json!({ "reason": reason }),
                )
                .await?;
            }
            Ok(Next::Released)
        }
    }
}
