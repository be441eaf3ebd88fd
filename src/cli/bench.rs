//! `autopay bench`: charges per second on throwaway databases.
//!
//! Each backend gets a database of its own, made for the run and removed after it: a SQLite file
//! in a fresh folder under the system's temporary directory, and a PostgreSQL database
//! `autopay_bench_<uuid>` created through an admin connection. The configured `database.url` is
//! never opened. The load (migrate, members, cards, bills, schedules due now; in bulk, see
//! [`super::bulkload`]) is timed apart from the charge phase, which is one engine's `drain()`
//! against the simulated processor, the same work `autopay run --drain` does. The scenarios
//! differ in the processor's latency and rate limit and where its ledger is kept; the mail
//! scenario is [`super::mailbench`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use super::args::{BenchArgs, BenchBackend, BenchLedger, BenchScenario};
use super::counted::Counted;
use super::output::{self, Table, say};
use super::{CliError, Context, exit, operator};
use crate::clock::{Clock, SystemClock};
use crate::config::{Backend, DatabaseUrl, Latency, Ledger, SimulatedSettings, redact_url};
use crate::daemon::{engine_config, outcome_policy};
use crate::domain::card::{CardNumber, Expiry, SecurityCode};
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::domain::money::Money;
use crate::domain::payment::AmountRule;
use crate::domain::schedule::{End, FirstPayment, Recurrence, RecurrenceSpec, Rule};
use crate::domain::status::{AuthorizedVia, ScheduleKind};
use crate::engine::Engine;
use crate::processor::Processor;
use crate::processor::simulated::SimulatedProcessor;
use crate::store::{self, Audit, NewBill, NewMember, NewSchedule, Store};

/// Schedules per member, each member paying with one card: employer groups, whose limits a 1.00
/// charge never reaches, and few enough that a card never has the 15 unsettled requests the card
/// networks allow in flight at once.
const SCHEDULES_PER_MEMBER: u32 = 10;
/// Each schedule charges this much, in minor units (1.00).
const CHARGE_MINOR: i64 = 100;
/// Each member's one bill: more than its schedules ever charge (at most 100 × 1.00), so no
/// charge turns into a credit and every charge pays the same open bill.
const BILL_MINOR: i64 = 1_000_000;
/// Raised from `processor.max_requests_per_second` so the rate limiter does not cap the figures.
const UNCAPPED_REQUESTS_PER_SECOND: u32 = 100_000;
/// The slow-processor scenario: this many charges in flight, at most this many requests a
/// second, against a processor that always takes 300 ms, then one with a heavy tail.
const SLOW_CONCURRENCY: u32 = 256;
const SLOW_RATE_LIMIT: u32 = 500;
const SLOW_FIXED: Latency = Latency::Fixed(Duration::from_millis(300));
const SLOW_TAIL: Latency = Latency::Tail {
    median: Duration::from_millis(300),
    p99: Duration::from_secs(2),
};
/// The shell's code for a run stopped with Ctrl-C (128 + SIGINT).
const INTERRUPTED: u8 = 130;

/// How one run's processor behaves and how fast the engine may call it.
#[derive(Debug, Clone, Copy)]
struct Shape {
    scenario: &'static str,
    concurrency: u32,
    latency: Latency,
    /// `processor.max_requests_per_second` for the run; `None` lifts it out of the way.
    rate_limit: Option<u32>,
    ledger: BenchLedger,
}

impl Shape {
    /// What the run should reach at least: 90 % of what the concurrency and the latency allow,
    /// or of the rate limit, whichever is lower. Only a processor with latency has one.
    fn target(&self) -> Option<f64> {
        let mean = self.latency.mean().as_secs_f64();
        if mean == 0.0 {
            return None;
        }
        let by_latency = f64::from(self.concurrency) / mean;
        let bound = self
            .rate_limit
            .map_or(by_latency, |limit| by_latency.min(f64::from(limit)));
        Some(0.9 * bound)
    }
}

/// One backend's figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub backend: Backend,
    /// `charge`, or `slow` (a processor with latency, at a concurrency of 256 and a limit).
    pub scenario: &'static str,
    pub payments: u32,
    pub concurrency: u32,
    /// Every call's time at the simulated processor (`0s`, `300ms`, `300ms p99 2s`).
    pub latency: String,
    /// Where the simulated processor's ledger is during the run: `memory` (the speed figures),
    /// or `database`, a SQLite file of its own (the memory figures).
    pub ledger: &'static str,
    /// `processor.max_requests_per_second` during the run; null when lifted out of the way.
    pub rate_limit: Option<u32>,
    /// Receipts in the outbox after the run: one per charge, checked.
    pub receipts_queued: i64,
    /// The most requests that reached the processor in any sliding one-second window.
    pub most_requests_in_one_second: usize,
    /// For a processor with latency: 90 % of min(concurrency / mean latency, rate limit).
    pub target_per_second: Option<f64>,
    /// PostgreSQL only: pgbench's transactions per second doing one charge's minimal writes.
    pub ceiling_per_second: Option<f64>,
    /// `charges_per_second / ceiling_per_second`.
    pub share_of_ceiling: Option<f64>,
    /// Migrate and load members, cards, bills and schedules: not counted in the rate.
    pub load_seconds: f64,
    /// Planning every schedule into its payment: the first part of `charge_seconds`.
    pub plan_seconds: f64,
    /// One engine's `drain()`: plan every schedule and charge every payment.
    pub charge_seconds: f64,
    pub charges_per_second: f64,
    /// The process-wide high-water mark of resident memory (VmHWM) after this backend, in MiB;
    /// null where /proc/self/status is not available.
    pub peak_rss_mib: Option<f64>,
}

pub(super) async fn bench(ctx: &Context, args: BenchArgs) -> Result<(), CliError> {
    let concurrency = args.concurrency.unwrap_or(ctx.settings.daemon.concurrency);
    let backends: &[Backend] = match args.backend {
        BenchBackend::Sqlite => &[Backend::Sqlite],
        BenchBackend::Postgres => &[Backend::Postgres],
        BenchBackend::Both => &[Backend::Sqlite, Backend::Postgres],
    };
    let admin = if backends.contains(&Backend::Postgres) {
        let admin = PgAdmin::new(&args.postgres_url)?;
        // Fail before spending minutes on SQLite when PostgreSQL is not there.
        admin.connect().await?;
        Some(admin)
    } else {
        None
    };
    warn_about_caps(ctx, concurrency);
    let n = args.payments;
    if let Some(seconds) = args.idle {
        let mut results = Vec::new();
        for backend in backends {
            let run = |url| super::idle::measure(ctx, url, n, seconds);
            results.push(match (backend, &admin) {
                (Backend::Sqlite, _) => on_sqlite(run).await?,
                (Backend::Postgres, Some(admin)) => on_postgres(admin, run).await?,
                (Backend::Postgres, None) => unreachable!("the admin connection is checked above"),
            });
        }
        return super::idle::print(ctx, &results);
    }
    if args.scenario == BenchScenario::Mail {
        return mail(ctx, backends, admin.as_ref(), n).await;
    }
    let ledger = args.ledger.unwrap_or(match args.scenario {
        BenchScenario::MonthStart => BenchLedger::Database,
        _ => BenchLedger::Memory,
    });
    let shapes: Vec<Shape> = match args.scenario {
        BenchScenario::Charge | BenchScenario::MonthStart => vec![Shape {
            scenario: if args.scenario == BenchScenario::Charge {
                "charge"
            } else {
                "month-start"
            },
            concurrency,
            latency: Latency::Fixed(Duration::ZERO),
            rate_limit: None,
            ledger,
        }],
        BenchScenario::Slow => [SLOW_FIXED, SLOW_TAIL]
            .into_iter()
            .map(|latency| Shape {
                scenario: "slow",
                concurrency: args.concurrency.unwrap_or(SLOW_CONCURRENCY),
                latency,
                rate_limit: Some(SLOW_RATE_LIMIT),
                ledger,
            })
            .collect(),
        BenchScenario::Mail => unreachable!("the mail scenario is measured above"),
    };
    let mut results = Vec::new();
    for backend in backends {
        for shape in &shapes {
            let ceiling = (args.scenario != BenchScenario::Slow).then_some(args.ceiling_seconds);
            let run = |url| measure(ctx, url, n, *shape, ceiling.filter(|s| *s > 0));
            let result = match (backend, &admin) {
                (Backend::Sqlite, _) => on_sqlite(run).await?,
                (Backend::Postgres, Some(admin)) => on_postgres(admin, run).await?,
                (Backend::Postgres, None) => {
                    unreachable!("the admin connection is checked above")
                }
            };
            results.push(result);
        }
    }
    print(ctx, &results)
}

/// The mail scenario on each backend, against one local SMTP server for the whole run.
async fn mail(
    ctx: &Context,
    backends: &[Backend],
    admin: Option<&PgAdmin>,
    n: u32,
) -> Result<(), CliError> {
    let server = super::mailbench::SinkServer::start()?;
    let scratch =
        std::env::temp_dir().join(format!("autopay-bench-mail-{}", Uuid::new_v4().simple()));
    std::fs::create_dir(&scratch).map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!(
                "cannot create the benchmark folder {}: {e}; set TMPDIR to a writable folder",
                scratch.display()
            ),
        )
    })?;
    let mut results = Vec::new();
    let mut outcome = Ok(());
    for backend in backends {
        let run = |url| super::mailbench::measure(ctx, url, n, server.port, &scratch);
        let result = match (backend, admin) {
            (Backend::Sqlite, _) => on_sqlite(run).await,
            (Backend::Postgres, Some(admin)) => on_postgres(admin, run).await,
            (Backend::Postgres, None) => unreachable!("the admin connection is checked first"),
        };
        match result {
            Ok(r) => results.push(r),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    remove_folder(&scratch);
    outcome?;
    super::mailbench::print(ctx, &results)
}

/// Says when the settings, rather than --concurrency, will bound how many charges run at once.
fn warn_about_caps(ctx: &Context, concurrency: u32) {
    let batch = ctx.settings.daemon.batch_size;
    if concurrency > batch {
        progress(format!(
            "note: a claim takes at most daemon.batch_size = {batch} payments, fewer than --concurrency {concurrency}"
        ));
    }
    let pool = ctx.settings.database.max_connections;
    if concurrency >= pool {
        progress(format!(
            "note: database.max_connections = {pool} connections serve --concurrency {concurrency} charges; raise it to measure more"
        ));
    }
}

/// Progress for the person waiting: standard error, so standard output stays the result.
pub(super) fn progress(line: impl AsRef<str>) {
    eprintln!("{}", line.as_ref());
}

/// Runs `work`, stopping early on Ctrl-C so the caller still removes its database.
async fn interruptible<T>(work: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::select! {
        done = work => done,
        _ = tokio::signal::ctrl_c() => Err(CliError::new(
            INTERRUPTED,
            "interrupted with Ctrl-C; the throwaway database is removed all the same",
        )),
    }
}

/// Runs `work` on a throwaway SQLite file in a folder of its own, removed afterwards.
async fn on_sqlite<T, F, Fut>(work: F) -> Result<T, CliError>
where
    F: FnOnce(DatabaseUrl) -> Fut,
    Fut: Future<Output = Result<T, CliError>>,
{
    let dir = std::env::temp_dir().join(format!("autopay-bench-{}", Uuid::new_v4().simple()));
    // create_dir, not create_dir_all: the folder must be new, never one that holds something.
    std::fs::create_dir(&dir).map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!(
                "cannot create the benchmark folder {}: {e}; set TMPDIR to a writable folder",
                dir.display()
            ),
        )
    })?;
    let file = dir.join("autopay.db");
    let outcome = async {
        let url = DatabaseUrl::parse(&format!("sqlite://{}", file.display()), None)
            .map_err(|e| CliError::internal(format!("the benchmark's SQLite URL: {e}")))?;
        progress(format!(
            "sqlite: a throwaway database in {}",
            file.display()
        ));
        interruptible(work(url)).await
    }
    .await;
    remove_folder(&dir);
    outcome
}

/// Deletes the benchmark's own folder (the database file and its WAL files).
fn remove_folder(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        progress(format!(
            "warning: could not delete the benchmark folder {}: {e}; delete it by hand",
            dir.display()
        ));
    }
}

/// Runs `work` on a throwaway PostgreSQL database, dropped afterwards.
async fn on_postgres<T, F, Fut>(admin: &PgAdmin, work: F) -> Result<T, CliError>
where
    F: FnOnce(DatabaseUrl) -> Fut,
    Fut: Future<Output = Result<T, CliError>>,
{
    let name = format!("autopay_bench_{}", Uuid::new_v4().simple());
    admin.create(&name).await?;
    let outcome = async {
        let url = DatabaseUrl::parse(&with_database(&admin.url, &name), None)
            .map_err(|e| CliError::internal(format!("the benchmark's PostgreSQL URL: {e}")))?;
        progress(format!("postgres: a throwaway database {name}"));
        interruptible(work(url)).await
    }
    .await;
    admin.drop_database(&name).await;
    outcome
}

/// Loads, charges, checks and measures one fresh database. The store and the engine are
/// dropped on return, before the caller removes the database.
async fn measure(
    ctx: &Context,
    url: DatabaseUrl,
    n: u32,
    shape: Shape,
    ceiling_seconds: Option<u32>,
) -> Result<BenchResult, CliError> {
    let ledger = match shape.ledger {
        BenchLedger::Memory => LedgerPlace::Memory,
        BenchLedger::Database => {
            let dir = std::env::temp_dir()
                .join(format!("autopay-bench-ledger-{}", Uuid::new_v4().simple()));
            std::fs::create_dir(&dir).map_err(|e| {
                CliError::new(
                    exit::UNAVAILABLE,
                    format!(
                        "cannot create the ledger's folder {}: {e}; set TMPDIR to a writable folder",
                        dir.display()
                    ),
                )
            })?;
            LedgerPlace::File(dir.join("ledger.db"))
        }
    };
    let outcome = measure_with(ctx, url, n, shape, ceiling_seconds, &ledger).await;
    if let LedgerPlace::File(path) = &ledger
        && let Some(dir) = path.parent()
    {
        remove_folder(dir);
    }
    outcome
}

/// Where the simulated processor keeps its ledger during one run.
enum LedgerPlace {
    Memory,
    /// A SQLite file of its own, in a folder made for the run.
    File(std::path::PathBuf),
}

async fn measure_with(
    ctx: &Context,
    url: DatabaseUrl,
    n: u32,
    shape: Shape,
    ceiling_seconds: Option<u32>,
    ledger: &LedgerPlace,
) -> Result<BenchResult, CliError> {
    let url = &url;
    let backend = url.backend();
    let concurrency = shape.concurrency;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let processor = match ledger {
        LedgerPlace::Memory => SimulatedProcessor::in_memory(clock.clone(), Duration::ZERO),
        LedgerPlace::File(path) => {
            let settings = SimulatedSettings {
                latency: Latency::Fixed(Duration::ZERO),
                ledger: Ledger::Url(format!("sqlite://{}", path.display())),
                drop_after_charge: 0.0,
                timeout_before_charge: 0.0,
            };
            SimulatedProcessor::open(&settings, url, clock.clone(), None)
                .await
                .map_err(|e| CliError::internal(format!("the benchmark's ledger: {e}")))?
        }
    };
    let store = store::open(url, ctx.settings.database.max_connections).await?;

    progress(format!("loading {n} schedules..."));
    let started = Instant::now();
    store.migrate(clock.now()).await?;
    load(
        ctx,
        store.as_ref(),
        url,
        &processor,
        clock.as_ref(),
        n,
        Due::Now,
    )
    .await?;
    let load_seconds = started.elapsed().as_secs_f64();
    progress(format!(
        "loaded in {load_seconds:.1}s; charging {n} payments with concurrency {concurrency}, processor latency {}, {}...",
        shape.latency,
        shape.rate_limit.map_or_else(
            || "no rate limit".to_string(),
            |l| format!("at most {l} requests/s")
        )
    ));

    let mut config = engine_config(&ctx.settings);
    config.max_requests_per_second = shape.rate_limit.unwrap_or(UNCAPPED_REQUESTS_PER_SECOND);
    config.concurrency = concurrency;
    // The load used the processor without latency; the run uses the shape's.
    let processor = Arc::new(processor.with_latency(shape.latency));
    let counted = Arc::new(Counted::new(processor.clone()));
    let engine = Engine::new(
        store.clone(),
        counted.clone(),
        clock.clone(),
        config,
        outcome_policy(&ctx.settings),
    );
    let started = Instant::now();
    // Planning first, timed on its own; the rate counts it with the charges.
    let planned = engine.plan_due().await?;
    let plan_seconds = started.elapsed().as_secs_f64();
    let mut report = engine.drain().await?;
    report.plan.add(&planned);
    let charge_seconds = started.elapsed().as_secs_f64();

    verify(store.as_ref(), processor.as_ref(), backend, n, &report).await?;
    let receipts = {
        let bulk = super::bulkload::BulkLoader::open(url).await?;
        let counted = bulk.receipts().await;
        bulk.close().await;
        counted?
    };
    if receipts != i64::from(n) {
        return Err(CliError::internal(format!(
            "the benchmark on {} expected {n} receipts in the outbox and found {receipts}; the figures are void, this is a bug to report",
            backend_name(backend)
        )));
    }
    let charges_per_second = f64::from(n) / charge_seconds;
    let most = counted.most_in_one_second();
    progress(format!(
        "charged {n} payments on {} in {charge_seconds:.2}s: {charges_per_second:.0} charges/s; at most {most} requests in any one second",
        backend_name(backend)
    ));
    drop(engine);
    let ceiling = match (backend, ceiling_seconds) {
        (Backend::Postgres, Some(seconds)) => {
            let clients = concurrency
                .min(ctx.settings.database.max_connections)
                .max(1);
            let c = super::ceiling::measure(url, clients, seconds).await?;
            progress(format!(
                "ceiling: {:.0} transactions/s ({} connections, {}s); autopay reached {:.0} %",
                c.transactions_per_second,
                c.clients,
                c.seconds,
                100.0 * charges_per_second / c.transactions_per_second
            ));
            Some(c.transactions_per_second)
        }
        _ => None,
    };
    Ok(BenchResult {
        backend,
        scenario: shape.scenario,
        payments: n,
        concurrency,
        latency: shape.latency.to_string(),
        ledger: match shape.ledger {
            BenchLedger::Memory => "memory",
            BenchLedger::Database => "database",
        },
        rate_limit: shape.rate_limit,
        receipts_queued: receipts,
        most_requests_in_one_second: most,
        target_per_second: shape.target().map(|t| round(t, 1)),
        ceiling_per_second: ceiling.map(|c| round(c, 1)),
        share_of_ceiling: ceiling.map(|c| round(charges_per_second / c, 3)),
        load_seconds: round(load_seconds, 3),
        plan_seconds: round(plan_seconds, 3),
        charge_seconds: round(charge_seconds, 3),
        charges_per_second: round(charges_per_second, 1),
        peak_rss_mib: peak_rss_kib().map(|kib| round(kib as f64 / 1024.0, 1)),
    })
}

pub(super) fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

pub(super) fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

fn invalid(e: impl std::fmt::Display) -> CliError {
    CliError::internal(format!("the benchmark's sample data is invalid: {e}"))
}

/// When the loaded schedules' first payment falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Now: the charge benchmark.
    Now,
    /// In about forty days: nothing due while an idle daemon is measured.
    Later,
}

/// N/10 employer-group members, each with one card and one large bill, and N fixed 1.00
/// monthly schedules on the 1st, spread over the members in turn (neighbouring payments belong
/// to different members, as they would in a real run). Member 0's rows go through the store;
/// the rest are bulk copies of them ([`super::bulkload`]).
pub(super) async fn load(
    ctx: &Context,
    store: &dyn Store,
    url: &DatabaseUrl,
    processor: &dyn Processor,
    clock: &dyn Clock,
    n: u32,
    due: Due,
) -> Result<(), CliError> {
    use super::bulkload::{BulkLoader, Value};
    let audit = Audit {
        actor: operator(),
        at: clock.now(),
    };
    let now = audit.at;
    let currency = ctx.settings.payments.currency;
    let today = now.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
    let members = n.div_ceil(SCHEDULES_PER_MEMBER).max(1);
    let number = CardNumber::parse("4242424242424242").map_err(invalid)?;
    let code = SecurityCode::parse("123", number.brand()).map_err(invalid)?;
    let expiry =
        Expiry::new(12, u16::try_from(today.year() + 3).map_err(invalid)?).map_err(invalid)?;

    let member = store
        .add_member(
            &NewMember {
                account_number: AccountNumber::parse(&account(0)).map_err(invalid)?,
                account_type: AccountType::EmployerGroup,
                name: MemberName::parse("Benchmark Group").map_err(invalid)?,
                email: EmailAddress::parse(&email(0)).map_err(invalid)?,
                time_zone: "UTC".into(),
            },
            &audit,
        )
        .await?;
    let token = processor
        .tokenize(&super::members::owner(&member), &number, &code, expiry)
        .await
        .map_err(|e| CliError::internal(format!("the simulated processor: {e}")))?;
    let card = store
        .add_card(
            &super::members::new_card(
                member.id,
                processor,
                token,
                crate::store::Consent {
                    at: audit.at,
                    via: "cli".into(),
                    terms_version: Some("bench".into()),
                },
            ),
            &audit,
        )
        .await?;
    let bills = store
        .add_bills(
            &[NewBill {
                member_id: member.id,
                reference: bill_reference(0),
                amount_due: Money::from_minor(BILL_MINOR, currency),
                due_date: today,
                origin: "autopay bench".into(),
            }],
            &audit,
        )
        .await?;
    let bill_id = bills
        .added
        .first()
        .map(|b| b.id)
        .ok_or_else(|| invalid("the template bill was not created"))?;

    // A monthly schedule whose first payment is due now, with the rule's own dates from
    // tomorrow so that only the first payment falls due during the run; or, for the idle
    // benchmark, with nothing due for weeks.
    let (start, first_payment) = match due {
        Due::Now => (
            today.tomorrow().map_err(invalid)?,
            Some(FirstPayment::Now(now)),
        ),
        Due::Later => (
            today
                .checked_add(jiff::Span::new().days(40))
                .map_err(invalid)?,
            None,
        ),
    };
    let recurrence = Recurrence::new(RecurrenceSpec {
        rule: Rule::Monthly { day: 1 },
        at: jiff::civil::time(9, 0, 0, 0),
        time_zone: "UTC".into(),
        start,
        first_payment,
        end: End::Never,
        business_days: false,
        holidays: vec![],
    })
    .map_err(invalid)?;
    let first = recurrence
        .occurrences()
        .next()
        .ok_or_else(|| invalid("the schedule has no first payment"))?;
    let schedule = store
        .add_schedule(
            &NewSchedule {
                member_id: member.id,
                card_id: card.id,
                kind: ScheduleKind::Recurring,
                recurrence,
                amount: AmountRule::Fixed {
                    amount: Money::from_minor(CHARGE_MINOR, currency),
                },
                currency,
                next_run_at: Some(first.due_at),
                next_occurrence: Some(first.key),
                authorized_via: AuthorizedVia::Cli,
                terms_version: "bench".into(),
            },
            &audit,
        )
        .await?;

    // The copies' ids: a random base per table plus the copy's number, so member m's card and
    // bill are found again without holding a list of them. The bulk loader copies rows of any
    // table, so it takes plain UUIDs.
    let base = || Uuid::new_v4().as_u128();
    let (member_base, card_base, bill_base, schedule_base) = (base(), base(), base(), base());
    let id = |base: u128, i: u32| Uuid::from_u128(base.wrapping_add(u128::from(i)));
    let member_id = |m: u32| {
        if m == 0 {
            member.id.as_uuid()
        } else {
            id(member_base, m)
        }
    };
    let card_id = |m: u32| {
        if m == 0 {
            card.id.as_uuid()
        } else {
            id(card_base, m)
        }
    };

    let bulk = BulkLoader::open(url).await?;
    let loaded = async {
        bulk.replicate(
            "members",
            member.id.as_uuid(),
            &["id", "account_number", "email"],
            (1..members).map(|m| {
                vec![
                    Value::Id(member_id(m)),
                    Value::Text(account(m)),
                    Value::Text(email(m)),
                ]
            }),
        )
        .await?;
        bulk.replicate(
            "payment_methods",
            card.id.as_uuid(),
            &["id", "member_id"],
            (1..members).map(|m| vec![Value::Id(card_id(m)), Value::Id(member_id(m))]),
        )
        .await?;
        bulk.replicate(
            "bills",
            bill_id,
            &["id", "member_id", "reference"],
            (1..members).map(|m| {
                vec![
                    Value::Id(id(bill_base, m)),
                    Value::Id(member_id(m)),
                    Value::Text(bill_reference(m)),
                ]
            }),
        )
        .await?;
        progress(format!("  {members} members, cards and bills loaded"));
        bulk.replicate(
            "schedules",
            schedule.id.as_uuid(),
            &["id", "member_id", "payment_method_id"],
            (1..n).map(|i| {
                let m = i % members;
                vec![
                    Value::Id(id(schedule_base, i)),
                    Value::Id(member_id(m)),
                    Value::Id(card_id(m)),
                ]
            }),
        )
        .await?;
        Ok::<(), CliError>(())
    }
    .await;
    bulk.close().await;
    loaded
}

fn account(m: u32) -> String {
    format!("BENCH-{m:07}")
}

fn email(m: u32) -> String {
    format!("bench-{m}@example.org")
}

fn bill_reference(m: u32) -> String {
    format!("BENCH-{m:07}-1")
}

/// Every schedule gave one payment, every payment succeeded, and the processor charged each
/// once: anything else is a bug, and the figures would mean nothing.
async fn verify(
    store: &dyn Store,
    processor: &SimulatedProcessor,
    backend: Backend,
    n: u32,
    report: &crate::engine::PassReport,
) -> Result<(), CliError> {
    let status = store.status().await?;
    let succeeded = status.payments.get("succeeded").copied().unwrap_or(0);
    let total: i64 = status.payments.values().sum();
    let charged = processor
        .ledger_count()
        .await
        .map_err(|e| CliError::internal(format!("the simulated processor's ledger: {e}")))?;
    if succeeded != i64::from(n) || total != i64::from(n) || charged != u64::from(n) {
        let counts = status
            .payments
            .iter()
            .map(|(state, count)| format!("{state} {count}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(CliError::internal(format!(
            "the benchmark on {} expected {n} succeeded payments and {n} processor charges, and found payments [{counts}] and {charged} charges (drain report: {report:?}); the figures are void, this is a bug to report",
            backend_name(backend),
        )));
    }
    Ok(())
}

/// The process's peak resident memory (VmHWM), in KiB.
pub(super) fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

fn print(ctx: &Context, results: &[BenchResult]) -> Result<(), CliError> {
    if ctx.json {
        return output::json(results);
    }
    let mut t = Table::new(vec![
        "BACKEND",
        "SCENARIO",
        "PAYMENTS",
        "CONCURRENCY",
        "LATENCY",
        "LEDGER",
        "LIMIT/S",
        "LOAD S",
        "PLAN S",
        "CHARGE S",
        "CHARGES/S",
        "TARGET/S",
        "MAX IN 1S",
        "CEILING/S",
        "OF CEILING",
        "PEAK RSS MIB",
    ]);
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    for r in results {
        t.row(vec![
            backend_name(r.backend).to_string(),
            r.scenario.to_string(),
            r.payments.to_string(),
            r.concurrency.to_string(),
            r.latency.clone(),
            r.ledger.to_string(),
            or_dash(r.rate_limit.map(|l| l.to_string())),
            format!("{:.2}", r.load_seconds),
            format!("{:.2}", r.plan_seconds),
            format!("{:.2}", r.charge_seconds),
            format!("{:.0}", r.charges_per_second),
            or_dash(r.target_per_second.map(|t| format!("{t:.0}"))),
            r.most_requests_in_one_second.to_string(),
            or_dash(r.ceiling_per_second.map(|c| format!("{c:.0}"))),
            or_dash(r.share_of_ceiling.map(|x| format!("{:.0} %", x * 100.0))),
            r.peak_rss_mib
                .map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}")),
        ]);
    }
    say(t.render());
    say(
        "LEDGER: where the simulated processor kept its charges (memory for the speed figures, a database file of its own for the memory figures); every charge's receipt was checked in the outbox; peak RSS is the whole process's high-water mark after each run",
    );
    Ok(())
}

/// The PostgreSQL admin connection: it creates and drops the throwaway database, nothing else.
struct PgAdmin {
    url: String,
}

impl PgAdmin {
    fn new(url: &str) -> Result<PgAdmin, CliError> {
        match DatabaseUrl::parse(url, None) {
            Ok(parsed) if parsed.backend() == Backend::Postgres => Ok(PgAdmin {
                url: url.trim().to_string(),
            }),
            _ => Err(CliError::usage(format!(
                "--postgres-url {} is not a PostgreSQL URL; write it like postgres://USER@HOST:5432/DB",
                redact_url(url)
            ))),
        }
    }

    async fn connect(&self) -> Result<sqlx::PgConnection, CliError> {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&self.url).await.map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach PostgreSQL at {} to create the benchmark's database: {}; start PostgreSQL, point --postgres-url (or TEST_DATABASE_URL) at a server whose user may CREATE DATABASE, or run `autopay bench --backend sqlite`",
                    redact_url(&self.url),
                    redact_url(&e.to_string())
                ),
            )
        })
    }

    async fn create(&self, name: &str) -> Result<(), CliError> {
        let mut conn = self.connect().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| {
                CliError::new(
                    exit::UNAVAILABLE,
                    format!(
                        "cannot create the benchmark's database {name} on {}: {e}; the --postgres-url user needs the CREATEDB privilege",
                        redact_url(&self.url)
                    ),
                )
            })?;
        Ok(())
    }

    /// Drops the database, ending any connection still open to it; says so when it cannot.
    async fn drop_database(&self, name: &str) {
        let dropped = async {
            let mut conn = self.connect().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
            Ok::<(), CliError>(())
        }
        .await;
        if let Err(e) = dropped {
            progress(format!(
                "warning: could not drop the benchmark's database {name}: {}; drop it by hand (DROP DATABASE {name} WITH (FORCE))",
                e.message
            ));
        }
    }
}

/// The URL with its database name replaced: same user, password, host and parameters.
fn with_database(url: &str, name: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let path_end = url[authority..]
        .find('?')
        .map_or(url.len(), |i| authority + i);
    match url[authority..path_end].find('/') {
        Some(slash) => format!("{}/{name}{}", &url[..authority + slash], &url[path_end..]),
        None => format!("{}/{name}{}", &url[..path_end], &url[path_end..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throwaway_database_replaces_only_the_database_name() {
        let name = "autopay_bench_x";
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", name),
            "postgres://postgres@127.0.0.1:5432/autopay_bench_x"
        );
        assert_eq!(
            with_database("postgres://u:p%2Fw@db:5432/test?sslmode=require", name),
            "postgres://u:p%2Fw@db:5432/autopay_bench_x?sslmode=require"
        );
        assert_eq!(
            with_database("postgres://u@db", name),
            "postgres://u@db/autopay_bench_x"
        );
        assert_eq!(
            with_database("postgresql://u@db/?sslmode=disable", name),
            "postgresql://u@db/autopay_bench_x?sslmode=disable"
        );
    }

    #[test]
    fn peak_memory_is_read_from_vm_hwm() {
        let status =
            "Name:\tautopay\nVmPeak:\t  200000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(51_234));
        assert_eq!(parse_vm_hwm("Name:\tautopay\n"), None);
    }

    #[test]
    fn the_admin_url_must_be_postgres() {
        assert!(PgAdmin::new("postgres://postgres@127.0.0.1:5432/test").is_ok());
        let err = PgAdmin::new("sqlite://x.db").err().map(|e| e.code);
        assert_eq!(err, Some(exit::USAGE));
    }
}
