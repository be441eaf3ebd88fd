//! The charger: claims due payments as fenced leases, only as many as it has slots, and for
//! each one freezes the amount, re-checks the charging pause, calls the processor outside any
//! transaction, and records the outcome in one transaction that names the lease.
//!
//! An unknown outcome is never answered by charging again: the payment waits
//! `processor.settle_delay`, then the charger asks the processor what happened.

use std::sync::Arc;

use jiff::SignedDuration;
use serde::Serialize;
use tokio::task::JoinSet;

use super::{Engine, EngineError};
use crate::domain::decline::classify;
use crate::processor::{ChargeOutcome, ChargeRequest, Lookup};
use crate::store::{AttemptResult, AttemptStart, Lease, Recorded, Work, WorkKind};

/// What one claim round did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChargeReport {
    pub claimed: u64,
    pub succeeded: u64,
    pub declined: u64,
    pub failed: u64,
    pub unknown: u64,
    pub skipped: u64,
    pub cancelled: u64,
    pub looked_up: u64,
    pub needs_review: u64,
    pub lease_lost: u64,
    pub released: u64,
}

impl ChargeReport {
    pub fn add(&mut self, o: &ChargeReport) {
        self.claimed += o.claimed;
        self.succeeded += o.succeeded;
        self.declined += o.declined;
        self.failed += o.failed;
        self.unknown += o.unknown;
        self.skipped += o.skipped;
        self.cancelled += o.cancelled;
        self.looked_up += o.looked_up;
        self.needs_review += o.needs_review;
        self.lease_lost += o.lease_lost;
        self.released += o.released;
    }

    fn count(&mut self, state: crate::domain::payment::PaymentState) {
        use crate::domain::payment::PaymentState as S;
        match state {
            S::Succeeded => self.succeeded += 1,
            S::RetryWait => self.declined += 1,
            S::Failed => self.failed += 1,
            S::Unknown => self.unknown += 1,
            S::Skipped => self.skipped += 1,
            S::Cancelled => self.cancelled += 1,
            S::NeedsReview => self.needs_review += 1,
            S::Scheduled | S::Processing | S::Missed => {}
        }
    }
}

/// What happened to one claimed payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Moved(crate::domain::payment::PaymentState),
    LeaseLost,
    Released,
}

impl Engine {
    /// Claims one batch (at most `daemon.concurrency` payments) and works them concurrently.
    pub async fn charge_due(self: &Engine) -> Result<ChargeReport, EngineError> {
        let mut report = ChargeReport::default();
        let limit = self.config.concurrency.min(self.config.batch_size);
        let work = self
            .store
            .claim_work(&self.worker_id, self.clock.now(), self.config.lease, limit)
            .await?;
        report.claimed = work.len() as u64;
        report.looked_up = work.iter().filter(|w| w.kind == WorkKind::Lookup).count() as u64;
        if work.is_empty() {
            return Ok(report);
        }
        let this = Arc::new(self.clone());
        let mut tasks = JoinSet::new();
        for item in work {
            let engine = this.clone();
            tasks.spawn(async move { engine.work_with_renewal(item).await });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(Done::Moved(state))) => report.count(state),
                Ok(Ok(Done::LeaseLost)) => report.lease_lost += 1,
                Ok(Ok(Done::Released)) => report.released += 1,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(EngineError::Store(
                        crate::store::StoreError::Internal(format!("a charge task stopped: {e}")),
                    ));
                }
            }
        }
        self.check_breaker().await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Works one payment while renewing its lease every third of the lease.
    async fn work_with_renewal(&self, work: Work) -> Result<Done, EngineError> {
        let lease = work.lease;
        let every = self.config.lease / 3;
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                let until = self
                    .clock
                    .now()
                    .checked_add(
                        SignedDuration::try_from(self.config.lease).unwrap_or(SignedDuration::MAX),
                    )
                    .unwrap_or(jiff::Timestamp::MAX);
                if let Ok(0) = self.store.renew_leases(&[lease], until).await {
                    tracing::warn!(payment_id = %lease.payment_id, "lease taken over while working");
                }
            }
        };
        tokio::select! {
            done = self.work(work) => done,
            () = renew => unreachable!("renewal never ends"),
        }
    }

    #[tracing::instrument(name = "payment", skip_all, fields(payment_id = %work.payment.id, schedule_id = %work.payment.schedule_id, attempt = work.payment.attempt, kind = ?work.kind))]
    async fn work(&self, work: Work) -> Result<Done, EngineError> {
        match work.kind {
            WorkKind::Charge => self.charge(work.lease).await,
            WorkKind::Lookup => {
                self.look_up(work.lease, work.payment.id, work.payment.attempt)
                    .await
            }
        }
    }

    async fn charge(&self, lease: Lease) -> Result<Done, EngineError> {
        let start = self
            .store
            .begin_attempt(&lease, &self.policy, &self.audit())
            .await?;
        let (amount, attempt, key, token, account, occurrence, schedule_id) = match start {
            AttemptStart::LeaseLost => return Ok(Done::LeaseLost),
            AttemptStart::Settled(state) => {
                tracing::info!(state = %state, "settled without a charge");
                return Ok(Done::Moved(state));
            }
            AttemptStart::Charge {
                amount,
                attempt,
                idempotency_key,
                card_token,
                account_number,
                occurrence,
                schedule_id,
            } => (
                amount,
                attempt,
                idempotency_key,
                card_token,
                account_number,
                occurrence,
                schedule_id,
            ),
        };
        // The emergency stop is checked just before every call, on every host.
        if self.store.control().await?.charging_paused.is_some() {
            self.store.release(&lease, &self.audit()).await?;
            tracing::info!("charging is paused; payment released");
            return Ok(Done::Released);
        }
        let request = ChargeRequest {
            idempotency_key: key,
            token,
            amount,
            payment_id: lease.payment_id,
            schedule_id,
            occurrence,
            attempt,
            account_number: account,
        };
        // Waits for the rate limit count against the call's timeout.
        let call = async {
            self.limiter.acquire().await;
            self.processor.charge(&request).await
        };
        let outcome = match tokio::time::timeout(self.config.processor_timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => ChargeOutcome::Unknown {
                detail: format!(
                    "no answer within processor.timeout ({:?})",
                    self.config.processor_timeout
                ),
            },
        };
        if self.crash_hook.as_ref().is_some_and(|crash| crash()) {
            return Err(EngineError::InjectedCrash);
        }
        let result = match outcome {
            ChargeOutcome::Approved { reference } => AttemptResult::Approved { reference },
            ChargeOutcome::Declined { code, .. } => declined(&code, None),
            ChargeOutcome::Unknown { detail } => AttemptResult::Unknown { detail },
            ChargeOutcome::IdempotencyMismatch { detail } => AttemptResult::NeedsReview {
                detail: format!("the processor refused the idempotency key: {detail}"),
            },
        };
        self.record(lease, &result).await
    }

    async fn look_up(
        &self,
        lease: Lease,
        payment_id: uuid::Uuid,
        attempt: i64,
    ) -> Result<Done, EngineError> {
        let lookup = tokio::time::timeout(
            self.config.processor_timeout,
            self.processor.find_attempt(payment_id, attempt),
        )
        .await
        .unwrap_or_else(|_| Lookup::Unknown {
            detail: "the lookup timed out".into(),
        });
        let result = match lookup {
            Lookup::Found(found) if found.approved => AttemptResult::Approved {
                reference: found.reference,
            },
            Lookup::Found(found) => declined(
                found.decline_code.as_deref().unwrap_or("generic_decline"),
                Some(found.reference),
            ),
            Lookup::NotFound => AttemptResult::NotCharged,
            Lookup::Unknown { detail } => AttemptResult::Unknown { detail },
        };
        tracing::info!(result = ?result, "looked up an unknown outcome");
        self.record(lease, &result).await
    }

    async fn record(&self, lease: Lease, result: &AttemptResult) -> Result<Done, EngineError> {
        match self
            .store
            .record_attempt(&lease, result, &self.policy, &self.audit())
            .await?
        {
            Recorded::Moved(state) => {
                tracing::info!(state = %state, "recorded");
                Ok(Done::Moved(state))
            }
            Recorded::LeaseLost => {
                tracing::warn!(
                    "lease taken over before the outcome was recorded; the new holder settles it"
                );
                Ok(Done::LeaseLost)
            }
        }
    }

    /// Pauses charging by itself when, over the breaker window and enough attempts, the share
    /// of declines or of processor errors passes its threshold.
    async fn check_breaker(&self) -> Result<(), EngineError> {
        let now = self.clock.now();
        let since = now
            .checked_sub(
                SignedDuration::try_from(self.config.breaker_window)
                    .unwrap_or(SignedDuration::ZERO),
            )
            .unwrap_or(now);
        let stats = self.store.attempt_stats(since).await?;
        if stats.attempts < i64::from(self.config.breaker_min_attempts) || stats.attempts == 0 {
            return Ok(());
        }
        let declines = stats.declines as f64 / stats.attempts as f64;
        let errors = stats.errors as f64 / stats.attempts as f64;
        let reason = if declines > self.config.breaker_decline_share {
            format!(
                "circuit breaker: {:.0}% of {} attempts declined in the last {:?}",
                declines * 100.0,
                stats.attempts,
                self.config.breaker_window
            )
        } else if errors > self.config.breaker_error_share {
            format!(
                "circuit breaker: {:.0}% of {} attempts ended with a processor error in the last {:?}",
                errors * 100.0,
                stats.attempts,
                self.config.breaker_window
            )
        } else {
            return Ok(());
        };
        if self.store.control().await?.charging_paused.is_none() {
            tracing::error!(reason = %reason, "charging paused by the circuit breaker; run `autopay charging resume` once the cause is fixed");
            let audit = crate::store::Audit {
                actor: "breaker".into(),
                at: now,
            };
            self.store.set_charging_pause(Some(&reason), &audit).await?;
        }
        Ok(())
    }
}

fn declined(code: &str, reference: Option<String>) -> AttemptResult {
    let decline = classify(code, None);
    AttemptResult::Declined {
        code: decline.code,
        action: decline.action,
        member_reason: decline.member_reason.to_string(),
        reference,
    }
}
