//! `autopay run`, `charging pause|resume`, and the operator's payment commands (`retry`,
//! `resolve`, `forecast`).

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::Notify;

use super::args::{ChargingCommand, RunArgs};
use super::output::{self, Table, say};
use super::{CliError, Context, exit, parse_id};
use crate::domain::money::Money;
use crate::domain::payment::{AmountRule, Resolution};
use crate::domain::schedule::parse_date;
use crate::domain::status::ScheduleStatus;
use crate::engine::{
    Engine, EngineConfig, EngineError, PassReport, RetryOutcome, Shutdown, outcome_policy,
};
use crate::notify::dispatcher::{DeliveryReport, Dispatcher};
use crate::notify::templates::Templates;
use crate::notify::{housekeeping, mailer, reminders};
use crate::processor::Lookup;
use crate::store::{self, Resolve, Store, StoreError};

impl From<EngineError> for CliError {
    fn from(e: EngineError) -> CliError {
        match e {
            EngineError::Store(s) => s.into(),
            EngineError::InjectedCrash => CliError::internal(e.to_string()),
        }
    }
}

/// Opens the database for `run`: a default SQLite file that did not exist is created and
/// migrated; anything else must already be migrated (`autopay migrate`).
async fn store_for_run(ctx: &Context) -> Result<Arc<dyn Store>, CliError> {
    let url = &ctx.settings.database.url;
    let fresh = url.sqlite_path().is_some_and(|p| !p.exists());
    let store = store::open(url, ctx.settings.database.max_connections).await?;
    if fresh {
        let report = store.migrate(ctx.now()).await?;
        tracing::info!(
            schema_version = report.schema_version,
            "created and migrated a new SQLite database"
        );
    }
    store::require_current_schema(store.as_ref()).await?;
    Ok(store)
}

async fn engine(ctx: &Context, store: Arc<dyn Store>) -> Result<Engine, CliError> {
    let processor = ctx.processor().await?;
    Ok(Engine::new(
        store,
        processor,
        ctx.clock.clone(),
        EngineConfig::from_settings(&ctx.settings),
        outcome_policy(&ctx.settings),
    ))
}

/// The outbox side of a run: the dispatcher over the configured transport and templates.
fn dispatcher(
    ctx: &Context,
    store: Arc<dyn Store>,
    worker_id: &str,
) -> Result<Dispatcher, CliError> {
    let dir = (!ctx.settings.email.templates.is_empty())
        .then(|| std::path::PathBuf::from(&ctx.settings.email.templates));
    let templates = Templates::load(dir.as_deref())
        .map_err(|e| CliError::new(exit::CONFIG, format!("email.templates: {e}")))?;
    let mailer = mailer::from_settings(&ctx.settings.email)
        .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
    Dispatcher::new(
        &ctx.settings,
        store,
        Arc::from(mailer),
        Arc::new(templates),
        ctx.clock.clone(),
        worker_id.to_string(),
    )
    .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))
}

/// Reminder and card-expiry scans, then one delivery pass (or all, when draining).
async fn mail_pass(
    ctx: &Context,
    store: &dyn Store,
    dispatcher: &Dispatcher,
    drain: bool,
) -> Result<(u64, DeliveryReport), CliError> {
    let now = ctx.now();
    let written = reminders::scan(store, &ctx.settings, now).await?;
    housekeeping::prune(store, &ctx.settings, now).await?;
    let report = if drain {
        dispatcher.drain().await?
    } else {
        dispatcher.deliver_due().await?
    };
    Ok((written, report))
}

#[derive(Serialize)]
struct RunSummary<'a> {
    #[serde(flatten)]
    pass: &'a PassReport,
    reminders: u64,
    mail: &'a DeliveryReport,
}

fn print_pass(
    ctx: &Context,
    what: &str,
    pass: &PassReport,
    reminders: u64,
    mail: &DeliveryReport,
) -> Result<(), CliError> {
    if ctx.json {
        return output::json(&RunSummary {
            pass,
            reminders,
            mail,
        });
    }
    let c = &pass.charge;
    say(format!(
        "{what}: planned {} payment(s) ({} missed); charged {} ok, {} declined (will retry), {} failed, {} skipped, {} cancelled, {} unknown (looked up later), {} for review",
        pass.plan.planned,
        pass.plan.missed,
        c.succeeded,
        c.declined,
        c.failed,
        c.skipped,
        c.cancelled,
        c.unknown,
        c.needs_review
    ));
    let folder = if ctx.settings.email.transport == crate::config::EmailTransport::File {
        format!(" (.eml files in {})", ctx.settings.email.folder.display())
    } else {
        String::new()
    };
    say(format!(
        "mail: {} sent{folder}, {} waiting to retry, {} failed; {} reminder(s) written{}",
        mail.sent,
        mail.retrying,
        mail.failed,
        reminders,
        if mail.paused {
            "; MAIL PAUSED: see `autopay status`"
        } else {
            ""
        }
    ));
    Ok(())
}

pub(super) async fn run(ctx: &Context, args: RunArgs) -> Result<(), CliError> {
    if args.dry_run && !args.drain {
        return Err(CliError::usage(
            "--dry-run goes with --drain: `autopay run --drain --dry-run`",
        ));
    }
    if args.demo && ctx.settings.database.url.sqlite_path().is_none() {
        return Err(CliError::usage(
            "--demo seeds sample data into the embedded SQLite default; unset database.url (or point it at a sqlite:// file)",
        ));
    }
    let store = store_for_run(ctx).await?;
    if args.demo {
        super::demo::seed(ctx, store.as_ref()).await?;
    }
    if args.dry_run {
        let until = ctx.now();
        let forecast = forecast(ctx, store.as_ref(), until).await?;
        return print_forecast(ctx, &forecast, "due now (dry run: nothing written)");
    }
    let engine = engine(ctx, store.clone()).await?;
    let dispatcher = dispatcher(ctx, store.clone(), engine.worker_id())?;
    tracing::info!(worker_id = engine.worker_id(), backend = ?ctx.settings.database.url.backend(), "autopay starting");
    if args.drain {
        let pass = engine.drain().await?;
        let (reminders, mail) = mail_pass(ctx, store.as_ref(), &dispatcher, true).await?;
        return print_pass(ctx, "drained", &pass, reminders, &mail);
    }
    let shutdown = Shutdown::new();
    let wake = Arc::new(Notify::new());
    spawn_signal_handler(shutdown.clone());
    say(format!(
        "autopay is running (worker {}); press Ctrl-C to stop",
        engine.worker_id()
    ));
    let grace = ctx.settings.daemon.shutdown_grace.as_std();
    let running = engine.run(shutdown.clone(), wake);
    let mailing = mail_loop(ctx, store.as_ref(), &dispatcher, shutdown.clone());
    let both = async { tokio::join!(running, mailing) };
    tokio::pin!(both);
    let (total, mail) = tokio::select! {
        (done, mail) = &mut both => (done?, mail?),
        () = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
            tracing::error!("charges still in flight after daemon.shutdown_grace; exiting, their leases will be settled by lookup");
            return Err(CliError::new(exit::SOFTWARE, "stopped with charges in flight after daemon.shutdown_grace"));
        }
    };
    print_pass(ctx, "stopped", &total, mail.0, &mail.1)
}

/// Delivers the outbox while the daemon runs: a pass every second while there is mail, the
/// reminder scans once a minute, the outbox housekeeping once an hour.
async fn mail_loop(
    ctx: &Context,
    store: &dyn Store,
    dispatcher: &Dispatcher,
    shutdown: Shutdown,
) -> Result<(u64, DeliveryReport), CliError> {
    let mut total = DeliveryReport::default();
    let mut reminders = 0;
    let mut last_scan: Option<Timestamp> = None;
    let mut last_prune: Option<Timestamp> = None;
    while !shutdown.is_triggered() {
        let now = ctx.now();
        if last_prune.is_none_or(|t| now.duration_since(t) >= jiff::SignedDuration::from_hours(1)) {
            if let Err(e) = housekeeping::prune(store, &ctx.settings, now).await {
                tracing::error!(error.message = %e, "outbox housekeeping failed; trying again in an hour");
            }
            last_prune = Some(now);
        }
        if last_scan.is_none_or(|t| now.duration_since(t) >= jiff::SignedDuration::from_mins(1)) {
            match reminders::scan(store, &ctx.settings, now).await {
                Ok(n) => reminders += n,
                Err(e) => tracing::error!(error.message = %e, "reminder scan failed; trying again"),
            }
            last_scan = Some(now);
        }
        let idle = match dispatcher.deliver_due().await {
            Ok(pass) => {
                total.add(&pass);
                pass.claimed == 0
            }
            Err(e) => {
                tracing::error!(error.message = %e, "mail pass failed; trying again");
                true
            }
        };
        if idle {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                () = shutdown.wait() => {}
            }
        }
    }
    Ok((reminders, total))
}

/// SIGTERM and SIGINT stop claiming; in-flight charges finish within the grace period.
fn spawn_signal_handler(shutdown: Shutdown) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate());
            let int = signal(SignalKind::interrupt());
            if let (Ok(mut term), Ok(mut int)) = (term, int) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stop requested; finishing charges in flight");
        shutdown.trigger();
    });
}

pub(super) async fn charging(ctx: &Context, command: ChargingCommand) -> Result<(), CliError> {
    let store = ctx.store().await?;
    let control = match command {
        ChargingCommand::Pause { reason } => {
            let reason = super::billing::free_text(&reason, 200)
                .map_err(|e| CliError::data(format!("--reason: {e}")))?;
            let control = store
                .set_charging_pause(Some(&reason), &ctx.audit())
                .await?;
            tracing::warn!("charging paused by operator");
            control
        }
        ChargingCommand::Resume => {
            let control = store.set_charging_pause(None, &ctx.audit()).await?;
            tracing::info!("charging resumed by operator");
            control
        }
    };
    if ctx.json {
        return output::json(&control);
    }
    match &control.charging_paused {
        Some(p) => say(format!(
            "charging is PAUSED on every host since {}: {}",
            p.since, p.reason
        )),
        None => say("charging is running"),
    }
    Ok(())
}

pub(super) async fn retry(ctx: &Context, payment: &str, force: bool) -> Result<(), CliError> {
    let id = parse_id(payment, "payment")?;
    let store = ctx.store().await?;
    let engine = engine(ctx, store.clone()).await?;
    let (payment, said) = match engine.operator_retry(id, force, &ctx.audit()).await? {
        RetryOutcome::Scheduled(p) => {
            tracing::info!(payment_id = %id, attempt = p.attempt, "payment retried by operator");
            let said = format!(
                "payment {id} is scheduled again (attempt {}, a new idempotency key); `autopay run` charges it",
                p.attempt
            );
            (*p, said)
        }
        RetryOutcome::Settled(state) => {
            tracing::info!(payment_id = %id, state = %state, "an operator's retry settled the payment");
            let said = format!(
                "payment {id} was settled by the processor's answer to the same request: it is {state}"
            );
            (store.payment(id).await?, said)
        }
        RetryOutcome::NotYet { until, why } => {
            let after = until.map_or(String::new(), |t| format!("; try again after {t}"));
            return Err(CliError::data(format!(
                "payment {id} cannot be retried yet: {why}{after}. Nothing was changed; `autopay payment resolve` settles it by hand once you have checked the processor"
            )));
        }
        RetryOutcome::NoAnswer { detail } => {
            return Err(CliError::new(
                exit::UNAVAILABLE,
                format!(
                    "the processor could not answer about payment {id} ({detail}); its state is unchanged, try again later"
                ),
            ));
        }
    };
    if ctx.json {
        return output::json(&payment);
    }
    say(said);
    Ok(())
}

pub(super) async fn resolve(
    ctx: &Context,
    payment: &str,
    resolution: &str,
    reference: &str,
    reason: &str,
) -> Result<(), CliError> {
    let id = parse_id(payment, "payment")?;
    let resolution = match resolution {
        "succeeded" => Resolution::Succeeded,
        "failed" => Resolution::Failed,
        "cancelled" => Resolution::Cancelled,
        other => {
            return Err(CliError::usage(format!(
                "--as: '{other}' is not succeeded, failed or cancelled"
            )));
        }
    };
    let reference = super::billing::free_text(reference, 100)
        .map_err(|e| CliError::data(format!("--reference: {e}")))?;
    let reason = super::billing::free_text(reason, 200)
        .map_err(|e| CliError::data(format!("--reason: {e}")))?;
    let store = ctx.store().await?;
    // Take the payment first, so that what the processor says below is about the attempt that
    // is resolved: no worker can settle or resend it meanwhile.
    let taken = store
        .take_for_operator(id, ctx.settings.daemon.lease.as_std(), &ctx.audit())
        .await?;
    let processor = ctx.processor().await?;
    let lookup = match &taken.sent {
        Some(sent) => tokio::time::timeout(
            ctx.settings.processor.timeout.as_std(),
            processor.find_attempt(&sent.reference),
        )
        .await
        .unwrap_or_else(|_| Lookup::Unknown {
            detail: "no answer within processor.timeout".into(),
        }),
        // Nothing was sent for this attempt: there is nothing the processor could hold.
        None => Lookup::NotFound,
    };
    // The processor's answer wins over a guess.
    let refused = match lookup {
        Lookup::Found(found) if found.approved && resolution != Resolution::Succeeded => {
            Some(CliError::data(format!(
                "the processor holds an approved charge {} for this attempt; resolve it --as succeeded --reference {}",
                found.reference, found.reference
            )))
        }
        Lookup::Found(found) if !found.approved && resolution == Resolution::Succeeded => {
            Some(CliError::data(format!(
                "the processor recorded this attempt as declined ({}); resolve it --as failed",
                found.decline_code.unwrap_or_default()
            )))
        }
        Lookup::NotFound if resolution == Resolution::Succeeded => Some(CliError::data(
            "the processor has no record of this attempt; resolve it --as failed or --as cancelled, then `autopay payment retry` it if it is still owed",
        )),
        Lookup::Unknown { detail } => {
            tracing::warn!(payment_id = %id, detail = %detail, "the processor could not answer; resolving on the operator's word");
            None
        }
        _ => None,
    };
    if let Some(refused) = refused {
        store.give_back(&taken.lease).await?;
        return Err(refused);
    }
    let p = store
        .resolve_payment(
            &Resolve {
                lease: taken.lease,
                resolution,
                reference,
                reason,
            },
            &ctx.audit(),
        )
        .await?;
    tracing::info!(payment_id = %id, attempt = taken.payment.attempt, state = %p.state, "payment resolved by operator");
    if ctx.json {
        return output::json(&p);
    }
    say(format!(
        "payment {id} (attempt {}) resolved as {}",
        taken.payment.attempt, p.state
    ));
    Ok(())
}

/// What would be charged, per day.
#[derive(Debug, Serialize)]
pub struct Forecast {
    pub until: Timestamp,
    pub days: Vec<ForecastDay>,
    pub count: u64,
    #[serde(serialize_with = "crate::store::money_str")]
    pub total: Money,
    /// Statement-balance payments are estimated at today's balance.
    pub balance_estimates: u64,
}

#[derive(Debug, Serialize)]
pub struct ForecastDay {
    pub date: String,
    pub count: u64,
    #[serde(serialize_with = "crate::store::money_str")]
    pub total: Money,
}

/// Reads schedules and waiting payments, and writes nothing.
async fn forecast(
    ctx: &Context,
    store: &dyn Store,
    until: Timestamp,
) -> Result<Forecast, CliError> {
    let currency = ctx.settings.payments.currency;
    let mut days: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let mut balances: BTreeMap<uuid::Uuid, i64> = BTreeMap::new();
    let mut estimates = 0;
    let mut add = |at: Timestamp, minor: i64| {
        let day = at.strftime("%Y-%m-%d").to_string();
        let entry = days.entry(day).or_default();
        entry.0 += 1;
        entry.1 += minor;
    };
    let schedules = store.list_schedules(None).await?;
    let amount_rules: std::collections::HashMap<uuid::Uuid, AmountRule> =
        schedules.iter().map(|s| (s.id, s.amount)).collect();
    for p in store.list_payments(None, None).await? {
        if !p.state.is_unclaimed() {
            continue;
        }
        let at = p.next_attempt_at.unwrap_or(p.due_at);
        if at > until {
            continue;
        }
        let Some(rule) = amount_rules.get(&p.schedule_id) else {
            continue;
        };
        let minor = match rule {
            AmountRule::Fixed { amount } => amount.minor(),
            AmountRule::Balance => {
                estimates += 1;
                balance(store, &mut balances, p.member_id).await?
            }
        };
        add(at, minor);
    }
    for s in &schedules {
        if s.status != ScheduleStatus::Active {
            continue;
        }
        let Some(key) = s.next_occurrence else {
            continue;
        };
        for o in s
            .recurrence
            .occurrences()
            .skip_while(|o| o.key < key)
            .take_while(|o| o.due_at <= until)
        {
            let minor = match s.amount {
                AmountRule::Fixed { amount } => amount.minor(),
                AmountRule::Balance => {
                    estimates += 1;
                    // The first charge takes today's balance; later ones only what is billed by then.
                    balance(store, &mut balances, s.member_id).await?
                }
            };
            add(o.due_at, minor);
        }
    }
    let count = days.values().map(|d| d.0).sum();
    let total = Money::from_minor(days.values().map(|d| d.1).sum(), currency);
    Ok(Forecast {
        until,
        days: days
            .into_iter()
            .map(|(date, (count, minor))| ForecastDay {
                date,
                count,
                total: Money::from_minor(minor, currency),
            })
            .collect(),
        count,
        total,
        balance_estimates: estimates,
    })
}

async fn open_balance(store: &dyn Store, member_id: uuid::Uuid) -> Result<i64, StoreError> {
    let owed: i64 = store
        .list_bills(Some(member_id))
        .await?
        .iter()
        .filter(|b| b.status == crate::domain::status::BillStatus::Open)
        .map(|b| b.outstanding().minor())
        .sum();
    let credit: i64 = store
        .list_credits(member_id)
        .await?
        .iter()
        .map(|c| c.remaining.minor())
        .sum();
    Ok((owed - credit).max(0))
}

async fn balance(
    store: &dyn Store,
    cache: &mut BTreeMap<uuid::Uuid, i64>,
    member_id: uuid::Uuid,
) -> Result<i64, StoreError> {
    if let std::collections::btree_map::Entry::Vacant(slot) = cache.entry(member_id) {
        slot.insert(open_balance(store, member_id).await?);
    }
    Ok(cache.get_mut(&member_id).map(std::mem::take).unwrap_or(0))
}

fn print_forecast(ctx: &Context, f: &Forecast, title: &str) -> Result<(), CliError> {
    if ctx.json {
        return output::json(f);
    }
    let mut t = Table::new(vec!["DATE (UTC)", "PAYMENTS", "TOTAL"]);
    for d in &f.days {
        t.row(vec![
            d.date.clone(),
            d.count.to_string(),
            d.total.display_with_code(),
        ]);
    }
    say(format!(
        "{title}: {} payment(s), {} in all",
        f.count,
        f.total.display_with_code()
    ));
    say(t.render());
    if f.balance_estimates > 0 {
        say(format!(
            "{} statement-balance payment(s) estimated at today's open balance",
            f.balance_estimates
        ));
    }
    Ok(())
}

pub(super) async fn forecast_until(ctx: &Context, until: &str) -> Result<(), CliError> {
    let date = parse_date(until).map_err(|e| CliError::data(format!("--until: {e}")))?;
    let until = date
        .at(23, 59, 59, 0)
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .map_err(|e| CliError::data(format!("--until: {e}")))?
        .timestamp();
    if until < ctx.now() {
        return Err(CliError::data(
            "--until is in the past; give a date from today on",
        ));
    }
    let store = ctx.store().await?;
    let f = forecast(ctx, store.as_ref(), until).await?;
    print_forecast(ctx, &f, &format!("forecast until {date}"))
}
