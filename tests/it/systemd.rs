//! What running under systemd relies on: every database wait is bounded, and a long mail pass
//! reports as it goes (so an outage or a slow server is something the loops report, never a
//! stall the watchdog kills).

use std::sync::Arc;
use std::time::Duration;

use autopay::clock::Clock;
use autopay::domain::member::AccountType;
use autopay::health::Health;
use autopay::notify::dispatcher::Dispatcher;
use autopay::notify::mailer::{Mail, Mailer, SendError};
use autopay::notify::templates::Templates;
use autopay::store::postgres::PgStore;
use autopay::store::sqlite::SqliteStore;
use autopay::store::{NewNotification, StoreError, WAIT_LIMIT};

use crate::engine::World;
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

/// A mail server that takes its time over every message.
struct SlowMailer(Duration);

#[async_trait::async_trait]
impl Mailer for SlowMailer {
    fn name(&self) -> &'static str {
        "slow"
    }
    async fn send(&self, _mail: &Mail) -> Result<(), SendError> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
}

#[tokio::test]
async fn a_slow_mail_batch_reports_after_every_message_so_it_never_looks_stalled() {
    let w = World::new(Kind::Sqlite).await;
    for i in 0..4 {
        let member = w
            .member(&format!("A-10020{i}"), AccountType::IndividualFamily)
            .await;
        let receipt = NewNotification {
            kind: "receipt".into(),
            dedupe_key: format!("receipt:{i}"),
            member_id: member.id,
            payload: Templates::sample_payload("receipt"),
            expires_at: None,
        };
        assert!(w.store.enqueue(&receipt, w.clock.now()).await.unwrap());
    }
    let health = Arc::new(Health::new());
    let dispatcher = Dispatcher::new(
        &w.settings,
        w.store.clone(),
        Arc::new(SlowMailer(Duration::from_millis(200))),
        Arc::new(Templates::builtin()),
        w.clock.clone(),
        "test-dispatcher".into(),
    )
    .unwrap()
    .with_health(health.clone(), "mail");
    health.beat("mail");

    // One pass of four messages takes 800ms; the loop is never silent for 400ms of it.
    let pass = tokio::spawn(async move { dispatcher.deliver_due().await });
    while !pass.is_finished() {
        assert_eq!(
            health.stalled(Duration::from_millis(400)),
            Vec::<&str>::new()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pass.await.unwrap().unwrap().sent, 4);
}
