//! Fault tests: one real `autopay run` daemon while a peer fails under it, over real connections.
//!
//! - **PostgreSQL restarted mid-run.** The test makes a PostgreSQL cluster of its own ([`PgCluster`]:
//!   `initdb` and `pg_ctl` into a temporary folder, on a free port of 127.0.0.1, as the `postgres`
//!   user when the test runs as root) and stops it with `pg_ctl stop -m fast` while payments fall
//!   due, then starts it again. The daemon stays up and alive, `/readyz` names the database while
//!   it is down and turns green by itself, and every payment is charged once (the simulated
//!   processor's ledger, a SQLite file, is the truth) and receipted once.
//! - **SMTP down, then a wrong password.** The aiosmtpd peer is stopped, then started again, then
//!   restarted demanding another password, then with the daemon's. Charging never waits for mail.
//!   An unreachable server and a refused password each pause mail (`/readyz`, `autopay status`,
//!   `/metrics`) with the reason, messages wait and are tried again on `email.retry_delays`, and
//!   the first message delivered afterwards lifts the pause and sends everything that waited.
//!   Every notification arrives, each under one Message-ID however many copies.
//!
//! Neither test touches the machine's shared PostgreSQL service: the first runs its own cluster
//! and the second runs on SQLite. A missing `initdb`, `pg_ctl` or `runuser` fails the first with
//! what to install, never a skip (and the SMTP peer says what it lacks the same way).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use autopay::clock::{Clock, SystemClock};
use autopay::config::DatabaseUrl;
use autopay::domain::ids::PaymentId;
use autopay::domain::payment::PaymentState;
use autopay::store::{self, Store};
use mail_parser::MessageParser;
use sqlx::Row;

use crate::helpers::{
    Bin, Daemon, Kind, TestDb, free_port, get, load_due_payments, member_with_card,
    schedule_due_now,
};
use crate::smtp_peer::{PeerOptions, SmtpPeer};

/// Where Debian and Ubuntu install each PostgreSQL version's server binaries.
const PG_LIB: &str = "/usr/lib/postgresql";
/// What to install when they are missing.
const PG_FIX: &str =
    "install PostgreSQL's server (Debian/Ubuntu: apt-get install postgresql; bash .ci/run does it)";

/// A PostgreSQL cluster of the test's own, in a temporary folder, listening on a free port of
/// 127.0.0.1 only (and on a socket in that folder), trusting every local connection. Dropping it
/// stops it with `pg_ctl stop -m immediate`, also when the test panics.
struct PgCluster {
    port: u16,
    /// The server's binaries: /usr/lib/postgresql/N/bin, the newest N installed.
    bin: PathBuf,
    /// `runuser`, when the test runs as root: initdb and postgres refuse to run as root, so they
    /// run as `postgres`.
    runuser: Option<PathBuf>,
    data: PathBuf,
    log: PathBuf,
    /// Last, so that it is removed after `drop` has stopped the server.
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// initdb, then start. Panics, saying what to install, when PostgreSQL's server binaries or
    /// `runuser` are missing.
    fn start() -> PgCluster {
        let bin = pg_server_binaries();
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new()
            .prefix("autopay-pg-")
            .tempdir()
            .expect("a temporary folder for the PostgreSQL cluster");
        let runuser = root.then(|| {
            let runuser = find_runuser();
            let (uid, gid) = (postgres_id("-u"), postgres_id("-g"));
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the cluster's folder to the postgres user");
            runuser
        });
        let cluster = PgCluster {
            port: free_port(),
            bin,
            runuser,
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            dir,
        };
        let data = cluster.data.to_string_lossy().into_owned();
        let initdb = cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ],
        );
        assert!(
            initdb.status.success(),
            "initdb failed ({}):\n{}{}",
            initdb.status,
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
        cluster.start_server();
        cluster
    }

    /// A PostgreSQL program of this cluster's version, as `postgres` when the test is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match &self.runuser {
            Some(runuser) => {
                let mut c = Command::new(runuser);
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        // The postgres user may not be able to read the test's own working directory.
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} from {}: {e}", self.bin.display()))
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data.to_string_lossy().into_owned();
        let mut all = vec!["-D", data.as_str(), "-w", "-t", "30"];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// Starts the server on its port and waits until it accepts connections.
    fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.log.to_string_lossy().into_owned();
        let out = self.pg_ctl(&["-l", &log, "-o", &options, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}):\n{}{}\n--- server log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// `pg_ctl stop -m fast`: every session is ended, the server shuts down cleanly.
    fn stop_fast(&self) {
        let out = self.pg_ctl(&["-m", "fast", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database; its URL.
    async fn create_database(&self, name: &str) -> String {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap_or_else(|e| panic!("the test's own PostgreSQL on port {}: {e}", self.port));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE on the test's own PostgreSQL");
        self.url(name)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Whatever state the test left it in; an error (already stopped) is of no interest.
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}

/// The newest /usr/lib/postgresql/N/bin holding initdb and pg_ctl.
fn pg_server_binaries() -> PathBuf {
    let newest = std::fs::read_dir(PG_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL fault test runs a cluster of its own and needs initdb and pg_ctl in \
             {PG_LIB}/*/bin, and there are none: {PG_FIX}"
        ),
    }
}

fn find_runuser() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("runuser"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the PostgreSQL fault test runs as root, and initdb and postgres refuse root: it \
                 needs runuser to run them as the postgres user, and there is none: install \
                 util-linux (apt-get install util-linux)"
            )
        })
}

/// `id -u postgres` or `id -g postgres`.
fn postgres_id(which: &str) -> u32 {
    let out = Command::new("id")
        .args([which, "postgres"])
        .output()
        .expect("run id");
    assert!(
        out.status.success(),
        "the PostgreSQL fault test runs initdb and postgres as the user postgres, and there is no \
         such user: {PG_FIX} (the package creates it)"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("id prints a number")
}

/// Polls `done` every 100 ms until it holds; fails after `within`, saying what did not happen.
async fn eventually<F, Fut>(within: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/readyz`: its status code and JSON body (0 and Null when it does not answer).
fn readyz(d: &Daemon) -> (u16, serde_json::Value) {
    let (code, body) = get(d.port, "/readyz").unwrap_or((0, String::new()));
    (code, serde_json::from_str(&body).unwrap_or_default())
}

fn healthz(d: &Daemon) -> u16 {
    get(d.port, "/healthz").map_or(0, |(code, _)| code)
}

/// The daemon's working folder, where its logs go: kept when the test fails, and named, so that
/// the logs can be read.
struct Workdir(Option<tempfile::TempDir>);

impl Workdir {
    fn new() -> Workdir {
        Workdir(Some(tempfile::tempdir().expect("a temporary folder")))
    }

    fn path(&self) -> &Path {
        self.0
            .as_ref()
            .expect("the folder lives as long as the test")
            .path()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!(
                "the daemon's folder and logs are kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// What the daemon logged (its stderr), for a failure's message.
fn daemon_log(dir: &Path, name: &str) -> String {
    let log = std::fs::read_to_string(dir.join(format!("{name}-1.err"))).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn payments_in(store: &Arc<dyn Store>, state: PaymentState) -> usize {
    store
        .list_payments(None, None)
        .await
        .map(|ps| ps.iter().filter(|p| p.state == state).count())
        .unwrap_or(0)
}

/// Notifications of `kind` (all kinds for None) by state.
async fn outbox(store: &Arc<dyn Store>, kind: Option<&str>) -> BTreeMap<String, usize> {
    let mut by_state = BTreeMap::new();
    for n in store.notifications(None).await.unwrap_or_default() {
        if kind.is_none_or(|k| n.kind == k) {
            *by_state.entry(n.state).or_default() += 1;
        }
    }
    by_state
}

/// Payments in the PostgreSQL test: one falls due every second from three seconds after the
/// start, so some are charged before the outage, some fall due during it and some after.
const PG_PAYMENTS: usize = 20;
/// How long the cluster stays down: longer than the 10 s every database wait is bounded by, so
/// that a charge answered during the outage cannot be recorded, and its payment is settled by
/// lookup once its claim expires.
const PG_DOWN: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_leaves_the_daemon_up_and_every_payment_charged_and_receipted_once()
 {
    let started = Instant::now();
    let cluster = PgCluster::start();
    let url = cluster.create_database("autopay").await;
    let work = Workdir::new();
    let bin = Bin {
        url: url.clone(),
        cwd: work.path().to_path_buf(),
        env: Vec::new(),
        umask: None,
    };
    bin.run(&["migrate"]).ok();
    let store = store::open(&DatabaseUrl::parse(&url, None).unwrap(), 4)
        .await
        .unwrap();
    let first_due = SystemClock
        .now()
        .checked_add(jiff::SignedDuration::from_secs(3))
        .unwrap();
    load_due_payments(
        store.clone(),
        PG_PAYMENTS,
        first_due,
        Duration::from_secs(1),
    )
    .await;
    let ledger = work.path().join("ledger.db");
    let ledger_url = format!("sqlite://{}", ledger.display());
    let env = settings(&[
        ("AUTOPAY__DATABASE__URL", &url),
        ("AUTOPAY__DATABASE__MAX_CONNECTIONS", "8"),
        ("AUTOPAY__LOG__FORMAT", "json"),
        ("AUTOPAY__LOG__LEVEL", "info"),
        ("AUTOPAY__PROCESSOR__SIMULATED__LEDGER", &ledger_url),
        // Long enough that the test catches a charge in flight and stops the database under it.
        ("AUTOPAY__PROCESSOR__SIMULATED__LATENCY", "2500ms"),
        ("AUTOPAY__PROCESSOR__TIMEOUT", "4s"),
        ("AUTOPAY__PROCESSOR__SETTLE_DELAY", "5s"),
        // The shortest the settings allow: a claim the outage orphaned is taken over soon.
        ("AUTOPAY__DAEMON__LEASE", "38s"),
        ("AUTOPAY__DAEMON__SHUTDOWN_GRACE", "5s"),
        // The default poll, and the planner's backstop hourly: a payment the command line adds
        // after the outage is claimed at once only if the daemon LISTENs again.
        ("AUTOPAY__DAEMON__POLL_INTERVAL", "30s"),
        ("AUTOPAY__DAEMON__PLANNER_CRON", "0 0 * * * *"),
        ("AUTOPAY__PAYMENTS__BREAKER_MIN_ATTEMPTS", "1000000"),
        ("AUTOPAY__REMINDERS__DAYS_BEFORE", "0"),
        ("AUTOPAY__REMINDERS__CARD_EXPIRY_DAYS", "0"),
        ("AUTOPAY__EMAIL__TRANSPORT", "file"),
        ("AUTOPAY__EMAIL__FOLDER", "mail"),
        ("AUTOPAY__EMAIL__RETRY_DELAYS", "1s"),
        ("AUTOPAY__EMAIL__MAX_PER_SECOND", "1000"),
    ]);
    let mut daemon = Daemon::start("pg-restart", &env, work.path());
    let log = || daemon_log(work.path(), "pg-restart");
    eventually(Duration::from_secs(20), "the daemon ready", || async {
        readyz(&daemon).0 == 200
    })
    .await;

    // Some payments are charged before the outage.
    eventually(
        Duration::from_secs(30),
        "three payments charged",
        || async { payments_in(&store, PaymentState::Succeeded).await >= 3 },
    )
    .await;
    // The database goes while a charge request is in flight: its answer comes during the outage.
    let looking = Instant::now();
    let in_flight = loop {
        if let Some(id) = charge_in_flight(&store).await {
            break id;
        }
        assert!(
            looking.elapsed() < Duration::from_secs(10),
            "no charge request in flight within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cluster.stop_fast();
    let down = Instant::now();
    eprintln!(
        "{:?}: PostgreSQL stopped while payment {in_flight} was being charged",
        started.elapsed()
    );

    // Down: not ready, and the reason names the database; alive all along, never exited.
    let mut seen_not_ready = None;
    while down.elapsed() < PG_DOWN {
        assert_eq!(
            healthz(&daemon),
            200,
            "/healthz while the database is down\n{}",
            log()
        );
        assert_eq!(
            daemon.wait(Duration::ZERO),
            None,
            "the daemon exited while the database was down\n{}",
            log()
        );
        if seen_not_ready.is_none() {
            let (code, json) = readyz(&daemon);
            if code != 200 {
                seen_not_ready = Some((code, json));
                // A scrape waits on the database once, not once per read: it answers well
                // inside a scraper's 10 s timeout.
                let asked = Instant::now();
                let (code, _) = get(daemon.port, "/metrics").unwrap_or((0, String::new()));
                assert_eq!(code, 200, "/metrics while the database is down");
                assert!(
                    asked.elapsed() < Duration::from_secs(6),
                    "/metrics took {:?} while the database was down",
                    asked.elapsed()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, json) = seen_not_ready.unwrap_or_else(|| {
        panic!(
            "/readyz stayed 200 for {PG_DOWN:?} without its database\n{}",
            log()
        )
    });
    assert_eq!(code, 503, "{json}");
    assert_eq!(json["ready"], false, "{json}");
    let database = json["checks"]["database"].as_str().unwrap_or_default();
    assert!(
        !database.is_empty() && database != "ok",
        "/readyz must name the database check: {json}"
    );
    eprintln!("/readyz while down: {json}");

    // Back: ready again by itself, the same process.
    cluster.start_server();
    let up = Instant::now();
    eventually(
        Duration::from_secs(30),
        "/readyz 200 after the database came back",
        || async { readyz(&daemon).0 == 200 },
    )
    .await;
    eprintln!(
        "{:?}: ready again {:?} after PostgreSQL came back",
        started.elapsed(),
        up.elapsed()
    );
    assert_eq!(daemon.wait(Duration::ZERO), None, "the same daemon runs on");

    // It listens again: once the worker is idle (nothing due for a while, the charges in flight
    // answered; the claims the outage orphaned expire later), a payment the command line adds is
    // claimed within a second or two, not at the next poll (30 s).
    let idle = || async {
        let soon = SystemClock
            .now()
            .checked_add(jiff::SignedDuration::from_secs(5))
            .unwrap();
        store
            .next_wakeup()
            .await
            .is_ok_and(|at| at.is_none_or(|at| at > soon))
    };
    eventually(
        Duration::from_secs(30),
        "nothing due for five seconds",
        idle,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(idle().await, "nothing fell due meanwhile");
    let known: BTreeSet<PaymentId> = store
        .list_payments(None, None)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    let card = member_with_card(&bin);
    schedule_due_now(&bin, &card, "20.00").ok();
    let added = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the payment the command line added claimed",
        || async {
            store
                .list_payments(None, None)
                .await
                .unwrap_or_default()
                .iter()
                .any(|p| !known.contains(&p.id) && p.state != PaymentState::Scheduled)
        },
    )
    .await;
    let claimed = added.elapsed();
    eprintln!(
        "{:?}: a payment the command line added was claimed {claimed:?} later",
        started.elapsed()
    );
    assert!(
        claimed < Duration::from_secs(2),
        "claimed {claimed:?} after the command line wrote it: the daemon did not LISTEN again\n{}",
        log()
    );
    let total = PG_PAYMENTS + 1;

    // Everything settles: payments charged in flight or claimed when the database went are
    // settled by lookup once their claim expires.
    eventually(
        Duration::from_secs(75),
        "every payment succeeded and every receipt sent",
        || async {
            payments_in(&store, PaymentState::Succeeded).await == total
                && outbox(&store, Some("receipt")).await.get("sent") == Some(&total)
        },
    )
    .await;
    eprintln!("{:?}: all settled", started.elapsed());
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait(Duration::from_secs(15)),
        Some(0),
        "SIGTERM after the outage exits 0\n{}",
        log()
    );

    // The ledger: exactly one approved charge per payment, the one each payment records.
    let payments = store.list_payments(None, None).await.unwrap();
    assert_eq!(payments.len(), total);
    let ledger_pool = sqlx::SqlitePool::connect(&format!("{ledger_url}?mode=ro"))
        .await
        .unwrap();
    let mut approved: HashMap<String, Vec<String>> = HashMap::new();
    for row in sqlx::query("SELECT payment_id, reference FROM sim_charges WHERE approved = 1")
        .fetch_all(&ledger_pool)
        .await
        .unwrap()
    {
        approved
            .entry(row.get("payment_id"))
            .or_default()
            .push(row.get("reference"));
    }
    for p in &payments {
        assert_eq!(p.state, PaymentState::Succeeded, "{p:?}");
        let charges = approved.remove(&p.id.to_string()).unwrap_or_default();
        assert_eq!(
            charges.len(),
            1,
            "payment {} has {} approved charges in the ledger: {charges:?}",
            p.id,
            charges.len()
        );
        assert_eq!(p.processor_reference.as_ref(), Some(&charges[0]), "{p:?}");
    }
    assert!(approved.is_empty(), "charges of no payment: {approved:?}");

    // The receipts: one per payment, each one .eml file under its own Message-ID.
    let receipts: Vec<_> = store
        .notifications(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.kind == "receipt")
        .collect();
    let keys: BTreeSet<String> = receipts.iter().map(|n| n.dedupe_key.clone()).collect();
    let wanted: BTreeSet<String> = payments
        .iter()
        .map(|p| format!("receipt:{}", p.id))
        .collect();
    assert_eq!(keys, wanted, "one receipt per payment");
    assert_eq!(receipts.len(), total);
    let mut files: BTreeSet<String> = BTreeSet::new();
    for entry in std::fs::read_dir(work.path().join("mail")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "a half-written message: {name}");
        if let Some(id) = name.strip_suffix("-receipt.eml") {
            let raw = std::fs::read(work.path().join("mail").join(&name)).unwrap();
            let parsed = MessageParser::default().parse(&raw).expect("a message");
            assert_eq!(
                parsed.message_id(),
                Some(format!("{id}@example.org").as_str()),
                "{name}"
            );
            files.insert(id.to_string());
        }
    }
    let ids: BTreeSet<String> = receipts.iter().map(|n| n.id.to_string()).collect();
    assert_eq!(files, ids, "exactly one receipt file per receipt");
    let resent = receipts.iter().filter(|n| n.attempts > 1).count();

    // The charge answered while the database was down was recorded by a lookup, not sent again.
    let calls = store.calls(in_flight).await.unwrap();
    let kinds: Vec<&str> = calls.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["charge", "lookup"],
        "payment {in_flight}, in flight when the database went: {calls:?}"
    );
    eprintln!(
        "{:?}: {total} payments charged once each; {} receipt files ({resent} written more than once)",
        started.elapsed(),
        files.len()
    );
}

/// A payment whose charge request has been written and not answered yet.
/// A payment whose charge request went out within the last 300 ms and has no answer yet: with
/// the processor's 2.5 s latency, its answer comes well after the database is stopped (a
/// request caught near its end could be answered and recorded before the stop lands).
async fn charge_in_flight(store: &Arc<dyn Store>) -> Option<PaymentId> {
    let recent = SystemClock.now() - jiff::SignedDuration::from_millis(300);
    for p in store.list_payments(None, None).await.ok()? {
        if p.state == PaymentState::Processing
            && store
                .calls(p.id)
                .await
                .ok()?
                .iter()
                .any(|c| c.kind == "charge" && c.outcome.is_none() && c.started_at > recent)
        {
            return Some(p.id);
        }
    }
    None
}

const USER: &str = "autopay";
const PASSWORD: &str = "the-right-mail-pw";
/// Payments in the SMTP test: one falls due every 1.5 s from two seconds after the start, so
/// receipts are written before, during and after each fault.
const MAIL_PAYMENTS: usize = 30;
/// How long the SMTP server stays down.
const SMTP_DOWN: Duration = Duration::from_secs(15);
/// How long it refuses the daemon's password.
const SMTP_REFUSING: Duration = Duration::from_secs(6);

/// The value of one series on `/metrics` (0 when absent).
fn metric(d: &Daemon, series: &str) -> f64 {
    get(d.port, "/metrics")
        .and_then(|(_, body)| {
            body.lines().find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_then_refusing_the_password_never_holds_charging_and_every_notification_arrives_under_one_message_id()
 {
    let started = Instant::now();
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    let store = db.store().await;
    let mut peer = SmtpPeer::start(PeerOptions {
        starttls: true,
        wrapper: false,
        auth: Some((USER.into(), PASSWORD.into())),
    });
    let first_due = SystemClock
        .now()
        .checked_add(jiff::SignedDuration::from_secs(2))
        .unwrap();
    load_due_payments(
        store.clone(),
        MAIL_PAYMENTS,
        first_due,
        Duration::from_millis(1500),
    )
    .await;
    let port = peer.port.to_string();
    let ca = peer.ca_pem.display().to_string();
    let env = settings(&[
        ("AUTOPAY__DATABASE__URL", &db.url),
        ("AUTOPAY__LOG__FORMAT", "json"),
        ("AUTOPAY__LOG__LEVEL", "info"),
        ("AUTOPAY__PROCESSOR__SIMULATED__LATENCY", "20ms"),
        ("AUTOPAY__DAEMON__POLL_INTERVAL", "1s"),
        ("AUTOPAY__REMINDERS__DAYS_BEFORE", "0"),
        ("AUTOPAY__REMINDERS__CARD_EXPIRY_DAYS", "0"),
        ("AUTOPAY__EMAIL__TRANSPORT", "smtp"),
        ("AUTOPAY__EMAIL__SMTP__HOST", "127.0.0.1"),
        ("AUTOPAY__EMAIL__SMTP__PORT", &port),
        ("AUTOPAY__EMAIL__SMTP__TLS", "required"),
        ("AUTOPAY__EMAIL__SMTP__CA_FILE", &ca),
        ("AUTOPAY__EMAIL__SMTP__USERNAME", USER),
        ("AUTOPAY__EMAIL__SMTP__PASSWORD", PASSWORD),
        ("AUTOPAY__EMAIL__SMTP__TIMEOUT", "5s"),
        ("AUTOPAY__EMAIL__RETRY_DELAYS", "1s,2s"),
        ("AUTOPAY__EMAIL__MAX_PER_SECOND", "1000"),
    ]);
    let work = Workdir::new();
    let mut daemon = Daemon::start("smtp-faults", &env, work.path());
    let log = || daemon_log(work.path(), "smtp-faults");
    eventually(Duration::from_secs(20), "the daemon ready", || async {
        readyz(&daemon).0 == 200
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "three receipts delivered",
        || async {
            outbox(&store, Some("receipt"))
                .await
                .get("sent")
                .copied()
                .unwrap_or(0)
                >= 3
        },
    )
    .await;

    // 1. The server goes away. Charging goes on; mail pauses, naming the unreachable server,
    // and waits: readiness says so.
    peer.stop();
    let down = Instant::now();
    let charged_at_stop = payments_in(&store, PaymentState::Succeeded).await;
    let received_at_stop = peer.received().len();
    eprintln!(
        "{:?}: SMTP stopped; {charged_at_stop} charged, {received_at_stop} messages received",
        started.elapsed()
    );
    let mut paused_seen = false;
    while down.elapsed() < SMTP_DOWN {
        assert_eq!(healthz(&daemon), 200, "/healthz with the mail server down");
        let (code, json) = readyz(&daemon);
        if code == 503 {
            let mail = json["checks"]["mail"].as_str().unwrap_or_default();
            assert!(mail.contains("cannot reach the mail server"), "{json}");
            paused_seen = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(paused_seen, "an unreachable mail server pauses mail");
    let charged_while_down = payments_in(&store, PaymentState::Succeeded).await - charged_at_stop;
    assert!(
        charged_while_down >= 5,
        "charging waited for mail: {charged_while_down} charged in {SMTP_DOWN:?}"
    );
    let waiting: Vec<_> = store
        .notifications(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.state != "sent")
        .collect();
    assert!(
        waiting.len() >= charged_while_down,
        "the receipts of the payments charged while the server was down wait: {} unsent",
        waiting.len()
    );
    assert!(
        waiting.iter().any(|n| n.attempts >= 3),
        "they are retried on email.retry_delays: {waiting:?}"
    );
    assert_eq!(
        outbox(&store, None).await.get("failed"),
        None,
        "nothing fails"
    );
    let status = bin.run(&["status", "--json"]).ok().json();
    assert!(
        status["control"]["mail_paused"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot reach the mail server")),
        "{status}"
    );
    assert!(
        status["notifications"]["pending"].as_i64().unwrap_or(0) > 0,
        "autopay status shows the waiting mail: {status}"
    );
    assert!(
        metric(&daemon, "autopay_mail_total{outcome=\"paused\"}") >= 3.0,
        "/metrics counts the retries"
    );

    // 2. The server is back: mail resumes by itself.
    peer.restart();
    let back = Instant::now();
    let waited: BTreeSet<uuid::Uuid> = waiting.iter().map(|n| n.id).collect();
    eventually(
        Duration::from_secs(20),
        "the mail that waited delivered after the server came back",
        || async {
            store
                .notifications(None)
                .await
                .unwrap_or_default()
                .iter()
                .filter(|n| waited.contains(&n.id))
                .all(|n| n.state == "sent")
        },
    )
    .await;
    eprintln!(
        "{:?}: {} waiting messages delivered {:?} after the server came back",
        started.elapsed(),
        waited.len(),
        back.elapsed()
    );
    assert!(
        store.control().await.unwrap().mail_paused.is_none(),
        "the first message delivered lifted the pause"
    );

    // 3. The server now demands another password: mail pauses with the reason; charging goes on.
    peer.restart_with_auth(Some((USER.into(), "a-new-password".into())));
    let refusing = Instant::now();
    let charged_at_refusal = payments_in(&store, PaymentState::Succeeded).await;
    assert!(
        charged_at_refusal + 3 <= MAIL_PAYMENTS,
        "the test's timeline slipped: only {} payments are left to fall due while the password \
         is refused",
        MAIL_PAYMENTS - charged_at_refusal
    );
    let received_at_refusal = peer.received().len();
    eventually(
        Duration::from_secs(15),
        "mail paused after the server refused the password",
        || async { store.control().await.is_ok_and(|c| c.mail_paused.is_some()) },
    )
    .await;
    let reason = store.control().await.unwrap().mail_paused.unwrap().reason;
    assert!(reason.contains("authentication refused"), "{reason}");
    assert!(reason.contains("535"), "{reason}");
    assert!(!reason.contains(PASSWORD), "no password in the reason");
    let (code, json) = readyz(&daemon);
    assert_eq!(code, 503, "{json}");
    let mail = json["checks"]["mail"].as_str().unwrap_or_default();
    assert!(
        mail.starts_with("paused since") && mail.contains("authentication refused"),
        "/readyz names the mail pause and why: {json}"
    );
    assert_eq!(json["checks"]["database"], "ok", "{json}");
    let status = bin.run(&["status"]).ok().stdout;
    assert!(
        status.contains("PAUSED") && status.contains("authentication refused"),
        "{status}"
    );
    assert_eq!(metric(&daemon, "autopay_mail_paused"), 1.0);
    tokio::time::sleep(SMTP_REFUSING.saturating_sub(refusing.elapsed())).await;
    assert!(
        payments_in(&store, PaymentState::Succeeded).await > charged_at_refusal,
        "charging waited for mail"
    );
    assert_eq!(
        peer.received().len(),
        received_at_refusal,
        "nothing is delivered without the password"
    );
    assert_eq!(
        outbox(&store, None).await.get("failed"),
        None,
        "nothing fails"
    );
    assert_eq!(daemon.wait(Duration::ZERO), None, "the daemon runs on");

    // 4. The password is right again: the pause lifts with the first message delivered.
    peer.restart_with_auth(Some((USER.into(), PASSWORD.into())));
    let fixed = Instant::now();
    eventually(
        Duration::from_secs(20),
        "mail running and ready again",
        || async {
            store.control().await.is_ok_and(|c| c.mail_paused.is_none()) && readyz(&daemon).0 == 200
        },
    )
    .await;
    eprintln!(
        "{:?}: mail resumed {:?} after the password was right again",
        started.elapsed(),
        fixed.elapsed()
    );

    // Everything charged, everything delivered.
    eventually(
        Duration::from_secs(60),
        "every payment charged and every notification sent",
        || async {
            payments_in(&store, PaymentState::Succeeded).await == MAIL_PAYMENTS
                && outbox(&store, None)
                    .await
                    .keys()
                    .all(|state| state == "sent")
        },
    )
    .await;
    eprintln!("{:?}: all delivered", started.elapsed());
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait(Duration::from_secs(15)),
        Some(0),
        "SIGTERM exits 0\n{}",
        log()
    );

    // Every notification arrived, and every copy of one carries its one Message-ID.
    let notifications = store.notifications(None).await.unwrap();
    let payments = store.list_payments(None, None).await.unwrap();
    let receipts: BTreeSet<String> = notifications
        .iter()
        .filter(|n| n.kind == "receipt")
        .map(|n| n.dedupe_key.clone())
        .collect();
    let wanted: BTreeSet<String> = payments
        .iter()
        .map(|p| format!("receipt:{}", p.id))
        .collect();
    assert_eq!(receipts, wanted, "one receipt per payment");
    let received = peer.received();
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for message in &received {
        let parsed = MessageParser::default()
            .parse(&message.raw)
            .expect("a parsable message");
        let id = parsed.message_id().expect("a Message-ID").to_string();
        *copies.entry(id).or_default() += 1;
        assert!(
            message.tls && message.authenticated,
            "{:?}",
            message.rcpt_tos
        );
    }
    let expected: BTreeSet<String> = notifications
        .iter()
        .map(|n| format!("{}@example.org", n.id))
        .collect();
    let delivered: BTreeSet<String> = copies.keys().cloned().collect();
    assert_eq!(
        delivered, expected,
        "each notification arrives under its own one Message-ID"
    );
    assert_eq!(delivered.len(), notifications.len());
    let repeated = copies.values().filter(|n| **n > 1).count();
    eprintln!(
        "{:?}: {} notifications ({} receipts) arrived in {} messages, {repeated} more than once",
        started.elapsed(),
        notifications.len(),
        receipts.len(),
        received.len()
    );
}
