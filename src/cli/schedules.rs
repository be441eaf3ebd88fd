//! `autopay schedule ...` and `autopay payment ...`.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::args::{PaymentCommand, RuleArgs, ScheduleCommand};
use super::members::{account, time_zone};
use super::output::{self, Table, say};
use super::{CliError, Context, parse_id};
use crate::domain::ids::ScheduleId;
use crate::domain::money::ChargeAmount;
use crate::domain::payment::{AmountRule, PaymentState};
use crate::domain::schedule::{
    End, FirstPayment, Occurrence, OccurrenceKind, Recurrence, RecurrenceSpec, Rule, Unit,
    parse_date, parse_time_of_day,
};
use crate::domain::status::{AuthorizedVia, ScheduleKind, ScheduleStatus};
use crate::store::{NewSchedule, Schedule, ScheduleChange, ScheduleResume, Store};

/// One payment date as `schedule show` and `schedule preview` print it.
#[derive(Debug, Serialize)]
pub struct OccurrenceView {
    pub occurrence: String,
    pub kind: &'static str,
    /// Local date-time in the schedule's zone, RFC 3339 with its offset.
    pub local: String,
    /// The same instant in UTC.
    pub utc: Timestamp,
    /// The date it is charged, after any business-day move.
    pub due_date: String,
}

impl From<&Occurrence> for OccurrenceView {
    fn from(o: &Occurrence) -> OccurrenceView {
        OccurrenceView {
            occurrence: o.key.to_string(),
            kind: match o.key.kind {
                OccurrenceKind::First => "first",
                OccurrenceKind::Regular => "regular",
            },
            local: o.local.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            utc: o.due_at,
            due_date: o.due_date.to_string(),
        }
    }
}

fn print_occurrences(views: &[OccurrenceView], zone: &str) {
    let mut t = Table::new(vec!["DATE", "LOCAL TIME", "UTC", "NOTE"]);
    for v in views {
        let mut note = Vec::new();
        if v.kind == "first" {
            note.push("first payment".to_string());
        }
        if !v.occurrence.ends_with(&v.due_date) {
            note.push(format!(
                "moved from {}",
                v.occurrence.trim_start_matches("first:")
            ));
        }
        t.row(vec![
            v.due_date.clone(),
            v.local.clone(),
            v.utc.to_string(),
            note.join(", "),
        ]);
    }
    say(format!("times in {zone}"));
    say(t.render());
}

fn rule_error(e: impl std::fmt::Display) -> CliError {
    CliError::data(e.to_string())
}

/// Builds a recurrence from the rule flags. Returns it and whether its first payment is "now"
/// (due at once, even though that minute has begun).
fn recurrence_from(
    ctx: &Context,
    rule: &RuleArgs,
    zone: &str,
    now: Timestamp,
) -> Result<(Recurrence, bool), CliError> {
    let tz = TimeZone::get(zone).map_err(|_| {
        CliError::data(format!(
            "unknown time zone '{zone}'; use an IANA name such as America/New_York"
        ))
    })?;
    let local_now = now.to_zoned_datetime(tz);
    let today = local_now.date();
    let mut at = match &rule.at {
        Some(a) => parse_time_of_day(a).map_err(|e| CliError::data(format!("--at: {e}")))?,
        None => ctx.settings.payments.default_time,
    };
    let mut immediate = false;
    let parsed_rule = if rule.once {
        let on = rule.on.as_deref().unwrap_or_default();
        if on.trim() == "now" {
            immediate = true;
            let t = local_now.time();
            at = jiff::civil::Time::new(t.hour(), t.minute(), 0, 0).map_err(rule_error)?;
            Rule::Once { on: today }
        } else {
            Rule::Once {
                on: parse_date(on).map_err(|e| CliError::data(format!("--on: {e}")))?,
            }
        }
    } else if rule.monthly {
        Rule::Monthly {
            day: rule.day.unwrap_or_default(),
        }
    } else if let Some(n) = rule.every {
        let unit: Unit = rule
            .unit
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| CliError::data(format!("--unit: {e}")))?;
        Rule::Every { n, unit }
    } else {
        return Err(CliError::usage(
            "give one rule: --once --on DATE|now, --monthly --day D, or --every N --unit U",
        ));
    };
    if rule.day.is_some() && !rule.monthly {
        return Err(CliError::usage("--day goes with --monthly"));
    }
    let start = match &rule.start {
        Some(s) => parse_date(s).map_err(|e| CliError::data(format!("--start: {e}")))?,
        None => today,
    };
    let first_payment = match rule.first_payment.as_deref().map(str::trim) {
        None => None,
        Some("now") => {
            immediate = true;
            Some(FirstPayment::Now(now))
        }
        Some(d) => {
            Some(FirstPayment::On(parse_date(d).map_err(|e| {
                CliError::data(format!("--first-payment: {e}"))
            })?))
        }
    };
    let end = match (&rule.end, rule.count) {
        (Some(d), _) => {
            End::Until(parse_date(d).map_err(|e| CliError::data(format!("--end: {e}")))?)
        }
        (None, Some(n)) => End::Count(n),
        (None, None) => End::Never,
    };
    let month_rule = matches!(
        parsed_rule,
        Rule::Monthly { .. }
            | Rule::Every {
                unit: Unit::Months,
                ..
            }
    );
    let business_days = rule.business_days || (ctx.settings.payments.business_days && month_rule);
    let spec = RecurrenceSpec {
        rule: parsed_rule,
        at,
        time_zone: zone.to_string(),
        start,
        first_payment,
        end,
        business_days,
        holidays: ctx.settings.payments.holidays.clone(),
    };
    Ok((Recurrence::new(spec).map_err(rule_error)?, immediate))
}

/// The first occurrence a new or resumed schedule will charge: none before `now`, except a
/// payment asked for "now".
fn next_from(recurrence: &Recurrence, now: Timestamp, immediate: bool) -> Option<Occurrence> {
    if immediate {
        recurrence.occurrences().next()
    } else {
        recurrence.occurrences_from(now).next()
    }
}

fn upcoming(schedule: &Schedule, n: usize) -> Vec<OccurrenceView> {
    let Some(key) = &schedule.next_occurrence else {
        return Vec::new();
    };
    if schedule.status != ScheduleStatus::Active {
        return Vec::new();
    }
    schedule
        .recurrence
        .occurrences()
        .skip_while(|o| o.key < *key)
        .take(n)
        .map(|o| OccurrenceView::from(&o))
        .collect()
}

fn schedule_fields(s: &Schedule, card: &str) -> Vec<(&'static str, String)> {
    vec![
        ("id", s.id.to_string()),
        ("member", s.member_id.to_string()),
        ("card", card.to_string()),
        ("kind", s.kind.to_string()),
        ("rule", s.recurrence.describe()),
        ("amount", s.amount.to_string()),
        ("time zone", s.time_zone.clone()),
        (
            "status",
            match &s.status_reason {
                Some(r) if s.status != ScheduleStatus::Active => format!("{} ({r})", s.status),
                _ => s.status.to_string(),
            },
        ),
        (
            "next payment",
            s.next_run_at.map_or("none".into(), |t| t.to_string()),
        ),
        ("version", s.version.to_string()),
        (
            "authorized",
            format!(
                "{} via {} by {} (terms {})",
                s.authorized_at, s.authorized_via, s.authorized_by, s.terms_version
            ),
        ),
        (
            "cancelled",
            match (&s.cancelled_at, &s.cancelled_by) {
                (Some(at), Some(by)) => format!("{at} by {by}"),
                _ => "no".into(),
            },
        ),
    ]
}

pub(super) async fn schedule(ctx: &Context, command: ScheduleCommand) -> Result<(), CliError> {
    match command {
        ScheduleCommand::Add {
            account: acct,
            card,
            rule,
            amount,
            balance,
            time_zone: tz,
            terms_version,
        } => {
            let acct = account(&acct)?;
            let card_id = parse_id(&card, "card")?;
            let store = ctx.store().await?;
            let member = store.member(&acct).await?;
            let zone = match tz {
                Some(tz) => time_zone(&tz)?,
                None => member.time_zone.clone(),
            };
            let now = ctx.now();
            let (recurrence, immediate) = recurrence_from(ctx, &rule, &zone, now)?;
            let amount = match (amount, balance) {
                (Some(a), _) => {
                    let max = ctx.settings.payments.max_amount(member.account_type);
                    let charge = ChargeAmount::parse(&a, ctx.settings.payments.currency, max)
                        .map_err(|e| CliError::data(format!("--amount: {e}")))?;
                    AmountRule::Fixed {
                        amount: charge.money(),
                    }
                }
                (None, true) => AmountRule::Balance,
                (None, false) => return Err(CliError::usage("give --amount 125.00 or --balance")),
            };
            let next = next_from(&recurrence, now, immediate).ok_or_else(|| {
                CliError::data(format!(
                    "this schedule has no payment date from now on ({}); choose a later date",
                    recurrence.describe()
                ))
            })?;
            let new = NewSchedule {
                member_id: member.id,
                card_id,
                kind: if matches!(recurrence.rule(), Rule::Once { .. }) {
                    ScheduleKind::OneTime
                } else {
                    ScheduleKind::Recurring
                },
                recurrence,
                amount,
                currency: ctx.settings.payments.currency,
                next_run_at: Some(next.due_at),
                next_occurrence: Some(next.key),
                authorized_via: AuthorizedVia::Cli,
                terms_version: super::billing::free_text(&terms_version, 40)
                    .map_err(|e| CliError::data(format!("--terms-version: {e}")))?,
            };
            let schedule = store.add_schedule(&new, &ctx.audit()).await?;
            tracing::info!(schedule_id = %schedule.id, member_id = %member.id, "schedule authorized");
            if ctx.json {
                return output::json(&schedule);
            }
            say(schedule.id.to_string());
            Ok(())
        }
        ScheduleCommand::Preview {
            rule,
            time_zone: tz,
            next,
        } => {
            let zone = time_zone(&tz)?;
            let (recurrence, immediate) = recurrence_from(ctx, &rule, &zone, ctx.now())?;
            let views: Vec<OccurrenceView> = if immediate {
                recurrence
                    .occurrences()
                    .take(next)
                    .map(|o| OccurrenceView::from(&o))
                    .collect()
            } else {
                recurrence
                    .occurrences_from(ctx.now())
                    .take(next)
                    .map(|o| OccurrenceView::from(&o))
                    .collect()
            };
            if ctx.json {
                return output::json(&views);
            }
            say(recurrence.describe());
            print_occurrences(&views, &zone);
            Ok(())
        }
        ScheduleCommand::List { account: acct } => {
            let store = ctx.store().await?;
            let member_id = match acct {
                Some(a) => Some(store.member(&account(&a)?).await?.id),
                None => None,
            };
            let schedules = store.list_schedules(member_id).await?;
            if ctx.json {
                return output::json(&schedules);
            }
            let mut t = Table::new(vec!["ID", "RULE", "AMOUNT", "STATUS", "NEXT (UTC)"]);
            for s in &schedules {
                t.row(vec![
                    s.id.to_string(),
                    s.recurrence.describe(),
                    s.amount.to_string(),
                    s.status.to_string(),
                    s.next_run_at.map_or("-".into(), |t| t.to_string()),
                ]);
            }
            say(t.render());
            Ok(())
        }
        ScheduleCommand::Show { schedule, next } => {
            let id = parse_id(&schedule, "schedule")?;
            let store = ctx.store().await?;
            let s = store.schedule(id).await?;
            let card = store.card(s.card_id).await?;
            let views = upcoming(&s, next);
            if ctx.json {
                return output::json(
                    &serde_json::json!({ "schedule": s, "card": card, "occurrences": views }),
                );
            }
            say(output::fields(&schedule_fields(
                &s,
                &format!("{} ({})", card.label(), card.id),
            )));
            say("");
            print_occurrences(&views, &s.time_zone);
            Ok(())
        }
        ScheduleCommand::Update {
            schedule,
            card,
            amount,
            balance,
            day,
            at,
            time_zone: tz,
        } => {
            let id = parse_id(&schedule, "schedule")?;
            if card.is_none()
                && amount.is_none()
                && !balance
                && day.is_none()
                && at.is_none()
                && tz.is_none()
            {
                return Err(CliError::usage(
                    "nothing to change; give --card, --amount, --balance, --day, --at or --time-zone",
                ));
            }
            let store = ctx.store().await?;
            plan_due_first(ctx, store.as_ref(), id).await?;
            let current = store.schedule(id).await?;
            let member = store.member_by_id(current.member_id).await?;
            let mut spec = current.recurrence.spec();
            let mut summary = Vec::new();
            if let Some(d) = day {
                match spec.rule {
                    Rule::Monthly { .. } => spec.rule = Rule::Monthly { day: d },
                    _ => return Err(CliError::usage("--day changes monthly schedules only")),
                }
                summary.push(format!("day {d}"));
            }
            if let Some(a) = &at {
                spec.at = parse_time_of_day(a).map_err(|e| CliError::data(format!("--at: {e}")))?;
                summary.push(format!("at {a}"));
            }
            if let Some(tz) = &tz {
                spec.time_zone = time_zone(tz)?;
                summary.push(format!("time zone {}", spec.time_zone));
            }
            let recurrence = Recurrence::new(spec).map_err(rule_error)?;
            let card_id = match &card {
                Some(c) => {
                    summary.push("card".into());
                    parse_id(c, "card")?
                }
                None => current.card_id,
            };
            let amount_rule = match (amount, balance) {
                (Some(a), _) => {
                    let max = ctx.settings.payments.max_amount(member.account_type);
                    let charge = ChargeAmount::parse(&a, current.currency, max)
                        .map_err(|e| CliError::data(format!("--amount: {e}")))?;
                    summary.push(format!("amount {}", charge.money()));
                    AmountRule::Fixed {
                        amount: charge.money(),
                    }
                }
                (None, true) => {
                    summary.push("statement balance".into());
                    AmountRule::Balance
                }
                (None, false) => current.amount,
            };
            let next = recurrence.occurrences_from(ctx.now()).next();
            let change = ScheduleChange {
                id,
                expected_version: current.version,
                card_id,
                recurrence,
                amount: amount_rule,
                next_run_at: next.as_ref().map(|o| o.due_at),
                next_occurrence: next.map(|o| o.key),
                lift_suspension: card.is_some(),
                summary: summary.join(", "),
            };
            let updated = store.update_schedule(&change, &ctx.audit()).await?;
            tracing::info!(schedule_id = %id, version = updated.version, "schedule changed");
            if ctx.json {
                return output::json(&updated);
            }
            say(format!(
                "updated schedule {} (version {}): {}",
                updated.id, updated.version, change.summary
            ));
            if current.status == ScheduleStatus::Suspended
                && updated.status == ScheduleStatus::Active
            {
                say("the new card lifts the suspension; the schedule is active again");
            }
            Ok(())
        }
        ScheduleCommand::Pause { schedule } => {
            let id = parse_id(&schedule, "schedule")?;
            let store = ctx.store().await?;
            plan_due_first(ctx, store.as_ref(), id).await?;
            let s = store.pause_schedule(id, &ctx.audit()).await?;
            tracing::info!(schedule_id = %id, "schedule paused");
            if ctx.json {
                return output::json(&s);
            }
            say(format!(
                "paused schedule {id}; nothing is charged until `autopay schedule resume {id}`"
            ));
            Ok(())
        }
        ScheduleCommand::Resume { schedule } => {
            let id = parse_id(&schedule, "schedule")?;
            let store = ctx.store().await?;
            let current = store.schedule(id).await?;
            let next = current.recurrence.occurrences_from(ctx.now()).next();
            let resume = ScheduleResume {
                id,
                expected_version: current.version,
                next_run_at: next.as_ref().map(|o| o.due_at),
                next_occurrence: next.map(|o| o.key),
            };
            let s = store.resume_schedule(&resume, &ctx.audit()).await?;
            tracing::info!(schedule_id = %id, "schedule resumed");
            if ctx.json {
                return output::json(&s);
            }
            match s.next_run_at {
                Some(t) => say(format!(
                    "resumed schedule {id}; next payment {t} (dates inside the pause are not charged)"
                )),
                None => say(format!("schedule {id} has no dates left; it is completed")),
            }
            Ok(())
        }
        ScheduleCommand::Cancel { schedule } => {
            let id = parse_id(&schedule, "schedule")?;
            let store = ctx.store().await?;
            plan_due_first(ctx, store.as_ref(), id).await?;
            let s = store.cancel_schedule(id, &ctx.audit()).await?;
            tracing::info!(schedule_id = %id, "schedule cancelled");
            if ctx.json {
                return output::json(&s);
            }
            say(format!("cancelled schedule {id}"));
            Ok(())
        }
    }
}

/// Records an occurrence that fell due while the daemon was down before a change to its
/// schedule, so that the change never drops it (it is charged, or cancelled with the schedule,
/// and either way it is on record).
async fn plan_due_first(ctx: &Context, store: &dyn Store, id: ScheduleId) -> Result<(), CliError> {
    let planned = crate::engine::plan_if_due(
        store,
        id,
        ctx.now(),
        ctx.settings.payments.misfire,
        ctx.settings.payments.max_lateness.as_std(),
        &ctx.audit(),
    )
    .await?;
    if planned {
        tracing::info!(schedule_id = %id, "planned the occurrence that was due before changing the schedule");
    }
    Ok(())
}

pub(super) async fn payment(ctx: &Context, command: PaymentCommand) -> Result<(), CliError> {
    match command {
        PaymentCommand::List {
            account: acct,
            state,
        } => {
            let state = state
                .map(|s| {
                    s.parse::<PaymentState>()
                        .map_err(|e| CliError::usage(format!("--state: {e}")))
                })
                .transpose()?;
            let store = ctx.store().await?;
            let member_id = match acct {
                Some(a) => Some(store.member(&account(&a)?).await?.id),
                None => None,
            };
            let payments = store.list_payments(member_id, state).await?;
            if ctx.json {
                return output::json(&payments);
            }
            let mut t = Table::new(vec![
                "ID",
                "DUE (UTC)",
                "OCCURRENCE",
                "AMOUNT",
                "STATE",
                "ATTEMPT",
            ]);
            for p in &payments {
                t.row(vec![
                    p.id.to_string(),
                    p.due_at.to_string(),
                    p.occurrence.clone(),
                    p.amount.map_or("-".into(), |m| m.display_with_code()),
                    p.state.to_string(),
                    p.attempt.to_string(),
                ]);
            }
            say(t.render());
            Ok(())
        }
        PaymentCommand::Retry { payment, force } => {
            super::operate::retry(ctx, &payment, force).await
        }
        PaymentCommand::Resolve {
            payment,
            resolution,
            reference,
            reason,
        } => super::operate::resolve(ctx, &payment, &resolution, &reference, &reason).await,
        PaymentCommand::Forecast { until } => super::operate::forecast_until(ctx, &until).await,
        PaymentCommand::Show { payment } => {
            let id = parse_id(&payment, "payment")?;
            let store = ctx.store().await?;
            let p = store.payment(id).await?;
            let events = store.events(&id.to_string()).await?;
            let calls = store.calls(id).await?;
            if ctx.json {
                return output::json(
                    &serde_json::json!({ "payment": p, "calls": calls, "events": events }),
                );
            }
            say(output::fields(&[
                ("id", p.id.to_string()),
                ("schedule", p.schedule_id.to_string()),
                ("occurrence", p.occurrence.clone()),
                ("due", p.due_at.to_string()),
                (
                    "amount",
                    p.amount
                        .map_or("computed when charged".into(), |m| m.display_with_code()),
                ),
                ("state", p.state.to_string()),
                ("attempt", p.attempt.to_string()),
                ("card", p.card_id.to_string()),
                (
                    "processor reference",
                    p.processor_reference.clone().unwrap_or_default(),
                ),
                ("decline code", p.decline_code.clone().unwrap_or_default()),
                ("reason", p.reason.clone().unwrap_or_default()),
            ]));
            if !calls.is_empty() {
                say("\nrequests to the processor:");
                let mut table = Table::new(vec!["attempt", "kind", "at", "outcome", "detail"]);
                for c in &calls {
                    table.row(vec![
                        c.attempt.to_string(),
                        c.kind.clone(),
                        c.started_at.to_string(),
                        c.outcome.map_or("no answer".to_string(), |o| o.to_string()),
                        c.detail.clone().unwrap_or_default(),
                    ]);
                }
                say(table.render());
            }
            say("\nhistory:");
            for e in &events {
                say(format!(
                    "{}  {}  {}  {}",
                    e.at,
                    output::escape(&e.actor),
                    e.action,
                    e.detail
                ));
            }
            Ok(())
        }
    }
}
