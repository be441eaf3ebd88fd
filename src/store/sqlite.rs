//! The SQLite backend: the embedded default, one file, one writer.
//!
//! WAL journal, `synchronous = FULL` (a committed payment survives a power cut), foreign keys on,
//! a busy timeout, and every writing transaction opened with `BEGIN IMMEDIATE`: a deferred
//! transaction that reads and then writes fails with SQLITE_BUSY whatever the timeout. Every wait
//! (a connection from the pool, the busy lock, this process's turn to write) is bounded by
//! [`WAIT_LIMIT`].

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};

use crate::config::DatabaseUrl;
use crate::store::sql::backend::{RawQuery, Record};
use crate::store::sql::{Backend, Column, Conn, Param, SqlStore};
use crate::store::{Result, StoreError, WAIT_LIMIT, WriteTx};

/// How often the daemon asks SQLite whether another process wrote.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Autopay's data in a SQLite file.
pub type SqliteStore = SqlStore<sqlx::Sqlite>;

impl Backend for sqlx::Sqlite {
    const KIND: crate::config::Backend = crate::config::Backend::Sqlite;
    const FOR_UPDATE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    const CLAIM_INDEX: &'static str = " INDEXED BY payments_claimable";
    /// SQLite reads this host's clock: nothing to compare.
    const CLOCK_QUERY: Option<&'static str> = None;
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
        (
            3,
            "job_runs",
            include_str!("../../migrations/sqlite/0003_job_runs.sql"),
        ),
        (
            4,
            "reconcile",
            include_str!("../../migrations/sqlite/0004_reconcile.sql"),
        ),
        (
            5,
            "card_expiry_index",
            include_str!("../../migrations/sqlite/0005_card_expiry_index.sql"),
        ),
        (
            6,
            "stored_credentials",
            include_str!("../../migrations/sqlite/0006_stored_credentials.sql"),
        ),
        (
            7,
            "claim_order_indexes",
            include_str!("../../migrations/sqlite/0007_claim_order_indexes.sql"),
        ),
        (
            8,
            "in_flight_indexes",
            include_str!("../../migrations/sqlite/0008_in_flight_indexes.sql"),
        ),
    ];

    /// This process's writers take turns here before `BEGIN IMMEDIATE` (see [`WriteTx`]).
    type WriteTurn = Arc<tokio::sync::Mutex<()>>;

    fn claim_due_sql() -> &'static str {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            crate::store::sql::payments::claim::claim_due_sql(
                <sqlx::Sqlite as Backend>::CLAIM_INDEX,
                <sqlx::Sqlite as Backend>::SKIP_LOCKED,
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
    ) -> Result<Vec<SqliteRow>, sqlx::Error> {
        match on {
            Conn::Tx(c) => query.fetch_all(c).await,
            Conn::Pool(p) => query.fetch_all(p).await,
        }
    }

    async fn fetch_optional(
        query: RawQuery<Self>,
        on: Conn<'_, Self>,
    ) -> Result<Option<SqliteRow>, sqlx::Error> {
        match on {
            Conn::Tx(c) => query.fetch_optional(c).await,
            Conn::Pool(p) => query.fetch_optional(p).await,
        }
    }

    async fn begin_write(store: &SqlStore<Self>) -> Result<WriteTx<Self>> {
        let turn = tokio::time::timeout(WAIT_LIMIT, store.turn.clone().lock_owned())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "the database stayed busy: this process's writes queued for over {}s; try again",
                    WAIT_LIMIT.as_secs()
                ))
            })?;
        let tx = store
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| StoreError::from_sqlx(e, "starting a write"))?;
        Ok(WriteTx::new(tx, Some(turn)))
    }

    /// `autopay backup`: an online copy by `VACUUM INTO` (consistent, taken under a read
    /// transaction while the daemon keeps writing), into a new file only this user can read,
    /// then marked "reconcile required" as of `at`, the moment the copy was complete.
    async fn backup_into(store: &SqlStore<Self>, path: &Path, at: jiff::Timestamp) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                StoreError::Config(format!(
                    "cannot create the backup file {}: {e}; name a new file in a folder this user can write",
                    path.display()
                ))
            })?;
        let copied = async {
            sqlx::query("VACUUM INTO $1")
                .bind(path.to_string_lossy().into_owned())
                .execute(&store.pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "copying the database"))?;
            let copy = SqliteConnectOptions::new()
                .filename(path)
                .journal_mode(SqliteJournalMode::Delete)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(WAIT_LIMIT);
            let mut conn = sqlx::ConnectOptions::connect(&copy)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "opening the backup"))?;
            sqlx::query("UPDATE control SET reconcile_required_since = $1, min_binary_schema = CASE WHEN min_binary_schema < $2 THEN $2 ELSE min_binary_schema END WHERE id = 1")
                .bind(crate::sqltypes::DbTime(at))
                .bind(crate::store::RECONCILE_SCHEMA)
                .execute(&mut conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "marking the backup"))?;
            sqlx::Connection::close(conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "closing the backup"))
        }
        .await;
        if copied.is_err() {
            // A half-written copy must never be mistaken for a backup.
            let _ = std::fs::remove_file(path);
        }
        copied
    }

    /// Other processes are told nothing: [`Backend::watch`] sees their commits.
    async fn wake_others(_tx: &mut WriteTx<Self>) -> Result<()> {
        Ok(())
    }

    /// Never asked for: [`Backend::wake_others`] leaves nothing to send.
    async fn wake_now(_tx: &mut WriteTx<Self>) -> Result<()> {
        Ok(())
    }

    /// Asks SQLite every 200 ms whether any other connection committed (`PRAGMA data_version`
    /// changes), calling `changed` when one did, until `stop` fires. Another process (the
    /// command line) may have written; so may this process's other connections, which costs a
    /// look that finds nothing.
    async fn watch(
        store: &SqlStore<Self>,
        changed: &(dyn Fn() + Send + Sync),
        stop: &crate::shutdown::Shutdown,
    ) -> Result<()> {
        let mut conn = store
            .pool
            .acquire()
            .await
            .map_err(|e| StoreError::from_sqlx(e, "watching for new work"))?;
        let mut seen: Option<i64> = None;
        loop {
            let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "watching for new work"))?;
            if seen.is_some_and(|s| s != version) {
                changed();
            }
            seen = Some(version);
            tokio::select! {
                () = tokio::time::sleep(WATCH_EVERY) => {}
                () = stop.wait() => return Ok(()),
            }
        }
    }

    /// `BEGIN IMMEDIATE` already holds the only write lock.
    async fn lock_for_migration(_tx: &mut WriteTx<Self>) -> Result<()> {
        Ok(())
    }
}

impl Record for SqliteRow {
    fn column<T: Column>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }

    fn column_at<T: Column>(&self, index: usize) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, index)
    }
}

impl SqliteStore {
    /// Opens (creating when missing) the file a `sqlite://` URL names, after checking that this
    /// process's user owns it ([`require_owner`]).
    pub async fn open(url: &DatabaseUrl, max_connections: u32) -> Result<SqliteStore> {
        if let Some(path) = url.sqlite_path()
            && !url.expose().contains("mode=memory")
        {
            require_owner(&path, crate::users::effective())?;
        }
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
        Ok(SqlStore {
            pool,
            turn: Arc::new(tokio::sync::Mutex::new(())),
        })
    }
}

/// Refuses (exit 78) a SQLite database file that user `euid` does not own: one that exists and
/// belongs to another user, or a missing one in a folder another user owns. SQLite creates the
/// `-wal` and `-shm` files beside the database (and the file itself when missing) as whoever
/// opens it, readable by that user only: root running `autopay migrate` on the daemon's
/// database would leave files the daemon's user cannot open, and the daemon would stop. A missing
/// file in a sticky folder anyone may write to (`/tmp`) is allowed: there, each user owns what it
/// creates and no one else's files are touched. A `-wal` or `-shm` file of the user's own
/// database that another user owns is refused too, with the `chown` that repairs it. What cannot
/// be read here (a missing folder, no permission) is left for SQLite to report.
pub fn require_owner(path: &Path, euid: libc::uid_t) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (what, shown, owner) = match std::fs::metadata(path) {
        Ok(file) => ("the SQLite database", path.to_path_buf(), file.uid()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            match std::fs::metadata(folder) {
                Ok(f) if f.mode() & 0o1000 != 0 => return Ok(()),
                Ok(f) => (
                    "the folder of the new SQLite database",
                    folder.to_path_buf(),
                    f.uid(),
                ),
                Err(_) => return Ok(()),
            }
        }
        Err(_) => return Ok(()),
    };
    let me = crate::users::name(euid);
    if owner == euid {
        // SQLite cannot open a database whose -wal or -shm file its user cannot write (one left
        // by root before this check existed).
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = Path::new(&side);
            if let Ok(m) = std::fs::metadata(side)
                && m.uid() != euid
            {
                return Err(StoreError::Config(format!(
                    "{} belongs to {}, not to {me} who owns the database {}: SQLite cannot open the database. With autopay stopped, give it back: chown {me}: {}",
                    side.display(),
                    crate::users::name(m.uid()),
                    path.display(),
                    side.display()
                )));
            }
        }
        return Ok(());
    }
    let (owner_name, sudo_user) = match crate::users::account(owner) {
        Some(name) => (name.clone(), name),
        None => (format!("uid {owner}"), format!("'#{owner}'")),
    };
    Err(StoreError::Config(format!(
        "{what} {} belongs to {owner_name}, and autopay runs as {me}: files SQLite would create there (the -wal and -shm files) would belong to {me}, and {owner_name} (the daemon's user) could no longer open them. Run the command as the owner instead: sudo -u {sudo_user} autopay ...",
        shown.display()
    )))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::sql::payments::claim::coalesced_sql;
    use crate::store::sql::schedules::SCHEDULE_COLS;
    use crate::store::sql::schedules::plan::DUE_SCHEDULES_SQL;
    use std::os::unix::fs::MetadataExt;

    /// SQLite's plan for `sql`, one line per step.
    async fn plan(store: &SqliteStore, sql: &str) -> String {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind("x")
                .bind("x")
                .bind("x")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(_, _, _, step)| step)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The charge path's reads of due work come from indexes in their order: none sorts or
    /// scans every due payment (at 50,000 due, claims that did made the run three times slower;
    /// docs/performance.md).
    #[tokio::test]
    async fn due_work_is_read_from_indexes_in_order_never_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::parse(
            &format!("sqlite://{}", dir.path().join("autopay.db").display()),
            None,
        )
        .unwrap();
        let store = SqliteStore::open(&url, 1).await.unwrap();
        store.migrate(jiff::Timestamp::now()).await.unwrap();

        let claim = plan(&store, <sqlx::Sqlite as Backend>::claim_due_sql()).await;
        assert!(claim.contains("USING INDEX payments_claimable"), "{claim}");
        assert!(!claim.contains("TEMP B-TREE"), "{claim}");

        let due = plan(
            &store,
            &format!("SELECT {SCHEDULE_COLS}{DUE_SCHEDULES_SQL}"),
        )
        .await;
        assert!(due.contains("schedules_due_order"), "{due}");
        assert!(!due.contains("TEMP B-TREE"), "{due}");

        // The misfire check reads one schedule's payments, never every scheduled one.
        let later = plan(&store, &coalesced_sql(2)).await;
        assert!(later.contains("(schedule_id=?)"), "{later}");
        assert!(!later.contains("payments_due"), "{later}");
    }

    fn owner(path: &Path) -> libc::uid_t {
        std::fs::metadata(path).unwrap().uid()
    }

    #[test]
    fn a_database_file_another_user_owns_is_refused_with_the_owner_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("autopay.db");
        std::fs::write(&db, b"").unwrap();
        std::os::unix::fs::chown(&db, Some(65534), Some(65534))
            .expect("chown to uid 65534: this test runs as root, as CI does");
        let err = require_owner(&db, crate::users::effective()).unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{err:?}");
        let nobody = crate::users::name(65534);
        let message = err.to_string();
        assert!(
            message.contains(&format!("belongs to {nobody}")),
            "{message}"
        );
        assert!(
            message.contains(&format!("sudo -u {nobody} autopay")),
            "{message}"
        );
        assert!(message.contains(&db.display().to_string()), "{message}");
    }

    #[test]
    fn a_new_database_in_a_folder_another_user_owns_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let me = owner(dir.path());
        let err = require_owner(&dir.path().join("autopay.db"), me + 1).unwrap_err();
        assert!(err.to_string().contains("folder"), "{err}");
        // Relative to the working folder when the URL names no folder.
        let cwd = owner(Path::new("."));
        assert!(require_owner(Path::new("no-such-autopay.db"), cwd + 1).is_err());
        assert!(require_owner(Path::new("no-such-autopay.db"), cwd).is_ok());
    }

    #[test]
    fn the_owner_and_shared_sticky_folders_pass() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("autopay.db");
        let me = owner(dir.path());
        assert!(require_owner(&db, me).is_ok());
        std::fs::write(&db, b"").unwrap();
        assert!(require_owner(&db, me).is_ok());
        // A missing file in a sticky folder anyone writes to: the new file is the user's own.
        use std::os::unix::fs::PermissionsExt;
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(require_owner(&shared.join("autopay.db"), me + 1).is_ok());
        // A missing folder is SQLite's to report.
        assert!(require_owner(&dir.path().join("gone/autopay.db"), me + 1).is_ok());
    }

    #[test]
    fn a_wal_file_another_user_left_beside_the_users_own_database_is_refused_with_the_repair() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("autopay.db");
        std::fs::write(&db, b"").unwrap();
        let wal = dir.path().join("autopay.db-wal");
        std::fs::write(&wal, b"").unwrap();
        std::os::unix::fs::chown(&wal, Some(65534), Some(65534))
            .expect("chown to uid 65534: this test runs as root, as CI does");
        let me = crate::users::effective();
        let message = require_owner(&db, me).unwrap_err().to_string();
        assert!(
            message.contains(&format!(
                "chown {}: {}",
                crate::users::name(me),
                wal.display()
            )),
            "{message}"
        );
    }
}
