//! Backups and restores: a database restored from an older backup is refused until it is
//! reconciled with the processor, and once reconciled nobody is charged twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use autopay::clock::Clock;
use autopay::config::DatabaseUrl;
use autopay::domain::ids::ScheduleId;
use autopay::domain::payment::{AmountRule, PaymentState};
use autopay::domain::schedule::{Rule, Unit};
use autopay::engine::{Engine, ReconcileError, RestoreCheck};
use autopay::processor::Processor;
use autopay::store::Store;
use jiff::SignedDuration;

use crate::engine::{World, usd};
use crate::helpers::{Bin, Kind, TestDb, member_with_card, on_both, schedule_due_now};

on_both!(an_older_backup_restored_is_refused_until_reconciled_and_then_charges_nobody_twice);

/// Approved charges per (schedule, occurrence) in the processor's ledger: the truth about money.
async fn approved_charges(
    processor: &dyn Processor,
) -> BTreeMap<(ScheduleId, String), Vec<String>> {
    let mut by_occurrence: BTreeMap<(ScheduleId, String), Vec<String>> = BTreeMap::new();
    for a in processor
        .list_attempts("2000-01-01T00:00:00Z".parse().unwrap())
        .await
        .unwrap()
    {
        if a.approved {
            by_occurrence
                .entry((a.schedule_id, a.occurrence))
                .or_default()
                .push(a.reference);
        }
    }
    by_occurrence
}

fn engine_over(w: &World, store: Arc<dyn Store>) -> Engine {
    Engine::new(
        store,
        w.processor.clone(),
        w.clock.clone(),
        autopay::daemon::engine_config(&w.settings),
        autopay::daemon::outcome_policy(&w.settings),
    )
}

/// A backup taken as docs/operations.md says: `autopay backup` for SQLite, pg_dump for
/// PostgreSQL.
enum Backup {
    Sqlite(PathBuf),
    Postgres(PathBuf),
}

async fn take_backup(w: &World, kind: Kind, dir: &Path) -> Backup {
    match kind {
        Kind::Sqlite => {
            let file = dir.join("backup.db");
            w.store.backup_into(&file, w.clock.now()).await.unwrap();
            // A second backup to the same file is refused; the first is untouched.
            let again = w.store.backup_into(&file, w.clock.now()).await.unwrap_err();
            assert!(again.to_string().contains("name a new file"), "{again}");
            Backup::Sqlite(file)
        }
        Kind::Postgres => {
            let file = dir.join("backup.sql");
            let out = std::process::Command::new("pg_dump")
                .args(["--no-owner", "--file"])
                .arg(&file)
                .arg(&w._db.url)
                .output()
                .expect("pg_dump (Debian's postgresql-client) must be installed");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Backup::Postgres(file)
        }
    }
}

/// Restores a backup into a database of its own; PostgreSQL's is then marked as
/// `autopay restore-mark` marks it. The TestDb keeps the restored database alive.
async fn restore(w: &World, backup: &Backup) -> (Arc<dyn Store>, Option<TestDb>) {
    match backup {
        Backup::Sqlite(file) => {
            let url = DatabaseUrl::parse(&format!("sqlite://{}", file.display()), None).unwrap();
            (autopay::store::open(&url, 4).await.unwrap(), None)
        }
        Backup::Postgres(file) => {
            let db = TestDb::new(Kind::Postgres).await;
            let out = std::process::Command::new("psql")
                .args(["--quiet", "-v", "ON_ERROR_STOP=1", "--file"])
                .arg(file)
                .arg(&db.url)
                .output()
                .expect("psql must be installed");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let store = autopay::store::open(&db.database_url(), 4).await.unwrap();
            let newest = store.newest_attempt().await.unwrap();
            store.set_reconcile_mark(newest, &w.audit()).await.unwrap();
            (store, Some(db))
        }
    }
}

async fn an_older_backup_restored_is_refused_until_reconciled_and_then_charges_nobody_twice(
    kind: Kind,
) {
    let w = World::new(kind).await;
    // Three members paying weekly; the first payments are charged before the backup.
    let mut schedules = Vec::new();
    for (account, number) in [
        ("A-100200", "4242424242424242"),
        ("A-100300", "5555555555554444"),
        ("A-100400", "6011111111111117"),
    ] {
        let m = w
            .member(
                account,
                autopay::domain::member::AccountType::IndividualFamily,
            )
            .await;
        // Owing enough that no payment leaves a credit that covers the next one.
        w.bill(&m, &format!("INV-{account}"), "500.00", "2026-12-31")
            .await;
        let card = w.card(&m, number).await;
        let s = w
            .schedule(
                &m,
                &card,
                Rule::Every {
                    n: 1,
                    unit: Unit::Weeks,
                },
                AmountRule::Fixed {
                    amount: usd("25.00"),
                },
            )
            .await;
        schedules.push((m, card, s));
    }
    let engine = w.engine();
    engine.drain().await.unwrap();
    assert_eq!(approved_charges(w.processor.as_ref()).await.len(), 3);

    let dir = tempfile::tempdir().unwrap();
    let backup_at = w.clock.now();
    let backup = take_backup(&w, kind, dir.path()).await;

    // Life goes on after the backup: each weekly schedule charges its next occurrence, and a
    // one-time payment for a new member, added after the backup, is charged too.
    let newcomer = w
        .member(
            "A-100500",
            autopay::domain::member::AccountType::EmployerGroup,
        )
        .await;
    w.bill(&newcomer, "INV-A-100500", "500.00", "2026-12-31")
        .await;
    let newcomer_card = w.card(&newcomer, "4000056655665556").await;
    let mut once = w.new_schedule(&newcomer, &newcomer_card);
    once.kind = autopay::domain::status::ScheduleKind::OneTime;
    let one_time = w.store.add_schedule(&once, &w.audit()).await.unwrap();
    engine.drain().await.unwrap();
    w.advance(SignedDuration::from_hours(24));
    engine.drain().await.unwrap();
    let before_restore = approved_charges(w.processor.as_ref()).await;
    assert_eq!(before_restore.len(), 7, "{before_restore:?}");

    // The restore: the old copy comes back, marked, and is refused.
    let (restored, _restored_db) = restore(&w, &backup).await;
    let control = restored.control().await.unwrap();
    assert_eq!(control.reconcile_required_since, Some(backup_at));
    // While marked, the release before this one (which knows no mark) refuses it.
    assert_eq!(control.min_binary_schema, autopay::store::RECONCILE_SCHEMA);
    let engine = engine_over(&w, restored.clone());
    let check = engine.restore_check().await.unwrap();
    assert_eq!(check, RestoreCheck::Marked { since: backup_at });
    assert!(check.refusal().unwrap().contains("autopay reconcile"));

    // Without the mark (a restore made by other means) the processor's history gives it away.
    restored.set_reconcile_mark(None, &w.audit()).await.unwrap();
    match engine.restore_check().await.unwrap() {
        RestoreCheck::Unknown { count, .. } => assert_eq!(count, 4),
        other => panic!("a restored database went unnoticed: {other:?}"),
    }
    restored
        .set_reconcile_mark(Some(backup_at), &w.audit())
        .await
        .unwrap();
    w.advance(SignedDuration::from_hours(24 * 2));

    // A --since after the backup's time less the key retention and lease is refused.
    let too_late = engine.reconcile(Some(backup_at)).await.unwrap_err();
    assert!(matches!(too_late, ReconcileError::Since(_)), "{too_late}");

    let report = engine.reconcile(None).await.unwrap();
    assert_eq!(report.listed, 7, "{report:?}");
    assert_eq!(report.known, 3, "{report:?}");
    // The three second occurrences were planned after the backup: planned again, then
    // recorded as succeeded. The one-time schedule is not in the backup: a finding.
    assert_eq!(
        (report.planned, report.recorded, report.succeeded),
        (3, 3, 3),
        "{report:?}"
    );
    assert_eq!(report.findings, 1, "{report:?}");
    assert_eq!(engine.restore_check().await.unwrap(), RestoreCheck::Clean);
    assert_eq!(
        restored.control().await.unwrap().min_binary_schema,
        autopay::store::MIN_BINARY_SCHEMA
    );
    // Unmarked and clean, reconcile reads and changes nothing (a daemon may be charging).
    let idle = engine.reconcile(None).await.unwrap();
    assert!(idle.nothing_to_do, "{idle:?}");
    // Marked again (a mark is never moved later), a second run over the same window changes
    // nothing.
    restored
        .set_reconcile_mark(Some(backup_at), &w.audit())
        .await
        .unwrap();
    restored
        .set_reconcile_mark(Some(w.clock.now()), &w.audit())
        .await
        .unwrap();
    assert_eq!(
        restored.control().await.unwrap().reconcile_required_since,
        Some(backup_at)
    );
    let twice = engine
        .reconcile(Some("2026-11-30T00:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!((twice.recorded, twice.known, twice.findings), (0, 6, 1));

    // The findings wait for an operator in `status` until acknowledged.
    let findings = restored.findings(true).await.unwrap();
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].kind, "no_payment");
    assert_eq!(findings[0].schedule_id, one_time.id);
    assert_eq!(restored.status().await.unwrap().findings_open, 1);
    restored
        .acknowledge_finding(findings[0].id, "refunded at the processor", &w.audit())
        .await
        .unwrap();
    assert_eq!(restored.status().await.unwrap().findings_open, 0);

    // Running on the reconciled database charges only what is due now, once, day by day
    // through the third week.
    engine.drain().await.unwrap();
    for _ in 0..6 {
        w.advance(SignedDuration::from_hours(24));
        engine.drain().await.unwrap();
    }
    let after = approved_charges(w.processor.as_ref()).await;
    for (occurrence, charges) in &after {
        assert_eq!(
            charges.len(),
            1,
            "{occurrence:?} was charged twice: {charges:?}"
        );
    }
    // Every weekly schedule paid its third week; nothing else was charged.
    assert_eq!(after.len(), 10, "{after:?}");
    for (_, _, s) in &schedules {
        let paid: Vec<_> = restored
            .list_payments(None, Some(PaymentState::Succeeded))
            .await
            .unwrap()
            .into_iter()
            .filter(|p| p.schedule_id == s.id)
            .collect();
        assert_eq!(paid.len(), 3, "{paid:?}");
    }
}

/// Approved charges in the simulated processor's SQLite ledger beside the database.
fn ledger_charges(dir: &std::path::Path) -> i64 {
    let path = dir.join("simulated-processor.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query_scalar("SELECT COUNT(*) FROM sim_charges WHERE approved")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    })
}

#[test]
fn the_command_line_backs_up_refuses_a_restored_copy_and_reconciles_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::new(Kind::Sqlite));
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    let card = member_with_card(&bin);
    schedule_due_now(&bin, &card, "42.00").ok();
    // Backed up before the first payment is charged; then charged.
    let copy = db.path().join("before-charge.db");
    let out = bin.run(&["backup", copy.to_str().unwrap()]).ok().stdout;
    assert!(out.contains("reconcile required"), "{out}");
    bin.run(&["backup", copy.to_str().unwrap()]).fails_with(73);
    let nowhere = db.path().join("no-such-folder/copy.db");
    bin.run(&["backup", nowhere.to_str().unwrap()])
        .fails_with(73);
    bin.run(&["run", "--drain"]).ok();
    assert_eq!(ledger_charges(db.path()), 1);

    // Restored: the copy is refused (78) with the way out.
    let restored = Bin {
        url: format!("sqlite://{}", copy.display()),
        ..Bin::new(&db)
    };
    let refused = restored.run(&["run", "--drain"]).fails_with(78);
    assert!(
        refused.stderr.contains("autopay reconcile"),
        "{}",
        refused.stderr
    );
    let status = restored.run(&["status"]).ok().stdout;
    assert!(status.contains("RECONCILE REQUIRED"), "{status}");
    restored
        .run(&["reconcile", "--since", "2999-01-01"])
        .fails_with(64);
    restored
        .run(&["reconcile", "--since", "yesterday"])
        .fails_with(64);
    let report = restored.run(&["reconcile", "--json"]).ok().json();
    assert_eq!(report["recorded"], 1, "{report}");
    assert_eq!(report["succeeded"], 1, "{report}");
    // Now it runs, and the payment the backup still had as due is not charged again.
    restored.run(&["run", "--drain"]).ok();
    assert_eq!(ledger_charges(db.path()), 1);
    let payments = restored.run(&["payment", "list", "--json"]).ok().json();
    assert_eq!(payments[0]["state"], "succeeded", "{payments}");

    // `restore-mark` marks a database restored by other means; reconcile clears it.
    let marked = restored.run(&["restore-mark"]).ok().stdout;
    assert!(marked.contains("marked as restored"), "{marked}");
    restored.run(&["run", "--drain"]).fails_with(78);
    restored.run(&["reconcile"]).ok();
    restored.run(&["run", "--drain"]).ok();
    assert_eq!(ledger_charges(db.path()), 1);
}

#[test]
fn a_postgresql_database_is_backed_up_with_pg_dump_not_autopay_backup() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::new(Kind::Postgres));
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    let refused = bin.run(&["backup", "copy.db"]).fails_with(64);
    assert!(refused.stderr.contains("pg_dump"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("restore-mark"),
        "{}",
        refused.stderr
    );
    bin.run(&["restore-mark"]).ok();
    let refused = bin.run(&["run", "--drain"]).fails_with(78);
    assert!(
        refused.stderr.contains("autopay reconcile"),
        "{}",
        refused.stderr
    );
    bin.run(&["reconcile"]).ok();
    bin.run(&["run", "--drain"]).ok();
}
