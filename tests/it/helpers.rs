//! Test harness: a fresh database per test on either backend, and the real binary.
//!
//! PostgreSQL comes from `TEST_DATABASE_URL` (default the local service,
//! postgres://postgres@127.0.0.1:5432/test); each test gets a throwaway database of its own,
//! dropped when the test ends. A missing PostgreSQL fails the test loudly: never a silent skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use autopay::config::DatabaseUrl;
use autopay::domain::ids::{CardId, MemberId};
use autopay::store::{self, Store};

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty database that disappears with the value.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        let dir = tempfile::tempdir().expect("a temporary folder");
        match kind {
            Kind::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("autopay.db").display());
                TestDb { url, dir, pg: None }
            }
            Kind::Postgres => {
                let admin =
                    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG.to_string());
                let name = format!("autopay_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = connect_admin(&admin).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE on the test PostgreSQL");
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                let url = format!("{base}/{name}");
                TestDb {
                    url,
                    dir,
                    pg: Some((admin, name)),
                }
            }
        }
    }

    pub fn database_url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&self.url, None).expect("a test database URL")
    }

    /// Opens and migrates the store.
    pub async fn store(&self) -> Arc<dyn Store> {
        let store = store::open(&self.database_url(), 5)
            .await
            .expect("open the test database");
        store
            .migrate(jiff::Timestamp::now())
            .await
            .expect("migrate the test database");
        store
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub async fn connect_admin(admin: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    match sqlx::PgConnection::connect(admin).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is required for these tests and cannot be reached at {admin}: {e}. \
             Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) \
             or point TEST_DATABASE_URL at one."
        ),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside any runtime we may block; use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        let mut conn = connect_admin(&admin).await;
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    });
                }
            })
            .join();
        }
    }
}

/// The real `autopay` binary, run in a test's folder against its database.
pub struct Bin {
    pub url: String,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Run through `sh -c 'umask U; exec autopay ...'`, as a shell with this umask would.
    pub umask: Option<String>,
}

/// What one run printed.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn fails_with(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(!self.stderr.trim().is_empty(), "a failure must say why");
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// The id a creating command printed.
    pub fn id(&self) -> String {
        self.stdout.trim().to_string()
    }
}

impl Bin {
    pub fn new(db: &TestDb) -> Bin {
        Bin {
            url: db.url.clone(),
            cwd: db.path().to_path_buf(),
            env: Vec::new(),
            umask: None,
        }
    }

    pub fn with_umask(mut self, umask: &str) -> Bin {
        self.umask = Some(umask.into());
        self
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Bin {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None)
    }

    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let mut child = self.command(args).spawn().expect("run autopay");
        {
            let mut input = child.stdin.take().expect("stdin");
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).expect("write stdin");
            }
        }
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().expect("autopay finished");
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// The command [`Bin::run`] runs, for a test that starts it itself (a daemon it signals).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.umask {
            None => Command::new(env!("CARGO_BIN_EXE_autopay")),
            Some(umask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_autopay"));
                sh
            }
        };
        cmd.args(args)
            .current_dir(&self.cwd)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("USER", "tester")
            .env("AUTOPAY__DATABASE__URL", &self.url)
            .env("AUTOPAY__LOG__LEVEL", "info")
            .env("AUTOPAY__PROCESSOR__SIMULATED__LATENCY", "0s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// Adds an individual-family member in New York with this account number.
pub fn add_member(bin: &Bin, account: &str) -> Run {
    bin.run(&[
        "member",
        "add",
        "--account",
        account,
        "--name",
        "Ana Díaz",
        "--email",
        "ana@example.org",
        "--type",
        "individual-family",
        "--time-zone",
        "America/New_York",
    ])
}

/// Adds a card by number (from standard input, as a person would), expiring 12/2030.
pub fn add_card(bin: &Bin, account: &str, number: &str) -> Run {
    bin.run_with_stdin(
        &["card", "add", "--account", account, "--exp", "12/2030"],
        Some(&format!("{number}\n123\n")),
    )
}

/// Adds the member A-100200 with a Visa card; returns the card id.
pub fn member_with_card(bin: &Bin) -> String {
    add_member(bin, "A-100200").ok();
    add_card(bin, "A-100200", "4242424242424242").ok().id()
}

/// Adds a monthly schedule of `amount` on `card` for A-100200 whose first payment is due now.
pub fn schedule_due_now(bin: &Bin, card: &str, amount: &str) -> Run {
    bin.run(&[
        "schedule",
        "add",
        "--account",
        "A-100200",
        "--card",
        card,
        "--monthly",
        "--day",
        "1",
        "--amount",
        amount,
        "--first-payment",
        "now",
    ])
}

/// Runs each story (an `async fn(Kind)`) as two tests, `sqlite::NAME` and `postgres::NAME`: one
/// suite, unchanged, on both backends.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(crate::helpers::Kind::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(crate::helpers::Kind::Postgres).await })*
        }
    };
}
pub(crate) use on_both;

/// splitmix64: a tiny deterministic generator, so that a seed replays a randomized test.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// A duration from `lo` up to `hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// A number from the environment (a heavy test's scale or seed), or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One `autopay run` process.
pub struct Daemon {
    pub name: &'static str,
    env: Vec<(String, String)>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Where it serves /healthz, /readyz and /metrics.
    pub port: u16,
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// GETs `path` from a daemon: the status code and the body (HTTP/1.1, one request, closed).
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let code = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

impl Daemon {
    /// Starts a daemon serving health and metrics on a port of its own.
    pub fn start(name: &'static str, env: &[(String, String)], dir: &Path) -> Daemon {
        let port = free_port();
        let mut env = env.to_vec();
        env.push(("AUTOPAY__HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
        let mut d = Daemon {
            name,
            env,
            dir: dir.to_path_buf(),
            child: None,
            starts: 0,
            port,
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        self.starts += 1;
        let log = |what: &str| {
            std::fs::File::create(
                self.dir
                    .join(format!("{}-{}.{what}", self.name, self.starts)),
            )
            .expect("a daemon log file")
        };
        let child = Command::new(env!("CARGO_BIN_EXE_autopay"))
            .arg("run")
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .expect("start autopay run");
        self.child = Some(child);
    }

    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
            // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still ours.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// SIGKILL: no shutdown, no cleanup, leases left to expire.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Waits up to `within` for the process to exit; its exit code, if it did.
    pub fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and waits for the exit.
    pub fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Schedules per member in [`load_due_payments`]: each member pays with one card, and a card
/// must never hold the 15 unsettled requests the networks allow.
pub const PER_MEMBER: usize = 5;

/// Adds `payments` schedules through the store, five per member (one card each, owing more than
/// the payments bring, so each charge pays a bill), whose first payments fall due one after
/// another: the k-th at `first_due + k * every` (all at once when `every` is zero). Each member's
/// schedules are spread over the run: member m's i-th falls due at k = i * members + m.
pub async fn load_due_payments(
    store: Arc<dyn Store>,
    payments: usize,
    first_due: jiff::Timestamp,
    every: Duration,
) {
    use autopay::clock::{Clock, SystemClock};
    use autopay::domain::card::{CardNumber, Expiry, SecurityCode};
    use autopay::domain::money::{Currency, Money};
    use autopay::processor::Processor;
    use autopay::processor::simulated::SimulatedProcessor;
    use autopay::store::{Audit, NewCard};

    let processor = SimulatedProcessor::in_memory(Arc::new(SystemClock), Duration::ZERO);
    let number = CardNumber::parse("4242424242424242").unwrap();
    let code = SecurityCode::parse("123", number.brand()).unwrap();
    let members = payments.div_ceil(PER_MEMBER);
    let every = jiff::SignedDuration::try_from(every).expect("a spacing that fits");
    let mut tasks = tokio::task::JoinSet::new();
    let token = processor
        .tokenize(
            &autopay::processor::CardOwner {
                member_id: MemberId::from_uuid(uuid::Uuid::nil()),
                customer: None,
            },
            &number,
            &code,
            Expiry::new(12, 2035).unwrap(),
        )
        .await
        .unwrap();
    for m in 0..members {
        let store = store.clone();
        let token = token.clone();
        let count = PER_MEMBER.min(payments - m * PER_MEMBER);
        tasks.spawn(async move {
            let audit = Audit {
                actor: "test-load".into(),
                at: SystemClock.now(),
            };
            let member = add_load_member(store.as_ref(), m, &audit).await;
            let card = store
                .add_card(
                    &NewCard {
                        member_id: member.id,
                        processor: "simulated".into(),
                        processor_token: token.token.clone(),
                        brand: token.details.brand,
                        last4: token.details.last4,
                        expiry: token.details.expiry,
                        fingerprint: None,
                        customer: None,
                        processor_mode: None,
                        consent: autopay::store::Consent {
                            at: audit.at,
                            via: "cli".into(),
                            terms_version: None,
                        },
                    },
                    &audit,
                )
                .await
                .unwrap();
            for i in 0..count {
                let k = i32::try_from(i * members + m).expect("a payment index that fits");
                let due = first_due.checked_add(every * k).unwrap();
                schedule_first_due(
                    store.as_ref(),
                    (member.id, card.id),
                    due,
                    Money::from_minor(100 + i as i64, Currency::USD),
                    &audit,
                )
                .await;
            }
        });
        while tasks.len() >= 8 {
            tasks.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// The `m`-th member of a load (an Employer Group, `C-{m:06}`), owing more than its payments
/// bring (10,000.00), so each charge pays a bill and none becomes credit.
pub async fn add_load_member(
    store: &dyn Store,
    m: usize,
    audit: &autopay::store::Audit,
) -> autopay::store::Member {
    use autopay::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
    use autopay::domain::money::{Currency, Money};
    use autopay::store::{NewBill, NewMember};
    let member = store
        .add_member(
            &NewMember {
                account_number: AccountNumber::parse(&format!("C-{m:06}")).unwrap(),
                account_type: AccountType::EmployerGroup,
                name: MemberName::parse("Test Group").unwrap(),
                email: EmailAddress::parse(&format!("member{m}@example.org")).unwrap(),
                time_zone: "UTC".into(),
            },
            audit,
        )
        .await
        .unwrap();
    store
        .add_bills(
            &[NewBill {
                member_id: member.id,
                reference: "LOAD-1".into(),
                amount_due: Money::from_minor(1_000_000, Currency::USD),
                due_date: jiff::civil::date(2026, 12, 1),
                origin: "test load".into(),
            }],
            audit,
        )
        .await
        .unwrap();
    member
}

/// Adds a monthly schedule for `member_card` (member id, card id) whose first payment falls due
/// at `due` and whose monthly dates start 40 days later, the way a test needs one payment at a
/// time of its choosing.
pub async fn schedule_first_due(
    store: &dyn Store,
    (member_id, card_id): (MemberId, CardId),
    due: jiff::Timestamp,
    amount: autopay::domain::money::Money,
    audit: &autopay::store::Audit,
) -> autopay::store::Schedule {
    use autopay::domain::payment::AmountRule;
    use autopay::domain::schedule::{End, FirstPayment, Recurrence, RecurrenceSpec, Rule};
    use autopay::domain::status::{AuthorizedVia, ScheduleKind};
    use autopay::store::NewSchedule;

    let today = due.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
    let recurrence = Recurrence::new(RecurrenceSpec {
        rule: Rule::Monthly { day: 1 },
        at: jiff::civil::time(9, 0, 0, 0),
        time_zone: "UTC".into(),
        start: today.checked_add(jiff::Span::new().days(40)).unwrap(),
        first_payment: Some(FirstPayment::Now(due)),
        end: End::Never,
        business_days: false,
        holidays: vec![],
    })
    .unwrap();
    let first = recurrence.occurrences().next().unwrap();
    store
        .add_schedule(
            &NewSchedule {
                member_id,
                card_id,
                kind: ScheduleKind::Recurring,
                recurrence,
                amount: AmountRule::Fixed { amount },
                currency: amount.currency(),
                next_run_at: Some(first.due_at),
                next_occurrence: Some(first.key),
                authorized_via: AuthorizedVia::Cli,
                terms_version: "load".into(),
            },
            audit,
        )
        .await
        .unwrap()
}
