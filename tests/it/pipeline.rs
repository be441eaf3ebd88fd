//! The charge pipeline: a slot refills as soon as its charge is recorded, so one slow processor
//! call holds one slot, not a batch; a stop ends claiming at once, even in the middle of a long
//! run of due payments, while what is in flight finishes and is recorded; and the group commit
//! writes many attempts' steps in one transaction, all or none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use autopay::domain::card::{CardNumber, Expiry, SecurityCode};
use autopay::domain::member::AccountType;
use autopay::domain::payment::{AmountRule, PaymentState};
use autopay::processor::simulated::SimulatedProcessor;
use autopay::processor::{
    AttemptRef, CardDetails, CardOwner, ChargeOutcome, ChargeRequest, Lookup, Processor,
    ProcessorAttempt, ProcessorError, Tokenized,
};
use autopay::shutdown::Shutdown;
use autopay::store::{Answer, ChargeStep, Next};
use jiff::Timestamp;
use tokio::sync::{Notify, Semaphore};

use crate::engine::{World, usd};
use crate::helpers::{Kind, on_both};

/// The simulated processor, except that the first charge waits until the test opens the gate.
struct Gated {
    inner: Arc<SimulatedProcessor>,
    held: AtomicBool,
    /// Told when the held charge has reached the processor.
    arrived: Notify,
    gate: Semaphore,
}

impl Gated {
    fn new(inner: Arc<SimulatedProcessor>) -> Arc<Gated> {
        Arc::new(Gated {
            inner,
            held: AtomicBool::new(false),
            arrived: Notify::new(),
            gate: Semaphore::new(0),
        })
    }

    fn open(&self) {
        self.gate.add_permits(1);
    }
}

#[async_trait]
impl Processor for Gated {
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
        if !self.held.swap(true, Ordering::SeqCst) {
            self.arrived.notify_one();
            let _permit = self.gate.acquire().await.expect("the gate stays open");
        }
        self.inner.charge(request).await
    }
    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup {
        self.inner.find_attempt(attempt).await
    }
    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        self.inner.list_attempts(since).await
    }
}

/// `count` members, each with one schedule of 1.00 due now.
async fn due_payments(w: &World, count: usize) {
    for i in 0..count {
        let m = w
            .member(&format!("P-{i:06}"), AccountType::EmployerGroup)
            .await;
        let c = w.card(&m, "4242424242424242").await;
        w.bill(&m, "PIPE", "100.00", "2026-12-01").await;
        w.schedule_now(
            &m,
            &c,
            AmountRule::Fixed {
                amount: usd("1.00"),
            },
        )
        .await;
    }
}

async fn succeeded(w: &World) -> i64 {
    let states = w.store.status().await.unwrap().payments;
    states.get("succeeded").copied().unwrap_or(0)
}

/// Two slots, six payments, the first charge stuck at the processor: the other five are charged
/// through the second slot while it waits. (Claimed in waves, the batch holding the stuck
/// charge waited for it, and nothing else was charged.)
async fn a_slow_charge_holds_one_slot_not_a_batch(kind: Kind) {
    let w = World::with_settings(kind, &[("AUTOPAY__DAEMON__CONCURRENCY", "2")]).await;
    due_payments(&w, 6).await;
    let gated = Gated::new(w.processor.clone());
    let engine = w.engine_with(gated.clone());
    let draining = tokio::spawn(async move { engine.drain().await });
    tokio::time::timeout(Duration::from_secs(10), gated.arrived.notified())
        .await
        .expect("the first charge reaches the processor");
    let others = async {
        while succeeded(&w).await < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), others)
        .await
        .expect("the five other payments are charged while the first one waits");
    gated.open();
    let report = draining.await.unwrap().unwrap();
    assert_eq!(report.charge.succeeded, 6);
    assert_eq!(succeeded(&w).await, 6);
    assert_eq!(w.processor.ledger_count().await.unwrap(), 6);
}

/// One slot, five payments, the worker told to stop while the first charge is at the processor:
/// that charge is recorded, and nothing more is claimed.
async fn a_stop_ends_claiming_in_the_middle_of_the_pipeline(kind: Kind) {
    let w = World::with_settings(kind, &[("AUTOPAY__DAEMON__CONCURRENCY", "1")]).await;
    due_payments(&w, 5).await;
    let gated = Gated::new(w.processor.clone());
    let engine = w.engine_with(gated.clone());
    let shutdown = Shutdown::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { engine.run(shutdown, Arc::new(Notify::new())).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gated.arrived.notified())
        .await
        .expect("the first charge reaches the processor");
    shutdown.trigger();
    gated.open();
    let report = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the worker stops once its charge is recorded")
        .unwrap()
        .unwrap();
    assert_eq!(report.charge.claimed, 1, "{report:?}");
    assert_eq!(report.charge.succeeded, 1);
    let states = w.store.status().await.unwrap().payments;
    assert_eq!(states.get("succeeded").copied(), Some(1), "{states:?}");
    assert_eq!(states.get("scheduled").copied(), Some(4), "{states:?}");
    for p in w.store.list_payments(None, None).await.unwrap() {
        assert!(
            matches!(p.state, PaymentState::Succeeded | PaymentState::Scheduled),
            "{:?}",
            p.state
        );
    }
}

/// Three payments' first steps in one group: all stored; then their answers in one group: all
/// recorded. A group with one step that cannot be written (an attempt begun twice) writes
/// nothing at all, and the same steps written one by one succeed but for that one.
async fn a_group_commit_writes_every_step_or_none(kind: Kind) {
    let w = World::new(kind).await;
    due_payments(&w, 6).await;
    w.engine().plan_due().await.unwrap();
    let work = w.claim("grouper").await;
    assert_eq!(work.len(), 6);
    let policy = w.policy();
    let begin = |i: usize| ChargeStep::Begin {
        lease: work[i].lease,
        audit: w.audit(),
    };

    let sent = w
        .store
        .charge_steps(&[begin(0), begin(1), begin(2)], &policy)
        .await
        .unwrap();
    let calls: Vec<uuid::Uuid> = sent
        .iter()
        .map(|next| match next {
            Next::Send { call, .. } => *call,
            other => panic!("expected a request to send, got {other:?}"),
        })
        .collect();
    let approved = |i: usize| ChargeStep::Record {
        lease: work[i].lease,
        call: Some(calls[i]),
        answer: Answer::Approved {
            reference: format!("ch_group_{i}"),
            network_transaction_id: None,
        },
        audit: w.audit(),
    };
    let recorded = w
        .store
        .charge_steps(&[approved(0), approved(1), approved(2)], &policy)
        .await
        .unwrap();
    assert!(
        recorded
            .iter()
            .all(|n| *n == Next::Moved(PaymentState::Succeeded)),
        "{recorded:?}"
    );
    for (i, claimed) in work.iter().enumerate().take(3) {
        let p = w.store.payment(claimed.lease.payment_id).await.unwrap();
        assert_eq!(p.state, PaymentState::Succeeded);
        assert_eq!(
            p.processor_reference.as_deref(),
            Some(format!("ch_group_{i}").as_str())
        );
    }

    // Payment 3's attempt is begun alone; a group that begins it again fails whole.
    w.store
        .begin_attempt(&work[3].lease, &policy, &w.audit())
        .await
        .unwrap();
    let failed = w
        .store
        .charge_steps(&[begin(4), begin(3), begin(5)], &policy)
        .await;
    assert!(failed.is_err(), "{failed:?}");
    for i in [4, 5] {
        assert!(
            w.store
                .sent_attempt(&work[i].lease)
                .await
                .unwrap()
                .is_none(),
            "payment {i}'s attempt was rolled back with its group"
        );
        assert!(
            matches!(
                w.store
                    .begin_attempt(&work[i].lease, &policy, &w.audit())
                    .await
                    .unwrap(),
                Next::Send { .. }
            ),
            "payment {i} begins alone"
        );
    }
    assert!(
        w.store
            .begin_attempt(&work[3].lease, &policy, &w.audit())
            .await
            .is_err()
    );
}

/// Many charges at once through the engine: every payment charged once, every receipt queued,
/// whatever groups their steps were written in.
async fn charges_written_in_groups_are_each_charged_once(kind: Kind) {
    let w = World::with_settings(kind, &[("AUTOPAY__DAEMON__CONCURRENCY", "16")]).await;
    due_payments(&w, 60).await;
    let report = w.engine().drain().await.unwrap();
    assert_eq!(report.charge.succeeded, 60);
    assert_eq!(succeeded(&w).await, 60);
    assert_eq!(w.processor.ledger_count().await.unwrap(), 60);
    let receipts = w
        .store
        .notifications(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.kind == "receipt")
        .count();
    assert_eq!(receipts, 60);
    for p in w.store.list_payments(None, None).await.unwrap() {
        assert_eq!(w.processor.charges_for(p.id).await.unwrap().len(), 1);
        assert_eq!(w.store.allocations(p.id).await.unwrap().len(), 1);
    }
}

on_both!(
    a_slow_charge_holds_one_slot_not_a_batch,
    a_stop_ends_claiming_in_the_middle_of_the_pipeline,
    a_group_commit_writes_every_step_or_none,
    charges_written_in_groups_are_each_charged_once,
);
