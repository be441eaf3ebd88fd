//! The crash test: real `autopay run` daemons, killed and frozen while they charge.
//!
//! Three daemons share one PostgreSQL database. The simulated processor keeps its ledger in a
//! PostgreSQL database of its own (the truth about what was charged), drops 5 % of its answers
//! after charging and times out 5 % of its calls before charging. Mail goes to a real SMTP
//! server. While the daemons clear the due payments, one is killed with SIGKILL at random
//! moments and started again, and another is frozen with SIGSTOP for longer than the lease and
//! then resumed. Afterwards, from the ledger and the server:
//!
//! - no payment was charged more than once;
//! - every approved charge is recorded as that payment's success, and every success has its
//!   approved charge;
//! - every payment is terminal (`needs_review` is counted and must say why);
//! - every receipt reached the server at least once, and all copies of one receipt carry one
//!   Message-ID (SMTP has no idempotency: a kill between the server's 250 and the commit may
//!   repeat a message, never lose it).
//!
//! The default is the short run CI makes (about 1,500 payments, four kill-and-restart cycles,
//! one freeze past the lease), which must finish within two minutes. The long run:
//! `AUTOPAY_CRASH_PAYMENTS=10000 AUTOPAY_CRASH_KILLS=200 cargo nextest run crash`.
//! `AUTOPAY_CRASH_SEED` replays a run's chaos (every run prints its seed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use autopay::clock::{Clock, SystemClock};
use sqlx::Row;

use crate::helpers::{Daemon, Kind, Rng, TestDb, env_number, get, load_due_payments};
use crate::smtp_peer::{PeerOptions, SmtpPeer};

/// `processor.timeout` in the run; the lease is the shortest the settings allow with it.
const TIMEOUT_SECS: u64 = 1;
const LEASE_SECS: u64 = TIMEOUT_SECS * 2 + 30;

/// Payments by state.
async fn states(pool: &sqlx::PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT state, COUNT(*) FROM payments GROUP BY state")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Receipts not yet delivered.
async fn receipts_waiting(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM notifications WHERE kind = 'receipt' AND state <> 'sent'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_killed_and_frozen_charge_every_payment_once_and_send_every_receipt() {
    let payments = env_number("AUTOPAY_CRASH_PAYMENTS", 1500) as usize;
    let kills = env_number("AUTOPAY_CRASH_KILLS", 4);
    let short_run = payments <= 1500 && kills <= 4;
    let seed = env_number(
        "AUTOPAY_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("crash test: {payments} payments, {kills} kills, AUTOPAY_CRASH_SEED={seed}");
    let mut dice = Rng(seed);

    let db = TestDb::new(Kind::Postgres).await;
    let ledger = TestDb::new(Kind::Postgres).await;
    let store = db.store().await;
    load_due_payments(store.clone(), payments, SystemClock.now(), Duration::ZERO).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "UPDATE notifications SET state = 'sent', sent_at = created_at WHERE kind = 'setup'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let peer = SmtpPeer::start(PeerOptions::default());
    let logs = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = [
        ("AUTOPAY__DATABASE__URL", db.url.as_str()),
        ("AUTOPAY__DATABASE__MAX_CONNECTIONS", "12"),
        ("AUTOPAY__LOG__FORMAT", "json"),
        ("AUTOPAY__LOG__LEVEL", "warn"),
        ("AUTOPAY__PROCESSOR__SIMULATED__LEDGER", ledger.url.as_str()),
        ("AUTOPAY__PROCESSOR__SIMULATED__LATENCY", "20ms"),
        ("AUTOPAY__PROCESSOR__SIMULATED__DROP_AFTER_CHARGE", "0.05"),
        (
            "AUTOPAY__PROCESSOR__SIMULATED__TIMEOUT_BEFORE_CHARGE",
            "0.05",
        ),
        ("AUTOPAY__PROCESSOR__TIMEOUT", &format!("{TIMEOUT_SECS}s")),
        ("AUTOPAY__PROCESSOR__SETTLE_DELAY", "2s"),
        ("AUTOPAY__PROCESSOR__MAX_REQUESTS_PER_SECOND", "1000"),
        ("AUTOPAY__DAEMON__LEASE", &format!("{LEASE_SECS}s")),
        ("AUTOPAY__DAEMON__SHUTDOWN_GRACE", "5s"),
        ("AUTOPAY__DAEMON__POLL_INTERVAL", "1s"),
        ("AUTOPAY__DAEMON__CONCURRENCY", "8"),
        ("AUTOPAY__PAYMENTS__BREAKER_MIN_ATTEMPTS", "1000000"),
        ("AUTOPAY__REMINDERS__DAYS_BEFORE", "0"),
        ("AUTOPAY__REMINDERS__CARD_EXPIRY_DAYS", "0"),
        ("AUTOPAY__EMAIL__TRANSPORT", "smtp"),
        ("AUTOPAY__EMAIL__SMTP__HOST", "127.0.0.1"),
        ("AUTOPAY__EMAIL__SMTP__PORT", &peer.port.to_string()),
        ("AUTOPAY__EMAIL__SMTP__TLS", "none"),
        ("AUTOPAY__EMAIL__SMTP__TIMEOUT", "5s"),
        ("AUTOPAY__EMAIL__MAX_PER_SECOND", "1000"),
        ("AUTOPAY__EMAIL__RETRY_DELAYS", "1s"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();

    let started = Instant::now();
    let mut killed = Daemon::start("killed", &env, logs.path());
    let mut frozen = Daemon::start("frozen", &env, logs.path());
    let mut steady = Daemon::start("steady", &env, logs.path());

    // The chaos: the frozen daemon stops for longer than the lease once; the other is killed
    // and started again `kills` times.
    let freeze_at = started + dice.millis(1000, 3000);
    let thaw_at = freeze_at + Duration::from_secs(LEASE_SECS + 5);
    let mut frozen_now = false;
    let mut thawed = false;
    let mut kills_done = 0;
    let mut next_kill = started + dice.millis(500, 3000);
    let mut probed = false;
    let deadline = started + Duration::from_secs(if short_run { 150 } else { 3600 });
    loop {
        let now = Instant::now();
        if !frozen_now && !thawed && now >= freeze_at {
            frozen.signal(libc::SIGSTOP);
            frozen_now = true;
        }
        if frozen_now && now >= thaw_at {
            frozen.signal(libc::SIGCONT);
            frozen_now = false;
            thawed = true;
        }
        if kills_done < kills && now >= next_kill {
            killed.kill();
            std::thread::sleep(dice.millis(100, 600));
            killed.spawn();
            kills_done += 1;
            next_kill = Instant::now()
                + if short_run {
                    dice.millis(1000, 5000)
                } else {
                    dice.millis(200, 1500)
                };
        }
        if !probed && Instant::now() >= started + Duration::from_secs(4) {
            // While three daemons share the database, each answers on its own port. The frozen
            // one may be stopped now; the other two must answer.
            for d in [&steady, &killed] {
                // The killed one may have just been started again: it answers once it has
                // checked the database and the processor.
                let deadline = Instant::now() + Duration::from_secs(15);
                let (code, body) = loop {
                    match get(d.port, "/healthz") {
                        Some(answer) => break answer,
                        None if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(100))
                        }
                        None => break (0, String::new()),
                    }
                };
                assert_eq!(code, 200, "{} /healthz: {body}", d.name);
                let (code, body) = get(d.port, "/metrics").unwrap_or((0, String::new()));
                assert_eq!(code, 200, "{} /metrics", d.name);
                assert!(
                    body.contains("autopay_payments{"),
                    "{} /metrics: {body}",
                    d.name
                );
                let (code, body) = get(d.port, "/readyz").unwrap_or((0, String::new()));
                assert!(
                    matches!(code, 200 | 503) && body.contains("\"database\":\"ok\""),
                    "{} /readyz: {code} {body}",
                    d.name
                );
            }
            probed = true;
        }
        let s = states(&pool).await;
        let open: i64 = ["scheduled", "processing", "retry_wait", "unknown"]
            .iter()
            .map(|k| s.get(*k).copied().unwrap_or(0))
            .sum();
        if probed
            && thawed
            && kills_done >= kills
            && open == 0
            && receipts_waiting(&pool).await == 0
        {
            break;
        }
        if Instant::now() >= deadline {
            let waiting = receipts_waiting(&pool).await;
            let kept = logs.keep();
            panic!(
                "not settled in time: {s:?}, {waiting} receipts waiting; daemon logs in {}",
                kept.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    for d in [&mut killed, &mut frozen, &mut steady] {
        d.stop();
    }
    eprintln!(
        "crash test settled in {elapsed:?}: {:?}",
        states(&pool).await
    );

    // From the ledger: what was charged, per payment.
    let ledger_pool = sqlx::PgPool::connect(&ledger.url).await.unwrap();
    let charges = sqlx::query("SELECT payment_id, attempt, approved, reference FROM sim_charges")
        .fetch_all(&ledger_pool)
        .await
        .unwrap();
    let mut approved: HashMap<uuid::Uuid, Vec<String>> = HashMap::new();
    for row in &charges {
        if row.get::<bool, _>("approved") {
            approved
                .entry(row.get("payment_id"))
                .or_default()
                .push(row.get("reference"));
        }
    }
    let twice: Vec<_> = approved.iter().filter(|(_, refs)| refs.len() > 1).collect();
    assert!(twice.is_empty(), "charged more than once: {twice:?}");
    let recorded = sqlx::query("SELECT id, state, processor_reference, reason FROM payments")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(recorded.len(), payments);
    let mut review = Vec::new();
    for row in &recorded {
        let id: uuid::Uuid = row.get("id");
        let state: String = row.get("state");
        let reference: Option<String> = row.get("processor_reference");
        let charged = approved.get(&id).and_then(|r| r.first());
        match state.as_str() {
            "succeeded" => assert_eq!(
                reference.as_ref(),
                charged,
                "payment {id} is recorded as paid with a charge the ledger must hold"
            ),
            "needs_review" => {
                let reason: Option<String> = row.get("reason");
                assert!(
                    reason.is_some(),
                    "payment {id} needs review without a reason"
                );
                review.push((id, reason, charged.cloned()));
            }
            other => {
                assert!(
                    matches!(other, "failed" | "skipped" | "cancelled" | "missed"),
                    "payment {id} is not terminal: {other}"
                );
                assert!(
                    charged.is_none(),
                    "payment {id} ({other}) was charged: {charged:?}"
                );
            }
        }
    }
    eprintln!("needs_review: {} {review:?}", review.len());

    // From the SMTP server: every receipt at least once, one Message-ID per receipt.
    let receipts: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM notifications WHERE kind = 'receipt'")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    let succeeded = recorded
        .iter()
        .filter(|r| r.get::<String, _>("state") == "succeeded")
        .count();
    assert_eq!(receipts.len(), succeeded, "one receipt per success");
    let mut ids_by_confirmation: HashMap<String, HashSet<String>> = HashMap::new();
    let mut delivered: HashSet<String> = HashSet::new();
    let mut copies = 0;
    for message in peer.received() {
        let parsed = mail_parser::MessageParser::default()
            .parse(&message.raw)
            .expect("a parsable message");
        let message_id = parsed.message_id().unwrap_or_default().to_string();
        let text = parsed.body_text(0).unwrap_or_default().to_string();
        let Some(confirmation) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Confirmation:"))
            .map(|c| c.trim().to_string())
        else {
            continue;
        };
        copies += 1;
        let notification = message_id.split('@').next().unwrap_or("").to_string();
        delivered.insert(notification);
        ids_by_confirmation
            .entry(confirmation)
            .or_default()
            .insert(message_id);
    }
    let lost: Vec<_> = receipts.difference(&delivered).collect();
    assert!(lost.is_empty(), "receipts never delivered: {lost:?}");
    let split: Vec<_> = ids_by_confirmation
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    assert!(
        split.is_empty(),
        "one receipt under several Message-IDs: {split:?}"
    );
    eprintln!(
        "receipts: {} delivered in {copies} messages ({} repeated)",
        delivered.len(),
        copies - delivered.len()
    );
    if short_run {
        assert!(
            elapsed < Duration::from_secs(120),
            "the short run must settle within two minutes; it took {elapsed:?}"
        );
    }
    drop(store);
}
