//! `POST /webhooks/stripe`: what the daemon does with a Stripe event, once its signature holds.
//!
//! An event is a hint. Its object is read again from Stripe (with the pinned API version), and
//! autopay acts only through the transitions and the lease fence a lookup uses:
//!
//! - `payment_intent.succeeded` / `payment_failed`: an `unknown` payment's lookup is brought
//!   forward to now and the workers woken (the daemon's own lookup settles it, under its lease);
//!   a `needs_review` payment that Stripe shows charged is settled as succeeded, as an
//!   operator's lookup would; a declined one is left to the operator;
//! - `payment_method.automatically_updated`: the card's brand, last four and expiry are
//!   refreshed; a card disabled because it expired comes back, never one disabled as lost,
//!   stolen or revoked;
//! - `charge.refunded`, `charge.dispute.created`: recorded (event, log line, metric, a line in
//!   `status`) without changing a payment or a balance; a dispute for fraud disables the card,
//!   one for a cancelled or unrecognised recurring charge suspends the card's schedules.
//!
//! An event already handled is answered 200 and counted as a duplicate (Stripe delivers again
//! until it sees a 2xx). An event is recorded as handled only once it was acted on, so a
//! failure (5xx) is delivered again; two deliveries of one event at the same moment may both
//! act, which every action above allows (each is a transition that happens once).
//!
//! A succeeded charge the payment does not record as its success (an earlier attempt's, or one
//! after the payment was settled otherwise) is logged as an error and counted
//! (`unrecorded_charge`): a person checks it at Stripe.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::clock::Clock;
use crate::domain::decline::classify_code;
use crate::domain::dispute::{DisputeAction, dispute_action};
use crate::domain::ids::PaymentId;
use crate::domain::payment::PaymentState;
use crate::processor::ProcessorEvent;
use crate::processor::stripe::StripeProcessor;
use crate::store::{Audit, LookupAnswer, OutcomePolicy, Settler, Store, StoreError};

/// Events by outcome (`settled`, `settle_soon`, `review`, `unrecorded_charge`,
/// `card_refreshed`, `refund`, `dispute`, `ignored`, `duplicate`, `refused`).
pub const WEBHOOKS: &str = "autopay_webhooks_total";

/// How long an event about a payment waits for a worker mid-call on it to record the answer.
const CALL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The audit actor of what a webhook does.
const ACTOR: &str = "webhook:stripe";

pub struct Webhooks {
    pub store: Arc<dyn Store>,
    pub processor: Arc<StripeProcessor>,
    pub clock: Arc<dyn Clock>,
    pub policy: OutcomePolicy,
    /// `daemon.lease`, for settling a `needs_review` payment.
    pub lease: std::time::Duration,
    /// Wakes this process's worker.
    pub wake: Arc<Notify>,
}

/// The answer: a status and a short plain-text reason.
pub type Answer = (u16, String);

impl Webhooks {
    pub async fn handle(&self, signature: Option<&str>, body: &[u8]) -> Answer {
        let now = self.clock.now();
        let event = match self.processor.verify_webhook(signature, body, now) {
            Ok(e) => e,
            Err(refusal) => {
                metrics::counter!(WEBHOOKS, "outcome" => "refused").increment(1);
                tracing::warn!(status = refusal.status, reason = %refusal.message, "a Stripe webhook was refused");
                return (refusal.status, refusal.message);
            }
        };
        match self.store.webhook_seen(&event.id).await {
            Ok(true) => {
                metrics::counter!(WEBHOOKS, "outcome" => "duplicate").increment(1);
                return (200, "duplicate: already handled".into());
            }
            Ok(false) => {}
            Err(e) => return store_down(&e),
        }
        let resolved = match self.processor.resolve_webhook(&event).await {
            Ok(r) => r,
            Err(refusal) => {
                tracing::warn!(event_id = %event.id, kind = %event.kind, reason = %refusal.message, "a Stripe webhook could not be read back");
                return (refusal.status, refusal.message);
            }
        };
        let outcome = match self.act(resolved).await {
            Ok(o) => o,
            Err(e) => return store_down(&e),
        };
        metrics::counter!(WEBHOOKS, "outcome" => outcome).increment(1);
        tracing::info!(event_id = %event.id, kind = %event.kind, outcome, "a Stripe webhook was handled");
        match self
            .store
            .record_webhook(&event.id, &event.kind, outcome, now)
            .await
        {
            Ok(_) => (200, outcome.to_string()),
            Err(e) => store_down(&e),
        }
    }

    fn audit(&self) -> Audit {
        Audit {
            actor: ACTOR.into(),
            at: self.clock.now(),
        }
    }

    async fn act(&self, event: ProcessorEvent) -> Result<&'static str, StoreError> {
        match event {
            ProcessorEvent::Ignored { why } => {
                tracing::debug!(why = %why, "webhook ignored");
                Ok("ignored")
            }
            ProcessorEvent::Settled(found) => {
                let Some(payment) = self.after_the_call(found.payment_id).await? else {
                    return Ok("ignored");
                };
                let this_attempt = payment.attempt == found.attempt;
                match payment.state {
                    PaymentState::Unknown if this_attempt => {
                        if self
                            .store
                            .settle_soon(payment.id, payment.attempt, self.clock.now())
                            .await?
                        {
                            self.wake.notify_one();
                        }
                        Ok("settle_soon")
                    }
                    PaymentState::NeedsReview if this_attempt && found.approved => {
                        self.settle_review(&found).await
                    }
                    PaymentState::NeedsReview if this_attempt => {
                        tracing::warn!(payment_id = %payment.id, "Stripe declined a needs_review payment's attempt; an operator decides (`autopay payment retry` or `resolve`)");
                        Ok("ignored")
                    }
                    // Recorded as this very charge: nothing to do.
                    PaymentState::Succeeded
                        if payment.processor_reference.as_deref()
                            == Some(found.reference.as_str()) =>
                    {
                        Ok("ignored")
                    }
                    // Still mid-call after the wait: the worker's own lookup settles it.
                    PaymentState::Processing => Ok("ignored"),
                    // A charge autopay does not hold as this payment's success: an earlier
                    // attempt's, or one made after the payment was settled otherwise. A person
                    // must look (and refund one if the member paid twice).
                    state if found.approved => {
                        tracing::error!(payment_id = %payment.id, state = %state, attempt = found.attempt, reference = %found.reference, "Stripe reports a succeeded charge this payment does not record; check it at Stripe and refund or resolve it");
                        Ok("unrecorded_charge")
                    }
                    _ => Ok("ignored"),
                }
            }
            ProcessorEvent::CardUpdated { token, details } => {
                // A card comes back from an expiry only with an expiry that has not passed.
                let today = self
                    .clock
                    .now()
                    .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                    .date();
                let reenable = details
                    .expiry
                    .check_not_expired(today)
                    .is_ok()
                    .then_some(classify_code("expired_card").member_reason);
                let cards = self
                    .store
                    .refresh_card("stripe", &token, &details, reenable, &self.audit())
                    .await?;
                for c in &cards {
                    tracing::info!(card_id = %c.id, status = %c.status, "card details refreshed by the card networks' updater");
                }
                Ok("card_refreshed")
            }
            ProcessorEvent::Refunded {
                payment_id,
                reference,
                amount,
            } => {
                let detail = serde_json::json!({
                    "reference": reference, "amount_refunded": amount.to_string(),
                    "currency": amount.currency().code(),
                });
                self.record(payment_id, "refunded", &detail, DisputeAction::Record)
                    .await?;
                tracing::warn!(payment_id = %payment_id, "Stripe reports a refund of a payment's charge; no balance changes (use `autopay bill adjust`)");
                Ok("refund")
            }
            ProcessorEvent::Disputed {
                payment_id,
                reference,
                reason,
            } => {
                let action = dispute_action(&reason);
                let detail = serde_json::json!({
                    "reference": reference, "reason": reason, "action": action.as_str(),
                });
                self.record(payment_id, "disputed", &detail, action).await?;
                tracing::warn!(payment_id = %payment_id, reason = %reason, action = %action, "Stripe reports a dispute of a payment's charge; no balance changes");
                Ok("dispute")
            }
        }
    }

    /// Settles a `needs_review` payment that Stripe shows charged, as an operator's lookup
    /// would: only when the payment taken is still that attempt, under review, for that amount
    /// (a review for other parameters under the key stays with the operator).
    async fn settle_review(
        &self,
        found: &crate::processor::ProcessorAttempt,
    ) -> Result<&'static str, StoreError> {
        let taken = match self
            .store
            .take_for_operator(found.payment_id, self.lease, &self.audit())
            .await
        {
            Ok(t) => t,
            // Someone holds it now; their lookup finds the same charge.
            Err(StoreError::Unavailable(_) | StoreError::Conflict(_)) => return Ok("ignored"),
            Err(e) => return Err(e),
        };
        let same = taken.payment.state == PaymentState::NeedsReview
            && taken.payment.attempt == found.attempt
            && taken.payment.amount == Some(found.amount)
            && taken
                .sent
                .as_ref()
                .is_some_and(|s| s.reference.idempotency_key == found.idempotency_key);
        if !same {
            self.store.give_back(&taken.lease).await?;
            tracing::error!(payment_id = %found.payment_id, reference = %found.reference, "Stripe charged a needs_review payment's attempt with other parameters than autopay holds; an operator decides");
            return Ok("review");
        }
        let answer = LookupAnswer::Found {
            approved: true,
            reference: found.reference.clone(),
            decline: None,
        };
        self.store
            .record_lookup(
                &taken.lease,
                &answer,
                Settler::Operator,
                &self.policy,
                &self.audit(),
            )
            .await?;
        tracing::info!(payment_id = %found.payment_id, "a needs_review payment was settled as succeeded: Stripe charged it");
        Ok("settled")
    }

    /// The payment, once no worker is mid-call on it: Stripe sends an event as soon as it has
    /// charged, often before the worker has recorded the answer (or its loss). Waits up to
    /// [`CALL_WAIT`] for that; `None` for a payment this database does not hold.
    async fn after_the_call(
        &self,
        payment_id: PaymentId,
    ) -> Result<Option<crate::store::Payment>, StoreError> {
        let deadline = tokio::time::Instant::now() + CALL_WAIT;
        loop {
            let payment = match self.store.payment(payment_id).await {
                Ok(p) => p,
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            if payment.state != PaymentState::Processing || tokio::time::Instant::now() >= deadline
            {
                return Ok(Some(payment));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    async fn record(
        &self,
        payment_id: PaymentId,
        what: &str,
        detail: &serde_json::Value,
        action: DisputeAction,
    ) -> Result<(), StoreError> {
        match self
            .store
            .record_processor_event(payment_id, what, detail, action, &self.audit())
            .await
        {
            // A charge autopay made for a payment another database holds: nothing here.
            Err(StoreError::NotFound(_)) => Ok(()),
            other => other,
        }
    }
}

fn store_down(e: &StoreError) -> Answer {
    tracing::error!(error = %e, "a Stripe webhook could not be recorded; Stripe delivers it again");
    (
        503,
        "the database could not be reached; deliver again later".into(),
    )
}
