//! A deterministic simulation with a manual clock: random schedules over two simulated years in
//! America/New_York, random processor faults and declines, bills paid outside autopay, and
//! crashes between the processor's answer and its record. After every step: no occurrence is
//! charged twice in the processor's ledger, every payment is terminal or legitimately waiting,
//! and every bill's paid amount equals its allocations plus what was paid outside.
//!
//! Scale: `AUTOPAY_SIM_MEMBERS` (default 6) and `AUTOPAY_SIM_DAYS` (default 730), with a step
//! of 12 hours; `AUTOPAY_SIM_SEED` picks the run. The long run is
//! `AUTOPAY_SIM_MEMBERS=60 AUTOPAY_SIM_DAYS=730 cargo nextest run simulation`
//! (see docs/testing.md).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use autopay::clock::Clock;
use autopay::domain::ids::ScheduleId;
use autopay::domain::member::AccountType;
use autopay::domain::payment::{AmountRule, PaymentState};
use autopay::domain::schedule::{End, FirstPayment, Recurrence, RecurrenceSpec, Rule, Unit};
use autopay::domain::status::{AuthorizedVia, BillStatus, ScheduleKind};
use autopay::processor::Processor;
use autopay::store::NewSchedule;
use jiff::{SignedDuration, Timestamp};

use crate::engine::{World, usd};
use crate::helpers::{Kind, Rng, env_number};

/// splitmix64: small, deterministic, good enough to pick test cases.

#[tokio::test]
async fn two_years_of_schedules_with_faults_and_crashes_charge_nothing_twice_and_lose_nothing() {
    let members = env_number("AUTOPAY_SIM_MEMBERS", 6);
    let days = env_number("AUTOPAY_SIM_DAYS", 730);
    let seed = env_number("AUTOPAY_SIM_SEED", 20_261_201);
    let mut rng = Rng(seed);
    let w = World::with_settings(Kind::Sqlite, &[("AUTOPAY__PAYMENTS__MISFIRE", "coalesce")]).await;
    let crash_rng = Arc::new(Mutex::new(Rng(seed ^ 0xC0FFEE)));
    let crashing = Arc::new(Mutex::new(false));
    let hook_rng = crash_rng.clone();
    let hook_on = crashing.clone();
    let engine = w.engine().with_crash_hook(Arc::new(move || {
        *hook_on.lock().unwrap() && hook_rng.lock().unwrap().chance(0.2)
    }));

    // Members with a card each (mostly good, some that decline), and one or two schedules.
    let cards = [
        "4242424242424242",
        "5555555555554444",
        "6011111111111117",
        "4000000000009995",
        "4000000000000002",
    ];
    let mut people = Vec::new();
    for i in 0..members {
        let kind = if i % 5 == 4 {
            AccountType::EmployerGroup
        } else {
            AccountType::IndividualFamily
        };
        let m = w.member(&format!("S-{i:06}"), kind).await;
        let card = w
            .card(&m, cards[rng.below(cards.len() as u64) as usize])
            .await;
        let now = w.clock.now();
        let rule = match rng.below(4) {
            0 => Rule::Monthly {
                day: 1 + rng.below(31) as u8,
            },
            1 => Rule::Every {
                n: 1 + rng.below(3) as u32,
                unit: Unit::Months,
            },
            2 => Rule::Every {
                n: 1 + rng.below(4) as u32,
                unit: Unit::Weeks,
            },
            _ => Rule::Every {
                n: 7 + rng.below(30) as u32,
                unit: Unit::Days,
            },
        };
        let business = matches!(
            rule,
            Rule::Monthly { .. }
                | Rule::Every {
                    unit: Unit::Months,
                    ..
                }
        ) && rng.chance(0.5);
        let recurrence = Recurrence::new(RecurrenceSpec {
            rule,
            at: jiff::civil::time(rng.below(24) as i8, (rng.below(4) * 15) as i8, 0, 0),
            time_zone: "America/New_York".into(),
            start: jiff::civil::date(2026, 12, 2),
            first_payment: rng.chance(0.3).then_some(FirstPayment::Now(now)),
            end: End::Never,
            business_days: business,
            holidays: vec![
                jiff::civil::date(2026, 12, 25),
                jiff::civil::date(2027, 1, 1),
                jiff::civil::date(2027, 12, 24),
            ],
        })
        .unwrap();
        let amount = if rng.chance(0.5) {
            AmountRule::Balance
        } else {
            AmountRule::Fixed {
                amount: usd(&format!("{}.00", 10 + rng.below(90))),
            }
        };
        let first = recurrence.occurrences().next().unwrap();
        w.store
            .add_schedule(
                &NewSchedule {
                    member_id: m.id,
                    card_id: card.id,
                    kind: ScheduleKind::Recurring,
                    recurrence,
                    amount,
                    currency: autopay::domain::money::Currency::USD,
                    next_run_at: Some(first.due_at),
                    next_occurrence: Some(first.key),
                    authorized_via: AuthorizedVia::Cli,
                    terms_version: "sim".into(),
                },
                &w.audit(),
            )
            .await
            .unwrap();
        people.push(m);
    }

    let mut external: HashMap<uuid::Uuid, i64> = HashMap::new();
    let mut bill_no = 0;
    let steps = days * 2;
    let start = w.clock.now();
    for step in 0..steps {
        w.clock.set(
            start
                .checked_add(SignedDuration::from_hours(12 * step as i64))
                .unwrap(),
        );
        // Monthly-ish bills, sometimes paid by phone.
        if step % 60 == 0 {
            for m in &people {
                bill_no += 1;
                let due = w
                    .clock
                    .now()
                    .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                    .date();
                w.bill(
                    m,
                    &format!("B-{bill_no}"),
                    &format!("{}.{:02}", 20 + rng.below(200), rng.below(100)),
                    &due.to_string(),
                )
                .await;
            }
        }
        if rng.chance(0.05) {
            let bills = w.store.list_bills(None).await.unwrap();
            let open: Vec<_> = bills
                .iter()
                .filter(|b| b.status == BillStatus::Open && b.outstanding().minor() > 0)
                .collect();
            if !open.is_empty() {
                let b = open[rng.below(open.len() as u64) as usize];
                let amount = 1 + rng.below(b.outstanding().minor() as u64) as i64;
                w.store
                    .pay_bill_external(
                        b.id,
                        autopay::domain::money::Money::from_minor(amount, b.currency),
                        &format!("PHONE-{step}"),
                        &w.audit(),
                    )
                    .await
                    .unwrap();
                *external.entry(b.id).or_default() += amount;
            }
        }
        // Faults and crashes come and go.
        let faulty = rng.chance(0.15);
        w.processor.set_faults(
            if faulty { 0.3 } else { 0.0 },
            if faulty { 0.3 } else { 0.0 },
        );
        *crashing.lock().unwrap() = rng.chance(0.1);
        // A daemon keeps running between the steps: unknown outcomes are settled a settle delay
        // later, not at the next step.
        for settle in 0..3 {
            if settle > 0 {
                w.advance(SignedDuration::from_secs(61));
            }
            match engine.drain().await {
                Ok(_) | Err(autopay::engine::EngineError::InjectedCrash) => {}
                Err(e) => panic!("step {step}: {e}"),
            }
        }
        check(&w, &external, step).await;
    }

    // Calm down: no faults, past every settle delay and lease; everything settles.
    w.processor.set_faults(0.0, 0.0);
    *crashing.lock().unwrap() = false;
    for _ in 0..3 {
        w.advance(SignedDuration::from_hours(1));
        engine.drain().await.unwrap();
    }
    check(&w, &external, steps).await;
    let payments = w.store.list_payments(None, None).await.unwrap();
    let ledger = w.processor.list_attempts(Timestamp::MIN).await.unwrap();
    let approved: i64 = ledger
        .iter()
        .filter(|a| a.approved)
        .map(|a| a.amount.minor())
        .sum();
    let succeeded: i64 = payments
        .iter()
        .filter(|p| p.state == PaymentState::Succeeded)
        .map(|p| p.amount.unwrap().minor())
        .sum();
    assert_eq!(
        approved, succeeded,
        "every approved charge is a succeeded payment, and only those"
    );
    for p in &payments {
        assert!(
            !matches!(p.state, PaymentState::Processing | PaymentState::Unknown),
            "payment {} left {} after settling",
            p.id,
            p.state
        );
    }
    let states: BTreeMap<String, usize> = payments.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.state.to_string()).or_default() += 1;
        m
    });
    eprintln!(
        "simulation: {members} members, {days} days, {} payments: {states:?}, {} ledger rows",
        payments.len(),
        ledger.len()
    );
    assert!(states.get("succeeded").copied().unwrap_or(0) > 0);
}

async fn check(w: &World, external: &HashMap<uuid::Uuid, i64>, step: u64) {
    let now = w.clock.now();
    // 1. No occurrence charged twice.
    let ledger = w.processor.list_attempts(Timestamp::MIN).await.unwrap();
    let mut approved: HashMap<(ScheduleId, String), u32> = HashMap::new();
    for a in ledger.iter().filter(|a| a.approved) {
        let n = approved
            .entry((a.schedule_id, a.occurrence.clone()))
            .or_default();
        *n += 1;
        assert_eq!(
            *n, 1,
            "step {step}: occurrence {} of schedule {} charged twice",
            a.occurrence, a.schedule_id
        );
    }
    // 2. Every payment terminal or legitimately waiting.
    for p in w.store.list_payments(None, None).await.unwrap() {
        match p.state {
            PaymentState::Succeeded
            | PaymentState::Failed
            | PaymentState::Skipped
            | PaymentState::Cancelled
            | PaymentState::Missed => {}
            PaymentState::RetryWait => assert!(
                p.next_attempt_at.is_some(),
                "step {step}: retry_wait without a time"
            ),
            PaymentState::Unknown
            | PaymentState::Processing
            | PaymentState::Scheduled
            | PaymentState::NeedsReview => {}
        }
        assert!(
            p.due_at <= now,
            "step {step}: a payment was planned before it was due"
        );
    }
    // 3. Balances equal the allocations plus what was paid outside.
    let mut allocated: HashMap<uuid::Uuid, i64> = HashMap::new();
    for p in w.store.list_payments(None, None).await.unwrap() {
        for a in w.store.allocations(p.id).await.unwrap() {
            if let Some(b) = a.bill_id {
                *allocated.entry(b).or_default() += a.amount.minor();
            }
        }
    }
    for b in w.store.list_bills(None).await.unwrap() {
        let expected =
            allocated.get(&b.id).copied().unwrap_or(0) + external.get(&b.id).copied().unwrap_or(0);
        assert_eq!(
            b.amount_paid.minor(),
            expected,
            "step {step}: bill {} paid {} but allocations say {expected}",
            b.reference,
            b.amount_paid
        );
        assert!(
            b.amount_paid.minor() <= b.amount_due.minor(),
            "step {step}: bill {} overpaid",
            b.reference
        );
    }
}
