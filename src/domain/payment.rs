//! Payments: the state machine of design.md, and the amount rule a schedule charges.
//!
//! ```text
//! scheduled --claim--> processing --approved--> succeeded
//!                          |--soft decline, tries left--> retry_wait
//!                          |--hard decline / no tries---> failed
//!                          |--outcome unknown-----------> unknown
//!                          '--nothing owed--------------> skipped
//! retry_wait --due--> processing
//! unknown --charged--> succeeded | --not charged--> scheduled | --past the window--> needs_review
//! scheduled | retry_wait --schedule paused, suspended or cancelled; card gone; member closed--> cancelled
//! failed | missed | needs_review --operator retry--> scheduled
//! unknown | needs_review --operator resolve--> succeeded | failed | cancelled
//! ```

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
    Claim,
    Approved,
    SoftDecline,
    HardDecline,
    OutcomeUnknown,
    NothingOwed,
    RetryDue,
    LookupCharged,
    LookupNotCharged,
    LookupExpired,
    /// The schedule was paused, suspended or cancelled, its card removed or disabled, or the
    /// member closed.
    Cancel,
    OperatorRetry,
    OperatorResolve(Resolution),
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

    /// States whose payment no worker holds: a schedule change may re-plan or cancel them.
    pub fn is_unclaimed(self) -> bool {
        matches!(self, PaymentState::Scheduled | PaymentState::RetryWait)
    }

    /// The state `transition` leads to, or `None` when the machine does not allow it. An
    /// `unknown` payment is never cancelled: it is settled first, so a charge that happened is
    /// never forgotten.
    pub fn next(self, transition: Transition) -> Option<PaymentState> {
        use PaymentState as S;
        use Transition as T;
        Some(match (self, transition) {
            (S::Scheduled | S::RetryWait, T::Claim | T::RetryDue) => S::Processing,
            (S::Processing, T::Approved) => S::Succeeded,
            (S::Processing, T::SoftDecline) => S::RetryWait,
            (S::Processing, T::HardDecline) => S::Failed,
            (S::Processing, T::OutcomeUnknown) => S::Unknown,
            (S::Processing, T::NothingOwed) => S::Skipped,
            (S::Unknown, T::LookupCharged) => S::Succeeded,
            (S::Unknown, T::LookupNotCharged) => S::Scheduled,
            (S::Unknown, T::LookupExpired) => S::NeedsReview,
            (S::Scheduled | S::RetryWait, T::Cancel) => S::Cancelled,
            (S::Failed | S::Missed | S::NeedsReview, T::OperatorRetry) => S::Scheduled,
            (S::Unknown | S::NeedsReview, T::OperatorResolve(r)) => match r {
                Resolution::Succeeded => S::Succeeded,
                Resolution::Failed => S::Failed,
                Resolution::Cancelled => S::Cancelled,
            },
            _ => return None,
        })
    }
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
    fn an_unknown_payment_is_settled_never_cancelled() {
        assert_eq!(S::Unknown.next(T::Cancel), None);
        assert_eq!(S::Unknown.next(T::LookupCharged), Some(S::Succeeded));
        assert_eq!(S::Unknown.next(T::LookupNotCharged), Some(S::Scheduled));
        assert_eq!(S::Unknown.next(T::LookupExpired), Some(S::NeedsReview));
    }

    #[test]
    fn only_unclaimed_payments_are_cancelled_by_schedule_changes() {
        for s in S::ALL {
            let cancelled = s.next(T::Cancel) == Some(S::Cancelled);
            assert_eq!(cancelled, s.is_unclaimed(), "{s}");
        }
    }

    #[test]
    fn terminal_states_move_only_by_an_operator() {
        let automatic = [
            T::Claim,
            T::Approved,
            T::SoftDecline,
            T::HardDecline,
            T::OutcomeUnknown,
            T::NothingOwed,
            T::RetryDue,
            T::LookupCharged,
            T::LookupNotCharged,
            T::LookupExpired,
            T::Cancel,
        ];
        for s in S::ALL.iter().filter(|s| s.is_terminal()) {
            for t in automatic {
                assert_eq!(s.next(t), None, "{s} must not move on {t:?}");
            }
        }
        assert_eq!(S::Failed.next(T::OperatorRetry), Some(S::Scheduled));
        assert_eq!(S::Succeeded.next(T::OperatorRetry), None);
    }
}
