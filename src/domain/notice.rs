//! What each email says: the facts a kind of notification carries (its payload), and the key
//! that makes it one message however often the change that writes it is retried.
//!
//! The store writes a notice in the same transaction as the change it tells about; the
//! dispatcher renders it later (docs/emails.md lists every field). Payloads carry what the
//! message needs and nothing else: never a card number, never a full account number.

use jiff::Timestamp;
use serde::Serialize;
use uuid::Uuid;

use super::ids::{CardId, PaymentId, ScheduleId};
use super::money::Money;

/// One outbox row to write: its kind, its dedupe key and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: &'static str,
    pub dedupe_key: String,
    pub payload: serde_json::Value,
}

fn notice(kind: &'static str, dedupe_key: String, payload: &impl Serialize) -> Notice {
    Notice {
        kind,
        dedupe_key,
        // Plain structs of strings, numbers and instants always serialize.
        payload: serde_json::to_value(payload).unwrap_or(serde_json::Value::Null),
    }
}

fn amount_str<S: serde::Serializer>(m: &Money, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(m)
}

fn opt_amount_str<S: serde::Serializer>(m: &Option<Money>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.collect_str(m),
        None => s.serialize_none(),
    }
}

fn currency_of<S: serde::Serializer>(m: &Money, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.currency().code())
}

/// Who a notice is for, as every payload names them.
#[derive(Debug, Clone, Serialize)]
pub struct Addressee {
    pub member_name: String,
    /// `individual-family` or `employer-group`.
    pub account_type: &'static str,
}

/// One bill a payment paid.
#[derive(Debug, Clone, Serialize)]
pub struct BillPaid {
    pub bill_id: Uuid,
    pub reference: String,
    #[serde(serialize_with = "amount_str")]
    pub amount: Money,
}

/// A charge that happened.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt {
    pub payment_id: PaymentId,
    pub schedule_id: ScheduleId,
    #[serde(flatten)]
    pub to: Addressee,
    #[serde(serialize_with = "amount_str")]
    pub amount: Money,
    #[serde(rename = "currency", serialize_with = "currency_of")]
    pub currency_of_amount: Money,
    #[serde(serialize_with = "amount_str")]
    pub credit_used: Money,
    pub charged_at: Timestamp,
    /// "Visa ending 4242".
    pub card: String,
    /// The processor's confirmation number.
    pub confirmation: String,
    pub bills: Vec<BillPaid>,
    pub next_payment_at: Option<Timestamp>,
    pub time_zone: String,
}

impl Receipt {
    pub fn notice(&self) -> Notice {
        notice("receipt", format!("receipt:{}", self.payment_id), self)
    }
}

/// A payment that was not charged: a decline (with or without a retry), or a refusal before
/// any call (over the limit, the card's attempt limit).
#[derive(Debug, Clone, Serialize)]
pub struct Declined {
    pub payment_id: PaymentId,
    pub schedule_id: ScheduleId,
    #[serde(flatten)]
    pub to: Addressee,
    #[serde(serialize_with = "opt_amount_str")]
    pub amount: Option<Money>,
    pub currency: &'static str,
    pub card: String,
    pub decline_code: String,
    /// Completes "we could not charge your card because ...".
    pub reason: String,
    pub attempt: i64,
    /// When autopay tries again; none means the payment failed.
    pub next_try_at: Option<Timestamp>,
    pub time_zone: String,
}

impl Declined {
    /// `declined` (a retry follows) or `failed` (none does).
    pub fn notice(&self) -> Notice {
        match self.next_try_at {
            Some(_) => notice(
                "declined",
                format!("declined:{}:{}", self.payment_id, self.attempt),
                self,
            ),
            None => notice("failed", format!("failed:{}", self.payment_id), self),
        }
    }
}

/// A card that must not be tried again.
#[derive(Debug, Clone, Serialize)]
pub struct CardDisabled {
    pub card_id: CardId,
    pub card: String,
    #[serde(flatten)]
    pub to: Addressee,
    pub reason: String,
    pub suspended_schedules: Vec<ScheduleId>,
}

impl CardDisabled {
    pub fn notice(&self) -> Notice {
        notice(
            "card_disabled",
            format!("card_disabled:{}", self.card_id),
            self,
        )
    }
}

/// A schedule autopay stopped.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleSuspended {
    pub schedule_id: ScheduleId,
    #[serde(flatten)]
    pub to: Addressee,
    pub reason: String,
    /// The schedule's version after the suspension: one notice per suspension.
    #[serde(skip)]
    pub version: i64,
}

impl ScheduleSuspended {
    pub fn notice(&self) -> Notice {
        notice(
            "schedule_suspended",
            format!("suspended:{}:{}", self.schedule_id, self.version),
            self,
        )
    }
}

/// What a schedule confirmation shows of the schedule.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleFacts {
    pub schedule_id: ScheduleId,
    #[serde(flatten)]
    pub to: Addressee,
    /// The rule in words.
    pub rule: String,
    /// "125.00 USD" or "your statement balance".
    pub amount: String,
    pub card: String,
    pub time_zone: String,
    pub at: Timestamp,
    pub next_payment_at: Option<Timestamp>,
}

/// A change to a schedule the member hears about.
#[derive(Debug, Clone, Serialize)]
pub enum ScheduleChange {
    /// Set up, with the member's authorization.
    Setup {
        first_payment_at: Option<Timestamp>,
        authorized_at: Timestamp,
    },
    /// Changed to this version.
    Changed {
        version: i64,
        changes: String,
    },
    Paused {
        version: i64,
    },
    Cancelled,
}

#[derive(Serialize)]
struct ScheduleNotice<'a> {
    #[serde(flatten)]
    facts: &'a ScheduleFacts,
    #[serde(flatten)]
    extra: serde_json::Value,
}

impl ScheduleFacts {
    pub fn notice(&self, change: &ScheduleChange) -> Notice {
        let id = self.schedule_id;
        let (kind, key, extra) = match change {
            ScheduleChange::Setup {
                first_payment_at,
                authorized_at,
            } => (
                "setup",
                format!("setup:{id}"),
                serde_json::json!({ "first_payment_at": first_payment_at, "authorized_at": authorized_at }),
            ),
            ScheduleChange::Changed { version, changes } => (
                "changed",
                format!("changed:{id}:{version}"),
                serde_json::json!({ "version": version, "changes": changes }),
            ),
            ScheduleChange::Paused { version } => (
                "paused",
                format!("paused:{id}:{version}"),
                serde_json::json!({}),
            ),
            ScheduleChange::Cancelled => (
                "cancelled",
                format!("cancelled:{id}"),
                serde_json::json!({}),
            ),
        };
        notice(kind, key, &ScheduleNotice { facts: self, extra })
    }
}

/// A charge coming up.
#[derive(Debug, Clone, Serialize)]
pub struct Reminder {
    pub schedule_id: ScheduleId,
    #[serde(flatten)]
    pub to: Addressee,
    pub due_at: Timestamp,
    /// None: the statement balance.
    #[serde(serialize_with = "opt_amount_str")]
    pub amount: Option<Money>,
    pub currency: &'static str,
    pub card: String,
    pub time_zone: String,
    /// The occurrence reminded of: one reminder per occurrence.
    #[serde(skip)]
    pub occurrence: String,
}

impl Reminder {
    pub fn notice(&self) -> Notice {
        notice(
            "reminder",
            format!("reminder:{}:{}", self.schedule_id, self.occurrence),
            self,
        )
    }
}

/// A card about to expire while a schedule uses it.
#[derive(Debug, Clone, Serialize)]
pub struct CardExpiring {
    pub card_id: CardId,
    pub card: String,
    #[serde(flatten)]
    pub to: Addressee,
    pub exp_month: u8,
    pub exp_year: u16,
    /// "04/2028".
    pub expiry: String,
}

impl CardExpiring {
    pub fn new(card_id: CardId, card: String, to: Addressee, exp_month: u8, exp_year: u16) -> Self {
        CardExpiring {
            card_id,
            card,
            to,
            exp_month,
            exp_year,
            expiry: format!("{exp_month:02}/{exp_year}"),
        }
    }

    pub fn notice(&self) -> Notice {
        let mut n = notice(
            "card_expiring",
            format!(
                "card_expiring:{}:{:02}{}",
                self.card_id, self.exp_month, self.exp_year
            ),
            self,
        );
        // The payload keeps the documented fields only.
        if let Some(p) = n.payload.as_object_mut() {
            p.remove("exp_month");
            p.remove("exp_year");
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::Currency;

    fn to() -> Addressee {
        Addressee {
            member_name: "Ana Díaz".into(),
            account_type: "individual-family",
        }
    }

    fn keys(n: &Notice) -> Vec<String> {
        let mut k: Vec<String> = n.payload.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    const DOC: &str = include_str!("../../docs/emails.md");

    /// The fields docs/emails.md lists for `kind`, sorted.
    fn documented(kind: &str) -> Vec<String> {
        let payloads = &DOC[DOC.find("### Payloads").expect("a Payloads section")..];
        let row = payloads
            .lines()
            .find(|l| {
                l.starts_with('|')
                    && l.split('|')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|k| k.trim().trim_matches('`') == kind))
            })
            .unwrap_or_else(|| panic!("docs/emails.md has no row for {kind}"));
        // Drop the explanations in parentheses: "bills (each: bill_id, ...)" is one field.
        let mut fields = String::new();
        let mut depth = 0;
        for ch in row.split('|').nth(2).unwrap().chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => fields.push(ch),
                _ => {}
            }
        }
        let mut out: Vec<String> = fields
            .split(',')
            .map(|f| f.split_whitespace().next().unwrap_or("").to_string())
            .filter(|f| !f.is_empty())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_payload_carries_exactly_the_fields_the_docs_list() {
        let usd = |s: &str| Money::parse(s, Currency::USD).unwrap();
        let now: Timestamp = "2026-12-01T14:00:00Z".parse().unwrap();
        let id = Uuid::nil();
        let receipt = Receipt {
            payment_id: PaymentId::from_uuid(id),
            schedule_id: ScheduleId::from_uuid(id),
            to: to(),
            amount: usd("125"),
            currency_of_amount: usd("125"),
            credit_used: usd("0"),
            charged_at: now,
            card: "Visa ending 4242".into(),
            confirmation: "ch_1".into(),
            bills: vec![],
            next_payment_at: None,
            time_zone: "America/New_York".into(),
        }
        .notice();
        assert_eq!(keys(&receipt), documented("receipt"));
        assert_eq!(receipt.payload["amount"], "125.00");
        assert_eq!(receipt.payload["currency"], "USD");
        let declined = Declined {
            payment_id: PaymentId::from_uuid(id),
            schedule_id: ScheduleId::from_uuid(id),
            to: to(),
            amount: None,
            currency: "USD",
            card: "Visa ending 4242".into(),
            decline_code: "insufficient_funds".into(),
            reason: "r".into(),
            attempt: 1,
            next_try_at: Some(now),
            time_zone: "UTC".into(),
        };
        assert_eq!(declined.notice().kind, "declined");
        assert_eq!(keys(&declined.notice()), documented("declined"));
        let failed = Declined {
            next_try_at: None,
            ..declined
        }
        .notice();
        assert_eq!(
            (failed.kind, failed.dedupe_key.as_str()),
            ("failed", "failed:00000000-0000-0000-0000-000000000000")
        );
        let disabled = CardDisabled {
            card_id: CardId::from_uuid(id),
            card: "c".into(),
            to: to(),
            reason: "r".into(),
            suspended_schedules: vec![ScheduleId::from_uuid(id)],
        }
        .notice();
        assert_eq!(keys(&disabled), documented("card_disabled"));
        let suspended = ScheduleSuspended {
            schedule_id: ScheduleId::from_uuid(id),
            to: to(),
            reason: "r".into(),
            version: 3,
        }
        .notice();
        assert_eq!(keys(&suspended), documented("schedule_suspended"));
        let facts = ScheduleFacts {
            schedule_id: ScheduleId::from_uuid(id),
            to: to(),
            rule: "monthly".into(),
            amount: "125.00 USD".into(),
            card: "c".into(),
            time_zone: "UTC".into(),
            at: now,
            next_payment_at: None,
        };
        let setup = facts.notice(&ScheduleChange::Setup {
            first_payment_at: None,
            authorized_at: now,
        });
        assert_eq!(keys(&setup), documented("setup"));
        let changed = facts.notice(&ScheduleChange::Changed {
            version: 2,
            changes: "card".into(),
        });
        assert_eq!(changed.dedupe_key, format!("changed:{id}:2"));
        assert_eq!(keys(&changed), documented("changed"));
        for change in [
            ScheduleChange::Paused { version: 2 },
            ScheduleChange::Cancelled,
        ] {
            let n = facts.notice(&change);
            assert_eq!(keys(&n), documented(n.kind));
        }
        let reminder = Reminder {
            schedule_id: ScheduleId::from_uuid(id),
            to: to(),
            due_at: now,
            amount: None,
            currency: "USD",
            card: "c".into(),
            time_zone: "UTC".into(),
            occurrence: "2026-12-01".into(),
        }
        .notice();
        assert_eq!(keys(&reminder), documented("reminder"));
        assert!(reminder.payload["amount"].is_null());
        let expiring = CardExpiring::new(CardId::from_uuid(id), "c".into(), to(), 4, 2028).notice();
        assert_eq!(keys(&expiring), documented("card_expiring"));
        assert_eq!(expiring.payload["expiry"], "04/2028");
    }
}
