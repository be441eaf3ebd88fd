//! Reconciling a database restored from a backup with the processor's own history.
//!
//! A restored database forgets every charge made after its backup was taken; charging from it
//! again would charge those members twice once the processor has forgotten the keys. So a
//! restored database is marked (`autopay backup` marks its copy, `autopay restore-mark` marks
//! a database restored by other means), and `autopay run` also compares the processor's recent
//! attempts with its own at start. `autopay reconcile` then reads every attempt the processor
//! made for this installation since the backup and decides, per attempt, what the database must
//! learn ([`decide`]). Charges that fit no payment become findings that an operator settles by
//! hand (usually a refund) and acknowledges.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use uuid::Uuid;

use super::attempt::ProcessorAttempt;
use super::payment::{PaymentState, Transition};
use super::spelled_enum;

/// The installation an idempotency key names, when it is one of autopay's keys
/// (`autopay:{installation}:...`).
pub fn key_installation(key: &str) -> Option<Uuid> {
    let rest = key.strip_prefix("autopay:")?;
    let (installation, _) = rest.split_once(':')?;
    Uuid::parse_str(installation).ok()
}

/// The attempts among `found` that this installation made: another installation sharing the
/// processor account is none of this database's business.
pub fn ours(found: Vec<ProcessorAttempt>, installation: Uuid) -> Vec<ProcessorAttempt> {
    found
        .into_iter()
        .filter(|a| key_installation(&a.idempotency_key) == Some(installation))
        .collect()
}

/// The earliest moment a restored database may have missed an attempt, and so the default and
/// the latest `--since` of `autopay reconcile`: the backup's time, less the processor's key
/// retention (an attempt the backup shows unsent may have been resent under its key until then)
/// and the lease (a worker may have held it that much longer).
pub fn latest_since(backup_at: Timestamp, key_retention: Duration, lease: Duration) -> Timestamp {
    let back = SignedDuration::try_from(key_retention.saturating_add(lease))
        .unwrap_or(SignedDuration::MAX);
    backup_at.checked_sub(back).unwrap_or(Timestamp::MIN)
}

/// A `--since` later than [`latest_since`] would skip attempts the backup may not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--since {requested} is later than {latest}, the backup's time less processor.key_retention and daemon.lease; attempts after that may be unknown to this database, so give a date on or before {latest}, or leave --since out"
)]
pub struct SinceTooLate {
    pub requested: Timestamp,
    pub latest: Timestamp,
}

/// The window `reconcile` reads: `requested` if given and early enough, else the latest.
pub fn since(requested: Option<Timestamp>, latest: Timestamp) -> Result<Timestamp, SinceTooLate> {
    match requested {
        Some(t) if t > latest => Err(SinceTooLate {
            requested: t,
            latest,
        }),
        Some(t) => Ok(t),
        None => Ok(latest),
    }
}

/// The charges the processor made that the database knows neither as an attempt nor as a
/// finding: any one of them means the database is older than the processor's history, and
/// would charge again. (A decline it does not know moved no money.)
pub fn unknown_to_us<'a>(
    found: &'a [ProcessorAttempt],
    known: &std::collections::HashSet<String>,
) -> Vec<&'a ProcessorAttempt> {
    found
        .iter()
        .filter(|a| a.approved && !known.contains(&a.idempotency_key))
        .collect()
}

/// Where the start check reads the processor's history from: the key retention, or further
/// back to just before the newest attempt the database knows, so that a restore is caught
/// however long ago its last charge was.
pub fn check_since(
    now: Timestamp,
    newest_attempt: Option<Timestamp>,
    key_retention: Duration,
    lease: Duration,
) -> Timestamp {
    let retention = SignedDuration::try_from(key_retention).unwrap_or(SignedDuration::MAX);
    let from_now = now.checked_sub(retention).unwrap_or(Timestamp::MIN);
    let lease = SignedDuration::try_from(lease).unwrap_or(SignedDuration::MAX);
    match newest_attempt {
        Some(t) => from_now.min(t.checked_sub(lease).unwrap_or(Timestamp::MIN)),
        None => from_now,
    }
}

/// What the database holds for the payment an attempt belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurPayment {
    pub state: PaymentState,
    /// The payment's current attempt number.
    pub attempt: i64,
    /// The confirmation recorded when it succeeded.
    pub reference: Option<String>,
    /// The outcome our attempt row under the same key records, if there is one.
    pub recorded: Option<Recorded>,
    /// Whether the payment's current attempt was sent and has no final answer: it may still
    /// charge.
    pub current_in_flight: bool,
}

/// An outcome the database recorded for an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Approved,
    Declined,
    /// Sent, with no final answer (or settled as not charged).
    Open,
}

spelled_enum! {
    /// Why a charge at the processor fits no payment and needs a person.
    pub enum FindingKind ("finding kind") {
        /// No payment of this database is for its schedule and occurrence.
        NoPayment => "no_payment",
        /// The payment succeeded under another confirmation: the member was charged twice.
        SecondCharge => "second_charge",
        /// The payment ended without a charge (failed, skipped, cancelled or missed).
        EndedPayment => "ended_payment",
        /// Another attempt of the payment is in flight or awaiting review.
        OtherAttemptOpen => "other_attempt_open",
    }
}

impl FindingKind {
    /// What the operator reads in `status` and `reconcile`.
    pub fn explain(self) -> &'static str {
        match self {
            FindingKind::NoPayment => {
                "the processor charged an occurrence this database has no payment for; refund it at the processor or record it, then acknowledge"
            }
            FindingKind::SecondCharge => {
                "the payment already succeeded under another confirmation, so the member was charged twice; refund one charge at the processor, then acknowledge"
            }
            FindingKind::EndedPayment => {
                "the payment ended without a charge here, but the processor charged it; refund it, or resolve the payment by hand, then acknowledge"
            }
            FindingKind::OtherAttemptOpen => {
                "another attempt of this payment is in flight or in review; settle that one first (payment show), then acknowledge"
            }
        }
    }
}

/// What the database must learn from one attempt the processor made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The database already records it.
    Known,
    /// A decline that fits no payment: no money moved, nothing to do.
    Ignore,
    /// Record the attempt onto the payment, which moves to `moves_to` (or stays, when `None`:
    /// the payment has gone past that attempt and only the history row is missing).
    Record { moves_to: Option<PaymentState> },
    /// Money moved that the database cannot place: a person decides.
    Finding(FindingKind),
}

/// The one rule of reconciling: what to do with `found`, given the payment of its schedule and
/// occurrence in this database (`None` when there is none). An approval always ends up either
/// recorded as the payment's success or in front of a person: it is never dropped and never
/// allowed to be charged again.
pub fn decide(found: &ProcessorAttempt, ours: Option<&OurPayment>) -> Decision {
    let Some(p) = ours else {
        return if found.approved {
            Decision::Finding(FindingKind::NoPayment)
        } else {
            Decision::Ignore
        };
    };
    match (p.recorded, found.approved) {
        (Some(Recorded::Approved), true) | (Some(Recorded::Declined), false) => {
            return Decision::Known;
        }
        // The database recorded money that the processor says never moved: the processor is
        // the truth about money, but a recorded success is never undone by a machine.
        (Some(Recorded::Approved), false) => return Decision::Known,
        _ => {}
    }
    if found.approved {
        if p.state == PaymentState::Succeeded {
            return if p.reference.as_deref() == Some(found.reference.as_str()) {
                Decision::Known
            } else {
                Decision::Finding(FindingKind::SecondCharge)
            };
        }
        if p.state.is_terminal() {
            return Decision::Finding(FindingKind::EndedPayment);
        }
        // An older attempt approved while a newer one may still charge: two charges are
        // possible, and only a person can tell.
        if found.attempt < p.attempt && p.current_in_flight {
            return Decision::Finding(FindingKind::OtherAttemptOpen);
        }
        Decision::Record {
            moves_to: p.state.next(Transition::Reconciled { approved: true }),
        }
    } else {
        // A decline at or past the payment's own attempt was the last word on it; an older
        // one only fills in the history.
        let current = found.attempt >= p.attempt;
        Decision::Record {
            moves_to: current
                .then(|| p.state.next(Transition::Reconciled { approved: false }))
                .flatten(),
        }
    }
}

/// What one `reconcile` run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    /// The database carries no mark and the processor knows no charge it does not: nothing
    /// was read or changed.
    pub nothing_to_do: bool,
    pub since: Option<Timestamp>,
    /// Attempts of this installation the processor listed.
    pub listed: u64,
    pub known: u64,
    /// Attempts recorded onto their payments.
    pub recorded: u64,
    /// Of those, payments that became `succeeded`.
    pub succeeded: u64,
    /// Of those, payments that became `needs_review` after a decline.
    pub needs_review: u64,
    /// Occurrences planned so that an attempt could be recorded onto them.
    pub planned: u64,
    /// Declines that fit no payment.
    pub ignored: u64,
    /// Charges listed as findings (by this run, or still listed from an earlier one).
    pub findings: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{PaymentId, ScheduleId};
    use crate::domain::money::{Currency, Money};
    use PaymentState as S;

    fn installation() -> Uuid {
        Uuid::from_u128(7)
    }

    fn found(attempt: i64, approved: bool) -> ProcessorAttempt {
        ProcessorAttempt {
            idempotency_key: crate::domain::attempt::idempotency_key(
                installation(),
                ScheduleId::from_uuid(Uuid::from_u128(2)),
                "R2026-12-01",
                attempt,
            ),
            reference: format!("ch_{attempt}"),
            payment_id: PaymentId::from_uuid(Uuid::from_u128(3)),
            schedule_id: ScheduleId::from_uuid(Uuid::from_u128(2)),
            occurrence: "R2026-12-01".into(),
            attempt,
            amount: Money::from_minor(12_500, Currency::USD),
            approved,
            decline: (!approved)
                .then(|| crate::domain::decline::DeclineSignal::code("insufficient_funds")),
            created_at: "2026-12-01T14:00:00Z".parse().unwrap(),
        }
    }

    fn payment(state: PaymentState, attempt: i64) -> OurPayment {
        OurPayment {
            state,
            attempt,
            reference: None,
            recorded: None,
            current_in_flight: state.reserves(),
        }
    }

    #[test]
    fn keys_name_their_installation_and_others_are_left_out() {
        let mine = found(1, true);
        let mut theirs = found(1, true);
        theirs.idempotency_key = crate::domain::attempt::idempotency_key(
            Uuid::from_u128(8),
            ScheduleId::from_uuid(Uuid::nil()),
            "x",
            1,
        );
        let mut foreign = found(1, true);
        foreign.idempotency_key = "order-42".into();
        assert_eq!(
            key_installation(&mine.idempotency_key),
            Some(installation())
        );
        assert_eq!(key_installation("autopay:not-a-uuid:x"), None);
        assert_eq!(
            ours(vec![mine.clone(), theirs, foreign], installation()),
            vec![mine]
        );
    }

    #[test]
    fn the_window_reaches_back_by_the_key_retention_and_the_lease_and_no_later() {
        let backup: Timestamp = "2026-12-02T12:00:00Z".parse().unwrap();
        let latest = latest_since(
            backup,
            Duration::from_secs(24 * 3600),
            Duration::from_secs(300),
        );
        assert_eq!(latest, "2026-12-01T11:55:00Z".parse().unwrap());
        assert_eq!(since(None, latest), Ok(latest));
        let earlier: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
        assert_eq!(since(Some(earlier), latest), Ok(earlier));
        let err = since(Some(backup), latest).unwrap_err();
        assert!(
            err.to_string()
                .contains("on or before 2026-12-01T11:55:00Z")
        );
    }

    #[test]
    fn an_approval_on_an_open_payment_makes_it_succeed() {
        for state in [
            S::Scheduled,
            S::RetryWait,
            S::Processing,
            S::Unknown,
            S::NeedsReview,
        ] {
            assert_eq!(
                decide(&found(1, true), Some(&payment(state, 1))),
                Decision::Record {
                    moves_to: Some(S::Succeeded)
                },
                "{state}"
            );
        }
        // A payment waiting to retry has not sent its next attempt: the approval of a later
        // one (lost with the newer database) ends it too.
        assert_eq!(
            decide(&found(3, true), Some(&payment(S::RetryWait, 2))),
            Decision::Record {
                moves_to: Some(S::Succeeded)
            }
        );
    }

    #[test]
    fn an_approval_that_fits_no_open_payment_is_a_finding_never_dropped() {
        assert_eq!(
            decide(&found(1, true), None),
            Decision::Finding(FindingKind::NoPayment)
        );
        let mut done = payment(S::Succeeded, 1);
        done.reference = Some("ch_other".into());
        assert_eq!(
            decide(&found(1, true), Some(&done)),
            Decision::Finding(FindingKind::SecondCharge)
        );
        for ended in [S::Failed, S::Skipped, S::Cancelled, S::Missed] {
            assert_eq!(
                decide(&found(1, true), Some(&payment(ended, 1))),
                Decision::Finding(FindingKind::EndedPayment),
                "{ended}"
            );
        }
        assert_eq!(
            decide(&found(1, true), Some(&payment(S::Unknown, 2))),
            Decision::Finding(FindingKind::OtherAttemptOpen)
        );
    }

    #[test]
    fn a_decline_then_an_approved_retry_ends_in_success_not_a_finding() {
        // The decline of attempt 1 was recorded first: the payment waits for review at
        // attempt 1, whose answer is known.
        let mut reviewed = payment(S::NeedsReview, 1);
        reviewed.current_in_flight = false;
        assert_eq!(
            decide(&found(2, true), Some(&reviewed)),
            Decision::Record {
                moves_to: Some(S::Succeeded)
            }
        );
        // A backup taken while attempt 1 was in flight, which the processor never got: the
        // approval of attempt 2 ends the payment, and nothing sends attempt 1 again.
        assert_eq!(
            decide(&found(2, true), Some(&payment(S::Processing, 1))),
            Decision::Record {
                moves_to: Some(S::Succeeded)
            }
        );
    }

    #[test]
    fn only_unknown_approvals_betray_a_restore_and_the_check_reaches_back_to_the_last_attempt() {
        let declined = found(1, false);
        let approved = found(2, true);
        let all = [declined, approved.clone()];
        let known = std::collections::HashSet::new();
        assert_eq!(unknown_to_us(&all, &known), vec![&approved]);
        let now: Timestamp = "2026-12-10T00:00:00Z".parse().unwrap();
        let day = Duration::from_secs(24 * 3600);
        let lease = Duration::from_secs(300);
        assert_eq!(
            check_since(now, None, day, lease),
            "2026-12-09T00:00:00Z".parse().unwrap()
        );
        assert_eq!(
            check_since(
                now,
                Some("2026-12-01T00:00:00Z".parse().unwrap()),
                day,
                lease
            ),
            "2026-11-30T23:55:00Z".parse().unwrap()
        );
    }

    #[test]
    fn what_the_database_already_records_is_known() {
        let mut done = payment(S::Succeeded, 1);
        done.reference = Some("ch_1".into());
        assert_eq!(decide(&found(1, true), Some(&done)), Decision::Known);
        let mut declined = payment(S::RetryWait, 2);
        declined.recorded = Some(Recorded::Declined);
        assert_eq!(decide(&found(1, false), Some(&declined)), Decision::Known);
        // A recorded success is never rewritten as a decline.
        done.recorded = Some(Recorded::Approved);
        assert_eq!(decide(&found(1, false), Some(&done)), Decision::Known);
    }

    #[test]
    fn a_decline_leaves_the_payment_to_an_operator_or_only_fills_in_history() {
        assert_eq!(
            decide(&found(1, false), Some(&payment(S::Scheduled, 1))),
            Decision::Record {
                moves_to: Some(S::NeedsReview)
            }
        );
        assert_eq!(
            decide(&found(1, false), Some(&payment(S::RetryWait, 2))),
            Decision::Record { moves_to: None }
        );
        assert_eq!(
            decide(&found(1, false), Some(&payment(S::Succeeded, 1))),
            Decision::Record { moves_to: None }
        );
        assert_eq!(decide(&found(1, false), None), Decision::Ignore);
    }
}
