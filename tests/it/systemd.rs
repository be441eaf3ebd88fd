//! What running under systemd relies on: the real `autopay run` speaks the notification
//! protocol (READY, STATUS, WATCHDOG, STOPPING) to a socket the test binds where systemd's would
//! be; every database wait is bounded, and a long mail pass reports as it goes (so an outage or
//! a slow server is something the loops report, never a stall the watchdog kills).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use autopay::clock::{Clock, SystemClock};
use autopay::daemon::Daemon;
use autopay::daemon::systemd::{Notifier, socket_address};
use autopay::domain::member::AccountType;
use autopay::health::Health;
use autopay::notify::dispatcher::Dispatcher;
use autopay::notify::mailer::{Mail, Mailer, SendError};
use autopay::notify::templates::Templates;
use autopay::store::postgres::PgStore;
use autopay::store::sqlite::SqliteStore;
use autopay::store::{NewNotification, StoreError, WAIT_LIMIT};

use crate::engine::World;
use crate::helpers::{Bin, Kind, TestDb};

/// systemd's end of `$NOTIFY_SOCKET`: a datagram socket bound in the test's folder.
struct Systemd {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Systemd {
    fn listen(db: &TestDb) -> Systemd {
        let path = db.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Systemd { socket, path }
    }

    /// The next notification, one line per assignment, if one comes before `deadline`.
    fn next(&self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Every notification until one has the line `wanted`, which must come within `within`.
    fn until(&self, wanted: &str, within: Duration, daemon: &mut Service) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut heard = Vec::new();
        while let Some(message) = self.next(deadline) {
            let done = message.lines().any(|l| l == wanted);
            heard.push(message);
            if done {
                return heard;
            }
        }
        panic!(
            "no {wanted} within {within:?}; heard {heard:?}\nautopay's log:\n{}",
            daemon.log()
        );
    }

    /// The next `STATUS=` line, which must come within `within`.
    fn status(&self, within: Duration, daemon: &mut Service) -> String {
        let deadline = Instant::now() + within;
        while let Some(message) = self.next(deadline) {
            if let Some(line) = message.lines().find(|l| l.starts_with("STATUS=")) {
                return line.to_string();
            }
        }
        panic!("no STATUS= within {within:?}\n{}", daemon.log());
    }

    /// Every notification for `long`.
    fn during(&self, long: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + long;
        std::iter::from_fn(|| self.next(deadline).map(|m| (Instant::now(), m))).collect()
    }
}

/// `autopay run` started by the test, killed if the test ends first.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still ours.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// The exit code, if the process ends within `within`.
    fn exit_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn under_systemd_run_says_ready_pings_the_watchdog_and_says_stopping_on_sigterm() {
    let db = TestDb::new(Kind::Sqlite).await;
    let systemd = Systemd::listen(&db);
    let log = db.path().join("autopay.log");
    let bin = Bin::new(&db)
        .with_env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .with_env("WATCHDOG_USEC", "2000000")
        // The watchdog lets each loop stay silent for 1s: the idle worker must look sooner.
        .with_env("AUTOPAY__DAEMON__POLL_INTERVAL", "200ms");
    let child = bin
        .command(&["run"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start autopay run");
    let mut daemon = Service { child, log };

    // Start-up (a new SQLite file, created and migrated) ends with READY=1 and the status.
    let start = systemd.until("READY=1", Duration::from_secs(60), &mut daemon);
    assert!(
        start.iter().all(|m| !m.contains("STATUS=stalled")),
        "{start:?}"
    );
    let status = systemd.status(Duration::from_secs(5), &mut daemon);
    assert!(status.starts_with("STATUS=charging; worker "), "{status}");

    // Pings every second (half of WATCHDOG_USEC) while the loops run.
    let heard = systemd.during(Duration::from_millis(4500));
    let pings: Vec<Instant> = heard
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        pings.len() >= 3,
        "{} pings in 4.5s: {heard:?}\n{}",
        pings.len(),
        daemon.log()
    );

    // SIGTERM: STOPPING=1 at once, then exit 0 well within daemon.shutdown_grace (45s).
    daemon.sigterm();
    systemd.until("STOPPING=1", Duration::from_secs(5), &mut daemon);
    let code = daemon.exit_within(Duration::from_secs(45));
    assert_eq!(code, Some(0), "{}", daemon.log());
}

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

/// Queues `n` receipts, each for a member of its own.
async fn queue_receipts(w: &World, n: usize) {
    for i in 0..n {
        let member = w
            .member(&format!("A-1003{i:02}"), AccountType::IndividualFamily)
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
    queue_receipts(&w, 4).await;
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

/// A mail server that counts how many messages it is given at once.
struct CountingMailer {
    in_flight: usize,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Mailer for CountingMailer {
    fn name(&self) -> &'static str {
        "counting"
    }
    async fn send(&self, _mail: &Mail) -> Result<(), SendError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.now.fetch_sub(1, SeqCst);
        Ok(())
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[tokio::test]
async fn a_mail_pass_sends_as_many_messages_at_once_as_the_mailer_takes_and_no_more() {
    let w = World::with_settings(Kind::Sqlite, &[("AUTOPAY__EMAIL__MAX_PER_SECOND", "1000")]).await;
    queue_receipts(&w, 12).await;
    let mailer = Arc::new(CountingMailer {
        in_flight: 3,
        now: Default::default(),
        most: Default::default(),
    });
    let dispatcher = Dispatcher::new(
        &w.settings,
        w.store.clone(),
        mailer.clone(),
        Arc::new(Templates::builtin()),
        w.clock.clone(),
        "test-dispatcher".into(),
    )
    .unwrap();
    let report = dispatcher.drain().await.unwrap();
    assert_eq!(report.sent, 12);
    assert_eq!(
        mailer.most.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "three messages in flight at once, never more"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_run_in_process_tells_the_notifier_it_is_given() {
    let db = TestDb::new(Kind::Sqlite).await;
    db.store().await;
    let socket_path = db.path().join("notify.sock");
    let systemd = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let addr = socket_address(socket_path.as_os_str()).unwrap();
    let settings = crate::engine::settings(&[
        ("AUTOPAY__DATABASE__URL", &db.url),
        ("AUTOPAY__PROCESSOR__SIMULATED__LATENCY", "0s"),
    ]);
    let daemon = Daemon::build(settings, Arc::new(SystemClock))
        .await
        .unwrap()
        .with_notifier(Notifier::to_address(Some(addr), None).unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(daemon.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let next = || async {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), systemd.recv(&mut buf))
            .await
            .expect("a notification within 10s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next().await, "READY=1");
    assert!(next().await.starts_with("STATUS=charging; worker "));
    stop.send(()).unwrap();
    assert_eq!(next().await, "STOPPING=1");
    assert!(next().await.starts_with("STATUS=stopping: "));
    run.await.unwrap().unwrap();
}

/// The owners of every file in `dir`, by name.
fn owners(dir: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().uid(),
            )
        })
        .collect()
}

#[tokio::test]
async fn root_is_refused_the_daemons_sqlite_database_and_leaves_no_file_behind() {
    // The daemon's database, owned by its user (uid 65534 here); the test runs as root.
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    let before = owners(db.path());
    for (name, _) in &before {
        std::os::unix::fs::chown(db.path().join(name), Some(65534), Some(65534))
            .expect("chown to uid 65534: this test runs as root, as CI does");
    }
    let daemon_user = autopay::users::name(65534);

    for command in [
        &["status"][..],
        &["migrate"],
        &["run", "--drain"],
        &["member", "list"],
    ] {
        let run = bin.run(command).fails_with(78);
        assert!(
            run.stderr.contains(&format!("belongs to {daemon_user}"))
                && run
                    .stderr
                    .contains(&format!("sudo -u {daemon_user} autopay")),
            "{command:?}: {}",
            run.stderr
        );
    }
    // Nothing root would own was created beside it (a -wal, a ledger, mail).
    let after = owners(db.path());
    assert_eq!(after.len(), before.len(), "{after:?}");
    assert!(after.iter().all(|(_, uid)| *uid == 65534), "{after:?}");

    // A database not created yet, in a folder the daemon's user owns: refused too.
    for (name, _) in &before {
        std::fs::remove_file(db.path().join(name)).unwrap();
    }
    std::os::unix::fs::chown(db.path(), Some(65534), Some(65534)).unwrap();
    let run = bin.run(&["run", "--drain"]).fails_with(78);
    assert!(run.stderr.contains("folder"), "{}", run.stderr);
    assert!(owners(db.path()).is_empty(), "{:?}", owners(db.path()));
}
