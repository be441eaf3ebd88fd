//! The Stripe adapter: the HTTP side. Each member has a Stripe Customer that carries only the
//! installation id and the member id; each charge is a PaymentIntent confirmed at once and
//! off-session, with the attempt's idempotency key and metadata naming the attempt; a lookup
//! lists the customer's PaymentIntents (never the search endpoint, which lags) and matches the
//! metadata. The wire format and its meaning are in [`wire`].
//!
//! Every request pins `processor.stripe.api_version`, is form-encoded, and carries the secret
//! key only in its Authorization header. Nothing here logs a request body or the key.

pub mod webhook;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use self::wire::{Form, List, PaymentIntent, PaymentMethod, Reply, SetupIntent};
use super::{
    AttemptRef, CardDetails, CardOwner, ChargeOutcome, ChargeRequest, Lookup, Processor,
    ProcessorAttempt, ProcessorError, Tokenized,
};
use crate::config::{StripeMode, StripeSettings};
use crate::domain::card::{CardNumber, Expiry, SecurityCode};
use crate::domain::money::{Currency, Money};
use crate::limiter::RateLimiter;

/// How far before `first_sent_at` a lookup starts listing: clocks differ, and Stripe stamps
/// `created` when it received the request.
const LOOKUP_MARGIN: jiff::SignedDuration = jiff::SignedDuration::from_mins(15);
/// PaymentIntents per page of a list (Stripe's maximum).
const PAGE: u32 = 100;
/// The most pages one lookup or reconcile reads before it gives up (and says so).
const MAX_PAGES: u32 = 10_000;

/// Stripe's published test card numbers, and the test PaymentMethods that stand for them: under
/// a test key, a number typed at `card add` is sent as its PaymentMethod, never as a number.
const TEST_PAYMENT_METHODS: &[(&str, &str)] = &[
    ("4242424242424242", "pm_card_visa"),
    ("4000056655665556", "pm_card_visa_debit"),
    ("5555555555554444", "pm_card_mastercard"),
    ("2223003122003222", "pm_card_mastercard"),
    ("5200828282828210", "pm_card_mastercard_debit"),
    ("6011111111111117", "pm_card_discover"),
    ("4000000000000002", "pm_card_visa_chargeDeclined"),
    (
        "4000000000009995",
        "pm_card_visa_chargeDeclinedInsufficientFunds",
    ),
    ("4000000000009987", "pm_card_visa_chargeDeclinedLostCard"),
    ("4000000000009979", "pm_card_visa_chargeDeclinedStolenCard"),
    ("4000000000000069", "pm_card_chargeDeclinedExpiredCard"),
    ("4000000000000127", "pm_card_chargeDeclinedIncorrectCvc"),
    ("4000000000000119", "pm_card_chargeDeclinedProcessingError"),
    ("4000000000000341", "pm_card_chargeCustomerFail"),
];

/// Stripe's smallest charge in a currency autopay knows, where Stripe publishes one. Where it
/// does not (KRW, BHD, KWD), Stripe's own refusal (`amount_too_small`) fails the payment.
pub fn minimum_charge(currency: Currency) -> Option<Money> {
    let minor = match currency.code() {
        "USD" | "AUD" | "CAD" | "CHF" | "EUR" | "NZD" => 50,
        "GBP" => 30,
        "JPY" => 50,
        "MXN" => 1000,
        _ => return None,
    };
    Some(Money::from_minor(minor, currency))
}

pub struct StripeProcessor {
    client: reqwest::Client,
    base: String,
    key: SecretString,
    version: String,
    mode: StripeMode,
    /// Whether the server filters lists by customer and creation time; cleared when it refuses
    /// them (a test peer), after which lists are paged whole.
    list_filters: AtomicBool,
    /// This installation: every PaymentIntent and Customer carries it, and lookups and
    /// reconcile read only its own.
    installation: Uuid,
    /// Whether numbers may be sent as numbers: only to a test peer on this machine
    /// (localstripe), never to Stripe or a proxy in front of it.
    raw_numbers: bool,
    /// The process's rate limit, for the pages of a list after its first.
    limiter: OnceLock<Arc<RateLimiter>>,
    /// Webhook signing secrets (old and new during a rotation) and how old a signed
    /// timestamp may be.
    webhook_secrets: Vec<SecretString>,
    webhook_tolerance: Duration,
}

/// The error of a call that never got an answer.
fn transport_error(e: &reqwest::Error) -> String {
    // reqwest's own text can hold the URL (never the key or body); keep it short.
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "lost the connection"
    };
    format!("the request to Stripe {kind}")
}

impl StripeProcessor {
    /// A client for the account `settings` name. `timeout` bounds every request.
    pub fn new(
        settings: &StripeSettings,
        timeout: Duration,
        installation: Uuid,
    ) -> Result<StripeProcessor, ProcessorError> {
        let key = settings.secret_key.clone().ok_or_else(|| {
            ProcessorError::Config(
                "processor.stripe.secret_key is not set; set processor.stripe.secret_key_file"
                    .into(),
            )
        })?;
        let mode = settings.mode.ok_or_else(|| {
            ProcessorError::Config(
                "processor.stripe.secret_key is not a Stripe secret key (sk_... or rk_...)".into(),
            )
        })?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("autopay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProcessorError::Config(format!("cannot build the HTTP client: {e}")))?;
        // Settings allow plain http only to this machine: a test peer, never Stripe.
        let raw_numbers = settings.api_base.starts_with("http://");
        Ok(StripeProcessor {
            client,
            base: settings.api_base.clone(),
            key,
            version: settings.api_version.clone(),
            mode,
            list_filters: AtomicBool::new(settings.list_filters),
            installation,
            raw_numbers,
            limiter: OnceLock::new(),
            webhook_secrets: settings.webhook_secrets.clone(),
            webhook_tolerance: settings.webhook_tolerance.as_std(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.expose_secret())
            .header("Stripe-Version", &self.version)
    }

    async fn reply(&self, builder: reqwest::RequestBuilder) -> Result<Reply, reqwest::Error> {
        let response = builder.send().await?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let replayed = header("Idempotent-Replayed").as_deref() == Some("true");
        let retry_after = header("Retry-After")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(60)));
        let should_retry = header("Stripe-Should-Retry").map(|v| v == "true");
        let body = response.text().await?;
        Ok(Reply {
            status,
            body,
            replayed,
            retry_after,
            should_retry,
        })
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Reply, ProcessorError> {
        self.reply(self.request(reqwest::Method::GET, path).query(query))
            .await
            .map_err(|e| ProcessorError::Unavailable(transport_error(&e)))
    }

    async fn post(
        &self,
        path: &str,
        form: &Form,
        key: Option<&str>,
    ) -> Result<Reply, reqwest::Error> {
        let mut builder = self
            .request(reqwest::Method::POST, path)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form.encode());
        if let Some(key) = key {
            builder = builder.header("Idempotency-Key", key);
        }
        self.reply(builder).await
    }

    async fn post_object<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        form: &Form,
        key: Option<&str>,
        what: &str,
    ) -> Result<T, ProcessorError> {
        let reply = self
            .post(path, form, key)
            .await
            .map_err(|e| ProcessorError::Unavailable(transport_error(&e)))?;
        wire::object(&reply, what)
    }

    /// The member's Customer: theirs when they have one, else a new one carrying only the
    /// installation and member ids (its key makes a retried create return the same one).
    async fn customer(&self, owner: &CardOwner) -> Result<String, ProcessorError> {
        if let Some(c) = &owner.customer {
            return Ok(c.clone());
        }
        let form = Form::new()
            .field(
                &format!("metadata[{}]", wire::meta::INSTALLATION),
                self.installation.to_string(),
            )
            .field(
                &format!("metadata[{}]", wire::meta::MEMBER),
                owner.member_id.to_string(),
            );
        let key = format!("autopay:{}:customer:{}", self.installation, owner.member_id);
        let c: wire::Customer = self
            .post_object("/v1/customers", &form, Some(&key), "Customer")
            .await?;
        Ok(c.id)
    }

    fn check_mode(&self, livemode: Option<bool>, what: &str) -> Result<(), ProcessorError> {
        match livemode {
            Some(live) if live != (self.mode == StripeMode::Live) => {
                Err(ProcessorError::Rejected(format!(
                    "this {what} was made in {} mode and the key is a {} key; use the portal of the same Stripe mode",
                    if live { "live" } else { "test" },
                    self.mode.as_str()
                )))
            }
            _ => Ok(()),
        }
    }

    async fn payment_method(&self, id: &str) -> Result<PaymentMethod, ProcessorError> {
        let reply = self.get(&format!("/v1/payment_methods/{id}"), &[]).await?;
        wire::object(&reply, "PaymentMethod")
    }

    /// Saves a PaymentMethod for `owner`: refuses one saved for another customer, attaches one
    /// saved for none.
    async fn save(
        &self,
        owner: &CardOwner,
        pm: PaymentMethod,
    ) -> Result<Tokenized, ProcessorError> {
        self.check_mode(pm.livemode, "card")?;
        let details = pm.details()?;
        // Whose the card is decides before anything is made for the member.
        let (pm, customer) = match (pm.customer.clone(), owner.customer.as_deref()) {
            (Some(theirs), Some(mine)) if theirs == mine => (pm, theirs),
            (Some(_), _) => {
                return Err(ProcessorError::Rejected(
                    "this card is saved to another Stripe customer, not this member's; add it through the member's own portal session".into(),
                ));
            }
            (None, _) => {
                let customer = self.customer(owner).await?;
                let key = format!(
                    "autopay:{}:attach:{}:{}",
                    self.installation, owner.member_id, pm.id
                );
                let attached = self
                    .post_object(
                        &format!("/v1/payment_methods/{}/attach", pm.id),
                        &Form::new().field("customer", customer.clone()),
                        Some(&key),
                        "card",
                    )
                    .await?;
                (attached, customer)
            }
        };
        let fingerprint = pm.card.as_ref().and_then(|c| c.fingerprint.clone());
        Ok(Tokenized {
            token: pm.id,
            details,
            fingerprint,
            customer: Some(customer),
        })
    }

    /// Takes a turn of the process's rate limit, when the daemon shared one: for requests the
    /// engine did not take a turn for (webhook read-backs, cancels, list pages after the first).
    async fn turn(&self) {
        if let Some(limiter) = self.limiter.get() {
            limiter.acquire().await;
        }
    }

    /// Cancels a PaymentIntent left waiting for the member to authenticate: autopay records it
    /// as failed, so it must never be completed later. Best effort: a PaymentIntent left open
    /// cannot charge without the member, and Stripe cancels it in time.
    async fn cancel(&self, pi: &str) {
        self.turn().await;
        let key = format!("autopay:{}:cancel:{pi}", self.installation);
        match self
            .post(
                &format!("/v1/payment_intents/{pi}/cancel"),
                &Form::new(),
                Some(&key),
            )
            .await
        {
            Ok(reply) if (200..300).contains(&reply.status) => {}
            Ok(reply) => {
                tracing::warn!(payment_intent = %pi, answer = %wire::describe(&reply), "could not cancel a PaymentIntent that asked for authentication")
            }
            Err(e) => {
                tracing::warn!(payment_intent = %pi, error = %transport_error(&e), "could not cancel a PaymentIntent that asked for authentication")
            }
        }
    }

    /// Lists PaymentIntents created since `since` (of `customer`, when given), page by page,
    /// handing each page to `each` until it says stop. Uses the server's filters, or pages the
    /// whole list when it has none (and remembers that).
    async fn list(
        &self,
        customer: Option<&str>,
        since: Timestamp,
        mut each: impl FnMut(PaymentIntent) -> bool,
    ) -> Result<(), ProcessorError> {
        let mut after: Option<String> = None;
        // A customer Stripe no longer has (deleted in the Dashboard) is left out of the query
        // for this listing only; the answer is still filtered by it below.
        let mut by_customer = customer.is_some();
        for page in 0..MAX_PAGES {
            if page > 0 {
                self.turn().await;
            }
            let filtered = self.list_filters.load(Ordering::Relaxed);
            let mut query = vec![("limit", PAGE.to_string())];
            if filtered {
                if let Some(c) = customer.filter(|_| by_customer) {
                    query.push(("customer", c.to_string()));
                }
                query.push(("created[gte]", since.as_second().to_string()));
            }
            if let Some(a) = &after {
                query.push(("starting_after", a.clone()));
            }
            let reply = self.get("/v1/payment_intents", &query).await?;
            if filtered && reply.status == 400 && after.is_none() {
                let e = wire::error_of(&reply);
                if wire::refuses_list_filters(&e) {
                    tracing::warn!(
                        "the Stripe server does not know the list filters; paging whole lists from now on (set processor.stripe.list_filters = false)"
                    );
                    self.list_filters.store(false, Ordering::Relaxed);
                    continue;
                }
                if by_customer && wire::customer_missing(&e) {
                    by_customer = false;
                    continue;
                }
            }
            let page: List<PaymentIntent> = wire::object(&reply, "list of PaymentIntents")?;
            let last = page.data.last().map(|p| p.id.clone());
            for pi in page.data {
                let wanted = customer.is_none_or(|c| pi.customer.as_deref() == Some(c))
                    && pi.created >= since.as_second();
                if wanted && !each(pi) {
                    return Ok(());
                }
            }
            match (page.has_more, last) {
                (true, Some(last)) => after = Some(last),
                _ => return Ok(()),
            }
        }
        Err(ProcessorError::Unavailable(format!(
            "the PaymentIntent list did not end within {MAX_PAGES} pages"
        )))
    }
}

#[async_trait]
impl Processor for StripeProcessor {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn mode(&self) -> Option<&'static str> {
        Some(self.mode.as_str())
    }

    fn share_limiter(&self, limiter: Arc<RateLimiter>) {
        let _ = self.limiter.set(limiter);
    }

    async fn tokenize(
        &self,
        owner: &CardOwner,
        number: &CardNumber,
        security_code: &SecurityCode,
        expiry: Expiry,
    ) -> Result<Tokenized, ProcessorError> {
        let digits = number.expose_digits();
        let test_pm = TEST_PAYMENT_METHODS
            .iter()
            .find(|(n, _)| *n == digits)
            .map(|(_, pm)| *pm);
        let pm: PaymentMethod = match (self.mode, test_pm, self.raw_numbers) {
            // A test peer that is not Stripe (localstripe): the number itself.
            (StripeMode::Test, _, true) => {
                let form = Form::new()
                    .field("type", "card")
                    .field("card[number]", digits)
                    .field("card[exp_month]", expiry.month().to_string())
                    .field("card[exp_year]", expiry.year().to_string())
                    .field("card[cvc]", security_code.expose());
                self.post_object("/v1/payment_methods", &form, None, "card")
                    .await?
            }
            (StripeMode::Test, Some(pm), false) => self.payment_method(pm).await?,
            (StripeMode::Test, None, false) => {
                return Err(ProcessorError::Rejected(
                    "under a Stripe test key only Stripe's published test card numbers are accepted (4242 4242 4242 4242, ...); a real card is added through the member portal or with --token".into(),
                ));
            }
            (StripeMode::Live, _, _) => {
                return Err(ProcessorError::Rejected(
                    "autopay never sends card numbers to Stripe: add the card through the member portal (Stripe's card form), then `autopay card add --token pm_...` or `--token seti_...`".into(),
                ));
            }
        };
        self.save(owner, pm).await
    }

    /// A PaymentMethod (`pm_...`) or a SetupIntent (`seti_...`).
    fn check_token(&self, token: &str) -> Result<(), ProcessorError> {
        super::check_stripe_token(token)?;
        if token.starts_with("tok_") {
            return Err(ProcessorError::Rejected(
                "a legacy Stripe token (tok_...) cannot be saved for later charges; give the PaymentMethod (pm_...) or SetupIntent (seti_...) the portal received".into(),
            ));
        }
        Ok(())
    }

    async fn adopt(&self, owner: &CardOwner, token: &str) -> Result<Tokenized, ProcessorError> {
        if !token.starts_with("seti_") {
            let pm = self.payment_method(token).await?;
            return self.save(owner, pm).await;
        }
        // A SetupIntent a portal confirmed: it must have succeeded, for this member's customer,
        // for off-session use, in the key's mode.
        let reply = self.get(&format!("/v1/setup_intents/{token}"), &[]).await?;
        let si: SetupIntent = wire::object(&reply, "SetupIntent")?;
        self.check_mode(si.livemode, "SetupIntent")?;
        let refuse = |why: &str| {
            Err(ProcessorError::Rejected(format!(
                "SetupIntent {}: {why}",
                si.id
            )))
        };
        if si.status != "succeeded" {
            return refuse(&format!(
                "it is {}, not succeeded; the member must finish saving the card",
                si.status
            ));
        }
        if si.usage.as_deref().is_some_and(|u| u != "off_session") {
            return refuse(
                "it was not set up for off-session use (usage=off_session), which automatic payments need",
            );
        }
        match (&owner.customer, &si.customer) {
            (Some(mine), Some(theirs)) if mine == theirs => {}
            (_, None) => return refuse("it has no customer; create it for the member's customer"),
            (None, Some(_)) => {
                return refuse(
                    "this member has no Stripe customer yet: add the first card as a PaymentMethod (--token pm_...), which makes one",
                );
            }
            _ => return refuse("it belongs to another Stripe customer, not this member's"),
        }
        let Some(pm) = si.payment_method_id() else {
            return refuse("it holds no card");
        };
        let pm = self.payment_method(pm).await?;
        self.save(owner, pm).await
    }

    async fn card_details(&self, token: &str) -> Result<CardDetails, ProcessorError> {
        self.payment_method(token).await?.details()
    }

    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        let form = wire::charge_form(request, self.installation);
        match self
            .post("/v1/payment_intents", &form, Some(&request.idempotency_key))
            .await
        {
            Ok(reply) => {
                let outcome = wire::charge_answer(&reply);
                if let ChargeOutcome::Declined {
                    signal,
                    reference: Some(pi),
                    ..
                } = &outcome
                    && signal.code == "authentication_required"
                    && pi.starts_with("pi_")
                {
                    self.cancel(pi).await;
                }
                outcome
            }
            // Refused before anything was written: nothing decided, send again.
            Err(e) if e.is_connect() => ChargeOutcome::Busy {
                detail: transport_error(&e),
                retry_after: None,
            },
            Err(e) => ChargeOutcome::Unknown {
                detail: transport_error(&e),
                replayed: false,
            },
        }
    }

    async fn find_attempt(&self, attempt: &AttemptRef) -> Lookup {
        let since = attempt
            .first_sent_at
            .checked_sub(LOOKUP_MARGIN)
            .unwrap_or(Timestamp::UNIX_EPOCH);
        let mut found: Vec<PaymentIntent> = Vec::new();
        let listed = self
            .list(attempt.customer.as_deref(), since, |pi| {
                if pi.belongs_to(self.installation)
                    && pi.is_attempt(attempt.payment_id, attempt.attempt)
                {
                    found.push(pi);
                }
                true
            })
            .await;
        if let Err(e) = listed {
            return Lookup::Unknown {
                detail: e.to_string(),
            };
        }
        // A peer that ignores idempotency keys may hold more than one: a success wins.
        let succeeded = found.iter().filter(|p| p.status == "succeeded").count();
        if succeeded > 1 {
            tracing::error!(payment_id = %attempt.payment_id, count = succeeded, "Stripe holds more than one succeeded PaymentIntent for one attempt; refund all but one");
        }
        let best = found
            .iter()
            .find(|p| p.status == "succeeded")
            .or_else(|| found.iter().find(|p| p.attempt().is_none()))
            .or_else(|| found.first());
        match best {
            None => Lookup::NotFound,
            Some(pi) => match pi.attempt() {
                Some(a) => Lookup::Found(Box::new(a)),
                None => Lookup::Unknown {
                    detail: format!(
                        "PaymentIntent {} is {}; asked again later",
                        pi.id, pi.status
                    ),
                },
            },
        }
    }

    async fn list_attempts(
        &self,
        since: Timestamp,
    ) -> Result<Vec<ProcessorAttempt>, ProcessorError> {
        let mut out = Vec::new();
        self.list(None, since, |pi| {
            if pi.belongs_to(self.installation)
                && let Some(a) = pi.attempt()
            {
                out.push(a);
            }
            true
        })
        .await?;
        out.sort_by_key(|a| a.created_at);
        Ok(out)
    }
}
