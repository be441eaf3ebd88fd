//! An operator's `payment retry`, which must never charge twice either.
//!
//! A `failed` or `missed` payment goes again with a new key. A `needs_review` payment's last
//! attempt may have charged, so it follows the unknown-outcome rule (domain::attempt): inside
//! the key window the same request is sent again with the same key and its answer decides;
//! after it, a new attempt starts only once a lookup, taken after the key can no longer
//! charge, finds nothing. While the processor cannot answer, nothing changes.

use jiff::Timestamp;

use super::{Engine, EngineError};
use crate::domain::attempt::{OperatorRetry, operator_retry};
use crate::domain::ids::PaymentId;
use crate::domain::payment::PaymentState;
use crate::processor::Lookup;
use crate::store::{Audit, Next, Payment, Settler, StoreError};

/// What an operator's retry came to.
#[derive(Debug, Clone)]
pub enum RetryOutcome {
    /// A new attempt (new key) waits for `autopay run`.
    Scheduled(Box<Payment>),
    /// The resend or the lookup decided the payment: it is in this state now.
    Settled(PaymentState),
    /// Nothing is safe yet; the payment is as it was.
    NotYet {
        until: Option<Timestamp>,
        why: String,
    },
    /// The processor could not answer; the payment is as it was.
    NoAnswer { detail: String },
}

impl Engine {
    /// Retries a payment for an operator (see the module docs).
    pub async fn operator_retry(
        &self,
        payment_id: PaymentId,
        force: bool,
        audit: &Audit,
    ) -> Result<RetryOutcome, EngineError> {
        let current = self.store.payment(payment_id).await?;
        if current.state != PaymentState::NeedsReview {
            let p = self.store.retry_payment(payment_id, force, audit).await?;
            return Ok(RetryOutcome::Scheduled(Box::new(p)));
        }
        let taken = self
            .store
            .take_for_operator(payment_id, self.config.lease, audit)
            .await?;
        let Some(sent) = taken.sent else {
            self.store.give_back(&taken.lease).await?;
            return Err(EngineError::Store(StoreError::Conflict(format!(
                "payment {payment_id} has no sent attempt on record; resolve it with `autopay payment resolve {payment_id} --as failed`, then retry it"
            ))));
        };
        let next = match operator_retry(&sent.attempt, &self.policy.keys, audit.at) {
            OperatorRetry::TooEarly { until } => {
                self.store.give_back(&taken.lease).await?;
                return Ok(RetryOutcome::NotYet {
                    until: Some(until),
                    why: "the last attempt's key may still charge; a new attempt starts only after the processor has forgotten it".into(),
                });
            }
            OperatorRetry::Resend => {
                self.store
                    .begin_resend(&taken.lease, Settler::Operator, &self.policy, audit)
                    .await?
            }
            OperatorRetry::LookUp => {
                let lookup = self.look_up(&sent.reference).await;
                if let Lookup::Unknown { detail } = lookup {
                    self.store.give_back(&taken.lease).await?;
                    return Ok(RetryOutcome::NoAnswer { detail });
                }
                self.store
                    .record_lookup(
                        &taken.lease,
                        &lookup.answer(),
                        Settler::Operator,
                        &self.policy,
                        audit,
                    )
                    .await?
            }
        };
        Ok(match self.drive(taken.lease, taken.payment.member_id, next).await? {
            Next::Moved(PaymentState::Scheduled) => {
                RetryOutcome::Scheduled(Box::new(self.store.payment(payment_id).await?))
            }
            Next::Moved(PaymentState::Unknown | PaymentState::NeedsReview) => {
                RetryOutcome::NoAnswer {
                    detail:
                        "the processor did not answer the resend; the payment is settled by lookup"
                            .into(),
                }
            }
            Next::Moved(state) => RetryOutcome::Settled(state),
            Next::NotYet { until, why } => RetryOutcome::NotYet { until, why },
            other => {
                return Err(EngineError::Store(StoreError::Internal(format!(
                    "an operator's retry ended in {other:?}"
                ))));
            }
        })
    }
}
