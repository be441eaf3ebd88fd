//! The PostgreSQL backend, for several hosts sharing one database. Row locks (`FOR UPDATE`)
//! serialize the read-check-write steps that SQLite's single writer serializes by itself.

use std::str::FromStr;

use std::sync::LazyLock;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};

use crate::config::DatabaseUrl;
use crate::store::sql::backend::{RawQuery, Record};
use crate::store::sql::{Backend, Column, Conn, Param, SqlStore};
use crate::store::{Result, StoreError, WAIT_LIMIT, WriteTx};

/// The channel on which writers wake the daemons that LISTEN.
pub const WAKE_CHANNEL: &str = "autopay_work";

/// Autopay's data in PostgreSQL.
pub type PgStore = SqlStore<sqlx::Postgres>;

/// Any fixed number shared by every autopay process: serializes concurrent `migrate` runs.
const MIGRATION_LOCK_KEY: i64 = 0x0061_7574_6f70_6179;

impl Backend for sqlx::Postgres {
    const KIND: crate::config::Backend = crate::config::Backend::Postgres;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const CLAIM_INDEX: &'static str = "";
    /// The server's clock, for the skew warning at start.
    const CLOCK_QUERY: Option<&'static str> = Some("SELECT now()");
    const BOOTSTRAP: &'static str = "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)";
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)] = &[
        (
            1,
            "initial",
            include_str!("../../migrations/postgres/0001_initial.sql"),
        ),
        (
            2,
            "exactly_once",
            include_str!("../../migrations/postgres/0002_exactly_once.sql"),
        ),
        (
            3,
            "job_runs",
            include_str!("../../migrations/postgres/0003_job_runs.sql"),
        ),
        (
            4,
            "reconcile",
            include_str!("../../migrations/postgres/0004_reconcile.sql"),
        ),
        (
            5,
            "card_expiry_index",
            include_str!("../../migrations/postgres/0005_card_expiry_index.sql"),
        ),
        (
            6,
            "stored_credentials",
            include_str!("../../migrations/postgres/0006_stored_credentials.sql"),
        ),
        (
            7,
            "claim_order_indexes",
            include_str!("../../migrations/postgres/0007_claim_order_indexes.sql"),
        ),
        (
            8,
            "in_flight_indexes",
            include_str!("../../migrations/postgres/0008_in_flight_indexes.sql"),
        ),
    ];

    /// Row locks and `SKIP LOCKED` let PostgreSQL writers run side by side: no turn to take.
    type WriteTurn = ();

    fn claim_due_sql() -> &'static str {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            crate::store::sql::payments::claim::claim_due_sql(
                <sqlx::Postgres as Backend>::CLAIM_INDEX,
                <sqlx::Postgres as Backend>::SKIP_LOCKED,
            )
        });
        &SQL
    }

    fn bind<'t, P: Param<'t>>(query: RawQuery<Self>, value: P) -> RawQuery<Self> {
        query.bind(value)
    }

    async fn execute(query: RawQuery<Self>, on: Conn<'_, Self>) -> Result<u64, sqlx::Error> {
        match on {
            Conn::Tx(c) => query.execute(c).await,
            Conn::Pool(p) => query.execute(p).await,
        }
        .map(|done| done.rows_affected())
    }

    async fn execute_script(sql: &'static str, on: Conn<'_, Self>) -> Result<u64, sqlx::Error> {
        match on {
            Conn::Tx(c) => sqlx::raw_sql(sql).execute(c).await,
            Conn::Pool(p) => sqlx::raw_sql(sql).execute(p).await,
        }
        .map(|done| done.rows_affected())
    }

    async fn fetch_all(
        query: RawQuery<Self>,
        on: Conn<'_, Self>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        match on {
            Conn::Tx(c) => query.fetch_all(c).await,
            Conn::Pool(p) => query.fetch_all(p).await,
        }
    }

    async fn fetch_optional(
        query: RawQuery<Self>,
        on: Conn<'_, Self>,
    ) -> Result<Option<PgRow>, sqlx::Error> {
        match on {
            Conn::Tx(c) => query.fetch_optional(c).await,
            Conn::Pool(p) => query.fetch_optional(p).await,
        }
    }

    /// Row locks and `SKIP LOCKED` let PostgreSQL writers run side by side: no turn to take.
    async fn begin_write(store: &SqlStore<Self>) -> Result<WriteTx<Self>> {
        let tx = store
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::from_sqlx(e, "starting a write"))?;
        Ok(WriteTx::new(tx, None))
    }

    /// PostgreSQL is backed up with its own tools (pg_dump); `autopay restore-mark` marks a
    /// restored database.
    async fn backup_into(
        _store: &SqlStore<Self>,
        _path: &std::path::Path,
        _at: jiff::Timestamp,
    ) -> Result<()> {
        Err(StoreError::Config(
            "autopay backup copies SQLite databases; back up PostgreSQL with pg_dump and, after restoring, run `autopay restore-mark` (docs/operations.md, Backups and restores)".into(),
        ))
    }

    /// Tells every autopay process listening on this database that new work may be due
    /// (delivered when the transaction commits, and only if it does): once per transaction,
    /// just before it commits.
    async fn wake_others(tx: &mut WriteTx<Self>) -> Result<()> {
        tx.wake = true;
        Ok(())
    }

    /// The one notification a transaction that asked to wake the others sends.
    async fn wake_now(tx: &mut WriteTx<Self>) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(WAKE_CHANNEL)
            .execute(tx.connection())
            .await
            .map_err(|e| StoreError::from_sqlx(e, "waking the other daemons"))?;
        Ok(())
    }

    /// LISTENs for [`WAKE_CHANNEL`] on a connection of its own, calling `changed` for each
    /// notification, until `stop` fires. A lost connection is reported; the caller listens
    /// again.
    async fn watch(
        store: &SqlStore<Self>,
        changed: &(dyn Fn() + Send + Sync),
        stop: &crate::shutdown::Shutdown,
    ) -> Result<()> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&store.pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "listening for new work"))?;
        listener
            .listen(WAKE_CHANNEL)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "listening for new work"))?;
        // Anything written while the listener connected is looked at once.
        changed();
        loop {
            tokio::select! {
                got = listener.try_recv() => match got {
                    Ok(Some(_)) => changed(),
                    // The connection dropped (and notifications with it): look once, listen again.
                    Ok(None) => changed(),
                    Err(e) => return Err(StoreError::from_sqlx(e, "listening for new work")),
                },
                () = stop.wait() => return Ok(()),
            }
        }
    }

    /// Waits for any other `migrate` to finish. A migration may rightly run longer than
    /// [`WAIT_LIMIT`] (an index on a large table), so its transaction has no statement limit.
    async fn lock_for_migration(tx: &mut WriteTx<Self>) -> Result<()> {
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(tx.connection())
            .await
            .map_err(|e| StoreError::from_sqlx(e, "lifting the statement limit for migration"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(tx.connection())
            .await
            .map_err(|e| StoreError::from_sqlx(e, "locking for migration"))?;
        Ok(())
    }
}

impl Record for PgRow {
    fn column<T: Column>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }

    fn column_at<T: Column>(&self, index: usize) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, index)
    }
}

impl PgStore {
    /// Opens a pool whose every wait is bounded by [`WAIT_LIMIT`]: the acquire timeout covers
    /// waiting for a free connection and connecting a new one, and `statement_timeout` (sent at
    /// connection start-up) every statement, its lock waits included.
    pub async fn open(url: &DatabaseUrl, max_connections: u32) -> Result<PgStore> {
        let options = PgConnectOptions::from_str(url.expose())
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "database.url {} is not a usable PostgreSQL URL ({e}); write it like postgres://USER@HOST:5432/DB",
                    url.redacted()
                ))
            })?
            .options([(
                "statement_timeout",
                format!("{}ms", WAIT_LIMIT.as_millis()),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(WAIT_LIMIT)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL at {}: {e}; check that it is running and that database.url is right",
                    url.redacted()
                ))
            })?;
        Ok(SqlStore { pool, turn: () })
    }
}
