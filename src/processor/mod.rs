//! The payment-processor boundary: one [`Processor`] trait, with the simulated processor (the
//! embedded default) beside it. The engine knows nothing about which processor is behind it.
//!
//! Card numbers and security codes exist only on their way into [`Processor::tokenize`]; what
//! comes back, and what autopay stores, is a token plus what may be shown (brand, last four,
//! expiry).

pub mod simulated;
pub mod stripe;

use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;
use serde::Serialize;

use crate::clock::Clock;
use crate::config::{DatabaseUrl, ProcessorKind, ProcessorSettings};
use crate::domain::attempt::{Answer, LookupAnswer};
use crate::domain::card::{CardBrand, CardNumber, Expiry, Last4, SecurityCode};
use crate::domain::decline::DeclineSignal;
use crate::domain::ids::{MemberId, PaymentId};

/// What the processor knows about a stored card now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardDetails {
    pub brand: CardBrand,
    pub last4: Last4,
    pub expiry: Expiry,
}

/// A tokenized card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub token: String,
    pub details: CardDetails,
    /// The processor's fingerprint of the card number, when it gives one: the same card added
    /// twice has the same fingerprint, and the card networks' limits count per card.
    pub fingerprint: Option<String>,
    /// The processor's customer the card is saved to, when the processor keeps customers; a
    /// member's first card creates it, and the member keeps it.
    pub customer: Option<String>,
}

/// Whose card is being saved: the member, and the processor's customer for them when one was
/// made before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardOwner {
    pub member_id: MemberId,
    pub customer: Option<String>,
}

pub use crate::domain::attempt::{AttemptRef, ChargeRequest, ProcessorAttempt};

/// What a charge call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Approved {
        reference: String,
        /// The card network's id of the charge, when the processor gives it: the card keeps
        /// the first one as its stored-credential reference.
        network_transaction_id: Option<String>,
    },
    Declined {
        /// The processor's decline code with the network's advice and the card's brand.
        signal: DeclineSignal,
        message: String,
        /// The processor's record of the declined charge, when it made one.
        reference: Option<String>,
    },
    /// The call did not say whether money moved: a timeout, a dropped connection, a 5xx.
    /// `replayed` when the processor replayed a stored server error for this key.
    Unknown { detail: String, replayed: bool },
    /// Nothing was decided: "key in use" (409), a rate limit (429), or a connection that failed
    /// before the request was written. Send the same request again after a wait, at least
    /// `retry_after` when the processor named one.
    Busy {
        detail: String,
        retry_after: Option<std::time::Duration>,
    },
    /// The processor refused autopay's credentials (401, 403) before reading the request.
    Refused { detail: String },
    /// The same key was used with other parameters: an operator must look.
    IdempotencyMismatch { detail: String },
}

impl ChargeOutcome {
    /// The answer the unknown-outcome rule reads.
    pub fn answer(&self) -> Answer {
        match self {
            ChargeOutcome::Approved {
                reference,
                network_transaction_id,
            } => Answer::Approved {
                reference: reference.clone(),
                network_transaction_id: network_transaction_id.clone(),
            },
            ChargeOutcome::Declined {
                signal, reference, ..
            } => Answer::Declined {
                signal: signal.clone(),
                reference: reference.clone(),
            },
            ChargeOutcome::Unknown { detail, replayed } => Answer::Unknown {
                detail: detail.clone(),
                replayed: *replayed,
            },
            ChargeOutcome::Busy { detail, .. } => Answer::Busy {
                detail: detail.clone(),
            },
            ChargeOutcome::Refused { detail } => Answer::Refused {
                detail: detail.clone(),
            },
            ChargeOutcome::IdempotencyMismatch { detail } => Answer::Mismatch {
                detail: detail.clone(),
            },
        }
    }
}

/// The answer to "did this attempt happen?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Box<ProcessorAttempt>),
    NotFound,
    /// The processor could not answer now; ask again later.
    Unknown {
        detail: String,
    },
}

impl Lookup {
    /// The answer the unknown-outcome rule reads.
    pub fn answer(&self) -> LookupAnswer {
        match self {
            Lookup::Found(found) => LookupAnswer::Found {
                approved: found.approved,
                reference: found.reference.clone(),
                decline: found.decline.clone(),
            },
            Lookup::NotFound => LookupAnswer::NotFound,
            Lookup::Unknown { detail } => LookupAnswer::Unknown {
                detail: detail.clone(),
            },
        }
    }
}

/// What a processor's notification (a webhook) says, once autopay has read the object it names
/// again from the processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessorEvent {
    /// An attempt's outcome is known.
    Settled(Box<ProcessorAttempt>),
    /// A saved card's details changed (the networks' card updater).
    CardUpdated { token: String, details: CardDetails },
    /// A charge was refunded, in part or in full (`amount`: refunded so far).
    Refunded {
        payment_id: PaymentId,
        reference: String,
        amount: crate::domain::money::Money,
    },
    /// The cardholder disputed a charge, for `reason` (the processor's spelling).
    Disputed {
        payment_id: PaymentId,
        reference: String,
        reason: String,
    },
    /// Nothing for this installation to act on, and why.
    Ignored { why: String },
}

/// Why the processor refused a request outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessorError {
    /// The card or token was refused; the message says why and what to do.
    #[error("{0}")]
    Rejected(String),
    /// The processor cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// The processor's settings cannot work (exit 78).
    #[error("{0}")]
    Config(String),
}

/// Opens the processor `processor.kind` names, as every command and the daemon use it, for the
/// installation whose charges it makes (Stripe reads only its own).
pub async fn open(
    settings: &ProcessorSettings,
    autopay_db: &DatabaseUrl,
    clock: Arc<dyn Clock>,
    installation: uuid::Uuid,
) -> Result<Arc<dyn Processor>, ProcessorError> {
    match settings.kind {
        ProcessorKind::Simulated => Ok(Arc::new(
            simulated::SimulatedProcessor::open(&settings.simulated, autopay_db, clock, None)
                .await?,
        )),
        ProcessorKind::Stripe => Ok(open_stripe(settings, installation)?),
    }
}

/// The Stripe adapter itself (the daemon keeps it for webhooks beside the engine's view).
pub fn open_stripe(
    settings: &ProcessorSettings,
    installation: uuid::Uuid,
) -> Result<Arc<stripe::StripeProcessor>, ProcessorError> {
    Ok(Arc::new(stripe::StripeProcessor::new(
        &settings.stripe,
        settings.timeout.as_std(),
        installation,
    )?))
}

/// A payment processor.
#[async_trait]
pub trait Processor: Send + Sync {
    /// The name stored beside each token ("simulated", "stripe").
    fn name(&self) -> &'static str;
    /// `test` or `live`, for a processor whose keys have modes: a card saved in one mode
    /// cannot be charged in the other. `None` for a processor without modes.
    fn mode(&self) -> Option<&'static str> {
        None
    }
    /// Exchanges a card number and security code for a token saved for `owner`. Neither is
    /// kept.
    async fn tokenize(
        &self,
        owner: &CardOwner,
        number: &CardNumber,
        security_code: &SecurityCode,
        expiry: Expiry,
    ) -> Result<Tokenized, ProcessorError>;
    /// Takes a token a member portal collected (`card add --token`), once [`check_token`]
    /// passed: refuses a card saved for someone else, saves it for `owner`, and reads what may
    /// be shown. The default reads the details of a token that needs no saving.
    ///
    /// [`check_token`]: Processor::check_token
    async fn adopt(&self, owner: &CardOwner, token: &str) -> Result<Tokenized, ProcessorError> {
        let details = self.card_details(token).await?;
        Ok(Tokenized {
            token: token.to_string(),
            details,
            fingerprint: None,
            customer: owner.customer.clone(),
        })
    }
    /// Refuses a token handed in from outside (`card add --token`) that does not have the shape
    /// of this processor's tokens, before it is looked up, logged or stored: a card number pasted
    /// as a token, or text that is no token at all. The message never repeats the token. The
    /// default is the shape every processor's ids share ([`check_opaque_token`]); adapters
    /// narrow it to their own.
    fn check_token(&self, token: &str) -> Result<(), ProcessorError> {
        check_opaque_token(token)
    }
    /// Brand, last four and expiry of a token, as the processor knows them now.
    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError>;
    /// Charges a token once per idempotency key.
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome;
    /// Looks up one attempt: by its metadata (payment and attempt number) or its key.
    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup;
    /// Hands over the process's rate limit (`processor.max_requests_per_second`). The caller
    /// takes one turn per call; a processor whose one call may be several requests takes a
    /// turn for each request after the first. The default ignores it.
    fn share_limiter(&self, _limiter: Arc<crate::limiter::RateLimiter>) {}
    /// Every charge this installation made since `since`, for `reconcile`.
    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError>;
}

/// The longest token autopay accepts from outside; processors' ids are far shorter (Stripe's
/// are under 100 characters).
pub const MAX_TOKEN_LEN: usize = 255;

/// Refuses a token that holds what could be a card number (the card-number detector of
/// `domain::card`), without repeating it: the first check of every [`Processor::check_token`].
pub fn refuse_card_number(token: &str) -> Result<(), ProcessorError> {
    if crate::domain::card::contains_card_number(token) {
        return Err(ProcessorError::Rejected(
            "this looks like a card number, not a processor token; card numbers are read from standard input (card add --exp MM/YYYY), never given as arguments".into(),
        ));
    }
    Ok(())
}

/// The shape every processor's ids share: ASCII letters, digits and underscores, 1 to
/// [`MAX_TOKEN_LEN`] of them, holding nothing that could be a card number.
pub fn check_opaque_token(token: &str) -> Result<(), ProcessorError> {
    refuse_card_number(token)?;
    let well_formed = !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if well_formed {
        Ok(())
    } else {
        Err(ProcessorError::Rejected(format!(
            "this is not a processor token: tokens are 1 to {MAX_TOKEN_LEN} letters, digits and underscores"
        )))
    }
}

/// Stripe's ids for a card a member portal collected: a PaymentMethod (`pm_...`), a legacy
/// token (`tok_...`) or a SetupIntent (`seti_...`), each an opaque token
/// ([`check_opaque_token`]) of at most 100 characters. For the Stripe adapter.
pub fn check_stripe_token(token: &str) -> Result<(), ProcessorError> {
    check_opaque_token(token)?;
    let known = ["pm_", "tok_", "seti_"]
        .iter()
        .any(|p| token.len() > p.len() && token.starts_with(p));
    if known && token.len() <= 100 {
        Ok(())
    } else {
        Err(ProcessorError::Rejected(
            "this is not a Stripe card token; give the pm_..., tok_... or seti_... id the member portal received".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn processor_ids_are_letters_digits_and_underscores_without_a_card_number() {
        assert!(check_opaque_token("pm_1NqXyz2eZvKYlo2C").is_ok());
        for bad in [
            "",
            "pm_1 2",
            "tok_visa\n",
            "tok_visa;rm",
            "../etc/passwd",
            "t\u{202E}ok",
            "pm_4242424242424242",
            "4242424242424242",
            "tok_4242-4242-4242-4242",
        ] {
            let err = check_opaque_token(bad).unwrap_err().to_string();
            assert!(!err.contains("4242"), "{err}");
        }
        assert!(check_opaque_token(&"a".repeat(MAX_TOKEN_LEN)).is_ok());
        assert!(check_opaque_token(&"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn stripe_tokens_are_payment_methods_tokens_or_setup_intents() {
        for ok in ["pm_1NqXyz2eZvKYlo2C", "tok_visa", "seti_1Mm2cBLkdIwHu7ix"] {
            assert!(check_stripe_token(ok).is_ok(), "{ok}");
        }
        for bad in [
            "pm_",
            "cus_123",
            "sk_live_abc",
            "pm_a-b",
            &format!("pm_{}", "a".repeat(98)),
        ] {
            assert!(check_stripe_token(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn an_accepted_token_is_short_plain_ascii_without_a_card_number(s in "\\PC{0,300}|[A-Za-z0-9_]{0,300}") {
            if check_opaque_token(&s).is_ok() {
                prop_assert!(s.len() <= MAX_TOKEN_LEN);
                prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
                prop_assert!(!crate::domain::card::contains_card_number(&s));
            }
        }
    }
}
