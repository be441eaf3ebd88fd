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

        use crate::domain::attempt::ProcessorAttempt;
        use crate::domain::member::AccountNumber;

        use crate::domain::money::Money;

        use crate::domain::payment::PaymentState;

        use crate::sqltypes::{DbId, DbTime};
        use crate::store::*;
        use crate::store::sql::{commit, currency,  db_err, event, execute_script, get, id, new_id, opt_time, parsed, query, query_as, query_scalar, time};


        use crate::store::sql::members::*;

        use crate::store::sql::payments::*;



        use crate::store::sql::payments::outcome::*;



        use crate::store::sql::{bills, cards, control, members, payments, schedules};

        type Db = $db;
        type DbRow = <$db as sqlx::Database>::Row;
        type Tx = crate::store::WriteTx<$db>;

        async fn counts(pool: &sqlx::Pool<$db>, sql: &'static str) -> Result<BTreeMap<String, i64>> {
            let rows = query(sql).fetch_all(pool).await.map_err(db_err("counting"))?;
            let mut out = BTreeMap::new();
            for row in rows {
                out.insert(get::<String>(&row, "status", "k")?, get::<i64>(&row, "status", "n")?);
            }
            Ok(out)
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

        #[async_trait]
        impl Store for SqlStore<$db> {
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

        }
    };
}

pub(crate) use shared_store_impl;
