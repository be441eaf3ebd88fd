//! Payments: the state machine (docs/architecture.md), and the amount rule a schedule charges.
//!
//! ```text
//! scheduled --claim--> processing --approved--> succeeded
//!                          |--soft decline, tries left--> retry_wait
//!                          |--hard decline / no tries / over the limit--> failed
//!                          |--outcome unknown-----------> unknown
//!                          |--nothing owed--------------> skipped
//!                          |--card gone, member closed, schedule stopped--> cancelled
//!                          |--paused before the request was written--> scheduled
//!                          '--operator needed-----------> needs_review
//! retry_wait --due--> processing
//! unknown --claimed to settle (same attempt, same key)--> processing
//! processing --lease expired, claimed again to settle--> processing
//! scheduled | retry_wait --too late, or coalesced--> missed
//! scheduled | retry_wait --schedule paused, suspended or cancelled; card gone; member closed--> cancelled
//! failed | missed | needs_review --operator retry (new attempt)--> scheduled
//! needs_review --operator retry inside the key window (same key)--> processing
//! unknown | needs_review | processing (operator's lease) --operator resolve--> succeeded | failed | cancelled
//! ```
//!
//! Every state a store writes comes from [`PaymentState::next`]: a move the machine does not
//! allow is an error, never a silent write.

use serde::Serialize;

use super::money::Money;
use super::spelled_enum;

spelled_enum! {
    /// Where one occurrence of a schedule stands.
    pub enum PaymentState ("payment state") {
        Scheduled => "scheduled",
        Processing => "processing",
        RetryWait => "retry_wait",
        Unknown => "unknown",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
        Cancelled => "cancelled",
        NeedsReview => "needs_review",
        Missed => "missed",
    }
}

/// Why a payment moves from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A worker claims a due payment to charge it.
    Claim,
    /// Charging was paused after the claim, before any request was written.
    Release,
    Approved,
    SoftDecline,
    /// A hard decline, a soft one with no tries left, an amount over the limit, a card that
    /// reached its attempt limit.
    HardDecline,
    OutcomeUnknown,
    NothingOwed,
    /// A worker claims an attempt that was (or may have been) sent, to settle it: by lookup,
    /// or by resending the same request with the same key. Never a new key.
    Settle,
    /// Only an operator can decide: a key the processor refused, no answer within the lookup
    /// window or after the resends allowed, or no record after the key window.
    Review,
    /// Not charged: older than `payments.max_lateness` when claimed, or coalesced into a later
    /// occurrence.
    Late,
    /// The schedule was paused, suspended or cancelled, its card removed or disabled, or the
    /// member closed (only before any request was written).
    Cancel,
    /// An operator starts a new attempt with a new key.
    OperatorRetry,
    /// An operator takes a payment for review: to resend the same key inside its window, or to
    /// resolve it after asking the processor.
    OperatorTake,
    OperatorResolve(Resolution),
    /// `autopay reconcile` records an attempt the processor made that a restored database did
    /// not know: an approval ends the payment; a decline leaves it to an operator, since the
    /// retry plan that followed it was lost with the newer database.
    Reconciled {
        approved: bool,
    },
}

/// What an operator decides after asking the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Succeeded,
    Failed,
    Cancelled,
}

impl PaymentState {
    /// States nothing moves out of by itself (an operator may still retry `failed` or `missed`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PaymentState::Succeeded
                | PaymentState::Failed
                | PaymentState::Skipped
                | PaymentState::Cancelled
                | PaymentState::Missed
        )
    }

    /// States whose payment no worker holds and whose current attempt was never sent: a schedule
    /// change may re-plan or cancel them.
    pub fn is_unclaimed(self) -> bool {
        matches!(self, PaymentState::Scheduled | PaymentState::RetryWait)
    }

    /// States that keep their amount and credit reserved: an attempt that may have charged is
    /// settled before anything it holds is spent again.
    pub fn reserves(self) -> bool {
        matches!(
            self,
            PaymentState::Processing | PaymentState::Unknown | PaymentState::NeedsReview
        )
    }

    /// The state `transition` leads to, or `None` when the machine does not allow it. An
    /// `unknown` payment is never cancelled: it is settled first, so a charge that happened is
    /// never forgotten.
    pub fn next(self, transition: Transition) -> Option<PaymentState> {
        use PaymentState as S;
        use Transition as T;
        Some(match (self, transition) {
            (S::Scheduled | S::RetryWait, T::Claim) => S::Processing,
            (S::Processing, T::Release) => S::Scheduled,
            (S::Processing, T::Approved) => S::Succeeded,
            (S::Processing, T::SoftDecline) => S::RetryWait,
            (S::Processing, T::HardDecline) => S::Failed,
            (S::Processing, T::OutcomeUnknown) => S::Unknown,
            (S::Processing, T::NothingOwed) => S::Skipped,
            (S::Processing, T::Review) => S::NeedsReview,
            (S::Processing, T::Cancel) => S::Cancelled,
            (S::Unknown | S::Processing, T::Settle) => S::Processing,
            (S::Scheduled | S::RetryWait, T::Late) => S::Missed,
            (S::Scheduled | S::RetryWait, T::Cancel) => S::Cancelled,
            (S::Failed | S::Missed | S::NeedsReview, T::OperatorRetry) => S::Scheduled,
            (S::Unknown | S::NeedsReview, T::OperatorTake) => S::Processing,
            (S::Unknown | S::NeedsReview | S::Processing, T::OperatorResolve(r)) => match r {
                Resolution::Succeeded => S::Succeeded,
                Resolution::Failed => S::Failed,
                Resolution::Cancelled => S::Cancelled,
            },
            (
                S::Scheduled | S::RetryWait | S::Processing | S::Unknown | S::NeedsReview,
                T::Reconciled { approved },
            ) => {
                if approved {
                    S::Succeeded
                } else {
                    S::NeedsReview
                }
            }
            _ => return None,
        })
    }
}

/// A move the state machine does not allow: a bug, or a row changed outside autopay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a payment in state {from} cannot move by {transition:?}")]
pub struct NotAllowed {
    pub from: PaymentState,
    pub transition: Transition,
}

/// [`PaymentState::next`], as a `Result`.
pub fn moved(from: PaymentState, transition: Transition) -> Result<PaymentState, NotAllowed> {
    from.next(transition).ok_or(NotAllowed { from, transition })
}

/// How much a schedule charges at each occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum AmountRule {
    /// The same amount every time (less any credit).
    Fixed {
        #[serde(serialize_with = "amount_string")]
        amount: Money,
    },
    /// Every unpaid bill, whatever its due date, at the moment of the attempt.
    Balance,
}

fn amount_string<S: serde::Serializer>(m: &Money, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(m)
}

impl AmountRule {
    /// The word stored in the database's `amount_rule` column.
    pub fn kind(&self) -> &'static str {
        match self {
            AmountRule::Fixed { .. } => "fixed",
            AmountRule::Balance => "balance",
        }
    }

    pub fn fixed_amount(&self) -> Option<Money> {
        match self {
            AmountRule::Fixed { amount } => Some(*amount),
            AmountRule::Balance => None,
        }
    }
}

impl std::fmt::Display for AmountRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmountRule::Fixed { amount } => write!(f, "{}", amount.display_with_code()),
            AmountRule::Balance => f.write_str("statement balance"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PaymentState as S;
    use Transition as T;

    const AUTOMATIC: [Transition; 11] = [
        T::Claim,
        T::Release,
        T::Approved,
        T::SoftDecline,
        T::HardDecline,
        T::OutcomeUnknown,
        T::NothingOwed,
        T::Settle,
        T::Review,
        T::Late,
        T::Cancel,
    ];

    #[test]
    fn every_state_spelling_round_trips() {
        for s in S::ALL {
            assert_eq!(s.as_str().parse::<S>().unwrap(), *s);
        }
        let err = "done".parse::<S>().unwrap_err().to_string();
        assert!(err.contains("needs_review"), "{err}");
    }

    #[test]
    fn the_happy_path_runs_scheduled_processing_succeeded() {
        assert_eq!(S::Scheduled.next(T::Claim), Some(S::Processing));
        assert_eq!(S::Processing.next(T::Approved), Some(S::Succeeded));
    }

    #[test]
    fn an_unknown_payment_is_settled_under_the_same_attempt_never_rescheduled_or_cancelled() {
        assert_eq!(S::Unknown.next(T::Cancel), None);
        assert_eq!(
            S::Unknown.next(T::Claim),
            None,
            "a claim starts a new charge"
        );
        assert_eq!(S::Unknown.next(T::Settle), Some(S::Processing));
        assert_eq!(S::Processing.next(T::Settle), Some(S::Processing));
        for t in AUTOMATIC {
            assert_ne!(
                S::Unknown.next(t),
                Some(S::Scheduled),
                "{t:?} would start a new key"
            );
        }
    }

    #[test]
    fn only_unclaimed_payments_are_cancelled_or_missed_by_schedule_changes_and_lateness() {
        for s in S::ALL.iter().filter(|s| **s != S::Processing) {
            let cancelled = s.next(T::Cancel) == Some(S::Cancelled);
            assert_eq!(cancelled, s.is_unclaimed(), "{s}");
            let missed = s.next(T::Late) == Some(S::Missed);
            assert_eq!(missed, s.is_unclaimed(), "{s}");
        }
    }

    #[test]
    fn an_attempt_that_may_have_charged_keeps_its_reservations_until_settled() {
        for s in S::ALL {
            assert_eq!(
                s.reserves(),
                matches!(s, S::Processing | S::Unknown | S::NeedsReview),
                "{s}"
            );
        }
    }

    #[test]
    fn terminal_states_move_only_by_an_operator() {
        for s in S::ALL.iter().filter(|s| s.is_terminal()) {
            for t in AUTOMATIC {
                assert_eq!(s.next(t), None, "{s} must not move on {t:?}");
            }
        }
        assert_eq!(S::Failed.next(T::OperatorRetry), Some(S::Scheduled));
        assert_eq!(S::Succeeded.next(T::OperatorRetry), None);
    }

    #[test]
    fn needs_review_moves_only_by_an_operator() {
        for t in AUTOMATIC {
            assert_eq!(S::NeedsReview.next(t), None, "{t:?}");
        }
        assert_eq!(S::NeedsReview.next(T::OperatorTake), Some(S::Processing));
        assert_eq!(S::NeedsReview.next(T::OperatorRetry), Some(S::Scheduled));
    }

    #[test]
    fn reconcile_settles_only_payments_not_already_ended() {
        for s in S::ALL {
            let approved = s.next(T::Reconciled { approved: true });
            let declined = s.next(T::Reconciled { approved: false });
            if s.is_terminal() {
                assert_eq!((approved, declined), (None, None), "{s}");
            } else {
                assert_eq!(approved, Some(S::Succeeded), "{s}");
                assert_eq!(declined, Some(S::NeedsReview), "{s}");
            }
        }
    }

    #[test]
    fn a_disallowed_move_is_an_error_naming_it() {
        let err = moved(S::Succeeded, T::Claim).unwrap_err().to_string();
        assert_eq!(err, "a payment in state succeeded cannot move by Claim");
    }
}
