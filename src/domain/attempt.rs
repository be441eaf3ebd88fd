//! One attempt at the processor, and the rule that keeps it from charging twice.
//!
//! An attempt is one idempotency key. Before its first request is written, autopay stores the
//! key, the exact request and `first_sent_at`; every later request of the attempt is that same
//! request, byte for byte. A processor keeps keys for `processor.key_retention` (Stripe: 24
//! hours) and may run a key it has forgotten as a NEW charge, so the same key is sent again only
//! inside the resend window:
//!
//! ```text
//! now < first_sent_at + key_retention - processor.timeout - 1h
//! ```
//!
//! What each answer leads to ([`after_send`], [`after_lookup`]):
//!
//! - an approval or a decline, replayed or not, is definite;
//! - a timeout, a dropped connection or a 5xx is unknown: after `processor.settle_delay` the
//!   processor is asked (`find_attempt`). Found: recorded. Not found inside the window: the same
//!   request is sent again. Not found after the window: an operator decides. A replayed 5xx is
//!   unknown too, and the attempt is then settled by lookup only (resending would only replay it);
//! - "key in use" (409), a rate limit (429), or a connection that failed before the request was
//!   written: wait, then send the same request again;
//! - the processor refusing the key as used with other parameters: an operator decides.
//!
//! `processor.max_unknown_cycles` resends that end unknown, or `processor.lookup_window` from
//! the first unknown, and an operator decides. Automation never starts a new key after an
//! unknown outcome. An operator's `payment retry` resends the same key inside the window; a new
//! attempt starts only after a lookup taken later than `first_sent_at + key_retention +
//! daemon.lease` finds nothing ([`operator_retry`]).
//!
//! Every request that can reach the card network counts toward the card's limits before it is
//! written, until it comes back approved ([`check_card_limits`]): at most 15 in 30 days, and at
//! most 10 declined in 24 hours. Approvals stop counting: the networks limit retrying a card
//! that declines, not paying with one that works (an Employer Group may pay many schedules with
//! one card).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::decline::DeclineSignal;
use super::ids::{PaymentId, ScheduleId};
use super::money::Money;
use super::spelled_enum;

/// One charge request, exactly as it is written to the processor. It is stored before the
/// first send, and every resend of the attempt is this same value.
///
/// It carries the processor's token and what a processor may hold: the metadata names internal
/// ids and the last four characters of the billing account number, never a name, an email or a
/// full account number, and never a card number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// `autopay:{installation}:{schedule}:{occurrence}:{attempt}`: the same key always means the
    /// same charge.
    pub idempotency_key: String,
    pub token: String,
    pub amount: Money,
    pub payment_id: PaymentId,
    pub schedule_id: ScheduleId,
    pub occurrence: String,
    pub attempt: i64,
    pub account_last4: String,
    /// The processor's customer the token belongs to, when the processor keeps customers
    /// (Stripe). Absent from requests stored before it was kept, which then read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// The statement descriptor suffix the charge carries, when the processor takes one: kept
    /// with the request so that a resend is the same request even if the setting changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_descriptor_suffix: Option<String>,
}

/// What a lookup needs to find one attempt at the processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRef {
    pub payment_id: PaymentId,
    pub attempt: i64,
    /// The processor's customer the charge was made for, when the processor keeps customers:
    /// a lookup lists that customer's charges.
    pub customer: Option<String>,
    pub idempotency_key: String,
    /// When the first request was written: no charge of the attempt is older.
    pub first_sent_at: Timestamp,
}

/// What the processor holds for one attempt, found by its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorAttempt {
    /// The key the attempt was sent under: it names the installation, schedule, occurrence
    /// and attempt number ([`idempotency_key`]).
    pub idempotency_key: String,
    pub reference: String,
    pub payment_id: PaymentId,
    pub schedule_id: ScheduleId,
    pub occurrence: String,
    pub attempt: i64,
    pub amount: Money,
    pub approved: bool,
    /// What the processor said about a declined attempt.
    pub decline: Option<DeclineSignal>,
    pub created_at: Timestamp,
}

impl ProcessorAttempt {
    /// The processor's decline code of a declined attempt.
    pub fn decline_code(&self) -> Option<&str> {
        self.decline.as_ref().map(|d| d.code.as_str())
    }
}

/// The idempotency key of one attempt: stable if an occurrence is planned again after a
/// restore, new for every attempt, and distinct between installations sharing a processor.
pub fn idempotency_key(
    installation: Uuid,
    schedule_id: ScheduleId,
    occurrence: &str,
    attempt: i64,
) -> String {
    format!("autopay:{installation}:{schedule_id}:{occurrence}:{attempt}")
}

/// The margin the resend window keeps before the processor may forget a key.
pub const RESEND_MARGIN: Duration = Duration::from_secs(3600);

/// The timings the unknown-outcome rule works by, from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    /// `processor.key_retention`: how long the processor keeps an idempotency key.
    pub key_retention: Duration,
    /// `processor.timeout`: the longest one call may take.
    pub timeout: Duration,
    /// `daemon.lease`: how long a worker that froze mid-call may still hold its claim.
    pub lease: Duration,
    /// `processor.settle_delay`: the wait between an unknown outcome and the lookup.
    pub settle_delay: Duration,
    /// `processor.lookup_window`: how long from the first unknown autopay keeps settling.
    pub lookup_window: Duration,
    /// `processor.max_unknown_cycles`: resends that may end unknown.
    pub max_unknown_cycles: u32,
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

fn minus(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

impl KeyPolicy {
    /// How long after the first send a request with the same key may still be written:
    /// `key_retention - timeout - 1h` (zero when the retention is shorter than that).
    pub fn resend_span(&self) -> Duration {
        self.key_retention
            .saturating_sub(self.timeout)
            .saturating_sub(RESEND_MARGIN)
    }

    /// The moment from which the attempt's key is never written again.
    pub fn resend_deadline(&self, first_sent_at: Timestamp) -> Timestamp {
        plus(first_sent_at, self.resend_span())
    }

    /// Whether a request with the attempt's key may be written now.
    pub fn may_resend(&self, first_sent_at: Timestamp, now: Timestamp) -> bool {
        now < self.resend_deadline(first_sent_at)
    }

    /// The moment after which a lookup that finds nothing proves that the key can no longer
    /// charge: the processor has forgotten it, and even a worker frozen mid-call has lost its
    /// claim (`first_sent_at + key_retention + daemon.lease`).
    pub fn key_dead_after(&self, first_sent_at: Timestamp) -> Timestamp {
        plus(plus(first_sent_at, self.key_retention), self.lease)
    }

    /// When autopay stops settling an unknown outcome and an operator decides.
    pub fn review_at(&self, unknown_since: Timestamp) -> Timestamp {
        plus(unknown_since, self.lookup_window)
    }

    /// When to ask the processor after an unknown answer at `now`.
    pub fn look_at(&self, now: Timestamp) -> Timestamp {
        plus(now, self.settle_delay)
    }

    /// Why these timings could let a key be sent after the processor forgot it, if they could:
    /// the lookup window must end inside the resend window.
    pub fn check(&self) -> Result<(), String> {
        if self.lookup_window >= self.resend_span() {
            return Err(format!(
                "processor.lookup_window must be shorter than processor.key_retention minus processor.timeout minus 1h ({}s), so that every automatic resend happens while the processor still knows the key",
                self.resend_span().as_secs()
            ));
        }
        Ok(())
    }
}

/// What autopay holds about an attempt whose request was (or may have been) written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentAttempt {
    /// Stored before the first request was written.
    pub first_sent_at: Timestamp,
    /// Requests written so far with this key (the first included).
    pub sends: u32,
    /// When the payment's outcome first became unknown, if it did.
    pub unknown_since: Option<Timestamp>,
    /// Resends that ended unknown.
    pub unknown_cycles: u32,
    /// A replayed server error: resending would only replay it, so the attempt is settled by
    /// lookup only.
    pub resend_stopped: bool,
}

/// A charge request's answer, as the engine classifies the processor's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Approved {
        reference: String,
        /// The card network's id of the charge, when the processor gives it: the card keeps
        /// the first one (stored credentials).
        network_transaction_id: Option<String>,
    },
    Declined {
        signal: DeclineSignal,
        reference: Option<String>,
    },
    /// A timeout, a dropped connection, a 5xx: money may have moved. `replayed` when the
    /// processor replayed a stored error for this key.
    Unknown { detail: String, replayed: bool },
    /// "Key in use" (409), a rate limit (429), or a connection that failed before the request
    /// was written: nothing was decided; wait, then send the same request again.
    Busy { detail: String },
    /// The processor holds this key with other parameters.
    Mismatch { detail: String },
    /// The processor refused autopay's credentials (401, 403) before looking at the request:
    /// nothing was charged, and nothing will be until an operator fixes the settings.
    Refused { detail: String },
}

/// The processor's answer to "did this attempt happen?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupAnswer {
    Found {
        approved: bool,
        reference: String,
        decline: Option<DeclineSignal>,
    },
    NotFound,
    /// The processor could not answer now.
    Unknown {
        detail: String,
    },
}

/// What follows an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The charge happened.
    Charged { reference: String },
    /// The card was declined: the decline rules decide what follows.
    Declined {
        signal: DeclineSignal,
        reference: Option<String>,
    },
    /// Send the stored request again, same key, now.
    Resend,
    /// Wait a moment, then send the stored request again (the processor was busy or never got
    /// it). The wait counts against `processor.timeout`.
    WaitAndResend,
    /// Still unknown: ask the processor at `look_at`.
    Unknown {
        look_at: Timestamp,
        unknown_cycles: u32,
        stop_resending: bool,
        reason: String,
    },
    /// Only an operator can decide now.
    Review { reason: String },
    /// The processor refused autopay's credentials on the attempt's first request: the request
    /// did nothing, so the attempt is forgotten, the payment released untouched, and charging
    /// paused until an operator fixes the settings and resumes it.
    Release { reason: String },
}

/// What follows a charge request's answer.
pub fn after_send(
    answer: &Answer,
    attempt: &SentAttempt,
    policy: &KeyPolicy,
    now: Timestamp,
) -> Step {
    match answer {
        Answer::Approved { reference, .. } => Step::Charged {
            reference: reference.clone(),
        },
        Answer::Declined { signal, reference } => Step::Declined {
            signal: signal.clone(),
            reference: reference.clone(),
        },
        Answer::Busy { .. } => Step::WaitAndResend,
        // Only a first request may be forgotten: after an earlier unknown answer the key may
        // have charged, and only a lookup can tell.
        Answer::Refused { detail } if attempt.sends <= 1 => Step::Release {
            reason: format!("the processor refused autopay's credentials: {detail}"),
        },
        Answer::Refused { detail } => Step::Unknown {
            look_at: policy.look_at(now),
            unknown_cycles: attempt.unknown_cycles,
            stop_resending: attempt.resend_stopped,
            reason: format!(
                "the processor refused autopay's credentials on a resend; settled by lookup once they work: {detail}"
            ),
        },
        Answer::Mismatch { detail } => Step::Review {
            reason: format!(
                "the processor refused the idempotency key as used with other parameters: {detail}"
            ),
        },
        Answer::Unknown { detail, replayed } => {
            let unknown_cycles = if attempt.sends > 1 {
                attempt.unknown_cycles.saturating_add(1)
            } else {
                attempt.unknown_cycles
            };
            let since = attempt.unknown_since.unwrap_or(now);
            if unknown_cycles >= policy.max_unknown_cycles.max(1) && attempt.sends > 1 {
                Step::Review {
                    reason: format!(
                        "no answer after {unknown_cycles} resends of the same request (processor.max_unknown_cycles): {detail}"
                    ),
                }
            } else if now >= policy.review_at(since) {
                Step::Review {
                    reason: format!(
                        "outcome still unknown after processor.lookup_window: {detail}"
                    ),
                }
            } else {
                Step::Unknown {
                    look_at: policy.look_at(now),
                    unknown_cycles,
                    stop_resending: *replayed || attempt.resend_stopped,
                    reason: detail.clone(),
                }
            }
        }
    }
}

fn found(approved: bool, reference: &str, decline: &Option<DeclineSignal>) -> Step {
    if approved {
        Step::Charged {
            reference: reference.to_string(),
        }
    } else {
        Step::Declined {
            signal: decline
                .clone()
                .unwrap_or_else(|| DeclineSignal::code("generic_decline")),
            reference: Some(reference.to_string()),
        }
    }
}

/// What follows the daemon's lookup of an unknown outcome.
pub fn after_lookup(
    answer: &LookupAnswer,
    attempt: &SentAttempt,
    policy: &KeyPolicy,
    now: Timestamp,
) -> Step {
    let since = attempt.unknown_since.unwrap_or(now);
    let past_lookup_window = now >= policy.review_at(since);
    match answer {
        LookupAnswer::Found {
            approved,
            reference,
            decline,
        } => found(*approved, reference, decline),
        LookupAnswer::NotFound if !policy.may_resend(attempt.first_sent_at, now) => Step::Review {
            reason: "the processor has no record of this attempt and its key is past the resend window; `autopay payment retry` starts a new attempt once the processor has forgotten the key".into(),
        },
        LookupAnswer::NotFound if past_lookup_window => Step::Review {
            reason: "the processor still had no record of this attempt at the end of processor.lookup_window".into(),
        },
        LookupAnswer::NotFound if attempt.resend_stopped => Step::Unknown {
            look_at: policy.look_at(now),
            unknown_cycles: attempt.unknown_cycles,
            stop_resending: true,
            reason: "the processor replayed a server error for this key and has no record of a charge yet".into(),
        },
        LookupAnswer::NotFound => Step::Resend,
        LookupAnswer::Unknown { detail } if past_lookup_window => Step::Review {
            reason: format!("outcome still unknown after processor.lookup_window: {detail}"),
        },
        LookupAnswer::Unknown { detail } => Step::Unknown {
            look_at: policy.look_at(now),
            unknown_cycles: attempt.unknown_cycles,
            stop_resending: attempt.resend_stopped,
            reason: format!("the lookup got no answer: {detail}"),
        },
    }
}

/// What an operator's `payment retry` of a `needs_review` payment does first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRetry {
    /// Resend the same request with the same key; its answer decides.
    Resend,
    /// Ask the processor; nothing found means a new attempt may start.
    LookUp,
    /// Neither is safe yet: the key may still charge until then.
    TooEarly { until: Timestamp },
}

/// How an operator's retry of a sent attempt starts.
pub fn operator_retry(attempt: &SentAttempt, policy: &KeyPolicy, now: Timestamp) -> OperatorRetry {
    if policy.may_resend(attempt.first_sent_at, now) && !attempt.resend_stopped {
        OperatorRetry::Resend
    } else if now > policy.key_dead_after(attempt.first_sent_at) {
        OperatorRetry::LookUp
    } else {
        OperatorRetry::TooEarly {
            until: policy.key_dead_after(attempt.first_sent_at),
        }
    }
}

/// What follows the lookup of an operator's retry: a definite answer is recorded; nothing
/// found after the key died starts a new attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorStep {
    Record(Step),
    NewAttempt,
    TooEarly { until: Timestamp },
}

pub fn operator_after_lookup(
    answer: &LookupAnswer,
    attempt: &SentAttempt,
    policy: &KeyPolicy,
    now: Timestamp,
) -> OperatorStep {
    match answer {
        LookupAnswer::Found {
            approved,
            reference,
            decline,
        } => OperatorStep::Record(found(*approved, reference, decline)),
        LookupAnswer::NotFound if now > policy.key_dead_after(attempt.first_sent_at) => {
            OperatorStep::NewAttempt
        }
        LookupAnswer::NotFound | LookupAnswer::Unknown { .. } => OperatorStep::TooEarly {
            until: policy.key_dead_after(attempt.first_sent_at),
        },
    }
}

spelled_enum! {
    /// What one call to the processor came to, as the attempt history keeps it.
    pub enum CallOutcome ("call outcome") {
        Approved => "approved",
        Declined => "declined",
        /// A timeout, a dropped connection, a 5xx.
        Unknown => "unknown",
        /// 409, 429, or a request never written.
        Busy => "busy",
        Mismatch => "mismatch",
        /// 401 or 403: the credentials were refused before the request was read.
        Refused => "refused",
        Found => "found",
        NotFound => "not_found",
        /// A lookup that got no answer.
        LookupFailed => "lookup_failed",
    }
}

impl CallOutcome {
    /// The outcome a charge answer is kept as.
    pub fn of(answer: &Answer) -> CallOutcome {
        match answer {
            Answer::Approved { .. } => CallOutcome::Approved,
            Answer::Declined { .. } => CallOutcome::Declined,
            Answer::Unknown { .. } => CallOutcome::Unknown,
            Answer::Busy { .. } => CallOutcome::Busy,
            Answer::Mismatch { .. } => CallOutcome::Mismatch,
            Answer::Refused { .. } => CallOutcome::Refused,
        }
    }

    /// The outcome a lookup is kept as.
    pub fn of_lookup(answer: &LookupAnswer) -> CallOutcome {
        match answer {
            LookupAnswer::Found { .. } => CallOutcome::Found,
            LookupAnswer::NotFound => CallOutcome::NotFound,
            LookupAnswer::Unknown { .. } => CallOutcome::LookupFailed,
        }
    }

    /// A processor error, for the circuit breaker: every charge call that did not come back
    /// approved or declined.
    pub fn is_error(self) -> bool {
        matches!(
            self,
            CallOutcome::Unknown | CallOutcome::Busy | CallOutcome::Mismatch
        )
    }
}

/// The card networks' limits on one card, counted over every request that can reach them.
pub const MAX_REQUESTS_PER_CARD: usize = 15;
/// The window of [`MAX_REQUESTS_PER_CARD`]: 30 days.
pub const REQUEST_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Mastercard's limit of declined requests on one card in [`DECLINE_WINDOW`].
pub const MAX_DECLINES_PER_CARD: usize = 10;
/// The window of [`MAX_DECLINES_PER_CARD`]: 24 hours.
pub const DECLINE_WINDOW: Duration = Duration::from_secs(86_400);

/// Whether one more request may be written for a card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardLimit {
    Clear,
    /// 15 requests in 30 days: no more until `until`.
    Requests {
        until: Timestamp,
    },
    /// 10 declines in 24 hours: no more until `until`.
    Declines {
        until: Timestamp,
    },
}

impl CardLimit {
    /// The code a payment refused by this limit records.
    pub fn code(self) -> Option<&'static str> {
        match self {
            CardLimit::Clear => None,
            CardLimit::Requests { .. } => Some("card_attempt_limit"),
            CardLimit::Declines { .. } => Some("card_decline_limit"),
        }
    }
}

/// The moment the `max`-th newest of `times` leaves a window of `window`, when `times` already
/// holds `max` or more inside it.
fn blocked_until(
    times: &[Timestamp],
    max: usize,
    window: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    let start = minus(now, window);
    let mut inside: Vec<Timestamp> = times.iter().copied().filter(|t| *t > start).collect();
    if inside.len() < max {
        return None;
    }
    inside.sort();
    // Once the (len - max + 1) oldest have left, max - 1 remain and one more fits.
    let oldest_to_leave = inside[inside.len() - max];
    Some(plus(oldest_to_leave, window))
}

/// Checks a card's limits before a request is written. `requests` are the start times of the
/// card's requests that could reach the network in the last 30 days; `declines`, of its declined
/// ones in the last 24 hours.
pub fn check_card_limits(
    requests: &[Timestamp],
    declines: &[Timestamp],
    now: Timestamp,
) -> CardLimit {
    if let Some(until) = blocked_until(requests, MAX_REQUESTS_PER_CARD, REQUEST_WINDOW, now) {
        return CardLimit::Requests { until };
    }
    if let Some(until) = blocked_until(declines, MAX_DECLINES_PER_CARD, DECLINE_WINDOW, now) {
        return CardLimit::Declines { until };
    }
    CardLimit::Clear
}

/// The start of the windows a limit check needs, for the query that reads them.
pub fn card_limit_windows(now: Timestamp) -> (Timestamp, Timestamp) {
    (minus(now, REQUEST_WINDOW), minus(now, DECLINE_WINDOW))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn hours(n: u64) -> Duration {
        Duration::from_secs(n * 3600)
    }

    fn stripe() -> KeyPolicy {
        KeyPolicy {
            key_retention: hours(24),
            timeout: Duration::from_secs(30),
            lease: Duration::from_secs(300),
            settle_delay: Duration::from_secs(60),
            lookup_window: hours(12),
            max_unknown_cycles: 5,
        }
    }

    fn sent(first: &str) -> SentAttempt {
        SentAttempt {
            first_sent_at: at(first),
            sends: 1,
            unknown_since: Some(at(first)),
            unknown_cycles: 0,
            resend_stopped: false,
        }
    }

    fn unknown(detail: &str) -> Answer {
        Answer::Unknown {
            detail: detail.into(),
            replayed: false,
        }
    }

    #[test]
    fn the_resend_window_ends_a_timeout_and_an_hour_before_the_processor_forgets_the_key() {
        let p = stripe();
        let first = at("2026-12-01T09:00:00Z");
        assert_eq!(p.resend_deadline(first), at("2026-12-02T07:59:30Z"));
        assert!(p.may_resend(first, at("2026-12-02T07:59:29Z")));
        assert!(!p.may_resend(first, at("2026-12-02T07:59:30Z")));
        assert_eq!(p.key_dead_after(first), at("2026-12-02T09:05:00Z"));
    }

    #[test]
    fn settings_whose_lookup_window_reaches_past_the_resend_window_are_refused() {
        assert!(stripe().check().is_ok());
        let long = KeyPolicy {
            lookup_window: hours(23),
            ..stripe()
        };
        let err = long.check().unwrap_err();
        assert!(err.contains("processor.lookup_window"), "{err}");
        let short_retention = KeyPolicy {
            key_retention: hours(1),
            lookup_window: Duration::from_secs(60),
            ..stripe()
        };
        assert!(short_retention.check().is_err(), "no resend window at all");
    }

    #[test]
    fn approvals_and_declines_are_definite_replayed_or_not() {
        let p = stripe();
        let a = sent("2026-12-01T09:00:00Z");
        let now = at("2026-12-01T09:00:01Z");
        assert_eq!(
            after_send(
                &Answer::Approved {
                    reference: "ch_1".into(),
                    network_transaction_id: None,
                },
                &a,
                &p,
                now
            ),
            Step::Charged {
                reference: "ch_1".into()
            }
        );
        assert!(matches!(
            after_send(
                &Answer::Declined {
                    signal: DeclineSignal::code("insufficient_funds"),
                    reference: None
                },
                &a,
                &p,
                now
            ),
            Step::Declined { .. }
        ));
    }

    #[test]
    fn a_busy_processor_means_wait_and_send_the_same_request() {
        let step = after_send(
            &Answer::Busy {
                detail: "429".into(),
            },
            &sent("2026-12-01T09:00:00Z"),
            &stripe(),
            at("2026-12-01T09:00:01Z"),
        );
        assert_eq!(step, Step::WaitAndResend);
    }

    #[test]
    fn a_key_refused_with_other_parameters_goes_to_an_operator_without_a_resend() {
        let step = after_send(
            &Answer::Mismatch {
                detail: "amount".into(),
            },
            &sent("2026-12-01T09:00:00Z"),
            &stripe(),
            at("2026-12-01T09:00:01Z"),
        );
        assert!(matches!(step, Step::Review { .. }));
    }

    #[test]
    fn an_unknown_answer_is_looked_up_after_the_settle_delay() {
        let step = after_send(
            &unknown("timeout"),
            &sent("2026-12-01T09:00:00Z"),
            &stripe(),
            at("2026-12-01T09:00:30Z"),
        );
        assert_eq!(
            step,
            Step::Unknown {
                look_at: at("2026-12-01T09:01:30Z"),
                unknown_cycles: 0,
                stop_resending: false,
                reason: "timeout".into()
            }
        );
    }

    #[test]
    fn a_replayed_server_error_stops_the_resends_and_leaves_settling_to_lookups() {
        let p = stripe();
        let replay = Answer::Unknown {
            detail: "500 replayed".into(),
            replayed: true,
        };
        let now = at("2026-12-01T09:05:00Z");
        let mut a = sent("2026-12-01T09:00:00Z");
        a.sends = 2;
        let Step::Unknown { stop_resending, .. } = after_send(&replay, &a, &p, now) else {
            panic!("still unknown")
        };
        assert!(stop_resending);
        a.resend_stopped = true;
        assert!(
            matches!(
                after_lookup(&LookupAnswer::NotFound, &a, &p, now),
                Step::Unknown { .. }
            ),
            "no resend once stopped"
        );
    }

    #[test]
    fn not_found_inside_the_window_resends_and_after_it_goes_to_an_operator() {
        let p = stripe();
        let a = sent("2026-12-01T09:00:00Z");
        assert_eq!(
            after_lookup(&LookupAnswer::NotFound, &a, &p, at("2026-12-01T09:02:00Z")),
            Step::Resend
        );
        let late = SentAttempt {
            unknown_since: Some(at("2026-12-02T07:00:00Z")),
            ..a
        };
        assert!(matches!(
            after_lookup(
                &LookupAnswer::NotFound,
                &late,
                &p,
                at("2026-12-02T08:00:00Z")
            ),
            Step::Review { .. }
        ));
    }

    #[test]
    fn the_resends_that_end_unknown_are_capped_by_max_unknown_cycles() {
        let p = stripe();
        let mut a = sent("2026-12-01T09:00:00Z");
        let now = at("2026-12-01T09:30:00Z");
        let mut resends = 0;
        loop {
            a.sends += 1;
            match after_send(&unknown("timeout"), &a, &p, now) {
                Step::Unknown { unknown_cycles, .. } => {
                    a.unknown_cycles = unknown_cycles;
                    resends += 1;
                }
                Step::Review { reason } => {
                    assert!(reason.contains("processor.max_unknown_cycles"), "{reason}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            resends, 4,
            "the fifth resend that ends unknown goes to review"
        );
    }

    #[test]
    fn the_lookup_window_ends_settling_whatever_the_processor_says() {
        let p = stripe();
        let a = sent("2026-12-01T09:00:00Z");
        let after = at("2026-12-01T21:00:01Z");
        for answer in [
            LookupAnswer::NotFound,
            LookupAnswer::Unknown {
                detail: "503".into(),
            },
        ] {
            assert!(
                matches!(after_lookup(&answer, &a, &p, after), Step::Review { .. }),
                "{answer:?}"
            );
        }
        assert!(matches!(
            after_send(&unknown("t"), &a, &p, after),
            Step::Review { .. }
        ));
    }

    #[test]
    fn a_lookup_that_finds_the_attempt_records_what_it_found() {
        let p = stripe();
        let a = sent("2026-12-01T09:00:00Z");
        let now = at("2026-12-03T09:00:00Z");
        let approved = LookupAnswer::Found {
            approved: true,
            reference: "ch_9".into(),
            decline: None,
        };
        assert_eq!(
            after_lookup(&approved, &a, &p, now),
            Step::Charged {
                reference: "ch_9".into()
            }
        );
    }

    #[test]
    fn an_operator_retry_resends_inside_the_window_and_starts_a_new_key_only_after_it_died() {
        let p = stripe();
        let a = sent("2026-12-01T09:00:00Z");
        assert_eq!(
            operator_retry(&a, &p, at("2026-12-01T20:00:00Z")),
            OperatorRetry::Resend
        );
        assert_eq!(
            operator_retry(&a, &p, at("2026-12-02T08:30:00Z")),
            OperatorRetry::TooEarly {
                until: at("2026-12-02T09:05:00Z")
            }
        );
        let later = at("2026-12-02T09:05:01Z");
        assert_eq!(operator_retry(&a, &p, later), OperatorRetry::LookUp);
        assert_eq!(
            operator_after_lookup(&LookupAnswer::NotFound, &a, &p, later),
            OperatorStep::NewAttempt
        );
        assert!(matches!(
            operator_after_lookup(
                &LookupAnswer::Unknown {
                    detail: "down".into()
                },
                &a,
                &p,
                later
            ),
            OperatorStep::TooEarly { .. }
        ));
    }

    #[test]
    fn every_call_outcome_spelling_round_trips_and_errors_are_the_non_answers() {
        for o in CallOutcome::ALL {
            assert_eq!(o.as_str().parse::<CallOutcome>().unwrap(), *o);
        }
        assert!(CallOutcome::Unknown.is_error());
        assert!(CallOutcome::Busy.is_error());
        assert!(!CallOutcome::Declined.is_error());
        assert!(!CallOutcome::Approved.is_error());
    }

    #[test]
    fn the_sixteenth_request_in_thirty_days_waits_for_the_oldest_to_leave() {
        let now = at("2026-12-01T09:00:00Z");
        let requests: Vec<Timestamp> = (0..15)
            .map(|i| now.checked_sub(SignedDuration::from_hours(i)).unwrap())
            .collect();
        assert_eq!(
            check_card_limits(&requests[..14], &[], now),
            CardLimit::Clear
        );
        let oldest = requests[14];
        assert_eq!(
            check_card_limits(&requests, &[], now),
            CardLimit::Requests {
                until: plus(oldest, REQUEST_WINDOW)
            }
        );
    }

    #[test]
    fn the_eleventh_decline_in_a_day_waits() {
        let now = at("2026-12-01T09:00:00Z");
        let declines: Vec<Timestamp> = (0..10)
            .map(|i| now.checked_sub(SignedDuration::from_mins(i)).unwrap())
            .collect();
        assert_eq!(
            check_card_limits(&declines, &declines, now),
            CardLimit::Declines {
                until: plus(declines[9], DECLINE_WINDOW)
            }
        );
        assert_eq!(
            CardLimit::Declines { until: now }.code(),
            Some("card_decline_limit")
        );
    }

    proptest! {
        #[test]
        fn no_key_is_ever_resent_at_or_after_the_deadline(
            offset in 0u64..200_000,
            retention_h in 2u64..72,
            sends in 1u32..8,
            cycles in 0u32..8,
        ) {
            let p = KeyPolicy { key_retention: hours(retention_h), lookup_window: Duration::from_secs(60), ..stripe() };
            let first = at("2026-12-01T09:00:00Z");
            let now = plus(first, Duration::from_secs(offset));
            let a = SentAttempt { first_sent_at: first, sends, unknown_since: Some(first), unknown_cycles: cycles, resend_stopped: false };
            for answer in [LookupAnswer::NotFound, LookupAnswer::Unknown { detail: "x".into() }] {
                if after_lookup(&answer, &a, &p, now) == Step::Resend {
                    prop_assert!(now < p.resend_deadline(first));
                }
            }
            if operator_retry(&a, &p, now) == OperatorRetry::Resend {
                prop_assert!(now < p.resend_deadline(first));
            }
            if operator_after_lookup(&LookupAnswer::NotFound, &a, &p, now) == OperatorStep::NewAttempt {
                prop_assert!(now > p.key_dead_after(first));
            }
        }

        #[test]
        fn a_card_never_gets_more_than_its_limits_inside_their_windows(
            gaps in proptest::collection::vec(0u64..200_000, 0..40),
        ) {
            // Write requests as fast as the limits allow; no window ever holds more.
            let mut now = at("2026-12-01T00:00:00Z");
            let mut requests: Vec<Timestamp> = Vec::new();
            for gap in gaps {
                now = plus(now, Duration::from_secs(gap));
                match check_card_limits(&requests, &requests, now) {
                    CardLimit::Clear => requests.push(now),
                    CardLimit::Requests { until } | CardLimit::Declines { until } => {
                        prop_assert!(until > now);
                    }
                }
                let start = minus(now, DECLINE_WINDOW);
                prop_assert!(requests.iter().filter(|t| **t > start).count() <= MAX_DECLINES_PER_CARD);
                let start = minus(now, REQUEST_WINDOW);
                prop_assert!(requests.iter().filter(|t| **t > start).count() <= MAX_REQUESTS_PER_CARD);
            }
        }
    }
}
