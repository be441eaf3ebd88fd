//! What the store reads and writes: rows as typed records, and the inputs of each change.
//! Every record serializes to the JSON that `--json` prints (amounts as strings beside their
//! currency, instants RFC 3339 UTC).

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::civil::Date;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::card::{CardBrand, Expiry, Last4};
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: Uuid,
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
    pub cancelled_schedules: Vec<Uuid>,
    pub cancelled_payments: u64,
}

/// A stored card: the processor's token and what may be shown. Never a number or a code.
#[derive(Debug, Clone, Serialize)]
pub struct Card {
    pub id: Uuid,
    pub member_id: Uuid,
    pub processor: String,
    #[serde(skip)]
    pub processor_token: String,
    pub brand: CardBrand,
    pub last4: Last4,
    pub exp_month: u8,
    pub exp_year: u16,
    pub status: CardStatus,
    pub status_reason: Option<String>,
    pub created_at: Timestamp,
}

impl Card {
    /// "Visa ending 4242".
    pub fn label(&self) -> String {
        format!("{} ending {}", self.brand, self.last4)
    }
}

#[derive(Debug, Clone)]
pub struct NewCard {
    pub member_id: Uuid,
    pub processor: String,
    pub processor_token: String,
    pub brand: CardBrand,
    pub last4: Last4,
    pub expiry: Expiry,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bill {
    pub id: Uuid,
    pub member_id: Uuid,
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
    pub member_id: Uuid,
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
    pub member_id: Uuid,
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
    pub id: Uuid,
    pub member_id: Uuid,
    pub card_id: Uuid,
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
    pub member_id: Uuid,
    pub card_id: Uuid,
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
    pub id: Uuid,
    pub expected_version: i64,
    pub card_id: Uuid,
    pub recurrence: Recurrence,
    pub amount: AmountRule,
    pub next_run_at: Option<Timestamp>,
    pub next_occurrence: Option<OccurrenceKey>,
    /// A new card lifts a suspension (design.md).
    pub lift_suspension: bool,
    /// What changed, in words, for the audit event.
    pub summary: String,
}

/// A `schedule resume`: the next occurrence counted from the moment of resuming.
#[derive(Debug, Clone)]
pub struct ScheduleResume {
    pub id: Uuid,
    pub expected_version: i64,
    pub next_run_at: Option<Timestamp>,
    pub next_occurrence: Option<OccurrenceKey>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    pub id: Uuid,
    pub schedule_id: Uuid,
    pub member_id: Uuid,
    pub occurrence: String,
    pub due_at: Timestamp,
    #[serde(serialize_with = "opt_money_str")]
    pub amount: Option<Money>,
    pub currency: Currency,
    pub state: PaymentState,
    pub attempt: i64,
    pub card_id: Uuid,
    pub schedule_version: i64,
    pub next_attempt_at: Option<Timestamp>,
    pub processor_reference: Option<String>,
    pub decline_code: Option<String>,
    pub reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
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
