//! Attempts: starting one (freezing the amount, storing the exact request), sending it again,
//! and recording what the processor answered.

use jiff::Timestamp;
use uuid::Uuid;

use crate::domain::attempt::{Answer, CallOutcome, CardLimit, ChargeRequest};
use crate::domain::member::AccountType;
use crate::domain::money::Money;
use crate::domain::payment::{PaymentState, Transition};
use crate::domain::status::{CardStatus, MemberStatus, ScheduleStatus};
use crate::sqltypes::{DbId, DbTime};
use crate::store::sql::bills::{consume_credits, insert_credit, pay_bills};
use crate::store::sql::outbox::notify_notice;
use crate::store::sql::payments::operator::release_lease;
use crate::store::sql::payments::outcome::{
    apply_step, declined_notice, hold_unknown, refuse_amount, release_payment, send_to_review,
    settle_without_charge,
};
use crate::store::sql::payments::{
    AttemptRow, Locked, RESERVING, attempt_row, leased_payment, lock_leased, sent_facts,
};
use crate::store::sql::{
    Backend, SqlStore, commit, db_err, event, money_err, new_id, query, query_as, query_scalar,
    short, state_list, step,
};
use crate::store::{
    Audit, Card, Lease, Next, OutcomePolicy, Payment, Result, SentFacts, Settler, StoreError,
    WriteTx,
};

/// A card's limits before one more request: every charge request that could have reached
/// the network and was not approved (declined, unknown, or still in flight; a busy answer
/// or a refusal of the credentials never reached it), per fingerprint when the processor gave one. Approvals do not
/// count: the networks limit retrying a card that declines, not paying with one that
/// works. Returns the check and the card's counted requests in the last 30 days.
pub(crate) async fn card_limit<B: Backend>(
    tx: &mut WriteTx<B>,
    card: &Card,
    now: Timestamp,
) -> Result<(CardLimit, u32)> {
    let (month, day) = crate::domain::attempt::card_limit_windows(now);
    let sql = |by: &str| {
        format!(
            "SELECT started_at, outcome FROM processor_calls WHERE {by} = $1 AND kind = 'charge' AND started_at > $2 AND (outcome IS NULL OR outcome NOT IN ('busy', 'approved', 'refused'))"
        )
    };
    let rows: Vec<(DbTime, Option<String>)> = match &card.fingerprint {
        Some(fp) => {
            query_as(sqlx::AssertSqlSafe(sql("fingerprint")))
                .bind(fp.clone())
                .bind(DbTime(month))
                .fetch_all(tx.conn())
                .await
        }
        None => {
            query_as(sqlx::AssertSqlSafe(sql("payment_method_id")))
                .bind(card.id)
                .bind(DbTime(month))
                .fetch_all(tx.conn())
                .await
        }
    }
    .map_err(db_err("counting the card's requests"))?;
    let requests: Vec<Timestamp> = rows.iter().map(|(t, _)| t.0).collect();
    // A request still in flight may come back declined: it counts as one until it
    // does not.
    let declines: Vec<Timestamp> = rows
        .iter()
        .filter(|(t, o)| matches!(o.as_deref(), None | Some("declined")) && t.0 > day)
        .map(|(t, _)| t.0)
        .collect();
    let count = u32::try_from(requests.len()).unwrap_or(u32::MAX);
    Ok((
        crate::domain::attempt::check_card_limits(&requests, &declines, now),
        count,
    ))
}

/// Writes the history row of one request before it is made.
pub(crate) async fn open_call<B: Backend>(
    tx: &mut WriteTx<B>,
    payment: &Payment,
    card: &Card,
    kind: &str,
    audit: &Audit,
) -> Result<Uuid> {
    let call = new_id();
    query("INSERT INTO processor_calls (id, payment_id, attempt, payment_method_id, fingerprint, kind, actor, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(DbId(call))
        .bind(payment.id)
        .bind(payment.attempt)
        .bind(card.id)
        .bind(card.fingerprint.as_deref())
        .bind(kind)
        .bind(&audit.actor)
        .bind(DbTime(audit.at))
        .execute(tx.conn())
        .await
        .map_err(db_err("recording a request to the processor"))?;
    Ok(call)
}

pub(crate) async fn finish_call<B: Backend>(
    tx: &mut WriteTx<B>,
    call: Uuid,
    outcome: CallOutcome,
    detail: Option<&str>,
    at: Timestamp,
) -> Result<()> {
    query("UPDATE processor_calls SET outcome = $1, detail = $2, finished_at = $3 WHERE id = $4 AND outcome IS NULL")
        .bind(outcome.as_str())
        .bind(detail.map(short))
        .bind(DbTime(at))
        .bind(DbId(call))
        .execute(tx.conn())
        .await
        .map_err(db_err("recording the processor's answer"))?;
    Ok(())
}

/// Whether charging is paused on every host now.
pub(crate) async fn charging_paused_in<B: Backend>(tx: &mut WriteTx<B>) -> Result<bool> {
    let paused: Option<Option<DbTime>> =
        query_scalar("SELECT charging_paused_at FROM control WHERE id = 1")
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading the charging pause"))?;
    Ok(matches!(paused, Some(Some(_))))
}

/// One more request of a sent attempt, if the key window, the card's limits and the
/// charging pause allow it now: the daemon holds it otherwise (looked up again later),
/// an operator gets the payment back as it was.
pub(crate) async fn prepare_resend<B: Backend>(
    tx: &mut WriteTx<B>,
    l: &Locked,
    row: &AttemptRow,
    by: Settler,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let now = audit.at;
    let payment = &l.held.payment;
    if !l.held.lease_runs(now) {
        return Ok(Next::LeaseLost);
    }
    if !policy.keys.may_resend(row.first_sent_at, now) {
        return match by {
            Settler::Daemon => Ok(Next::Moved(
                send_to_review(
                    tx,
                    payment,
                    "the key window closed before the request could be sent again",
                    audit,
                )
                .await?,
            )),
            Settler::Operator => {
                release_lease(tx, &l.lease).await?;
                Ok(Next::NotYet {
                    until: Some(policy.keys.key_dead_after(row.first_sent_at)),
                    why: "the attempt's key is past its resend window".into(),
                })
            }
        };
    }
    let held = match (
        &row.request,
        sent_facts(&l.held, row).attempt.resend_stopped,
    ) {
        (Some(request), false) => match card_limit(tx, &l.card, now).await?.0 {
            CardLimit::Clear if charging_paused_in(tx).await? => {
                Err(("charging is paused".to_string(), None))
            }
            CardLimit::Clear => Ok(request.clone()),
            limit @ (CardLimit::Requests { until } | CardLimit::Declines { until }) => Err((
                format!("the card is at its limit ({})", limit.code().unwrap_or("")),
                Some(until),
            )),
        },
        _ => Err(("the attempt is settled by lookup only".to_string(), None)),
    };
    let request = match held {
        Ok(request) => request,
        Err((why, until)) => {
            return match by {
                Settler::Daemon => Ok(Next::Moved(
                    hold_unknown(
                        tx,
                        &l.held,
                        policy.keys.look_at(now),
                        None,
                        &format!("resend held: {why}"),
                        audit,
                    )
                    .await?,
                )),
                Settler::Operator => {
                    release_lease(tx, &l.lease).await?;
                    Ok(Next::NotYet { until, why })
                }
            };
        }
    };
    let transition = if payment.state == PaymentState::NeedsReview {
        Transition::OperatorTake
    } else {
        Transition::Settle
    };
    let state = step(payment.state, transition)?;
    query("UPDATE payments SET state = $1, updated_at = $2 WHERE id = $3")
        .bind(state.as_str())
        .bind(DbTime(now))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("resending an attempt"))?;
    query("UPDATE payment_attempts SET sends = sends + 1 WHERE payment_id = $1 AND attempt = $2")
        .bind(payment.id)
        .bind(payment.attempt)
        .execute(tx.conn())
        .await
        .map_err(db_err("counting a resend"))?;
    let call = open_call(tx, payment, &l.card, "charge", audit).await?;
    event(
        tx,
        audit,
        "payment",
        payment.id,
        "resent",
        serde_json::json!({ "attempt": payment.attempt, "sends": row.sends + 1 }),
    )
    .await?;
    Ok(Next::Send { request, call })
}

/// The attempt's first step, inside `tx`: freezes the amount, checks the card's limits and the
/// charging pause, and stores the exact request (or settles the payment without a charge).
pub(crate) async fn begin_attempt_in<B: Backend>(
    tx: &mut WriteTx<B>,
    lease: &Lease,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let locked = lock_leased(tx, lease, &[PaymentState::Processing]).await?;
    begin_locked(tx, locked, policy, audit).await
}

/// [`begin_attempt_in`] once the payment's rows are locked (`None`: its lease is gone).
pub(crate) async fn begin_locked<B: Backend>(
    tx: &mut WriteTx<B>,
    locked: Option<Locked>,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    use crate::domain::charge::{ChargePlan, Reservation};
    let Some(l) = locked else {
        return Ok(Next::LeaseLost);
    };
    if !l.held.lease_runs(audit.at) {
        return Ok(Next::LeaseLost);
    }
    let payment = &l.held.payment;
    if attempt_row(tx, payment).await?.is_some() {
        return Err(StoreError::Internal(format!(
            "attempt {} of payment {} was already sent; a sent attempt is settled, never started again",
            payment.attempt, payment.id
        )));
    }
    let stopped = matches!(
        l.schedule.status,
        ScheduleStatus::Cancelled | ScheduleStatus::Paused | ScheduleStatus::Suspended
    )
    .then(|| l.schedule.status.as_str());
    if let Some(reason) = crate::domain::charge::blocked(
        l.card.status == CardStatus::Active,
        l.member.status == MemberStatus::Active,
        stopped,
    ) {
        let state = step(payment.state, Transition::Cancel)?;
        settle_without_charge(tx, payment, state, &reason, None, None, audit).await?;
        return Ok(Next::Moved(state));
    }
    let cur = payment.currency;
    let bills: Vec<(i64, i64)> = query_as("SELECT amount_due, amount_paid FROM bills WHERE member_id = $1 AND status = 'open' ORDER BY due_date, created_at, id")
        .bind(payment.member_id)
        .fetch_all(tx.conn())
        .await
        .map_err(db_err("reading open bills"))?;
    let outstanding: Vec<Money> = bills
        .iter()
        .map(|(due, paid)| {
            Money::from_minor(*due, cur)
                .checked_sub(Money::from_minor(*paid, cur))
                .map_err(money_err)
        })
        .collect::<Result<_>>()?;
    let credits: Vec<i64> =
        query_scalar("SELECT remaining FROM credits WHERE member_id = $1 AND remaining > 0")
            .bind(payment.member_id)
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("reading credits"))?;
    let credits: Vec<Money> = credits
        .into_iter()
        .map(|m| Money::from_minor(m, cur))
        .collect();
    let reserved: Vec<(i64, i64)> = query_as(sqlx::AssertSqlSafe(format!(
        "SELECT amount, credit_applied FROM payments WHERE member_id = $1 AND id <> $2 AND amount IS NOT NULL AND state IN ({})",
        state_list(&RESERVING)
    )))
    .bind(payment.member_id)
    .bind(payment.id)
    .fetch_all(tx.conn())
    .await
    .map_err(db_err("reading reserved amounts"))?;
    let reserved: Vec<Reservation> = reserved
        .into_iter()
        .map(|(amount, credit)| Reservation {
            amount: Money::from_minor(amount, cur),
            credit: Money::from_minor(credit, cur),
        })
        .collect();
    let max_amount = match l.member.account_type {
        AccountType::IndividualFamily => policy.max_amount_individual_family,
        AccountType::EmployerGroup => policy.max_amount_employer_group,
    };
    let plan = crate::domain::charge::plan_charge(&crate::domain::charge::ChargeFacts {
        currency: cur,
        rule: l.schedule.amount,
        outstanding: &outstanding,
        credits: &credits,
        reserved: &reserved,
        max_amount,
        min_charge: policy.min_charge(cur),
    })
    .map_err(money_err)?;
    let (amount, credit_used) = match plan {
        ChargePlan::NothingOwed => {
            let state = step(payment.state, Transition::NothingOwed)?;
            settle_without_charge(tx, payment, state, "nothing owed", None, None, audit).await?;
            return Ok(Next::Moved(state));
        }
        ChargePlan::CoveredByCredit { credit_used } => {
            // The credit pays the bills; nothing is charged.
            let state = step(payment.state, Transition::NothingOwed)?;
            settle_without_charge(tx, payment, state, "covered by credit", None, None, audit)
                .await?;
            consume_credits(tx, payment, credit_used, audit.at).await?;
            let (_, left) = pay_bills(tx, payment, credit_used, audit.at).await?;
            if left.is_positive() {
                insert_credit(
                    tx,
                    payment.member_id,
                    left,
                    "overpayment",
                    payment.id,
                    "credit beyond what was owed",
                    audit,
                )
                .await?;
            }
            return Ok(Next::Moved(state));
        }
        ChargePlan::OverLimit { amount, max } => {
            let reason = format!(
                "the amount due, {}, is more than automatic payments may charge at once ({})",
                amount.display_with_code(),
                max.display_with_code()
            );
            let state = refuse_amount(
                tx,
                &l,
                Transition::HardDecline,
                "over_limit",
                &reason,
                amount,
                audit,
            )
            .await?;
            return Ok(Next::Moved(state));
        }
        ChargePlan::BelowMinimum { amount, min } => {
            // Not sent: the processor would refuse it. The bills stay owed.
            let reason = format!(
                "the amount due, {}, is less than the smallest card payment we can make ({}); please pay it online or by phone",
                amount.display_with_code(),
                min.display_with_code()
            );
            let state = refuse_amount(
                tx,
                &l,
                Transition::NothingOwed,
                "below_minimum",
                &reason,
                amount,
                audit,
            )
            .await?;
            return Ok(Next::Moved(state));
        }
        ChargePlan::Charge {
            amount,
            credit_used,
        } => (amount.money(), credit_used),
    };
    match card_limit(tx, &l.card, audit.at).await?.0 {
        CardLimit::Clear => {}
        CardLimit::Requests { until } => {
            // The networks allow no more requests on this card for weeks: the
            // payment fails, and the member is told to use another card.
            let state = step(payment.state, Transition::HardDecline)?;
            let code = "card_attempt_limit";
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
            let reason = format!(
                "the card has reached the number of payment attempts the card networks allow in 30 days (more are allowed from {until}); please use another card"
            );
            let n = declined_notice(&l, code, &reason, Some(amount), None);
            notify_notice(tx, &n, &l.member, audit.at).await?;
            return Ok(Next::Moved(state));
        }
        CardLimit::Declines { until } => {
            // Too many declines on this card today: the same attempt waits, unsent.
            let state = step(payment.state, Transition::SoftDecline)?;
            query("UPDATE payments SET state = $1, next_attempt_at = $2, amount = NULL, credit_applied = 0, reason = $3, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $4 WHERE id = $5")
                .bind(state.as_str())
                .bind(DbTime(until))
                .bind("the card reached 10 declined requests in 24 hours; waiting before trying it again")
                .bind(DbTime(audit.at))
                .bind(payment.id)
                .execute(tx.conn())
                .await
                .map_err(db_err("holding a payment for its card's limit"))?;
            event(
                tx,
                audit,
                "payment",
                payment.id,
                "card_limit",
                serde_json::json!({ "attempt": payment.attempt, "until": until }),
            )
            .await?;
            return Ok(Next::Moved(state));
        }
    }
    // The emergency stop, checked just before the request is stored and written.
    let (paused, installation): (Option<DbTime>, DbId) =
        query_as("SELECT charging_paused_at, installation_id FROM control WHERE id = 1")
            .fetch_one(tx.conn())
            .await
            .map_err(db_err("reading the charging pause and the installation id"))?;
    if paused.is_some() {
        release_payment(tx, payment, "charging paused", audit).await?;
        return Ok(Next::Released);
    }
    let request = ChargeRequest {
        idempotency_key: crate::domain::attempt::idempotency_key(
            installation.0,
            payment.schedule_id,
            &payment.occurrence,
            payment.attempt,
        ),
        token: l.card.processor_token.clone(),
        amount,
        payment_id: payment.id,
        schedule_id: payment.schedule_id,
        occurrence: payment.occurrence.clone(),
        attempt: payment.attempt,
        account_last4: l.member.account_number.last4(),
        customer: l.member.processor_customer_id.clone(),
        statement_descriptor_suffix: policy.statement_descriptor_suffix.clone(),
    };
    query("UPDATE payments SET amount = $1, credit_applied = $2, updated_at = $3 WHERE id = $4")
        .bind(amount.minor())
        .bind(credit_used.minor())
        .bind(DbTime(audit.at))
        .bind(payment.id)
        .execute(tx.conn())
        .await
        .map_err(db_err("freezing the amount"))?;
    query("INSERT INTO payment_attempts (id, payment_id, attempt, payment_method_id, idempotency_key, amount, currency, started_at, request, first_sent_at, sends) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, 1)")
        .bind(DbId(new_id()))
        .bind(payment.id)
        .bind(payment.attempt)
        .bind(l.card.id)
        .bind(&request.idempotency_key)
        .bind(amount.minor())
        .bind(cur.code())
        .bind(DbTime(audit.at))
        .bind(sqlx::types::Json(&request))
        .execute(tx.conn())
        .await
        .map_err(db_err("storing the attempt's request"))?;
    let call = open_call(tx, payment, &l.card, "charge", audit).await?;
    event(
        tx,
        audit,
        "payment",
        payment.id,
        "attempt_started",
        serde_json::json!({
            "attempt": payment.attempt, "amount": amount.amount_string(),
            "credit_used": credit_used.amount_string(), "card_id": l.card.id,
        }),
    )
    .await?;
    Ok(Next::Send { request, call })
}

/// A charge request's answer, recorded inside `tx`.
pub(crate) async fn record_charge_in<B: Backend>(
    tx: &mut WriteTx<B>,
    lease: &Lease,
    call: Option<Uuid>,
    answer: &Answer,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let locked = lock_leased(tx, lease, &[PaymentState::Processing]).await?;
    record_locked(tx, locked, call, answer, policy, audit).await
}

/// [`record_charge_in`] once the payment's rows are locked (`None`: its lease is gone).
pub(crate) async fn record_locked<B: Backend>(
    tx: &mut WriteTx<B>,
    locked: Option<Locked>,
    call: Option<Uuid>,
    answer: &Answer,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let Some(l) = locked else {
        return Ok(Next::LeaseLost);
    };
    let row = attempt_row(tx, &l.held.payment).await?.ok_or_else(|| {
        StoreError::Internal(format!(
            "payment {} has no sent attempt to record",
            l.held.payment.id
        ))
    })?;
    if let Some(call) = call {
        let detail = match answer {
            Answer::Approved { .. } => None,
            Answer::Declined { signal, .. } => Some(signal.code.as_str()),
            Answer::Unknown { detail, .. }
            | Answer::Busy { detail }
            | Answer::Mismatch { detail }
            | Answer::Refused { detail } => Some(detail.as_str()),
        };
        finish_call(tx, call, CallOutcome::of(answer), detail, audit.at).await?;
    }
    let next = crate::domain::attempt::after_send(
        answer,
        &sent_facts(&l.held, &row).attempt,
        &policy.keys,
        audit.at,
    );
    let next = apply_step(tx, &l, &row, next, Settler::Daemon, policy, audit).await?;
    if let (
        Answer::Approved {
            network_transaction_id: Some(ntid),
            ..
        },
        None,
    ) = (answer, &l.card.network_transaction_id)
    {
        // The card's first successful charge: its network id is the stored
        // credential's reference, kept in the same transaction as the charge.
        query("UPDATE payment_methods SET network_transaction_id = $1 WHERE id = $2 AND network_transaction_id IS NULL")
            .bind(ntid)
            .bind(l.card.id)
            .execute(tx.conn())
            .await
            .map_err(db_err("keeping a card's network transaction id"))?;
    }
    Ok(next)
}

pub(crate) async fn begin_attempt<B: Backend>(
    db: &SqlStore<B>,
    lease: &Lease,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let mut tx = db.begin_write().await?;
    let next = begin_attempt_in(&mut tx, lease, policy, audit).await?;
    commit(tx).await?;
    Ok(next)
}

pub(crate) async fn sent_attempt<B: Backend>(
    db: &SqlStore<B>,
    lease: &Lease,
) -> Result<Option<SentFacts>> {
    let mut tx = db.begin_write().await?;
    let Some(held) = leased_payment(
        &mut tx,
        lease,
        &[
            PaymentState::Processing,
            PaymentState::Unknown,
            PaymentState::NeedsReview,
        ],
    )
    .await?
    else {
        return Ok(None);
    };
    let facts = attempt_row(&mut tx, &held.payment)
        .await?
        .map(|row| sent_facts(&held, &row));
    commit(tx).await?;
    Ok(facts)
}

pub(crate) async fn begin_resend<B: Backend>(
    db: &SqlStore<B>,
    lease: &Lease,
    by: Settler,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let mut tx = db.begin_write().await?;
    let states: &[PaymentState] = match by {
        Settler::Daemon => &[PaymentState::Processing],
        Settler::Operator => &[PaymentState::NeedsReview],
    };
    let Some(l) = lock_leased(&mut tx, lease, states).await? else {
        return Ok(Next::LeaseLost);
    };
    let row = attempt_row(&mut tx, &l.held.payment)
        .await?
        .ok_or_else(|| {
            StoreError::Internal(format!(
                "payment {} has no sent attempt to resend",
                l.held.payment.id
            ))
        })?;
    let next = prepare_resend(&mut tx, &l, &row, by, policy, audit).await?;
    commit(tx).await?;
    Ok(next)
}

pub(crate) async fn record_charge<B: Backend>(
    db: &SqlStore<B>,
    lease: &Lease,
    call: Option<Uuid>,
    answer: &Answer,
    policy: &OutcomePolicy,
    audit: &Audit,
) -> Result<Next> {
    let mut tx = db.begin_write().await?;
    let next = record_charge_in(&mut tx, lease, call, answer, policy, audit).await?;
    commit(tx).await?;
    Ok(next)
}
