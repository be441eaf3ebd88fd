//! Stripe's webhooks: the signature check on the raw bytes, and the re-fetch that turns an
//! event into what autopay acts on. An event is only a hint: its object is read again from the
//! API with the pinned version, so a forged or stale body can at most make autopay ask.

use std::time::Duration;

use jiff::Timestamp;
use ring::hmac;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::StripeProcessor;
use super::wire::{self, PaymentIntent};
use crate::domain::ids::PaymentId;
use crate::domain::money::{Currency, Money};
use crate::processor::ProcessorEvent;

/// A webhook refused: the status to answer and why (never the body or a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// Checks a `Stripe-Signature` header (`t=...,v1=...[,v1=...]`) against the raw body: an
/// HMAC-SHA256 of `"{t}.{body}"` under any of `secrets`, compared in constant time, with `t`
/// within `tolerance` of `now`.
pub fn verify(
    header: &str,
    body: &[u8],
    secrets: &[SecretString],
    tolerance: Duration,
    now: Timestamp,
) -> Result<(), Refusal> {
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.trim().parse().ok(),
            Some(("v1", s)) => {
                if let Some(bytes) = hex(s.trim()) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return Err(refuse(400, "the Stripe-Signature header has no timestamp"));
    };
    if signatures.is_empty() {
        return Err(refuse(
            400,
            "the Stripe-Signature header has no v1 signature",
        ));
    }
    let age = now.as_second().abs_diff(t);
    if age > tolerance.as_secs() {
        return Err(refuse(
            400,
            format!(
                "the signed timestamp is {age}s from now, more than processor.stripe.webhook_tolerance ({}s)",
                tolerance.as_secs()
            ),
        ));
    }
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    for secret in secrets {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose_secret().as_bytes());
        if signatures
            .iter()
            .any(|s| hmac::verify(&key, &signed, s).is_ok())
        {
            return Ok(());
        }
    }
    Err(refuse(
        400,
        "no signature matches any of processor.stripe.webhook_secret",
    ))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why an event's object could not be read back: Stripe refused the read (the object does
/// not exist), or could not answer (503: deliver again).
enum RefusalOr {
    Rejected(String),
    Refusal(Refusal),
}

impl From<crate::processor::ProcessorError> for RefusalOr {
    fn from(e: crate::processor::ProcessorError) -> RefusalOr {
        match e {
            crate::processor::ProcessorError::Rejected(why) => RefusalOr::Rejected(why),
            other => RefusalOr::Refusal(refuse(503, other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct EventWire {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    livemode: bool,
    data: EventData,
}

#[derive(Debug, Clone, Deserialize)]
struct EventData {
    object: ObjectRef,
}

#[derive(Debug, Clone, Deserialize)]
struct ObjectRef {
    id: String,
}

/// A verified event: what it names, before its object is read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub id: String,
    pub kind: String,
    pub livemode: bool,
    pub object: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ChargeWire {
    id: String,
    payment_intent: Option<String>,
    #[serde(default)]
    amount_refunded: i64,
    currency: String,
}

#[derive(Debug, Clone, Deserialize)]
struct DisputeWire {
    id: String,
    charge: Option<String>,
    payment_intent: Option<String>,
    #[serde(default)]
    reason: String,
}

impl StripeProcessor {
    /// Checks a webhook's signature and reads what it names. Nothing is fetched yet.
    pub fn verify_webhook(
        &self,
        signature: Option<&str>,
        body: &[u8],
        now: Timestamp,
    ) -> Result<Verified, Refusal> {
        if self.webhook_secrets.is_empty() {
            return Err(refuse(
                404,
                "webhooks are off: processor.stripe.webhook_secret is not set",
            ));
        }
        let header =
            signature.ok_or_else(|| refuse(400, "the request has no Stripe-Signature header"))?;
        verify(
            header,
            body,
            &self.webhook_secrets,
            self.webhook_tolerance,
            now,
        )?;
        let event: EventWire = serde_json::from_slice(body)
            .map_err(|e| refuse(400, format!("the event is not a Stripe event ({e})")))?;
        Ok(Verified {
            id: event.id,
            kind: event.kind,
            livemode: event.livemode,
            object: event.data.object.id,
        })
    }

    /// Reads the event's object again from the API and says what it means for this
    /// installation. An unreachable API is a 503, so that Stripe delivers the event again.
    pub async fn resolve_webhook(&self, event: &Verified) -> Result<ProcessorEvent, Refusal> {
        match self.read_back(event).await {
            // Stripe says the object does not exist (or is not a card): nothing to act on.
            Err(RefusalOr::Rejected(why)) => Ok(ProcessorEvent::Ignored { why }),
            Err(RefusalOr::Refusal(r)) => Err(r),
            Ok(e) => Ok(e),
        }
    }

    async fn read_back(&self, event: &Verified) -> Result<ProcessorEvent, RefusalOr> {
        let ignored = |why: &str| Ok(ProcessorEvent::Ignored { why: why.into() });
        if event.livemode != (self.mode == crate::config::StripeMode::Live) {
            return ignored("an event of the other mode (test or live) than the key");
        }
        let unavailable = RefusalOr::from;
        match event.kind.as_str() {
            "payment_intent.succeeded" | "payment_intent.payment_failed" => {
                let pi = self
                    .payment_intent(&event.object)
                    .await
                    .map_err(unavailable)?;
                if !pi.belongs_to(self.installation) {
                    return ignored("a PaymentIntent of another installation or of no autopay");
                }
                match pi.attempt() {
                    Some(a) => Ok(ProcessorEvent::Settled(Box::new(a))),
                    None => ignored("the PaymentIntent is still open"),
                }
            }
            "payment_method.automatically_updated" => {
                self.turn().await;
                let pm = self
                    .payment_method(&event.object)
                    .await
                    .map_err(unavailable)?;
                let details = pm.details().map_err(unavailable)?;
                Ok(ProcessorEvent::CardUpdated {
                    token: pm.id,
                    details,
                })
            }
            "charge.refunded" => {
                self.turn().await;
                let reply = self
                    .get(&format!("/v1/charges/{}", event.object), &[])
                    .await
                    .map_err(unavailable)?;
                let charge: ChargeWire = wire::object(&reply, "Charge").map_err(unavailable)?;
                let Some((payment_id, reference)) =
                    self.ours(charge.payment_intent.as_deref()).await?
                else {
                    return ignored("a charge of another installation or of no autopay");
                };
                let currency = Currency::parse(&charge.currency.to_ascii_uppercase())
                    .map_err(|e| RefusalOr::Rejected(e.to_string()))?;
                Ok(ProcessorEvent::Refunded {
                    payment_id,
                    reference: format!("{reference} ({})", charge.id),
                    amount: Money::from_minor(charge.amount_refunded, currency),
                })
            }
            "charge.dispute.created" => {
                self.turn().await;
                let reply = self
                    .get(&format!("/v1/disputes/{}", event.object), &[])
                    .await
                    .map_err(unavailable)?;
                let dispute: DisputeWire = wire::object(&reply, "Dispute").map_err(unavailable)?;
                let pi = match dispute.payment_intent {
                    Some(pi) => Some(pi),
                    None => match &dispute.charge {
                        Some(ch) => {
                            self.turn().await;
                            let reply = self
                                .get(&format!("/v1/charges/{ch}"), &[])
                                .await
                                .map_err(unavailable)?;
                            wire::object::<ChargeWire>(&reply, "Charge")
                                .map_err(unavailable)?
                                .payment_intent
                        }
                        None => None,
                    },
                };
                let Some((payment_id, reference)) = self.ours(pi.as_deref()).await? else {
                    return ignored("a dispute of another installation's charge or of no autopay");
                };
                Ok(ProcessorEvent::Disputed {
                    payment_id,
                    reference: format!("{reference} ({})", dispute.id),
                    reason: dispute.reason,
                })
            }
            _ => ignored("an event type autopay does not act on"),
        }
    }

    async fn payment_intent(
        &self,
        id: &str,
    ) -> Result<PaymentIntent, crate::processor::ProcessorError> {
        self.turn().await;
        let reply = self
            .get(
                &format!("/v1/payment_intents/{id}"),
                &[("expand[]", "latest_charge".to_string())],
            )
            .await?;
        wire::object(&reply, "PaymentIntent")
    }

    /// The payment a PaymentIntent of this installation was made for, with its id.
    async fn ours(
        &self,
        payment_intent: Option<&str>,
    ) -> Result<Option<(PaymentId, String)>, RefusalOr> {
        let Some(id) = payment_intent else {
            return Ok(None);
        };
        let pi = self.payment_intent(id).await?;
        if !pi.belongs_to(self.installation) {
            return Ok(None);
        }
        Ok(pi
            .metadata
            .get(wire::meta::PAYMENT)
            .and_then(|p| p.parse::<PaymentId>().ok())
            .map(|p| (p, pi.id.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = format!("{t}.").into_bytes();
        signed.extend_from_slice(body);
        let tag = hmac::sign(&key, &signed);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from(s.to_string()))
            .collect()
    }

    #[test]
    fn a_signature_of_any_configured_secret_within_the_tolerance_passes() {
        let body = br#"{"id":"evt_1"}"#;
        let now = Timestamp::from_second(1_796_300_000).unwrap();
        let t = now.as_second() - 10;
        let five = Duration::from_secs(300);
        let header = format!("t={t},v1={}", sign(SECRET, t, body));
        assert!(verify(&header, body, &secrets(&[SECRET]), five, now).is_ok());
        // During a rotation, the old and the new secret both verify; several v1 too.
        let both = secrets(&["whsec_new", SECRET]);
        assert!(verify(&header, body, &both, five, now).is_ok());
        let two = format!("t={t},v1={},v1={}", "00".repeat(32), sign(SECRET, t, body));
        assert!(verify(&two, body, &secrets(&[SECRET]), five, now).is_ok());
    }

    #[test]
    fn a_bad_signature_a_changed_body_or_a_stale_timestamp_is_refused() {
        let body = br#"{"id":"evt_1"}"#;
        let now = Timestamp::from_second(1_796_300_000).unwrap();
        let five = Duration::from_secs(300);
        let t = now.as_second();
        let good = sign(SECRET, t, body);
        for (header, body) in [
            (
                format!("t={t},v1={}", sign("whsec_other", t, body)),
                &body[..],
            ),
            (format!("t={t},v1={good}"), &br#"{"id":"evt_2"}"#[..]),
            (format!("t={t},v0={good}"), &body[..]),
            (format!("v1={good}"), &body[..]),
            (format!("t={t},v1=zz"), &body[..]),
            (String::new(), &body[..]),
        ] {
            let r = verify(&header, body, &secrets(&[SECRET]), five, now).unwrap_err();
            assert_eq!(r.status, 400, "{header}");
        }
        let old = now.as_second() - 301;
        let stale = format!("t={old},v1={}", sign(SECRET, old, body));
        let r = verify(&stale, body, &secrets(&[SECRET]), five, now).unwrap_err();
        assert!(r.message.contains("webhook_tolerance"), "{r:?}");
        let future = now.as_second() + 301;
        let ahead = format!("t={future},v1={}", sign(SECRET, future, body));
        assert!(verify(&ahead, body, &secrets(&[SECRET]), five, now).is_err());
    }
}
