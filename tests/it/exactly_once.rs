//! Exactly-once on every path: one story per hole a review found (issue 7's numbered items), each
//! on both backends where the database matters. A processor that lets a test decide what a
//! call answers ([`Flaky`]) wraps the simulated one, whose ledger is the truth about charges.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use autopay::clock::Clock;
use autopay::domain::attempt::CallOutcome;
use autopay::domain::card::{CardNumber, Expiry, SecurityCode};
use autopay::domain::member::AccountType;
use autopay::domain::payment::{AmountRule, PaymentState, Resolution};
use autopay::domain::schedule::{Rule, Unit};
use autopay::domain::status::{BillStatus, ScheduleStatus};
use autopay::engine::RetryOutcome;
use autopay::processor::simulated::SimulatedProcessor;
use autopay::processor::{
    AttemptRef, CardDetails, CardOwner, ChargeOutcome, ChargeRequest, Lookup, Processor,
    ProcessorAttempt, ProcessorError, Tokenized,
};
use autopay::store::{Member, Next, Resolve, Settler, StoreError};
use jiff::{SignedDuration, Timestamp};

use crate::engine::{World, usd};
use crate::helpers::{Bin, Kind, TestDb, member_with_card, on_both};

/// What a scripted charge call does instead of (or after) asking the simulated processor.
enum Scripted {
    /// Answer this without reaching the processor.
    Instead(ChargeOutcome),
}

/// The simulated processor, with answers a test decides: lookups that cannot answer, and charge
/// answers given in order before the simulated processor is asked again.
struct Flaky {
    inner: Arc<SimulatedProcessor>,
    lookups_down: AtomicBool,
    script: Mutex<VecDeque<Scripted>>,
}

impl Flaky {
    fn new(inner: Arc<SimulatedProcessor>) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner,
            lookups_down: AtomicBool::new(false),
            script: Mutex::new(VecDeque::new()),
        })
    }

    fn lookups_down(&self, down: bool) {
        self.lookups_down.store(down, Ordering::SeqCst);
    }

    fn then(&self, outcome: ChargeOutcome) {
        self.script
            .lock()
            .unwrap()
            .push_back(Scripted::Instead(outcome));
    }
}

#[async_trait]
impl Processor for Flaky {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn tokenize(
        &self,
        owner: &CardOwner,
        number: &CardNumber,
        security_code: &SecurityCode,
        expiry: Expiry,
    ) -> Result<Tokenized, ProcessorError> {
        self.inner
            .tokenize(owner, number, security_code, expiry)
            .await
    }
    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError> {
        self.inner.card_details(token).await
    }
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(Scripted::Instead(outcome)) => outcome,
            None => self.inner.charge(request).await,
        }
    }
    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup {
        if self.lookups_down.load(Ordering::SeqCst) {
            return Lookup::Unknown {
                detail: "503 from the processor".into(),
            };
        }
        self.inner.find_attempt(attempt).await
    }
    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        self.inner.list_attempts(since).await
    }
}

/// Drives a payment whose answer was lost to `needs_review`: lookups cannot answer until the
/// lookup window (12h) has passed.
async fn to_review(w: &World, flaky: &Arc<Flaky>, member: &Member) -> autopay::store::Payment {
    let engine = w.engine_with(flaky.clone());
    engine.drain().await.unwrap();
    assert_eq!(w.payments(member).await[0].state, PaymentState::Unknown);
    flaky.lookups_down(true);
    w.advance(SignedDuration::from_hours(13));
    engine.drain().await.unwrap();
    flaky.lookups_down(false);
    let p = w.payments(member).await.remove(0);
    assert_eq!(p.state, PaymentState::NeedsReview, "{:?}", p.reason);
    p
}

/// Item 1: `payment retry` of a `needs_review` payment charged again with a new key.
async fn a_needs_review_payment_retried_inside_the_key_window_resends_its_key_and_charges_once(
    kind: Kind,
) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    let flaky = Flaky::new(w.processor.clone());
    w.processor.set_faults(1.0, 0.0);
    let p = {
        let engine = w.engine_with(flaky.clone());
        engine.drain().await.unwrap();
        w.processor.set_faults(0.0, 0.0);
        to_review(&w, &flaky, &m).await
    };
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
    let engine = w.engine_with(flaky.clone());
    let outcome = engine
        .operator_retry(p.id, false, &w.audit())
        .await
        .unwrap();
    assert!(
        matches!(outcome, RetryOutcome::Settled(PaymentState::Succeeded)),
        "{outcome:?}"
    );
    let after = w.store.payment(p.id).await.unwrap();
    assert_eq!((after.state, after.attempt), (PaymentState::Succeeded, 1));
    assert_eq!(
        w.processor.charges_for(p.id).await.unwrap().len(),
        1,
        "the resend replayed the first charge"
    );
    engine.drain().await.unwrap();
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
}

/// Item 1, after the window: a new attempt only once the key can no longer charge, and only
/// after a lookup says nothing happened; while the processor cannot answer, nothing changes.
async fn a_needs_review_payment_gets_a_new_key_only_after_its_old_one_died_and_a_lookup_found_nothing(
    kind: Kind,
) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    let flaky = Flaky::new(w.processor.clone());
    w.processor.set_faults(0.0, 1.0);
    let p = to_review(&w, &flaky, &m).await;
    w.processor.set_faults(0.0, 0.0);
    let engine = w.engine_with(flaky.clone());
    // 23h after the first send: past the resend window, but the key may still charge.
    w.advance(SignedDuration::from_hours(10));
    let early = engine
        .operator_retry(p.id, false, &w.audit())
        .await
        .unwrap();
    let RetryOutcome::NotYet { until, .. } = early else {
        panic!("expected a refusal, got {early:?}")
    };
    assert!(until.is_some());
    // After the key died, a lookup that cannot answer changes nothing.
    w.advance(SignedDuration::from_hours(2));
    flaky.lookups_down(true);
    let down = engine.operator_retry(p.id, true, &w.audit()).await.unwrap();
    assert!(matches!(down, RetryOutcome::NoAnswer { .. }), "{down:?}");
    assert_eq!(
        w.store.payment(p.id).await.unwrap().state,
        PaymentState::NeedsReview
    );
    flaky.lookups_down(false);
    let retried = engine
        .operator_retry(p.id, false, &w.audit())
        .await
        .unwrap();
    let RetryOutcome::Scheduled(again) = retried else {
        panic!("expected a new attempt, got {retried:?}")
    };
    assert_eq!((again.state, again.attempt), (PaymentState::Scheduled, 2));
    engine.drain().await.unwrap();
    assert_eq!(
        w.store.payment(p.id).await.unwrap().state,
        PaymentState::Succeeded
    );
    assert_eq!(w.processor.charges_for(p.id).await.unwrap().len(), 1);
}

/// Item 2: a `needs_review` payment stopped reserving its credit, so a later payment spent it
/// again and resolving the first one made money up. Money in must equal money out.
async fn an_unsettled_payment_keeps_its_credit_reserved_and_no_money_is_made_up(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4242424242424242").await;
    w.bill(&m, "INV-0", "10.00", "2026-11-01").await;
    let first_bill = w.store.list_bills(Some(m.id)).await.unwrap()[0].id;
    // Paid 60.00 by phone on a 10.00 bill: a credit of 50.00.
    w.store
        .pay_bill_external(first_bill, usd("60.00"), "PHONE-1", &w.audit())
        .await
        .unwrap();
    w.bill(&m, "INV-1", "200.00", "2026-12-01").await;
    let flaky = Flaky::new(w.processor.clone());
    w.schedule_now(&m, &card, AmountRule::Balance).await;
    w.processor.set_faults(1.0, 0.0);
    let engine = w.engine_with(flaky.clone());
    engine.drain().await.unwrap();
    w.processor.set_faults(0.0, 0.0);
    let held = to_review(&w, &flaky, &m).await;
    // A second payment while the first is unsettled: the credit is not free.
    w.schedule_now(
        &m,
        &card,
        AmountRule::Fixed {
            amount: usd("100.00"),
        },
    )
    .await;
    engine.drain().await.unwrap();
    let taken = w
        .store
        .take_for_operator(held.id, Duration::from_secs(60), &w.audit())
        .await
        .unwrap();
    let charged = w.processor.charges_for(held.id).await.unwrap();
    w.store
        .resolve_payment(
            &Resolve {
                lease: taken.lease,
                resolution: Resolution::Succeeded,
                reference: charged[0].reference.clone(),
                reason: "found in the ledger".into(),
            },
            &w.audit(),
        )
        .await
        .unwrap();
    let payments = w.payments(&m).await;
    assert!(
        payments.iter().all(|p| p.state == PaymentState::Succeeded),
        "{payments:?}"
    );
    let charged: i64 = payments.iter().map(|p| p.amount.unwrap().minor()).sum();
    let bills = w.store.list_bills(Some(m.id)).await.unwrap();
    let paid: i64 = bills.iter().map(|b| b.amount_paid.minor()).sum();
    let credit: i64 = w
        .store
        .list_credits(m.id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.remaining.minor())
        .sum();
    // In: 60.00 by phone and what autopay charged. Out: what the bills were paid, and credit.
    assert_eq!(6_000 + charged, paid + credit, "money in equals money out");
    assert_eq!(
        bills.iter().map(|b| b.status).collect::<Vec<_>>(),
        vec![BillStatus::Paid, BillStatus::Paid]
    );
}

/// Item 3: a card that never answers reached attempt 13 with 13 keys. Now one key, resent
/// `processor.max_unknown_cycles` times, then an operator decides.
async fn an_attempt_that_never_answers_keeps_its_one_key_and_goes_to_review_after_its_resends(
    kind: Kind,
) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4000000000008880", "30.00").await;
    let engine = w.engine();
    for _ in 0..20 {
        engine.drain().await.unwrap();
        w.advance(SignedDuration::from_secs(61));
    }
    let p = w.payments(&m).await.remove(0);
    assert_eq!((p.state, p.attempt), (PaymentState::NeedsReview, 1));
    assert!(
        p.reason
            .as_deref()
            .unwrap_or("")
            .contains("processor.max_unknown_cycles"),
        "{:?}",
        p.reason
    );
    let calls = w.store.calls(p.id).await.unwrap();
    let charges: Vec<_> = calls.iter().filter(|c| c.kind == "charge").collect();
    assert_eq!(charges.len(), 6, "the first send and five resends");
    assert!(calls.iter().all(|c| c.attempt == 1), "one key only");
    assert_eq!(w.processor.ledger_count().await.unwrap(), 0);
    assert_eq!(
        w.store.status().await.unwrap().payments.get("needs_review"),
        Some(&1)
    );
}

/// Item 3: a worker frozen past its lease sends the same request as the one that took over.
async fn a_worker_frozen_past_its_lease_sends_the_same_request_as_the_one_that_took_over(
    kind: Kind,
) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    w.engine().plan_due().await.unwrap();
    let frozen = w.claim("frozen").await;
    let Next::Send {
        request: frozen_request,
        ..
    } = w
        .store
        .begin_attempt(&frozen[0].lease, &w.policy(), &w.audit())
        .await
        .unwrap()
    else {
        panic!("a request to send")
    };
    // The frozen worker's lease expires; another settles the payment: nothing at the
    // processor yet, so it resends the stored request.
    w.advance(SignedDuration::from_secs(301));
    let other = w.claim("other").await;
    assert_eq!(other[0].kind, autopay::store::WorkKind::Settle);
    let Next::Send {
        request: other_request,
        ..
    } = w
        .store
        .record_lookup(
            &other[0].lease,
            &autopay::store::LookupAnswer::NotFound,
            Settler::Daemon,
            &w.policy(),
            &w.audit(),
        )
        .await
        .unwrap()
    else {
        panic!("a resend")
    };
    assert_eq!(
        frozen_request, other_request,
        "byte for byte the same request"
    );
    // Both reach the processor: one charge.
    w.processor.charge(&other_request).await;
    w.processor.charge(&frozen_request).await;
    let p = w.payments(&m).await.remove(0);
    assert_eq!(w.processor.charges_for(p.id).await.unwrap().len(), 1);
}

/// Item 3: the lease is checked again immediately before a request is written: a worker whose
/// lease ran out (frozen between its claim and its send) writes nothing.
async fn a_worker_whose_lease_ran_out_writes_no_request(kind: Kind) {
    let w = World::new(kind).await;
    w.paying("4242424242424242", "30.00").await;
    w.engine().plan_due().await.unwrap();
    let work = w.claim("late").await;
    w.advance(SignedDuration::from_secs(301));
    assert_eq!(
        w.store
            .begin_attempt(&work[0].lease, &w.policy(), &w.audit())
            .await
            .unwrap(),
        Next::LeaseLost
    );
    assert_eq!(w.processor.ledger_count().await.unwrap(), 0);
    assert!(w.store.calls(work[0].payment.id).await.unwrap().is_empty());
}

/// Item 3: 409/429 mean "send the same request again"; a replayed 5xx stops the resends; a key
/// refused with other parameters goes to an operator.
async fn busy_answers_are_resent_replayed_errors_are_looked_up_and_a_refused_key_is_reviewed(
    kind: Kind,
) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    let flaky = Flaky::new(w.processor.clone());
    flaky.then(ChargeOutcome::Busy {
        detail: "429 rate limited".into(),
        retry_after: None,
    });
    flaky.then(ChargeOutcome::Busy {
        detail: "409 key in use".into(),
        retry_after: None,
    });
    let engine = w.engine_with(flaky.clone());
    engine.drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!((p.state, p.attempt), (PaymentState::Succeeded, 1));
    let outcomes: Vec<_> = w
        .store
        .calls(p.id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![
            Some(CallOutcome::Busy),
            Some(CallOutcome::Busy),
            Some(CallOutcome::Approved)
        ]
    );

    let m2 = w.member("B-100300", AccountType::IndividualFamily).await;
    let c2 = w.card(&m2, "4242424242424242").await;
    w.schedule_now(
        &m2,
        &c2,
        AmountRule::Fixed {
            amount: usd("5.00"),
        },
    )
    .await;
    flaky.then(ChargeOutcome::Unknown {
        detail: "500 replayed".into(),
        replayed: true,
    });
    engine.drain().await.unwrap();
    w.advance(SignedDuration::from_secs(61));
    engine.drain().await.unwrap();
    let p2 = w.payments(&m2).await.remove(0);
    assert_eq!(p2.state, PaymentState::Unknown, "looked up, never resent");
    let kinds: Vec<String> = w
        .store
        .calls(p2.id)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.kind)
        .collect();
    assert_eq!(kinds, vec!["charge", "lookup"]);

    let m3 = w.member("C-100400", AccountType::IndividualFamily).await;
    let c3 = w.card(&m3, "4242424242424242").await;
    w.schedule_now(
        &m3,
        &c3,
        AmountRule::Fixed {
            amount: usd("5.00"),
        },
    )
    .await;
    flaky.then(ChargeOutcome::IdempotencyMismatch {
        detail: "amount differs".into(),
    });
    engine.drain().await.unwrap();
    let p3 = w.payments(&m3).await.remove(0);
    assert_eq!(p3.state, PaymentState::NeedsReview);
    assert_eq!(w.store.calls(p3.id).await.unwrap().len(), 1, "no resend");
}

/// Item 4: a lookup overwrote the timeout, so the breaker never saw processor errors.
async fn the_circuit_breaker_counts_timeouts_even_after_the_lookup_settled_them(kind: Kind) {
    let w = World::with_settings(
        kind,
        &[
            ("AUTOPAY__PAYMENTS__BREAKER_MIN_ATTEMPTS", "6"),
            ("AUTOPAY__PAYMENTS__BREAKER_ERROR_SHARE", "0.3"),
        ],
    )
    .await;
    for i in 0..3 {
        let m = w
            .member(&format!("T-{i:06}"), AccountType::IndividualFamily)
            .await;
        let c = w.card(&m, "4242424242424242").await;
        w.schedule_now(
            &m,
            &c,
            AmountRule::Fixed {
                amount: usd("5.00"),
            },
        )
        .await;
    }
    w.processor.set_faults(0.0, 1.0);
    w.engine().drain().await.unwrap();
    assert!(w.store.control().await.unwrap().charging_paused.is_none());
    w.processor.set_faults(0.0, 0.0);
    w.advance(SignedDuration::from_secs(61));
    w.engine().drain().await.unwrap();
    let stats = w
        .store
        .attempt_stats(
            w.clock
                .now()
                .checked_sub(SignedDuration::from_mins(15))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((stats.attempts, stats.errors), (6, 3));
    let paused = w.store.control().await.unwrap().charging_paused;
    assert!(
        paused
            .as_ref()
            .is_some_and(|p| p.reason.contains("processor error")),
        "{paused:?}"
    );
}

/// Item 5: first attempts, resends and forced retries skipped the card limits (18 one-time
/// payments on a declining card made 18 requests in seconds).
async fn a_declining_card_gets_at_most_ten_declines_a_day_and_fifteen_requests_a_month(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4000000000009995").await;
    for i in 0..18 {
        w.schedule_now(
            &m,
            &card,
            AmountRule::Fixed {
                amount: usd(&format!("{}.00", i + 1)),
            },
        )
        .await;
    }
    let engine = w.engine();
    engine.drain().await.unwrap();
    let requests =
        |charges: &[ProcessorAttempt]| charges.iter().map(|c| c.created_at).collect::<Vec<_>>();
    let mut all = Vec::new();
    for p in w.payments(&m).await {
        all.extend(requests(&w.processor.charges_for(p.id).await.unwrap()));
    }
    assert_eq!(all.len(), 10, "ten declines, then the card waits a day");
    let waiting = w
        .payments(&m)
        .await
        .into_iter()
        .filter(|p| {
            p.state == PaymentState::RetryWait
                && p.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("10 declined"))
        })
        .count();
    assert_eq!(waiting, 8);
    // A month of retries: no 30 days ever hold more than 15 requests, no day more than 10.
    for _ in 0..(31 * 4) {
        w.advance(SignedDuration::from_hours(6));
        engine.drain().await.unwrap();
    }
    let mut all = Vec::new();
    for p in w.payments(&m).await {
        all.extend(requests(&w.processor.charges_for(p.id).await.unwrap()));
    }
    all.sort();
    for (i, t) in all.iter().enumerate() {
        let in_month = all[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < SignedDuration::from_hours(24 * 30))
            .count();
        let in_day = all[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < SignedDuration::from_hours(24))
            .count();
        assert!(
            in_month <= 15 && in_day <= 10,
            "{in_month} in 30 days, {in_day} in a day"
        );
    }
    assert!(
        w.payments(&m)
            .await
            .iter()
            .any(|p| p.decline_code.as_deref() == Some("card_attempt_limit")),
        "a payment refused at the limit says so"
    );
}

/// Item 7: a charging pause let payments pile up and then charged them all.
async fn a_long_charging_pause_charges_one_payment_on_resume_not_one_per_day(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4242424242424242").await;
    // Owed more than the payments bring, so none is covered by credit.
    w.bill(&m, "INV-1", "100.00", "2026-12-01").await;
    w.schedule(
        &m,
        &card,
        Rule::Every {
            n: 1,
            unit: Unit::Days,
        },
        AmountRule::Fixed {
            amount: usd("3.00"),
        },
    )
    .await;
    let engine = w.engine();
    engine.drain().await.unwrap();
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
    w.store
        .set_charging_pause(Some("incident"), &w.audit())
        .await
        .unwrap();
    for _ in 0..10 {
        w.advance(SignedDuration::from_hours(24));
        engine.drain().await.unwrap();
    }
    let waiting = w
        .payments(&m)
        .await
        .iter()
        .filter(|p| p.state == PaymentState::Scheduled)
        .count();
    assert_eq!(waiting, 10, "planned while paused, charged never");
    w.store.set_charging_pause(None, &w.audit()).await.unwrap();
    engine.drain().await.unwrap();
    assert_eq!(
        w.processor.ledger_count().await.unwrap(),
        2,
        "one charge for the ten days"
    );
    let missed = w
        .payments(&m)
        .await
        .into_iter()
        .filter(|p| p.state == PaymentState::Missed)
        .collect::<Vec<_>>();
    assert_eq!(missed.len(), 9);
    assert!(missed.iter().any(|p| {
        p.reason
            .as_deref()
            .is_some_and(|r| r.contains("max_lateness"))
    }));
    assert!(
        missed
            .iter()
            .any(|p| p.reason.as_deref().is_some_and(|r| r.contains("coalesced")))
    );
}

/// Item 8: a schedule on a disabled card came back to life through an update with the same
/// card or a resume, and its member was told of charges that would never come.
async fn a_schedule_on_a_disabled_card_cannot_be_brought_back_without_a_new_card(kind: Kind) {
    let w = World::new(kind).await;
    let (m, card, s) = w.paying("4000000000009987", "30.00").await;
    w.engine().drain().await.unwrap();
    let suspended = w.store.schedule(s.id).await.unwrap();
    assert_eq!(suspended.status, ScheduleStatus::Suspended);
    let change = autopay::store::ScheduleChange {
        id: s.id,
        expected_version: suspended.version,
        card_id: card.id,
        recurrence: suspended.recurrence.clone(),
        amount: suspended.amount,
        next_run_at: None,
        next_occurrence: None,
        lift_suspension: true,
        summary: "card".into(),
    };
    let err = w
        .store
        .update_schedule(&change, &w.audit())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("add a new card")),
        "{err}"
    );
    let resume = autopay::store::ScheduleResume {
        id: s.id,
        expected_version: suspended.version,
        next_run_at: Some(w.clock.now()),
        next_occurrence: suspended.next_occurrence,
    };
    assert!(matches!(
        w.store.resume_schedule(&resume, &w.audit()).await,
        Err(StoreError::Conflict(_))
    ));
    let kinds: Vec<String> = w
        .store
        .notifications(Some(m.id))
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.kind)
        .collect();
    assert!(!kinds.contains(&"changed".to_string()), "{kinds:?}");
    assert_eq!(
        w.store.schedule(s.id).await.unwrap().status,
        ScheduleStatus::Suspended
    );
}

/// Item 11: resolve left the attempt unknown and did not hold the payment while the operator
/// asked the processor.
async fn an_operator_holds_the_payment_while_resolving_and_the_attempt_records_the_outcome(
    kind: Kind,
) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    w.processor.set_faults(0.0, 1.0);
    w.engine().drain().await.unwrap();
    w.processor.set_faults(0.0, 0.0);
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::Unknown);
    let taken = w
        .store
        .take_for_operator(p.id, Duration::from_secs(300), &w.audit())
        .await
        .unwrap();
    // While the operator holds it, no worker settles it.
    w.advance(SignedDuration::from_secs(61));
    assert!(w.claim("worker").await.is_empty());
    // A second operator cannot take it meanwhile.
    assert!(matches!(
        w.store
            .take_for_operator(p.id, Duration::from_secs(300), &w.audit())
            .await,
        Err(StoreError::Unavailable(_))
    ));
    // A lease given back is not the one that resolves.
    assert!(w.store.give_back(&taken.lease).await.unwrap());
    let resolve = Resolve {
        lease: taken.lease,
        resolution: Resolution::Failed,
        reference: "none".into(),
        reason: "not in the dashboard".into(),
    };
    assert!(matches!(
        w.store.resolve_payment(&resolve, &w.audit()).await,
        Err(StoreError::Conflict(_))
    ));
    let again = w
        .store
        .take_for_operator(p.id, Duration::from_secs(300), &w.audit())
        .await
        .unwrap();
    let resolved = w
        .store
        .resolve_payment(
            &Resolve {
                lease: again.lease,
                ..resolve
            },
            &w.audit(),
        )
        .await
        .unwrap();
    assert_eq!(resolved.state, PaymentState::Failed);
    let events = w.store.events(&p.id.to_string()).await.unwrap();
    assert!(events.iter().any(|e| e.action == "resolved"));
    assert!(w.claim("worker").await.is_empty(), "settled for good");
}

/// Item 20: a charging pause with a due payment made the worker wake every 50 ms.
async fn a_charging_pause_gives_the_worker_nothing_to_wake_for(kind: Kind) {
    let w = World::new(kind).await;
    w.paying("4242424242424242", "30.00").await;
    w.engine().plan_due().await.unwrap();
    let now = w.clock.now();
    assert!(
        w.store
            .next_wakeup()
            .await
            .unwrap()
            .is_some_and(|t| t <= now)
    );
    w.store
        .set_charging_pause(Some("incident"), &w.audit())
        .await
        .unwrap();
    let next = w.store.next_wakeup().await.unwrap();
    assert!(
        next.is_none_or(|t| t > now),
        "the due payment cannot be claimed while paused: {next:?}"
    );
}

/// Item 19: sent mail, with its names and addresses, was kept for ever.
async fn done_notifications_older_than_keep_sent_are_deleted(kind: Kind) {
    let w = World::with_settings(kind, &[("AUTOPAY__EMAIL__KEEP_SENT", "30d")]).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    w.engine().drain().await.unwrap();
    let outgoing = w
        .store
        .claim_notifications("mailer", w.clock.now(), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(outgoing.len(), 2, "setup and receipt");
    for o in &outgoing {
        w.store
            .finish_notification(
                &o.lease,
                &autopay::store::DeliveryOutcome::Sent,
                w.clock.now(),
            )
            .await
            .unwrap();
    }
    w.advance(SignedDuration::from_hours(24 * 29));
    assert_eq!(
        autopay::notify::housekeeping::prune(w.store.as_ref(), &w.settings, w.clock.now())
            .await
            .unwrap(),
        0
    );
    w.advance(SignedDuration::from_hours(24 * 2));
    assert_eq!(
        autopay::notify::housekeeping::prune(w.store.as_ref(), &w.settings, w.clock.now())
            .await
            .unwrap(),
        2
    );
    assert!(w.store.notifications(Some(m.id)).await.unwrap().is_empty());
    assert_eq!(
        w.payments(&m).await[0].state,
        PaymentState::Succeeded,
        "the payment stays"
    );
}

on_both!(
    a_needs_review_payment_retried_inside_the_key_window_resends_its_key_and_charges_once,
    a_needs_review_payment_gets_a_new_key_only_after_its_old_one_died_and_a_lookup_found_nothing,
    an_unsettled_payment_keeps_its_credit_reserved_and_no_money_is_made_up,
    an_attempt_that_never_answers_keeps_its_one_key_and_goes_to_review_after_its_resends,
    a_worker_frozen_past_its_lease_sends_the_same_request_as_the_one_that_took_over,
    a_worker_whose_lease_ran_out_writes_no_request,
    busy_answers_are_resent_replayed_errors_are_looked_up_and_a_refused_key_is_reviewed,
    the_circuit_breaker_counts_timeouts_even_after_the_lookup_settled_them,
    a_declining_card_gets_at_most_ten_declines_a_day_and_fifteen_requests_a_month,
    a_long_charging_pause_charges_one_payment_on_resume_not_one_per_day,
    a_schedule_on_a_disabled_card_cannot_be_brought_back_without_a_new_card,
    an_operator_holds_the_payment_while_resolving_and_the_attempt_records_the_outcome,
    a_charging_pause_gives_the_worker_nothing_to_wake_for,
    done_notifications_older_than_keep_sent_are_deleted,
    the_scans_have_their_indexes_and_a_quiet_reminder_scan_takes_no_write_lock,
);

/// Item 6: `schedule update` while the daemon was down dropped the occurrence that was due.
#[tokio::test]
async fn a_schedule_update_after_downtime_records_and_charges_the_occurrence_that_was_due() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    let card = member_with_card(&bin);
    let schedule = bin
        .run(&[
            "schedule",
            "add",
            "--account",
            "A-100200",
            "--card",
            &card,
            "--monthly",
            "--day",
            "1",
            "--amount",
            "20.00",
            "--first-payment",
            "now",
        ])
        .ok()
        .id();
    // No daemon ran; the first payment is due. An operator changes the amount.
    bin.run(&["schedule", "update", &schedule, "--amount", "25.00"])
        .ok();
    bin.run(&["run", "--drain"]).ok();
    let payments = bin.run(&["payment", "list", "--json"]).ok().json();
    let payments = payments.as_array().unwrap();
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(
        payments[0]["occurrence"]
            .as_str()
            .map(|o| o.starts_with("first:")),
        Some(true)
    );
    assert_eq!(payments[0]["state"], "succeeded");
    assert_eq!(
        payments[0]["amount"], "25.00",
        "charged with the new amount"
    );
    let id = payments[0]["id"].as_str().unwrap();
    let shown = bin.run(&["payment", "show", id]).ok().stdout;
    assert!(shown.contains("requests to the processor"), "{shown}");
}

/// Item 9: amounts overflowed (two bills of 50,000,000,000,000,000.00 printed a negative total).
#[tokio::test]
async fn amounts_past_the_caps_are_refused_with_65_and_nothing_is_stored() {
    let db = TestDb::new(Kind::Sqlite).await;
    let bin = Bin::new(&db);
    bin.run(&["migrate"]).ok();
    member_with_card(&bin);
    let csv = db.path().join("huge.csv");
    std::fs::write(
        &csv,
        "account,reference,amount,due_date\nA-100200,INV-1,50000000000000000.00,2027-01-01\nA-100200,INV-2,50000000000000000.00,2027-01-01\n",
    )
    .unwrap();
    for dry in [true, false] {
        let mut args = vec!["bill", "import", csv.to_str().unwrap()];
        if dry {
            args.push("--dry-run");
        }
        let run = bin.run(&args).fails_with(65);
        assert!(run.stderr.contains("99999999.99"), "{}", run.stderr);
        assert!(
            !run.stdout.contains('-'),
            "no negative total: {}",
            run.stdout
        );
    }
    bin.run(&[
        "bill",
        "add",
        "--account",
        "A-100200",
        "--amount",
        "100000000.00",
        "--due",
        "2027-01-01",
        "--reference",
        "INV-3",
    ])
    .fails_with(65);
    assert_eq!(
        bin.run(&["bill", "list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    let big = bin
        .with_env("AUTOPAY__PAYMENTS__MAX_AMOUNT_EMPLOYER_GROUP", "1000000.00")
        .run(&["check-config"]);
    let big = big.fails_with(78);
    assert!(big.stderr.contains("999999.99"), "{}", big.stderr);
}

/// Item 19: settings that did nothing were accepted. The cron and http keys work now (the
/// service release), and so does processor.kind = "stripe" (with a key); what still cannot work
/// is refused.
#[tokio::test]
async fn settings_that_cannot_work_are_refused_by_check_config() {
    let db = TestDb::new(Kind::Sqlite).await;
    for (key, value, says) in [
        ("AUTOPAY__DAEMON__PLANNER_CRON", "0 * * * *", "six fields"),
        ("AUTOPAY__DAEMON__TICK_ALARM", "soon", "daemon.tick_alarm"),
        ("AUTOPAY__HTTP__LISTEN", "everywhere", "http.listen"),
        (
            "AUTOPAY__PROCESSOR__KIND",
            "stripe",
            "processor.stripe.secret_key",
        ),
        ("AUTOPAY__PROCESSOR__LOOKUP_WINDOW", "23h", "key_retention"),
    ] {
        let run = Bin::new(&db)
            .with_env(key, value)
            .run(&["check-config"])
            .fails_with(78);
        assert!(run.stderr.contains(says), "{key}: {}", run.stderr);
    }
}

/// Item 10: a deadlock or serialization failure is PostgreSQL's, not a bug: it is run again.
#[tokio::test]
async fn a_deadlock_is_reported_as_contention_and_run_again_never_as_a_bug() {
    use sqlx::Connection;
    let db = TestDb::new(Kind::Postgres).await;
    let mut a = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut b = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE locks (id INT PRIMARY KEY)")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::query("INSERT INTO locks VALUES (1), (2)")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut a).await.unwrap();
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    sqlx::query("UPDATE locks SET id = id WHERE id = 1")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::query("UPDATE locks SET id = id WHERE id = 2")
        .execute(&mut b)
        .await
        .unwrap();
    let first = tokio::spawn(async move {
        let r = sqlx::query("UPDATE locks SET id = id WHERE id = 2")
            .execute(&mut a)
            .await;
        (r.map(|_| ()), a)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = sqlx::query("UPDATE locks SET id = id WHERE id = 1")
        .execute(&mut b)
        .await
        .map(|_| ());
    let (first, _a) = first.await.unwrap();
    let deadlock = first
        .err()
        .or(second.err())
        .expect("one of the two deadlocked");
    let err = StoreError::from_sqlx(deadlock, "testing");
    assert!(matches!(err, StoreError::Contention(_)), "{err:?}");
    // Run again, it succeeds; met every time, it is "unavailable, try again" (exit 69).
    let mut tries = 0;
    let done = autopay::store::retry::again(|| {
        tries += 1;
        let n = tries;
        async move {
            if n < 3 {
                Err(StoreError::Contention("met another".into()))
            } else {
                Ok(n)
            }
        }
    })
    .await;
    assert_eq!(done.unwrap(), 3);
    let always = autopay::store::retry::again(|| async {
        Err::<(), _>(StoreError::Contention("met another".into()))
    })
    .await;
    assert!(
        matches!(always, Err(StoreError::Unavailable(_))),
        "{always:?}"
    );
}

/// Item 10: `add_schedule` read the member's status without a lock and could race `member
/// close`, leaving an active schedule on a closed member.
#[tokio::test]
async fn a_schedule_added_while_its_member_is_closed_never_stays_active() {
    let w = World::new(Kind::Postgres).await;
    for i in 0..20 {
        let m = w
            .member(&format!("R-{i:06}"), AccountType::IndividualFamily)
            .await;
        let card = w.card(&m, "4242424242424242").await;
        let adding = {
            let store = w.store.clone();
            let mut new = w.new_schedule(&m, &card);
            new.next_run_at = Some(w.clock.now());
            let audit = w.audit();
            tokio::spawn(async move { store.add_schedule(&new, &audit).await })
        };
        let closing = {
            let store = w.store.clone();
            let account = m.account_number.clone();
            let audit = w.audit();
            tokio::spawn(async move { store.close_member(&account, &audit).await })
        };
        let _ = adding.await.unwrap();
        closing.await.unwrap().unwrap();
        let live: Vec<_> = w
            .store
            .list_schedules(Some(m.id))
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.status == ScheduleStatus::Active)
            .collect();
        assert!(live.is_empty(), "round {i}: {live:?}");
    }
}

/// Item 21: the card-expiry scan and `payment show` had no index to use, and the reminder scan
/// took the writer's lock every minute for nothing.
async fn the_scans_have_their_indexes_and_a_quiet_reminder_scan_takes_no_write_lock(kind: Kind) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    w.engine().drain().await.unwrap();
    let db = w.database_url();
    let names: Vec<String> = match kind {
        Kind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(db.expose()).await.unwrap();
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'index'")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
        Kind::Postgres => {
            let pool = sqlx::PgPool::connect(db.expose()).await.unwrap();
            sqlx::query_scalar("SELECT indexname::text FROM pg_indexes")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    for index in [
        "schedules_method",
        "events_entity_id",
        "payment_methods_expiry",
    ] {
        assert!(
            names.iter().any(|n| n == index),
            "{index} missing: {names:?}"
        );
    }
    if kind == Kind::Sqlite {
        // The card-expiry scan reads the cards that expire soon, not every card.
        let pool = sqlx::SqlitePool::connect(db.expose()).await.unwrap();
        let plan: Vec<String> = sqlx::query(
            "EXPLAIN QUERY PLAN SELECT p.id FROM payment_methods p WHERE p.status = 'active' \
             AND p.exp_year <= 2027 AND (p.exp_year < 2027 OR p.exp_month <= 1)",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|row| sqlx::Row::get::<String, _>(row, "detail"))
        .collect();
        assert!(
            plan.iter().any(|d| d.contains("payment_methods_expiry")),
            "{plan:?}"
        );
    }
    w.clock.set("2026-12-29T15:00:00Z".parse().unwrap());
    let scan = || autopay::notify::reminders::scan(w.store.as_ref(), &w.settings, w.clock.now());
    assert_eq!(scan().await.unwrap(), 1);
    if kind == Kind::Sqlite {
        // Another process holds SQLite's one write lock: a scan with nothing new still ends.
        use sqlx::Connection;
        let mut writer = sqlx::SqliteConnection::connect(db.expose()).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut writer)
            .await
            .unwrap();
        let quiet = tokio::time::timeout(Duration::from_secs(3), scan()).await;
        assert_eq!(quiet.expect("no wait for the write lock").unwrap(), 0);
        sqlx::query("ROLLBACK").execute(&mut writer).await.unwrap();
    } else {
        assert_eq!(scan().await.unwrap(), 0);
    }
    drop(m);
}
