//! What the store reads and writes: rows as typed records, and the inputs of each change.
//! Every record serializes to the JSON that `--json` prints (amounts as strings beside their
//! currency, instants RFC 3339 UTC).

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::civil::Date;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::card::{CardBrand, Expiry, Last4};
use crate::domain::ids::{CardId, MemberId, PaymentId, ScheduleId};
use crate::domain::member::{AccountNumber, AccountType, EmailAddress, MemberName};
use crate::domain::money::{Currency, Money};
use crate::domain::payment::{AmountRule, PaymentState};
use crate::domain::schedule::{OccurrenceKey, Recurrence};
use crate::domain::status::{
    AuthorizedVia, BillStatus, CardStatus, MemberStatus, ScheduleKind, ScheduleStatus,
};

pub(crate) fn money_str<S: serde::Serializer>(m: &Money, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(m)
}

fn opt_money_str<S: serde::Serializer>(m: &Option<Money>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.collect_str(m),
        None => s.serialize_none(),
    }
}

/// Installation-wide state every host reads.
#[derive(Debug, Clone, Serialize)]
pub struct Control {
    pub installation_id: Uuid,
    pub min_binary_schema: i64,
    pub charging_paused: Option<Pause>,
    pub mail_paused: Option<Pause>,
    /// Set on a copy `autopay backup` made and by `autopay restore-mark`: the time up to which
    /// the database is known complete. `run` refuses the database until `reconcile` clears it.
    pub reconcile_required_since: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pause {
    pub since: Timestamp,
    pub by: Option<String>,
    pub reason: String,
}

/// Counts by state, for `autopay status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub backend: String,
    pub schema_version: i64,
    pub control: Control,
    pub members: BTreeMap<String, i64>,
    pub schedules: BTreeMap<String, i64>,
    pub payments: BTreeMap<String, i64>,
    pub bills: BTreeMap<String, i64>,
    pub notifications: BTreeMap<String, i64>,
    pub members_bouncing: i64,
    /// Charges `reconcile` could not place that no operator has acknowledged yet.
    pub findings_open: i64,
    /// Refunds and disputes the processor reported (`charge.refunded`,
    /// `charge.dispute.created`), ever.
    pub processor_events: BTreeMap<String, i64>,
}

/// What is happening now, for `autopay status`.
#[derive(Debug, Clone, Serialize)]
pub struct Activity {
    /// Payments due now and not yet claimed, and since when the oldest waits.
    pub due_now: i64,
    pub oldest_due: Option<Timestamp>,
    /// The next moment work falls due (a schedule, a payment, a lookup, an expiring claim).
    pub next_due: Option<Timestamp>,
    /// Each periodic job's last run on any worker.
    pub jobs: BTreeMap<String, Timestamp>,
    /// Since the `since` asked for (24 hours for `status`).
    pub failed: i64,
    pub unknown: i64,
    pub needs_review: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: MemberId,
    pub account_number: AccountNumber,
    pub account_type: AccountType,
    pub name: MemberName,
    pub email: EmailAddress,
    pub time_zone: String,
    pub reminders: bool,
    pub email_bouncing: bool,
    pub processor_customer_id: Option<String>,
    pub status: MemberStatus,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Member {
    /// Who a notice to this member is for.
    pub fn addressee(&self) -> crate::domain::notice::Addressee {
        crate::domain::notice::Addressee {
            member_name: self.name.as_str().to_string(),
            account_type: self.account_type.as_str(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewMember {
    pub account_number: AccountNumber,
    pub account_type: AccountType,
    pub name: MemberName,
    pub email: EmailAddress,
    /// A valid IANA name (checked by the caller with jiff).
    pub time_zone: String,
}

/// Fields `member update` may change; `None` keeps the stored value.
#[derive(Debug, Clone, Default)]
pub struct MemberChange {
    pub name: Option<MemberName>,
    pub email: Option<EmailAddress>,
    pub time_zone: Option<String>,
    pub reminders: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClosedMember {
    pub member: Member,
    pub cancelled_schedules: Vec<ScheduleId>,
    pub cancelled_payments: u64,
}

/// A stored card: the processor's token and what may be shown. Never a number or a code.
#[derive(Debug, Clone, Serialize)]
pub struct Card {
    pub id: CardId,
    pub member_id: MemberId,
    pub processor: String,
    #[serde(skip)]
    pub processor_token: String,
    /// The processor's fingerprint of the number, when it gave one.
    #[serde(skip)]
    pub fingerprint: Option<String>,
    pub brand: CardBrand,
    pub last4: Last4,
    pub exp_month: u8,
    pub exp_year: u16,
    pub status: CardStatus,
    pub status_reason: Option<String>,
    pub created_at: Timestamp,
    /// The card network's id of the card's first successful charge (stored credentials).
    pub network_transaction_id: Option<String>,
    /// The consent the card was saved under; `None` for cards saved before it was kept.
    pub consent: Option<Consent>,
    /// `test` or `live`, for a processor whose keys have modes.
    pub processor_mode: Option<String>,
}

/// Active cards of one processor and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardProcessor {
    pub processor: String,
    pub mode: Option<String>,
    pub cards: i64,
}

/// The member's consent to keep a card for automatic payments: the card networks'
/// stored-credential framework asks that a merchant keep it for charges made without them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consent {
    pub at: Timestamp,
    /// Through what it was given: `cli` (an operator, on the member's word), `api`, `portal`.
    pub via: String,
    /// The version of the terms the member agreed to, when one was given.
    pub terms_version: Option<String>,
}

impl Card {
    /// "Visa ending 4242".
    pub fn label(&self) -> String {
        format!("{} ending {}", self.brand, self.last4)
    }
}

#[derive(Debug, Clone)]
pub struct NewCard {
    pub member_id: MemberId,
    pub processor: String,
    pub processor_token: String,
    pub brand: CardBrand,
    pub last4: Last4,
    pub expiry: Expiry,
    /// The processor's fingerprint of the number, when it gives one.
    pub fingerprint: Option<String>,
    /// The processor's customer the card is saved to; a member without one takes it.
    pub customer: Option<String>,
    /// `test` or `live`, for a processor whose keys have modes.
    pub processor_mode: Option<String>,
    pub consent: Consent,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bill {
    pub id: Uuid,
    pub member_id: MemberId,
    pub reference: String,
    #[serde(serialize_with = "money_str")]
    pub amount_due: Money,
    #[serde(serialize_with = "money_str")]
    pub amount_paid: Money,
    pub currency: Currency,
    pub due_date: Date,
    pub status: BillStatus,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Bill {
    /// What is still owed (never below zero).
    pub fn outstanding(&self) -> Money {
        let left = self.amount_due.minor() - self.amount_paid.minor();
        Money::from_minor(left.max(0), self.currency)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBill {
    pub member_id: MemberId,
    pub reference: String,
    pub amount_due: Money,
    pub due_date: Date,
    /// Where the bill came from, for error messages ("line 7").
    pub origin: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BillImport {
    pub added: Vec<Bill>,
    pub unchanged: usize,
}

/// A bill after a change, and the credit the change created, if any.
#[derive(Debug, Clone, Serialize)]
pub struct BillChange {
    pub bill: Bill,
    pub credit: Option<Credit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Credit {
    pub id: Uuid,
    pub member_id: MemberId,
    #[serde(serialize_with = "money_str")]
    pub amount: Money,
    #[serde(serialize_with = "money_str")]
    pub remaining: Money,
    pub currency: Currency,
    pub source: String,
    pub reason: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub id: ScheduleId,
    pub member_id: MemberId,
    pub card_id: CardId,
    pub kind: ScheduleKind,
    pub recurrence: Recurrence,
    pub amount: AmountRule,
    pub currency: Currency,
    pub time_zone: String,
    /// When the next occurrence is due (UTC), None when nothing is left to plan.
    pub next_run_at: Option<Timestamp>,
    /// Which occurrence is due at `next_run_at`: the planner's cursor.
    pub next_occurrence: Option<OccurrenceKey>,
    pub status: ScheduleStatus,
    pub status_reason: Option<String>,
    pub consecutive_failures: i64,
    pub version: i64,
    pub authorized_at: Timestamp,
    pub authorized_via: AuthorizedVia,
    pub authorized_by: String,
    pub terms_version: String,
    pub cancelled_at: Option<Timestamp>,
    pub cancelled_by: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub member_id: MemberId,
    pub card_id: CardId,
    pub kind: ScheduleKind,
    pub recurrence: Recurrence,
    pub amount: AmountRule,
    pub currency: Currency,
    pub next_run_at: Option<Timestamp>,
    pub next_occurrence: Option<OccurrenceKey>,
    pub authorized_via: AuthorizedVia,
    pub terms_version: String,
}

/// A `schedule update`, computed by the caller against the version it read.
#[derive(Debug, Clone)]
pub struct ScheduleChange {
    pub id: ScheduleId,
    pub expected_version: i64,
    pub card_id: CardId,
    pub recurrence: Recurrence,
    pub amount: AmountRule,
    pub next_run_at: Option<Timestamp>,
    pub next_occurrence: Option<OccurrenceKey>,
    /// A new card lifts a suspension (docs/cli.md).
    pub lift_suspension: bool,
    /// What changed, in words, for the audit event.
    pub summary: String,
}

/// A `schedule resume`: the next occurrence counted from the moment of resuming.
#[derive(Debug, Clone)]
pub struct ScheduleResume {
    pub id: ScheduleId,
    pub expected_version: i64,
    pub next_run_at: Option<Timestamp>,
    pub next_occurrence: Option<OccurrenceKey>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    pub id: PaymentId,
    pub schedule_id: ScheduleId,
    pub member_id: MemberId,
    pub occurrence: String,
    pub due_at: Timestamp,
    #[serde(serialize_with = "opt_money_str")]
    pub amount: Option<Money>,
    pub currency: Currency,
    pub state: PaymentState,
    pub attempt: i64,
    pub card_id: CardId,
    pub schedule_version: i64,
    pub next_attempt_at: Option<Timestamp>,
    pub processor_reference: Option<String>,
    pub decline_code: Option<String>,
    pub reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One request to the processor, with its own outcome: the attempt history `payment show`
/// prints and the card limits and the circuit breaker count.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub attempt: i64,
    /// `charge` or `lookup`.
    pub kind: String,
    pub actor: String,
    pub started_at: Timestamp,
    /// None while the request has no answer (in flight, or its worker stopped).
    pub outcome: Option<crate::domain::attempt::CallOutcome>,
    pub detail: Option<String>,
    pub finished_at: Option<Timestamp>,
}

/// One line of the audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: Uuid,
    pub at: Timestamp,
    pub actor: String,
    pub entity: String,
    pub entity_id: String,
    pub action: String,
    pub detail: serde_json::Value,
}

/// One occurrence the planner writes.
#[derive(Debug, Clone)]
pub struct PlannedPayment {
    pub occurrence: OccurrenceKey,
    pub due_at: Timestamp,
    /// Recorded as `missed` (never charged): older than `payments.max_lateness`, or coalesced.
    pub missed: Option<String>,
}

/// What the planner does to one due schedule, made against the cursor it read.
#[derive(Debug, Clone)]
pub struct PlanStep {
    pub schedule_id: ScheduleId,
    pub expected_version: i64,
    pub expected_next: OccurrenceKey,
    pub payments: Vec<PlannedPayment>,
    pub next_run_at: Option<Timestamp>,
    pub next_occurrence: Option<OccurrenceKey>,
}

/// A claim on one payment: every write that finishes it names the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub payment_id: PaymentId,
    pub token: Uuid,
}

/// What a claimed payment needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkKind {
    /// A due payment: start its attempt.
    Charge,
    /// An unknown outcome, or a claim that expired mid-call: settle the attempt (look it up,
    /// resend the same request inside the key window). Never a new key.
    Settle,
}

#[derive(Debug, Clone)]
pub struct Work {
    pub lease: Lease,
    pub kind: WorkKind,
    pub payment: Payment,
    /// Claimed after another worker's lease expired mid-call.
    pub taken_over: bool,
}

/// How a worker claims: how long, how many, and the lateness and misfire rules that apply to a
/// payment when it is claimed (a charging pause may have kept it waiting).
#[derive(Debug, Clone, Copy)]
pub struct ClaimRules {
    pub lease: std::time::Duration,
    pub limit: u32,
    pub max_lateness: std::time::Duration,
    pub misfire: crate::domain::schedule::Misfire,
    /// Whether the claim first looks for attempts to settle (unknown outcomes due for a
    /// lookup, claims that expired mid-call); otherwise it takes due charges only.
    pub settle: bool,
}

/// What to do next with a claimed payment, after a step of its attempt was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Write exactly this request now; `call` names its row in the attempt history.
    Send {
        request: crate::domain::attempt::ChargeRequest,
        call: Uuid,
    },
    /// The processor was busy or never got the request: wait, then resend it (`begin_resend`).
    WaitAndResend,
    /// The payment is here now; nothing more to do with it.
    Moved(PaymentState),
    /// Charging was paused before any request was written: the payment waits, untouched.
    Released,
    /// Another worker holds the payment now; do nothing.
    LeaseLost,
    /// Operator only: nothing is safe to send or start yet (the key may still charge, the card
    /// is at its limit, or charging is paused); the payment went back as it was.
    NotYet {
        until: Option<Timestamp>,
        why: String,
    },
}

/// Who is settling: the daemon, or an operator's `payment retry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settler {
    Daemon,
    Operator,
}

/// What autopay holds about the sent attempt of a claimed payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFacts {
    pub reference: crate::domain::attempt::AttemptRef,
    pub attempt: crate::domain::attempt::SentAttempt,
}

/// A payment an operator took for review under a lease of their own.
#[derive(Debug, Clone)]
pub struct Taken {
    pub lease: Lease,
    pub payment: Payment,
    /// None when the current attempt was never sent.
    pub sent: Option<SentFacts>,
}

/// How outcomes move a payment on.
#[derive(Debug, Clone)]
pub struct OutcomePolicy {
    pub retry: crate::domain::decline::RetryPolicy,
    pub suspend_after: u32,
    pub keys: crate::domain::attempt::KeyPolicy,
    pub max_amount_individual_family: Money,
    pub max_amount_employer_group: Money,
    /// The processor's smallest charge per currency; `None` where it has none of its own (then
    /// one minor unit).
    pub min_charge: fn(crate::domain::money::Currency) -> Option<Money>,
    /// The statement descriptor suffix each new charge request carries, when the processor
    /// takes one and it is set.
    pub statement_descriptor_suffix: Option<String>,
}

impl OutcomePolicy {
    /// The smallest amount one charge may be in `currency`.
    pub fn min_charge(&self, currency: crate::domain::money::Currency) -> Money {
        (self.min_charge)(currency).unwrap_or_else(|| Money::from_minor(1, currency))
    }
}

/// Charge requests and their outcomes over a window, for the circuit breaker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AttemptStats {
    /// Charge requests answered in the window.
    pub attempts: i64,
    pub declines: i64,
    /// Requests that came back without an approval or a decline (timeouts, 5xx, 409, 429, a
    /// refused key).
    pub errors: i64,
}

/// An operator's decision on an `unknown` or `needs_review` payment, made under the lease the
/// operator took before asking the processor.
#[derive(Debug, Clone)]
pub struct Resolve {
    pub lease: Lease,
    pub resolution: crate::domain::payment::Resolution,
    pub reference: String,
    pub reason: String,
}

/// What a succeeded payment paid: a bill, or a credit it used.
#[derive(Debug, Clone, Serialize)]
pub struct Allocation {
    pub payment_id: PaymentId,
    pub bill_id: Option<Uuid>,
    pub credit_id: Option<Uuid>,
    #[serde(serialize_with = "money_str")]
    pub amount: Money,
}

/// An outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub id: Uuid,
    pub kind: String,
    pub dedupe_key: String,
    pub member_id: Option<MemberId>,
    pub recipient: String,
    pub payload: serde_json::Value,
    pub state: String,
    pub attempts: i64,
    pub created_at: Timestamp,
}

/// An outbox row to write outside an engine transaction (reminders, card-expiry notices).
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub kind: String,
    pub dedupe_key: String,
    pub member_id: MemberId,
    pub payload: serde_json::Value,
    /// When the message stops being worth sending (reminders: their moment).
    pub expires_at: Option<Timestamp>,
}

/// A claim on one outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotificationLease {
    pub id: Uuid,
    pub token: Uuid,
}

/// A claimed outbox row, ready to render and send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub lease: NotificationLease,
    pub notification: Notification,
}

/// One delivery's outcome, for the claim that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub lease: NotificationLease,
    pub outcome: DeliveryOutcome,
}

/// What a delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Sent,
    /// Try again at this moment (a 4xx reply, a connection failure, a session refusal).
    Retry {
        error: String,
        at: Timestamp,
    },
    /// Never deliverable; `bounce` flags the member's address.
    Failed {
        error: String,
        bounce: bool,
    },
}

/// A charge at the processor that `reconcile` could not place on a payment.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: Uuid,
    pub kind: String,
    /// What the operator does about it.
    pub explanation: String,
    pub idempotency_key: String,
    pub reference: String,
    pub payment_id: Option<PaymentId>,
    pub schedule_id: ScheduleId,
    pub occurrence: String,
    pub attempt: i64,
    #[serde(serialize_with = "money_str")]
    pub amount: Money,
    pub charged_at: Timestamp,
    pub found_at: Timestamp,
    pub acknowledged_at: Option<Timestamp>,
    pub acknowledged_by: Option<String>,
    pub note: Option<String>,
}

/// What `reconcile` did with one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    Known,
    Ignored,
    /// Recorded onto `payment_id`, which is now in `state`.
    Recorded {
        payment_id: PaymentId,
        state: PaymentState,
    },
    /// Listed as a finding (now or by an earlier run).
    Finding,
    /// No payment yet, but its schedule exists: planning it may create the payment.
    Unplanned,
}
