//! The simulated processor: the embedded default, behaving like an external one.
//!
//! Outcomes follow the public test card numbers (table below, also in docs/processor.md). A
//! token encodes the outcome, brand, last four and expiry, never the card number:
//! `sim_{outcome}_{brand}_{last4}_{MMYYYY}_{nonce}` (12 hex digits). The member portal's tokens
//! from Stripe's test mode (`tok_visa`, `tok_chargeDeclined`, ...) are accepted too.
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
//! Every charge is written to the processor's own ledger (see `ledger.rs`): in memory, a SQLite
//! file (by default `simulated-processor.db` beside autopay's) or PostgreSQL, each charge in a
//! transaction of its own, so an engine crash or a restore of autopay's database never rewrites
//! the processor's history. Idempotency keys are honoured (the same key gives the first result,
//! other parameters an idempotency error), and lookups answer from the ledger.
//!
//! Injected faults, decided per charge (repeatably with a seed): `timeout_before_charge` answers
//! "unknown" without charging, `drop_after_charge` charges and then answers "unknown".

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod ledger;

use async_trait::async_trait;
use jiff::Timestamp;
use uuid::Uuid;

use self::ledger::{Charge, ChargeLedger};
use super::{
    AttemptRef, CardDetails, CardOwner, ChargeOutcome, ChargeRequest, Lookup, Processor,
    ProcessorAttempt, ProcessorError, Tokenized,
};
use crate::clock::Clock;
use crate::config::{Backend, DatabaseUrl, Latency, Ledger, SimulatedSettings};
use crate::domain::card::{CardBrand, CardNumber, Expiry, Last4, SecurityCode};
use crate::domain::decline::DeclineSignal;
use crate::domain::ids::PaymentId;
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

/// A token's 12 hex digits of randomness, with at least one letter among them: twelve digits
/// in a row could pass the Luhn check, and a token must never look like a card number.
fn nonce() -> String {
    loop {
        let hex = Uuid::new_v4().simple().to_string();
        let nonce = &hex[..12];
        if nonce.bytes().any(|b| b.is_ascii_alphabetic()) {
            return nonce.to_string();
        }
    }
}

/// The file the ledger lives in when `processor.simulated.ledger` is empty.
pub const LEDGER_FILE: &str = "simulated-processor.db";

/// Where an empty `processor.simulated.ledger` puts the ledger: `simulated-processor.db` beside
/// autopay's SQLite file, or in the working directory when autopay runs on PostgreSQL. None when
/// autopay's own database is in memory: then the ledger is in memory too, and goes with it.
fn ledger_beside(autopay_db: &DatabaseUrl) -> Option<PathBuf> {
    match autopay_db.backend() {
        Backend::Postgres => Some(PathBuf::from(LEDGER_FILE)),
        Backend::Sqlite => autopay_db
            .sqlite_path()
            .map(|path| path.with_file_name(LEDGER_FILE)),
    }
}

/// splitmix64: a tiny, fast, deterministic generator; plenty for deciding injected faults.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f64 {
        // The top 53 bits fill an f64's mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The injected faults and the generator that decides them.
#[derive(Debug)]
struct Faults {
    drop_after_charge: f64,
    timeout_before_charge: f64,
    rng: SplitMix64,
}

/// What happens to one charge call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The call times out before the processor charges: nothing recorded, outcome unknown.
    TimeoutBeforeCharge,
    /// The processor charges (and records it), then the answer is lost: outcome unknown.
    DropAfterCharge,
}

/// A fraction from 0.0 to 1.0 (anything else is clamped; NaN is 0).
fn share(f: f64) -> f64 {
    if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) }
}

impl Faults {
    fn new(drop_after_charge: f64, timeout_before_charge: f64, seed: Option<u64>) -> Faults {
        let seed = seed.unwrap_or_else(|| Uuid::new_v4().as_u64_pair().0);
        Faults {
            drop_after_charge: share(drop_after_charge),
            timeout_before_charge: share(timeout_before_charge),
            rng: SplitMix64(seed),
        }
    }

    /// Two draws for every charge, whatever the shares, so a seed replays the same sequence.
    fn roll(&mut self) -> Fault {
        let timeout = self.rng.next_unit();
        let drop = self.rng.next_unit();
        if timeout < self.timeout_before_charge {
            Fault::TimeoutBeforeCharge
        } else if drop < self.drop_after_charge {
            Fault::DropAfterCharge
        } else {
            Fault::None
        }
    }
}

/// The simulated processor.
pub struct SimulatedProcessor {
    clock: Arc<dyn Clock>,
    latency: Latency,
    /// Draws each call's latency when it is spread (apart from the faults' draws, so a seed
    /// replays the same faults whatever the latency).
    latency_rng: Mutex<SplitMix64>,
    ledger: ChargeLedger,
    faults: Mutex<Faults>,
}

impl SimulatedProcessor {
    /// The processor `processor.simulated` describes, its ledger opened (and created when
    /// missing) where `processor.simulated.ledger` says: `memory`, a database URL of its own, or
    /// by default `simulated-processor.db` beside autopay's SQLite file (in the working directory
    /// when autopay runs on PostgreSQL; in memory when autopay's own database is). `rng_seed`
    /// makes the injected faults repeatable.
    pub async fn open(
        settings: &SimulatedSettings,
        autopay_db: &DatabaseUrl,
        clock: Arc<dyn Clock>,
        rng_seed: Option<u64>,
    ) -> Result<SimulatedProcessor, ProcessorError> {
        let ledger = match &settings.ledger {
            Ledger::Memory => ChargeLedger::memory(),
            Ledger::Url(url) => ChargeLedger::open_url(url).await?,
            Ledger::Beside => match ledger_beside(autopay_db) {
                Some(path) => ChargeLedger::open_sqlite_file(&path).await?,
                None => ChargeLedger::memory(),
            },
        };
        tracing::info!(ledger = %ledger.label(), "the simulated processor's ledger is open");
        Ok(SimulatedProcessor {
            clock,
            latency: settings.latency,
            latency_rng: Mutex::new(SplitMix64(Uuid::new_v4().as_u64_pair().1)),
            ledger,
            faults: Mutex::new(Faults::new(
                settings.drop_after_charge,
                settings.timeout_before_charge,
                rng_seed,
            )),
        })
    }

    /// A processor whose ledger is in memory and forgotten at exit, without injected faults: for
    /// unit tests and benchmarks.
    pub fn in_memory(clock: Arc<dyn Clock>, latency: Duration) -> SimulatedProcessor {
        SimulatedProcessor {
            clock,
            latency: Latency::Fixed(latency),
            latency_rng: Mutex::new(SplitMix64(Uuid::new_v4().as_u64_pair().1)),
            ledger: ChargeLedger::memory(),
            faults: Mutex::new(Faults::new(0.0, 0.0, None)),
        }
    }

    /// The same as [`SimulatedProcessor::in_memory`].
    pub fn new(clock: Arc<dyn Clock>, latency: Duration) -> SimulatedProcessor {
        SimulatedProcessor::in_memory(clock, latency)
    }

    /// Where the ledger lives (`memory`, or its URL with any password redacted).
    pub fn ledger_location(&self) -> &str {
        self.ledger.label()
    }

    /// Changes the injected faults from now on (fractions from 0.0 to 1.0): a test hook, so a
    /// simulation can make the processor misbehave for a while.
    pub fn set_faults(&self, drop_after_charge: f64, timeout_before_charge: f64) {
        let mut faults = self.faults();
        faults.drop_after_charge = share(drop_after_charge);
        faults.timeout_before_charge = share(timeout_before_charge);
    }

    /// How many charges the ledger holds (every key once, approved or declined).
    pub async fn ledger_count(&self) -> Result<u64, ProcessorError> {
        self.ledger.count().await
    }

    /// Every charge the ledger holds for one payment, oldest first, whatever its attempt: a
    /// simulation's "charged twice?" check.
    pub async fn charges_for(
        &self,
        payment_id: PaymentId,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        self.ledger.by_payment(payment_id).await
    }

    /// Every call from now on takes `latency` (a benchmark's slow processor).
    pub fn with_latency(mut self, latency: Latency) -> SimulatedProcessor {
        self.latency = latency;
        self
    }

    async fn delay(&self) {
        if self.latency.is_zero() {
            return;
        }
        let z = match self.latency {
            Latency::Fixed(_) => 0.0,
            Latency::Tail { .. } => {
                let mut rng = self
                    .latency_rng
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Box-Muller: two uniform draws make one standard normal draw.
                let u1 = 1.0 - rng.next_unit();
                let u2 = rng.next_unit();
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
        };
        tokio::time::sleep(self.latency.at(z)).await;
    }

    fn today(&self) -> jiff::civil::Date {
        self.clock
            .now()
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .date()
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The charge itself, once the call has reached the processor.
    async fn charge_reached(&self, request: &ChargeRequest) -> ChargeOutcome {
        match self.ledger.by_key(&request.idempotency_key).await {
            Ok(Some(stored)) => return answer_for(&stored, request, self.today()),
            Ok(None) => {}
            Err(e) => return unreachable_ledger(e),
        }
        let token = match SimToken::decode(&request.token, self.today()) {
            Ok(t) => t,
            Err(e) => {
                return ChargeOutcome::Declined {
                    signal: DeclineSignal::code("invalid_token"),
                    message: e.to_string(),
                    reference: None,
                };
            }
        };
        if token.outcome == Outcome::Timeout {
            return ChargeOutcome::Unknown {
                detail: "the simulated processor timed out before charging".into(),
                replayed: false,
            };
        }
        // Whole microseconds: what both SQL backends keep, so every backend answers alike.
        let now = self.clock.now();
        let created_at = Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now);
        let charge = Charge {
            request: request.clone(),
            attempt: ProcessorAttempt {
                idempotency_key: request.idempotency_key.clone(),
                reference: format!("sim_ch_{}", Uuid::now_v7().simple()),
                payment_id: request.payment_id,
                schedule_id: request.schedule_id,
                occurrence: request.occurrence.clone(),
                attempt: request.attempt,
                amount: request.amount,
                approved: token.outcome == Outcome::Approve,
                decline: token.outcome.decline_code().map(DeclineSignal::code),
                created_at,
            },
        };
        // A concurrent call with the same key may have recorded first: answer with what is
        // stored, as a real processor would.
        match self.ledger.record(&charge).await {
            Ok(stored) => answer_for(&stored, request, self.today()),
            Err(e) => unreachable_ledger(e),
        }
    }
}

#[async_trait]
impl Processor for SimulatedProcessor {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn tokenize(
        &self,
        _owner: &CardOwner,
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
        Ok(Tokenized {
            token: token.encode(&nonce()),
            details,
            fingerprint: None,
            customer: None,
        })
    }

    /// A token this processor issued (`sim_{outcome}_{brand}_{last4}_{MMYYYY}_{nonce}`, the
    /// nonce 12 lower-case hex digits), or one of the portal test tokens.
    fn check_token(&self, token: &str) -> Result<(), ProcessorError> {
        super::refuse_card_number(token)?;
        let refused = || {
            ProcessorError::Rejected(
                "the simulated processor does not know this token; use a token it issued (sim_{outcome}_{brand}_{last4}_{MMYYYY}_{12 hex digits}) or a test token such as tok_visa".into(),
            )
        };
        if PORTAL_TOKENS.iter().any(|t| t.0 == token) {
            return Ok(());
        }
        let nonce = token.rsplit('_').next().unwrap_or_default();
        let nonce_ok = nonce.len() == 12
            && nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let charset_ok = token.len() <= super::MAX_TOKEN_LEN
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !token.starts_with("sim_") || !nonce_ok || !charset_ok {
            return Err(refused());
        }
        SimToken::decode(token, self.today())
            .map(|_| ())
            .map_err(|_| refused())
    }

    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError> {
        self.delay().await;
        Ok(SimToken::decode(token, self.today())?.details)
    }

    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        self.delay().await;
        let fault = self.faults().roll();
        if fault == Fault::TimeoutBeforeCharge {
            return ChargeOutcome::Unknown {
                detail: "the call to the simulated processor timed out before it charged (processor.simulated.timeout_before_charge)".into(),
                replayed: false,
            };
        }
        let answer = self.charge_reached(request).await;
        if fault == Fault::DropAfterCharge {
            return ChargeOutcome::Unknown {
                detail: "the simulated processor's answer was lost after it charged (processor.simulated.drop_after_charge)".into(),
                replayed: false,
            };
        }
        answer
    }

    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup {
        self.delay().await;
        match self
            .ledger
            .by_attempt(attempt.payment_id, attempt.attempt)
            .await
        {
            Ok(Some(found)) => Lookup::Found(Box::new(found)),
            Ok(None) => Lookup::NotFound,
            Err(e) => Lookup::Unknown {
                detail: e.to_string(),
            },
        }
    }

    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        self.delay().await;
        self.ledger.since(since).await
    }
}

/// The answer for a request whose key the ledger holds: the first result when the parameters
/// are the same, an idempotency error naming what differs when they are not.
fn answer_for(stored: &Charge, request: &ChargeRequest, today: jiff::civil::Date) -> ChargeOutcome {
    let (s, r) = (&stored.request, request);
    let differs: Vec<&str> = [
        ("token", s.token != r.token),
        ("amount", s.amount != r.amount),
        ("payment_id", s.payment_id != r.payment_id),
        ("schedule_id", s.schedule_id != r.schedule_id),
        ("occurrence", s.occurrence != r.occurrence),
        ("attempt", s.attempt != r.attempt),
        ("account_last4", s.account_last4 != r.account_last4),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect();
    if !differs.is_empty() {
        return ChargeOutcome::IdempotencyMismatch {
            detail: format!(
                "this idempotency key was first used with another {}",
                differs.join(", ")
            ),
        };
    }
    outcome_of(&stored.attempt, &stored.request.token, today)
}

fn unreachable_ledger(e: ProcessorError) -> ChargeOutcome {
    ChargeOutcome::Unknown {
        detail: e.to_string(),
        replayed: false,
    }
}

/// The answer a stored charge gives: a decline names the brand of the card it was made on, and
/// an approval a network transaction id derived from the charge (the same on every replay).
fn outcome_of(attempt: &ProcessorAttempt, token: &str, today: jiff::civil::Date) -> ChargeOutcome {
    match &attempt.decline {
        None => ChargeOutcome::Approved {
            reference: attempt.reference.clone(),
            network_transaction_id: Some(format!(
                "sim_ntid_{}",
                attempt.reference.trim_start_matches("sim_ch_")
            )),
        },
        Some(decline) => {
            let mut signal = decline.clone();
            if let Ok(t) = SimToken::decode(token, today) {
                signal = signal.or_brand(t.details.brand);
            }
            ChargeOutcome::Declined {
                message: format!("the card was declined ({})", signal.code),
                signal,
                reference: Some(attempt.reference.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::card::luhn_valid;
    use crate::domain::ids::{MemberId, ScheduleId};
    use crate::domain::money::{Currency, Money};

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new("2026-11-30T09:00:00Z".parse().unwrap()))
    }

    /// A lookup of one attempt by its metadata, as the engine makes it.
    fn attempt_ref(payment_id: PaymentId, attempt: i64) -> AttemptRef {
        AttemptRef {
            payment_id,
            attempt,
            customer: None,
            idempotency_key: format!("k{attempt}"),
            first_sent_at: Timestamp::UNIX_EPOCH,
        }
    }

    fn owner() -> CardOwner {
        CardOwner {
            member_id: MemberId::from_uuid(Uuid::nil()),
            customer: None,
        }
    }

    fn processor() -> SimulatedProcessor {
        SimulatedProcessor::in_memory(clock(), Duration::ZERO)
    }

    fn settings(
        ledger: Ledger,
        drop_after_charge: f64,
        timeout_before_charge: f64,
    ) -> SimulatedSettings {
        SimulatedSettings {
            latency: Latency::Fixed(Duration::ZERO),
            ledger,
            drop_after_charge,
            timeout_before_charge,
        }
    }

    fn autopay_sqlite(dir: &std::path::Path) -> DatabaseUrl {
        DatabaseUrl::parse(
            &format!("sqlite://{}", dir.join("autopay.db").display()),
            None,
        )
        .unwrap()
    }

    /// A processor whose ledger is the SQLite file `ledger.db` in `dir`.
    async fn on_sqlite(dir: &std::path::Path, drop: f64, timeout: f64) -> SimulatedProcessor {
        let url = format!("sqlite://{}", dir.join("ledger.db").display());
        SimulatedProcessor::open(
            &settings(Ledger::Url(url), drop, timeout),
            &autopay_sqlite(dir),
            clock(),
            Some(1),
        )
        .await
        .expect("open a SQLite ledger")
    }

    async fn on_memory(drop: f64, timeout: f64) -> SimulatedProcessor {
        let dir = std::path::Path::new("/nowhere");
        SimulatedProcessor::open(
            &settings(Ledger::Memory, drop, timeout),
            &autopay_sqlite(dir),
            clock(),
            Some(1),
        )
        .await
        .expect("open a memory ledger")
    }

    async fn tokenize(p: &SimulatedProcessor, number: &str) -> Tokenized {
        let n = CardNumber::parse(number).unwrap();
        let cvc = SecurityCode::parse("123", n.brand()).unwrap();
        p.tokenize(&owner(), &n, &cvc, Expiry::new(4, 2030).unwrap())
            .await
            .unwrap()
    }

    fn request(token: &str, key: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            token: token.into(),
            amount: Money::from_minor(12_500, Currency::USD),
            payment_id: PaymentId::from_uuid(Uuid::nil()),
            schedule_id: ScheduleId::from_uuid(Uuid::nil()),
            occurrence: "2026-12-01".into(),
            attempt: 1,
            account_last4: "0001".into(),
            customer: None,
            statement_descriptor_suffix: None,
        }
    }

    /// A request for its own payment, so checks on one ledger never see each other's rows.
    fn request_for(payment_id: PaymentId, token: &str, key: &str) -> ChargeRequest {
        ChargeRequest {
            payment_id,
            ..request(token, key)
        }
    }

    fn reference(outcome: &ChargeOutcome) -> String {
        match outcome {
            ChargeOutcome::Approved { reference, .. } => reference.clone(),
            other => panic!("expected an approval, got {other:?}"),
        }
    }

    /// Idempotency, lookups and listings, on whatever ledger `p` has (empty at the start).
    async fn honours_keys_and_answers_from_its_ledger(p: &SimulatedProcessor) {
        let visa = tokenize(p, "4242424242424242").await;
        let payment = PaymentId::new();
        let first = p.charge(&request_for(payment, &visa.token, "k1")).await;
        let again = p.charge(&request_for(payment, &visa.token, "k1")).await;
        assert_eq!(reference(&first), reference(&again));
        assert_eq!(p.ledger_count().await.unwrap(), 1);

        let mut other = request_for(payment, &visa.token, "k1");
        other.amount = Money::from_minor(1, Currency::USD);
        match p.charge(&other).await {
            ChargeOutcome::IdempotencyMismatch { detail } => {
                assert!(detail.contains("amount"), "{detail}")
            }
            o => panic!("expected an idempotency mismatch, got {o:?}"),
        }
        assert_eq!(
            p.ledger_count().await.unwrap(),
            1,
            "a mismatch charges nothing"
        );

        let lost = tokenize(p, "4000000000009987").await;
        let mut second = request_for(payment, &lost.token, "k2");
        second.attempt = 2;
        assert!(matches!(
            p.charge(&second).await,
            ChargeOutcome::Declined { signal, .. } if signal.code == "lost_card"
        ));

        match p.find_attempt(&attempt_ref(payment, 1)).await {
            Lookup::Found(a) => {
                assert_eq!(a.reference, reference(&first));
                assert!(a.approved);
                assert_eq!(a.amount, Money::from_minor(12_500, Currency::USD));
                assert_eq!(a.occurrence, "2026-12-01");
                assert_eq!(
                    a.created_at,
                    "2026-11-30T09:00:00Z".parse::<Timestamp>().unwrap()
                );
            }
            other => panic!("expected the first attempt, got {other:?}"),
        }
        match p.find_attempt(&attempt_ref(payment, 2)).await {
            Lookup::Found(a) => {
                assert!(!a.approved);
                assert_eq!(a.decline_code(), Some("lost_card"));
            }
            other => panic!("expected the second attempt, got {other:?}"),
        }
        assert_eq!(
            p.find_attempt(&attempt_ref(payment, 3)).await,
            Lookup::NotFound
        );
        assert_eq!(
            p.find_attempt(&attempt_ref(PaymentId::new(), 1)).await,
            Lookup::NotFound
        );

        let charges = p.charges_for(payment).await.unwrap();
        assert_eq!(
            charges.iter().map(|a| a.attempt).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let listed = p
            .list_attempts("2026-11-30T09:00:00Z".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(listed, charges);
        assert!(
            p.list_attempts("2026-11-30T09:00:01Z".parse().unwrap())
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// 20 charges with one key at once: one ledger row, one answer.
    async fn one_row_for_concurrent_charges_with_one_key(p: Arc<SimulatedProcessor>) {
        let before = p.ledger_count().await.unwrap();
        let visa = tokenize(&p, "4242424242424242").await;
        let payment = PaymentId::new();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let p = p.clone();
                let r = request_for(payment, &visa.token, "same-key");
                tokio::spawn(async move { p.charge(&r).await })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let first = reference(&answers[0]);
        assert!(answers.iter().all(|a| reference(a) == first), "{answers:?}");
        assert_eq!(p.ledger_count().await.unwrap(), before + 1);
        assert_eq!(p.charges_for(payment).await.unwrap().len(), 1);
    }

    /// Both injected faults, switched on and off with [`SimulatedProcessor::set_faults`].
    async fn injected_faults_do_what_they_say(p: &SimulatedProcessor) {
        let visa = tokenize(p, "4242424242424242").await;
        let before = p.ledger_count().await.unwrap();

        p.set_faults(1.0, 0.0);
        let dropped = PaymentId::new();
        let answer = p
            .charge(&request_for(dropped, &visa.token, "dropped"))
            .await;
        assert!(
            matches!(answer, ChargeOutcome::Unknown { .. }),
            "{answer:?}"
        );
        assert_eq!(
            p.ledger_count().await.unwrap(),
            before + 1,
            "the charge happened"
        );
        let Lookup::Found(found) = p.find_attempt(&attempt_ref(dropped, 1)).await else {
            panic!("the lookup must find the dropped charge");
        };
        assert!(found.approved);

        p.set_faults(0.0, 1.0);
        let timed_out = PaymentId::new();
        let answer = p
            .charge(&request_for(timed_out, &visa.token, "timed-out"))
            .await;
        assert!(
            matches!(answer, ChargeOutcome::Unknown { .. }),
            "{answer:?}"
        );
        assert_eq!(
            p.ledger_count().await.unwrap(),
            before + 1,
            "nothing charged"
        );
        assert_eq!(
            p.find_attempt(&attempt_ref(timed_out, 1)).await,
            Lookup::NotFound
        );

        // Faults off: the dropped key answers with the charge it made, the other charges now.
        p.set_faults(0.0, 0.0);
        let again = p
            .charge(&request_for(dropped, &visa.token, "dropped"))
            .await;
        assert_eq!(reference(&again), found.reference);
        let now = p
            .charge(&request_for(timed_out, &visa.token, "timed-out"))
            .await;
        reference(&now);
        assert_eq!(p.ledger_count().await.unwrap(), before + 2);
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
    async fn only_tokens_of_its_own_shape_pass_the_token_check() {
        let p = processor();
        for number in TEST_CARDS.iter().map(|(n, _)| *n) {
            let t = tokenize(&p, number).await;
            assert!(p.check_token(&t.token).is_ok(), "{}", t.token);
            assert!(!crate::domain::card::contains_card_number(&t.token));
        }
        assert!(p.check_token("tok_visa").is_ok());
        for bad in [
            "sim_approve_visa_4242_122030_4242424242424242",
            "sim_approve_visa_4242_122030_0123456789a",
            "sim_approve_visa_4242_122030_0123456789aZ",
            "sim_approve_visa_4242_132030_0123456789ab",
            "sim_approve_visa_4242_122030_0123456789ab_x",
            "sim_nope_visa_4242_122030_0123456789ab",
            "tok_nonsense",
            "pm_1NqXyz2eZvKYlo2C",
            "tok_visa ",
        ] {
            let err = p.check_token(bad).unwrap_err().to_string();
            assert!(!err.contains("4242424242424242"), "{err}");
        }
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
            p.find_attempt(&attempt_ref(PaymentId::from_uuid(Uuid::nil()), 1))
                .await,
            Lookup::Found(_)
        ));
        assert_eq!(
            p.find_attempt(&attempt_ref(PaymentId::from_uuid(Uuid::nil()), 2))
                .await,
            Lookup::NotFound
        );
        assert_eq!(
            p.list_attempts("2026-01-01T00:00:00Z".parse().unwrap())
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn declines_and_timeouts_follow_the_table_and_a_timeout_records_nothing() {
        let p = processor();
        let lost = tokenize(&p, "4000000000009987").await;
        assert!(
            matches!(p.charge(&request(&lost.token, "a")).await, ChargeOutcome::Declined { signal, .. } if signal.code == "lost_card")
        );
        let slow = tokenize(&p, "4000000000008880").await;
        let mut timeout = request(&slow.token, "b");
        timeout.attempt = 2;
        assert!(matches!(
            p.charge(&timeout).await,
            ChargeOutcome::Unknown { .. }
        ));
        assert_eq!(p.ledger_count().await.unwrap(), 1);
        assert_eq!(
            p.find_attempt(&attempt_ref(PaymentId::from_uuid(Uuid::nil()), 2))
                .await,
            Lookup::NotFound
        );
    }

    #[tokio::test]
    async fn a_sqlite_ledger_honours_keys_and_answers_from_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = on_sqlite(dir.path(), 0.0, 0.0).await;
        assert!(dir.path().join("ledger.db").exists());
        honours_keys_and_answers_from_its_ledger(&p).await;
    }

    #[tokio::test]
    async fn a_sqlite_ledger_keeps_its_history_when_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let p = on_sqlite(dir.path(), 0.0, 0.0).await;
        let visa = tokenize(&p, "4242424242424242").await;
        let payment = PaymentId::new();
        let first = reference(&p.charge(&request_for(payment, &visa.token, "kept")).await);
        drop(p);

        let reopened = on_sqlite(dir.path(), 0.0, 0.0).await;
        assert_eq!(reopened.ledger_count().await.unwrap(), 1);
        let Lookup::Found(found) = reopened.find_attempt(&attempt_ref(payment, 1)).await else {
            panic!("the reopened ledger must remember the charge");
        };
        assert_eq!(found.reference, first);
        let again = reopened
            .charge(&request_for(payment, &visa.token, "kept"))
            .await;
        assert_eq!(
            reference(&again),
            first,
            "the key is honoured across a restart"
        );
        assert_eq!(reopened.ledger_count().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn on_a_sqlite_ledger_a_dropped_answer_still_charges_and_a_timeout_charges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = on_sqlite(dir.path(), 1.0, 0.0).await;
        injected_faults_do_what_they_say(&p).await;
    }

    #[tokio::test]
    async fn settings_with_every_answer_dropped_charge_and_answer_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let p = on_sqlite(dir.path(), 1.0, 0.0).await;
        let visa = tokenize(&p, "4242424242424242").await;
        let payment = PaymentId::new();
        let answer = p.charge(&request_for(payment, &visa.token, "d")).await;
        assert!(
            matches!(answer, ChargeOutcome::Unknown { .. }),
            "{answer:?}"
        );
        assert!(matches!(
            p.find_attempt(&attempt_ref(payment, 1)).await,
            Lookup::Found(_)
        ));
        assert_eq!(p.ledger_count().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn settings_with_every_call_timing_out_charge_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = on_sqlite(dir.path(), 0.0, 1.0).await;
        let visa = tokenize(&p, "4242424242424242").await;
        let payment = PaymentId::new();
        let answer = p.charge(&request_for(payment, &visa.token, "t")).await;
        assert!(
            matches!(answer, ChargeOutcome::Unknown { .. }),
            "{answer:?}"
        );
        assert_eq!(
            p.find_attempt(&attempt_ref(payment, 1)).await,
            Lookup::NotFound
        );
        assert_eq!(p.ledger_count().await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn twenty_concurrent_charges_with_one_key_leave_one_sqlite_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(on_sqlite(dir.path(), 0.0, 0.0).await);
        one_row_for_concurrent_charges_with_one_key(p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_memory_ledger_behaves_the_same() {
        let p = on_memory(0.0, 0.0).await;
        assert_eq!(p.ledger_location(), "memory");
        honours_keys_and_answers_from_its_ledger(&p).await;
        injected_faults_do_what_they_say(&p).await;
        one_row_for_concurrent_charges_with_one_key(Arc::new(p)).await;
    }

    #[tokio::test]
    async fn the_default_ledger_is_a_file_beside_autopays_sqlite_database() {
        let dir = tempfile::tempdir().unwrap();
        let p = SimulatedProcessor::open(
            &settings(Ledger::Beside, 0.0, 0.0),
            &autopay_sqlite(dir.path()),
            clock(),
            None,
        )
        .await
        .unwrap();
        let file = dir.path().join(LEDGER_FILE);
        assert!(file.exists(), "{}", file.display());
        assert_eq!(p.ledger_location(), format!("sqlite://{}", file.display()));

        let pg = DatabaseUrl::parse("postgres://u:pw@db.example/autopay", None).unwrap();
        assert_eq!(ledger_beside(&pg), Some(PathBuf::from(LEDGER_FILE)));
        let relative = DatabaseUrl::parse("sqlite://autopay.db", None).unwrap();
        assert_eq!(ledger_beside(&relative), Some(PathBuf::from(LEDGER_FILE)));
        let nested =
            DatabaseUrl::parse("sqlite:///var/lib/autopay/autopay.db?mode=rwc", None).unwrap();
        assert_eq!(
            ledger_beside(&nested),
            Some(PathBuf::from("/var/lib/autopay").join(LEDGER_FILE))
        );
        let in_memory = DatabaseUrl::parse("sqlite::memory:", None).unwrap();
        assert_eq!(ledger_beside(&in_memory), None);
    }

    #[tokio::test]
    async fn a_ledger_that_cannot_open_says_where_and_how_to_fix_it_without_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("sqlite://{}/no/such/folder/ledger.db", dir.path().display());
        let Err(ProcessorError::Unavailable(message)) = SimulatedProcessor::open(
            &settings(Ledger::Url(missing.clone()), 0.0, 0.0),
            &autopay_sqlite(dir.path()),
            clock(),
            None,
        )
        .await
        else {
            panic!("a ledger in a missing folder must not open");
        };
        assert!(message.contains(&missing), "{message}");
        assert!(message.contains("folder exists"), "{message}");
        assert!(message.contains("processor.simulated.ledger"), "{message}");

        let Err(ProcessorError::Unavailable(message)) = SimulatedProcessor::open(
            &settings(
                Ledger::Url("postgres://sim:hunter2@127.0.0.1:notaport/ledger".into()),
                0.0,
                0.0,
            ),
            &autopay_sqlite(dir.path()),
            clock(),
            None,
        )
        .await
        else {
            panic!("a malformed PostgreSQL URL must not open");
        };
        assert!(!message.contains("hunter2"), "{message}");
        assert!(
            message.contains("postgres://sim:[redacted]@127.0.0.1"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_seed_makes_the_injected_faults_repeatable() {
        async fn unknowns(seed: u64) -> Vec<bool> {
            let p = SimulatedProcessor::open(
                &settings(Ledger::Memory, 0.3, 0.3),
                &DatabaseUrl::parse("sqlite::memory:", None).unwrap(),
                clock(),
                Some(seed),
            )
            .await
            .unwrap();
            let visa = tokenize(&p, "4242424242424242").await;
            let mut out = Vec::new();
            for i in 0..64 {
                let r = request_for(PaymentId::new(), &visa.token, &format!("k{i}"));
                out.push(matches!(p.charge(&r).await, ChargeOutcome::Unknown { .. }));
            }
            out
        }
        let a = unknowns(42).await;
        assert_eq!(a, unknowns(42).await);
        let hits = a.iter().filter(|u| **u).count();
        // P(unknown) = 0.3 + 0.7 * 0.3 = 0.51; 64 draws land well inside 10..=54.
        assert!((10..=54).contains(&hits), "{hits} of 64");
        assert_ne!(a, unknowns(43).await);
    }

    /// A throwaway PostgreSQL database, dropped with the value (even when a test fails).
    struct ThrowawayPg {
        admin: String,
        name: String,
        url: String,
    }

    impl ThrowawayPg {
        async fn create() -> ThrowawayPg {
            use sqlx::Connection;
            let admin = std::env::var("TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is required for this test and cannot be reached at {}: {e}. \
                     Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) \
                     or point TEST_DATABASE_URL at one.",
                    crate::config::redact_url(&admin)
                )
            });
            let name = format!("autopay_simledger_{}", Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .expect("CREATE DATABASE on the test PostgreSQL");
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            let url = format!("{base}/{name}");
            ThrowawayPg { admin, name, url }
        }
    }

    impl Drop for ThrowawayPg {
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            // Drop may run inside a runtime; use a thread with a runtime of its own.
            let _ = std::thread::spawn(move || {
                use sqlx::Connection;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async {
                    let mut conn = sqlx::PgConnection::connect(&admin)
                        .await
                        .expect("reconnect to drop the throwaway database");
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await
                    .expect("DROP DATABASE");
                });
            })
            .join();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_postgresql_ledger_behaves_the_same_and_keeps_its_history() {
        let db = ThrowawayPg::create().await;
        let open = || async {
            SimulatedProcessor::open(
                &settings(Ledger::Url(db.url.clone()), 0.0, 0.0),
                &autopay_sqlite(std::path::Path::new("/nowhere")),
                clock(),
                Some(7),
            )
            .await
            .expect("open a PostgreSQL ledger")
        };
        let p = open().await;
        honours_keys_and_answers_from_its_ledger(&p).await;
        injected_faults_do_what_they_say(&p).await;
        let p = Arc::new(p);
        one_row_for_concurrent_charges_with_one_key(p.clone()).await;
        let count = p.ledger_count().await.unwrap();
        assert_eq!(count, 5);
        drop(p);

        // Two more processors open the same ledger: the table is there, the history kept.
        let (a, b) = tokio::join!(open(), open());
        assert_eq!(a.ledger_count().await.unwrap(), count);
        assert_eq!(b.ledger_count().await.unwrap(), count);
    }
}
