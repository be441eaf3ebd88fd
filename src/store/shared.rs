//! The [`Store`](super::Store) implementation both backends share. The SQL is one text for both
//! dialects (`$N` placeholders, which SQLite also reads; columns typed through
//! [`super::types`]), so a macro stamps it out once per backend. Each backend supplies:
//! `self.pool`, `self.begin_write()` (SQLite: `BEGIN IMMEDIATE`), `Self::BACKEND`,
//! `Self::MIGRATIONS`, `Self::BOOTSTRAP`, and `Self::lock_for_migration(tx)`; the macro takes the
//! row-lock suffix (`" FOR UPDATE"` in PostgreSQL, nothing in SQLite, whose writer holds the
//! whole database).

macro_rules! shared_store_impl {
    ($store:ident, $db:ty, $for_update:literal, $skip_locked:literal) => {
        use std::collections::BTreeMap;

        use async_trait::async_trait;
        use jiff::Timestamp;
        use sqlx::Row;
        use uuid::Uuid;

        use crate::domain::card::{CardBrand, Last4};
        use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
        use crate::domain::money::{Currency, Money};
        use crate::domain::payment::{AmountRule, PaymentState};
        use crate::domain::schedule::{OccurrenceKey, Recurrence};
        use crate::domain::status::{BillStatus, CardStatus, MemberStatus, ScheduleStatus};
        use crate::store::types::{DbDate, DbId, DbTime};
        use crate::store::*;

        type DbRow = <$db as sqlx::Database>::Row;
        type Tx = crate::store::WriteTx<$db>;

        const MEMBER_COLS: &str = "id, account_number, account_type, name, email, time_zone, reminders, email_bouncing, processor_customer_id, status, created_at, updated_at";
        const CARD_COLS: &str = "id, member_id, processor, processor_token, brand, last4, exp_month, exp_year, status, status_reason, created_at";
        const BILL_COLS: &str = "id, member_id, reference, amount_due, amount_paid, currency, due_date, status, created_at, updated_at";
        const CREDIT_COLS: &str = "id, member_id, amount, remaining, currency, source, reason, created_at";
        const SCHEDULE_COLS: &str = "id, member_id, payment_method_id, kind, recurrence, amount_rule, fixed_amount, currency, time_zone, next_run_at, next_occurrence, status, status_reason, consecutive_failures, version, authorized_at, authorized_via, authorized_by, terms_version, cancelled_at, cancelled_by, created_at, updated_at";
        const PAYMENT_COLS: &str = "id, schedule_id, member_id, occurrence, due_at, amount, currency, state, attempt, payment_method_id, schedule_version, next_attempt_at, processor_reference, decline_code, reason, created_at, updated_at";

        fn db_err(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
            move |e| StoreError::from_sqlx(e, doing)
        }

        fn corrupt(table: &str, column: &str, e: impl std::fmt::Display) -> StoreError {
            StoreError::Internal(format!(
                "a stored {table} row has an unreadable {column} ({e}); the database was changed outside autopay"
            ))
        }

        fn get<'r, T>(row: &'r DbRow, table: &str, col: &str) -> Result<T>
        where
            T: sqlx::Decode<'r, $db> + sqlx::Type<$db>,
        {
            row.try_get::<T, _>(col).map_err(|e| corrupt(table, col, e))
        }

        fn parsed<T, E: std::fmt::Display>(
            table: &str,
            col: &str,
            r: std::result::Result<T, E>,
        ) -> Result<T> {
            r.map_err(|e| corrupt(table, col, e))
        }

        fn id(row: &DbRow, table: &str, col: &str) -> Result<Uuid> {
            Ok(get::<DbId>(row, table, col)?.0)
        }

        fn time(row: &DbRow, table: &str, col: &str) -> Result<Timestamp> {
            Ok(get::<DbTime>(row, table, col)?.0)
        }

        fn opt_time(row: &DbRow, table: &str, col: &str) -> Result<Option<Timestamp>> {
            Ok(get::<Option<DbTime>>(row, table, col)?.map(|t| t.0))
        }

        fn currency(row: &DbRow, table: &str) -> Result<Currency> {
            parsed(table, "currency", Currency::parse(&get::<String>(row, table, "currency")?))
        }

        fn member_from(row: &DbRow) -> Result<Member> {
            const T: &str = "members";
            Ok(Member {
                id: id(row, T, "id")?,
                account_number: parsed(T, "account_number", AccountNumber::parse(&get::<String>(row, T, "account_number")?))?,
                account_type: parsed(T, "account_type", get::<String>(row, T, "account_type")?.parse::<AccountType>())?,
                name: parsed(T, "name", MemberName::parse(&get::<String>(row, T, "name")?))?,
                email: parsed(T, "email", EmailAddress::parse(&get::<String>(row, T, "email")?))?,
                time_zone: get(row, T, "time_zone")?,
                reminders: get(row, T, "reminders")?,
                email_bouncing: get(row, T, "email_bouncing")?,
                processor_customer_id: get(row, T, "processor_customer_id")?,
                status: parsed(T, "status", get::<String>(row, T, "status")?.parse::<MemberStatus>())?,
                created_at: time(row, T, "created_at")?,
                updated_at: time(row, T, "updated_at")?,
            })
        }

        fn card_from(row: &DbRow) -> Result<Card> {
            const T: &str = "payment_methods";
            let month: i64 = get(row, T, "exp_month")?;
            let year: i64 = get(row, T, "exp_year")?;
            Ok(Card {
                id: id(row, T, "id")?,
                member_id: id(row, T, "member_id")?,
                processor: get(row, T, "processor")?,
                processor_token: get(row, T, "processor_token")?,
                brand: parsed(T, "brand", get::<String>(row, T, "brand")?.parse::<CardBrand>())?,
                last4: parsed(T, "last4", Last4::parse(&get::<String>(row, T, "last4")?))?,
                exp_month: parsed(T, "exp_month", u8::try_from(month))?,
                exp_year: parsed(T, "exp_year", u16::try_from(year))?,
                status: parsed(T, "status", get::<String>(row, T, "status")?.parse::<CardStatus>())?,
                status_reason: get(row, T, "status_reason")?,
                created_at: time(row, T, "created_at")?,
            })
        }

        fn bill_from(row: &DbRow) -> Result<Bill> {
            const T: &str = "bills";
            let cur = currency(row, T)?;
            Ok(Bill {
                id: id(row, T, "id")?,
                member_id: id(row, T, "member_id")?,
                reference: get(row, T, "reference")?,
                amount_due: Money::from_minor(get(row, T, "amount_due")?, cur),
                amount_paid: Money::from_minor(get(row, T, "amount_paid")?, cur),
                currency: cur,
                due_date: get::<DbDate>(row, T, "due_date")?.0,
                status: parsed(T, "status", get::<String>(row, T, "status")?.parse::<BillStatus>())?,
                created_at: time(row, T, "created_at")?,
                updated_at: time(row, T, "updated_at")?,
            })
        }

        fn credit_from(row: &DbRow) -> Result<Credit> {
            const T: &str = "credits";
            let cur = currency(row, T)?;
            Ok(Credit {
                id: id(row, T, "id")?,
                member_id: id(row, T, "member_id")?,
                amount: Money::from_minor(get(row, T, "amount")?, cur),
                remaining: Money::from_minor(get(row, T, "remaining")?, cur),
                currency: cur,
                source: get(row, T, "source")?,
                reason: get(row, T, "reason")?,
                created_at: time(row, T, "created_at")?,
            })
        }

        fn schedule_from(row: &DbRow) -> Result<Schedule> {
            const T: &str = "schedules";
            let cur = currency(row, T)?;
            let recurrence: Recurrence = parsed(T, "recurrence", serde_json::from_str(&get::<String>(row, T, "recurrence")?))?;
            let amount = match get::<String>(row, T, "amount_rule")?.as_str() {
                "balance" => AmountRule::Balance,
                _ => AmountRule::Fixed {
                    amount: Money::from_minor(
                        get::<Option<i64>>(row, T, "fixed_amount")?.ok_or_else(|| corrupt(T, "fixed_amount", "missing"))?,
                        cur,
                    ),
                },
            };
            Ok(Schedule {
                id: id(row, T, "id")?,
                member_id: id(row, T, "member_id")?,
                card_id: id(row, T, "payment_method_id")?,
                kind: parsed(T, "kind", get::<String>(row, T, "kind")?.parse())?,
                recurrence,
                amount,
                currency: cur,
                time_zone: get(row, T, "time_zone")?,
                next_run_at: opt_time(row, T, "next_run_at")?,
                next_occurrence: match get::<Option<String>>(row, T, "next_occurrence")? {
                    Some(s) => Some(parsed(T, "next_occurrence", s.parse::<OccurrenceKey>())?),
                    None => None,
                },
                status: parsed(T, "status", get::<String>(row, T, "status")?.parse::<ScheduleStatus>())?,
                status_reason: get(row, T, "status_reason")?,
                consecutive_failures: get(row, T, "consecutive_failures")?,
                version: get(row, T, "version")?,
                authorized_at: time(row, T, "authorized_at")?,
                authorized_via: parsed(T, "authorized_via", get::<String>(row, T, "authorized_via")?.parse())?,
                authorized_by: get(row, T, "authorized_by")?,
                terms_version: get(row, T, "terms_version")?,
                cancelled_at: opt_time(row, T, "cancelled_at")?,
                cancelled_by: get(row, T, "cancelled_by")?,
                created_at: time(row, T, "created_at")?,
                updated_at: time(row, T, "updated_at")?,
            })
        }

        fn payment_from(row: &DbRow) -> Result<Payment> {
            const T: &str = "payments";
            let cur = currency(row, T)?;
            Ok(Payment {
                id: id(row, T, "id")?,
                schedule_id: id(row, T, "schedule_id")?,
                member_id: id(row, T, "member_id")?,
                occurrence: get(row, T, "occurrence")?,
                due_at: time(row, T, "due_at")?,
                amount: get::<Option<i64>>(row, T, "amount")?.map(|m| Money::from_minor(m, cur)),
                currency: cur,
                state: parsed(T, "state", get::<String>(row, T, "state")?.parse::<PaymentState>())?,
                attempt: get(row, T, "attempt")?,
                card_id: id(row, T, "payment_method_id")?,
                schedule_version: get(row, T, "schedule_version")?,
                next_attempt_at: opt_time(row, T, "next_attempt_at")?,
                processor_reference: get(row, T, "processor_reference")?,
                decline_code: get(row, T, "decline_code")?,
                reason: get(row, T, "reason")?,
                created_at: time(row, T, "created_at")?,
                updated_at: time(row, T, "updated_at")?,
            })
        }

        fn new_id() -> Uuid {
            Uuid::now_v7()
        }

        async fn event(
            tx: &mut Tx,
            audit: &Audit,
            entity: &str,
            entity_id: Uuid,
            action: &str,
            detail: serde_json::Value,
        ) -> Result<()> {
            sqlx::query("INSERT INTO events (id, at, actor, entity, entity_id, action, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(DbId(new_id()))
                .bind(DbTime(audit.at))
                .bind(&audit.actor)
                .bind(entity)
                .bind(entity_id.to_string())
                .bind(action)
                .bind(sqlx::types::Json(detail))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording the audit event"))?;
            Ok(())
        }

        async fn commit(tx: Tx) -> Result<()> {
            tx.commit().await.map_err(db_err("committing"))
        }

        async fn member_in(tx: &mut Tx, account: &AccountNumber) -> Result<Member> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MEMBER_COLS} FROM members WHERE account_number = $1{}", $for_update)))
                .bind(account.as_str())
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading a member"))?;
            match row {
                Some(row) => member_from(&row),
                None => Err(member_not_found(account)),
            }
        }

        fn member_not_found(account: &AccountNumber) -> StoreError {
            StoreError::NotFound(format!(
                "no member has account number {}; check it with `autopay member list`",
                account.masked()
            ))
        }

        async fn card_in(tx: &mut Tx, card_id: Uuid) -> Result<Card> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {CARD_COLS} FROM payment_methods WHERE id = $1{}", $for_update)))
                .bind(DbId(card_id))
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading a card"))?;
            match row {
                Some(row) => card_from(&row),
                None => Err(card_not_found(card_id)),
            }
        }

        fn card_not_found(id: Uuid) -> StoreError {
            StoreError::NotFound(format!(
                "no card has id {id}; list a member's cards with `autopay card list --account N`"
            ))
        }

        async fn bill_in(tx: &mut Tx, bill_id: Uuid) -> Result<Bill> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {BILL_COLS} FROM bills WHERE id = $1{}", $for_update)))
                .bind(DbId(bill_id))
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading a bill"))?;
            match row {
                Some(row) => bill_from(&row),
                None => Err(StoreError::NotFound(format!(
                    "no bill has id {bill_id}; list bills with `autopay bill list`"
                ))),
            }
        }

        async fn schedule_in(tx: &mut Tx, schedule_id: Uuid) -> Result<Schedule> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE id = $1{}", $for_update)))
                .bind(DbId(schedule_id))
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading a schedule"))?;
            match row {
                Some(row) => schedule_from(&row),
                None => Err(schedule_not_found(schedule_id)),
            }
        }

        fn schedule_not_found(id: Uuid) -> StoreError {
            StoreError::NotFound(format!(
                "no schedule has id {id}; list schedules with `autopay schedule list`"
            ))
        }

        /// Cancels a schedule's payments that no worker holds (design.md's cancellation
        /// triggers). `unknown` and `processing` payments are left to be settled.
        async fn cancel_unclaimed(tx: &mut Tx, schedule_id: Uuid, reason: &str, at: Timestamp) -> Result<u64> {
            let done = sqlx::query("UPDATE payments SET state = 'cancelled', reason = $1, next_attempt_at = NULL, updated_at = $2 WHERE schedule_id = $3 AND state IN ('scheduled', 'retry_wait')")
                .bind(reason)
                .bind(DbTime(at))
                .bind(DbId(schedule_id))
                .execute(tx.conn())
                .await
                .map_err(db_err("cancelling unclaimed payments"))?;
            Ok(done.rows_affected())
        }

        async fn insert_credit(
            tx: &mut Tx,
            member_id: Uuid,
            amount: Money,
            source: &str,
            source_id: Uuid,
            reason: &str,
            audit: &Audit,
        ) -> Result<Credit> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO credits (id, member_id, amount, remaining, currency, source, source_id, reason, created_at, updated_at) VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $8) RETURNING {CREDIT_COLS}"
            )))
            .bind(DbId(new_id()))
            .bind(DbId(member_id))
            .bind(amount.minor())
            .bind(amount.currency().code())
            .bind(source)
            .bind(source_id.to_string())
            .bind(reason)
            .bind(DbTime(audit.at))
            .fetch_one(tx.conn())
            .await
            .map_err(db_err("recording a credit"))?;
            let credit = credit_from(&row)?;
            event(tx, audit, "credit", credit.id, "created", serde_json::json!({
                "amount": amount.amount_string(), "currency": amount.currency().code(), "source": source, "source_id": source_id,
            })).await?;
            Ok(credit)
        }

        async fn update_bill_amounts(tx: &mut Tx, bill: &Bill, amount_due: i64, amount_paid: i64, status: BillStatus, at: Timestamp) -> Result<Bill> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE bills SET amount_due = $1, amount_paid = $2, status = $3, updated_at = $4 WHERE id = $5 RETURNING {BILL_COLS}"
            )))
            .bind(amount_due)
            .bind(amount_paid)
            .bind(status.as_str())
            .bind(DbTime(at))
            .bind(DbId(bill.id))
            .fetch_one(tx.conn())
            .await
            .map_err(db_err("updating a bill"))?;
            bill_from(&row)
        }

        fn is_unique_violation(e: &sqlx::Error) -> bool {
            matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
        }

        async fn counts(pool: &sqlx::Pool<$db>, sql: &'static str) -> Result<BTreeMap<String, i64>> {
            let rows = sqlx::query(sql).fetch_all(pool).await.map_err(db_err("counting"))?;
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

        /// Writes an outbox row in the caller's transaction; a second row with the same dedupe
        /// key is a no-op (the member hears once).
        async fn notify(
            tx: &mut Tx,
            kind: &str,
            dedupe_key: &str,
            member: &Member,
            payload: serde_json::Value,
            at: Timestamp,
        ) -> Result<()> {
            sqlx::query("INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, attempts, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7) ON CONFLICT (dedupe_key) DO NOTHING")
                .bind(DbId(new_id()))
                .bind(kind)
                .bind(dedupe_key)
                .bind(DbId(member.id))
                .bind(member.email.as_str())
                .bind(sqlx::types::Json(payload))
                .bind(DbTime(at))
                .execute(tx.conn())
                .await
                .map_err(db_err("writing a notification"))?;
            Ok(())
        }

        async fn member_by_id_in(tx: &mut Tx, member_id: Uuid) -> Result<Member> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MEMBER_COLS} FROM members WHERE id = $1{}", $for_update)))
                .bind(DbId(member_id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("reading a member"))?;
            member_from(&row)
        }

        /// A payment with the engine's bookkeeping that `Payment` does not show.
        struct Held {
            payment: Payment,
            credit_applied: i64,
            unknown_since: Option<Timestamp>,
        }

        fn held_from(row: &DbRow) -> Result<Held> {
            Ok(Held {
                payment: payment_from(row)?,
                credit_applied: get(row, "payments", "credit_applied")?,
                unknown_since: opt_time(row, "payments", "unknown_since")?,
            })
        }

        /// The payment if this lease still holds it in one of `states`.
        async fn leased_payment(tx: &mut Tx, lease: &Lease, states: &'static str) -> Result<Option<Held>> {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PAYMENT_COLS}, credit_applied, unknown_since FROM payments WHERE id = $1 AND lease_token = $2 AND state IN ({states}){}", $for_update
            )))
            .bind(DbId(lease.payment_id))
            .bind(lease.token.to_string())
            .fetch_optional(tx.conn())
            .await
            .map_err(db_err("reading a claimed payment"))?;
            row.as_ref().map(held_from).transpose()
        }

        fn idempotency_key(installation: Uuid, payment: &Payment, attempt: i64) -> String {
            format!("autopay:{installation}:{}:{}:{attempt}", payment.schedule_id, payment.occurrence)
        }

        /// One summed amount; `ids` bind to `$1`, `$2`, ... in order.
        async fn sum(tx: &mut Tx, sql: &'static str, ids: &[Uuid]) -> Result<i64> {
            let mut query = sqlx::query_scalar(sql);
            for id in ids {
                query = query.bind(DbId(*id));
            }
            let v: Option<i64> = query
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("summing balances"))?;
            Ok(v.unwrap_or(0))
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
            sqlx::query("UPDATE payments SET state = $1, reason = $2, amount = $3, decline_code = COALESCE($4, decline_code), credit_applied = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $5 WHERE id = $6")
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

        /// Uses up to `amount` of the member's credits, oldest first, recording each use as an
        /// allocation of this payment.
        async fn consume_credits(tx: &mut Tx, payment: &Payment, amount: i64, at: Timestamp) -> Result<()> {
            if amount <= 0 {
                return Ok(());
            }
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, remaining FROM credits WHERE member_id = $1 AND remaining > 0 ORDER BY created_at, id{}", $for_update
            )))
            .bind(DbId(payment.member_id))
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("reading credits"))?;
            let mut left = amount;
            for row in rows {
                if left == 0 {
                    break;
                }
                let credit_id = id(&row, "credits", "id")?;
                let remaining: i64 = get(&row, "credits", "remaining")?;
                let used = remaining.min(left);
                left -= used;
                sqlx::query("UPDATE credits SET remaining = remaining - $1, updated_at = $2 WHERE id = $3")
                    .bind(used)
                    .bind(DbTime(at))
                    .bind(DbId(credit_id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("using a credit"))?;
                sqlx::query("INSERT INTO payment_allocations (id, payment_id, bill_id, credit_id, amount, currency, created_at) VALUES ($1, $2, NULL, $3, $4, $5, $6)")
                    .bind(DbId(new_id()))
                    .bind(DbId(payment.id))
                    .bind(DbId(credit_id))
                    .bind(used)
                    .bind(payment.currency.code())
                    .bind(DbTime(at))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("recording a credit's use"))?;
            }
            Ok(())
        }

        /// Pays open bills oldest first with `value`; returns what each bill got and what was
        /// left over. Never refuses: an overpayment is returned for the caller to credit.
        async fn pay_bills(tx: &mut Tx, payment: &Payment, value: i64, at: Timestamp) -> Result<(Vec<serde_json::Value>, i64)> {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {BILL_COLS} FROM bills WHERE member_id = $1 AND status = 'open' ORDER BY due_date, created_at, id{}", $for_update
            )))
            .bind(DbId(payment.member_id))
            .fetch_all(tx.conn())
            .await
            .map_err(db_err("reading open bills"))?;
            let mut left = value;
            let mut paid = Vec::new();
            for row in rows {
                if left <= 0 {
                    break;
                }
                let bill = bill_from(&row)?;
                let owed = bill.outstanding().minor();
                if owed <= 0 {
                    continue;
                }
                let applied = owed.min(left);
                left -= applied;
                let new_paid = bill.amount_paid.minor() + applied;
                let status = if new_paid >= bill.amount_due.minor() { BillStatus::Paid } else { BillStatus::Open };
                update_bill_amounts(tx, &bill, bill.amount_due.minor(), new_paid, status, at).await?;
                sqlx::query("INSERT INTO payment_allocations (id, payment_id, bill_id, credit_id, amount, currency, created_at) VALUES ($1, $2, $3, NULL, $4, $5, $6)")
                    .bind(DbId(new_id()))
                    .bind(DbId(payment.id))
                    .bind(DbId(bill.id))
                    .bind(applied)
                    .bind(payment.currency.code())
                    .bind(DbTime(at))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("recording an allocation"))?;
                paid.push(serde_json::json!({
                    "bill_id": bill.id, "reference": bill.reference,
                    "amount": Money::from_minor(applied, payment.currency).amount_string(),
                }));
            }
            Ok((paid, left))
        }

        /// A charge that happened: the payment succeeds, its value pays bills oldest first
        /// (credits it used included), anything beyond what was owed becomes a credit, and the
        /// member gets a receipt. Nothing here can refuse: the money has moved.
        async fn settle_success(tx: &mut Tx, payment: &Payment, credit_applied: i64, reference: &str, audit: &Audit) -> Result<()> {
            let amount = payment.amount.map_or(0, |m| m.minor());
            sqlx::query("UPDATE payments SET state = 'succeeded', processor_reference = $1, decline_code = NULL, reason = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $2 WHERE id = $3")
                .bind(reference)
                .bind(DbTime(audit.at))
                .bind(DbId(payment.id))
                .execute(tx.conn())
                .await
                .map_err(db_err("recording a success"))?;
            consume_credits(tx, payment, credit_applied, audit.at).await?;
            let (bills, left) = pay_bills(tx, payment, amount + credit_applied, audit.at).await?;
            if left > 0 {
                insert_credit(tx, payment.member_id, Money::from_minor(left, payment.currency), "overpayment", payment.id, "paid beyond what was owed", audit).await?;
            }
            sqlx::query("UPDATE schedules SET consecutive_failures = 0 WHERE id = $1")
                .bind(DbId(payment.schedule_id))
                .execute(tx.conn())
                .await
                .map_err(db_err("resetting failures"))?;
            let member = member_by_id_in(tx, payment.member_id).await?;
            let card = card_in(tx, payment.card_id).await?;
            let schedule = schedule_in(tx, payment.schedule_id).await?;
            notify(tx, "receipt", &format!("receipt:{}", payment.id), &member, serde_json::json!({
                "payment_id": payment.id, "schedule_id": payment.schedule_id, "member_name": member.name.as_str(),
                "account_type": member.account_type.as_str(),
                "amount": Money::from_minor(amount, payment.currency).amount_string(), "currency": payment.currency.code(),
                "credit_used": Money::from_minor(credit_applied, payment.currency).amount_string(),
                "charged_at": audit.at, "card": card.label(), "confirmation": reference, "bills": bills,
                "next_payment_at": schedule.next_run_at, "time_zone": schedule.time_zone,
            }), audit.at).await?;
            event(tx, audit, "payment", payment.id, "succeeded", serde_json::json!({
                "attempt": payment.attempt, "reference": reference, "amount": Money::from_minor(amount, payment.currency).amount_string(),
            })).await
        }

        /// A payment that failed counts against its schedule; enough in a row suspend it.
        async fn count_failure(tx: &mut Tx, payment: &Payment, suspend_after: u32, member: &Member, audit: &Audit) -> Result<()> {
            let failures: i64 = sqlx::query_scalar("UPDATE schedules SET consecutive_failures = consecutive_failures + 1 WHERE id = $1 RETURNING consecutive_failures")
                .bind(DbId(payment.schedule_id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("counting failures"))?;
            if crate::domain::decline::suspends(u32::try_from(failures).unwrap_or(u32::MAX), suspend_after) {
                suspend_schedule(tx, payment.schedule_id, &format!("{failures} payments failed in a row"), member, audit).await?;
            }
            Ok(())
        }

        async fn suspend_schedule(tx: &mut Tx, schedule_id: Uuid, reason: &str, member: &Member, audit: &Audit) -> Result<()> {
            let version: Option<i64> = sqlx::query_scalar("UPDATE schedules SET status = 'suspended', status_reason = $1, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $2 WHERE id = $3 AND status IN ('active', 'paused') RETURNING version")
                .bind(reason)
                .bind(DbTime(audit.at))
                .bind(DbId(schedule_id))
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("suspending a schedule"))?;
            let Some(version) = version else { return Ok(()) };
            let cancelled = cancel_unclaimed(tx, schedule_id, "schedule suspended", audit.at).await?;
            event(tx, audit, "schedule", schedule_id, "suspended", serde_json::json!({ "reason": reason, "cancelled_payments": cancelled })).await?;
            notify(tx, "schedule_suspended", &format!("suspended:{schedule_id}:{version}"), member, serde_json::json!({
                "schedule_id": schedule_id, "member_name": member.name.as_str(), "account_type": member.account_type.as_str(), "reason": reason,
            }), audit.at).await
        }

        /// A card that must not be tried again: disabled, every schedule using it suspended,
        /// the member told.
        async fn disable_card(tx: &mut Tx, card_id: Uuid, reason: &str, member: &Member, audit: &Audit) -> Result<()> {
            let changed = sqlx::query("UPDATE payment_methods SET status = 'disabled', status_reason = $1, updated_at = $2 WHERE id = $3 AND status = 'active'")
                .bind(reason)
                .bind(DbTime(audit.at))
                .bind(DbId(card_id))
                .execute(tx.conn())
                .await
                .map_err(db_err("disabling a card"))?
                .rows_affected();
            if changed == 0 {
                return Ok(());
            }
            let card = card_in(tx, card_id).await?;
            event(tx, audit, "card", card_id, "disabled", serde_json::json!({ "reason": reason })).await?;
            let schedules: Vec<DbId> = sqlx::query_scalar("SELECT id FROM schedules WHERE payment_method_id = $1 AND status IN ('active', 'paused') ORDER BY id")
                .bind(DbId(card_id))
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("reading the card's schedules"))?;
            for s in &schedules {
                suspend_schedule(tx, s.0, "the card can no longer be charged", member, audit).await?;
            }
            notify(tx, "card_disabled", &format!("card_disabled:{card_id}"), member, serde_json::json!({
                "card_id": card_id, "card": card.label(), "member_name": member.name.as_str(),
                "account_type": member.account_type.as_str(), "reason": reason,
                "suspended_schedules": schedules.iter().map(|s| s.0).collect::<Vec<_>>(),
            }), audit.at).await
        }

        async fn finish_attempt_row(tx: &mut Tx, payment: &Payment, outcome: &str, code: Option<&str>, reference: Option<&str>, at: Timestamp) -> Result<()> {
            sqlx::query("UPDATE payment_attempts SET outcome = $1, decline_code = $2, processor_reference = $3, finished_at = $4 WHERE payment_id = $5 AND attempt = $6")
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

        fn amount_words(amount: &AmountRule) -> String {
            match amount {
                AmountRule::Fixed { amount } => amount.display_with_code(),
                AmountRule::Balance => "your statement balance".to_string(),
            }
        }

        /// Tells the member about a change to their automatic payments, in the change's own
        /// transaction.
        async fn confirm_schedule(tx: &mut Tx, kind: &str, dedupe_key: String, schedule: &Schedule, extra: serde_json::Value, at: Timestamp) -> Result<()> {
            let member = member_by_id_in(tx, schedule.member_id).await?;
            let card = card_in(tx, schedule.card_id).await?;
            let mut payload = serde_json::json!({
                "schedule_id": schedule.id, "member_name": member.name.as_str(), "account_type": member.account_type.as_str(),
                "rule": schedule.recurrence.describe(), "amount": amount_words(&schedule.amount), "card": card.label(),
                "time_zone": schedule.time_zone, "at": at, "next_payment_at": schedule.next_run_at,
            });
            if let (Some(p), serde_json::Value::Object(e)) = (payload.as_object_mut(), extra) {
                p.extend(e);
            }
            notify(tx, kind, &dedupe_key, &member, payload, at).await
        }

        fn decline_payload(payment: &Payment, member: &Member, card: &Card, code: &str, reason: &str, next_try: Option<Timestamp>, time_zone: &str) -> serde_json::Value {
            serde_json::json!({
                "payment_id": payment.id, "schedule_id": payment.schedule_id, "member_name": member.name.as_str(),
                "account_type": member.account_type.as_str(),
                "amount": payment.amount.map(|m| m.amount_string()), "currency": payment.currency.code(),
                "card": card.label(), "decline_code": code, "reason": reason, "attempt": payment.attempt,
                "next_try_at": next_try, "time_zone": time_zone,
            })
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> crate::config::Backend {
                Self::BACKEND
            }

            async fn migrate(&self, now: Timestamp) -> Result<MigrationReport> {
                let mut tx = self.begin_write().await?;
                Self::lock_for_migration(&mut tx).await?;
                sqlx::raw_sql(Self::BOOTSTRAP).execute(tx.conn()).await.map_err(db_err("creating the migrations table"))?;
                let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("reading applied migrations"))?;
                let mut applied = Vec::new();
                for (version, name, sql) in Self::MIGRATIONS {
                    if done.contains(version) {
                        continue;
                    }
                    sqlx::raw_sql(*sql).execute(tx.conn()).await.map_err(|e| {
                        StoreError::Schema(format!("migration {version} ({name}) failed: {e}; nothing was changed"))
                    })?;
                    sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                        .bind(*version)
                        .bind(*name)
                        .bind(DbTime(now))
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("recording a migration"))?;
                    applied.push(format!("{version:04}_{name}"));
                }
                let existing: Option<DbId> = sqlx::query_scalar("SELECT installation_id FROM control WHERE id = 1")
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading the installation id"))?;
                let installation_id = match existing {
                    Some(id) => id.0,
                    None => {
                        let id = Uuid::now_v7();
                        sqlx::query("INSERT INTO control (id, installation_id, min_binary_schema, created_at) VALUES (1, $1, $2, $3)")
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
                let applied: Option<i64> = match sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
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
                    sqlx::query_scalar::<_, i64>("SELECT min_binary_schema FROM control WHERE id = 1")
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db_err("reading control"))?
                        .unwrap_or(0)
                };
                Ok(SchemaState { applied, min_binary })
            }

            async fn control(&self) -> Result<Control> {
                let row = sqlx::query("SELECT installation_id, min_binary_schema, charging_paused_at, charging_paused_by, charging_paused_reason, mail_paused_at, mail_paused_reason, reconcile_required_since FROM control WHERE id = 1")
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
                let members_bouncing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM members WHERE email_bouncing = TRUE")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("counting"))?;
                Ok(StatusReport {
                    backend: format!("{:?}", Self::BACKEND).to_lowercase(),
                    schema_version: self.schema_state().await?.applied,
                    control,
                    members: counts(&self.pool, "SELECT status AS k, COUNT(*) AS n FROM members GROUP BY status").await?,
                    schedules: counts(&self.pool, "SELECT status AS k, COUNT(*) AS n FROM schedules GROUP BY status").await?,
                    payments: counts(&self.pool, "SELECT state AS k, COUNT(*) AS n FROM payments GROUP BY state").await?,
                    bills: counts(&self.pool, "SELECT status AS k, COUNT(*) AS n FROM bills GROUP BY status").await?,
                    notifications: counts(&self.pool, "SELECT state AS k, COUNT(*) AS n FROM notifications GROUP BY state").await?,
                    members_bouncing,
                })
            }

            async fn add_member(&self, new: &NewMember, audit: &Audit) -> Result<Member> {
                let mut tx = self.begin_write().await?;
                let member_id = new_id();
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO members (id, account_number, account_type, name, email, time_zone, reminders, email_bouncing, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, TRUE, FALSE, 'active', $7, $7) RETURNING {MEMBER_COLS}"
                )))
                .bind(DbId(member_id))
                .bind(new.account_number.as_str())
                .bind(new.account_type.as_str())
                .bind(new.name.as_str())
                .bind(new.email.as_str())
                .bind(&new.time_zone)
                .bind(DbTime(audit.at))
                .fetch_one(tx.conn())
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict(format!(
                            "a member with account number {} already exists; change it with `autopay member update`",
                            new.account_number.masked()
                        ))
                    } else {
                        StoreError::from_sqlx(e, "adding a member")
                    }
                })?;
                let member = member_from(&row)?;
                event(&mut tx, audit, "member", member.id, "added", serde_json::json!({
                    "account_type": new.account_type.as_str(), "time_zone": new.time_zone,
                })).await?;
                commit(tx).await?;
                Ok(member)
            }

            async fn member(&self, account: &AccountNumber) -> Result<Member> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MEMBER_COLS} FROM members WHERE account_number = $1")))
                    .bind(account.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a member"))?;
                match row {
                    Some(row) => member_from(&row),
                    None => Err(member_not_found(account)),
                }
            }

            async fn member_by_id(&self, member_id: Uuid) -> Result<Member> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MEMBER_COLS} FROM members WHERE id = $1")))
                    .bind(DbId(member_id))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a member"))?;
                match row {
                    Some(row) => member_from(&row),
                    None => Err(StoreError::NotFound(format!("no member has id {member_id}"))),
                }
            }

            async fn list_members(&self) -> Result<Vec<Member>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MEMBER_COLS} FROM members ORDER BY account_number")))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing members"))?
                    .iter()
                    .map(member_from)
                    .collect()
            }

            async fn update_member(&self, account: &AccountNumber, change: &MemberChange, audit: &Audit) -> Result<Member> {
                let mut tx = self.begin_write().await?;
                let member = member_in(&mut tx, account).await?;
                if member.status == MemberStatus::Closed {
                    return Err(StoreError::Conflict(format!(
                        "member {} is closed; a closed member cannot be changed", member.id
                    )));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE members SET name = $1, email = $2, time_zone = $3, reminders = $4, email_bouncing = $5, updated_at = $6 WHERE id = $7 RETURNING {MEMBER_COLS}"
                )))
                .bind(change.name.as_ref().unwrap_or(&member.name).as_str())
                .bind(change.email.as_ref().unwrap_or(&member.email).as_str())
                .bind(change.time_zone.as_ref().unwrap_or(&member.time_zone))
                .bind(change.reminders.unwrap_or(member.reminders))
                // A new address is a fresh chance to deliver.
                .bind(if change.email.is_some() { false } else { member.email_bouncing })
                .bind(DbTime(audit.at))
                .bind(DbId(member.id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("updating a member"))?;
                let updated = member_from(&row)?;
                let mut changed = Vec::new();
                if change.name.is_some() { changed.push("name"); }
                if change.email.is_some() { changed.push("email"); }
                if change.time_zone.is_some() { changed.push("time_zone"); }
                if change.reminders.is_some() { changed.push("reminders"); }
                event(&mut tx, audit, "member", member.id, "updated", serde_json::json!({ "fields": changed })).await?;
                commit(tx).await?;
                Ok(updated)
            }

            async fn close_member(&self, account: &AccountNumber, audit: &Audit) -> Result<ClosedMember> {
                let mut tx = self.begin_write().await?;
                let member = member_in(&mut tx, account).await?;
                if member.status == MemberStatus::Closed {
                    return Err(StoreError::Conflict(format!("member {} is already closed", member.id)));
                }
                let live: Vec<DbId> = sqlx::query_scalar("SELECT id FROM schedules WHERE member_id = $1 AND status IN ('active', 'paused', 'suspended') ORDER BY id")
                    .bind(DbId(member.id))
                    .fetch_all(tx.conn())
                    .await
                    .map_err(db_err("reading the member's schedules"))?;
                let mut cancelled_payments = 0;
                for schedule_id in &live {
                    sqlx::query("UPDATE schedules SET status = 'cancelled', status_reason = 'member closed', cancelled_at = $1, cancelled_by = $2, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $3")
                        .bind(DbTime(audit.at))
                        .bind(&audit.actor)
                        .bind(*schedule_id)
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("cancelling a schedule"))?;
                    cancelled_payments += cancel_unclaimed(&mut tx, schedule_id.0, "member closed", audit.at).await?;
                    let ended = schedule_in(&mut tx, schedule_id.0).await?;
                    confirm_schedule(&mut tx, "cancelled", format!("cancelled:{}", ended.id), &ended, serde_json::json!({}), audit.at).await?;
                    event(&mut tx, audit, "schedule", schedule_id.0, "cancelled", serde_json::json!({ "reason": "member closed" })).await?;
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE members SET status = 'closed', updated_at = $1 WHERE id = $2 RETURNING {MEMBER_COLS}")))
                    .bind(DbTime(audit.at))
                    .bind(DbId(member.id))
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("closing a member"))?;
                let closed = member_from(&row)?;
                let cancelled_schedules: Vec<Uuid> = live.into_iter().map(|i| i.0).collect();
                event(&mut tx, audit, "member", member.id, "closed", serde_json::json!({
                    "cancelled_schedules": cancelled_schedules, "cancelled_payments": cancelled_payments,
                })).await?;
                commit(tx).await?;
                Ok(ClosedMember { member: closed, cancelled_schedules, cancelled_payments })
            }

            async fn add_card(&self, new: &NewCard, audit: &Audit) -> Result<Card> {
                let mut tx = self.begin_write().await?;
                let status: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT status FROM members WHERE id = $1{}", $for_update)))
                    .bind(DbId(new.member_id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a member"))?;
                match status.as_deref() {
                    None => return Err(StoreError::NotFound(format!("no member has id {}", new.member_id))),
                    Some("active") => {}
                    Some(_) => return Err(StoreError::Conflict(format!("member {} is closed; a closed member cannot add cards", new.member_id))),
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO payment_methods (id, member_id, processor, processor_token, brand, last4, exp_month, exp_year, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', $9, $9) RETURNING {CARD_COLS}"
                )))
                .bind(DbId(new_id()))
                .bind(DbId(new.member_id))
                .bind(&new.processor)
                .bind(&new.processor_token)
                .bind(new.brand.as_str())
                .bind(new.last4.as_str())
                .bind(i64::from(new.expiry.month()))
                .bind(i64::from(new.expiry.year()))
                .bind(DbTime(audit.at))
                .fetch_one(tx.conn())
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict("this member already has this card; see `autopay card list`".into())
                    } else {
                        StoreError::from_sqlx(e, "adding a card")
                    }
                })?;
                let card = card_from(&row)?;
                event(&mut tx, audit, "card", card.id, "added", serde_json::json!({
                    "member_id": new.member_id, "brand": new.brand.as_str(), "last4": new.last4.as_str(),
                })).await?;
                commit(tx).await?;
                Ok(card)
            }

            async fn card(&self, card_id: Uuid) -> Result<Card> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {CARD_COLS} FROM payment_methods WHERE id = $1")))
                    .bind(DbId(card_id))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a card"))?;
                match row {
                    Some(row) => card_from(&row),
                    None => Err(card_not_found(card_id)),
                }
            }

            async fn list_cards(&self, member_id: Uuid) -> Result<Vec<Card>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {CARD_COLS} FROM payment_methods WHERE member_id = $1 ORDER BY created_at, id")))
                    .bind(DbId(member_id))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing cards"))?
                    .iter()
                    .map(card_from)
                    .collect()
            }

            async fn remove_card(&self, card_id: Uuid, audit: &Audit) -> Result<Card> {
                let mut tx = self.begin_write().await?;
                let card = card_in(&mut tx, card_id).await?;
                if card.status == CardStatus::Removed {
                    return Err(StoreError::Conflict(format!("card {card_id} is already removed")));
                }
                let user: Option<(DbId, String)> = sqlx::query_as("SELECT id, status FROM schedules WHERE payment_method_id = $1 AND status IN ('active', 'paused', 'suspended') ORDER BY id LIMIT 1")
                    .bind(DbId(card_id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("checking the card's schedules"))?;
                if let Some((schedule_id, status)) = user {
                    return Err(StoreError::Conflict(format!(
                        "card {card_id} is used by schedule {} ({status}); move that schedule to another card with `autopay schedule update {} --card NEW_CARD` or cancel it, then remove this card",
                        schedule_id.0, schedule_id.0
                    )));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE payment_methods SET status = 'removed', status_reason = 'removed by operator', updated_at = $1 WHERE id = $2 RETURNING {CARD_COLS}")))
                    .bind(DbTime(audit.at))
                    .bind(DbId(card_id))
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("removing a card"))?;
                let removed = card_from(&row)?;
                event(&mut tx, audit, "card", card_id, "removed", serde_json::json!({})).await?;
                commit(tx).await?;
                Ok(removed)
            }

            async fn add_bills(&self, bills: &[NewBill], audit: &Audit) -> Result<BillImport> {
                let mut tx = self.begin_write().await?;
                let mut added = Vec::new();
                let mut unchanged = 0;
                for bill in bills {
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO bills (id, member_id, reference, amount_due, amount_paid, currency, due_date, status, created_at, updated_at) VALUES ($1, $2, $3, $4, 0, $5, $6, 'open', $7, $7) ON CONFLICT (member_id, reference) DO NOTHING RETURNING {BILL_COLS}"
                    )))
                    .bind(DbId(new_id()))
                    .bind(DbId(bill.member_id))
                    .bind(&bill.reference)
                    .bind(bill.amount_due.minor())
                    .bind(bill.amount_due.currency().code())
                    .bind(DbDate(bill.due_date))
                    .bind(DbTime(audit.at))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("adding a bill"))?;
                    match row {
                        Some(row) => {
                            let stored = bill_from(&row)?;
                            event(&mut tx, audit, "bill", stored.id, "added", serde_json::json!({
                                "member_id": stored.member_id, "reference": stored.reference,
                                "amount_due": stored.amount_due.amount_string(), "currency": stored.currency.code(),
                                "due_date": stored.due_date.to_string(),
                            })).await?;
                            added.push(stored);
                        }
                        None => {
                            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {BILL_COLS} FROM bills WHERE member_id = $1 AND reference = $2")))
                                .bind(DbId(bill.member_id))
                                .bind(&bill.reference)
                                .fetch_one(tx.conn())
                                .await
                                .map_err(db_err("reading a bill"))?;
                            let existing = bill_from(&row)?;
                            if existing.amount_due != bill.amount_due || existing.due_date != bill.due_date {
                                return Err(StoreError::Conflict(format!(
                                    "{}: bill '{}' is already stored with amount {} due {} (id {}); change a stored bill with `autopay bill adjust`, or give this one its own reference. Nothing was added",
                                    bill.origin, bill.reference, existing.amount_due.amount_string(), existing.due_date, existing.id
                                )));
                            }
                            unchanged += 1;
                        }
                    }
                }
                commit(tx).await?;
                Ok(BillImport { added, unchanged })
            }

            async fn bill(&self, bill_id: Uuid) -> Result<Bill> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {BILL_COLS} FROM bills WHERE id = $1")))
                    .bind(DbId(bill_id))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a bill"))?;
                match row {
                    Some(row) => bill_from(&row),
                    None => Err(StoreError::NotFound(format!("no bill has id {bill_id}; list bills with `autopay bill list`"))),
                }
            }

            async fn list_bills(&self, member_id: Option<Uuid>) -> Result<Vec<Bill>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {BILL_COLS} FROM bills WHERE ($1 IS NULL OR member_id = $1) ORDER BY due_date, reference")))
                    .bind(member_id.map(DbId))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing bills"))?
                    .iter()
                    .map(bill_from)
                    .collect()
            }

            async fn void_bill(&self, bill_id: Uuid, reason: &str, audit: &Audit) -> Result<BillChange> {
                let mut tx = self.begin_write().await?;
                let bill = bill_in(&mut tx, bill_id).await?;
                if bill.status == BillStatus::Void {
                    return Err(StoreError::Conflict(format!("bill {bill_id} is already void")));
                }
                let updated = update_bill_amounts(&mut tx, &bill, bill.amount_due.minor(), bill.amount_paid.minor(), BillStatus::Void, audit.at).await?;
                event(&mut tx, audit, "bill", bill_id, "voided", serde_json::json!({ "reason": reason })).await?;
                // Voiding a partly paid bill turns its paid part into a credit (design.md).
                let credit = if bill.amount_paid.is_positive() {
                    Some(insert_credit(&mut tx, bill.member_id, bill.amount_paid, "void", bill_id, reason, audit).await?)
                } else {
                    None
                };
                commit(tx).await?;
                Ok(BillChange { bill: updated, credit })
            }

            async fn adjust_bill(&self, bill_id: Uuid, amount_due: Money, reason: &str, audit: &Audit) -> Result<BillChange> {
                let mut tx = self.begin_write().await?;
                let bill = bill_in(&mut tx, bill_id).await?;
                if bill.status == BillStatus::Void {
                    return Err(StoreError::Conflict(format!("bill {bill_id} is void; a void bill cannot be adjusted")));
                }
                if amount_due.currency() != bill.currency || amount_due.minor() < 0 {
                    return Err(StoreError::Conflict(format!("a bill's amount must be 0.00 or more in {}", bill.currency)));
                }
                let paid = bill.amount_paid.minor();
                // Below what was already paid: the difference becomes a credit (any refund happens
                // at the processor).
                let excess = paid - amount_due.minor();
                let new_paid = if excess > 0 { amount_due.minor() } else { paid };
                let status = if new_paid >= amount_due.minor() { BillStatus::Paid } else { BillStatus::Open };
                let updated = update_bill_amounts(&mut tx, &bill, amount_due.minor(), new_paid, status, audit.at).await?;
                event(&mut tx, audit, "bill", bill_id, "adjusted", serde_json::json!({
                    "from": bill.amount_due.amount_string(), "to": amount_due.amount_string(), "reason": reason,
                })).await?;
                let credit = if excess > 0 {
                    Some(insert_credit(&mut tx, bill.member_id, Money::from_minor(excess, bill.currency), "adjustment", bill_id, reason, audit).await?)
                } else {
                    None
                };
                commit(tx).await?;
                Ok(BillChange { bill: updated, credit })
            }

            async fn pay_bill_external(&self, bill_id: Uuid, amount: Money, reference: &str, audit: &Audit) -> Result<BillChange> {
                let mut tx = self.begin_write().await?;
                let bill = bill_in(&mut tx, bill_id).await?;
                if bill.status == BillStatus::Void {
                    return Err(StoreError::Conflict(format!("bill {bill_id} is void; nothing is owed on it")));
                }
                if amount.currency() != bill.currency || !amount.is_positive() {
                    return Err(StoreError::Conflict(format!("a payment must be more than 0.00 in {}", bill.currency)));
                }
                sqlx::query("INSERT INTO external_payments (id, bill_id, amount, currency, reference, recorded_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(DbId(new_id()))
                    .bind(DbId(bill_id))
                    .bind(amount.minor())
                    .bind(amount.currency().code())
                    .bind(reference)
                    .bind(&audit.actor)
                    .bind(DbTime(audit.at))
                    .execute(tx.conn())
                    .await
                    .map_err(|e| {
                        if is_unique_violation(&e) {
                            StoreError::Conflict(format!("payment '{reference}' is already recorded on bill {bill_id}; nothing was changed"))
                        } else {
                            StoreError::from_sqlx(e, "recording an external payment")
                        }
                    })?;
                let owed = bill.outstanding().minor();
                let applied = amount.minor().min(owed);
                let excess = amount.minor() - applied;
                let new_paid = bill.amount_paid.minor() + applied;
                let status = if new_paid >= bill.amount_due.minor() { BillStatus::Paid } else { BillStatus::Open };
                let updated = update_bill_amounts(&mut tx, &bill, bill.amount_due.minor(), new_paid, status, audit.at).await?;
                event(&mut tx, audit, "bill", bill_id, "paid_externally", serde_json::json!({
                    "amount": amount.amount_string(), "reference": reference,
                })).await?;
                let credit = if excess > 0 {
                    Some(insert_credit(&mut tx, bill.member_id, Money::from_minor(excess, bill.currency), "overpayment", bill_id, reference, audit).await?)
                } else {
                    None
                };
                commit(tx).await?;
                Ok(BillChange { bill: updated, credit })
            }

            async fn list_credits(&self, member_id: Uuid) -> Result<Vec<Credit>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {CREDIT_COLS} FROM credits WHERE member_id = $1 ORDER BY created_at, id")))
                    .bind(DbId(member_id))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing credits"))?
                    .iter()
                    .map(credit_from)
                    .collect()
            }

            async fn add_schedule(&self, new: &NewSchedule, audit: &Audit) -> Result<Schedule> {
                let mut tx = self.begin_write().await?;
                let card = card_in(&mut tx, new.card_id).await?;
                if card.member_id != new.member_id {
                    return Err(StoreError::Conflict(format!(
                        "card {} belongs to another member; use one of this member's cards (`autopay card list --account N`)", card.id
                    )));
                }
                if card.status != CardStatus::Active {
                    return Err(StoreError::Conflict(format!(
                        "card {} is {}; add a new card with `autopay card add` and use it", card.id, card.status
                    )));
                }
                let member_status: String = sqlx::query_scalar("SELECT status FROM members WHERE id = $1")
                    .bind(DbId(new.member_id))
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("reading a member"))?;
                if member_status != "active" {
                    return Err(StoreError::Conflict(format!("member {} is closed; a closed member cannot set up payments", new.member_id)));
                }
                let currency = new.currency;
                let recurrence = serde_json::to_string(&new.recurrence)
                    .map_err(|e| StoreError::Internal(format!("cannot store a recurrence: {e}")))?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO schedules (id, member_id, payment_method_id, kind, recurrence, amount_rule, fixed_amount, currency, time_zone, next_run_at, next_occurrence, status, version, authorized_at, authorized_via, authorized_by, terms_version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, $13, $14, $15, $16, $13, $13) RETURNING {SCHEDULE_COLS}"
                )))
                .bind(DbId(new_id()))
                .bind(DbId(new.member_id))
                .bind(DbId(new.card_id))
                .bind(new.kind.as_str())
                .bind(recurrence)
                .bind(new.amount.kind())
                .bind(new.amount.fixed_amount().map(|m| m.minor()))
                .bind(currency.code())
                .bind(new.recurrence.time_zone_name())
                .bind(new.next_run_at.map(DbTime))
                .bind(new.next_occurrence.as_ref().map(|k| k.to_string()))
                .bind(if new.next_run_at.is_some() { "active" } else { "completed" })
                .bind(DbTime(audit.at))
                .bind(new.authorized_via.as_str())
                .bind(&audit.actor)
                .bind(&new.terms_version)
                .fetch_one(tx.conn())
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict(
                            "this member already has a statement-balance schedule; a member may have only one. Cancel it (`autopay schedule cancel ID`) or give this schedule a fixed --amount".into(),
                        )
                    } else {
                        StoreError::from_sqlx(e, "adding a schedule")
                    }
                })?;
                let schedule = schedule_from(&row)?;
                confirm_schedule(&mut tx, "setup", format!("setup:{}", schedule.id), &schedule, serde_json::json!({
                    "first_payment_at": schedule.next_run_at, "authorized_at": schedule.authorized_at,
                }), audit.at).await?;
                event(&mut tx, audit, "schedule", schedule.id, "authorized", serde_json::json!({
                    "member_id": new.member_id, "card_id": new.card_id, "rule": new.recurrence.describe(),
                    "amount": new.amount, "via": new.authorized_via.as_str(), "terms_version": new.terms_version,
                })).await?;
                commit(tx).await?;
                Ok(schedule)
            }

            async fn schedule(&self, schedule_id: Uuid) -> Result<Schedule> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE id = $1")))
                    .bind(DbId(schedule_id))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_err("reading a schedule"))?;
                match row {
                    Some(row) => schedule_from(&row),
                    None => Err(schedule_not_found(schedule_id)),
                }
            }

            async fn list_schedules(&self, member_id: Option<Uuid>) -> Result<Vec<Schedule>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE ($1 IS NULL OR member_id = $1) ORDER BY created_at, id")))
                    .bind(member_id.map(DbId))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing schedules"))?
                    .iter()
                    .map(schedule_from)
                    .collect()
            }

            async fn update_schedule(&self, change: &ScheduleChange, audit: &Audit) -> Result<Schedule> {
                let mut tx = self.begin_write().await?;
                let current = schedule_in(&mut tx, change.id).await?;
                if current.version != change.expected_version {
                    return Err(StoreError::Conflict(format!(
                        "schedule {} changed while this update was prepared (version {} is now {}); run the command again", change.id, change.expected_version, current.version
                    )));
                }
                if !current.status.is_live() {
                    return Err(StoreError::Conflict(format!("schedule {} is {}; it can no longer be changed. Set up a new one with `autopay schedule add`", change.id, current.status)));
                }
                if change.card_id != current.card_id {
                    let card = card_in(&mut tx, change.card_id).await?;
                    if card.member_id != current.member_id {
                        return Err(StoreError::Conflict(format!("card {} belongs to another member; use one of this member's cards", card.id)));
                    }
                    if card.status != CardStatus::Active {
                        return Err(StoreError::Conflict(format!("card {} is {}; add a new card and use it", card.id, card.status)));
                    }
                }
                let status = if change.lift_suspension && current.status == ScheduleStatus::Suspended {
                    ScheduleStatus::Active
                } else {
                    current.status
                };
                let (next_run_at, next_occurrence) = if status == ScheduleStatus::Active {
                    (change.next_run_at, change.next_occurrence.as_ref().map(|k| k.to_string()))
                } else {
                    (current.next_run_at, current.next_occurrence.as_ref().map(|k| k.to_string()))
                };
                let recurrence = serde_json::to_string(&change.recurrence)
                    .map_err(|e| StoreError::Internal(format!("cannot store a recurrence: {e}")))?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE schedules SET payment_method_id = $1, recurrence = $2, amount_rule = $3, fixed_amount = $4, time_zone = $5, next_run_at = $6, next_occurrence = $7, status = $8, status_reason = CASE WHEN $8 = status THEN status_reason ELSE NULL END, consecutive_failures = CASE WHEN $8 = status THEN consecutive_failures ELSE 0 END, version = version + 1, updated_at = $9 WHERE id = $10 RETURNING {SCHEDULE_COLS}"
                )))
                .bind(DbId(change.card_id))
                .bind(recurrence)
                .bind(change.amount.kind())
                .bind(change.amount.fixed_amount().map(|m| m.minor()))
                .bind(change.recurrence.time_zone_name())
                .bind(next_run_at.map(DbTime))
                .bind(next_occurrence)
                .bind(status.as_str())
                .bind(DbTime(audit.at))
                .bind(DbId(change.id))
                .fetch_one(tx.conn())
                .await
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict("this member already has a statement-balance schedule; a member may have only one".into())
                    } else {
                        StoreError::from_sqlx(e, "updating a schedule")
                    }
                })?;
                let updated = schedule_from(&row)?;
                // Re-plan unclaimed payments: the next attempt uses the new card, and its amount
                // is computed afresh when it is claimed.
                let replanned = sqlx::query("UPDATE payments SET payment_method_id = $1, schedule_version = $2, amount = NULL, updated_at = $3 WHERE schedule_id = $4 AND state IN ('scheduled', 'retry_wait')")
                    .bind(DbId(change.card_id))
                    .bind(updated.version)
                    .bind(DbTime(audit.at))
                    .bind(DbId(change.id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("re-planning payments"))?
                    .rows_affected();
                confirm_schedule(&mut tx, "changed", format!("changed:{}:{}", updated.id, updated.version), &updated, serde_json::json!({
                    "version": updated.version, "changes": change.summary,
                }), audit.at).await?;
                event(&mut tx, audit, "schedule", change.id, "changed", serde_json::json!({
                    "version": updated.version, "changes": change.summary, "replanned_payments": replanned,
                    "resumed": status != current.status,
                })).await?;
                commit(tx).await?;
                Ok(updated)
            }

            async fn pause_schedule(&self, schedule_id: Uuid, audit: &Audit) -> Result<Schedule> {
                let mut tx = self.begin_write().await?;
                let current = schedule_in(&mut tx, schedule_id).await?;
                if current.status != ScheduleStatus::Active {
                    return Err(StoreError::Conflict(format!("schedule {schedule_id} is {}; only an active schedule can be paused", current.status)));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE schedules SET status = 'paused', status_reason = 'paused by operator', next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $2 RETURNING {SCHEDULE_COLS}"
                )))
                .bind(DbTime(audit.at))
                .bind(DbId(schedule_id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("pausing a schedule"))?;
                let cancelled = cancel_unclaimed(&mut tx, schedule_id, "schedule paused", audit.at).await?;
                let paused = schedule_from(&row)?;
                confirm_schedule(&mut tx, "paused", format!("paused:{}:{}", paused.id, paused.version), &paused, serde_json::json!({}), audit.at).await?;
                event(&mut tx, audit, "schedule", schedule_id, "paused", serde_json::json!({ "cancelled_payments": cancelled })).await?;
                commit(tx).await?;
                Ok(paused)
            }

            async fn resume_schedule(&self, resume: &ScheduleResume, audit: &Audit) -> Result<Schedule> {
                let mut tx = self.begin_write().await?;
                let current = schedule_in(&mut tx, resume.id).await?;
                if !matches!(current.status, ScheduleStatus::Paused | ScheduleStatus::Suspended) {
                    return Err(StoreError::Conflict(format!("schedule {} is {}; only a paused or suspended schedule can be resumed", resume.id, current.status)));
                }
                if current.version != resume.expected_version {
                    return Err(StoreError::Conflict(format!("schedule {} changed meanwhile; run the command again", resume.id)));
                }
                let status = if resume.next_run_at.is_some() { "active" } else { "completed" };
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE schedules SET status = $1, status_reason = NULL, consecutive_failures = 0, next_run_at = $2, next_occurrence = $3, version = version + 1, updated_at = $4 WHERE id = $5 RETURNING {SCHEDULE_COLS}"
                )))
                .bind(status)
                .bind(resume.next_run_at.map(DbTime))
                .bind(resume.next_occurrence.as_ref().map(|k| k.to_string()))
                .bind(DbTime(audit.at))
                .bind(DbId(resume.id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("resuming a schedule"))?;
                event(&mut tx, audit, "schedule", resume.id, "resumed", serde_json::json!({
                    "from": current.status.as_str(), "next_run_at": resume.next_run_at,
                })).await?;
                commit(tx).await?;
                schedule_from(&row)
            }

            async fn cancel_schedule(&self, schedule_id: Uuid, audit: &Audit) -> Result<Schedule> {
                let mut tx = self.begin_write().await?;
                let current = schedule_in(&mut tx, schedule_id).await?;
                // A completed schedule may still have a payment waiting for a retry: cancelling
                // stops that too.
                let waiting: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payments WHERE schedule_id = $1 AND state IN ('scheduled', 'retry_wait')")
                    .bind(DbId(schedule_id))
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("counting waiting payments"))?;
                let cancellable = current.status.is_live() || (current.status == ScheduleStatus::Completed && waiting > 0);
                if !cancellable {
                    return Err(StoreError::Conflict(format!("schedule {schedule_id} is already {}", current.status)));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE schedules SET status = 'cancelled', status_reason = 'cancelled by operator', cancelled_at = $1, cancelled_by = $2, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $3 RETURNING {SCHEDULE_COLS}"
                )))
                .bind(DbTime(audit.at))
                .bind(&audit.actor)
                .bind(DbId(schedule_id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("cancelling a schedule"))?;
                let cancelled = cancel_unclaimed(&mut tx, schedule_id, "schedule cancelled", audit.at).await?;
                let ended = schedule_from(&row)?;
                confirm_schedule(&mut tx, "cancelled", format!("cancelled:{}", ended.id), &ended, serde_json::json!({}), audit.at).await?;
                event(&mut tx, audit, "schedule", schedule_id, "cancelled", serde_json::json!({ "cancelled_payments": cancelled })).await?;
                commit(tx).await?;
                Ok(ended)
            }

            async fn payment(&self, payment_id: Uuid) -> Result<Payment> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1")))
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
                sqlx::query(sqlx::AssertSqlSafe(format!(
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
                let rows = sqlx::query("SELECT id, at, actor, entity, entity_id, action, detail FROM events WHERE entity_id = $1 ORDER BY at, id")
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
                let rows = sqlx::query("SELECT payment_id, bill_id, credit_id, amount, currency FROM payment_allocations WHERE payment_id = $1 ORDER BY created_at, id")
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

            async fn notifications(&self, member_id: Option<Uuid>) -> Result<Vec<Notification>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {NOTIFICATION_COLS} FROM notifications WHERE ($1 IS NULL OR member_id = $1) ORDER BY created_at, id")))
                    .bind(member_id.map(DbId))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("listing notifications"))?
                    .iter()
                    .map(notification_from)
                    .collect()
            }

            async fn due_schedules(&self, now: Timestamp, limit: u32) -> Result<Vec<Schedule>> {
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE status = 'active' AND next_run_at <= $1 ORDER BY next_run_at, id LIMIT $2")))
                    .bind(DbTime(now))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("reading due schedules"))?
                    .iter()
                    .map(schedule_from)
                    .collect()
            }

            async fn apply_plan(&self, step: &PlanStep, audit: &Audit) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let current = schedule_in(&mut tx, step.schedule_id).await?;
                if current.status != ScheduleStatus::Active
                    || current.version != step.expected_version
                    || current.next_occurrence.as_ref() != Some(&step.expected_next)
                {
                    return Ok(false);
                }
                let mut planned = Vec::new();
                for p in &step.payments {
                    let state = if p.missed.is_some() { "missed" } else { "scheduled" };
                    let inserted = sqlx::query("INSERT INTO payments (id, schedule_id, member_id, occurrence, due_at, currency, state, attempt, payment_method_id, schedule_version, reason, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $11, $11) ON CONFLICT (schedule_id, occurrence) DO NOTHING")
                        .bind(DbId(new_id()))
                        .bind(DbId(current.id))
                        .bind(DbId(current.member_id))
                        .bind(p.occurrence.to_string())
                        .bind(DbTime(p.due_at))
                        .bind(current.currency.code())
                        .bind(state)
                        .bind(DbId(current.card_id))
                        .bind(current.version)
                        .bind(p.missed.as_deref())
                        .bind(DbTime(audit.at))
                        .execute(tx.conn())
                        .await
                        .map_err(db_err("planning a payment"))?
                        .rows_affected();
                    if inserted > 0 {
                        planned.push(serde_json::json!({ "occurrence": p.occurrence.to_string(), "state": state }));
                    }
                }
                let status = if step.next_run_at.is_some() { "active" } else { "completed" };
                sqlx::query("UPDATE schedules SET next_run_at = $1, next_occurrence = $2, status = $3, updated_at = $4 WHERE id = $5")
                    .bind(step.next_run_at.map(DbTime))
                    .bind(step.next_occurrence.as_ref().map(|k| k.to_string()))
                    .bind(status)
                    .bind(DbTime(audit.at))
                    .bind(DbId(current.id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("moving a schedule's cursor"))?;
                event(&mut tx, audit, "schedule", current.id, "planned", serde_json::json!({
                    "payments": planned, "next_run_at": step.next_run_at, "status": status,
                })).await?;
                commit(tx).await?;
                Ok(true)
            }

            async fn claim_work(&self, owner: &str, now: Timestamp, lease: std::time::Duration, limit: u32) -> Result<Vec<Work>> {
                let until = now
                    .checked_add(jiff::SignedDuration::try_from(lease).map_err(|e| StoreError::Internal(e.to_string()))?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                let mut tx = self.begin_write().await?;
                let candidates: Vec<(DbId, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, state FROM payments WHERE \
                     (state IN ('scheduled', 'retry_wait') AND COALESCE(next_attempt_at, due_at) <= $1 \
                        AND NOT EXISTS (SELECT 1 FROM control WHERE charging_paused_at IS NOT NULL)) \
                     OR (state = 'unknown' AND (next_attempt_at IS NULL OR next_attempt_at <= $1) AND (lease_expires_at IS NULL OR lease_expires_at < $1)) \
                     OR (state = 'processing' AND lease_expires_at < $1) \
                     ORDER BY COALESCE(next_attempt_at, due_at), id LIMIT $2{}", $skip_locked
                )))
                .bind(DbTime(now))
                .bind(i64::from(limit))
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("finding due payments"))?;
                let mut work = Vec::new();
                for (payment_id, state) in candidates {
                    let token = Uuid::new_v4();
                    let (new_state, kind) = match state.as_str() {
                        "scheduled" | "retry_wait" => ("processing", WorkKind::Charge),
                        // An unknown outcome, or a lease that expired mid-call (whose outcome is
                        // unknown too): look it up.
                        _ => ("unknown", WorkKind::Lookup),
                    };
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE payments SET state = $1, lease_owner = $2, lease_token = $3, lease_expires_at = $4, \
                         unknown_since = CASE WHEN $1 = 'unknown' THEN COALESCE(unknown_since, $5) ELSE unknown_since END, updated_at = $5 \
                         WHERE id = $6 RETURNING {PAYMENT_COLS}"
                    )))
                    .bind(new_state)
                    .bind(owner)
                    .bind(token.to_string())
                    .bind(DbTime(until))
                    .bind(DbTime(now))
                    .bind(payment_id)
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("claiming a payment"))?;
                    let payment = payment_from(&row)?;
                    if state == "processing" {
                        event(&mut tx, &Audit { actor: owner.to_string(), at: now }, "payment", payment.id, "lease_expired", serde_json::json!({ "attempt": payment.attempt })).await?;
                    }
                    work.push(Work { lease: Lease { payment_id: payment.id, token }, kind, payment });
                }
                commit(tx).await?;
                Ok(work)
            }

            async fn renew_leases(&self, leases: &[Lease], until: Timestamp) -> Result<u64> {
                let mut held = 0;
                for lease in leases {
                    held += sqlx::query("UPDATE payments SET lease_expires_at = $1 WHERE id = $2 AND lease_token = $3 AND state IN ('processing', 'unknown')")
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

            async fn begin_attempt(&self, lease: &Lease, policy: &OutcomePolicy, audit: &Audit) -> Result<AttemptStart> {
                let mut tx = self.begin_write().await?;
                let Some(Held { payment, .. }) = leased_payment(&mut tx, lease, "'processing'").await? else {
                    return Ok(AttemptStart::LeaseLost);
                };
                // The member's row serializes amount decisions for one member across workers.
                let member = member_by_id_in(&mut tx, payment.member_id).await?;
                let schedule = schedule_in(&mut tx, payment.schedule_id).await?;
                let card = card_in(&mut tx, payment.card_id).await?;
                if card.status != CardStatus::Active || member.status != MemberStatus::Active
                    || matches!(schedule.status, ScheduleStatus::Cancelled | ScheduleStatus::Paused | ScheduleStatus::Suspended)
                {
                    let reason = if card.status != CardStatus::Active {
                        format!("card {}", card.status)
                    } else if member.status != MemberStatus::Active {
                        "member closed".to_string()
                    } else {
                        format!("schedule {}", schedule.status)
                    };
                    settle_without_charge(&mut tx, &payment, PaymentState::Cancelled, &reason, None, None, audit).await?;
                    commit(tx).await?;
                    return Ok(AttemptStart::Settled(PaymentState::Cancelled));
                }
                let gross = match schedule.amount {
                    AmountRule::Fixed { amount } => amount.minor(),
                    AmountRule::Balance => {
                        let owed = sum(&mut tx, "SELECT CAST(SUM(amount_due - amount_paid) AS BIGINT) FROM bills WHERE member_id = $1 AND status = 'open'", &[payment.member_id]).await?;
                        let in_flight = sum(&mut tx, "SELECT CAST(SUM(amount + credit_applied) AS BIGINT) FROM payments WHERE member_id = $1 AND id <> $2 AND state IN ('processing', 'unknown') AND amount IS NOT NULL", &[payment.member_id, payment.id]).await?;
                        (owed - in_flight).max(0)
                    }
                };
                if gross == 0 {
                    settle_without_charge(&mut tx, &payment, PaymentState::Skipped, "nothing owed", None, None, audit).await?;
                    commit(tx).await?;
                    return Ok(AttemptStart::Settled(PaymentState::Skipped));
                }
                let credits = sum(&mut tx, "SELECT CAST(SUM(remaining) AS BIGINT) FROM credits WHERE member_id = $1", &[payment.member_id]).await?;
                let reserved = sum(&mut tx, "SELECT CAST(SUM(credit_applied) AS BIGINT) FROM payments WHERE member_id = $1 AND id <> $2 AND state IN ('processing', 'unknown')", &[payment.member_id, payment.id]).await?;
                let credit_used = (credits - reserved).max(0).min(gross);
                let charge = gross - credit_used;
                if charge == 0 {
                    // Covered by credit: the credit pays the bills, nothing is charged.
                    settle_without_charge(&mut tx, &payment, PaymentState::Skipped, "covered by credit", None, None, audit).await?;
                    consume_credits(&mut tx, &payment, credit_used, audit.at).await?;
                    let (_, left) = pay_bills(&mut tx, &payment, credit_used, audit.at).await?;
                    if left > 0 {
                        insert_credit(&mut tx, payment.member_id, Money::from_minor(left, payment.currency), "overpayment", payment.id, "credit beyond what was owed", audit).await?;
                    }
                    commit(tx).await?;
                    return Ok(AttemptStart::Settled(PaymentState::Skipped));
                }
                let max = match member.account_type {
                    AccountType::IndividualFamily => policy.max_amount_individual_family,
                    AccountType::EmployerGroup => policy.max_amount_employer_group,
                };
                if charge > max.minor() {
                    let amount = Money::from_minor(charge, payment.currency);
                    settle_without_charge(&mut tx, &payment, PaymentState::Failed, "over_limit", Some(charge), Some("over_limit"), audit).await?;
                    notify(&mut tx, "failed", &format!("failed:{}", payment.id), &member, serde_json::json!({
                        "payment_id": payment.id, "schedule_id": payment.schedule_id, "member_name": member.name.as_str(),
                        "account_type": member.account_type.as_str(), "amount": amount.amount_string(), "currency": amount.currency().code(),
                        "card": card.label(), "decline_code": "over_limit",
                        "reason": format!("the amount due, {}, is more than automatic payments may charge at once ({})", amount.display_with_code(), max.display_with_code()),
                        "next_try_at": serde_json::Value::Null, "time_zone": schedule.time_zone,
                    }), audit.at).await?;
                    commit(tx).await?;
                    return Ok(AttemptStart::Settled(PaymentState::Failed));
                }
                let installation: DbId = sqlx::query_scalar("SELECT installation_id FROM control WHERE id = 1")
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("reading the installation id"))?;
                let key = idempotency_key(installation.0, &payment, payment.attempt);
                sqlx::query("UPDATE payments SET amount = $1, credit_applied = $2, updated_at = $3 WHERE id = $4")
                    .bind(charge)
                    .bind(credit_used)
                    .bind(DbTime(audit.at))
                    .bind(DbId(payment.id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("freezing the amount"))?;
                sqlx::query("INSERT INTO payment_attempts (id, payment_id, attempt, payment_method_id, idempotency_key, amount, currency, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING")
                    .bind(DbId(new_id()))
                    .bind(DbId(payment.id))
                    .bind(payment.attempt)
                    .bind(DbId(card.id))
                    .bind(&key)
                    .bind(charge)
                    .bind(payment.currency.code())
                    .bind(DbTime(audit.at))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("recording the attempt"))?;
                event(&mut tx, audit, "payment", payment.id, "attempt_started", serde_json::json!({
                    "attempt": payment.attempt, "amount": Money::from_minor(charge, payment.currency).amount_string(),
                    "credit_used": Money::from_minor(credit_used, payment.currency).amount_string(), "card_id": card.id,
                })).await?;
                commit(tx).await?;
                Ok(AttemptStart::Charge {
                    amount: Money::from_minor(charge, payment.currency),
                    attempt: payment.attempt,
                    idempotency_key: key,
                    card_token: card.processor_token,
                    account_number: member.account_number.as_str().to_string(),
                    occurrence: payment.occurrence.clone(),
                    schedule_id: payment.schedule_id,
                })
            }

            async fn release(&self, lease: &Lease, audit: &Audit) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let Some(Held { payment, .. }) = leased_payment(&mut tx, lease, "'processing'").await? else {
                    return Ok(false);
                };
                sqlx::query("DELETE FROM payment_attempts WHERE payment_id = $1 AND attempt = $2 AND outcome IS NULL")
                    .bind(DbId(payment.id))
                    .bind(payment.attempt)
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("withdrawing an attempt"))?;
                sqlx::query("UPDATE payments SET state = 'scheduled', amount = NULL, credit_applied = 0, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $1 WHERE id = $2")
                    .bind(DbTime(audit.at))
                    .bind(DbId(payment.id))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("releasing a payment"))?;
                event(&mut tx, audit, "payment", payment.id, "released", serde_json::json!({ "reason": "charging paused" })).await?;
                commit(tx).await?;
                Ok(true)
            }

            async fn record_attempt(&self, lease: &Lease, result: &AttemptResult, policy: &OutcomePolicy, audit: &Audit) -> Result<Recorded> {
                let mut tx = self.begin_write().await?;
                let Some(Held { payment, credit_applied, unknown_since }) = leased_payment(&mut tx, lease, "'processing', 'unknown'").await? else {
                    return Ok(Recorded::LeaseLost);
                };
                let member = member_by_id_in(&mut tx, payment.member_id).await?;
                let state = match result {
                    AttemptResult::Approved { reference } => {
                        finish_attempt_row(&mut tx, &payment, "approved", None, Some(reference), audit.at).await?;
                        settle_success(&mut tx, &payment, credit_applied, reference, audit).await?;
                        PaymentState::Succeeded
                    }
                    AttemptResult::Declined { code, action, member_reason, reference } => {
                        use crate::domain::decline::DeclineAction;
                        finish_attempt_row(&mut tx, &payment, "declined", Some(code), reference.as_deref(), audit.at).await?;
                        let card = card_in(&mut tx, payment.card_id).await?;
                        let schedule = schedule_in(&mut tx, payment.schedule_id).await?;
                        let retry_at = if *action == DeclineAction::RetryLater {
                            let window_start = audit.at
                                .checked_sub(jiff::SignedDuration::try_from(policy.retry.window).map_err(|e| StoreError::Internal(e.to_string()))?)
                                .map_err(|e| StoreError::Internal(e.to_string()))?;
                            let on_card: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payment_attempts WHERE payment_method_id = $1 AND started_at >= $2")
                                .bind(DbId(card.id))
                                .bind(DbTime(window_start))
                                .fetch_one(tx.conn())
                                .await
                                .map_err(db_err("counting the card's attempts"))?;
                            policy.retry.next_attempt_at(
                                u32::try_from(payment.attempt).unwrap_or(u32::MAX),
                                u32::try_from(on_card).unwrap_or(u32::MAX),
                                audit.at,
                            )
                        } else {
                            None
                        };
                        let payload = decline_payload(&payment, &member, &card, code, member_reason, retry_at, &schedule.time_zone);
                        match retry_at {
                            Some(at) => {
                                sqlx::query("UPDATE payments SET state = 'retry_wait', attempt = attempt + 1, next_attempt_at = $1, amount = NULL, credit_applied = 0, decline_code = $2, reason = $3, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, unknown_since = NULL, updated_at = $4 WHERE id = $5")
                                    .bind(DbTime(at))
                                    .bind(code)
                                    .bind(member_reason)
                                    .bind(DbTime(audit.at))
                                    .bind(DbId(payment.id))
                                    .execute(tx.conn())
                                    .await
                                    .map_err(db_err("recording a soft decline"))?;
                                notify(&mut tx, "declined", &format!("declined:{}:{}", payment.id, payment.attempt), &member, payload, audit.at).await?;
                                PaymentState::RetryWait
                            }
                            None => {
                                sqlx::query("UPDATE payments SET state = 'failed', decline_code = $1, reason = $2, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $3 WHERE id = $4")
                                    .bind(code)
                                    .bind(member_reason)
                                    .bind(DbTime(audit.at))
                                    .bind(DbId(payment.id))
                                    .execute(tx.conn())
                                    .await
                                    .map_err(db_err("recording a decline"))?;
                                notify(&mut tx, "failed", &format!("failed:{}", payment.id), &member, payload, audit.at).await?;
                                if *action == DeclineAction::DisableCard {
                                    disable_card(&mut tx, card.id, member_reason, &member, audit).await?;
                                } else {
                                    count_failure(&mut tx, &payment, policy.suspend_after, &member, audit).await?;
                                }
                                PaymentState::Failed
                            }
                        }
                    }
                    AttemptResult::Unknown { detail } => {
                        let since = unknown_since.unwrap_or(audit.at);
                        let window = jiff::SignedDuration::try_from(policy.lookup_window).map_err(|e| StoreError::Internal(e.to_string()))?;
                        let expired = audit.at.duration_since(since) > window;
                        let next = audit.at
                            .checked_add(jiff::SignedDuration::try_from(policy.settle_delay).map_err(|e| StoreError::Internal(e.to_string()))?)
                            .map_err(|e| StoreError::Internal(e.to_string()))?;
                        let state = if expired { PaymentState::NeedsReview } else { PaymentState::Unknown };
                        finish_attempt_row(&mut tx, &payment, "unknown", None, None, audit.at).await?;
                        sqlx::query("UPDATE payments SET state = $1, reason = $2, unknown_since = $3, next_attempt_at = $4, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $5 WHERE id = $6")
                            .bind(state.as_str())
                            .bind(if expired { format!("outcome still unknown after processor.lookup_window: {detail}") } else { detail.clone() })
                            .bind(DbTime(since))
                            .bind(if expired { None } else { Some(DbTime(next)) })
                            .bind(DbTime(audit.at))
                            .bind(DbId(payment.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("recording an unknown outcome"))?;
                        state
                    }
                    AttemptResult::NotCharged => {
                        finish_attempt_row(&mut tx, &payment, "not_charged", None, None, audit.at).await?;
                        sqlx::query("UPDATE payments SET state = 'scheduled', attempt = attempt + 1, next_attempt_at = $1, amount = NULL, credit_applied = 0, reason = 'the processor has no record of the last attempt', unknown_since = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $1 WHERE id = $2")
                            .bind(DbTime(audit.at))
                            .bind(DbId(payment.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("recording a missing charge"))?;
                        PaymentState::Scheduled
                    }
                    AttemptResult::NeedsReview { detail } => {
                        finish_attempt_row(&mut tx, &payment, "needs_review", None, None, audit.at).await?;
                        sqlx::query("UPDATE payments SET state = 'needs_review', reason = $1, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $2 WHERE id = $3")
                            .bind(detail)
                            .bind(DbTime(audit.at))
                            .bind(DbId(payment.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("recording a payment for review"))?;
                        PaymentState::NeedsReview
                    }
                };
                if !matches!(result, AttemptResult::Approved { .. }) {
                    event(&mut tx, audit, "payment", payment.id, state.as_str(), serde_json::json!({
                        "attempt": payment.attempt, "result": format!("{result:?}"),
                    })).await?;
                }
                commit(tx).await?;
                Ok(Recorded::Moved(state))
            }

            async fn next_wakeup(&self) -> Result<Option<Timestamp>> {
                let mut earliest: Option<Timestamp> = None;
                for sql in [
                    "SELECT MIN(next_run_at) FROM schedules WHERE status = 'active'",
                    "SELECT MIN(COALESCE(next_attempt_at, due_at)) FROM payments WHERE state IN ('scheduled', 'retry_wait', 'unknown')",
                    "SELECT MIN(lease_expires_at) FROM payments WHERE state = 'processing'",
                ] {
                    let t: Option<DbTime> = sqlx::query_scalar(sql).fetch_one(&self.pool).await.map_err(db_err("finding the next due work"))?;
                    if let Some(t) = t {
                        earliest = Some(earliest.map_or(t.0, |e| e.min(t.0)));
                    }
                }
                Ok(earliest)
            }

            async fn attempt_stats(&self, since: Timestamp) -> Result<AttemptStats> {
                let row = sqlx::query("SELECT COUNT(*) AS attempts, CAST(COALESCE(SUM(CASE WHEN outcome = 'declined' THEN 1 ELSE 0 END), 0) AS BIGINT) AS declines, CAST(COALESCE(SUM(CASE WHEN outcome IN ('unknown', 'needs_review') THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors FROM payment_attempts WHERE started_at >= $1")
                    .bind(DbTime(since))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("reading attempt statistics"))?;
                const T: &str = "payment_attempts";
                Ok(AttemptStats { attempts: get(&row, T, "attempts")?, declines: get(&row, T, "declines")?, errors: get(&row, T, "errors")? })
            }

            async fn set_charging_pause(&self, reason: Option<&str>, audit: &Audit) -> Result<Control> {
                let mut tx = self.begin_write().await?;
                let done = match reason {
                    Some(reason) => sqlx::query("UPDATE control SET charging_paused_at = COALESCE(charging_paused_at, $1), charging_paused_by = $2, charging_paused_reason = $3 WHERE id = 1")
                        .bind(DbTime(audit.at))
                        .bind(&audit.actor)
                        .bind(reason)
                        .execute(tx.conn())
                        .await,
                    None => sqlx::query("UPDATE control SET charging_paused_at = NULL, charging_paused_by = NULL, charging_paused_reason = NULL WHERE id = 1")
                        .execute(tx.conn())
                        .await,
                }
                .map_err(db_err("changing the charging pause"))?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Schema("the database has no installation id; run `autopay migrate`".into()));
                }
                let installation: DbId = sqlx::query_scalar("SELECT installation_id FROM control WHERE id = 1").fetch_one(tx.conn()).await.map_err(db_err("reading control"))?;
                event(&mut tx, audit, "control", installation.0, if reason.is_some() { "charging_paused" } else { "charging_resumed" }, serde_json::json!({ "reason": reason })).await?;
                commit(tx).await?;
                self.control().await
            }

            async fn retry_payment(&self, payment_id: Uuid, force: bool, audit: &Audit) -> Result<Payment> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1{}", $for_update)))
                    .bind(DbId(payment_id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a payment"))?
                    .ok_or_else(|| StoreError::NotFound(format!("no payment has id {payment_id}; list payments with `autopay payment list`")))?;
                let payment = payment_from(&row)?;
                if !matches!(payment.state, PaymentState::Failed | PaymentState::Missed | PaymentState::NeedsReview) {
                    return Err(StoreError::Conflict(format!("payment {payment_id} is {}; only failed, missed or needs_review payments can be retried", payment.state)));
                }
                let hard = payment.state == PaymentState::Failed && payment.decline_code.as_deref().is_some_and(|c| c != "over_limit");
                if hard && !force {
                    return Err(StoreError::Conflict(format!(
                        "payment {payment_id} failed with a hard decline ({}); retrying the same card rarely helps. Add --force to retry anyway, or move the schedule to another card",
                        payment.decline_code.as_deref().unwrap_or("")
                    )));
                }
                let card = card_in(&mut tx, payment.card_id).await?;
                if card.status != CardStatus::Active {
                    return Err(StoreError::Conflict(format!("card {} is {}; give the schedule another card with `autopay schedule update {} --card NEW_CARD`", card.id, card.status, payment.schedule_id)));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE payments SET state = 'scheduled', attempt = attempt + 1, next_attempt_at = $1, amount = NULL, credit_applied = 0, reason = 'retried by operator', unknown_since = NULL, updated_at = $1 WHERE id = $2 RETURNING {PAYMENT_COLS}"
                )))
                .bind(DbTime(audit.at))
                .bind(DbId(payment_id))
                .fetch_one(tx.conn())
                .await
                .map_err(db_err("retrying a payment"))?;
                event(&mut tx, audit, "payment", payment_id, "retried", serde_json::json!({ "from": payment.state.as_str(), "force": force })).await?;
                commit(tx).await?;
                payment_from(&row)
            }

            async fn resolve_payment(&self, resolve: &Resolve, audit: &Audit) -> Result<Payment> {
                use crate::domain::payment::Resolution;
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLS}, credit_applied, unknown_since FROM payments WHERE id = $1{}", $for_update)))
                    .bind(DbId(resolve.payment_id))
                    .fetch_optional(tx.conn())
                    .await
                    .map_err(db_err("reading a payment"))?
                    .ok_or_else(|| StoreError::NotFound(format!("no payment has id {}; list payments with `autopay payment list`", resolve.payment_id)))?;
                let Held { payment, credit_applied, .. } = held_from(&row)?;
                if !matches!(payment.state, PaymentState::Unknown | PaymentState::NeedsReview) {
                    return Err(StoreError::Conflict(format!("payment {} is {}; only unknown or needs_review payments are resolved by hand", payment.id, payment.state)));
                }
                match resolve.resolution {
                    Resolution::Succeeded => {
                        if payment.amount.is_none() {
                            return Err(StoreError::Conflict(format!("payment {} has no amount recorded for its attempt; resolve it as failed or cancelled and retry it", payment.id)));
                        }
                        settle_success(&mut tx, &payment, credit_applied, &resolve.reference, audit).await?;
                    }
                    Resolution::Failed | Resolution::Cancelled => {
                        let state = if resolve.resolution == Resolution::Failed { PaymentState::Failed } else { PaymentState::Cancelled };
                        sqlx::query("UPDATE payments SET state = $1, reason = $2, processor_reference = $3, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, next_attempt_at = NULL, unknown_since = NULL, updated_at = $4 WHERE id = $5")
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
                    "as": format!("{:?}", resolve.resolution).to_lowercase(), "reference": resolve.reference, "reason": resolve.reason,
                })).await?;
                commit(tx).await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1")))
                    .bind(DbId(payment.id))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err("reading a payment"))?;
                payment_from(&row)
            }
            async fn enqueue(&self, n: &NewNotification, at: Timestamp) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let member = member_by_id_in(&mut tx, n.member_id).await?;
                let done = sqlx::query("INSERT INTO notifications (id, kind, dedupe_key, member_id, recipient, payload, state, attempts, next_attempt_at, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $7) ON CONFLICT (dedupe_key) DO NOTHING")
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
                commit(tx).await?;
                Ok(done > 0)
            }

            async fn claim_notifications(&self, owner: &str, now: Timestamp, lease: std::time::Duration, limit: u32) -> Result<Vec<Outgoing>> {
                let until = now
                    .checked_add(jiff::SignedDuration::try_from(lease).map_err(|e| StoreError::Internal(e.to_string()))?)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                let mut tx = self.begin_write().await?;
                // A reminder whose moment has passed is not worth sending.
                sqlx::query("UPDATE notifications SET state = 'expired', last_error = 'its moment passed before it could be sent' WHERE state IN ('pending', 'sending') AND expires_at IS NOT NULL AND expires_at <= $1 AND (lease_expires_at IS NULL OR lease_expires_at < $1)")
                    .bind(DbTime(now))
                    .execute(tx.conn())
                    .await
                    .map_err(db_err("expiring notifications"))?;
                let ids: Vec<DbId> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM notifications WHERE (state = 'pending' AND next_attempt_at <= $1) OR (state = 'sending' AND lease_expires_at < $1) ORDER BY next_attempt_at, id LIMIT $2{}", $skip_locked
                )))
                .bind(DbTime(now))
                .bind(i64::from(limit))
                .fetch_all(tx.conn())
                .await
                .map_err(db_err("finding due notifications"))?;
                let mut out = Vec::new();
                for nid in ids {
                    let token = Uuid::new_v4();
                    // The recipient is the member's address now, not when the row was queued:
                    // an address changed in between must not send the message to the old one.
                    // The column then records where this attempt went.
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE notifications SET state = 'sending', lease_owner = $1, lease_token = $2, lease_expires_at = $3, attempts = attempts + 1, \
                         recipient = COALESCE((SELECT m.email FROM members m WHERE m.id = notifications.member_id), recipient) WHERE id = $4 RETURNING {NOTIFICATION_COLS}"
                    )))
                    .bind(owner)
                    .bind(token.to_string())
                    .bind(DbTime(until))
                    .bind(nid)
                    .fetch_one(tx.conn())
                    .await
                    .map_err(db_err("claiming a notification"))?;
                    let notification = notification_from(&row)?;
                    out.push(Outgoing { lease: NotificationLease { id: notification.id, token }, notification });
                }
                commit(tx).await?;
                Ok(out)
            }

            async fn finish_notification(&self, lease: &NotificationLease, outcome: &DeliveryOutcome, now: Timestamp) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let member: Option<Option<DbId>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT member_id FROM notifications WHERE id = $1 AND lease_token = $2 AND state = 'sending'{}", $for_update
                )))
                .bind(DbId(lease.id))
                .bind(lease.token.to_string())
                .fetch_optional(tx.conn())
                .await
                .map_err(db_err("reading a claimed notification"))?;
                let Some(member_id) = member else {
                    return Ok(false);
                };
                match outcome {
                    DeliveryOutcome::Sent => {
                        sqlx::query("UPDATE notifications SET state = 'sent', sent_at = $1, last_error = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $2")
                            .bind(DbTime(now))
                            .bind(DbId(lease.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("marking a notification sent"))?;
                    }
                    DeliveryOutcome::Retry { error, at } => {
                        sqlx::query("UPDATE notifications SET state = 'pending', next_attempt_at = $1, last_error = $2, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $3")
                            .bind(DbTime(*at))
                            .bind(error)
                            .bind(DbId(lease.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("scheduling a notification again"))?;
                    }
                    DeliveryOutcome::Failed { error, bounce } => {
                        sqlx::query("UPDATE notifications SET state = 'failed', last_error = $1, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = $2")
                            .bind(error)
                            .bind(DbId(lease.id))
                            .execute(tx.conn())
                            .await
                            .map_err(db_err("marking a notification failed"))?;
                        if let (true, Some(member_id)) = (*bounce, member_id) {
                            sqlx::query("UPDATE members SET email_bouncing = TRUE, updated_at = $1 WHERE id = $2")
                                .bind(DbTime(now))
                                .bind(member_id)
                                .execute(tx.conn())
                                .await
                                .map_err(db_err("flagging a bouncing address"))?;
                            event(&mut tx, &Audit { actor: "dispatcher".into(), at: now }, "member", member_id.0, "email_bouncing", serde_json::json!({ "notification_id": lease.id })).await?;
                        }
                    }
                }
                commit(tx).await?;
                Ok(true)
            }

            async fn set_mail_pause(&self, reason: Option<&str>, now: Timestamp) -> Result<()> {
                match reason {
                    Some(reason) => sqlx::query("UPDATE control SET mail_paused_at = COALESCE(mail_paused_at, $1), mail_paused_reason = $2 WHERE id = 1")
                        .bind(DbTime(now))
                        .bind(reason)
                        .execute(&self.pool)
                        .await,
                    None => sqlx::query("UPDATE control SET mail_paused_at = NULL, mail_paused_reason = NULL WHERE id = 1 AND mail_paused_at IS NOT NULL")
                        .execute(&self.pool)
                        .await,
                }
                .map_err(db_err("recording the mail pause"))?;
                Ok(())
            }

            async fn schedules_due_between(&self, after: Timestamp, until: Timestamp) -> Result<Vec<Schedule>> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM schedules s JOIN members m ON m.id = s.member_id WHERE s.status = 'active' AND m.reminders = TRUE AND m.status = 'active' AND s.next_run_at > $1 AND s.next_run_at <= $2 ORDER BY s.next_run_at, s.id",
                    SCHEDULE_COLS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", ")
                )))
                .bind(DbTime(after))
                .bind(DbTime(until))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err("finding schedules to remind"))?
                .iter()
                .map(schedule_from)
                .collect()
            }

            async fn cards_expiring(&self, by: jiff::civil::Date) -> Result<Vec<(Card, Member)>> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM payment_methods p WHERE p.status = 'active' AND (p.exp_year * 100 + p.exp_month) <= $1 \
                     AND EXISTS (SELECT 1 FROM schedules s WHERE s.payment_method_id = p.id AND s.status = 'active') ORDER BY p.id",
                    CARD_COLS.split(", ").map(|c| format!("p.{c}")).collect::<Vec<_>>().join(", ")
                )))
                .bind(i64::from(by.year()) * 100 + i64::from(by.month()))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err("finding expiring cards"))?;
                let mut out = Vec::new();
                for row in rows {
                    let card = card_from(&row)?;
                    let member = self.member_by_id(card.member_id).await?;
                    if member.reminders && member.status == MemberStatus::Active {
                        out.push((card, member));
                    }
                }
                Ok(out)
            }
        }
    };
}

pub(crate) use shared_store_impl;
