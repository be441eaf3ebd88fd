//! The SQLite backend: the embedded default, one file, one writer.
//!
//! WAL journal, `synchronous = FULL` (a committed payment survives a power cut), foreign keys on,
//! a busy timeout, and every writing transaction opened with `BEGIN IMMEDIATE`: a deferred
//! transaction that reads and then writes fails with SQLITE_BUSY whatever the timeout. Every wait
//! (a connection from the pool, the busy lock, this process's turn to write) is bounded by
//! [`WAIT_LIMIT`].

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::config::{Backend, DatabaseUrl};
use std::sync::Arc;

use crate::store::{Result, StoreError, WAIT_LIMIT, WriteTx};

/// Autopay's data in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
    /// This process's writers take turns here before `BEGIN IMMEDIATE` (see [`WriteTx`]).
    write_turn: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteStore {
    const BACKEND: Backend = Backend::Sqlite;
    const BOOTSTRAP: &'static str = "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)";
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)] = &[
        (
            1,
            "initial",
            include_str!("../../migrations/sqlite/0001_initial.sql"),
        ),
        (
            2,
            "exactly_once",
            include_str!("../../migrations/sqlite/0002_exactly_once.sql"),
        ),
    ];

    /// Opens (creating when missing) the file a `sqlite://` URL names.
    pub async fn open(url: &DatabaseUrl, max_connections: u32) -> Result<SqliteStore> {
        create_private(url);
        let options = SqliteConnectOptions::from_str(url.expose())
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "database.url {} is not a usable SQLite URL ({e}); write it like sqlite://autopay.db",
                    url.redacted()
                ))
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(WAIT_LIMIT);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(WAIT_LIMIT)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot open the SQLite database {}: {e}; check that its folder exists and is writable",
                    url.redacted()
                ))
            })?;
        Ok(SqliteStore {
            pool,
            write_turn: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn pool(&self) -> &sqlx::SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<WriteTx<sqlx::Sqlite>> {
        let turn = tokio::time::timeout(WAIT_LIMIT, self.write_turn.clone().lock_owned())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "the database stayed busy: this process's writes queued for over {}s; try again",
                    WAIT_LIMIT.as_secs()
                ))
            })?;
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| StoreError::from_sqlx(e, "starting a write"))?;
        Ok(WriteTx::new(tx, Some(turn)))
    }

    /// `BEGIN IMMEDIATE` already holds the only write lock.
    async fn lock_for_migration(_tx: &mut WriteTx<sqlx::Sqlite>) -> Result<()> {
        Ok(())
    }
}

/// Creates a missing database file readable and writable by its owner only (0600), whatever the
/// umask: it holds members' names, emails and account numbers. SQLite gives the -wal and -shm
/// files the database file's mode, so they follow. An existing file keeps its mode; any failure
/// here is left for SQLite to report with its own message.
fn create_private(url: &DatabaseUrl) {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(path) = url.sqlite_path() else {
        return;
    };
    if url.expose().contains("mode=memory") {
        return;
    }
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

super::shared::shared_store_impl!(SqliteStore, sqlx::Sqlite, "", "");
