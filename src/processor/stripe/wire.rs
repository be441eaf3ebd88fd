//! Stripe's wire format: the private serde types of the objects autopay reads, the form bodies
//! it writes, and their conversions into autopay's types. Nothing here does I/O, so every
//! answer shape is tested without a peer.
//!
//! Only the fields autopay reads are declared; Stripe adds fields without notice, and serde
//! ignores the rest. Test peers (localstripe) leave some out, so nearly every field is optional.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::attempt::{ChargeRequest, ProcessorAttempt};
use crate::domain::card::{CardBrand, Expiry, Last4};
use crate::domain::decline::DeclineSignal;
use crate::domain::ids::{PaymentId, ScheduleId};
use crate::domain::money::{Currency, Money};
use crate::processor::{CardDetails, ChargeOutcome, ProcessorError};

/// Stripe's error object (`{"error": {...}}`), for an HTTP error and as a PaymentIntent's
/// `last_payment_error`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct ApiError {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub code: Option<String>,
    pub decline_code: Option<String>,
    pub advice_code: Option<String>,
    pub network_advice_code: Option<String>,
    pub network_decline_code: Option<String>,
    pub message: Option<String>,
    pub param: Option<String>,
    pub charge: Option<String>,
    pub payment_intent: Option<Box<PaymentIntent>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ErrorBody {
    pub error: ApiError,
}

/// An id, or the object it names when Stripe expanded it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Expandable<T> {
    Id(String),
    Object(Box<T>),
}

impl<T> Expandable<T> {
    fn object(&self) -> Option<&T> {
        match self {
            Expandable::Id(_) => None,
            Expandable::Object(o) => Some(o),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct PaymentIntent {
    pub id: String,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub customer: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created: i64,
    pub last_payment_error: Option<ApiError>,
    pub latest_charge: Option<Expandable<Charge>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Charge {
    pub id: String,
    pub outcome: Option<ChargeOutcomeWire>,
    pub payment_method_details: Option<PaymentMethodDetails>,
}

/// A Charge's `outcome`: where Stripe puts the network's codes of a decline.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct ChargeOutcomeWire {
    pub network_advice_code: Option<String>,
    pub network_decline_code: Option<String>,
    pub advice_code: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct PaymentMethodDetails {
    pub card: Option<ChargeCard>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ChargeCard {
    pub brand: Option<String>,
    pub network_transaction_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct PaymentMethod {
    pub id: String,
    pub customer: Option<String>,
    pub livemode: Option<bool>,
    pub card: Option<Card>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Card {
    pub brand: String,
    pub last4: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Customer {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct SetupIntent {
    pub id: String,
    pub status: String,
    pub customer: Option<String>,
    pub usage: Option<String>,
    pub livemode: Option<bool>,
    pub payment_method: Option<Expandable<PaymentMethod>>,
}

impl SetupIntent {
    pub fn payment_method_id(&self) -> Option<&str> {
        match self.payment_method.as_ref()? {
            Expandable::Id(id) => Some(id),
            Expandable::Object(pm) => Some(&pm.id),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

/// A Stripe card brand, as autopay names it.
pub(super) fn brand(stripe: &str) -> CardBrand {
    match stripe.to_ascii_lowercase().as_str() {
        "visa" => CardBrand::Visa,
        "mastercard" => CardBrand::MasterCard,
        "discover" => CardBrand::Discover,
        "amex" | "american express" => CardBrand::Amex,
        _ => CardBrand::Other,
    }
}

impl PaymentMethod {
    /// Brand, last four and expiry, as Stripe reports them.
    pub fn details(&self) -> Result<CardDetails, ProcessorError> {
        let card = self.card.as_ref().ok_or_else(|| {
            ProcessorError::Rejected(format!(
                "Stripe PaymentMethod {} is not a card; only cards are accepted",
                self.id
            ))
        })?;
        let unreadable = |what: &str| {
            ProcessorError::Rejected(format!(
                "Stripe answered with an unreadable {what} for PaymentMethod {}",
                self.id
            ))
        };
        Ok(CardDetails {
            brand: brand(&card.brand),
            last4: Last4::parse(&card.last4).map_err(|_| unreadable("last4"))?,
            expiry: Expiry::new(card.exp_month, card.exp_year).map_err(|_| unreadable("expiry"))?,
        })
    }
}

/// A form body in Stripe's encoding (`metadata[payment_id]=...`), its fields in the order they
/// were added: the same request always gives the same bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Form(Vec<(String, String)>);

impl Form {
    pub fn new() -> Form {
        Form::default()
    }

    pub fn field(mut self, name: &str, value: impl Into<String>) -> Form {
        self.0.push((name.to_string(), value.into()));
        self
    }

    pub fn encode(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.0 {
            s.append_pair(k, v);
        }
        s.finish()
    }
}

/// The metadata keys autopay writes on every PaymentIntent.
pub(super) mod meta {
    pub const INSTALLATION: &str = "installation_id";
    pub const PAYMENT: &str = "payment_id";
    pub const SCHEDULE: &str = "schedule_id";
    pub const OCCURRENCE: &str = "occurrence";
    pub const ATTEMPT: &str = "attempt";
    pub const ACCOUNT_LAST4: &str = "account_last4";
    pub const MEMBER: &str = "member_id";
}

/// The PaymentIntent a charge request creates for `installation`: confirmed at once,
/// off-session (the member is not there), with the request's metadata and its statement
/// descriptor suffix when it has one. Every resend of the request gives these same bytes.
pub(super) fn charge_form(request: &ChargeRequest, installation: Uuid) -> Form {
    let installation = installation.to_string();
    let mut form = Form::new()
        .field("amount", request.amount.minor().to_string())
        .field(
            "currency",
            request.amount.currency().code().to_ascii_lowercase(),
        );
    if let Some(customer) = &request.customer {
        form = form.field("customer", customer.clone());
    }
    form = form
        .field("payment_method", request.token.clone())
        .field("confirm", "true")
        .field("off_session", "true");
    if let Some(suffix) = &request.statement_descriptor_suffix {
        form = form.field("statement_descriptor_suffix", suffix.clone());
    }
    form.field("expand[]", "latest_charge")
        .field(&format!("metadata[{}]", meta::INSTALLATION), installation)
        .field(
            &format!("metadata[{}]", meta::PAYMENT),
            request.payment_id.to_string(),
        )
        .field(
            &format!("metadata[{}]", meta::SCHEDULE),
            request.schedule_id.to_string(),
        )
        .field(
            &format!("metadata[{}]", meta::OCCURRENCE),
            request.occurrence.clone(),
        )
        .field(
            &format!("metadata[{}]", meta::ATTEMPT),
            request.attempt.to_string(),
        )
        .field(
            &format!("metadata[{}]", meta::ACCOUNT_LAST4),
            request.account_last4.clone(),
        )
}

/// What an HTTP answer from Stripe said, before it is read as a charge, a lookup or a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    pub status: u16,
    pub body: String,
    /// `Idempotent-Replayed: true`: Stripe answered from the key's stored result.
    pub replayed: bool,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
    /// `Stripe-Should-Retry`, when given.
    pub should_retry: Option<bool>,
}

/// The decline a Stripe error describes. A `card_declined` without a `decline_code` is
/// Stripe's generic decline; another card error's `code` (`expired_card`, `incorrect_cvc`,
/// `authentication_required`, ...) is its decline code.
pub(super) fn signal_of(error: &ApiError, charge: Option<&Charge>) -> DeclineSignal {
    let code = match (error.decline_code.as_deref(), error.code.as_deref()) {
        (Some(d), _) if !d.is_empty() => d.to_string(),
        (_, Some("card_declined")) | (_, None) => "generic_decline".to_string(),
        (_, Some(c)) => c.to_string(),
    };
    let outcome = charge.and_then(|c| c.outcome.as_ref());
    let card = charge
        .and_then(|c| c.payment_method_details.as_ref())
        .and_then(|d| d.card.as_ref());
    DeclineSignal {
        code,
        advice_code: error
            .advice_code
            .clone()
            .or_else(|| outcome.and_then(|o| o.advice_code.clone())),
        network_advice_code: error
            .network_advice_code
            .clone()
            .or_else(|| outcome.and_then(|o| o.network_advice_code.clone())),
        network_decline_code: error
            .network_decline_code
            .clone()
            .or_else(|| outcome.and_then(|o| o.network_decline_code.clone())),
        brand: card.and_then(|c| c.brand.as_deref()).map(brand),
    }
}

impl PaymentIntent {
    fn charge(&self) -> Option<&Charge> {
        self.latest_charge.as_ref().and_then(Expandable::object)
    }

    fn charge_id(&self) -> Option<String> {
        match self.latest_charge.as_ref()? {
            Expandable::Id(id) => Some(id.clone()),
            Expandable::Object(c) => Some(c.id.clone()),
        }
    }

    fn network_transaction_id(&self) -> Option<String> {
        self.charge()?
            .payment_method_details
            .as_ref()?
            .card
            .as_ref()?
            .network_transaction_id
            .clone()
    }

    /// What this PaymentIntent's state means for a charge: settled (approved, declined, not
    /// charged) or still open.
    pub fn settled(&self) -> Settled {
        match self.status.as_str() {
            "succeeded" => Settled::Approved,
            "requires_payment_method" => match &self.last_payment_error {
                Some(e) => Settled::Declined(signal_of(e, self.charge())),
                // Never confirmed: nothing was tried.
                None => Settled::NotCharged("the PaymentIntent was never confirmed".into()),
            },
            // An off-session charge the bank wants the member to authenticate: the member is
            // not there, so it fails and the member is asked to pay online or by phone.
            "requires_action" | "requires_confirmation" => {
                Settled::Declined(DeclineSignal::code("authentication_required"))
            }
            "canceled" => Settled::NotCharged("the PaymentIntent was canceled".into()),
            // `processing`, `requires_capture`, or a state Stripe adds later: money may move.
            other => Settled::Open(format!("the PaymentIntent is {other}")),
        }
    }

    /// This PaymentIntent as the charge answer of a request.
    pub fn outcome(&self) -> ChargeOutcome {
        match self.settled() {
            Settled::Approved => ChargeOutcome::Approved {
                reference: self.id.clone(),
                network_transaction_id: self.network_transaction_id(),
            },
            Settled::Declined(signal) => ChargeOutcome::Declined {
                message: self
                    .last_payment_error
                    .as_ref()
                    .and_then(|e| e.message.clone())
                    .unwrap_or_else(|| format!("declined ({})", signal.code)),
                signal,
                reference: Some(self.id.clone()),
            },
            Settled::NotCharged(why) => ChargeOutcome::Declined {
                signal: DeclineSignal::code("payment_intent_not_charged"),
                message: why,
                reference: Some(self.id.clone()),
            },
            // Never resent: the PaymentIntent exists and may still charge; lookups settle it.
            Settled::Open(why) => ChargeOutcome::Unknown {
                detail: format!("{why} ({}); settled by lookup", self.id),
                replayed: true,
            },
        }
    }

    /// The attempt this PaymentIntent records, when its metadata names one of autopay's
    /// attempts; `None` for a PaymentIntent someone else made, or one still open.
    pub fn attempt(&self) -> Option<ProcessorAttempt> {
        let m = &self.metadata;
        let installation = Uuid::parse_str(m.get(meta::INSTALLATION)?).ok()?;
        let schedule_id: ScheduleId = m.get(meta::SCHEDULE)?.parse().ok()?;
        let occurrence = m.get(meta::OCCURRENCE)?.clone();
        let attempt: i64 = m.get(meta::ATTEMPT)?.parse().ok()?;
        let (approved, decline) = match self.settled() {
            Settled::Approved => (true, None),
            Settled::Declined(signal) => (false, Some(signal)),
            Settled::NotCharged(_) => (
                false,
                Some(DeclineSignal::code("payment_intent_not_charged")),
            ),
            Settled::Open(_) => return None,
        };
        let currency = Currency::parse(&self.currency.to_ascii_uppercase()).ok()?;
        Some(ProcessorAttempt {
            idempotency_key: crate::domain::attempt::idempotency_key(
                installation,
                schedule_id,
                &occurrence,
                attempt,
            ),
            reference: if approved {
                self.id.clone()
            } else {
                self.charge_id().unwrap_or_else(|| self.id.clone())
            },
            payment_id: m.get(meta::PAYMENT)?.parse().ok()?,
            schedule_id,
            occurrence,
            attempt,
            amount: Money::from_minor(self.amount, currency),
            approved,
            decline,
            created_at: Timestamp::from_second(self.created).ok()?,
        })
    }

    /// Whether the metadata names this installation.
    pub fn belongs_to(&self, installation: Uuid) -> bool {
        self.metadata
            .get(meta::INSTALLATION)
            .is_some_and(|i| i.eq_ignore_ascii_case(&installation.to_string()))
    }

    /// Whether the metadata names this payment's attempt.
    pub fn is_attempt(&self, payment_id: PaymentId, attempt: i64) -> bool {
        self.metadata
            .get(meta::PAYMENT)
            .is_some_and(|p| p.eq_ignore_ascii_case(&payment_id.to_string()))
            && self.metadata.get(meta::ATTEMPT) == Some(&attempt.to_string())
    }
}

/// What a PaymentIntent's state says about its charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Settled {
    Approved,
    Declined(DeclineSignal),
    /// Canceled, or never confirmed: no money moved, and none will.
    NotCharged(String),
    /// Still open: money may move yet.
    Open(String),
}

/// The error a reply carries, or an empty one when its body is not Stripe's error shape.
pub(super) fn error_of(reply: &Reply) -> ApiError {
    serde_json::from_str::<ErrorBody>(&reply.body)
        .map(|b| b.error)
        .unwrap_or_default()
}

/// Whether a list's 400 says the server does not know its filters at all (a test peer such as
/// localstripe: "Unexpected customer"), as opposed to refusing one value of them.
pub(super) fn refuses_list_filters(e: &ApiError) -> bool {
    e.code.as_deref() == Some("parameter_unknown")
        || e.message
            .as_deref()
            .is_some_and(|m| m.starts_with("Unexpected") || m.contains("unknown parameter"))
}

/// Whether a list's 400 says the customer it names does not exist (any more).
pub(super) fn customer_missing(e: &ApiError) -> bool {
    e.code.as_deref() == Some("resource_missing") && e.param.as_deref() == Some("customer")
}

/// A short, safe description of a Stripe error for logs and payment history: its type, code
/// and message, each bounded, never the request.
pub(super) fn describe(reply: &Reply) -> String {
    let e = error_of(reply);
    let bounded = |s: Option<String>| {
        s.map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        })
    };
    let mut parts = vec![format!("HTTP {}", reply.status)];
    if let Some(k) = bounded(e.kind) {
        parts.push(k);
    }
    if let Some(c) = bounded(e.code) {
        parts.push(c);
    }
    if let Some(m) = bounded(e.message) {
        parts.push(m);
    }
    crate::config::redact_secrets(&parts.join(": "))
}

/// Reads Stripe's answer to a PaymentIntent create (a charge request).
pub(super) fn charge_answer(reply: &Reply) -> ChargeOutcome {
    let error = error_of(reply);
    match reply.status {
        200..=299 => match serde_json::from_str::<PaymentIntent>(&reply.body) {
            Ok(pi) => pi.outcome(),
            Err(e) => ChargeOutcome::Unknown {
                detail: format!(
                    "Stripe answered {} with an unreadable PaymentIntent ({e}); settled by lookup",
                    reply.status
                ),
                replayed: reply.replayed,
            },
        },
        402 => match &error.payment_intent {
            Some(pi) => pi.outcome(),
            None => ChargeOutcome::Declined {
                signal: signal_of(&error, None),
                message: describe(reply),
                reference: error.charge.clone(),
            },
        },
        400 if error.kind.as_deref() == Some("idempotency_error") => {
            ChargeOutcome::IdempotencyMismatch {
                detail: describe(reply),
            }
        }
        // The key's first request is still running, or another request holds a lock: nothing
        // was decided by this one.
        409 => ChargeOutcome::Busy {
            detail: describe(reply),
            retry_after: reply.retry_after,
        },
        429 => ChargeOutcome::Busy {
            detail: describe(reply),
            retry_after: reply.retry_after,
        },
        401 | 403 => ChargeOutcome::Refused {
            detail: format!(
                "{}; check processor.stripe.secret_key (and, for a restricted key, its permissions)",
                describe(reply)
            ),
        },
        // Stripe says the same request may succeed if sent again (a lock timeout, say):
        // nothing was decided.
        400..=499 if reply.should_retry == Some(true) => ChargeOutcome::Busy {
            detail: describe(reply),
            retry_after: reply.retry_after,
        },
        // A request Stripe refused as written: nothing was charged, and the same request
        // would be refused again.
        400 | 404 => ChargeOutcome::Declined {
            signal: DeclineSignal::code(
                error
                    .code
                    .clone()
                    .unwrap_or_else(|| "invalid_request".to_string()),
            ),
            message: describe(reply),
            reference: None,
        },
        // 5xx (replayed or not) and anything else: money may have moved.
        _ => ChargeOutcome::Unknown {
            detail: describe(reply),
            replayed: reply.replayed,
        },
    }
}

/// Reads an answer that should hold `T`, as a processor error when it does not.
pub(super) fn object<T: serde::de::DeserializeOwned>(
    reply: &Reply,
    what: &str,
) -> Result<T, ProcessorError> {
    match reply.status {
        200..=299 => serde_json::from_str(&reply.body).map_err(|e| {
            ProcessorError::Unavailable(format!("Stripe answered with an unreadable {what} ({e})"))
        }),
        401 | 403 => Err(ProcessorError::Config(format!(
            "Stripe refused the key: {}; check processor.stripe.secret_key",
            describe(reply)
        ))),
        400 | 402 | 404 => Err(ProcessorError::Rejected(format!(
            "Stripe refused the {what}: {}",
            describe(reply)
        ))),
        _ => Err(ProcessorError::Unavailable(format!(
            "Stripe could not answer about the {what}: {}",
            describe(reply)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The installation an idempotency key names (`autopay:{installation}:...`).
    fn installation_of(key: &str) -> Option<Uuid> {
        let mut parts = key.split(':');
        (parts.next()? == "autopay")
            .then(|| parts.next())
            .flatten()
            .and_then(|s| Uuid::parse_str(s).ok())
    }

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.to_string(),
            replayed: false,
            retry_after: None,
            should_retry: None,
        }
    }

    fn request() -> ChargeRequest {
        ChargeRequest {
            idempotency_key: "autopay:0193a5b2-7c1e-7d3f-9a41-212345678900:0193a5b2-7c1e-7d3f-9a41-2123456789aa:2026-12-01:1".into(),
            token: "pm_1Abc".into(),
            amount: Money::from_minor(12_500, Currency::USD),
            payment_id: "0193a5b2-7c1e-7d3f-9a41-2123456789bb".parse().unwrap(),
            schedule_id: "0193a5b2-7c1e-7d3f-9a41-2123456789aa".parse().unwrap(),
            occurrence: "2026-12-01".into(),
            attempt: 1,
            account_last4: "0042".into(),
            customer: Some("cus_9".into()),
            statement_descriptor_suffix: None,
        }
    }

    #[test]
    fn a_charge_request_is_one_exact_form_body() {
        let installation = installation_of(&request().idempotency_key).unwrap();
        let body = charge_form(&request(), installation).encode();
        assert_eq!(
            body,
            "amount=12500&currency=usd&customer=cus_9&payment_method=pm_1Abc&confirm=true&off_session=true\
             &expand%5B%5D=latest_charge\
             &metadata%5Binstallation_id%5D=0193a5b2-7c1e-7d3f-9a41-212345678900\
             &metadata%5Bpayment_id%5D=0193a5b2-7c1e-7d3f-9a41-2123456789bb\
             &metadata%5Bschedule_id%5D=0193a5b2-7c1e-7d3f-9a41-2123456789aa\
             &metadata%5Boccurrence%5D=2026-12-01&metadata%5Battempt%5D=1&metadata%5Baccount_last4%5D=0042"
        );
        // The same request always gives the same bytes; the suffix only when set.
        assert_eq!(charge_form(&request(), installation).encode(), body);
        let suffixed = ChargeRequest {
            statement_descriptor_suffix: Some("PLAN 2027".into()),
            ..request()
        };
        let with = charge_form(&suffixed, installation).encode();
        assert!(
            with.contains("&off_session=true&statement_descriptor_suffix=PLAN+2027&"),
            "{with}"
        );
        // Nothing but internal ids and the account's last four: no name, email or card number.
        assert!(!body.contains("description") && !body.contains("email"));
    }

    #[test]
    fn a_succeeded_payment_intent_is_approved_with_its_network_transaction_id() {
        let body = r#"{"id":"pi_1","object":"payment_intent","status":"succeeded","amount":12500,"currency":"usd","created":1796300000,
            "latest_charge":{"id":"ch_1","payment_method_details":{"card":{"brand":"visa","network_transaction_id":"123456789012345"}}}}"#;
        assert_eq!(
            charge_answer(&reply(200, body)),
            ChargeOutcome::Approved {
                reference: "pi_1".into(),
                network_transaction_id: Some("123456789012345".into())
            }
        );
        // latest_charge as a bare id, as without expansion.
        let body = r#"{"id":"pi_1","status":"succeeded","amount":1,"currency":"usd","created":1,"latest_charge":"ch_1"}"#;
        assert!(matches!(
            charge_answer(&reply(200, body)),
            ChargeOutcome::Approved {
                network_transaction_id: None,
                ..
            }
        ));
    }

    #[test]
    fn a_card_error_carries_the_network_s_advice_and_the_brand() {
        let body = r#"{"error":{"type":"card_error","code":"card_declined","decline_code":"do_not_honor",
            "advice_code":"try_again_later","network_advice_code":"21","network_decline_code":"05","message":"Your card was declined.",
            "payment_intent":{"id":"pi_2","status":"requires_payment_method","amount":500,"currency":"usd","created":1,
              "last_payment_error":{"type":"card_error","code":"card_declined","decline_code":"do_not_honor","network_advice_code":"21","network_decline_code":"05","advice_code":"try_again_later"},
              "latest_charge":{"id":"ch_2","outcome":{"network_advice_code":"21","network_decline_code":"05","reason":"do_not_honor"},
                "payment_method_details":{"card":{"brand":"mastercard"}}}}}}"#;
        match charge_answer(&reply(402, body)) {
            ChargeOutcome::Declined {
                signal, reference, ..
            } => {
                assert_eq!(reference.as_deref(), Some("pi_2"));
                assert_eq!(
                    signal,
                    DeclineSignal {
                        code: "do_not_honor".into(),
                        advice_code: Some("try_again_later".into()),
                        network_advice_code: Some("21".into()),
                        network_decline_code: Some("05".into()),
                        brand: Some(CardBrand::MasterCard),
                    }
                );
                // Mastercard's 21 on a Mastercard: the card is disabled.
                assert_eq!(
                    crate::domain::decline::classify(&signal).action,
                    crate::domain::decline::DeclineAction::DisableCard
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_documented_error_shape_has_its_answer() {
        use ChargeOutcome as O;
        let with_code = |status: u16, kind: &str, code: &str| {
            charge_answer(&reply(
                status,
                &format!(r#"{{"error":{{"type":"{kind}","code":"{code}","message":"m"}}}}"#),
            ))
        };
        // localstripe's decline: 402, invalid_request_error, card_declined, no decline_code.
        let local = charge_answer(&reply(
            402,
            r#"{"error":{"charge":"ch_3","code":"card_declined","message":"Your card was declined.","type":"invalid_request_error"}}"#,
        ));
        assert!(
            matches!(&local, O::Declined { signal, reference, .. } if signal.code == "generic_decline" && reference.as_deref() == Some("ch_3")),
            "{local:?}"
        );
        assert!(
            matches!(with_code(402, "card_error", "expired_card"), O::Declined { signal, .. } if signal.code == "expired_card")
        );
        assert!(
            matches!(with_code(402, "card_error", "authentication_required"), O::Declined { signal, .. } if signal.code == "authentication_required")
        );
        assert!(matches!(
            with_code(400, "idempotency_error", "idempotency_key_in_use"),
            O::IdempotencyMismatch { .. }
        ));
        assert!(matches!(
            with_code(409, "idempotency_error", "idempotency_key_in_use"),
            O::Busy { .. }
        ));
        assert!(matches!(
            with_code(409, "invalid_request_error", "lock_timeout"),
            O::Busy { .. }
        ));
        let limited = charge_answer(&Reply {
            retry_after: Some(Duration::from_secs(2)),
            should_retry: Some(true),
            ..reply(
                429,
                r#"{"error":{"type":"invalid_request_error","code":"rate_limit"}}"#,
            )
        });
        assert_eq!(
            limited,
            O::Busy {
                detail: "HTTP 429: invalid_request_error: rate_limit".into(),
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert!(matches!(
            with_code(401, "invalid_request_error", "api_key_expired"),
            O::Refused { .. }
        ));
        assert!(matches!(
            with_code(403, "invalid_request_error", "secret_key_required"),
            O::Refused { .. }
        ));
        assert!(
            matches!(with_code(400, "invalid_request_error", "parameter_unknown"), O::Declined { signal, .. } if signal.code == "parameter_unknown")
        );
        assert!(
            matches!(with_code(400, "invalid_request_error", "amount_too_small"), O::Declined { signal, .. } if signal.code == "amount_too_small")
        );
        assert!(matches!(
            with_code(404, "invalid_request_error", "resource_missing"),
            O::Declined { .. }
        ));
        let retry_me = charge_answer(&Reply {
            should_retry: Some(true),
            ..reply(
                400,
                r#"{"error":{"type":"invalid_request_error","code":"lock_timeout"}}"#,
            )
        });
        assert!(matches!(retry_me, O::Busy { .. }), "{retry_me:?}");
        assert!(matches!(
            with_code(500, "api_error", ""),
            O::Unknown {
                replayed: false,
                ..
            }
        ));
        let replayed = charge_answer(&Reply {
            replayed: true,
            ..reply(500, r#"{"error":{"type":"api_error"}}"#)
        });
        assert!(matches!(replayed, O::Unknown { replayed: true, .. }));
        assert!(matches!(
            charge_answer(&reply(502, "<html>bad gateway</html>")),
            O::Unknown { .. }
        ));
        assert!(matches!(
            charge_answer(&reply(200, "not json")),
            O::Unknown { .. }
        ));
    }

    #[test]
    fn each_payment_intent_state_has_its_meaning() {
        let pi = |status: &str, error: &str| {
            serde_json::from_str::<PaymentIntent>(&format!(
                r#"{{"id":"pi_s","status":"{status}","amount":100,"currency":"usd","created":1{error}}}"#
            ))
            .unwrap()
        };
        assert_eq!(pi("succeeded", "").settled(), Settled::Approved);
        assert!(
            matches!(pi("requires_payment_method", r#","last_payment_error":{"code":"card_declined","decline_code":"insufficient_funds"}"#).settled(), Settled::Declined(s) if s.code == "insufficient_funds")
        );
        assert!(matches!(
            pi("requires_payment_method", "").settled(),
            Settled::NotCharged(_)
        ));
        assert!(
            matches!(pi("requires_action", "").settled(), Settled::Declined(s) if s.code == "authentication_required")
        );
        assert!(matches!(
            pi("canceled", "").settled(),
            Settled::NotCharged(_)
        ));
        assert!(matches!(pi("processing", "").settled(), Settled::Open(_)));
        assert!(matches!(
            pi("requires_capture", "").settled(),
            Settled::Open(_)
        ));
        // Processing is never resent: the answer is unknown and settled by lookup only.
        assert!(matches!(
            pi("processing", "").outcome(),
            ChargeOutcome::Unknown { replayed: true, .. }
        ));
    }

    #[test]
    fn a_payment_intent_s_metadata_names_its_attempt() {
        let r = request();
        let body = format!(
            r#"{{"id":"pi_m","status":"succeeded","amount":12500,"currency":"usd","created":1796300000,
            "metadata":{{"installation_id":"0193a5b2-7c1e-7d3f-9a41-212345678900","payment_id":"{}","schedule_id":"{}","occurrence":"2026-12-01","attempt":"1","account_last4":"0042"}}}}"#,
            r.payment_id, r.schedule_id
        );
        let pi: PaymentIntent = serde_json::from_str(&body).unwrap();
        let a = pi.attempt().unwrap();
        assert_eq!(a.idempotency_key, r.idempotency_key);
        assert_eq!(
            (a.payment_id, a.attempt, a.approved),
            (r.payment_id, 1, true)
        );
        assert_eq!(a.amount, r.amount);
        assert!(pi.is_attempt(r.payment_id, 1) && !pi.is_attempt(r.payment_id, 2));
        assert!(pi.belongs_to(installation_of(&r.idempotency_key).unwrap()));
        assert!(!pi.belongs_to(Uuid::nil()));
        // Someone else's PaymentIntent names no attempt.
        let foreign: PaymentIntent = serde_json::from_str(
            r#"{"id":"pi_x","status":"succeeded","amount":1,"currency":"usd","created":1,"metadata":{"order":"7"}}"#,
        )
        .unwrap();
        assert!(foreign.attempt().is_none());
    }

    #[test]
    fn only_unknown_parameters_turn_the_list_filters_off() {
        let e = |body: &str| error_of(&reply(400, body));
        // localstripe, and Stripe's own word for a parameter it does not know.
        assert!(refuses_list_filters(&e(
            r#"{"error":{"type":"invalid_request_error","message":"Unexpected customer, created[gte]"}}"#
        )));
        assert!(refuses_list_filters(&e(
            r#"{"error":{"code":"parameter_unknown","param":"created[gte]","message":"Received unknown parameter: created[gte]"}}"#
        )));
        // A customer deleted in the Dashboard is not a server without filters.
        let gone = e(
            r#"{"error":{"code":"resource_missing","param":"customer","message":"No such customer: 'cus_1'"}}"#,
        );
        assert!(!refuses_list_filters(&gone));
        assert!(customer_missing(&gone));
        assert!(!refuses_list_filters(&e(
            r#"{"error":{"code":"parameter_invalid_integer","param":"created[gte]","message":"Invalid integer: created"}}"#
        )));
    }

    #[test]
    fn error_descriptions_are_bounded_and_never_carry_a_key_or_card_number() {
        let d = describe(&reply(
            401,
            r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided: sk_test_****1234 for card 4242424242424242"}}"#,
        ));
        assert!(!d.contains("4242424242424242"), "{d}");
        let long = describe(&reply(
            500,
            &format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(5000)),
        ));
        assert!(long.len() < 300, "{}", long.len());
    }

    #[test]
    fn payment_methods_give_brand_last_four_and_expiry() {
        let pm: PaymentMethod = serde_json::from_str(
            r#"{"id":"pm_1","customer":null,"livemode":false,"card":{"brand":"mastercard","last4":"4444","exp_month":4,"exp_year":2031,"fingerprint":"fp1"}}"#,
        )
        .unwrap();
        let d = pm.details().unwrap();
        assert_eq!(
            (d.brand, d.last4.as_str(), d.expiry.month(), d.expiry.year()),
            (CardBrand::MasterCard, "4444", 4, 2031)
        );
        let not_card: PaymentMethod =
            serde_json::from_str(r#"{"id":"pm_2","type":"us_bank_account"}"#).unwrap();
        assert!(not_card.details().is_err());
        assert_eq!(brand("discover"), CardBrand::Discover);
        assert_eq!(brand("unionpay"), CardBrand::Other);
    }
}
