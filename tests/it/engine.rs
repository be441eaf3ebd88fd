//! The charge engine against real databases: a due payment is charged once, declines and
//! unknown outcomes move through the state machine, a worker that lost its lease records
//! nothing, and three engines racing on one PostgreSQL charge each payment once.

use std::sync::Arc;
use std::time::Duration;

use autopay::clock::{Clock, ManualClock};
use autopay::config::Settings;
use autopay::daemon::{engine_config, outcome_policy};
use autopay::domain::card::{CardNumber, Expiry, SecurityCode};
use autopay::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use autopay::domain::money::{Currency, Money};
use autopay::domain::payment::{AmountRule, PaymentState};
use autopay::domain::schedule::{End, FirstPayment, Recurrence, RecurrenceSpec, Rule};
use autopay::domain::status::{
    AuthorizedVia, BillStatus, CardStatus, ScheduleKind, ScheduleStatus,
};
use autopay::engine::Engine;
use autopay::processor::simulated::SimulatedProcessor;
use autopay::processor::{CardOwner, Processor};
use autopay::store::{
    Answer, Audit, Card, ClaimRules, Lease, LookupAnswer, Member, NewBill, NewCard, NewMember,
    NewSchedule, Next, OutcomePolicy, Schedule, Settler, Store, Work,
};
use jiff::SignedDuration;

use crate::helpers::{Kind, TestDb};

pub fn settings(env: &[(&str, &str)]) -> Settings {
    Settings::load(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("test settings")
}

/// A store, a manual clock, the simulated processor, and an engine over them.
pub struct World {
    /// Kept so the database outlives the test.
    pub _db: TestDb,
    pub store: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    pub processor: Arc<SimulatedProcessor>,
    pub settings: Settings,
}

impl World {
    pub async fn new(kind: Kind) -> World {
        World::with_settings(kind, &[]).await
    }

    pub async fn with_settings(kind: Kind, env: &[(&str, &str)]) -> World {
        let db = TestDb::new(kind).await;
        let store = db.store().await;
        let clock = Arc::new(ManualClock::new("2026-12-01T15:00:00Z".parse().unwrap()));
        let processor = Arc::new(SimulatedProcessor::in_memory(clock.clone(), Duration::ZERO));
        World {
            _db: db,
            store,
            clock,
            processor,
            settings: settings(env),
        }
    }

    pub fn engine(&self) -> Engine {
        self.engine_with(self.processor.clone())
    }

    /// An engine over another processor (one that wraps the simulated one, say).
    pub fn engine_with(&self, processor: Arc<dyn Processor>) -> Engine {
        Engine::new(
            self.store.clone(),
            processor,
            self.clock.clone(),
            engine_config(&self.settings),
            outcome_policy(&self.settings),
        )
    }

    pub fn audit(&self) -> Audit {
        Audit {
            actor: "cli:tester".into(),
            at: self.clock.now(),
        }
    }

    pub fn advance(&self, by: SignedDuration) {
        self.clock.advance(by);
    }

    pub async fn member(&self, account: &str, account_type: AccountType) -> Member {
        self.store
            .add_member(
                &NewMember {
                    account_number: AccountNumber::parse(account).unwrap(),
                    account_type,
                    name: MemberName::parse("Test Member").unwrap(),
                    email: EmailAddress::parse("member@example.org").unwrap(),
                    time_zone: "America/New_York".into(),
                },
                &self.audit(),
            )
            .await
            .unwrap()
    }

    /// A card from a public test number, tokenized by the simulated processor.
    pub async fn card(&self, member: &Member, number: &str) -> Card {
        let n = CardNumber::parse(number).unwrap();
        let code = SecurityCode::parse("123", n.brand()).unwrap();
        let t = self
            .processor
            .tokenize(
                &CardOwner {
                    member_id: member.id,
                    customer: None,
                },
                &n,
                &code,
                Expiry::new(12, 2030).unwrap(),
            )
            .await
            .unwrap();
        self.store
            .add_card(
                &NewCard {
                    member_id: member.id,
                    processor: "simulated".into(),
                    processor_token: t.token,
                    brand: t.details.brand,
                    last4: t.details.last4,
                    expiry: t.details.expiry,
                    fingerprint: t.fingerprint,
                    customer: None,
                    processor_mode: None,
                    consent: autopay::store::Consent {
                        at: self.audit().at,
                        via: "cli".into(),
                        terms_version: None,
                    },
                },
                &self.audit(),
            )
            .await
            .unwrap()
    }

    pub async fn bill(&self, member: &Member, reference: &str, amount: &str, due: &str) {
        self.store
            .add_bills(
                &[NewBill {
                    member_id: member.id,
                    reference: reference.into(),
                    amount_due: usd(amount),
                    due_date: due.parse().unwrap(),
                    origin: reference.into(),
                }],
                &self.audit(),
            )
            .await
            .unwrap();
    }

    /// A monthly schedule on the 1st whose first payment is due now.
    pub async fn schedule_now(&self, member: &Member, card: &Card, amount: AmountRule) -> Schedule {
        self.schedule(member, card, Rule::Monthly { day: 1 }, amount)
            .await
    }

    /// A schedule by `rule` (dates from tomorrow) whose first payment is due now.
    pub async fn schedule(
        &self,
        member: &Member,
        card: &Card,
        rule: Rule,
        amount: AmountRule,
    ) -> Schedule {
        let mut new = self.new_schedule(member, card);
        let recurrence = Recurrence::new(RecurrenceSpec {
            rule,
            ..new.recurrence.spec()
        })
        .unwrap();
        let first = recurrence.occurrences().next().unwrap();
        new.recurrence = recurrence;
        new.amount = amount;
        new.next_run_at = Some(first.due_at);
        new.next_occurrence = Some(first.key);
        self.store.add_schedule(&new, &self.audit()).await.unwrap()
    }

    /// A monthly schedule of 10.00 on the 1st (dates from tomorrow) whose first payment is due
    /// now, not yet stored.
    pub fn new_schedule(&self, member: &Member, card: &Card) -> NewSchedule {
        let now = self.clock.now();
        let tomorrow = now
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date()
            .tomorrow()
            .unwrap();
        let recurrence = Recurrence::new(RecurrenceSpec {
            rule: Rule::Monthly { day: 1 },
            at: jiff::civil::time(9, 0, 0, 0),
            time_zone: "America/New_York".into(),
            start: tomorrow,
            first_payment: Some(FirstPayment::Now(now)),
            end: End::Never,
            business_days: false,
            holidays: vec![],
        })
        .unwrap();
        let first = recurrence.occurrences().next().unwrap();
        NewSchedule {
            member_id: member.id,
            card_id: card.id,
            kind: ScheduleKind::Recurring,
            recurrence,
            amount: AmountRule::Fixed {
                amount: usd("10.00"),
            },
            currency: Currency::USD,
            next_run_at: Some(first.due_at),
            next_occurrence: Some(first.key),
            authorized_via: AuthorizedVia::Cli,
            terms_version: "t1".into(),
        }
    }

    pub fn database_url(&self) -> autopay::config::DatabaseUrl {
        self._db.database_url()
    }

    /// The member A-100200 with a card from this test number and a monthly schedule of a fixed
    /// amount whose first payment is due now.
    pub async fn paying(&self, number: &str, amount: &str) -> (Member, Card, Schedule) {
        let m = self.member("A-100200", AccountType::IndividualFamily).await;
        let card = self.card(&m, number).await;
        let s = self
            .schedule_now(
                &m,
                &card,
                AmountRule::Fixed {
                    amount: usd(amount),
                },
            )
            .await;
        (m, card, s)
    }

    pub fn policy(&self) -> OutcomePolicy {
        outcome_policy(&self.settings)
    }

    /// The settings' claim rules, with a five-minute lease.
    pub fn claim_rules(&self) -> ClaimRules {
        ClaimRules {
            lease: Duration::from_secs(300),
            limit: 10,
            max_lateness: self.settings.payments.max_lateness.as_std(),
            misfire: self.settings.payments.misfire,
            settle: true,
        }
    }

    /// Claims what is due now, as worker `owner`.
    pub async fn claim(&self, owner: &str) -> Vec<Work> {
        self.store
            .claim_work(owner, self.clock.now(), &self.claim_rules())
            .await
            .unwrap()
    }

    /// Plans, claims the one due payment and starts its attempt, as a worker would just before
    /// writing the request: its lease and the request's call.
    pub async fn started(&self, owner: &str) -> (Lease, uuid::Uuid) {
        self.engine().plan_due().await.unwrap();
        let work = self.claim(owner).await;
        assert_eq!(work.len(), 1, "one payment due");
        let lease = work[0].lease;
        match self
            .store
            .begin_attempt(&lease, &self.policy(), &self.audit())
            .await
            .unwrap()
        {
            Next::Send { call, .. } => (lease, call),
            other => panic!("expected a request to send, got {other:?}"),
        }
    }

    pub async fn payments(&self, member: &Member) -> Vec<autopay::store::Payment> {
        self.store
            .list_payments(Some(member.id), None)
            .await
            .unwrap()
    }
}

pub fn usd(s: &str) -> Money {
    Money::parse(s, Currency::USD).unwrap()
}

async fn a_due_payment_is_charged_once_pays_its_bills_and_leaves_a_receipt(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4242424242424242").await;
    w.bill(&m, "INV-1", "40.00", "2026-11-20").await;
    w.bill(&m, "INV-2", "85.00", "2026-12-10").await;
    w.schedule_now(&m, &card, AmountRule::Balance).await;

    let report = w.engine().drain().await.unwrap();
    assert_eq!(report.charge.succeeded, 1, "{report:?}");

    let payments = w.payments(&m).await;
    assert_eq!(payments.len(), 1);
    let p = &payments[0];
    assert_eq!(p.state, PaymentState::Succeeded);
    assert_eq!(p.amount, Some(usd("125.00")));
    assert!(
        p.processor_reference
            .as_deref()
            .unwrap()
            .starts_with("sim_ch_")
    );
    let bills = w.store.list_bills(Some(m.id)).await.unwrap();
    assert!(
        bills.iter().all(|b| b.status == BillStatus::Paid),
        "{bills:?}"
    );
    // The card keeps the network's id of its first successful charge (stored credentials).
    let kept = w.store.card(card.id).await.unwrap();
    assert_eq!(
        kept.network_transaction_id.as_deref(),
        p.processor_reference
            .as_deref()
            .map(|r| r.replace("sim_ch_", "sim_ntid_"))
            .as_deref()
    );
    assert_eq!(kept.consent.map(|c| c.via).as_deref(), Some("cli"));
    let allocations = w.store.allocations(p.id).await.unwrap();
    let allocated: i64 = allocations.iter().map(|a| a.amount.minor()).sum();
    assert_eq!((allocations.len(), allocated), (2, 12_500));
    let outbox: Vec<_> = w
        .store
        .notifications(Some(m.id))
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.kind != "setup")
        .collect();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].kind, "receipt");
    assert_eq!(outbox[0].dedupe_key, format!("receipt:{}", p.id));
    assert_eq!(outbox[0].payload["amount"], "125.00");
    assert_eq!(outbox[0].payload["card"], "Visa ending 4242");
    assert_eq!(
        outbox[0].payload["confirmation"].as_str(),
        p.processor_reference.as_deref()
    );

    // A second drain changes nothing and charges nothing.
    let again = w.engine().drain().await.unwrap();
    assert_eq!(again.charge.claimed, 0);
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
    assert_eq!(
        w.store.notifications(None).await.unwrap().len(),
        2,
        "setup and receipt, nothing more"
    );
}

async fn a_soft_decline_waits_retries_with_a_new_key_and_tells_the_member_each_time(kind: Kind) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4000000000009995", "30.00").await;

    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::RetryWait);
    assert_eq!(p.attempt, 2);
    assert_eq!(p.decline_code.as_deref(), Some("insufficient_funds"));
    let first_retry = p.next_attempt_at.unwrap();
    assert_eq!(
        first_retry,
        w.clock
            .now()
            .checked_add(SignedDuration::from_hours(24))
            .unwrap()
    );

    // Nothing happens before the retry is due; then it is tried again.
    w.engine().drain().await.unwrap();
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
    w.clock.set(first_retry);
    w.engine().drain().await.unwrap();
    assert_eq!(w.processor.ledger_count().await.unwrap(), 2);
    let p = w.payments(&m).await.remove(0);
    assert_eq!((p.state, p.attempt), (PaymentState::RetryWait, 3));
    let kinds: Vec<String> = w
        .store
        .notifications(Some(m.id))
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.kind == "declined")
        .map(|n| n.dedupe_key)
        .collect();
    assert_eq!(
        kinds,
        vec![
            format!("declined:{}:1", p.id),
            format!("declined:{}:2", p.id)
        ]
    );

    // After the last retry the payment fails and the member hears it.
    for _ in 0..3 {
        let p = w.payments(&m).await.remove(0);
        if let Some(at) = p.next_attempt_at {
            w.clock.set(at);
        }
        w.engine().drain().await.unwrap();
    }
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::Failed);
    assert_eq!(
        w.processor.ledger_count().await.unwrap(),
        4,
        "one charge per attempt: the first and three retries"
    );
    assert!(
        w.store
            .notifications(Some(m.id))
            .await
            .unwrap()
            .iter()
            .any(|n| n.kind == "failed")
    );
}

async fn a_lost_card_is_disabled_its_schedules_suspended_and_the_member_told(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4000000000009987").await;
    let s = w
        .schedule_now(
            &m,
            &card,
            AmountRule::Fixed {
                amount: usd("30.00"),
            },
        )
        .await;
    w.engine().drain().await.unwrap();
    assert_eq!(w.payments(&m).await[0].state, PaymentState::Failed);
    assert_eq!(
        w.store.card(card.id).await.unwrap().status,
        CardStatus::Disabled
    );
    assert_eq!(
        w.store.schedule(s.id).await.unwrap().status,
        ScheduleStatus::Suspended
    );
    let kinds: Vec<String> = w
        .store
        .notifications(Some(m.id))
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.kind)
        .collect();
    assert!(
        kinds.contains(&"failed".to_string())
            && kinds.contains(&"card_disabled".to_string())
            && kinds.contains(&"schedule_suspended".to_string()),
        "{kinds:?}"
    );
    // Nothing more is charged.
    w.advance(SignedDuration::from_hours(24 * 40));
    w.engine().drain().await.unwrap();
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
}

async fn an_answer_lost_after_charging_is_looked_up_never_charged_again(kind: Kind) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    w.processor.set_faults(1.0, 0.0);
    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::Unknown);
    assert_eq!(w.processor.ledger_count().await.unwrap(), 1);
    // Before the settle delay nothing is asked; after it, the lookup finds the charge.
    w.processor.set_faults(0.0, 0.0);
    w.engine().drain().await.unwrap();
    assert_eq!(w.payments(&m).await[0].state, PaymentState::Unknown);
    w.advance(SignedDuration::from_secs(61));
    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::Succeeded);
    assert_eq!(
        w.processor.ledger_count().await.unwrap(),
        1,
        "never charged twice"
    );
}

async fn a_timeout_before_charging_is_looked_up_and_sent_again_with_the_same_key(kind: Kind) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    w.processor.set_faults(0.0, 1.0);
    w.engine().drain().await.unwrap();
    assert_eq!(w.payments(&m).await[0].state, PaymentState::Unknown);
    w.processor.set_faults(0.0, 0.0);
    w.advance(SignedDuration::from_secs(61));
    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(
        (p.state, p.attempt),
        (PaymentState::Succeeded, 1),
        "the same attempt, never a new key"
    );
    let charges = w.processor.charges_for(p.id).await.unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].attempt, 1);
}

async fn an_unknown_outcome_past_the_lookup_window_needs_review(kind: Kind) {
    let w = World::new(kind).await;
    w.paying("4242424242424242", "30.00").await;
    let (lease, call) = w.started("w1").await;
    let unknown = Answer::Unknown {
        detail: "the processor is down".into(),
        replayed: false,
    };
    let moved = w
        .store
        .record_charge(&lease, Some(call), &unknown, &w.policy(), &w.audit())
        .await
        .unwrap();
    assert_eq!(moved, Next::Moved(PaymentState::Unknown));
    // Lookups that cannot answer keep the payment unknown until the window passes.
    w.advance(SignedDuration::from_hours(13));
    let work = w.claim("w1").await;
    assert_eq!(work.len(), 1);
    let lookup = LookupAnswer::Unknown {
        detail: "503".into(),
    };
    let moved = w
        .store
        .record_lookup(
            &work[0].lease,
            &lookup,
            Settler::Daemon,
            &w.policy(),
            &w.audit(),
        )
        .await
        .unwrap();
    assert_eq!(moved, Next::Moved(PaymentState::NeedsReview));
}

async fn a_worker_whose_lease_was_taken_over_records_nothing(kind: Kind) {
    let w = World::new(kind).await;
    let (m, _, _) = w.paying("4242424242424242", "30.00").await;
    let (slow_lease, call) = w.started("slow-worker").await;
    // The slow worker's lease expires; another worker takes the payment over to settle it.
    w.advance(SignedDuration::from_secs(301));
    let taken = w.claim("other-worker").await;
    assert_eq!(taken.len(), 1);
    assert_ne!(taken[0].lease.token, slow_lease.token);
    let late = Answer::Approved {
        reference: "ch_late".into(),
        network_transaction_id: None,
    };
    assert_eq!(
        w.store
            .record_charge(&slow_lease, Some(call), &late, &w.policy(), &w.audit())
            .await
            .unwrap(),
        Next::LeaseLost
    );
    assert_eq!(
        w.store
            .renew_leases(&[slow_lease], w.clock.now())
            .await
            .unwrap(),
        0
    );
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::Processing);
    assert_eq!(
        p.processor_reference, None,
        "the late answer was not recorded"
    );
    assert!(
        w.store
            .notifications(None)
            .await
            .unwrap()
            .iter()
            .all(|n| n.kind == "setup"),
        "no receipt for an unrecorded answer"
    );
}

async fn charging_paused_claims_nothing_until_resumed(kind: Kind) {
    let w = World::new(kind).await;
    w.paying("4242424242424242", "30.00").await;
    w.store
        .set_charging_pause(Some("incident 42"), &w.audit())
        .await
        .unwrap();
    let report = w.engine().drain().await.unwrap();
    assert_eq!((report.plan.planned, report.charge.claimed), (1, 0));
    let status = w.store.status().await.unwrap();
    assert_eq!(
        status.control.charging_paused.unwrap().reason,
        "incident 42"
    );
    w.store.set_charging_pause(None, &w.audit()).await.unwrap();
    assert_eq!(w.engine().drain().await.unwrap().charge.succeeded, 1);
}

async fn nothing_owed_is_skipped_and_credit_covers_what_it_can(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4242424242424242").await;
    w.schedule_now(&m, &card, AmountRule::Balance).await;
    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(
        (p.state, p.reason.as_deref()),
        (PaymentState::Skipped, Some("nothing owed"))
    );
    assert_eq!(w.processor.ledger_count().await.unwrap(), 0);

    // A 30.00 credit from an overpayment reduces the next balance charge of 100.00 to 70.00.
    w.bill(&m, "INV-1", "10.00", "2026-12-01").await;
    let bill = w.store.list_bills(Some(m.id)).await.unwrap().remove(0);
    w.store
        .pay_bill_external(bill.id, usd("40.00"), "PHONE", &w.audit())
        .await
        .unwrap();
    w.bill(&m, "INV-2", "100.00", "2026-12-20").await;
    let next = w
        .store
        .list_schedules(Some(m.id))
        .await
        .unwrap()
        .remove(0)
        .next_run_at
        .unwrap();
    w.clock.set(next);
    w.engine().drain().await.unwrap();
    let p = w
        .payments(&m)
        .await
        .into_iter()
        .find(|p| p.state == PaymentState::Succeeded)
        .unwrap();
    assert_eq!(p.amount, Some(usd("70.00")));
    let credits = w.store.list_credits(m.id).await.unwrap();
    assert_eq!(credits.iter().map(|c| c.remaining.minor()).sum::<i64>(), 0);
    assert!(
        w.store
            .list_bills(Some(m.id))
            .await
            .unwrap()
            .iter()
            .all(|b| b.status == BillStatus::Paid)
    );
}

async fn a_balance_over_the_account_types_limit_fails_and_the_member_is_told(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4242424242424242").await;
    w.bill(&m, "INV-1", "6000.00", "2026-12-01").await;
    w.schedule_now(&m, &card, AmountRule::Balance).await;
    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(
        (p.state, p.decline_code.as_deref()),
        (PaymentState::Failed, Some("over_limit"))
    );
    assert_eq!(w.processor.ledger_count().await.unwrap(), 0);
    let n = w.store.notifications(Some(m.id)).await.unwrap();
    let failed = n
        .iter()
        .find(|n| n.kind == "failed")
        .expect("a failure notice");
    assert_eq!(failed.payload["decline_code"], "over_limit");
}

async fn an_operator_retry_and_resolve_follow_the_state_machine(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let lost = w.card(&m, "4000000000000002").await;
    w.schedule_now(
        &m,
        &lost,
        AmountRule::Fixed {
            amount: usd("30.00"),
        },
    )
    .await;
    let engine = w.engine();
    engine.drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    // A retry or a resolve of a payment that is waiting for its retry is refused.
    assert!(
        w.store
            .retry_payment(p.id, false, &w.audit())
            .await
            .is_err()
    );
    assert!(
        w.store
            .take_for_operator(p.id, Duration::from_secs(60), &w.audit())
            .await
            .is_err()
    );
}

async fn every_row_of_the_decline_tables_moves_the_payment_as_documented(kind: Kind) {
    use autopay::domain::decline::{DECLINE_CODES, DeclineAction, DeclineSignal, classify_code};
    let w = World::new(kind).await;
    let policy = outcome_policy(&w.settings);
    // Each decline code alone; the network's advice on top is checked in
    // domain::decline's own tests and, through the store, in
    // `network_advice_for_the_card_s_brand_decides_the_decline`.
    let rows = DECLINE_CODES.iter().map(|r| (r, classify_code(r.code)));
    for (i, (row, decline)) in rows.enumerate() {
        assert_eq!(decline.action, row.action, "{}", row.code);
        let m = w
            .member(&format!("T-{i:06}"), AccountType::IndividualFamily)
            .await;
        let card = w.card(&m, "4242424242424242").await;
        let s = w
            .schedule_now(
                &m,
                &card,
                AmountRule::Fixed {
                    amount: usd("10.00"),
                },
            )
            .await;
        let (lease, call) = w.started("w").await;
        let answer = Answer::Declined {
            signal: DeclineSignal::code(decline.code.clone()),
            reference: None,
        };
        let moved = w
            .store
            .record_charge(&lease, Some(call), &answer, &policy, &w.audit())
            .await
            .unwrap();
        let card_status = w.store.card(card.id).await.unwrap().status;
        let schedule_status = w.store.schedule(s.id).await.unwrap().status;
        let expected = match row.action {
            DeclineAction::RetryLater => (
                PaymentState::RetryWait,
                CardStatus::Active,
                ScheduleStatus::Active,
            ),
            DeclineAction::FailPayment => (
                PaymentState::Failed,
                CardStatus::Active,
                ScheduleStatus::Active,
            ),
            DeclineAction::DisableCard => (
                PaymentState::Failed,
                CardStatus::Disabled,
                ScheduleStatus::Suspended,
            ),
        };
        assert_eq!(
            (moved, card_status, schedule_status),
            (Next::Moved(expected.0), expected.1, expected.2),
            "row {}",
            row.code
        );
        let notice = w.store.notifications(Some(m.id)).await.unwrap();
        assert!(
            notice
                .iter()
                .any(|n| n.payload["reason"] == decline.member_reason),
            "row {}: the member is told why",
            row.code
        );
    }
}

async fn network_advice_for_the_card_s_brand_decides_the_decline(kind: Kind) {
    use autopay::domain::decline::DeclineSignal;
    let w = World::new(kind).await;
    let policy = outcome_policy(&w.settings);
    // Mastercard's advice 21 (the cardholder stopped recurring payments) with a soft code: the
    // processor did not name the brand, so the stored card's decides whether 21 is read.
    let advised = Answer::Declined {
        signal: DeclineSignal {
            network_advice_code: Some("21".into()),
            ..DeclineSignal::code("generic_decline")
        },
        reference: None,
    };
    let mut outcomes = Vec::new();
    for (i, number) in ["5555555555554444", "4242424242424242"].iter().enumerate() {
        let m = w
            .member(&format!("N-{i:06}"), AccountType::IndividualFamily)
            .await;
        let card = w.card(&m, number).await;
        w.schedule_now(
            &m,
            &card,
            AmountRule::Fixed {
                amount: usd("10.00"),
            },
        )
        .await;
        let (lease, call) = w.started("w").await;
        let moved = w
            .store
            .record_charge(&lease, Some(call), &advised, &policy, &w.audit())
            .await
            .unwrap();
        outcomes.push((moved, w.store.card(card.id).await.unwrap().status));
    }
    assert_eq!(
        outcomes,
        vec![
            // The Mastercard is disabled: the member stopped recurring payments with the bank.
            (Next::Moved(PaymentState::Failed), CardStatus::Disabled),
            // On a Visa card, 21 is not advice: the soft decline waits for its retry.
            (Next::Moved(PaymentState::RetryWait), CardStatus::Active),
        ]
    );
}

async fn suspend_after_failures_in_a_row_suspends_the_schedule(kind: Kind) {
    let w = World::with_settings(kind, &[("AUTOPAY__PAYMENTS__SUSPEND_AFTER", "2")]).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4000000000000002").await;
    let s = w
        .schedule_now(
            &m,
            &card,
            AmountRule::Fixed {
                amount: usd("10.00"),
            },
        )
        .await;
    // Each payment fails after its retries; two such payments in a row suspend the schedule.
    for _ in 0..40 {
        w.engine().drain().await.unwrap();
        let schedule = w.store.schedule(s.id).await.unwrap();
        if schedule.status == ScheduleStatus::Suspended {
            let failed = w
                .payments(&m)
                .await
                .into_iter()
                .filter(|p| p.state == PaymentState::Failed)
                .count();
            assert_eq!(failed, 2);
            assert!(
                w.store
                    .notifications(Some(m.id))
                    .await
                    .unwrap()
                    .iter()
                    .any(|n| n.kind == "schedule_suspended")
            );
            return;
        }
        w.advance(SignedDuration::from_hours(24 * 3));
    }
    panic!("the schedule was never suspended");
}

async fn downtime_coalesces_missed_occurrences_into_one_charge(kind: Kind) {
    let w = World::with_settings(kind, &[("AUTOPAY__PAYMENTS__MAX_LATENESS", "90d")]).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    w.bill(&m, "INV-1", "500.00", "2026-12-01").await;
    let card = w.card(&m, "4242424242424242").await;
    w.schedule_now(
        &m,
        &card,
        AmountRule::Fixed {
            amount: usd("10.00"),
        },
    )
    .await;
    w.engine().drain().await.unwrap();
    // Down over three 1sts (Jan, Feb, Mar): each is recorded once, only the last charged.
    w.advance(SignedDuration::from_hours(24 * 100));
    let report = w.engine().drain().await.unwrap();
    assert_eq!(
        (report.plan.planned, report.plan.missed),
        (1, 2),
        "{report:?}"
    );
    let states: Vec<PaymentState> = w.payments(&m).await.into_iter().map(|p| p.state).collect();
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == PaymentState::Missed)
            .count(),
        2
    );
    assert_eq!(w.processor.ledger_count().await.unwrap(), 2);
    // Planning again changes nothing.
    let again = w.engine().drain().await.unwrap();
    assert_eq!((again.plan.planned, again.plan.missed), (0, 0));
}

async fn an_operator_resolves_an_unknown_payment_and_retries_a_missed_one(kind: Kind) {
    use autopay::domain::payment::Resolution;
    use autopay::store::Resolve;
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    w.bill(&m, "INV-1", "10.00", "2026-12-01").await;
    let card = w.card(&m, "4242424242424242").await;
    w.schedule_now(
        &m,
        &card,
        AmountRule::Fixed {
            amount: usd("10.00"),
        },
    )
    .await;
    w.processor.set_faults(0.0, 1.0);
    w.engine().drain().await.unwrap();
    let p = w.payments(&m).await.remove(0);
    assert_eq!(p.state, PaymentState::Unknown);
    let taken = w
        .store
        .take_for_operator(p.id, Duration::from_secs(60), &w.audit())
        .await
        .unwrap();
    let resolved = w
        .store
        .resolve_payment(
            &Resolve {
                lease: taken.lease,
                resolution: Resolution::Succeeded,
                reference: "ch_dashboard_1".into(),
                reason: "seen in the dashboard".into(),
            },
            &w.audit(),
        )
        .await
        .unwrap();
    assert_eq!(
        (resolved.state, resolved.processor_reference.as_deref()),
        (PaymentState::Succeeded, Some("ch_dashboard_1"))
    );
    assert_eq!(
        w.store.list_bills(Some(m.id)).await.unwrap()[0].status,
        BillStatus::Paid
    );
    assert!(
        w.store
            .notifications(Some(m.id))
            .await
            .unwrap()
            .iter()
            .any(|n| n.kind == "receipt")
    );
    // A succeeded payment is not resolved again, nor retried.
    assert!(w.store.retry_payment(p.id, true, &w.audit()).await.is_err());

    // A missed occurrence can be retried by hand: it goes as the next attempt.
    w.processor.set_faults(0.0, 0.0);
    let m2 = w.member("B-100300", AccountType::IndividualFamily).await;
    let card2 = w.card(&m2, "4242424242424242").await;
    let s2 = w
        .schedule_now(
            &m2,
            &card2,
            AmountRule::Fixed {
                amount: usd("10.00"),
            },
        )
        .await;
    w.advance(SignedDuration::from_hours(24 * 10));
    w.engine().drain().await.unwrap();
    let missed = w
        .payments(&m2)
        .await
        .into_iter()
        .find(|p| p.state == PaymentState::Missed)
        .expect("a missed payment");
    let again = w
        .store
        .retry_payment(missed.id, false, &w.audit())
        .await
        .unwrap();
    assert_eq!((again.state, again.attempt), (PaymentState::Scheduled, 2));
    w.engine().drain().await.unwrap();
    assert_eq!(
        w.store.payment(missed.id).await.unwrap().state,
        PaymentState::Succeeded
    );
    drop(s2);
}

async fn the_circuit_breaker_pauses_charging_when_declines_spike(kind: Kind) {
    let w = World::with_settings(
        kind,
        &[
            ("AUTOPAY__PAYMENTS__BREAKER_MIN_ATTEMPTS", "4"),
            ("AUTOPAY__PAYMENTS__BREAKER_DECLINE_SHARE", "0.5"),
        ],
    )
    .await;
    for i in 0..4 {
        let m = w
            .member(&format!("K-{i:06}"), AccountType::IndividualFamily)
            .await;
        let card = w.card(&m, "4000000000000002").await;
        w.schedule_now(
            &m,
            &card,
            AmountRule::Fixed {
                amount: usd("10.00"),
            },
        )
        .await;
    }
    // Below the minimum number of attempts, declines alone do not trip it.
    let m = w.member("K-999999", AccountType::IndividualFamily).await;
    let good = w.card(&m, "4242424242424242").await;
    w.engine().drain().await.unwrap();
    let paused = w
        .store
        .control()
        .await
        .unwrap()
        .charging_paused
        .expect("the breaker paused charging");
    assert!(
        paused.reason.starts_with("circuit breaker"),
        "{}",
        paused.reason
    );
    assert_eq!(paused.by.as_deref(), Some("breaker"));
    // Nothing is charged until an operator resumes.
    w.schedule_now(
        &m,
        &good,
        AmountRule::Fixed {
            amount: usd("10.00"),
        },
    )
    .await;
    assert_eq!(w.engine().drain().await.unwrap().charge.succeeded, 0);
    w.store.set_charging_pause(None, &w.audit()).await.unwrap();
    w.advance(SignedDuration::from_hours(1));
    assert_eq!(w.engine().drain().await.unwrap().charge.succeeded, 1);
}

async fn cancelling_a_completed_one_time_schedule_stops_its_retries(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::IndividualFamily).await;
    let card = w.card(&m, "4000000000009995").await;
    let now = w.clock.now();
    let recurrence = Recurrence::new(RecurrenceSpec {
        rule: Rule::Once {
            on: now
                .to_zoned_datetime(jiff::tz::TimeZone::get("America/New_York").unwrap())
                .date(),
        },
        at: jiff::civil::time(0, 0, 0, 0),
        time_zone: "America/New_York".into(),
        start: jiff::civil::date(2026, 12, 1),
        first_payment: None,
        end: End::Never,
        business_days: false,
        holidays: vec![],
    })
    .unwrap();
    let first = recurrence.occurrences().next().unwrap();
    let s = w
        .store
        .add_schedule(
            &NewSchedule {
                member_id: m.id,
                card_id: card.id,
                kind: ScheduleKind::OneTime,
                recurrence,
                amount: AmountRule::Fixed {
                    amount: usd("40.00"),
                },
                currency: Currency::USD,
                next_run_at: Some(first.due_at),
                next_occurrence: Some(first.key),
                authorized_via: AuthorizedVia::Cli,
                terms_version: "t1".into(),
            },
            &w.audit(),
        )
        .await
        .unwrap();
    w.engine().drain().await.unwrap();
    assert_eq!(
        w.store.schedule(s.id).await.unwrap().status,
        ScheduleStatus::Completed
    );
    assert_eq!(w.payments(&m).await[0].state, PaymentState::RetryWait);
    let cancelled = w.store.cancel_schedule(s.id, &w.audit()).await.unwrap();
    assert_eq!(cancelled.status, ScheduleStatus::Cancelled);
    assert_eq!(w.payments(&m).await[0].state, PaymentState::Cancelled);
    w.advance(SignedDuration::from_hours(24 * 10));
    w.engine().drain().await.unwrap();
    assert_eq!(
        w.processor.ledger_count().await.unwrap(),
        1,
        "no retry after the cancel"
    );
}

crate::helpers::on_both!(
    a_due_payment_is_charged_once_pays_its_bills_and_leaves_a_receipt,
    a_soft_decline_waits_retries_with_a_new_key_and_tells_the_member_each_time,
    a_lost_card_is_disabled_its_schedules_suspended_and_the_member_told,
    an_answer_lost_after_charging_is_looked_up_never_charged_again,
    a_timeout_before_charging_is_looked_up_and_sent_again_with_the_same_key,
    an_unknown_outcome_past_the_lookup_window_needs_review,
    a_worker_whose_lease_was_taken_over_records_nothing,
    charging_paused_claims_nothing_until_resumed,
    nothing_owed_is_skipped_and_credit_covers_what_it_can,
    a_balance_over_the_account_types_limit_fails_and_the_member_is_told,
    an_operator_retry_and_resolve_follow_the_state_machine,
    every_row_of_the_decline_tables_moves_the_payment_as_documented,
    network_advice_for_the_card_s_brand_decides_the_decline,
    suspend_after_failures_in_a_row_suspends_the_schedule,
    downtime_coalesces_missed_occurrences_into_one_charge,
    an_operator_resolves_an_unknown_payment_and_retries_a_missed_one,
    the_circuit_breaker_pauses_charging_when_declines_spike,
    cancelling_a_completed_one_time_schedule_stops_its_retries,
    a_batch_of_plans_applies_each_fresh_step_once_and_refuses_the_stale,
    one_claim_sorts_its_batch_by_the_lateness_and_misfire_rules,
    a_group_step_sees_what_an_earlier_step_of_the_group_wrote,
);

/// A batch of plans is written set-based: each step applies once, a step made against a
/// cursor that moved since (or the same schedule twice) is refused, and an occurrence another
/// planner already wrote is left alone.
async fn a_batch_of_plans_applies_each_fresh_step_once_and_refuses_the_stale(kind: Kind) {
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::EmployerGroup).await;
    let card = w.card(&m, "4242424242424242").await;
    let fixed = || AmountRule::Fixed {
        amount: usd("5.00"),
    };
    let a = w.schedule_now(&m, &card, fixed()).await;
    let b = w.schedule_now(&m, &card, fixed()).await;
    let c = w.schedule_now(&m, &card, fixed()).await;
    let now = w.clock.now();
    let plan = |s: &Schedule| {
        autopay::engine::plan_step(
            s,
            now,
            w.settings.payments.misfire,
            w.settings.payments.max_lateness.as_std(),
        )
    };
    // c's cursor moves (planned alone) before the batch made against its old cursor.
    let c_step = plan(&c);
    assert!(w.store.apply_plan(&c_step, &w.audit()).await.unwrap());
    let steps = vec![plan(&a), c_step.clone(), plan(&b), plan(&a)];
    let applied = w.store.apply_plans(&steps, &w.audit()).await.unwrap();
    assert_eq!(applied, vec![true, false, true, false]);
    let payments = w.payments(&m).await;
    assert_eq!(payments.len(), 3, "one payment per schedule: {payments:?}");
    for s in [&a, &b, &c] {
        let moved = w.store.schedule(s.id).await.unwrap();
        assert_eq!(moved.status, ScheduleStatus::Active);
        assert_eq!(moved.next_run_at, plan(s).next_run_at, "cursor moved once");
        assert_eq!(payments.iter().filter(|p| p.schedule_id == s.id).count(), 1);
    }
    let planned = w
        .store
        .events(&a.id.to_string())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "planned")
        .count();
    assert_eq!(planned, 1, "one audit event for a's plan");
    // The same batch again: every cursor moved, nothing is written twice.
    let again = w.store.apply_plans(&steps, &w.audit()).await.unwrap();
    assert_eq!(again, vec![false; 4]);
    assert_eq!(w.payments(&m).await.len(), 3);
}

/// A claim takes its batch set-based, in due order and under one lease token: a late payment
/// and an occurrence a later one coalesces are recorded as missed, a claim that expired
/// mid-call is taken over to be settled, and the rest are claimed to be charged.
async fn one_claim_sorts_its_batch_by_the_lateness_and_misfire_rules(kind: Kind) {
    let w = World::with_settings(
        kind,
        &[
            ("AUTOPAY__PAYMENTS__MISFIRE", "coalesce"),
            ("AUTOPAY__PAYMENTS__MAX_LATENESS", "3d"),
        ],
    )
    .await;
    let m = w.member("A-100200", AccountType::EmployerGroup).await;
    let card = w.card(&m, "4242424242424242").await;
    let fixed = || AmountRule::Fixed {
        amount: usd("5.00"),
    };
    // A payment claimed by a worker that dies mid-call: its lease runs out meanwhile.
    let other = w.member("B-100300", AccountType::EmployerGroup).await;
    let other_card = w.card(&other, "5555555555554444").await;
    w.schedule_now(&other, &other_card, fixed()).await;
    w.engine().plan_due().await.unwrap();
    let dead = w
        .store
        .claim_work(
            "dead-worker",
            w.clock.now(),
            &ClaimRules {
                lease: Duration::from_secs(60),
                limit: 1,
                ..w.claim_rules()
            },
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let dead_payment = dead[0].payment.id;
    // A daily schedule planned while charging is paused for five days: its first four
    // occurrences wait, the oldest beyond max_lateness.
    let daily = w
        .schedule(
            &m,
            &card,
            Rule::Every {
                n: 1,
                unit: autopay::domain::schedule::Unit::Days,
            },
            fixed(),
        )
        .await;
    w.store
        .set_charging_pause(Some("incident"), &w.audit())
        .await
        .unwrap();
    let engine = w.engine();
    for _ in 0..4 {
        engine.plan_due().await.unwrap();
        w.advance(SignedDuration::from_hours(24));
    }
    engine.plan_due().await.unwrap();
    w.store.set_charging_pause(None, &w.audit()).await.unwrap();
    let work = w.claim("worker").await;
    let token = work[0].lease.token;
    assert!(
        work.iter().all(|w| w.lease.token == token),
        "one token for the claim"
    );
    assert_ne!(token, dead[0].lease.token);
    let settle: Vec<&Work> = work
        .iter()
        .filter(|w| w.kind == autopay::store::WorkKind::Settle)
        .collect();
    assert_eq!(settle.len(), 1);
    assert_eq!(settle[0].payment.id, dead_payment);
    assert!(settle[0].taken_over);
    let charge: Vec<&Work> = work
        .iter()
        .filter(|w| w.kind == autopay::store::WorkKind::Charge)
        .collect();
    assert_eq!(
        charge.len(),
        1,
        "only the newest occurrence is charged: {work:?}"
    );
    let payments = w.payments(&m).await;
    let newest = payments.iter().max_by_key(|p| p.due_at).unwrap();
    assert_eq!(charge[0].payment.id, newest.id);
    assert_eq!(charge[0].payment.schedule_id, daily.id);
    let missed: Vec<&str> = payments
        .iter()
        .filter(|p| p.state == PaymentState::Missed)
        .filter_map(|p| p.reason.as_deref())
        .collect();
    assert!(payments.len() >= 4, "{payments:?}");
    assert_eq!(missed.len(), payments.len() - 1, "{payments:?}");
    assert!(
        missed.iter().any(|r| r.contains("max_lateness")),
        "{missed:?}"
    );
    assert!(missed.iter().any(|r| r.contains("coalesced")), "{missed:?}");
    // The leases hold: the claimed payments are processing under the claim's token.
    let again = w.claim("another-worker").await;
    assert!(again.is_empty(), "nothing left to claim: {again:?}");
}

/// A group commit reads its steps' rows together, but a step whose member an earlier step of
/// the same group changed reads them again: a lost card disabled by one step's answer stops
/// the next step's charge on it, in the same transaction.
async fn a_group_step_sees_what_an_earlier_step_of_the_group_wrote(kind: Kind) {
    use autopay::domain::decline::DeclineSignal;
    use autopay::store::ChargeStep;
    let w = World::new(kind).await;
    let m = w.member("A-100200", AccountType::EmployerGroup).await;
    let card = w.card(&m, "4242424242424242").await;
    let fixed = || AmountRule::Fixed {
        amount: usd("5.00"),
    };
    let first = w.schedule_now(&m, &card, fixed()).await;
    let second = w.schedule_now(&m, &card, fixed()).await;
    // Another member's payment in the same group, untouched by the first member's steps.
    let other = w.member("B-100300", AccountType::EmployerGroup).await;
    let other_card = w.card(&other, "5555555555554444").await;
    w.schedule_now(&other, &other_card, fixed()).await;
    w.engine().plan_due().await.unwrap();
    let work = w.claim("worker").await;
    assert_eq!(work.len(), 3);
    let lease_of = |schedule_id| {
        work.iter()
            .find(|w| w.payment.schedule_id == schedule_id)
            .unwrap()
            .lease
    };
    let other_lease = work
        .iter()
        .find(|w| w.payment.member_id == other.id)
        .unwrap()
        .lease;
    let policy = w.policy();
    let begun = w
        .store
        .charge_steps(
            &[ChargeStep::Begin {
                lease: lease_of(first.id),
                audit: w.audit(),
            }],
            &policy,
        )
        .await
        .unwrap();
    let Next::Send { call, .. } = &begun[0] else {
        panic!("expected a request to send, got {begun:?}");
    };
    let steps = vec![
        ChargeStep::Record {
            lease: lease_of(first.id),
            call: Some(*call),
            answer: Answer::Declined {
                signal: DeclineSignal::code("lost_card".to_string()),
                reference: None,
            },
            audit: w.audit(),
        },
        ChargeStep::Begin {
            lease: lease_of(second.id),
            audit: w.audit(),
        },
        ChargeStep::Begin {
            lease: other_lease,
            audit: w.audit(),
        },
    ];
    let done = w.store.charge_steps(&steps, &policy).await.unwrap();
    assert_eq!(done[0], Next::Moved(PaymentState::Failed), "{done:?}");
    assert!(
        matches!(done[1], Next::Moved(_)),
        "the disabled card is not charged: {done:?}"
    );
    assert!(matches!(done[2], Next::Send { .. }), "{done:?}");
    assert_eq!(
        w.store.card(card.id).await.unwrap().status,
        CardStatus::Disabled
    );
    let second_payment = w
        .payments(&m)
        .await
        .into_iter()
        .find(|p| p.schedule_id == second.id)
        .unwrap();
    assert_ne!(second_payment.state, PaymentState::Processing);
    assert_eq!(
        w.store.calls(second_payment.id).await.unwrap().len(),
        0,
        "no request was opened for the disabled card"
    );
}

/// Three engines on one PostgreSQL race over many due payments: each is charged once.
#[tokio::test]
async fn three_engines_racing_on_postgres_charge_each_payment_once() {
    let count: usize = std::env::var("AUTOPAY_RACE_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let w = World::new(Kind::Postgres).await;
    let per_member = 10;
    let mut members = Vec::new();
    for i in 0..count.div_ceil(per_member) {
        let m = w
            .member(&format!("R-{i:06}"), AccountType::EmployerGroup)
            .await;
        let c = w.card(&m, "4242424242424242").await;
        // Owed more than the payments bring, so no payment turns into credit.
        w.bill(&m, "RACE", "1000.00", "2026-12-01").await;
        members.push((m, c));
    }
    for i in 0..count {
        let (m, c) = &members[i / per_member];
        w.schedule_now(
            m,
            c,
            AmountRule::Fixed {
                amount: usd("1.00"),
            },
        )
        .await;
    }
    let engines: Vec<Arc<Engine>> = (0..3)
        .map(|i| Arc::new(w.engine().with_worker_id(format!("racer-{i}"))))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for e in &engines {
        let e = e.clone();
        tasks.spawn(async move { e.drain().await.unwrap() });
    }
    let mut succeeded = 0;
    while let Some(r) = tasks.join_next().await {
        succeeded += r.unwrap().charge.succeeded;
    }
    let states = w.store.status().await.unwrap().payments;
    assert_eq!(
        states.get("succeeded").copied(),
        Some(count as i64),
        "{states:?}"
    );
    assert_eq!(succeeded as usize, count);
    assert_eq!(
        w.processor.ledger_count().await.unwrap() as usize,
        count,
        "one ledger row per payment"
    );
    let payments = w.store.list_payments(None, None).await.unwrap();
    assert_eq!(payments.len(), count);
    for p in &payments {
        assert_eq!(p.state, PaymentState::Succeeded);
        assert_eq!(
            w.processor.charges_for(p.id).await.unwrap().len(),
            1,
            "payment {} charged more than once",
            p.id
        );
    }
}
