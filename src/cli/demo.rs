//! `autopay run --demo`: sample members, cards, bills and schedules in the embedded default,
//! some due at once and one card that declines, so a newcomer sees real charges in seconds.
//! Seeding happens once: a database that already has the sample members is left as it is.

use jiff::{SignedDuration, Timestamp};

use super::output::say;
use super::{CliError, Context};
use crate::domain::card::{CardNumber, Expiry, SecurityCode};
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::domain::money::{ChargeAmount, Money};
use crate::domain::payment::AmountRule;
use crate::domain::schedule::{End, FirstPayment, Recurrence, RecurrenceSpec, Rule, Unit};
use crate::domain::status::{AuthorizedVia, ScheduleKind};
use crate::store::{NewBill, NewMember, NewSchedule, Store, StoreError};

/// One sample member and what they owe and how they pay.
struct Sample {
    account: &'static str,
    name: &'static str,
    email: &'static str,
    account_type: AccountType,
    zone: &'static str,
    /// A public test number: the simulated processor's outcome follows it.
    card: &'static str,
    /// (reference, amount, days from today)
    bills: &'static [(&'static str, &'static str, i64)],
    plan: Plan,
}

enum Plan {
    /// Monthly on a day, the statement balance, with a first payment now.
    BalanceNow { day: u8 },
    /// One fixed payment now.
    OnceNow { amount: &'static str },
    /// A fixed amount every two weeks from a week ahead.
    Biweekly { amount: &'static str },
}

const SAMPLES: &[Sample] = &[
    Sample {
        account: "D-100001",
        name: "Ana Díaz",
        email: "ana.diaz@example.org",
        account_type: AccountType::IndividualFamily,
        zone: "America/New_York",
        card: "4242424242424242",
        bills: &[("INV-D1001", "40.00", -5), ("INV-D1002", "125.00", 10)],
        plan: Plan::BalanceNow { day: 1 },
    },
    Sample {
        account: "D-100002",
        name: "Ben Okafor",
        email: "ben.okafor@example.org",
        account_type: AccountType::IndividualFamily,
        zone: "America/Chicago",
        card: "5555555555554444",
        bills: &[("INV-D2001", "75.00", 3)],
        plan: Plan::OnceNow { amount: "75.00" },
    },
    Sample {
        account: "D-200001",
        name: "Acme Manufacturing",
        email: "benefits@acme.example",
        account_type: AccountType::EmployerGroup,
        zone: "America/Los_Angeles",
        card: "6011111111111117",
        bills: &[("GRP-D3001", "12480.00", 14)],
        plan: Plan::BalanceNow { day: 15 },
    },
    Sample {
        account: "D-100003",
        name: "Chris Lee",
        email: "chris.lee@example.org",
        account_type: AccountType::IndividualFamily,
        zone: "America/Denver",
        card: "4000000000009995",
        bills: &[("INV-D4001", "60.00", 2)],
        plan: Plan::BalanceNow { day: 1 },
    },
    Sample {
        account: "D-100004",
        name: "Dana Smith",
        email: "dana.smith@example.org",
        account_type: AccountType::IndividualFamily,
        zone: "America/Phoenix",
        card: "4000000000009987",
        bills: &[("INV-D5001", "90.00", 1)],
        plan: Plan::BalanceNow { day: 1 },
    },
    Sample {
        account: "D-100005",
        name: "Eve Park",
        email: "eve.park@example.org",
        account_type: AccountType::IndividualFamily,
        zone: "America/New_York",
        card: "4242424242424242",
        bills: &[],
        plan: Plan::Biweekly { amount: "50.00" },
    },
];

fn invalid(e: impl std::fmt::Display) -> CliError {
    CliError::internal(format!("the demo data is invalid: {e}"))
}

/// Seeds the samples unless they are there already.
pub(super) async fn seed(ctx: &Context, store: &dyn Store) -> Result<(), CliError> {
    let first = AccountNumber::parse(SAMPLES[0].account).map_err(invalid)?;
    match store.member(&first).await {
        Ok(_) => {
            say("demo data already present; running");
            return Ok(());
        }
        Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let processor = ctx.processor().await?;
    let audit = ctx.audit();
    let now = ctx.now();
    let currency = ctx.settings.payments.currency;
    for sample in SAMPLES {
        let member = store
            .add_member(
                &NewMember {
                    account_number: AccountNumber::parse(sample.account).map_err(invalid)?,
                    account_type: sample.account_type,
                    name: MemberName::parse(sample.name).map_err(invalid)?,
                    email: EmailAddress::parse(sample.email).map_err(invalid)?,
                    time_zone: sample.zone.to_string(),
                },
                &audit,
            )
            .await?;
        let tz = jiff::tz::TimeZone::get(sample.zone).map_err(invalid)?;
        let today = now.to_zoned_datetime(tz.clone()).date();
        let number = CardNumber::parse(sample.card).map_err(invalid)?;
        let code = SecurityCode::parse("123", number.brand()).map_err(invalid)?;
        let expiry =
            Expiry::new(12, u16::try_from(today.year() + 3).map_err(invalid)?).map_err(invalid)?;
        let token = processor
            .tokenize(&super::members::owner(&member), &number, &code, expiry)
            .await
            .map_err(|e| CliError::new(super::exit::UNAVAILABLE, e.to_string()))?;
        let card = store
            .add_card(
                &super::members::new_card(
                    member.id,
                    processor.as_ref(),
                    token,
                    crate::store::Consent {
                        at: audit.at,
                        via: "cli".into(),
                        terms_version: Some("demo".into()),
                    },
                ),
                &audit,
            )
            .await?;
        let bills = sample
            .bills
            .iter()
            .map(|(reference, amount, days)| {
                Ok(NewBill {
                    member_id: member.id,
                    reference: (*reference).to_string(),
                    amount_due: Money::parse(amount, currency).map_err(invalid)?,
                    due_date: today
                        .checked_add(jiff::Span::new().days(*days))
                        .map_err(invalid)?,
                    origin: format!("demo bill {reference}"),
                })
            })
            .collect::<Result<Vec<_>, CliError>>()?;
        store.add_bills(&bills, &audit).await?;
        let at = ctx.settings.payments.default_time;
        let (rule, start, first_payment, amount, immediate) = match sample.plan {
            Plan::BalanceNow { day } => (
                Rule::Monthly { day },
                today,
                Some(FirstPayment::Now(now)),
                AmountRule::Balance,
                true,
            ),
            Plan::OnceNow { amount } => {
                let fixed =
                    ChargeAmount::new_unbounded(Money::parse(amount, currency).map_err(invalid)?)
                        .map_err(invalid)?;
                (
                    Rule::Once { on: today },
                    today,
                    None,
                    AmountRule::Fixed {
                        amount: fixed.money(),
                    },
                    true,
                )
            }
            Plan::Biweekly { amount } => {
                let fixed =
                    ChargeAmount::new_unbounded(Money::parse(amount, currency).map_err(invalid)?)
                        .map_err(invalid)?;
                let start = today
                    .checked_add(jiff::Span::new().days(7))
                    .map_err(invalid)?;
                (
                    Rule::Every {
                        n: 2,
                        unit: Unit::Weeks,
                    },
                    start,
                    None,
                    AmountRule::Fixed {
                        amount: fixed.money(),
                    },
                    false,
                )
            }
        };
        let at = if matches!(rule, Rule::Once { .. }) {
            let local = now.to_zoned_datetime(tz).time();
            jiff::civil::Time::new(local.hour(), local.minute(), 0, 0).map_err(invalid)?
        } else {
            at
        };
        let recurrence = Recurrence::new(RecurrenceSpec {
            rule,
            at,
            time_zone: sample.zone.to_string(),
            start,
            first_payment,
            end: End::Never,
            business_days: false,
            holidays: vec![],
        })
        .map_err(invalid)?;
        let next = if immediate {
            recurrence.occurrences().next()
        } else {
            recurrence
                .occurrences_from(
                    now.checked_sub(SignedDuration::from_secs(1))
                        .unwrap_or(Timestamp::MIN),
                )
                .next()
        }
        .ok_or_else(|| invalid("a sample schedule has no date"))?;
        store
            .add_schedule(
                &NewSchedule {
                    member_id: member.id,
                    card_id: card.id,
                    kind: if matches!(rule, Rule::Once { .. }) {
                        ScheduleKind::OneTime
                    } else {
                        ScheduleKind::Recurring
                    },
                    recurrence,
                    amount,
                    currency,
                    next_run_at: Some(next.due_at),
                    next_occurrence: Some(next.key),
                    authorized_via: AuthorizedVia::Cli,
                    terms_version: "demo".into(),
                },
                &audit,
            )
            .await?;
    }
    say(format!(
        "seeded {} demo members with cards, bills and schedules (one card declines for lack of funds, one is reported lost)",
        SAMPLES.len()
    ));
    Ok(())
}
