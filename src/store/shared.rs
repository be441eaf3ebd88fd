//! The [`Store`](super::Store) implementation both backends share. The SQL is one text for both
//! dialects (`$N` placeholders, which SQLite also reads; columns typed through
//! [`super::types`]), so a macro stamps it out once per backend. Each backend supplies:
//! `self.pool`, `self.begin_write()` (SQLite: `BEGIN IMMEDIATE`), `Self::BACKEND`,
//! `Self::MIGRATIONS`, `Self::BOOTSTRAP`, and `Self::lock_for_migration(tx)`; the macro takes the
//! row-lock suffix (`" FOR UPDATE"` in PostgreSQL, nothing in SQLite, whose writer holds the
//! whole database).

macro_rules! shared_store_impl {
    ($store:ident, $db:ty, $for_update:literal) => {
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
        type Tx = sqlx::Transaction<'static, $db>;

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
                .execute(&mut **tx)
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
                .fetch_optional(&mut **tx)
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
                .fetch_optional(&mut **tx)
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
                .fetch_optional(&mut **tx)
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
                .fetch_optional(&mut **tx)
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
                .execute(&mut **tx)
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
            .fetch_one(&mut **tx)
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
            .fetch_one(&mut **tx)
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

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> crate::config::Backend {
                Self::BACKEND
            }

            async fn migrate(&self, now: Timestamp) -> Result<MigrationReport> {
                let mut tx = self.begin_write().await?;
                Self::lock_for_migration(&mut tx).await?;
                sqlx::raw_sql(Self::BOOTSTRAP).execute(&mut *tx).await.map_err(db_err("creating the migrations table"))?;
                let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_err("reading applied migrations"))?;
                let mut applied = Vec::new();
                for (version, name, sql) in Self::MIGRATIONS {
                    if done.contains(version) {
                        continue;
                    }
                    sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(|e| {
                        StoreError::Schema(format!("migration {version} ({name}) failed: {e}; nothing was changed"))
                    })?;
                    sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                        .bind(*version)
                        .bind(*name)
                        .bind(DbTime(now))
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err("recording a migration"))?;
                    applied.push(format!("{version:04}_{name}"));
                }
                let existing: Option<DbId> = sqlx::query_scalar("SELECT installation_id FROM control WHERE id = 1")
                    .fetch_optional(&mut *tx)
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
                            .execute(&mut *tx)
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
                .fetch_one(&mut *tx)
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
                .fetch_one(&mut *tx)
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
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_err("reading the member's schedules"))?;
                let mut cancelled_payments = 0;
                for schedule_id in &live {
                    sqlx::query("UPDATE schedules SET status = 'cancelled', status_reason = 'member closed', cancelled_at = $1, cancelled_by = $2, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $3")
                        .bind(DbTime(audit.at))
                        .bind(&audit.actor)
                        .bind(*schedule_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err("cancelling a schedule"))?;
                    cancelled_payments += cancel_unclaimed(&mut tx, schedule_id.0, "member closed", audit.at).await?;
                    event(&mut tx, audit, "schedule", schedule_id.0, "cancelled", serde_json::json!({ "reason": "member closed" })).await?;
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE members SET status = 'closed', updated_at = $1 WHERE id = $2 RETURNING {MEMBER_COLS}")))
                    .bind(DbTime(audit.at))
                    .bind(DbId(member.id))
                    .fetch_one(&mut *tx)
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
                    .fetch_optional(&mut *tx)
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
                .fetch_one(&mut *tx)
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
                    .fetch_optional(&mut *tx)
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
                    .fetch_one(&mut *tx)
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
                    .fetch_optional(&mut *tx)
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
                                .fetch_one(&mut *tx)
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
                let mut conn = self.pool.acquire().await.map_err(db_err("reading a bill"))?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {BILL_COLS} FROM bills WHERE id = $1")))
                    .bind(DbId(bill_id))
                    .fetch_optional(&mut *conn)
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
                    .execute(&mut *tx)
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
                    .fetch_one(&mut *tx)
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
                .fetch_one(&mut *tx)
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
                .fetch_one(&mut *tx)
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
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err("re-planning payments"))?
                    .rows_affected();
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
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err("pausing a schedule"))?;
                let cancelled = cancel_unclaimed(&mut tx, schedule_id, "schedule paused", audit.at).await?;
                event(&mut tx, audit, "schedule", schedule_id, "paused", serde_json::json!({ "cancelled_payments": cancelled })).await?;
                commit(tx).await?;
                schedule_from(&row)
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
                .fetch_one(&mut *tx)
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
                if !current.status.is_live() {
                    return Err(StoreError::Conflict(format!("schedule {schedule_id} is already {}", current.status)));
                }
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE schedules SET status = 'cancelled', status_reason = 'cancelled by operator', cancelled_at = $1, cancelled_by = $2, next_run_at = NULL, next_occurrence = NULL, version = version + 1, updated_at = $1 WHERE id = $3 RETURNING {SCHEDULE_COLS}"
                )))
                .bind(DbTime(audit.at))
                .bind(&audit.actor)
                .bind(DbId(schedule_id))
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err("cancelling a schedule"))?;
                let cancelled = cancel_unclaimed(&mut tx, schedule_id, "schedule cancelled", audit.at).await?;
                event(&mut tx, audit, "schedule", schedule_id, "cancelled", serde_json::json!({ "cancelled_payments": cancelled })).await?;
                commit(tx).await?;
                schedule_from(&row)
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
        }
    };
}

pub(crate) use shared_store_impl;
