//! The simulated processor's ledger: every charge it made, keyed by idempotency key, in a
//! database of its own so that its history outlives an engine crash or a restore of autopay's
//! database.
//!
//! Three backends behind [`ChargeLedger`]: in memory (benchmarks), a SQLite file (WAL,
//! `synchronous = FULL`, created when missing) and PostgreSQL. Both SQL backends hold one table,
//! `sim_charges`, created on open. Every charge is written in a transaction of its own with
//! `INSERT ... ON CONFLICT (idempotency_key) DO NOTHING` and read back under the same key, so
//! concurrent charges with one key leave one row and all see it.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::config::{Backend, DatabaseUrl, redact_url};
use crate::domain::decline::DeclineSignal;
use crate::domain::ids::{PaymentId, ScheduleId};
use crate::domain::money::{Currency, Money};
use crate::processor::{ChargeRequest, ProcessorAttempt, ProcessorError};
use crate::sqltypes::DbTime;

/// One ledger row: the request as it was first made under its key, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Charge {
    pub request: ChargeRequest,
    pub attempt: ProcessorAttempt,
}

enum Store {
    Memory(Mutex<HashMap<String, Charge>>),
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Where the simulated processor records its charges.
pub(crate) struct ChargeLedger {
    store: Store,
    /// Where it lives, password redacted: for messages.
    label: String,
}

/// Connections per ledger pool: enough for concurrent charges, small beside autopay's own.
const POOL_SIZE: u32 = 4;

/// Any fixed number: serializes concurrent `CREATE TABLE IF NOT EXISTS` on one PostgreSQL.
const PG_CREATE_LOCK_KEY: i64 = 0x0073_696d_6c65_6467;

const SQLITE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sim_charges (
        idempotency_key TEXT PRIMARY KEY,
        reference TEXT NOT NULL UNIQUE,
        payment_id TEXT NOT NULL,
        schedule_id TEXT NOT NULL,
        occurrence TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        amount_minor INTEGER NOT NULL,
        currency TEXT NOT NULL,
        token TEXT NOT NULL,
        account_last4 TEXT NOT NULL,
        approved INTEGER NOT NULL CHECK (approved IN (0, 1)),
        decline_code TEXT,
        created_at TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS sim_charges_payment ON sim_charges (payment_id, attempt)",
    "CREATE INDEX IF NOT EXISTS sim_charges_created ON sim_charges (created_at)",
];

/// Ledgers written before requests carried only the account's last four characters kept the
/// whole account number: renamed and cut to its last four when such a ledger is opened.
const SQLITE_HAS_OLD_COLUMN: &str =
    "SELECT COUNT(*) FROM pragma_table_info('sim_charges') WHERE name = 'account_number'";
const PG_HAS_OLD_COLUMN: &str = "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'sim_charges' AND column_name = 'account_number'";
const UPGRADE_OLD_COLUMN: &[&str] = &[
    "ALTER TABLE sim_charges RENAME COLUMN account_number TO account_last4",
    "UPDATE sim_charges SET account_last4 = substr(account_last4, length(account_last4) - 3) WHERE length(account_last4) > 4",
];

/// Renames an old ledger's account column (see [`UPGRADE_OLD_COLUMN`]) inside a transaction,
/// once per backend.
macro_rules! upgrade_fn {
    ($name:ident, $db:ty, $has_old_column:expr) => {
        async fn $name(tx: &mut sqlx::Transaction<'_, $db>) -> Result<(), sqlx::Error> {
            let old: i64 = sqlx::query_scalar($has_old_column)
                .fetch_one(&mut **tx)
                .await?;
            if old > 0 {
                for statement in UPGRADE_OLD_COLUMN {
                    sqlx::query(*statement).execute(&mut **tx).await?;
                }
            }
            Ok(())
        }
    };
}
upgrade_fn!(upgrade_sqlite, sqlx::Sqlite, SQLITE_HAS_OLD_COLUMN);
upgrade_fn!(upgrade_postgres, sqlx::Postgres, PG_HAS_OLD_COLUMN);

const PG_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sim_charges (
        idempotency_key TEXT PRIMARY KEY,
        reference TEXT NOT NULL UNIQUE,
        payment_id UUID NOT NULL,
        schedule_id UUID NOT NULL,
        occurrence TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        amount_minor BIGINT NOT NULL,
        currency TEXT NOT NULL,
        token TEXT NOT NULL,
        account_last4 TEXT NOT NULL,
        approved BOOLEAN NOT NULL,
        decline_code TEXT,
        created_at TIMESTAMPTZ NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS sim_charges_payment ON sim_charges (payment_id, attempt)",
    "CREATE INDEX IF NOT EXISTS sim_charges_created ON sim_charges (created_at)",
];

macro_rules! cols {
    () => {
        "idempotency_key, reference, payment_id, schedule_id, occurrence, attempt, amount_minor, currency, token, account_last4, approved, decline_code, created_at"
    };
}

const INSERT: &str = concat!(
    "INSERT INTO sim_charges (",
    cols!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (idempotency_key) DO NOTHING"
);
const BY_KEY: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM sim_charges WHERE idempotency_key = $1"
);
const BY_ATTEMPT: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM sim_charges WHERE payment_id = $1 AND attempt = $2 ORDER BY created_at, reference LIMIT 1"
);
const BY_PAYMENT: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM sim_charges WHERE payment_id = $1 ORDER BY created_at, reference"
);
const SINCE: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM sim_charges WHERE created_at >= $1 ORDER BY created_at, reference"
);
const COUNT: &str = "SELECT COUNT(*) AS n FROM sim_charges";

/// One set of queries per SQL backend; the SQL text is shared (`$N` placeholders, columns typed
/// through [`crate::sqltypes`]: ids as the store binds them, instants as [`DbTime`]), only the pool type and the opening statement differ.
macro_rules! sql_backend {
    ($module:ident, $db:ty, $begin:literal) => {
        mod $module {
            use super::*;

            type DbRow = <$db as sqlx::Database>::Row;

            fn charge_from(row: &DbRow) -> Result<Charge, String> {
                let text = |col: &str| row.try_get::<String, _>(col).map_err(|e| e.to_string());
                let int = |col: &str| row.try_get::<i64, _>(col).map_err(|e| e.to_string());
                let currency = Currency::parse(&text("currency")?).map_err(|e| e.to_string())?;
                let amount = Money::from_minor(int("amount_minor")?, currency);
                let request = ChargeRequest {
                    idempotency_key: text("idempotency_key")?,
                    token: text("token")?,
                    amount,
                    payment_id: row
                        .try_get::<PaymentId, _>("payment_id")
                        .map_err(|e| e.to_string())?,
                    schedule_id: row
                        .try_get::<ScheduleId, _>("schedule_id")
                        .map_err(|e| e.to_string())?,
                    occurrence: text("occurrence")?,
                    attempt: int("attempt")?,
                    account_last4: text("account_last4")?,
                    customer: None,
                    statement_descriptor_suffix: None,
                };
                let attempt = ProcessorAttempt {
                    idempotency_key: request.idempotency_key.clone(),
                    reference: text("reference")?,
                    payment_id: request.payment_id,
                    schedule_id: request.schedule_id,
                    occurrence: request.occurrence.clone(),
                    attempt: request.attempt,
                    amount,
                    approved: row
                        .try_get::<bool, _>("approved")
                        .map_err(|e| e.to_string())?,
                    decline: row
                        .try_get::<Option<String>, _>("decline_code")
                        .map_err(|e| e.to_string())?
                        .map(DeclineSignal::code),
                    created_at: row
                        .try_get::<DbTime, _>("created_at")
                        .map_err(|e| e.to_string())?
                        .0,
                };
                Ok(Charge { request, attempt })
            }

            fn unreadable(e: String) -> sqlx::Error {
                sqlx::Error::Protocol(format!(
                    "a sim_charges row is unreadable ({e}); the ledger was changed outside autopay"
                ))
            }

            fn rows(rows: Vec<DbRow>) -> Result<Vec<Charge>, sqlx::Error> {
                rows.iter()
                    .map(|r| charge_from(r).map_err(unreadable))
                    .collect()
            }

            pub(super) async fn insert(
                pool: &sqlx::Pool<$db>,
                charge: &Charge,
            ) -> Result<Charge, sqlx::Error> {
                let (r, a) = (&charge.request, &charge.attempt);
                let mut tx = pool.begin_with($begin).await?;
                sqlx::query(INSERT)
                    .bind(&r.idempotency_key)
                    .bind(&a.reference)
                    .bind(r.payment_id)
                    .bind(r.schedule_id)
                    .bind(&r.occurrence)
                    .bind(r.attempt)
                    .bind(r.amount.minor())
                    .bind(r.amount.currency().code())
                    .bind(&r.token)
                    .bind(&r.account_last4)
                    .bind(a.approved)
                    .bind(a.decline.as_ref().map(|d| d.code.as_str()))
                    .bind(DbTime(a.created_at))
                    .execute(&mut *tx)
                    .await?;
                let row = sqlx::query(BY_KEY)
                    .bind(&r.idempotency_key)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                charge_from(&row).map_err(unreadable)
            }

            pub(super) async fn by_key(
                pool: &sqlx::Pool<$db>,
                key: &str,
            ) -> Result<Option<Charge>, sqlx::Error> {
                let row = sqlx::query(BY_KEY).bind(key).fetch_optional(pool).await?;
                row.map(|r| charge_from(&r).map_err(unreadable)).transpose()
            }

            pub(super) async fn by_attempt(
                pool: &sqlx::Pool<$db>,
                payment_id: PaymentId,
                attempt: i64,
            ) -> Result<Option<Charge>, sqlx::Error> {
                let row = sqlx::query(BY_ATTEMPT)
                    .bind(payment_id)
                    .bind(attempt)
                    .fetch_optional(pool)
                    .await?;
                row.map(|r| charge_from(&r).map_err(unreadable)).transpose()
            }

            pub(super) async fn by_payment(
                pool: &sqlx::Pool<$db>,
                payment_id: PaymentId,
            ) -> Result<Vec<Charge>, sqlx::Error> {
                rows(
                    sqlx::query(BY_PAYMENT)
                        .bind(payment_id)
                        .fetch_all(pool)
                        .await?,
                )
            }

            pub(super) async fn since(
                pool: &sqlx::Pool<$db>,
                since: Timestamp,
            ) -> Result<Vec<Charge>, sqlx::Error> {
                rows(
                    sqlx::query(SINCE)
                        .bind(DbTime(since))
                        .fetch_all(pool)
                        .await?,
                )
            }

            pub(super) async fn count(pool: &sqlx::Pool<$db>) -> Result<i64, sqlx::Error> {
                sqlx::query(COUNT).fetch_one(pool).await?.try_get("n")
            }
        }
    };
}

sql_backend!(sqlite_sql, sqlx::Sqlite, "BEGIN IMMEDIATE");
sql_backend!(pg_sql, sqlx::Postgres, "BEGIN");

/// What to tell an operator whose ledger will not open.
fn open_failed(label: &str, e: impl std::fmt::Display, fix: &str) -> ProcessorError {
    ProcessorError::Unavailable(format!(
        "the simulated processor cannot open its ledger at {label}: {e}; {fix}, or set processor.simulated.ledger to another sqlite:// or postgres:// URL (\"memory\" keeps it in memory, for benchmarks only)"
    ))
}

const SQLITE_FIX: &str = "check that its folder exists and is writable";
const PG_FIX: &str = "check that PostgreSQL is running, that the database exists and that the user may create tables in it";

impl ChargeLedger {
    /// A ledger in memory, forgotten at exit: for benchmarks and unit tests.
    pub(crate) fn memory() -> ChargeLedger {
        ChargeLedger {
            store: Store::Memory(Mutex::new(HashMap::new())),
            label: "memory".into(),
        }
    }

    /// Opens (creating when missing) the ledger a `sqlite://` or `postgres://` URL names.
    pub(crate) async fn open_url(url: &str) -> Result<ChargeLedger, ProcessorError> {
        let label = redact_url(url);
        let parsed = DatabaseUrl::parse(url, None).map_err(|e| {
            ProcessorError::Unavailable(format!(
                "processor.simulated.ledger {label} is not a usable database URL: write {e}, or \"memory\""
            ))
        })?;
        match parsed.backend() {
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(parsed.expose()).map_err(|e| {
                    open_failed(&label, e, "write it like sqlite://simulated-processor.db")
                })?;
                ChargeLedger::open_sqlite(options, label).await
            }
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(parsed.expose()).map_err(|e| {
                    open_failed(&label, e, "write it like postgres://USER@HOST:5432/DB")
                })?;
                ChargeLedger::open_postgres(options, label).await
            }
        }
    }

    /// Opens (creating when missing) a SQLite file by its path.
    pub(crate) async fn open_sqlite_file(path: &Path) -> Result<ChargeLedger, ProcessorError> {
        let label = format!("sqlite://{}", path.display());
        ChargeLedger::open_sqlite(SqliteConnectOptions::new().filename(path), label).await
    }

    async fn open_sqlite(
        options: SqliteConnectOptions,
        label: String,
    ) -> Result<ChargeLedger, ProcessorError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // A small page cache (256 KiB a connection, SQLite's default is 2 MiB): the
            // ledger is written far more than it is read, so a cache that fills as it grows
            // would only make the process's memory grow with the number of charges.
            .pragma("cache_size", "-256");
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .map_err(|e| open_failed(&label, e, SQLITE_FIX))?;
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| open_failed(&label, e, SQLITE_FIX))?;
        upgrade_sqlite(&mut tx)
            .await
            .map_err(|e| open_failed(&label, e, SQLITE_FIX))?;
        for statement in SQLITE_SCHEMA {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| open_failed(&label, e, SQLITE_FIX))?;
        }
        tx.commit()
            .await
            .map_err(|e| open_failed(&label, e, SQLITE_FIX))?;
        Ok(ChargeLedger {
            store: Store::Sqlite(pool),
            label,
        })
    }

    async fn open_postgres(
        options: PgConnectOptions,
        label: String,
    ) -> Result<ChargeLedger, ProcessorError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| open_failed(&label, e, PG_FIX))?;
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| open_failed(&label, e, PG_FIX))?;
        // Two hosts opening one ledger at once would race inside CREATE TABLE IF NOT EXISTS.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_CREATE_LOCK_KEY)
            .execute(&mut *tx)
            .await
            .map_err(|e| open_failed(&label, e, PG_FIX))?;
        upgrade_postgres(&mut tx)
            .await
            .map_err(|e| open_failed(&label, e, PG_FIX))?;
        for statement in PG_SCHEMA {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| open_failed(&label, e, PG_FIX))?;
        }
        tx.commit()
            .await
            .map_err(|e| open_failed(&label, e, PG_FIX))?;
        Ok(ChargeLedger {
            store: Store::Postgres(pool),
            label,
        })
    }

    /// Where the ledger lives, password redacted.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn failed(&self, doing: &str, e: sqlx::Error) -> ProcessorError {
        ProcessorError::Unavailable(format!(
            "the simulated processor's ledger at {} failed while {doing}: {e}",
            self.label
        ))
    }

    fn memory_rows(
        map: &Mutex<HashMap<String, Charge>>,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Charge>> {
        map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a charge unless its key is already there, in a transaction of its own; returns
    /// the row now stored under the key (this one, or the one recorded first).
    pub(crate) async fn record(&self, charge: &Charge) -> Result<Charge, ProcessorError> {
        let stored = match &self.store {
            Store::Memory(m) => {
                return Ok(Self::memory_rows(m)
                    .entry(charge.request.idempotency_key.clone())
                    .or_insert_with(|| charge.clone())
                    .clone());
            }
            Store::Sqlite(pool) => sqlite_sql::insert(pool, charge).await,
            Store::Postgres(pool) => pg_sql::insert(pool, charge).await,
        };
        stored.map_err(|e| self.failed("recording a charge", e))
    }

    /// The row stored under an idempotency key.
    pub(crate) async fn by_key(&self, key: &str) -> Result<Option<Charge>, ProcessorError> {
        let found = match &self.store {
            Store::Memory(m) => return Ok(Self::memory_rows(m).get(key).cloned()),
            Store::Sqlite(pool) => sqlite_sql::by_key(pool, key).await,
            Store::Postgres(pool) => pg_sql::by_key(pool, key).await,
        };
        found.map_err(|e| self.failed("looking up an idempotency key", e))
    }

    /// The first charge recorded for this payment and attempt.
    pub(crate) async fn by_attempt(
        &self,
        payment_id: PaymentId,
        attempt: i64,
    ) -> Result<Option<ProcessorAttempt>, ProcessorError> {
        let found = match &self.store {
            Store::Memory(m) => {
                return Ok(sorted(
                    Self::memory_rows(m)
                        .values()
                        .filter(|c| {
                            c.attempt.payment_id == payment_id && c.attempt.attempt == attempt
                        })
                        .cloned()
                        .collect(),
                )
                .into_iter()
                .next());
            }
            Store::Sqlite(pool) => sqlite_sql::by_attempt(pool, payment_id, attempt).await,
            Store::Postgres(pool) => pg_sql::by_attempt(pool, payment_id, attempt).await,
        };
        found
            .map(|c| c.map(|c| c.attempt))
            .map_err(|e| self.failed("looking up an attempt", e))
    }

    /// Every charge recorded for one payment, oldest first.
    pub(crate) async fn by_payment(
        &self,
        payment_id: PaymentId,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        let found = match &self.store {
            Store::Memory(m) => Ok(Self::memory_rows(m)
                .values()
                .filter(|c| c.attempt.payment_id == payment_id)
                .cloned()
                .collect()),
            Store::Sqlite(pool) => sqlite_sql::by_payment(pool, payment_id).await,
            Store::Postgres(pool) => pg_sql::by_payment(pool, payment_id).await,
        };
        found
            .map(sorted)
            .map_err(|e| self.failed("listing a payment's charges", e))
    }

    /// Every charge recorded at or after `since`, oldest first.
    pub(crate) async fn since(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        let found = match &self.store {
            Store::Memory(m) => Ok(Self::memory_rows(m)
                .values()
                .filter(|c| c.attempt.created_at >= since)
                .cloned()
                .collect()),
            Store::Sqlite(pool) => sqlite_sql::since(pool, since).await,
            Store::Postgres(pool) => pg_sql::since(pool, since).await,
        };
        found
            .map(sorted)
            .map_err(|e| self.failed("listing charges", e))
    }

    /// How many charges the ledger holds.
    pub(crate) async fn count(&self) -> Result<u64, ProcessorError> {
        let n = match &self.store {
            Store::Memory(m) => return Ok(Self::memory_rows(m).len() as u64),
            Store::Sqlite(pool) => sqlite_sql::count(pool).await,
            Store::Postgres(pool) => pg_sql::count(pool).await,
        };
        let n = n.map_err(|e| self.failed("counting charges", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Oldest first, as the SQL backends order them; references (UUID v7) break ties.
fn sorted(mut charges: Vec<Charge>) -> Vec<ProcessorAttempt> {
    charges.sort_by(|a, b| {
        (a.attempt.created_at, &a.attempt.reference)
            .cmp(&(b.attempt.created_at, &b.attempt.reference))
    });
    charges.into_iter().map(|c| c.attempt).collect()
}
