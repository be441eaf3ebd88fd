//! The charger: a continuous pipeline that claims due payments as fenced leases, only as many
//! as it has free slots, and drives each one's attempt: the store freezes the amount, re-checks
//! the charging pause and stores the exact request in one transaction; the request is written
//! outside any transaction; the answer is recorded in one transaction that names the lease.
//!
//! An unknown outcome is never answered with a new key. The payment waits
//! `processor.settle_delay`, then a worker claims it to settle: it asks the processor, and a
//! "not found" inside the key window sends the same stored request again (domain::attempt).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::SignedDuration;
use serde::Serialize;
use tokio::task::JoinSet;

use super::{Engine, EngineError};
use crate::domain::attempt::Answer;
use crate::domain::ids::MemberId;
use crate::processor::{AttemptRef, ChargeOutcome, ChargeRequest, Lookup};
use crate::store::{ChargeStep, ClaimRules, Lease, Next, Settler, Work, WorkKind};

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

/// The first wait after a busy answer, doubled after each one, at most [`MAX_BUSY_WAIT`].
const FIRST_BUSY_WAIT: Duration = Duration::from_millis(250);
const MAX_BUSY_WAIT: Duration = Duration::from_secs(2);
/// How often a running pipeline checks the circuit breaker.
const BREAKER_EVERY: Duration = Duration::from_secs(1);
/// How often a running pipeline's claims look for attempts to settle (besides its first
/// claim, and the claim after one that found a full batch of them).
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// When a pipeline's claim looks for attempts to settle: at its first claim, then once every
/// [`SETTLE_EVERY`], and at the next claim whenever a look found a full batch of them.
#[derive(Debug, Default)]
struct SettleCadence {
    /// When a claim last looked; never yet.
    looked: Option<Instant>,
    /// Whether that look found as many as its claim could take (more may be waiting).
    full: bool,
}

impl SettleCadence {
    /// Whether the claim about to run at `now` looks (and if so, counts it as the last look).
    fn look(&mut self, now: Instant) -> bool {
        let look = self.full
            || self
                .looked
                .is_none_or(|at| now.saturating_duration_since(at) >= SETTLE_EVERY);
        if look {
            self.looked = Some(now);
        }
        look
    }

    /// What the claim found: `full` when it looked and took a whole batch of attempts to settle.
    fn found(&mut self, looked: bool, full: bool) {
        if looked {
            self.full = full;
        }
    }
}

impl Engine {
    /// The claim rules from the settings.
    fn claim_rules(&self, limit: u32, settle: bool) -> ClaimRules {
        ClaimRules {
            lease: self.config.lease,
            limit,
            max_lateness: self.config.max_lateness,
            misfire: self.config.misfire,
            settle,
        }
    }

    /// Charges what is due as a continuous pipeline of `daemon.concurrency` slots: a slot
    /// refills as soon as its charge is recorded, so a slow processor call holds one slot, not
    /// a batch. Claims are taken in batches sized to the free slots (at most
    /// `daemon.batch_size`), once at least a quarter of the slots are free or none is busy.
    ///
    /// The pipeline stops claiming when a claim finds nothing, when the process is told to
    /// stop, or after `daemon.poll_interval` (so the planner and the worker loop get their
    /// turn); what is in flight always finishes and is recorded before it returns. The circuit
    /// breaker is checked every second and at the end.
    ///
    /// Attempts to settle (unknown outcomes due for a lookup, claims that expired mid-call) go
    /// first. The first claim looks for them, and then one claim a second, or the next claim
    /// when the last look found a full batch: a month start claims thousands of times a
    /// minute, and looking every time cost a read each (docs/performance.md).
    pub async fn charge_due(self: &Engine) -> Result<ChargeReport, EngineError> {
        let mut report = ChargeReport::default();
        let slots = self.slots();
        let refill_at = slots.div_ceil(4);
        let started = Instant::now();
        let mut breaker_checked = Instant::now();
        let mut settle = SettleCadence::default();
        let mut claiming = true;
        let mut first_error: Option<EngineError> = None;
        let this = Arc::new(self.clone());
        let mut tasks = JoinSet::new();
        loop {
            if claiming
                && (self.stop.is_triggered()
                    || started.elapsed() >= self.config.poll_interval
                    || first_error.is_some())
            {
                claiming = false;
            }
            let free = slots - tasks.len();
            if claiming && (free >= refill_at || tasks.is_empty()) {
                let limit = (free as u32).min(self.config.batch_size);
                let look = settle.look(Instant::now());
                match self
                    .store
                    .claim_work(
                        &self.worker_id,
                        self.clock.now(),
                        &self.claim_rules(limit, look),
                    )
                    .await
                {
                    Ok(work) => {
                        if work.is_empty() {
                            claiming = false;
                        }
                        report.claimed += work.len() as u64;
                        let settling =
                            work.iter().filter(|w| w.kind == WorkKind::Settle).count() as u64;
                        settle.found(look, settling >= u64::from(limit));
                        report.looked_up += settling;
                        let taken_over = work.iter().filter(|w| w.taken_over).count() as u64;
                        if taken_over > 0 {
                            metrics::counter!(crate::metrics::LEASES_TAKEN_OVER)
                                .increment(taken_over);
                        }
                        for item in work {
                            let engine = this.clone();
                            tasks.spawn(async move { engine.work_with_renewal(item).await });
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e.into());
                        claiming = false;
                    }
                }
            }
            if tasks.is_empty() {
                break;
            }
            // Wait for one slot, then take every other one already free.
            let mut joined = tasks.join_next().await;
            while let Some(one) = joined {
                match one {
                    Ok(Ok(Done::Moved(state))) => report.count(state),
                    Ok(Ok(Done::LeaseLost)) => report.lease_lost += 1,
                    Ok(Ok(Done::Released)) => report.released += 1,
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        first_error.get_or_insert(EngineError::Store(
                            crate::store::StoreError::Internal(format!(
                                "a charge task stopped: {e}"
                            )),
                        ));
                    }
                }
                joined = tasks.try_join_next();
            }
            self.health.beat(super::WORKER);
            if breaker_checked.elapsed() >= BREAKER_EVERY {
                breaker_checked = Instant::now();
                if let Err(e) = self.check_breaker().await {
                    first_error.get_or_insert(e);
                }
            }
        }
        if report.claimed > 0 {
            self.check_breaker().await?;
        }
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
        let lease = work.lease;
        let member = work.payment.member_id;
        // A settle whose claim expired before any request was written starts the attempt, as a
        // charge does.
        let sent = match work.kind {
            WorkKind::Charge => None,
            WorkKind::Settle => self.store.sent_attempt(&lease).await?,
        };
        let next = match sent {
            None => {
                let audit = self.audit();
                self.step(ChargeStep::Begin { lease, audit }, member)
                    .await?
            }
            Some(sent) => {
                let lookup = self.look_up(&sent.reference).await;
                tracing::info!(lookup = ?lookup, "looked up an attempt whose outcome was unknown");
                self.store
                    .record_lookup(
                        &lease,
                        &lookup.answer(),
                        Settler::Daemon,
                        &self.policy,
                        &self.audit(),
                    )
                    .await?
            }
        };
        match self.drive(lease, member, next).await? {
            Next::Moved(state) => {
                metrics::counter!(crate::metrics::PAYMENTS, "outcome" => state.as_str())
                    .increment(1);
                if state == crate::domain::payment::PaymentState::NeedsReview {
                    tracing::error!(payment_id = %lease.payment_id, "a payment needs an operator's review; see `autopay payment show` and docs/engine.md");
                } else {
                    tracing::info!(state = %state, "recorded");
                }
                Ok(Done::Moved(state))
            }
            Next::Released => {
                tracing::info!("charging is paused; payment released");
                Ok(Done::Released)
            }
            Next::LeaseLost => {
                tracing::warn!(
                    "lease taken over before the outcome was recorded; the new holder settles it"
                );
                Ok(Done::LeaseLost)
            }
            other => Err(EngineError::Store(crate::store::StoreError::Internal(
                format!("a worker's attempt ended in {other:?}"),
            ))),
        }
    }

    /// The pipeline's slots: `daemon.concurrency`, but no more than the rate limit serves in
    /// half of `processor.timeout`. A request's wait for the rate limit counts against its
    /// timeout, and every slot beyond that would only wait in line until it timed out.
    fn slots(&self) -> usize {
        let servable = f64::from(self.config.max_requests_per_second)
            * self.config.processor_timeout.as_secs_f64()
            / 2.0;
        let servable = servable.floor().clamp(1.0, f64::from(u32::MAX)) as u32;
        self.config.concurrency.clamp(1, servable) as usize
    }

    /// Writes one attempt step through the group commit, and returns once it is committed.
    async fn step(&self, step: ChargeStep, member: MemberId) -> Result<Next, EngineError> {
        Ok(self
            .committer
            .write(self.store.as_ref(), &self.policy, step, member)
            .await?)
    }

    /// Asks the processor about one attempt, within `processor.timeout` (the rate limit
    /// included).
    pub(crate) async fn look_up(&self, attempt: &AttemptRef) -> Lookup {
        let call = async {
            self.limiter.acquire().await;
            self.processor.find_attempt(attempt).await
        };
        tokio::time::timeout(self.config.processor_timeout, call)
            .await
            .unwrap_or_else(|_| Lookup::Unknown {
                detail: format!(
                    "the lookup got no answer within processor.timeout ({:?})",
                    self.config.processor_timeout
                ),
            })
    }

    /// Writes one request within `budget` (the rate limit included).
    async fn send(&self, request: &ChargeRequest, budget: Duration) -> ChargeOutcome {
        let started = Instant::now();
        let call = async {
            self.limiter.acquire().await;
            metrics::histogram!(crate::metrics::RATE_LIMIT_WAIT)
                .record(started.elapsed().as_secs_f64());
            self.processor.charge(request).await
        };
        let outcome = match tokio::time::timeout(budget, call).await {
            Ok(outcome) => outcome,
            Err(_) => ChargeOutcome::Unknown {
                detail: format!(
                    "no answer within processor.timeout ({:?})",
                    self.config.processor_timeout
                ),
                replayed: false,
            },
        };
        metrics::histogram!(crate::metrics::CHARGE_SECONDS).record(started.elapsed().as_secs_f64());
        match &outcome {
            ChargeOutcome::Unknown { .. } => {
                metrics::counter!(crate::metrics::PROCESSOR_ERRORS, "kind" => "unknown")
                    .increment(1)
            }
            ChargeOutcome::Busy { .. } => {
                metrics::counter!(crate::metrics::PROCESSOR_ERRORS, "kind" => "busy").increment(1)
            }
            ChargeOutcome::IdempotencyMismatch { .. } => {
                metrics::counter!(crate::metrics::PROCESSOR_ERRORS, "kind" => "mismatch")
                    .increment(1)
            }
            ChargeOutcome::Declined { signal, .. } => {
                let class = crate::domain::decline::classify(signal).action;
                metrics::counter!(crate::metrics::DECLINES, "class" => class.as_str()).increment(1);
            }
            ChargeOutcome::Refused { .. } => {
                metrics::counter!(crate::metrics::PROCESSOR_ERRORS, "kind" => "refused")
                    .increment(1)
            }
            ChargeOutcome::Approved { .. } => {}
        }
        outcome
    }

    /// Carries an attempt on from `next` until it rests: sends what the store stored, records
    /// each answer, waits and resends while the processor is busy (within `processor.timeout`
    /// from the first busy answer).
    pub(crate) async fn drive(
        &self,
        lease: Lease,
        member: MemberId,
        mut next: Next,
    ) -> Result<Next, EngineError> {
        let mut busy: Option<(Instant, Duration)> = None;
        loop {
            next = match next {
                Next::Send { request, call } => {
                    let budget = busy.map_or(self.config.processor_timeout, |(deadline, _)| {
                        deadline.saturating_duration_since(Instant::now())
                    });
                    let outcome = self.send(&request, budget).await;
                    if self.crash_hook.as_ref().is_some_and(|crash| crash()) {
                        return Err(EngineError::InjectedCrash);
                    }
                    let answer = outcome.answer();
                    if matches!(answer, Answer::Busy { .. }) && busy.is_none() {
                        busy = Some((
                            Instant::now() + self.config.processor_timeout,
                            FIRST_BUSY_WAIT,
                        ));
                    }
                    // A processor that names its wait (Retry-After) gets at least that.
                    if let (
                        ChargeOutcome::Busy {
                            retry_after: Some(wait),
                            ..
                        },
                        Some((deadline, next)),
                    ) = (&outcome, busy)
                    {
                        busy = Some((deadline, next.max(*wait)));
                    }
                    if let ChargeOutcome::Refused { detail } = &outcome {
                        tracing::error!(detail = %detail, "the processor refused autopay's credentials; charging pauses until `autopay charging resume`");
                    }
                    self.step(
                        ChargeStep::Record {
                            lease,
                            call: Some(call),
                            answer,
                            audit: self.audit(),
                        },
                        member,
                    )
                    .await?
                }
                Next::WaitAndResend => {
                    let (deadline, wait) = busy.unwrap_or((
                        Instant::now() + self.config.processor_timeout,
                        FIRST_BUSY_WAIT,
                    ));
                    if Instant::now() + wait >= deadline {
                        let answer = Answer::Unknown {
                            detail:
                                "the processor stayed busy for processor.timeout; settled by lookup"
                                    .into(),
                            replayed: false,
                        };
                        self.step(
                            ChargeStep::Record {
                                lease,
                                call: None,
                                answer,
                                audit: self.audit(),
                            },
                            member,
                        )
                        .await?
                    } else {
                        tokio::time::sleep(wait).await;
                        busy = Some((deadline, (wait * 2).min(MAX_BUSY_WAIT)));
                        self.store
                            .begin_resend(&lease, Settler::Daemon, &self.policy, &self.audit())
                            .await?
                    }
                }
                rest => return Ok(rest),
            };
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
                "circuit breaker: {:.0}% of {} requests declined in the last {:?}",
                declines * 100.0,
                stats.attempts,
                self.config.breaker_window
            )
        } else if errors > self.config.breaker_error_share {
            format!(
                "circuit breaker: {:.0}% of {} requests ended with a processor error in the last {:?}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_look_for_attempts_to_settle_once_a_second_not_at_every_claim() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut cadence = SettleCadence::default();
        // The pipeline's first claim looks; the claims in the next second do not.
        assert!(cadence.look(at(0)));
        cadence.found(true, false);
        for ms in [1, 10, 500, 999] {
            assert!(!cadence.look(at(ms)), "a claim {ms} ms after a look");
            cadence.found(false, false);
        }
        // A second on, one claim looks again.
        assert!(cadence.look(at(1_000)));
        cadence.found(true, false);
        assert!(!cadence.look(at(1_001)));
    }

    #[test]
    fn a_look_that_found_a_full_batch_looks_again_at_the_next_claim() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut cadence = SettleCadence::default();
        assert!(cadence.look(at(0)));
        cadence.found(true, true);
        assert!(cadence.look(at(5)), "more may be waiting");
        cadence.found(true, false);
        assert!(!cadence.look(at(10)));
    }
}
