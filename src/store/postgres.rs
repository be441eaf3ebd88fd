//! The PostgreSQL backend, for several hosts sharing one database. Row locks (`FOR UPDATE`)
//! serialize the read-check-write steps that SQLite's single writer serializes by itself.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{Backend, DatabaseUrl};
use crate::store::{Result, StoreError, WAIT_LIMIT, WriteTx};

/// The channel on which writers wake the daemons that LISTEN.
pub const WAKE_CHANNEL: &str = "autopay_work";

/// Autopay's data in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: sqlx::PgPool,
}

impl PgStore {
    const BACKEND: Backend = Backend::Postgres;
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
    ];
    /// Any fixed number shared by every autopay process: serializes concurrent `migrate` runs.
    const MIGRATION_LOCK_KEY: i64 = 0x0061_7574_6f70_6179;

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
        Ok(PgStore { pool })
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// Row locks and `SKIP LOCKED` let PostgreSQL writers run side by side: no turn to take.
    async fn begin_write(&self) -> Result<WriteTx<sqlx::Postgres>> {
        let tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::from_sqlx(e, "starting a write"))?;
        Ok(WriteTx::new(tx, None))
    }

    /// PostgreSQL is backed up with its own tools (pg_dump); `autopay restore-mark` marks a
    /// restored database.
    async fn backup_to(&self, _path: &std::path::Path, _at: jiff::Timestamp) -> Result<()> {
        Err(StoreError::Config(
            "autopay backup copies SQLite databases; back up PostgreSQL with pg_dump and, after restoring, run `autopay restore-mark` (docs/operations.md, Backups and restores)".into(),
        ))
    }

    /// Tells every autopay process listening on this database that new work may be due
    /// (delivered when the transaction commits, and only if it does): once per transaction,
    /// just before it commits.
    async fn wake_others(tx: &mut WriteTx<sqlx::Postgres>) -> Result<()> {
        tx.wake = true;
        Ok(())
    }

    /// The one notification a transaction that asked to wake the others sends.
    async fn wake_now(tx: &mut WriteTx<sqlx::Postgres>) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(WAKE_CHANNEL)
            .execute(tx.conn())
            .await
            .map_err(|e| StoreError::from_sqlx(e, "waking the other daemons"))?;
        Ok(())
    }

    /// LISTENs for [`WAKE_CHANNEL`] on a connection of its own, calling `changed` for each
    /// notification, until `stop` fires. A lost connection is reported; the caller listens
    /// again.
    async fn watch_changes(
        &self,
        changed: &(dyn Fn() + Send + Sync),
        stop: &crate::shutdown::Shutdown,
    ) -> Result<()> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
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
    async fn lock_for_migration(tx: &mut WriteTx<sqlx::Postgres>) -> Result<()> {
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(tx.conn())
            .await
            .map_err(|e| StoreError::from_sqlx(e, "lifting the statement limit for migration"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(Self::MIGRATION_LOCK_KEY)
            .execute(tx.conn())
            .await
            .map_err(|e| StoreError::from_sqlx(e, "locking for migration"))?;
        Ok(())
    }
}

super::shared::shared_store_impl!(
    PgStore,
    sqlx::Postgres,
    " FOR UPDATE",
    " FOR UPDATE SKIP LOCKED",
    ""
);
