//! The charge pipeline: a slot refills as soon as its charge is recorded, so one slow processor
//! call holds one slot, not a batch; and a stop ends claiming at once, even in the middle of a
//! long run of due payments, while what is in flight finishes and is recorded.

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

on_both!(
    a_slow_charge_holds_one_slot_not_a_batch,
    a_stop_ends_claiming_in_the_middle_of_the_pipeline,
);
