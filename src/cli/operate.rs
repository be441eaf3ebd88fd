//! `autopay run`, `charging pause|resume`, and the operator's payment commands (`retry`,
//! `resolve`, `forecast`).

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use serde::Serialize;

use super::args::{ChargingCommand, RunArgs};
use super::output::{self, Table, say};
use super::{CliError, Context, exit, parse_id};
use crate::daemon::{self, Daemon, DaemonError, RunSummary, engine_config, outcome_policy};
use crate::domain::ids::{MemberId, ScheduleId};
use crate::domain::money::Money;
use crate::domain::payment::{AmountRule, Resolution};
use crate::domain::schedule::parse_date;
use crate::domain::status::ScheduleStatus;
use crate::engine::{Engine, EngineError, RetryOutcome};
use crate::processor::Lookup;
use crate::store::{Resolve, Store, StoreError};

impl From<EngineError> for CliError {
    fn from(e: EngineError) -> CliError {
        match e {
            EngineError::Store(s) => s.into(),
            EngineError::InjectedCrash => CliError::internal(e.to_string()),
        }
    }
}

/// An engine for the operator's commands (an operator's `payment retry`).
async fn engine(ctx: &Context, store: Arc<dyn Store>) -> Result<Engine, CliError> {
    let processor = ctx.processor().await?;
    Ok(Engine::new(
        store,
        processor,
        ctx.clock.clone(),
        engine_config(&ctx.settings),
        outcome_policy(&ctx.settings),
    ))
}

impl From<DaemonError> for CliError {
    fn from(e: DaemonError) -> CliError {
        match e {
            DaemonError::Store(s) => s.into(),
            DaemonError::Engine(e) => e.into(),
            DaemonError::Processor(p) => p.into(),
            DaemonError::Config(m) => CliError::new(exit::CONFIG, m),
            DaemonError::Grace(m) => CliError::new(exit::SOFTWARE, m),
        }
    }
}

fn print_pass(ctx: &Context, what: &str, run: &RunSummary) -> Result<(), CliError> {
    if ctx.json {
        return output::json(run);
    }
    let (pass, reminders, mail) = (&run.pass, run.reminders, &run.mail);
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
    if args.dry_run {
        let store = daemon::open_store(&ctx.settings, ctx.now()).await?;
        let forecast = forecast(ctx, store.as_ref(), ctx.now()).await?;
        return print_forecast(ctx, &forecast, "due now (dry run: nothing written)");
    }
    let daemon = Daemon::build(ctx.settings.clone(), ctx.clock.clone()).await?;
    if args.demo {
        super::demo::seed(ctx, daemon.store().as_ref()).await?;
    }
    if args.drain {
        let run = daemon.drain().await?;
        return print_pass(ctx, "drained", &run);
    }
    say(format!(
        "autopay is running (worker {}); press Ctrl-C to stop",
        daemon.worker_id()
    ));
    let run = daemon.run_until_stopped(stop_signal()).await?;
    print_pass(ctx, "stopped", &run)
}

/// Resolves at the first SIGTERM or SIGINT, which stops claiming (what is in flight finishes
/// within `daemon.shutdown_grace`); a second one ends the process at once with 130. SIGHUP is
/// ignored (and says so): autopay writes its log to standard error, which the service manager
/// owns, so there is no log file to reopen, and settings are read only at start.
fn stop_signal() -> impl std::future::Future<Output = ()> + Send {
    let (first, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!(
                    "cannot listen for SIGTERM, SIGINT and SIGHUP; stop autopay with SIGKILL"
                );
                return;
            };
            let mut first = Some(first);
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP ignored: the log goes to standard error and settings are read at start; restart autopay to apply new settings");
                        continue;
                    }
                }
                match first.take() {
                    Some(first) => {
                        let _ = first.send(());
                    }
                    None => {
                        tracing::warn!(
                            "second stop signal: exiting now; leases in flight are settled by lookup"
                        );
                        std::process::exit(130);
                    }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            let _ = first.send(());
        }
    });
    async move {
        let _ = stopped.await;
    }
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
                found.decline_code().unwrap_or_default()
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
    let mut balances: BTreeMap<MemberId, i64> = BTreeMap::new();
    let mut estimates = 0;
    let mut add = |at: Timestamp, minor: i64| {
        let day = at.strftime("%Y-%m-%d").to_string();
        let entry = days.entry(day).or_default();
        entry.0 += 1;
        entry.1 += minor;
    };
    let schedules = store.list_schedules(None).await?;
    let amount_rules: std::collections::HashMap<ScheduleId, AmountRule> =
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

async fn open_balance(store: &dyn Store, member_id: MemberId) -> Result<i64, StoreError> {
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
    cache: &mut BTreeMap<MemberId, i64>,
    member_id: MemberId,
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
