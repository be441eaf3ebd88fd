//! The simulated processor: the embedded default, behaving like an external one.
//!
//! Outcomes follow the public test card numbers (table below, also in docs/processor.md). A
//! token encodes the outcome, brand, last four and expiry, never the card number:
//! `sim_{outcome}_{brand}_{last4}_{MMYYYY}_{random}`. The member portal's tokens from Stripe's
//! test mode (`tok_visa`, `tok_chargeDeclined`, ...) are accepted too.
//!
//! | number              | brand      | outcome              |
//! |---------------------|------------|----------------------|
//! | 4242424242424242    | Visa       | approve              |
//! | 5555555555554444    | MasterCard | approve              |
//! | 2223003122003222    | MasterCard | approve              |
//! | 6011111111111117    | Discover   | approve              |
//! | 4000000000000002    | Visa       | generic decline      |
//! | 4000000000009995    | Visa       | insufficient funds   |
//! | 4000000000009987    | Visa       | lost card            |
//! | 4000000000009979    | Visa       | stolen card          |
//! | 4000000000000069    | Visa       | expired card         |
//! | 4000000000007775    | Visa       | revoked authorization|
//! | 4000000000000119    | Visa       | processing error     |
//! | 4000000000008880    | Visa       | timeout              |
//! | any other valid one | its brand  | approve              |
//!
//! The ledger of charges lives in memory here; it honours idempotency keys (the same key gives
//! the first result, other parameters an idempotency error) and answers lookups from what it
//! recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use uuid::Uuid;

use super::{
    CardDetails, ChargeOutcome, ChargeRequest, Lookup, Processor, ProcessorAttempt, ProcessorError,
    Tokenized,
};
use crate::clock::Clock;
use crate::domain::card::{CardBrand, CardNumber, Expiry, Last4, SecurityCode};
use crate::domain::spelled_enum;

spelled_enum! {
    /// What the simulated processor does with a card.
    pub enum Outcome ("simulated outcome") {
        Approve => "approve",
        GenericDecline => "generic-decline",
        InsufficientFunds => "insufficient-funds",
        LostCard => "lost-card",
        StolenCard => "stolen-card",
        ExpiredCard => "expired-card",
        RevokedAuthorization => "revoked-authorization",
        ProcessingError => "processing-error",
        Timeout => "timeout",
    }
}

impl Outcome {
    /// The outcome a test card number stands for: its row of [`TEST_CARDS`], or approve.
    pub fn for_number(digits: &str) -> Outcome {
        TEST_CARDS
            .iter()
            .find(|(number, _)| *number == digits)
            .map_or(Outcome::Approve, |(_, outcome)| *outcome)
    }

    /// The decline code a processor would answer with (None for approve and timeout).
    pub fn decline_code(self) -> Option<&'static str> {
        match self {
            Outcome::Approve | Outcome::Timeout => None,
            Outcome::GenericDecline => Some("generic_decline"),
            Outcome::InsufficientFunds => Some("insufficient_funds"),
            Outcome::LostCard => Some("lost_card"),
            Outcome::StolenCard => Some("stolen_card"),
            Outcome::ExpiredCard => Some("expired_card"),
            Outcome::RevokedAuthorization => Some("revocation_of_authorization"),
            Outcome::ProcessingError => Some("processing_error"),
        }
    }
}

/// The public test card numbers and what the simulated processor does with each.
pub const TEST_CARDS: &[(&str, Outcome)] = &[
    ("4242424242424242", Outcome::Approve),
    ("5555555555554444", Outcome::Approve),
    ("2223003122003222", Outcome::Approve),
    ("6011111111111117", Outcome::Approve),
    ("4000000000000002", Outcome::GenericDecline),
    ("4000000000009995", Outcome::InsufficientFunds),
    ("4000000000009987", Outcome::LostCard),
    ("4000000000009979", Outcome::StolenCard),
    ("4000000000000069", Outcome::ExpiredCard),
    ("4000000000007775", Outcome::RevokedAuthorization),
    ("4000000000000119", Outcome::ProcessingError),
    ("4000000000008880", Outcome::Timeout),
];

/// Stripe test-mode tokens a member portal may hand over: (token, outcome, brand, last4).
const PORTAL_TOKENS: &[(&str, Outcome, CardBrand, &str)] = &[
    ("tok_visa", Outcome::Approve, CardBrand::Visa, "4242"),
    (
        "tok_mastercard",
        Outcome::Approve,
        CardBrand::MasterCard,
        "4444",
    ),
    (
        "tok_discover",
        Outcome::Approve,
        CardBrand::Discover,
        "1117",
    ),
    ("tok_amex", Outcome::Approve, CardBrand::Amex, "8431"),
    (
        "tok_chargeDeclined",
        Outcome::GenericDecline,
        CardBrand::Visa,
        "0002",
    ),
    (
        "tok_chargeDeclinedInsufficientFunds",
        Outcome::InsufficientFunds,
        CardBrand::Visa,
        "9995",
    ),
    (
        "tok_chargeDeclinedLostCard",
        Outcome::LostCard,
        CardBrand::Visa,
        "9987",
    ),
    (
        "tok_chargeDeclinedStolenCard",
        Outcome::StolenCard,
        CardBrand::Visa,
        "9979",
    ),
    (
        "tok_chargeDeclinedExpiredCard",
        Outcome::ExpiredCard,
        CardBrand::Visa,
        "0069",
    ),
    (
        "tok_chargeDeclinedProcessingError",
        Outcome::ProcessingError,
        CardBrand::Visa,
        "0119",
    ),
];

/// A token's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimToken {
    pub outcome: Outcome,
    pub details: CardDetails,
}

impl SimToken {
    pub fn encode(&self, nonce: &str) -> String {
        format!(
            "sim_{}_{}_{}_{:02}{:04}_{nonce}",
            self.outcome,
            self.details.brand.as_str(),
            self.details.last4,
            self.details.expiry.month(),
            self.details.expiry.year()
        )
    }

    /// Reads a token; `today` dates the portal tokens, which carry no expiry of their own.
    pub fn decode(token: &str, today: jiff::civil::Date) -> Result<SimToken, ProcessorError> {
        let refused = || {
            ProcessorError::Rejected(
                "the simulated processor does not know this token; use a token it issued (sim_...) or a test token such as tok_visa".into(),
            )
        };
        if let Some((_, outcome, brand, last4)) = PORTAL_TOKENS.iter().find(|t| t.0 == token) {
            let year = u16::try_from(today.year() + 3).map_err(|_| refused())?;
            return Ok(SimToken {
                outcome: *outcome,
                details: CardDetails {
                    brand: *brand,
                    last4: Last4::parse(last4).map_err(|_| refused())?,
                    expiry: Expiry::new(12, year).map_err(|_| refused())?,
                },
            });
        }
        let rest = token.strip_prefix("sim_").ok_or_else(refused)?;
        let parts: Vec<&str> = rest.split('_').collect();
        let [outcome, brand, last4, expiry, _nonce] = parts.as_slice() else {
            return Err(refused());
        };
        let (month, year) = expiry.split_at(expiry.len().min(2));
        Ok(SimToken {
            outcome: outcome.parse().map_err(|_| refused())?,
            details: CardDetails {
                brand: brand.parse().map_err(|_| refused())?,
                last4: Last4::parse(last4).map_err(|_| refused())?,
                expiry: Expiry::new(
                    month.parse().map_err(|_| refused())?,
                    year.parse().map_err(|_| refused())?,
                )
                .map_err(|_| refused())?,
            },
        })
    }
}

#[derive(Debug, Clone)]
struct LedgerEntry {
    request: ChargeRequest,
    attempt: ProcessorAttempt,
}

/// The simulated processor.
pub struct SimulatedProcessor {
    clock: Arc<dyn Clock>,
    latency: Duration,
    ledger: Mutex<HashMap<String, LedgerEntry>>,
}

impl SimulatedProcessor {
    pub fn new(clock: Arc<dyn Clock>, latency: Duration) -> SimulatedProcessor {
        SimulatedProcessor {
            clock,
            latency,
            ledger: Mutex::new(HashMap::new()),
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    fn today(&self) -> jiff::civil::Date {
        self.clock
            .now()
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, LedgerEntry>> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Processor for SimulatedProcessor {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn tokenize(
        &self,
        number: &CardNumber,
        _security_code: &SecurityCode,
        expiry: Expiry,
    ) -> Result<Tokenized, ProcessorError> {
        self.delay().await;
        let details = CardDetails {
            brand: number.brand(),
            last4: number.last4(),
            expiry,
        };
        let token = SimToken {
            outcome: Outcome::for_number(number.expose_digits()),
            details: details.clone(),
        };
        let nonce = Uuid::new_v4().simple().to_string();
        Ok(Tokenized {
            token: token.encode(&nonce[..12]),
            details,
        })
    }

    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError> {
        self.delay().await;
        Ok(SimToken::decode(token, self.today())?.details)
    }

    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        self.delay().await;
        if let Some(entry) = self.entries().get(&request.idempotency_key) {
            if entry.request != *request {
                return ChargeOutcome::IdempotencyMismatch {
                    detail: "this idempotency key was used with other parameters".into(),
                };
            }
            return outcome_of(&entry.attempt);
        }
        let token = match SimToken::decode(&request.token, self.today()) {
            Ok(t) => t,
            Err(e) => {
                return ChargeOutcome::Declined {
                    code: "invalid_token".into(),
                    message: e.to_string(),
                };
            }
        };
        if token.outcome == Outcome::Timeout {
            return ChargeOutcome::Unknown {
                detail: "the simulated processor timed out before charging".into(),
            };
        }
        let reference = format!("sim_ch_{}", Uuid::now_v7().simple());
        let attempt = ProcessorAttempt {
            reference,
            payment_id: request.payment_id,
            schedule_id: request.schedule_id,
            occurrence: request.occurrence.clone(),
            attempt: request.attempt,
            amount: request.amount,
            approved: token.outcome == Outcome::Approve,
            decline_code: token.outcome.decline_code().map(str::to_string),
            created_at: self.clock.now(),
        };
        let outcome = outcome_of(&attempt);
        self.entries().insert(
            request.idempotency_key.clone(),
            LedgerEntry {
                request: request.clone(),
                attempt,
            },
        );
        outcome
    }

    async fn find_attempt(&self, payment_id: Uuid, attempt: i64) -> Lookup {
        self.delay().await;
        self.entries()
            .values()
            .find(|e| e.attempt.payment_id == payment_id && e.attempt.attempt == attempt)
            .map_or(Lookup::NotFound, |e| Lookup::Found(e.attempt.clone()))
    }

    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        self.delay().await;
        let mut found: Vec<ProcessorAttempt> = self
            .entries()
            .values()
            .filter(|e| e.attempt.created_at >= since)
            .map(|e| e.attempt.clone())
            .collect();
        found.sort_by_key(|a| a.created_at);
        Ok(found)
    }
}

fn outcome_of(attempt: &ProcessorAttempt) -> ChargeOutcome {
    match &attempt.decline_code {
        None => ChargeOutcome::Approved {
            reference: attempt.reference.clone(),
        },
        Some(code) => ChargeOutcome::Declined {
            code: code.clone(),
            message: format!("the card was declined ({code})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::card::luhn_valid;
    use crate::domain::money::{Currency, Money};

    fn processor() -> SimulatedProcessor {
        let clock = Arc::new(ManualClock::new("2026-11-30T09:00:00Z".parse().unwrap()));
        SimulatedProcessor::new(clock, Duration::ZERO)
    }

    async fn tokenize(p: &SimulatedProcessor, number: &str) -> Tokenized {
        let n = CardNumber::parse(number).unwrap();
        let cvc = SecurityCode::parse("123", n.brand()).unwrap();
        p.tokenize(&n, &cvc, Expiry::new(4, 2030).unwrap())
            .await
            .unwrap()
    }

    fn request(token: &str, key: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            token: token.into(),
            amount: Money::from_minor(12_500, Currency::USD),
            payment_id: Uuid::nil(),
            schedule_id: Uuid::nil(),
            occurrence: "2026-12-01".into(),
            attempt: 1,
            account_number: "A1".into(),
        }
    }

    #[test]
    fn every_test_number_in_the_table_passes_its_check_digit() {
        for (n, outcome) in TEST_CARDS {
            assert!(luhn_valid(n), "{n}");
            assert_eq!(Outcome::for_number(n), *outcome);
        }
        assert_eq!(Outcome::for_number("4111111111111111"), Outcome::Approve);
    }

    #[tokio::test]
    async fn a_token_carries_the_outcome_and_details_but_never_the_number() {
        let p = processor();
        let t = tokenize(&p, "4000000000009995").await;
        assert!(!t.token.contains("4000000000009995"));
        assert!(
            t.token
                .starts_with("sim_insufficient-funds_visa_9995_042030_"),
            "{}",
            t.token
        );
        let details = p.card_details(&t.token).await.unwrap();
        assert_eq!(details, t.details);
        assert_eq!(details.last4.as_str(), "9995");
    }

    #[tokio::test]
    async fn portal_test_tokens_are_known_and_strangers_are_refused() {
        let p = processor();
        let d = p.card_details("tok_mastercard").await.unwrap();
        assert_eq!(d.brand, CardBrand::MasterCard);
        assert!(p.card_details("tok_nonsense").await.is_err());
        assert!(p.card_details("sim_approve_visa").await.is_err());
    }

    #[tokio::test]
    async fn the_same_key_gives_the_first_result_and_other_parameters_an_error() {
        let p = processor();
        let t = tokenize(&p, "4242424242424242").await;
        let first = p.charge(&request(&t.token, "k1")).await;
        let again = p.charge(&request(&t.token, "k1")).await;
        assert_eq!(first, again);
        let mut other = request(&t.token, "k1");
        other.amount = Money::from_minor(1, Currency::USD);
        assert!(matches!(
            p.charge(&other).await,
            ChargeOutcome::IdempotencyMismatch { .. }
        ));
        assert!(matches!(
            p.find_attempt(Uuid::nil(), 1).await,
            Lookup::Found(_)
        ));
        assert_eq!(p.find_attempt(Uuid::nil(), 2).await, Lookup::NotFound);
        assert_eq!(
            p.list_attempts("2026-01-01T00:00:00Z".parse().unwrap())
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn declines_and_timeouts_follow_the_table() {
        let p = processor();
        let lost = tokenize(&p, "4000000000009987").await;
        assert!(
            matches!(p.charge(&request(&lost.token, "a")).await, ChargeOutcome::Declined { code, .. } if code == "lost_card")
        );
        let slow = tokenize(&p, "4000000000008880").await;
        assert!(matches!(
            p.charge(&request(&slow.token, "b")).await,
            ChargeOutcome::Unknown { .. }
        ));
    }
}
