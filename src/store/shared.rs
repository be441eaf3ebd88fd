//! What is left of the [`Store`](super::Store) implementation both backends share, stamped out
//! once per backend (`shared_store_impl!(sqlx::Sqlite)`) while it moves, an aggregate at a time,
//! into the generic code of [`super::sql`], which it calls. Everything that differs between
//! the backends is in [`super::sql::Backend`].

macro_rules! shared_store_impl {
    ($db:ty) => {
        use std::collections::BTreeMap;

        use async_trait::async_trait;
        use jiff::Timestamp;
        use uuid::Uuid;

        use crate::domain::attempt::{AttemptRef, CallOutcome, ProcessorAttempt, CardLimit, ChargeRequest, SentAttempt, Step as AttemptStep};
        use crate::domain::member::{AccountNumber, AccountType};
        use crate::domain::decline::DeclineSignal;
        use crate::domain::money::Money;
        use crate::domain::notice::{
            Declined, Notice, Receipt,
        };
        use crate::domain::payment::{PaymentState, Transition};
        use crate::domain::status::{CardStatus, MemberStatus, ScheduleStatus};
        use crate::sqltypes::{DbId, DbTime};
        use crate::store::*;
        use crate::store::sql::{commit, currency,  db_err, event, execute_script, get, id, money_err, new_id, opt_time, parsed, query, query_as, query_scalar, short, state_list, step, time};
        use crate::store::sql::bills::*;
        use crate::store::sql::cards::*;
        use crate::store::sql::members::*;
        use crate::store::sql::outbox::*;
        use crate::store::sql::payments::*;
        use crate::store::sql::schedules::*;

        use crate::store::sql::{bills, cards, members, schedules};

        type Db = $db;
        type DbRow = <$db as sqlx::Database>::Row;
        type Tx = crate::store::WriteTx<$db>;

        /// Who paused charging when the processor refused autopay's credentials: readiness and
        /// alerts treat it like the circuit breaker (not an operator's deliberate pause).
        const PAUSED_BY_PROCESSOR: &str = "processor";
        /// Why a payment claimed late was not charged (the lateness rule, applied at the claim).
        const LATE_REASON: &str = "not charged within payments.max_lateness of its due time";
        /// Why an earlier occurrence was not charged (the coalesce rule, applied at the claim).
        const COALESCED_REASON: &str = "coalesced into a later payment of the same schedule";

        async fn counts(pool: &sqlx::Pool<$db>, sql: &'static str) -> Result<BTreeMap<String, i64>> {
            let rows = query(sql).fetch_all(pool).await.map_err(db_err("counting"))?;
            let mut out = BTreeMap::new();
            for row in rows {
                out.insert(get::<String>(&row, "status", "k")?, get::<i64>(&row, "status", "n")?);
            }
            Ok(out)
        }

        fn pause_from(at: Option<Timestamp>, by: Option<String>, reason: Option<String>) -> Option<Pause> {
            at.map(|since| Pause { since, by, reason: reason.unwrap_or_default() })
        }

        const NOTIFICATION_COLS: &str = "id, kind, dedupe_key, member_id, recipient, payload, state, attempts, created_at";

        fn notification_from(row: &DbRow) -> Result<Notification> {
            const T: &str = "notifications";
            Ok(Notification {
                id: id(row, T, "id")?,
                kind: get(row, T, "kind")?,
                dedupe_key: get(row, T, "dedupe_key")?,
                member_id: get::<Option<DbId>>(row, T, "member_id")?.map(|i| i.0),
                recipient: get(row, T, "recipient")?,
                payload: get::<sqlx::types::Json<serde_json::Value>>(row, T, "payload")?.0,
                state: get(row, T, "state")?,
                attempts: get(row, T, "attempts")?,
                created_at: time(row, T, "created_at")?,
            })
        }

        /// A payment with the engine's bookkeeping that `Payment` does not show.
        struct Held {
            payment: Payment,
            credit_applied: i64,
            unknown_since: Option<Timestamp>,
            lease_expires_at: Option<Timestamp>,
        }

        impl Held {
            /// Whether the lease still runs at `now`: a request is written only under a live
            /// lease (an expired one may be taken over at any moment).
            fn lease_runs(&self, now: Timestamp) -> bool {
                self.lease_expires_at.is_some_and(|t| t > now)
            }
        }

        fn held_from(row: &DbRow) -> Result<Held> {
            Ok(Held {
                payment: payment_from(row)?,
                credit_applied: get(row, "payments", "credit_applied")?,
                unknown_since: opt_time(row, "payments", "unknown_since")?,
                lease_expires_at: opt_time(row, "payments", "lease_expires_at")?,
            })
        }

        /// The payment if this lease still holds it in one of `states`.
        async fn leased_payment(tx: &mut Tx, lease: &Lease, states: &[PaymentState]) -> Result<Option<Held>> {
            let row = query(sqlx::AssertSqlSafe(format!(
                "SELECT {PAYMENT_COLS}, credit_applied, unknown_since, lease_expires_at FROM payments WHERE id = $1 AND lease_token = $2 AND state IN ({}){}",
                state_list(states), <Db as Backend>::FOR_UPDATE
            )))
            .bind(DbId(lease.payment_id))
            .bind(lease.token.to_string())
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading a claimed payment"))?;
            row.as_ref().map(held_from).transpose()
        }

        /// The rows one step of a claimed payment needs, locked in the one order every
        /// transaction follows (docs/architecture.md): member, schedule, card, then the payment.
        struct Locked {
            lease: Lease,
            member: Member,
            schedule: Schedule,
            card: Card,
            held: Held,
        }

        /// Locks the member, schedule and card of a payment, in the one order every transaction
        /// follows; None when there is no such payment. The payment itself is locked after them.
        async fn lock_owners(tx: &mut Tx, payment_id: Uuid) -> Result<Option<(Member, Schedule, Card)>> {
            // Read without a lock only to learn which rows to lock first.
            let owners: Option<(DbId, DbId, DbId)> = query_as("SELECT member_id, schedule_id, payment_method_id FROM payments WHERE id = $1")
                .bind(DbId(payment_id))
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading a payment"))?;
            let Some((member_id, schedule_id, card_id)) = owners else { return Ok(None) };
            let member = member_by_id_in(tx, member_id.0).await?;
            let schedule = schedule_in(tx, schedule_id.0).await?;
            let card = card_in(tx, card_id.0).await?;
            Ok(Some((member, schedule, card)))
        }

        /// Locks a claimed payment's rows in order; None when `lease` no longer holds it in one
        /// of `states`.
        async fn lock_leased(tx: &mut Tx, lease: &Lease, states: &[PaymentState]) -> Result<Option<Locked>> {
            let Some((member, schedule, card)) = lock_owners(tx, lease.payment_id).await? else { return Ok(None) };
            let Some(held) = leased_payment(tx, lease, states).await? else { return Ok(None) };
            if held.payment.card_id != card.id {
                // Only an unclaimed payment is moved to another card, so the lease is gone.
                return Ok(None);
            }
            Ok(Some(Locked { lease: *lease, member, schedule, card, held }))
        }

        /// The stored attempt of a payment's current attempt number, when it was sent.
        struct AttemptRow {
            key: String,
            request: Option<ChargeRequest>,
            first_sent_at: Timestamp,
            sends: i64,
            unknown_cycles: i64,
            resend_stopped: bool,
        }

        async fn attempt_row(tx: &mut Tx, payment: &Payment) -> Result<Option<AttemptRow>> {
            const T: &str = "payment_attempts";
            let row = query("SELECT idempotency_key, request, first_sent_at, sends, unknown_cycles, resend_stopped FROM payment_attempts WHERE payment_id = $1 AND attempt = $2 AND first_sent_at IS NOT NULL")
                .bind(DbId(payment.id))
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

        fn sent_facts(held: &Held, row: &AttemptRow) -> SentFacts {
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

        async fn finish_attempt(tx: &mut Tx, payment: &Payment, outcome: &str, code: Option<&str>, reference: Option<&str>, at: Timestamp) -> Result<()> {
            query("UPDATE payment_attempts SET outcome = $1, decline_code = $2, processor_reference = $3, finished_at = $4 WHERE payment_id = $5 AND attempt = $6")
                .bind(outcome)
                .bind(code)
                .bind(reference)
                .bind(DbTime(at))
                .bind(DbId(payment.id))
                .bind(payment.attempt)
                .execute(tx.conn())
                .await
                .map_err(db_err("recording the attempt"))?;
            Ok(())
        }

        /// The advice that came with a declined attempt's code, for `payment show`.
        async fn record_advice(tx: &mut Tx, payment: &Payment, signal: &DeclineSignal) -> Result<()> {
            query("UPDATE payment_attempts SET advice_code = $1, network_advice_code = $2, network_decline_code = $3 WHERE payment_id = $4 AND attempt = $5")
                .bind(signal.advice_code.as_deref())
                .bind(signal.network_advice_code.as_deref())
                .bind(signal.network_decline_code.as_deref())
                .bind(DbId(payment.id))
                .bind(payment.attempt)
                .execute(tx.conn())
                .await
                .map_err(db_err("recording a decline's advice"))?;
            Ok(())
        }

        /// A card's limits before one more request: every charge request that could have reached
        /// the network and was not approved (declined, unknown, or still in flight; a busy answer
        /// or a refusal of the credentials never reached it), per fingerprint when the processor gave one. Approvals do not
        /// count: the networks limit retrying a card that declines, not paying with one that
        /// works. Returns the check and the card's counted requests in the last 30 days.
        async fn card_limit(tx: &mut Tx, card: &Card, now: Timestamp) -> Result<(CardLimit, u32)> {
            let (month, day) = crate::domain::attempt::card_limit_windows(now);
            let sql = |by: &str| format!(
                "SELECT started_at, outcome FROM processor_calls WHERE {by} = $1 AND kind = 'charge' AND started_at > $2 AND (outcome IS NULL OR outcome NOT IN ('busy', 'approved', 'refused'))"
            );
            let rows: Vec<(DbTime, Option<String>)> = match &card.fingerprint {
                Some(fp) => query_as(sqlx::AssertSqlSafe(sql("fingerprint")))
                    .bind(fp.clone())
                    .bind(DbTime(month))
                    .fetch_all(tx.conn())
                    .await,
                None => query_as(sqlx::AssertSqlSafe(sql("payment_method_id")))
                    .bind(DbId(card.id))
                    .bind(DbTime(month))
                    .fetch_all(tx.conn())
                    .await,
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
            Ok((crate::domain::attempt::check_card_limits(&requests, &declines, now), count))
        }

        /// Writes the history row of one request before it is made.
        async fn open_call(tx: &mut Tx, payment: &Payment, card: &Card, kind: &str, audit: &Audit) -> Result<Uuid> {
            let call = new_id();
            query("INSERT INTO processor_calls (id, payment_id, attempt, payment_method_id, fingerprint, kind, actor, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(DbId(call))
                .bind(DbId(payment.id))
                .bind(payment.attempt)
                .bind(DbId(card.id))
                .bind(card.fingerprint.as_deref())
                .bind(kind)
                .bind(&audit.actor)
                .bind(DbTime(audit.at))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording a request to the processor"))?;
            Ok(call)
        }

        async fn finish_call(tx: &mut Tx, call: Uuid, outcome: CallOutcome, detail: Option<&str>, at: Timestamp) -> Result<()> {
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

        /// Ends a payment without calling the processor, recording the amount it would have
        /// been (if any) and a decline code (if any; otherwise the last one stays).
        async fn settle_without_charge(
            tx: &mut Tx,
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
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("settling a payment"))?;
            event(tx, audit, "payment", payment.id, state.as_str(), serde_json::json!({ "reason": reason, "attempt": payment.attempt })).await
        }

        /// A charge that happened: the payment moves to `state` (succeeded), its value pays
        /// bills oldest first (credits it used included), anything beyond what was owed becomes
        /// a credit, and the member gets a receipt. Nothing here can refuse: the money has moved.
        async fn settle_success(tx: &mut Tx, l: &Locked, state: PaymentState, reference: &str, audit: &Audit) -> Result<()> {
            let payment = &l.held.payment;
            let amount = payment.amount.unwrap_or(Money::zero(payment.currency));
            let credit_used = Money::from_minor(l.held.credit_applied, payment.currency);
            query("UPDATE payments SET state = $1, processor_reference = $2, decline_code = NULL, reason = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $3 WHERE id = $4")
                .bind(state.as_str())
                .bind(reference)
                .bind(DbTime(audit.at))
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording a success"))?;
            consume_credits(tx, payment, credit_used, audit.at).await?;
            let value = amount.checked_add(credit_used).map_err(money_err)?;
            let (bills, left) = pay_bills(tx, payment, value, audit.at).await?;
            if left.is_positive() {
                insert_credit(tx, payment.member_id, left, "overpayment", payment.id, "paid beyond what was owed", audit).await?;
            }
            if l.schedule.consecutive_failures != 0 {
                query("UPDATE schedules SET consecutive_failures = 0 WHERE id = $1")
                    .bind(DbId(payment.schedule_id))
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
            event(tx, audit, "payment", payment.id, "succeeded", serde_json::json!({
                "attempt": payment.attempt, "reference": reference, "amount": amount.amount_string(),
            })).await
        }

        /// A payment that failed counts against its schedule; enough in a row suspend it.
        async fn count_failure(tx: &mut Tx, payment: &Payment, suspend_after: u32, member: &Member, audit: &Audit) -> Result<()> {
            let failures: i64 = query_scalar("UPDATE schedules SET consecutive_failures = consecutive_failures + 1 WHERE id = $1 RETURNING consecutive_failures")
                .bind(DbId(payment.schedule_id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("counting failures"))?;
            if crate::domain::decline::suspends(u32::try_from(failures).unwrap_or(u32::MAX), suspend_after) {
                suspend_schedule(tx, payment.schedule_id, &format!("{failures} payments failed in a row"), member, audit).await?;
            }
            Ok(())
        }

        /// The notice of a payment that was not charged.
        fn declined_notice(l: &Locked, code: &str, reason: &str, amount: Option<Money>, next_try_at: Option<Timestamp>) -> Notice {
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
        async fn release_payment(tx: &mut Tx, payment: &Payment, reason: &str, audit: &Audit) -> Result<()> {
            let state = step(payment.state, Transition::Release)?;
            query("UPDATE payments SET state = $1, amount = NULL, credit_applied = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $2 WHERE id = $3")
                .bind(state.as_str())
                .bind(DbTime(audit.at))
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("releasing a payment"))?;
            event(tx, audit, "payment", payment.id, "released", serde_json::json!({ "reason": reason })).await
        }

        /// An amount no charge may be made for (over the limit, under the processor's minimum):
        /// the payment ends by `transition` with `code`, nothing is sent, the member is told.
        async fn refuse_amount(tx: &mut Tx, l: &Locked, transition: Transition, code: &str, reason: &str, amount: Money, audit: &Audit) -> Result<PaymentState> {
            let payment = &l.held.payment;
            let state = step(payment.state, transition)?;
            settle_without_charge(tx, payment, state, code, Some(amount.minor()), Some(code), audit).await?;
            let n = declined_notice(l, code, reason, Some(amount), None);
            notify_notice(tx, &n, &l.member, audit.at).await?;
            Ok(state)
        }

        /// A decline: a retry with a new key when it is soft and tries are left, otherwise a
        /// failure (and a disabled card when the bank says never again); the member is told.
        async fn apply_decline(tx: &mut Tx, l: &Locked, signal: &DeclineSignal, reference: Option<&str>, policy: &OutcomePolicy, audit: &Audit) -> Result<PaymentState> {
            use crate::domain::charge::DeclineStep;
            let payment = &l.held.payment;
            let signal = signal.clone().or_brand(l.card.brand);
            finish_attempt(tx, payment, "declined", Some(&signal.code), reference, audit.at).await?;
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
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording a decline"))?;
            let n = declined_notice(l, &decline.code, decline.member_reason, payment.amount, retry_at);
            notify_notice(tx, &n, &l.member, audit.at).await?;
            match next {
                DeclineStep::RetryAt(_) => {}
                DeclineStep::DisableCard => disable_card(tx, &l.card, decline.member_reason, &l.member, audit).await?,
                DeclineStep::Fail => count_failure(tx, payment, policy.suspend_after, &l.member, audit).await?,
            }
            Ok(state)
        }

        /// Still unknown: the payment waits for its next lookup, keeping its reservations.
        async fn hold_unknown(tx: &mut Tx, held: &Held, look_at: Timestamp, cycles: Option<(u32, bool)>, reason: &str, audit: &Audit) -> Result<PaymentState> {
            let payment = &held.payment;
            let state = step(payment.state, Transition::OutcomeUnknown)?;
            if let Some((cycles, stopped)) = cycles {
                query("UPDATE payment_attempts SET unknown_cycles = $1, resend_stopped = $2 WHERE payment_id = $3 AND attempt = $4")
                    .bind(i64::from(cycles))
                    .bind(stopped)
                    .bind(DbId(payment.id))
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
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording an unknown outcome"))?;
            event(tx, audit, "payment", payment.id, "unknown", serde_json::json!({ "attempt": payment.attempt, "reason": short(reason), "look_at": look_at })).await?;
            Ok(state)
        }

        /// Only an operator can decide now: the payment keeps its reservations and waits.
        async fn send_to_review(tx: &mut Tx, payment: &Payment, reason: &str, audit: &Audit) -> Result<PaymentState> {
            let state = step(payment.state, Transition::Review)?;
            query("UPDATE payments SET state = $1, reason = $2, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $3 WHERE id = $4")
                .bind(state.as_str())
                .bind(short(reason))
                .bind(DbTime(audit.at))
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording a payment for review"))?;
            event(tx, audit, "payment", payment.id, "needs_review", serde_json::json!({ "attempt": payment.attempt, "reason": short(reason) })).await?;
            Ok(state)
        }

        /// Why a due payment is not charged when claimed, if it is not: older than
        /// `payments.max_lateness`, or (with `payments.misfire = coalesce`) an earlier occurrence of
        /// a recurring schedule whose later occurrence is due too.
        async fn late_or_coalesced(
            tx: &mut Tx,
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

        /// Clears an operator's lease, leaving the payment as it was.
        async fn release_lease(tx: &mut Tx, lease: &Lease) -> Result<bool> {
            let done = query("UPDATE payments SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_token = $2 AND state IN ('unknown', 'needs_review')")
                .bind(DbId(lease.payment_id))
                .bind(lease.token.to_string())
                .execute(tx.conn())
                .await
                .map_err(db_err("giving a payment back"))?;
            <Db as Backend>::wake_others(tx).await?;
            Ok(done.rows_affected() > 0)
        }

        /// Whether charging is paused on every host now.
        async fn charging_paused_in(tx: &mut Tx) -> Result<bool> {
            let paused: Option<Option<DbTime>> = query_scalar("SELECT charging_paused_at FROM control WHERE id = 1")
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading the charging pause"))?;
            Ok(matches!(paused, Some(Some(_))))
        }

        /// One more request of a sent attempt, if the key window, the card's limits and the
        /// charging pause allow it now: the daemon holds it otherwise (looked up again later),
        /// an operator gets the payment back as it was.
        async fn prepare_resend(tx: &mut Tx, l: &Locked, row: &AttemptRow, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
            let now = audit.at;
            let payment = &l.held.payment;
            if !l.held.lease_runs(now) {
                return Ok(Next::LeaseLost);
            }
            if !policy.keys.may_resend(row.first_sent_at, now) {
                return match by {
                    Settler::Daemon => Ok(Next::Moved(
                        send_to_review(tx, payment, "the key window closed before the request could be sent again", audit).await?,
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
            let held = match (&row.request, sent_facts(&l.held, row).attempt.resend_stopped) {
                (Some(request), false) => match card_limit(tx, &l.card, now).await?.0 {
                    CardLimit::Clear if charging_paused_in(tx).await? => Err(("charging is paused".to_string(), None)),
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
                            hold_unknown(tx, &l.held, policy.keys.look_at(now), None, &format!("resend held: {why}"), audit).await?,
                        )),
                        Settler::Operator => {
                            release_lease(tx, &l.lease).await?;
                            Ok(Next::NotYet { until, why })
                        }
                    };
                }
            };
            let transition = if payment.state == PaymentState::NeedsReview { Transition::OperatorTake } else { Transition::Settle };
            let state = step(payment.state, transition)?;
            query("UPDATE payments SET state = $1, updated_at = $2 WHERE id = $3")
                .bind(state.as_str())
                .bind(DbTime(now))
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("resending an attempt"))?;
            query("UPDATE payment_attempts SET sends = sends + 1 WHERE payment_id = $1 AND attempt = $2")
                .bind(DbId(payment.id))
                .bind(payment.attempt)
                .execute(tx.conn())
                .await
                .map_err(db_err("counting a resend"))?;
            let call = open_call(tx, payment, &l.card, "charge", audit).await?;
            event(tx, audit, "payment", payment.id, "resent", serde_json::json!({ "attempt": payment.attempt, "sends": row.sends + 1 })).await?;
            Ok(Next::Send { request, call })
        }

        /// Carries out what follows an answer (domain::attempt's `Step`).
        async fn apply_step(tx: &mut Tx, l: &Locked, row: &AttemptRow, next: AttemptStep, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
            let payment = &l.held.payment;
            match next {
                AttemptStep::Charged { reference } => {
                    finish_attempt(tx, payment, "approved", None, Some(&reference), audit.at).await?;
                    let state = step(payment.state, Transition::Approved)?;
                    settle_success(tx, l, state, &reference, audit).await?;
                    Ok(Next::Moved(state))
                }
                AttemptStep::Declined { signal, reference } => {
                    Ok(Next::Moved(apply_decline(tx, l, &signal, reference.as_deref(), policy, audit).await?))
                }
                AttemptStep::Resend => prepare_resend(tx, l, row, by, policy, audit).await,
                AttemptStep::WaitAndResend => Ok(Next::WaitAndResend),
                AttemptStep::Unknown { look_at, unknown_cycles, stop_resending, reason } => {
                    let state = hold_unknown(tx, &l.held, look_at, Some((unknown_cycles, stop_resending)), &reason, audit).await?;
                    Ok(Next::Moved(state))
                }
                AttemptStep::Review { reason } => Ok(Next::Moved(send_to_review(tx, payment, &reason, audit).await?)),
                AttemptStep::Release { reason } => {
                    // The request did nothing: the attempt is forgotten (the next claim begins
                    // it afresh, with the same key), the payment goes back untouched, and
                    // charging stops until an operator has fixed the credentials.
                    query("DELETE FROM payment_attempts WHERE payment_id = $1 AND attempt = $2")
                        .bind(DbId(payment.id))
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
                        let installation: DbId = query_scalar("SELECT installation_id FROM control WHERE id = 1").fetch_one(tx.conn()).await.map_err(db_err("reading control"))?;
                        event(tx, audit, "control", installation.0, "charging_paused", serde_json::json!({ "reason": reason })).await?;
                    }
                    Ok(Next::Released)
                }
            }
        }

        /// An operator's retry starts a new attempt (new key): the old one is settled.
        async fn start_new_attempt(tx: &mut Tx, payment: &Payment, reason: &str, audit: &Audit) -> Result<PaymentState> {
            let state = step(payment.state, Transition::OperatorRetry)?;
            query("UPDATE payments SET state = $1, attempt = attempt + 1, next_attempt_at = $2, amount = NULL, credit_applied = 0, reason = $3, unknown_since = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $2 WHERE id = $4")
                .bind(state.as_str())
                .bind(DbTime(audit.at))
                .bind(reason)
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("retrying a payment"))?;
            event(tx, audit, "payment", payment.id, "retried", serde_json::json!({ "from": payment.state.as_str(), "reason": reason, "new_attempt": payment.attempt + 1 })).await?;
            <Db as Backend>::wake_others(tx).await?;
            Ok(state)
        }

        /// Locks a payment's rows in the one order (member, schedule, card, payment) whoever
        /// holds it: for `reconcile`, which runs while no daemon does.
        async fn lock_payment(tx: &mut Tx, payment_id: Uuid) -> Result<Option<Locked>> {
            let Some((member, schedule, card)) = lock_owners(tx, payment_id).await? else { return Ok(None) };
            let row = query(sqlx::AssertSqlSafe(format!(
                "SELECT {PAYMENT_COLS}, credit_applied, unknown_since, lease_expires_at FROM payments WHERE id = $1{}", <Db as Backend>::FOR_UPDATE
            )))
            .bind(DbId(payment_id))
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
            Ok(Some(Locked { lease: Lease { payment_id, token }, member, schedule, card, held }))
        }

        fn finding_from(row: &DbRow) -> Result<Finding> {
            const T: &str = "reconcile_findings";
            let kind = parsed(T, "kind", get::<String>(row, T, "kind")?.parse::<crate::domain::reconcile::FindingKind>())?;
            Ok(Finding {
                id: id(row, T, "id")?,
                kind: kind.as_str().to_string(),
                explanation: kind.explain().to_string(),
                idempotency_key: get(row, T, "idempotency_key")?,
                reference: get(row, T, "reference")?,
                payment_id: get::<Option<DbId>>(row, T, "payment_id")?.map(|i| i.0),
                schedule_id: id(row, T, "schedule_id")?,
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

        const FINDING_COLS: &str = "id, kind, idempotency_key, reference, payment_id, schedule_id, occurrence, attempt, amount, currency, charged_at, found_at, acknowledged_at, acknowledged_by, note";

        /// Lists a charge `reconcile` could not place; a second run finds it listed already.
        async fn insert_finding(tx: &mut Tx, found: &ProcessorAttempt, kind: crate::domain::reconcile::FindingKind, payment_id: Option<Uuid>, audit: &Audit) -> Result<()> {
            let done = query("INSERT INTO reconcile_findings (id, idempotency_key, kind, reference, payment_id, schedule_id, occurrence, attempt, amount, currency, charged_at, found_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (idempotency_key) DO NOTHING")
                .bind(DbId(new_id()))
                .bind(&found.idempotency_key)
                .bind(kind.as_str())
                .bind(&found.reference)
                .bind(payment_id.map(DbId))
                .bind(DbId(found.schedule_id))
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
                event(tx, audit, "reconcile", found.schedule_id, "finding", serde_json::json!({
                    "kind": kind.as_str(), "reference": found.reference, "attempt": found.attempt,
                    "occurrence": found.occurrence, "payment_id": payment_id,
                })).await?;
            }
            Ok(())
        }

        /// Writes (or completes) the history of one attempt the processor reports: the attempt
        /// row under its key, and the request in the card's history so the card limits count it.
        async fn record_found_attempt(tx: &mut Tx, l: &Locked, found: &ProcessorAttempt, audit: &Audit) -> Result<()> {
            let payment = &l.held.payment;
            let outcome = if found.approved { "approved" } else { "declined" };
            let existing: Option<DbId> = query_scalar("SELECT id FROM payment_attempts WHERE idempotency_key = $1")
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
                    .bind(DbId(payment.id))
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
                    .bind(DbId(payment.id))
                    .bind(found.attempt)
                    .bind(DbId(l.card.id))
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
                    .bind(DbId(payment.id))
                    .bind(found.attempt)
                    .bind(DbId(l.card.id))
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

        /// Runs a housekeeping `DELETE` whose one parameter is the cut-off time; returns how many
        /// rows went.
        async fn delete_before(tx: &mut Tx, sql: &'static str, before: Timestamp, doing: &'static str) -> Result<u64> {
            Ok(query(sql)
                .bind(DbTime(before))
                .execute(tx.conn())
                .await
                .map_err(db_err(doing))?
                .rows_affected())
        }

        /// The attempt's first step, inside `tx`: freezes the amount, checks the card's limits and the
        /// charging pause, and stores the exact request (or settles the payment without a charge).
        async fn begin_attempt_in(tx: &mut Tx, lease: &Lease, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
            use crate::domain::charge::{ChargePlan, Reservation};
            let Some(l) = lock_leased(tx, lease, &[PaymentState::Processing]).await? else {
                return Ok(Next::LeaseLost);
            };
            if !l.held.lease_runs(audit.at) {
                return Ok(Next::LeaseLost);
            }
            let payment = &l.held.payment;
            if attempt_row(tx, payment).await?.is_some() {
                return Err(StoreError::Internal(format!(
                    "attempt {} of payment {} was already sent; a sent attempt is settled, never started again", payment.attempt, payment.id
                )));
            }
            let stopped = matches!(l.schedule.status, ScheduleStatus::Cancelled | ScheduleStatus::Paused | ScheduleStatus::Suspended)
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
                .bind(DbId(payment.member_id))
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("reading open bills"))?;
            let outstanding: Vec<Money> = bills
                .iter()
                .map(|(due, paid)| Money::from_minor(*due, cur).checked_sub(Money::from_minor(*paid, cur)).map_err(money_err))
                .collect::<Result<_>>()?;
            let credits: Vec<i64> = query_scalar("SELECT remaining FROM credits WHERE member_id = $1 AND remaining > 0")
                .bind(DbId(payment.member_id))
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("reading credits"))?;
            let credits: Vec<Money> = credits.into_iter().map(|m| Money::from_minor(m, cur)).collect();
            let reserved: Vec<(i64, i64)> = query_as(sqlx::AssertSqlSafe(format!(
                "SELECT amount, credit_applied FROM payments WHERE member_id = $1 AND id <> $2 AND amount IS NOT NULL AND state IN ({})",
                state_list(&RESERVING)
            )))
            .bind(DbId(payment.member_id))
            .bind(DbId(payment.id))
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("reading reserved amounts"))?;
            let reserved: Vec<Reservation> = reserved
                .into_iter()
                .map(|(amount, credit)| Reservation { amount: Money::from_minor(amount, cur), credit: Money::from_minor(credit, cur) })
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
                    settle_without_charge(tx, payment, state, "covered by credit", None, None, audit).await?;
                    consume_credits(tx, payment, credit_used, audit.at).await?;
                    let (_, left) = pay_bills(tx, payment, credit_used, audit.at).await?;
                    if left.is_positive() {
                        insert_credit(tx, payment.member_id, left, "overpayment", payment.id, "credit beyond what was owed", audit).await?;
                    }
                    return Ok(Next::Moved(state));
                }
                ChargePlan::OverLimit { amount, max } => {
                    let reason = format!("the amount due, {}, is more than automatic payments may charge at once ({})", amount.display_with_code(), max.display_with_code());
                    let state = refuse_amount(tx, &l, Transition::HardDecline, "over_limit", &reason, amount, audit).await?;
                    return Ok(Next::Moved(state));
                }
                ChargePlan::BelowMinimum { amount, min } => {
                    // Not sent: the processor would refuse it. The bills stay owed.
                    let reason = format!("the amount due, {}, is less than the smallest card payment we can make ({}); please pay it online or by phone", amount.display_with_code(), min.display_with_code());
                    let state = refuse_amount(tx, &l, Transition::NothingOwed, "below_minimum", &reason, amount, audit).await?;
                    return Ok(Next::Moved(state));
                }
                ChargePlan::Charge { amount, credit_used } => (amount.money(), credit_used),
            };
            match card_limit(tx, &l.card, audit.at).await?.0 {
                CardLimit::Clear => {}
                CardLimit::Requests { until } => {
                    // The networks allow no more requests on this card for weeks: the
                    // payment fails, and the member is told to use another card.
                    let state = step(payment.state, Transition::HardDecline)?;
                    let code = "card_attempt_limit";
                    settle_without_charge(tx, payment, state, code, Some(amount.minor()), Some(code), audit).await?;
                    let reason = format!("the card has reached the number of payment attempts the card networks allow in 30 days (more are allowed from {until}); please use another card");
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
                        .bind(DbId(payment.id))
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("holding a payment for its card's limit"))?;
                    event(tx, audit, "payment", payment.id, "card_limit", serde_json::json!({ "attempt": payment.attempt, "until": until })).await?;
                    return Ok(Next::Moved(state));
                }
            }
            // The emergency stop, checked just before the request is stored and written.
            let (paused, installation): (Option<DbTime>, DbId) = query_as("SELECT charging_paused_at, installation_id FROM control WHERE id = 1")
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("reading the charging pause and the installation id"))?;
            if paused.is_some() {
                release_payment(tx, payment, "charging paused", audit).await?;
                return Ok(Next::Released);
            }
            let request = ChargeRequest {
                idempotency_key: crate::domain::attempt::idempotency_key(installation.0, payment.schedule_id, &payment.occurrence, payment.attempt),
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
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("freezing the amount"))?;
            query("INSERT INTO payment_attempts (id, payment_id, attempt, payment_method_id, idempotency_key, amount, currency, started_at, request, first_sent_at, sends) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, 1)")
                .bind(DbId(new_id()))
                .bind(DbId(payment.id))
                .bind(payment.attempt)
                .bind(DbId(l.card.id))
                .bind(&request.idempotency_key)
                .bind(amount.minor())
                .bind(cur.code())
                .bind(DbTime(audit.at))
                .bind(sqlx::types::Json(&request))
                .execute(tx.conn())
                .await
                .map_err(db_err("storing the attempt's request"))?;
            let call = open_call(tx, payment, &l.card, "charge", audit).await?;
            event(tx, audit, "payment", payment.id, "attempt_started", serde_json::json!({
                "attempt": payment.attempt, "amount": amount.amount_string(),
                "credit_used": credit_used.amount_string(), "card_id": l.card.id,
            })).await?;
            Ok(Next::Send { request, call })
        }

        /// A charge request's answer, recorded inside `tx`.
        async fn record_charge_in(tx: &mut Tx, lease: &Lease, call: Option<Uuid>, answer: &Answer, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
            let Some(l) = lock_leased(tx, lease, &[PaymentState::Processing]).await? else {
                return Ok(Next::LeaseLost);
            };
            let row = attempt_row(tx, &l.held.payment).await?.ok_or_else(|| {
                StoreError::Internal(format!("payment {} has no sent attempt to record", l.held.payment.id))
            })?;
            if let Some(call) = call {
                let detail = match answer {
                    Answer::Approved { .. } => None,
                    Answer::Declined { signal, .. } => Some(signal.code.as_str()),
                    Answer::Unknown { detail, .. } | Answer::Busy { detail } | Answer::Mismatch { detail } | Answer::Refused { detail } => Some(detail.as_str()),
                };
                finish_call(tx, call, CallOutcome::of(answer), detail, audit.at).await?;
            }
            let next = crate::domain::attempt::after_send(answer, &sent_facts(&l.held, &row).attempt, &policy.keys, audit.at);
            let next = apply_step(tx, &l, &row, next, Settler::Daemon, policy, audit).await?;
            if let (Answer::Approved { network_transaction_id: Some(ntid), .. }, None) = (answer, &l.card.network_transaction_id) {
                // The card's first successful charge: its network id is the stored
                // credential's reference, kept in the same transaction as the charge.
                query("UPDATE payment_methods SET network_transaction_id = $1 WHERE id = $2 AND network_transaction_id IS NULL")
                    .bind(ntid)
                    .bind(DbId(l.card.id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("keeping a card's network transaction id"))?;
            }
            Ok(next)
        }

        #[async_trait]
        impl Store for SqlStore<$db> {
            async fn add_schedule(&self, new: &NewSchedule, audit: &Audit) -> Result<Schedule> {
                schedules::add_schedule(self, new, audit).await
            }

            async fn schedule(&self, schedule_id: Uuid) -> Result<Schedule> {
                schedules::schedule(self, schedule_id).await
            }

            async fn list_schedules(&self, member_id: Option<Uuid>) -> Result<Vec<Schedule>> {
                schedules::list_schedules(self, member_id).await
            }

            async fn update_schedule(&self, change: &ScheduleChange, audit: &Audit) -> Result<Schedule> {
                schedules::update_schedule(self, change, audit).await
            }

            async fn pause_schedule(&self, schedule_id: Uuid, audit: &Audit) -> Result<Schedule> {
                schedules::pause_schedule(self, schedule_id, audit).await
            }

            async fn resume_schedule(&self, resume: &ScheduleResume, audit: &Audit) -> Result<Schedule> {
                schedules::resume_schedule(self, resume, audit).await
            }

            async fn cancel_schedule(&self, schedule_id: Uuid, audit: &Audit) -> Result<Schedule> {
                schedules::cancel_schedule(self, schedule_id, audit).await
            }

            async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
                schedules::plan::due_schedules(self, now, limit).await
            }

            async fn apply_plan(&self, step: &PlanStep, audit: &Audit) -> Result<bool> {
                schedules::plan::apply_plan(self, step, audit).await
            }

            async fn apply_plans(&self, steps: &[PlanStep], audit: &Audit) -> Result<Vec<bool>> {
                schedules::plan::apply_plans(self, steps, audit).await
            }

            async fn schedules_due_between(&self, after: Timestamp, until: Timestamp) -> Result<Vec<Schedule>> {
                schedules::plan::schedules_due_between(self, after, until).await
            }

            async fn add_bills(&self, bills: &[NewBill], audit: &Audit) -> Result<BillImport> {
                bills::add_bills(self, bills, audit).await
            }

            async fn bill(&self, bill_id: Uuid) -> Result<Bill> {
                bills::bill(self, bill_id).await
            }

            async fn list_bills(&self, member_id: Option<Uuid>) -> Result<Vec<Bill>> {
                bills::list_bills(self, member_id).await
            }

            async fn void_bill(&self, bill_id: Uuid, reason: &str, audit: &Audit) -> Result<BillChange> {
                bills::void_bill(self, bill_id, reason, audit).await
            }

            async fn adjust_bill(&self, bill_id: Uuid, amount_due: Money, reason: &str, audit: &Audit) -> Result<BillChange> {
                bills::adjust_bill(self, bill_id, amount_due, reason, audit).await
            }

            async fn pay_bill_external(&self, bill_id: Uuid, amount: Money, reference: &str, audit: &Audit) -> Result<BillChange> {
                bills::pay_bill_external(self, bill_id, amount, reference, audit).await
            }

            async fn list_credits(&self, member_id: Uuid) -> Result<Vec<Credit>> {
                bills::list_credits(self, member_id).await
            }

            async fn add_card(&self, new: &NewCard, audit: &Audit) -> Result<Card> {
                cards::add_card(self, new, audit).await
            }

            async fn card(&self, card_id: Uuid) -> Result<Card> {
                cards::card(self, card_id).await
            }

            async fn list_cards(&self, member_id: Uuid) -> Result<Vec<Card>> {
                cards::list_cards(self, member_id).await
            }

            async fn remove_card(&self, card_id: Uuid, audit: &Audit) -> Result<Card> {
                cards::remove_card(self, card_id, audit).await
            }

            async fn refresh_card(&self, processor: &str, token: &str, details: &crate::processor::CardDetails, reenable_reason: Option<&str>, audit: &Audit) -> Result<Vec<Card>> {
                cards::refresh_card(self, processor, token, details, reenable_reason, audit).await
            }

            async fn card_checked(&self, processor: &str, token: &str, at: Timestamp) -> Result<()> {
                cards::card_checked(self, processor, token, at).await
            }

            async fn cards_to_refresh(&self, processor: &str, by: jiff::civil::Date, checked_before: Timestamp, limit: u32) -> Result<Vec<String>> {
                cards::cards_to_refresh(self, processor, by, checked_before, limit).await
            }

            async fn cards_expiring(&self, by: jiff::civil::Date) -> Result<Vec<(Card, Member)>> {
                cards::cards_expiring(self, by).await
            }

            async fn card_processors(&self) -> Result<Vec<CardProcessor>> {
                cards::card_processors(self).await
            }

            async fn add_member(&self, new: &NewMember, audit: &Audit) -> Result<Member> {
                members::add_member(self, new, audit).await
            }

            async fn member(&self, account: &AccountNumber) -> Result<Member> {
                members::member(self, account).await
            }

            async fn member_by_id(&self, member_id: Uuid) -> Result<Member> {
                members::member_by_id(self, member_id).await
            }

            async fn list_members(&self) -> Result<Vec<Member>> {
                members::list_members(self).await
            }

            async fn update_member(&self, account: &AccountNumber, change: &MemberChange, audit: &Audit) -> Result<Member> {
                members::update_member(self, account, change, audit).await
            }

            async fn close_member(&self, account: &AccountNumber, audit: &Audit) -> Result<ClosedMember> {
                members::close_member(self, account, audit).await
            }

            fn backend(&self) -> crate::config::Backend {
                <Db as Backend>::KIND
            }

            async fn migrate(&self, now: Timestamp) -> Result<MigrationReport> {
                let mut tx = self.begin_write().await?;
                <Db as Backend>::lock_for_migration(&mut tx).await?;
                execute_script(<Db as Backend>::BOOTSTRAP, tx.conn()).await.map_err(db_err("creating the migrations table"))?;
                let done: Vec<i64> = query_scalar("SELECT version FROM schema_migrations")
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("reading applied migrations"))?;
                let mut applied = Vec::new();
                for (version, name, sql) in <Db as Backend>::MIGRATIONS {
                    if done.contains(version) {
                        continue;
                    }
                    execute_script(*sql, tx.conn()).await.map_err(|e| {
                        StoreError::Schema(format!("migration {version} ({name}) failed: {e}; nothing was changed"))
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
                Ok(MigrationReport { applied, schema_version: SCHEMA_VERSION, installation_id })
            }

            async fn schema_state(&self) -> Result<SchemaState> {
                let applied: Option<i64> = match query_scalar("SELECT MAX(version) FROM schema_migrations")
                    .fetch_one(&self.pool)
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
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db_err("reading control"))?
                        .unwrap_or(0)
                };
                Ok(SchemaState { applied, min_binary })
            }

            async fn control(&self) -> Result<Control> {
                let row = query("SELECT installation_id, min_binary_schema, charging_paused_at, charging_paused_by, charging_paused_reason, mail_paused_at, mail_paused_reason, reconcile_required_since FROM control WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading control"))?
                    .ok_or_else(|| StoreError::Schema("the database has no installation id; run `autopay migrate`".into()))?;
                const T: &str = "control";
                Ok(Control {
                    installation_id: id(&row, T, "installation_id")?,
                    min_binary_schema: get(&row, T, "min_binary_schema")?,
                    charging_paused: pause_from(opt_time(&row, T, "charging_paused_at")?, get(&row, T, "charging_paused_by")?, get(&row, T, "charging_paused_reason")?),
                    mail_paused: pause_from(opt_time(&row, T, "mail_paused_at")?, None, get(&row, T, "mail_paused_reason")?),
                    reconcile_required_since: opt_time(&row, T, "reconcile_required_since")?,
                })
            }

            async fn status(&self) -> Result<StatusReport> {
                let control = self.control().await?;
                let members_bouncing: i64 = query_scalar("SELECT COUNT(*) FROM members WHERE email_bouncing = TRUE")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("counting"))?;
                let findings_open: i64 = query_scalar("SELECT COUNT(*) FROM reconcile_findings WHERE acknowledged_at IS NULL")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("counting findings"))?;
                let processor_events = counts(&self.pool, "SELECT type AS k, COUNT(*) AS n FROM webhook_events WHERE type IN ('charge.refunded', 'charge.dispute.created') GROUP BY type").await?;
                Ok(StatusReport {
                    backend: format!("{:?}", <Db as Backend>::KIND).to_lowercase(),
                    schema_version: self.schema_state().await?.applied,
                    control,
                    members: counts(&self.pool, "SELECT status AS k, COUNT(*) AS n FROM members GROUP BY status").await?,
                    schedules: counts(&self.pool, "SELECT status AS k, COUNT(*) AS n FROM schedules GROUP BY status").await?,
                    payments: counts(&self.pool, "SELECT state AS k, COUNT(*) AS n FROM payments GROUP BY state").await?,
                    bills: counts(&self.pool, "SELECT status AS k, COUNT(*) AS n FROM bills GROUP BY status").await?,
                    notifications: counts(&self.pool, "SELECT state AS k, COUNT(*) AS n FROM notifications GROUP BY state").await?,
                    members_bouncing,
                    findings_open,
                    processor_events,
                })
            }

            async fn payment(&self, payment_id: Uuid) -> Result<Payment> {
                let row = query(sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1")))
                    .bind(DbId(payment_id))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a payment"))?;
                match row {
                    Some(row) => payment_from(&row),
                    None => Err(StoreError::NotFound(format!("no payment has id {payment_id}; list payments with `autopay payment list`"))),
                }
            }

            async fn list_payments(&self, member_id: Option<Uuid>, state: Option<PaymentState>) -> Result<Vec<Payment>> {
                query(sqlx::AssertSqlSafe(format!(
                    "SELECT {PAYMENT_COLS} FROM payments WHERE ($1 IS NULL OR member_id = $1) AND ($2 IS NULL OR state = $2) ORDER BY due_at, id"
                )))
                .bind(member_id.map(DbId))
                .bind(state.map(|s| s.as_str()))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err("listing payments"))?
                .iter()
                .map(payment_from)
                .collect()
            }

            async fn events(&self, entity_id: &str) -> Result<Vec<Event>> {
                let rows = query("SELECT id, at, actor, entity, entity_id, action, detail FROM events WHERE entity_id = $1 ORDER BY at, id")
                    .bind(entity_id)
                    .fetch_all(&self.pool)
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
            async fn allocations(&self, payment_id: Uuid) -> Result<Vec<Allocation>> {
                let rows = query("SELECT payment_id, bill_id, credit_id, amount, currency FROM payment_allocations WHERE payment_id = $1 ORDER BY created_at, id")
                    .bind(DbId(payment_id))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("reading allocations"))?;
                rows.iter()
                    .map(|row| {
                        const T: &str = "payment_allocations";
                        Ok(Allocation {
                            payment_id: id(row, T, "payment_id")?,
                            bill_id: get::<Option<DbId>>(row, T, "bill_id")?.map(|i| i.0),
                            credit_id: get::<Option<DbId>>(row, T, "credit_id")?.map(|i| i.0),
                            amount: Money::from_minor(get(row, T, "amount")?, currency(row, T)?),
                        })
                    })
                    .collect()
            }

            async fn calls(&self, payment_id: Uuid) -> Result<Vec<Call>> {
                const T: &str = "processor_calls";
                let rows = query("SELECT attempt, kind, actor, started_at, outcome, detail, finished_at FROM processor_calls WHERE payment_id = $1 ORDER BY started_at, id")
                    .bind(DbId(payment_id))
                    .fetch_all(&self.pool)
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

            async fn notifications(&self, member_id: Option<Uuid>) -> Result<Vec<Notification>> {
                query(sqlx::AssertSqlSafe(format!("SELECT {NOTIFICATION_COLS} FROM notifications WHERE ($1 IS NULL OR member_id = $1) ORDER BY created_at, id")))
                    .bind(member_id.map(DbId))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing notifications"))?
                    .iter()
                    .map(notification_from)
                    .collect()
            }

            async fn claim_work(&self, owner: &str, now: Timestamp, rules: &ClaimRules) -> Result<Vec<Work>> {
                let until = now
                    .checked_add(jiff::SignedDuration::try_from(rules.lease).map_err(|e| StoreError::Internal(e.to_string()))?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                let audit = Audit { actor: owner.to_string(), at: now };
                let cutoff = crate::domain::charge::lateness_cutoff(now, rules.max_lateness);
                let mut tx = self.begin_write().await?;
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
                         ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2{}", <Db as Backend>::SKIP_LOCKED
                    )))
                    .bind(DbTime(now))
                    .bind(want)
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("finding payments to settle"))?;
                    let more = want - candidates.len() as i64;
                    if more > 0 && !paused {
                        let due: Vec<(DbId, String, DbId, DbTime, Option<DbTime>)> = query_as(<Db as Backend>::claim_due_sql())
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
                            if let Some(reason) = late_or_coalesced(&mut tx, rules, cutoff, now, schedule_id, due_at.0, next_attempt_at.map(|t| t.0)).await? {
                                let state = step(from, Transition::Late)?;
                                query("UPDATE payments SET state = $1, reason = $2, next_attempt_at = NULL, updated_at = $3 WHERE id = $4")
                                    .bind(state.as_str())
                                    .bind(reason)
                                    .bind(DbTime(now))
                                    .bind(payment_id)
                                    .execute(tx.conn())
                                    .await
                                    .map_err(db_err("recording a payment as missed"))?;
                                event(&mut tx, &audit, "payment", payment_id.0, "missed", serde_json::json!({ "reason": reason })).await?;
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
                            event(&mut tx, &audit, "payment", payment.id, "lease_expired", serde_json::json!({ "attempt": payment.attempt })).await?;
                        }
                        work.push(Work { lease: Lease { payment_id: payment.id, token }, kind, payment, taken_over: from == PaymentState::Processing });
                    }
                    if missed == 0 {
                        break;
                    }
                }
                commit(tx).await?;
                Ok(work)
            }

            async fn renew_leases(&self, leases: &[Lease], until: Timestamp) -> Result<u64> {
                let mut held = 0;
                for lease in leases {
                    held += query("UPDATE payments SET lease_expires_at = $1 WHERE id = $2 AND lease_token = $3 AND state = 'processing'")
                        .bind(DbTime(until))
                        .bind(DbId(lease.payment_id))
                        .bind(lease.token.to_string())
                        .execute(&self.pool)
                        .await
                        .map_err(db_err("renewing a lease"))?
                        .rows_affected();
                }
                Ok(held)
            }

            async fn begin_attempt(&self, lease: &Lease, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                let mut tx = self.begin_write().await?;
                let next = begin_attempt_in(&mut tx, lease, policy, audit).await?;
                commit(tx).await?;
                Ok(next)
            }

            async fn sent_attempt(&self, lease: &Lease) -> Result<Option<SentFacts>> {
                let mut tx = self.begin_write().await?;
                let Some(held) = leased_payment(&mut tx, lease, &[PaymentState::Processing, PaymentState::Unknown, PaymentState::NeedsReview]).await? else {
                    return Ok(None);
                };
                let facts = attempt_row(&mut tx, &held.payment).await?.map(|row| sent_facts(&held, &row));
                commit(tx).await?;
                Ok(facts)
            }

            async fn begin_resend(&self, lease: &Lease, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                let mut tx = self.begin_write().await?;
                let states: &[PaymentState] = match by {
                    Settler::Daemon => &[PaymentState::Processing],
                    Settler::Operator => &[PaymentState::NeedsReview],
                };
                let Some(l) = lock_leased(&mut tx, lease, states).await? else {
                    return Ok(Next::LeaseLost);
                };
                let row = attempt_row(&mut tx, &l.held.payment).await?.ok_or_else(|| {
                    StoreError::Internal(format!("payment {} has no sent attempt to resend", l.held.payment.id))
                })?;
                let next = prepare_resend(&mut tx, &l, &row, by, policy, audit).await?;
                commit(tx).await?;
                Ok(next)
            }

            async fn record_charge(&self, lease: &Lease, call: Option<Uuid>, answer: &Answer, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                let mut tx = self.begin_write().await?;
                let next = record_charge_in(&mut tx, lease, call, answer, policy, audit).await?;
                commit(tx).await?;
                Ok(next)
            }

            async fn charge_steps(&self, steps: &[ChargeStep], policy: &OutcomePolicy) -> Result<Vec<Next>> {
                let mut tx = self.begin_write().await?;
                let mut done = Vec::with_capacity(steps.len());
                for step in steps {
                    done.push(match step {
                        ChargeStep::Begin { lease, audit } => begin_attempt_in(&mut tx, lease, policy, audit).await?,
                        ChargeStep::Record { lease, call, answer, audit } => record_charge_in(&mut tx, lease, *call, answer, policy, audit).await?,
                    });
                }
                commit(tx).await?;
                Ok(done)
            }

            async fn record_lookup(&self, lease: &Lease, answer: &LookupAnswer, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                use crate::domain::attempt::OperatorStep;
                let mut tx = self.begin_write().await?;
                let states: &[PaymentState] = match by {
                    Settler::Daemon => &[PaymentState::Processing],
                    Settler::Operator => &[PaymentState::Unknown, PaymentState::NeedsReview],
                };
                let Some(l) = lock_leased(&mut tx, lease, states).await? else {
                    return Ok(Next::LeaseLost);
                };
                let payment = &l.held.payment;
                let row = attempt_row(&mut tx, payment).await?.ok_or_else(|| {
                    StoreError::Internal(format!("payment {} has no sent attempt to look up", payment.id))
                })?;
                let call = open_call(&mut tx, payment, &l.card, "lookup", audit).await?;
                let detail = match answer {
                    LookupAnswer::Found { reference, .. } => Some(reference.as_str()),
                    LookupAnswer::NotFound => None,
                    LookupAnswer::Unknown { detail } => Some(detail.as_str()),
                };
                finish_call(&mut tx, call, CallOutcome::of_lookup(answer), detail, audit.at).await?;
                let facts = sent_facts(&l.held, &row);
                let next = match by {
                    Settler::Daemon => {
                        let next = crate::domain::attempt::after_lookup(answer, &facts.attempt, &policy.keys, audit.at);
                        apply_step(&mut tx, &l, &row, next, by, policy, audit).await?
                    }
                    Settler::Operator => match crate::domain::attempt::operator_after_lookup(answer, &facts.attempt, &policy.keys, audit.at) {
                        OperatorStep::Record(AttemptStep::Charged { reference }) => {
                            finish_attempt(&mut tx, payment, "approved", None, Some(&reference), audit.at).await?;
                            let state = step(payment.state, Transition::OperatorResolve(crate::domain::payment::Resolution::Succeeded))?;
                            settle_success(&mut tx, &l, state, &reference, audit).await?;
                            Next::Moved(state)
                        }
                        OperatorStep::Record(AttemptStep::Declined { signal, reference }) => {
                            let signal = signal.or_brand(l.card.brand);
                            finish_attempt(&mut tx, payment, "declined", Some(&signal.code), reference.as_deref(), audit.at).await?;
                            record_advice(&mut tx, payment, &signal).await?;
                            let decline = crate::domain::decline::classify(&signal);
                            if decline.action == crate::domain::decline::DeclineAction::DisableCard {
                                // The bank said never again: no new attempt on this card.
                                let state = step(payment.state, Transition::OperatorResolve(crate::domain::payment::Resolution::Failed))?;
                                settle_without_charge(&mut tx, payment, state, decline.member_reason, payment.amount.map(|m| m.minor()), Some(&decline.code), audit).await?;
                                let n = declined_notice(&l, &decline.code, decline.member_reason, payment.amount, None);
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
                            return Err(StoreError::Internal(format!("an operator's lookup cannot lead to {other:?}")));
                        }
                    },
                };
                commit(tx).await?;
                Ok(next)
            }

            async fn next_wakeup(&self) -> Result<Option<Timestamp>> {
                let paused = self.control().await?.charging_paused.is_some();
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
                    let t: Option<DbTime> = query_scalar(sql).fetch_one(&self.pool).await.map_err(db_err("finding the next due work"))?;
                    if let Some(t) = t {
                        earliest = Some(earliest.map_or(t.0, |e| e.min(t.0)));
                    }
                }
                Ok(earliest)
            }

            async fn attempt_stats(&self, since: Timestamp) -> Result<AttemptStats> {
                let row = query("SELECT COUNT(*) AS attempts, CAST(COALESCE(SUM(CASE WHEN outcome = 'declined' THEN 1 ELSE 0 END), 0) AS BIGINT) AS declines, CAST(COALESCE(SUM(CASE WHEN outcome IN ('unknown', 'busy', 'mismatch') THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors FROM processor_calls WHERE kind = 'charge' AND outcome IS NOT NULL AND started_at >= $1")
                    .bind(DbTime(since))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("reading attempt statistics"))?;
                const T: &str = "processor_calls";
                Ok(AttemptStats { attempts: get(&row, T, "attempts")?, declines: get(&row, T, "declines")?, errors: get(&row, T, "errors")? })
            }

            async fn set_charging_pause(&self, reason: Option<&str>, audit: &Audit) -> Result<Control> {
                let mut tx = self.begin_write().await?;
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
                    return Err(StoreError::Schema("the database has no installation id; run `autopay migrate`".into()));
                }
                let installation: DbId = query_scalar("SELECT installation_id FROM control WHERE id = 1").fetch_one(tx.conn()).await.map_err(db_err("reading control"))?;
                event(&mut tx, audit, "control", installation.0, if reason.is_some() { "charging_paused" } else { "charging_resumed" }, serde_json::json!({ "reason": reason })).await?;
                <Db as Backend>::wake_others(&mut tx).await?;
                commit(tx).await?;
                self.control().await
            }

            async fn retry_payment(&self, payment_id: Uuid, force: bool, audit: &Audit) -> Result<Payment> {
                let mut tx = self.begin_write().await?;
                let not_found = || StoreError::NotFound(format!("no payment has id {payment_id}; list payments with `autopay payment list`"));
                let owners: Option<(DbId, DbId)> = query_as("SELECT member_id, payment_method_id FROM payments WHERE id = $1")
                    .bind(DbId(payment_id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a payment"))?;
                let (member_id, card_id) = owners.ok_or_else(not_found)?;
                // The documented lock order: member, card, then the payment.
                member_by_id_in(&mut tx, member_id.0).await?;
                let card = card_in(&mut tx, card_id.0).await?;
                let row = query(sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1{}", <Db as Backend>::FOR_UPDATE)))
                    .bind(DbId(payment_id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a payment"))?
                    .ok_or_else(not_found)?;
                let payment = payment_from(&row)?;
                if payment.state == PaymentState::NeedsReview {
                    return Err(StoreError::Conflict(format!("payment {payment_id} needs review: its last attempt may have charged, so it is settled first (`autopay payment retry` does this when run from the command line)")));
                }
                if !matches!(payment.state, PaymentState::Failed | PaymentState::Missed) {
                    return Err(StoreError::Conflict(format!("payment {payment_id} is {}; only failed, missed or needs_review payments can be retried", payment.state)));
                }
                let refused_before_any_call = ["over_limit", "card_attempt_limit", "card_decline_limit"];
                let hard = payment.state == PaymentState::Failed
                    && payment.decline_code.as_deref().is_some_and(|c| !refused_before_any_call.contains(&c));
                if hard && !force {
                    return Err(StoreError::Conflict(format!(
                        "payment {payment_id} failed with a hard decline ({}); retrying the same card rarely helps. Add --force to retry anyway, or move the schedule to another card",
                        payment.decline_code.as_deref().unwrap_or("")
                    )));
                }
                if card.status != CardStatus::Active {
                    return Err(StoreError::Conflict(format!("card {} is {}; give the schedule another card with `autopay schedule update {} --card NEW_CARD`", card.id, card.status, payment.schedule_id)));
                }
                start_new_attempt(&mut tx, &payment, if force { "retried by an operator (--force)" } else { "retried by an operator" }, audit).await?;
                commit(tx).await?;
                self.payment(payment_id).await
            }

            async fn take_for_operator(&self, payment_id: Uuid, lease: std::time::Duration, audit: &Audit) -> Result<Taken> {
                let until = audit.at
                    .checked_add(jiff::SignedDuration::try_from(lease).map_err(|e| StoreError::Internal(e.to_string()))?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                let mut tx = self.begin_write().await?;
                let row = query(sqlx::AssertSqlSafe(format!(
                    "SELECT {PAYMENT_COLS}, credit_applied, unknown_since, lease_owner, lease_expires_at FROM payments WHERE id = $1{}", <Db as Backend>::FOR_UPDATE
                )))
                .bind(DbId(payment_id))
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
                if !matches!(held.payment.state, PaymentState::Unknown | PaymentState::NeedsReview) {
                    return Err(StoreError::Conflict(format!(
                        "payment {payment_id} is {}; only unknown or needs_review payments are settled by an operator", held.payment.state
                    )));
                }
                let token = Uuid::new_v4();
                query("UPDATE payments SET lease_owner = $1, lease_token = $2, lease_expires_at = $3 WHERE id = $4")
                    .bind(&audit.actor)
                    .bind(token.to_string())
                    .bind(DbTime(until))
                    .bind(DbId(payment_id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("taking a payment for review"))?;
                let sent = attempt_row(&mut tx, &held.payment).await?.map(|r| sent_facts(&held, &r));
                commit(tx).await?;
                Ok(Taken { lease: Lease { payment_id, token }, payment: held.payment, sent })
            }

            async fn give_back(&self, lease: &Lease) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let done = release_lease(&mut tx, lease).await?;
                commit(tx).await?;
                Ok(done)
            }

            async fn resolve_payment(&self, resolve: &Resolve, audit: &Audit) -> Result<Payment> {
                use crate::domain::payment::Resolution;
                let mut tx = self.begin_write().await?;
                let Some(l) = lock_leased(&mut tx, &resolve.lease, &[PaymentState::Unknown, PaymentState::NeedsReview]).await? else {
                    return Err(StoreError::Conflict(format!(
                        "payment {} changed while it was being resolved; run the command again", resolve.lease.payment_id
                    )));
                };
                let payment = &l.held.payment;
                let state = step(payment.state, Transition::OperatorResolve(resolve.resolution))?;
                match resolve.resolution {
                    Resolution::Succeeded => {
                        if payment.amount.is_none() {
                            return Err(StoreError::Conflict(format!("payment {} has no amount recorded for its attempt; resolve it as failed or cancelled and retry it", payment.id)));
                        }
                        finish_attempt(&mut tx, payment, "approved", None, Some(&resolve.reference), audit.at).await?;
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
                            .bind(DbId(payment.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("resolving a payment"))?;
                    }
                }
                event(&mut tx, audit, "payment", payment.id, "resolved", serde_json::json!({
                    "as": format!("{:?}", resolve.resolution).to_lowercase(), "attempt": payment.attempt,
                    "reference": resolve.reference, "reason": resolve.reason,
                })).await?;
                commit(tx).await?;
                self.payment(payment.id).await
            }
            async fn enqueue(&self, n: &NewNotification, at: Timestamp) -> Result<bool> {
                // The reminder scans ask every minute about rows that mostly exist already: a
                // read answers those without taking the writer's lock.
                let exists: Option<DbId> = query_scalar("SELECT id FROM notifications WHERE dedupe_key = $1")
                    .bind(&n.dedupe_key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a notification"))?;
                if exists.is_some() {
                    return Ok(false);
                }
                let mut tx = self.begin_write().await?;
                let member = member_by_id_in(&mut tx, n.member_id).await?;
                let done = query("INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, attempts, next_attempt_at, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $7) ON CONFLICT (dedupe_key) DO NOTHING")
                    .bind(DbId(new_id()))
                    .bind(&n.kind)
                    .bind(&n.dedupe_key)
                    .bind(DbId(member.id))
                    .bind(member.email.as_str())
                    .bind(sqlx::types::Json(&n.payload))
                    .bind(DbTime(at))
                    .bind(n.expires_at.map(DbTime))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("writing a notification"))?
                    .rows_affected();
                <Db as Backend>::wake_others(&mut tx).await?;
                commit(tx).await?;
                Ok(done > 0)
            }

            async fn claim_notifications(&self, owner: &str, now: Timestamp, lease: std::time::Duration, limit: u32) -> Result<Vec<Outgoing>> {
                let until = now
                    .checked_add(jiff::SignedDuration::try_from(lease).map_err(|e| StoreError::Internal(e.to_string()))?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                let mut tx = self.begin_write().await?;
                // A reminder whose moment has passed is not worth sending.
                query("UPDATE notifications SET state = 'expired', last_error = 'its moment passed before it could be sent' WHERE state IN ('pending', 'sending') AND expires_at IS NOT NULL AND expires_at <= $1 AND (lease_expires_at IS NULL OR lease_expires_at < $1)")
                    .bind(DbTime(now))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("expiring notifications"))?;
                let ids: Vec<DbId> = query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM notifications WHERE (state = 'pending' AND next_attempt_at <= $1) OR (state = 'sending' AND lease_expires_at < $1) ORDER BY next_attempt_at, id LIMIT $2{}", <Db as Backend>::SKIP_LOCKED
                )))
                .bind(DbTime(now))
                .bind(i64::from(limit))
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("finding due notifications"))?;
                if ids.is_empty() {
                    commit(tx).await?;
                    return Ok(Vec::new());
                }
                // One lease token for the whole claim: a lease is this claim of this row, and a
                // later claim of any of them (after this one expired) gets a token of its own.
                let token = Uuid::new_v4();
                // The recipient is the member's address now, not when the row was queued: an
                // address changed in between must not send the message to the old one. The
                // column then records where this attempt went.
                let placeholders = (0..ids.len()).map(|i| format!("${}", i + 4)).collect::<Vec<_>>().join(", ");
                let mut update = query(sqlx::AssertSqlSafe(format!(
                    "UPDATE notifications SET state = 'sending', lease_owner = $1, lease_token = $2, lease_expires_at = $3, attempts = attempts + 1, \
                     recipient = COALESCE((SELECT m.email FROM members m WHERE m.id = notifications.member_id), recipient) WHERE id IN ({placeholders}) RETURNING {NOTIFICATION_COLS}"
                )))
                .bind(owner)
                .bind(token.to_string())
                .bind(DbTime(until));
                for nid in &ids {
                    update = update.bind(*nid);
                }
                let rows = update
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("claiming notifications"))?;
                let mut claimed = BTreeMap::new();
                for row in &rows {
                    let notification = notification_from(row)?;
                    claimed.insert(notification.id, notification);
                }
                // In the order they fell due (RETURNING promises none).
                let out = ids
                    .iter()
                    .filter_map(|nid| claimed.remove(&nid.0))
                    .map(|notification| Outgoing { lease: NotificationLease { id: notification.id, token }, notification })
                    .collect();
                commit(tx).await?;
                Ok(out)
            }

            async fn finish_notifications(&self, done: &[Delivered], now: Timestamp) -> Result<Vec<bool>> {
                if done.is_empty() {
                    return Ok(Vec::new());
                }
                // Rows are written in id order, whatever order the answers came in: two
                // dispatchers finishing overlapping groups then lock in one order.
                let mut order: Vec<usize> = (0..done.len()).collect();
                order.sort_by_key(|&i| done[i].lease.id);
                let mut recorded = vec![false; done.len()];
                let mut tx = self.begin_write().await?;
                for i in order {
                    let Delivered { lease, outcome } = &done[i];
                    // Each update holds only while this claim still holds the row: a lease that
                    // expired and was claimed again belongs to its new holder.
                    const HELD: &str = "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $2 AND lease_token = $3 AND state = 'sending' RETURNING member_id";
                    let update = match outcome {
                        DeliveryOutcome::Sent => query(sqlx::AssertSqlSafe(format!(
                            "UPDATE notifications SET state = 'sent', sent_at = $1, last_error = NULL, {HELD}"
                        )))
                        .bind(DbTime(now)),
                        DeliveryOutcome::Retry { at, .. } => query(sqlx::AssertSqlSafe(format!(
                            "UPDATE notifications SET state = 'pending', next_attempt_at = $1, last_error = $4, {HELD}"
                        )))
                        .bind(DbTime(*at)),
                        DeliveryOutcome::Failed { error, .. } => query(sqlx::AssertSqlSafe(format!(
                            "UPDATE notifications SET state = 'failed', last_error = $1, {HELD}"
                        )))
                        .bind(error.as_str()),
                    };
                    let update = update.bind(DbId(lease.id)).bind(lease.token.to_string());
                    let update = match outcome {
                        DeliveryOutcome::Retry { error, .. } => update.bind(error.as_str()),
                        _ => update,
                    };
                    let row = update
                        .fetch_optional(tx.conn())
                        .await
                        .map_err(db_err("recording a delivery"))?;
                    let Some(row) = row else {
                        continue;
                    };
                    recorded[i] = true;
                    let member_id: Option<DbId> = get(&row, "notifications", "member_id")?;
                    if let (DeliveryOutcome::Failed { bounce: true, .. }, Some(member_id)) = (outcome, member_id) {
                        query("UPDATE members SET email_bouncing = TRUE, updated_at = $1 WHERE id = $2")
                            .bind(DbTime(now))
                            .bind(member_id)
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("flagging a bouncing address"))?;
                        event(&mut tx, &Audit { actor: "dispatcher".into(), at: now }, "member", member_id.0, "email_bouncing", serde_json::json!({ "notification_id": lease.id })).await?;
                    }
                }
                commit(tx).await?;
                Ok(recorded)
            }

            async fn set_mail_pause(&self, reason: Option<&str>, now: Timestamp) -> Result<()> {
                match reason {
                    Some(reason) => query("UPDATE control SET mail_paused_at = COALESCE(mail_paused_at, $1), mail_paused_reason = $2 WHERE id = 1")
                        .bind(DbTime(now))
                        .bind(reason)
                        .execute(&self.pool)
                        .await,
                    None => {
                        let mut tx = self.begin_write().await?;
                        let lifted = query("UPDATE control SET mail_paused_at = NULL, mail_paused_reason = NULL WHERE id = 1 AND mail_paused_at IS NOT NULL")
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("recording the mail pause"))?
                            .rows_affected();
                        if lifted > 0 {
                            // What waited through the pause backed off message by message; the
                            // server answers again, so it all goes now.
                            query("UPDATE notifications SET next_attempt_at = $1 WHERE state = 'pending' AND next_attempt_at > $1")
                                .bind(DbTime(now))
                                .execute(tx.conn())
                                .await
                                .map_err(db_err("resuming the waiting mail"))?;
                            <Db as Backend>::wake_others(&mut tx).await?;
                        }
                        commit(tx).await?;
                        return Ok(());
                    }
                }
                .map_err(db_err("recording the mail pause"))?;
                Ok(())
            }

            async fn watch(&self, changed: &(dyn Fn() + Send + Sync), stop: &crate::shutdown::Shutdown) -> Result<()> {
                <Db as Backend>::watch(self, changed, stop).await
            }

            async fn record_job_run(&self, job: &str, worker: &str, at: Timestamp) -> Result<()> {
                let mut tx = self.begin_write().await?;
                query("INSERT INTO job_runs (job, worker, last_run) VALUES ($1, $2, $3) ON CONFLICT (job, worker) DO UPDATE SET last_run = excluded.last_run")
                    .bind(job)
                    .bind(worker)
                    .bind(DbTime(at))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("recording a periodic job's run"))?;
                commit(tx).await
            }

            async fn activity(&self, now: Timestamp, since: Timestamp) -> Result<Activity> {
                let (due_now, oldest_due) = self.due_backlog(now).await?;
                let next_due = self.next_wakeup().await?;
                let jobs: Vec<(String, DbTime)> = query_as("SELECT job, MAX(last_run) FROM job_runs GROUP BY job ORDER BY job")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("reading the periodic jobs' runs"))?;
                let recent = |state: PaymentState| {
                    query_scalar::<_, i64>("SELECT COUNT(*) FROM payments WHERE state = $1 AND updated_at >= $2")
                        .bind(state.as_str())
                        .bind(DbTime(since))
                        .fetch_one(&self.pool)
                };
                let failed = recent(PaymentState::Failed).await.map_err(db_err("counting recent failures"))?;
                let unknown = recent(PaymentState::Unknown).await.map_err(db_err("counting recent failures"))?;
                let needs_review = recent(PaymentState::NeedsReview).await.map_err(db_err("counting recent failures"))?;
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

            async fn database_clock(&self) -> Result<Option<Timestamp>> {
                let Some(sql) = <Db as Backend>::CLOCK_QUERY else { return Ok(None) };
                let t: DbTime = query_scalar(sql)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("reading the database's clock"))?;
                Ok(Some(t.0))
            }

            async fn due_backlog(&self, now: Timestamp) -> Result<(i64, Option<Timestamp>)> {
                let (count, oldest): (i64, Option<DbTime>) = query_as("SELECT COUNT(*), MIN(COALESCE(next_attempt_at, due_at)) FROM payments WHERE state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1")
                    .bind(DbTime(now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("counting the due backlog"))?;
                Ok((count, oldest.map(|t| t.0)))
            }

            async fn next_mail_due(&self) -> Result<Option<Timestamp>> {
                let t: Option<DbTime> = query_scalar("SELECT MIN(CASE WHEN state = 'pending' THEN next_attempt_at ELSE lease_expires_at END) FROM notifications WHERE state IN ('pending', 'sending')")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("finding the next mail due"))?;
                Ok(t.map(|t| t.0))
            }

            async fn prune_notifications(&self, before: Timestamp) -> Result<u64> {
                let mut tx = self.begin_write().await?;
                let done = delete_before(&mut tx, "DELETE FROM notifications WHERE (state = 'sent' AND sent_at < $1) OR (state IN ('failed', 'expired') AND created_at < $1)", before, "deleting old notifications").await?;
                commit(tx).await?;
                Ok(done)
            }

            async fn prune_job_runs(&self, before: Timestamp) -> Result<u64> {
                let mut tx = self.begin_write().await?;
                let mut done = delete_before(&mut tx, "DELETE FROM job_runs WHERE last_run < $1", before, "deleting old job runs").await?;
                // Handled webhook events are kept while the processor may deliver them again
                // (Stripe: three days); refunds and disputes stay, for `status`.
                done += delete_before(&mut tx, "DELETE FROM webhook_events WHERE received_at < $1 AND type NOT IN ('charge.refunded', 'charge.dispute.created')", before, "deleting old webhook events").await?;
                commit(tx).await?;
                Ok(done)
            }

            async fn backup_into(&self, path: &std::path::Path, at: Timestamp) -> Result<()> {
                <Db as Backend>::backup_into(self, path, at).await
            }

            async fn set_reconcile_mark(&self, since: Option<Timestamp>, audit: &Audit) -> Result<()> {
                let mut tx = self.begin_write().await?;
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
                let action = if since.is_some() { "reconcile_required" } else { "reconciled" };
                event(&mut tx, audit, "control", Uuid::nil(), action, serde_json::json!({ "since": since })).await?;
                commit(tx).await
            }

            async fn newest_attempt(&self) -> Result<Option<Timestamp>> {
                let mut newest: Option<Timestamp> = None;
                for sql in ["SELECT MAX(started_at) FROM payment_attempts", "SELECT MAX(started_at) FROM processor_calls"] {
                    let t: Option<DbTime> = query_scalar(sql)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(db_err("finding the newest record"))?;
                    newest = newest.max(t.map(|t| t.0));
                }
                Ok(newest)
            }

            async fn known_keys(&self, keys: &[String]) -> Result<std::collections::HashSet<String>> {
                let mut known = std::collections::HashSet::new();
                for chunk in keys.chunks(500) {
                    let marks = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                    let sql = format!(
                        "SELECT idempotency_key FROM payment_attempts WHERE idempotency_key IN ({marks}) \
                         UNION SELECT idempotency_key FROM reconcile_findings WHERE idempotency_key IN ({marks})"
                    );
                    let mut q = query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
                    for k in chunk {
                        q = q.bind(k);
                    }
                    known.extend(q.fetch_all(&self.pool).await.map_err(db_err("comparing attempts with the processor's"))?);
                }
                Ok(known)
            }

            async fn reconcile_attempt(&self, found: &ProcessorAttempt, last_try: bool, audit: &Audit) -> Result<Reconciled> {
                use crate::domain::reconcile::{decide, Decision, OurPayment, Recorded};
                let mut tx = self.begin_write().await?;
                let listed: Option<DbId> = query_scalar("SELECT id FROM reconcile_findings WHERE idempotency_key = $1")
                    .bind(&found.idempotency_key)
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading findings"))?;
                if listed.is_some() {
                    return Ok(Reconciled::Finding);
                }
                // The payment the attempt was made for: by its id, or (planned again after the
                // restore under another id) by its schedule and occurrence, which the key names.
                let payment_id: Option<DbId> = query_scalar("SELECT id FROM payments WHERE id = $1 OR (schedule_id = $2 AND occurrence = $3) ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1")
                    .bind(DbId(found.payment_id))
                    .bind(DbId(found.schedule_id))
                    .bind(&found.occurrence)
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("finding the attempt's payment"))?;
                let locked = match payment_id {
                    Some(pid) => lock_payment(&mut tx, pid.0).await?,
                    None => None,
                };
                let ours = match &locked {
                    None => None,
                    Some(l) => {
                        let outcome: Option<Option<String>> = query_scalar("SELECT outcome FROM payment_attempts WHERE idempotency_key = $1")
                            .bind(&found.idempotency_key)
                            .fetch_optional(tx.conn())
                            .await
                            .map_err(db_err("reading an attempt"))?;
                        let in_flight: Option<i64> = query_scalar("SELECT attempt FROM payment_attempts WHERE payment_id = $1 AND attempt = $2 AND first_sent_at IS NOT NULL AND outcome IS NULL")
                            .bind(DbId(l.held.payment.id))
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
                        let schedule: Option<DbId> = query_scalar("SELECT id FROM schedules WHERE id = $1")
                            .bind(DbId(found.schedule_id))
                            .fetch_optional(tx.conn())
                            .await
                            .map_err(db_err("reading a schedule"))?;
                        if schedule.is_some() {
                            return Ok(Reconciled::Unplanned);
                        }
                        insert_finding(&mut tx, found, crate::domain::reconcile::FindingKind::NoPayment, None, audit).await?;
                        Reconciled::Finding
                    }
                    (Decision::Finding(kind), l) => {
                        insert_finding(&mut tx, found, kind, l.as_ref().map(|l| l.held.payment.id), audit).await?;
                        Reconciled::Finding
                    }
                    (Decision::Record { .. }, None) => {
                        return Err(StoreError::Internal("reconcile decided to record onto a payment it did not find".into()));
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
                                    .bind(DbId(payment_id))
                                    .execute(tx.conn())
                                    .await
                                    .map_err(db_err("recording a reconciled success"))?;
                                l.held.payment.attempt = found.attempt;
                                l.held.payment.amount = Some(found.amount);
                                l.held.credit_applied = 0;
                                // The receipt and the allocations carry the moment the money moved.
                                let charged = Audit { actor: audit.actor.clone(), at: found.created_at };
                                settle_success(&mut tx, &l, PaymentState::Succeeded, &found.reference, &charged).await?;
                                PaymentState::Succeeded
                            }
                            Some(state) => {
                                let reason = format!(
                                    "reconcile: the processor declined attempt {} ({}) after the backup this database was restored from; retry it with `autopay payment retry` or resolve it",
                                    found.attempt, found.decline_code().unwrap_or("no code")
                                );
                                query("UPDATE payments SET state = $1, attempt = $2, amount = $3, credit_applied = 0, decline_code = $4, reason = $5, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $6 WHERE id = $7")
                                    .bind(state.as_str())
                                    .bind(found.attempt)
                                    .bind(found.amount.minor())
                                    .bind(found.decline_code())
                                    .bind(&reason)
                                    .bind(DbTime(audit.at))
                                    .bind(DbId(payment_id))
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

            async fn findings(&self, open_only: bool) -> Result<Vec<Finding>> {
                let filter = if open_only { " WHERE acknowledged_at IS NULL" } else { "" };
                let rows = query(sqlx::AssertSqlSafe(format!("SELECT {FINDING_COLS} FROM reconcile_findings{filter} ORDER BY charged_at, id")))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("reading findings"))?;
                rows.iter().map(finding_from).collect()
            }

            async fn acknowledge_finding(&self, id: Uuid, note: &str, audit: &Audit) -> Result<Finding> {
                let mut tx = self.begin_write().await?;
                let row = query(sqlx::AssertSqlSafe(format!("SELECT {FINDING_COLS} FROM reconcile_findings WHERE id = $1{}", <Db as Backend>::FOR_UPDATE)))
                    .bind(DbId(id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a finding"))?
                    .ok_or_else(|| StoreError::NotFound(format!("no finding has id {id}; list them with `autopay reconcile --findings`")))?;
                let finding = finding_from(&row)?;
                if let Some(at) = finding.acknowledged_at {
                    return Err(StoreError::Conflict(format!(
                        "finding {id} was acknowledged at {at} by {}; nothing changed", finding.acknowledged_by.as_deref().unwrap_or("someone")
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
                event(&mut tx, audit, "reconcile", id, "acknowledged", serde_json::json!({ "note": note })).await?;
                commit(tx).await?;
                Ok(Finding { acknowledged_at: Some(audit.at), acknowledged_by: Some(audit.actor.clone()), note: Some(note.to_string()), ..finding })
            }

            async fn webhook_seen(&self, id: &str) -> Result<bool> {
                let n: i64 = query_scalar("SELECT COUNT(*) FROM webhook_events WHERE id = $1")
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("reading webhook events"))?;
                Ok(n > 0)
            }

            async fn record_webhook(&self, id: &str, kind: &str, outcome: &str, at: Timestamp) -> Result<bool> {
                let mut tx = self.begin_write().await?;
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

            async fn settle_soon(&self, payment_id: Uuid, attempt: i64, at: Timestamp) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let moved = query("UPDATE payments SET next_attempt_at = $1 WHERE id = $2 AND attempt = $3 AND state = 'unknown' AND (next_attempt_at IS NULL OR next_attempt_at > $1)")
                    .bind(DbTime(at))
                    .bind(DbId(payment_id))
                    .bind(attempt)
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("bringing a lookup forward"))?
                    .rows_affected() > 0;
                if moved {
                    <Db as Backend>::wake_others(&mut tx).await?;
                }
                commit(tx).await?;
                Ok(moved)
            }

            async fn record_processor_event(&self, payment_id: Uuid, what: &str, detail: &serde_json::Value, action: crate::domain::dispute::DisputeAction, audit: &Audit) -> Result<()> {
                use crate::domain::dispute::{DisputeAction, member_reason};
                let mut tx = self.begin_write().await?;
                let Some((member, _, card)) = lock_owners(&mut tx, payment_id).await? else {
                    return Err(StoreError::NotFound(format!("no payment has id {payment_id}")));
                };
                event(&mut tx, audit, "payment", payment_id, what, detail.clone()).await?;
                match action {
                    DisputeAction::Record => {}
                    DisputeAction::DisableCard => disable_card(&mut tx, &card, member_reason(action), &member, audit).await?,
                    DisputeAction::SuspendSchedules => {
                        let schedules: Vec<DbId> = query_scalar("SELECT id FROM schedules WHERE payment_method_id = $1 AND status IN ('active', 'paused') ORDER BY id")
                            .bind(DbId(card.id))
                            .fetch_all(tx.conn())
                            .await
                            .map_err(db_err("reading the card's schedules"))?;
                        for s in schedules {
                            suspend_schedule(&mut tx, s.0, member_reason(action), &member, audit).await?;
                        }
                    }
                }
                commit(tx).await?;
                Ok(())
            }

        }
    };
}

pub(crate) use shared_store_impl;
