//! The payment-processor boundary: one [`Processor`] trait, with the simulated processor (the
//! embedded default) beside it. The engine knows nothing about which processor is behind it.
//!
//! Card numbers and security codes exist only on their way into [`Processor::tokenize`]; what
//! comes back, and what autopay stores, is a token plus what may be shown (brand, last four,
//! expiry).

mod ledger;
pub mod simulated;

use async_trait::async_trait;
use jiff::Timestamp;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::attempt::{Answer, LookupAnswer};
use crate::domain::card::{CardBrand, CardNumber, Expiry, Last4, SecurityCode};
use crate::domain::money::Money;

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
}

pub use crate::domain::attempt::{AttemptRef, ChargeRequest};

/// What a charge call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Approved {
        reference: String,
    },
    Declined {
        code: String,
        message: String,
        /// The processor's record of the declined charge, when it made one.
        reference: Option<String>,
    },
    /// The call did not say whether money moved: a timeout, a dropped connection, a 5xx.
    /// `replayed` when the processor replayed a stored server error for this key.
    Unknown {
        detail: String,
        replayed: bool,
    },
    /// Nothing was decided: "key in use" (409), a rate limit (429), or a connection that failed
    /// before the request was written. Send the same request again after a wait.
    Busy {
        detail: String,
    },
    /// The same key was used with other parameters: an operator must look.
    IdempotencyMismatch {
        detail: String,
    },
}

impl ChargeOutcome {
    /// The answer the unknown-outcome rule reads.
    pub fn answer(&self) -> Answer {
        match self {
            ChargeOutcome::Approved { reference } => Answer::Approved {
                reference: reference.clone(),
            },
            ChargeOutcome::Declined {
                code, reference, ..
            } => Answer::Declined {
                code: code.clone(),
                reference: reference.clone(),
            },
            ChargeOutcome::Unknown { detail, replayed } => Answer::Unknown {
                detail: detail.clone(),
                replayed: *replayed,
            },
            ChargeOutcome::Busy { detail } => Answer::Busy {
                detail: detail.clone(),
            },
            ChargeOutcome::IdempotencyMismatch { detail } => Answer::Mismatch {
                detail: detail.clone(),
            },
        }
    }
}

/// What the processor holds for one attempt, found by its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorAttempt {
    pub reference: String,
    pub payment_id: Uuid,
    pub schedule_id: Uuid,
    pub occurrence: String,
    pub attempt: i64,
    pub amount: Money,
    pub approved: bool,
    pub decline_code: Option<String>,
    pub created_at: Timestamp,
}

/// The answer to "did this attempt happen?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(ProcessorAttempt),
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
                decline_code: found.decline_code.clone(),
            },
            Lookup::NotFound => LookupAnswer::NotFound,
            Lookup::Unknown { detail } => LookupAnswer::Unknown {
                detail: detail.clone(),
            },
        }
    }
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
}

/// A payment processor.
#[async_trait]
pub trait Processor: Send + Sync {
    /// The name stored beside each token ("simulated", "stripe").
    fn name(&self) -> &'static str;
    /// Exchanges a card number and security code for a token. Neither is kept.
    async fn tokenize(
        &self,
        number: &CardNumber,
        security_code: &SecurityCode,
        expiry: Expiry,
    ) -> Result<Tokenized, ProcessorError>;
    /// Brand, last four and expiry of a token, as the processor knows them now.
    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError>;
    /// Charges a token once per idempotency key.
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome;
    /// Looks up one attempt: by its metadata (payment and attempt number) or its key.
    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup;
    /// Every charge this installation made since `since`, for `reconcile`.
    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError>;
}
