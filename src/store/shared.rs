//! What is left of the [`Store`](super::Store) implementation both backends share, stamped out
//! once per backend (`shared_store_impl!(sqlx::Sqlite)`) while it moves, an aggregate at a time,
//! into the generic code of [`super::sql`], which it calls. Everything that differs between
//! the backends is in [`super::sql::Backend`].

macro_rules! shared_store_impl {
    ($db:ty) => {


        use async_trait::async_trait;
        use jiff::Timestamp;
        use uuid::Uuid;

        use std::collections::BTreeMap;

        use crate::domain::attempt::ProcessorAttempt;
        use crate::domain::member::AccountNumber;
        use crate::domain::money::Money;
        use crate::domain::payment::PaymentState;
        use crate::sqltypes::{DbId, DbTime};
        use crate::store::*;
        use crate::store::sql::{commit, db_err, event, get, id, new_id, query, query_scalar, time};
        use crate::store::sql::control::*;
        use crate::store::sql::members::*;



        use crate::store::sql::{bills, cards, control, members, payments, reconcile, schedules};

        type Db = $db;
        type DbRow = <$db as sqlx::Database>::Row;

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

        #[async_trait]
        impl Store for SqlStore<$db> {
            async fn newest_attempt(&self) -> Result<Option<Timestamp>> {
                reconcile::newest_attempt(self).await
            }

            async fn known_keys(&self, keys: &[String]) -> Result<std::collections::HashSet<String>> {
                reconcile::known_keys(self, keys).await
            }

            async fn reconcile_attempt(&self, found: &ProcessorAttempt, last_try: bool, audit: &Audit) -> Result<Reconciled> {
                reconcile::reconcile_attempt(self, found, last_try, audit).await
            }

            async fn findings(&self, open_only: bool) -> Result<Vec<Finding>> {
                reconcile::findings(self, open_only).await
            }

            async fn acknowledge_finding(&self, id: Uuid, note: &str, audit: &Audit) -> Result<Finding> {
                reconcile::acknowledge_finding(self, id, note, audit).await
            }

            async fn migrate(&self, now: Timestamp) -> Result<MigrationReport> {
                control::migrate(self, now).await
            }

            async fn schema_state(&self) -> Result<SchemaState> {
                control::schema_state(self).await
            }

            async fn status(&self) -> Result<StatusReport> {
                control::status(self).await
            }

            async fn events(&self, entity_id: &str) -> Result<Vec<Event>> {
                control::events(self, entity_id).await
            }

            async fn set_charging_pause(&self, reason: Option<&str>, audit: &Audit) -> Result<Control> {
                control::set_charging_pause(self, reason, audit).await
            }

            async fn attempt_stats(&self, since: Timestamp) -> Result<AttemptStats> {
                control::attempt_stats(self, since).await
            }

            async fn record_job_run(&self, job: &str, worker: &str, at: Timestamp) -> Result<()> {
                control::record_job_run(self, job, worker, at).await
            }

            async fn activity(&self, now: Timestamp, since: Timestamp) -> Result<Activity> {
                control::activity(self, now, since).await
            }

            async fn database_clock(&self) -> Result<Option<Timestamp>> {
                control::database_clock(self).await
            }

            async fn prune_job_runs(&self, before: Timestamp) -> Result<u64> {
                control::prune_job_runs(self, before).await
            }

            async fn set_reconcile_mark(&self, since: Option<Timestamp>, audit: &Audit) -> Result<()> {
                control::set_reconcile_mark(self, since, audit).await
            }

            async fn webhook_seen(&self, id: &str) -> Result<bool> {
                control::webhook_seen(self, id).await
            }

            async fn record_webhook(&self, id: &str, kind: &str, outcome: &str, at: Timestamp) -> Result<bool> {
                control::record_webhook(self, id, kind, outcome, at).await
            }

            async fn control(&self) -> Result<Control> {
                control::control(self).await
            }

            async fn record_lookup(&self, lease: &Lease, answer: &LookupAnswer, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                payments::operator::record_lookup(self, lease, answer, by, policy, audit).await
            }

            async fn retry_payment(&self, payment_id: Uuid, force: bool, audit: &Audit) -> Result<Payment> {
                payments::operator::retry_payment(self, payment_id, force, audit).await
            }

            async fn take_for_operator(&self, payment_id: Uuid, lease: std::time::Duration, audit: &Audit) -> Result<Taken> {
                payments::operator::take_for_operator(self, payment_id, lease, audit).await
            }

            async fn give_back(&self, lease: &Lease) -> Result<bool> {
                payments::operator::give_back(self, lease).await
            }

            async fn resolve_payment(&self, resolve: &Resolve, audit: &Audit) -> Result<Payment> {
                payments::operator::resolve_payment(self, resolve, audit).await
            }

            async fn settle_soon(&self, payment_id: Uuid, attempt: i64, at: Timestamp) -> Result<bool> {
                payments::operator::settle_soon(self, payment_id, attempt, at).await
            }

            async fn record_processor_event(&self, payment_id: Uuid, what: &str, detail: &serde_json::Value, action: crate::domain::dispute::DisputeAction, audit: &Audit) -> Result<()> {
                payments::operator::record_processor_event(self, payment_id, what, detail, action, audit).await
            }

            async fn begin_attempt(&self, lease: &Lease, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                payments::attempt::begin_attempt(self, lease, policy, audit).await
            }

            async fn sent_attempt(&self, lease: &Lease) -> Result<Option<SentFacts>> {
                payments::attempt::sent_attempt(self, lease).await
            }

            async fn begin_resend(&self, lease: &Lease, by: Settler, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                payments::attempt::begin_resend(self, lease, by, policy, audit).await
            }

            async fn record_charge(&self, lease: &Lease, call: Option<Uuid>, answer: &Answer, policy: &OutcomePolicy, audit: &Audit) -> Result<Next> {
                payments::attempt::record_charge(self, lease, call, answer, policy, audit).await
            }

            async fn charge_steps(&self, steps: &[ChargeStep], policy: &OutcomePolicy) -> Result<Vec<Next>> {
                payments::attempt::charge_steps(self, steps, policy).await
            }

            async fn claim_work(&self, owner: &str, now: Timestamp, rules: &ClaimRules) -> Result<Vec<Work>> {
                payments::claim::claim_work(self, owner, now, rules).await
            }

            async fn renew_leases(&self, leases: &[Lease], until: Timestamp) -> Result<u64> {
                payments::claim::renew_leases(self, leases, until).await
            }

            async fn next_wakeup(&self) -> Result<Option<Timestamp>> {
                payments::claim::next_wakeup(self).await
            }

            async fn due_backlog(&self, now: Timestamp) -> Result<(i64, Option<Timestamp>)> {
                payments::claim::due_backlog(self, now).await
            }

            async fn payment(&self, payment_id: Uuid) -> Result<Payment> {
                payments::payment(self, payment_id).await
            }

            async fn list_payments(&self, member_id: Option<Uuid>, state: Option<PaymentState>) -> Result<Vec<Payment>> {
                payments::list_payments(self, member_id, state).await
            }

            async fn allocations(&self, payment_id: Uuid) -> Result<Vec<Allocation>> {
                payments::allocations(self, payment_id).await
            }

            async fn calls(&self, payment_id: Uuid) -> Result<Vec<Call>> {
                payments::calls(self, payment_id).await
            }

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

            async fn backup_into(&self, path: &std::path::Path, at: Timestamp) -> Result<()> {
                <Db as Backend>::backup_into(self, path, at).await
            }

        }
    };
}

pub(crate) use shared_store_impl;
