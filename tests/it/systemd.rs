//! What running under systemd relies on: every database wait is bounded (so an outage is an
//! error the loops report, never a stall the watchdog kills).

use autopay::store::postgres::PgStore;
use autopay::store::sqlite::SqliteStore;
use autopay::store::{StoreError, WAIT_LIMIT};

use crate::helpers::{Kind, TestDb};

#[tokio::test]
async fn every_postgres_statement_is_bounded_and_a_timeout_says_try_again() {
    let db = TestDb::new(Kind::Postgres).await;
    let store = PgStore::open(&db.database_url(), 2).await.unwrap();
    let limit: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(limit, format!("{}s", WAIT_LIMIT.as_secs()));

    // A statement that outlives its limit is "unavailable, try again" (exit 69), not a bug.
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::query("SET statement_timeout = '50ms'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = sqlx::query("SELECT pg_sleep(2)")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let err = StoreError::from_sqlx(err, "testing");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("try again"), "{err}");
}

#[tokio::test]
async fn a_sqlite_lock_is_waited_for_at_most_the_wait_limit() {
    let db = TestDb::new(Kind::Sqlite).await;
    let store = SqliteStore::open(&db.database_url(), 2).await.unwrap();
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(busy, WAIT_LIMIT.as_millis() as i64);
}
