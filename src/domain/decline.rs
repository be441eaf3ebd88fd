//! Declines: what autopay does when a card is declined, and when it tries again.
//!
//! Every decline code autopay knows is one row of [`DECLINE_CODES`], the one table that
//! docs/declines.md prints. A row says what to do ([`DeclineAction`]), what the member is told,
//! and what an operator reads. The card networks' advice codes ([`ADVICE_CODES`]) come on top:
//! when the processor passes one along, it decides the action, except that it never softens a
//! decline that disables the card (a lost or stolen card stays disabled whatever the advice).
//!
//! A code that is in neither table fails the payment ([`DeclineAction::FailPayment`]): retrying
//! blind could break the networks' retry rules, and disabling a card on a guess would suspend a
//! member's schedules for nothing, so a person looks instead.
//!
//! Soft declines are retried after `payments.retry_delays` ([`RetryPolicy`]), never more than 15
//! times per card in 30 days (the card networks' limit); a schedule whose payments fail
//! `payments.suspend_after` times in a row is suspended ([`suspends`]).

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::card::CardBrand;
use super::spelled_enum;
use DeclineAction::{DisableCard, FailPayment, RetryLater};

spelled_enum! {
    /// What autopay does after a decline.
    pub enum DeclineAction ("decline action") {
        /// Temporary: the payment waits in `retry_wait` and is tried again after the next of
        /// `payments.retry_delays`; the member gets a decline notice.
        RetryLater => "retry",
        /// Retrying this card for this payment will not help, though the card may still be
        /// fine: the payment is `failed` and the member gets a failure notice.
        FailPayment => "fail",
        /// The card must never be tried again: it is disabled, every schedule that uses it is
        /// suspended, the payment is `failed`, and the member is told to add another card.
        DisableCard => "disable_card",
    }
}

/// One row of a classification table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclineRow {
    /// The code as the processor or the network spells it (matched ignoring ASCII case).
    pub code: &'static str,
    pub action: DeclineAction,
    /// Plain words for the member's email, completing "we could not charge your card because
    /// ...". Never a digit, never the decline code, and never lost, stolen or fraud: the
    /// processors ask that those be shown as a plain decline, since whoever reads the email may
    /// be the one holding the card.
    pub member_reason: &'static str,
    /// What happened, for operators: logs, audit events and `payment show`.
    pub operator_reason: &'static str,
}

/// Said for lost, stolen, picked-up and fraud-flagged cards. Stripe asks that these be shown
/// as a plain decline, and the networks likewise: telling the holder of a stolen card that it
/// was reported only helps the thief.
const NOT_AGAIN: &str = "your bank declined the card and asked us not to use it again";
const NO_REASON: &str = "your bank declined the payment without giving a reason";
const NOT_NOW: &str = "your bank could not approve the payment right now";
const NEEDS_PIN: &str =
    "your bank asked for the card's PIN, which an automatic payment cannot give";
const NOT_THIS_KIND: &str = "your bank does not allow this kind of payment on the card";
const NUMBER_REFUSED: &str = "your bank did not accept the card number we have on file";
const NEW_DETAILS: &str =
    "your bank has issued new details for the card, such as a new number or expiry date";
const STOPPED: &str = "your bank told us you asked it to stop automatic payments to us";
const STOPPED_ALL: &str =
    "your bank told us you asked it to stop all automatic payments on the card";
const STOPPED_ONE: &str = "your bank told us you placed a stop-payment order on payments to us";
const ACCOUNT_CLOSED: &str = "your bank reports that the card's account is closed";

const fn row(
    code: &'static str,
    action: DeclineAction,
    member_reason: &'static str,
    operator_reason: &'static str,
) -> DeclineRow {
    DeclineRow {
        code,
        action,
        member_reason,
        operator_reason,
    }
}

/// Every decline code autopay knows: Stripe's card decline codes, which the simulated
/// processor also uses, plus `account_closed` and our own `invalid_token`. docs/declines.md
/// prints this table, and a test keeps the two equal.
pub const DECLINE_CODES: &[DeclineRow] = &[
    // Retry later: nothing is wrong with the card, and the same card may well go through in a
    // few days without anyone doing anything (funds arrive, a limit resets, the bank's system
    // comes back). Declines "for no stated reason" belong here too: they are mostly temporary,
    // and the networks allow retries for them within the 15-in-30-days limit.
    row(
        "approve_with_id",
        RetryLater,
        NOT_NOW,
        "issuer could not authorize now; Stripe advises trying again",
    ),
    // The member may need to call, but the retry delays leave them time to, and a retry is
    // what succeeds once they have.
    row(
        "call_issuer",
        RetryLater,
        "your bank declined the payment and asks you to call them",
        "issuer declined and asks the cardholder to call; retried in case it clears",
    ),
    row(
        "card_decline_rate_limit_exceeded",
        RetryLater,
        NOT_NOW,
        "Stripe limits declines on this card; it may be tried again after 24 hours",
    ),
    row(
        "card_velocity_exceeded",
        RetryLater,
        "the card reached its spending or credit limit",
        "balance, credit or amount limit reached; clears when the cardholder pays it down",
    ),
    row(
        "do_not_honor",
        RetryLater,
        NO_REASON,
        "issuer declined without a reason; usually temporary",
    ),
    row(
        "generic_decline",
        RetryLater,
        NO_REASON,
        "declined without a reason; usually temporary",
    ),
    row(
        "insufficient_funds",
        RetryLater,
        "the card did not have enough funds or available credit",
        "insufficient funds; clears when money arrives",
    ),
    row(
        "issuer_not_available",
        RetryLater,
        "your bank could not be reached",
        "issuer unreachable; temporary",
    ),
    row(
        "no_action_taken",
        RetryLater,
        NO_REASON,
        "issuer took no action and gave no reason; usually temporary",
    ),
    row(
        "processing_error",
        RetryLater,
        "a temporary error occurred while processing the payment",
        "error at the processor or network while charging; temporary",
    ),
    row(
        "reenter_transaction",
        RetryLater,
        NOT_NOW,
        "issuer could not process the charge and asks for it again",
    ),
    row(
        "try_again_later",
        RetryLater,
        NOT_NOW,
        "issuer asks to try again later",
    ),
    row(
        "withdrawal_count_limit_exceeded",
        RetryLater,
        "the card reached its limit on the number of payments",
        "cardholder exceeded the number of transactions the card allows; resets with time",
    ),
    // Fail this payment: retrying the same card for this payment would get the same answer, but
    // the card is not known to be unusable; the member (or an operator) has to do something
    // first, and the next occurrence may still go through.
    row(
        "authentication_required",
        FailPayment,
        "your bank asked you to confirm this payment yourself, which an automatic payment cannot do",
        "issuer requires authentication (3-D Secure) that an off-session charge cannot give",
    ),
    row(
        "card_not_supported",
        FailPayment,
        "the card cannot be used for this kind of payment",
        "card does not support this type of purchase",
    ),
    row(
        "currency_not_supported",
        FailPayment,
        "the card cannot be used for payments in this currency",
        "card does not support the payment's currency",
    ),
    // The member may already have paid: a person should look before anyone retries.
    row(
        "duplicate_transaction",
        FailPayment,
        "your bank saw an identical payment made very recently",
        "issuer saw an identical recent charge; check whether the member already paid",
    ),
    row(
        "incorrect_cvc",
        FailPayment,
        "your bank did not accept the card's security code",
        "CVC check failed; the member should add the card again",
    ),
    row(
        "incorrect_number",
        FailPayment,
        NUMBER_REFUSED,
        "issuer says the card number is wrong; the member should add the card again",
    ),
    row(
        "incorrect_pin",
        FailPayment,
        NEEDS_PIN,
        "wrong PIN (card-present only; should not happen off-session)",
    ),
    row(
        "incorrect_zip",
        FailPayment,
        "your bank did not accept the billing postal code we have on file",
        "postal code check failed; the member should update the card's billing address",
    ),
    row(
        "invalid_amount",
        FailPayment,
        "your bank did not accept the payment amount",
        "amount invalid or above what the issuer allows; check the amount",
    ),
    row(
        "invalid_cvc",
        FailPayment,
        "your bank did not accept the card's security code",
        "CVC invalid; the member should add the card again",
    ),
    row(
        "invalid_expiry_month",
        FailPayment,
        "your bank did not accept the card's expiry date",
        "expiry month invalid; the member should add the card again",
    ),
    row(
        "invalid_expiry_year",
        FailPayment,
        "your bank did not accept the card's expiry date",
        "expiry year invalid; the member should add the card again",
    ),
    row(
        "invalid_number",
        FailPayment,
        NUMBER_REFUSED,
        "card number invalid; the member should add the card again",
    ),
    row(
        "invalid_pin",
        FailPayment,
        NEEDS_PIN,
        "invalid PIN (card-present only; should not happen off-session)",
    ),
    // Ours: the processor does not know the stored token. That points at autopay's settings
    // (another processor or account) more often than at the card, and disabling on it could
    // disable every card at once, so a person looks.
    row(
        "invalid_token",
        FailPayment,
        "the card details we hold could not be used",
        "processor does not recognize the stored token; check processor settings first",
    ),
    row(
        "not_permitted",
        FailPayment,
        NOT_THIS_KIND,
        "payment not permitted by the issuer",
    ),
    row(
        "offline_pin_required",
        FailPayment,
        NEEDS_PIN,
        "issuer requires a PIN (card-present only)",
    ),
    row(
        "online_or_offline_pin_required",
        FailPayment,
        NEEDS_PIN,
        "issuer requires a PIN (card-present only)",
    ),
    row(
        "pin_try_exceeded",
        FailPayment,
        "your bank locked the card's PIN after too many tries",
        "PIN tries exceeded (card-present only)",
    ),
    row(
        "service_not_allowed",
        FailPayment,
        NOT_THIS_KIND,
        "issuer does not allow this service on the card",
    ),
    // A test card in live mode, or a live card against a test key: settings, not the card.
    row(
        "testmode_decline",
        FailPayment,
        "the card could not be charged",
        "a Stripe test card was charged in live mode; check processor settings",
    ),
    row(
        "transaction_not_allowed",
        FailPayment,
        NOT_THIS_KIND,
        "issuer does not allow this type of transaction on the card",
    ),
    // Disable the card: the card (or the member's permission to charge it) is gone. Trying it
    // again breaks the networks' rules and can cost fees, so it is disabled, every schedule on
    // it suspended, and the member told to add another card.
    row(
        "account_closed",
        DisableCard,
        ACCOUNT_CLOSED,
        "the card's account is closed",
    ),
    row(
        "do_not_try_again",
        DisableCard,
        "your bank asked us not to try the card again",
        "issuer says do not try again",
    ),
    row(
        "expired_card",
        DisableCard,
        "the card has expired",
        "card expired; the member must add the renewed card",
    ),
    row(
        "fraudulent",
        DisableCard,
        NOT_AGAIN,
        "issuer or Stripe suspects fraud; never tell the member the reason",
    ),
    row(
        "invalid_account",
        DisableCard,
        "your bank reports that the card or its account is no longer valid",
        "card or its account is invalid (often closed)",
    ),
    row(
        "lost_card",
        DisableCard,
        NOT_AGAIN,
        "card reported lost; never tell the member the reason",
    ),
    // Our own Stripe Radar block list: someone here chose to refuse this card.
    row(
        "merchant_blacklist",
        DisableCard,
        "the card cannot be used for automatic payments",
        "card is on this installation's Stripe block list",
    ),
    // autopay has no card updater: the member adds the new details themselves.
    row(
        "new_account_information_available",
        DisableCard,
        NEW_DETAILS,
        "issuer has new card details (number or expiry); the member must add them",
    ),
    row(
        "pickup_card",
        DisableCard,
        NOT_AGAIN,
        "issuer says pick up the card (possibly lost or stolen); never tell the member the reason",
    ),
    row(
        "restricted_card",
        DisableCard,
        "your bank has restricted the card so it cannot be used for this payment",
        "card restricted (possibly lost or stolen)",
    ),
    row(
        "revocation_of_all_authorizations",
        DisableCard,
        STOPPED_ALL,
        "cardholder revoked every recurring authorization on the card",
    ),
    row(
        "revocation_of_authorization",
        DisableCard,
        STOPPED,
        "cardholder revoked the authorization for our recurring charges",
    ),
    row(
        "security_violation",
        DisableCard,
        NOT_AGAIN,
        "issuer reports a security violation; never tell the member the reason",
    ),
    row(
        "stolen_card",
        DisableCard,
        NOT_AGAIN,
        "card reported stolen; never tell the member the reason",
    ),
    row(
        "stop_payment_order",
        DisableCard,
        STOPPED_ONE,
        "cardholder placed a stop-payment order with the issuer",
    ),
];

/// Network advice codes, which decide the action whatever the decline code says, except that
/// they never soften a [`DeclineAction::DisableCard`] row. The spellings come from three sources,
/// each read only where it applies ([`DeclineSignal`]): Mastercard's Merchant Advice Codes (01,
/// 02, 03, 21, 24 to 30) only for a Mastercard, Visa's category 1 ("issuer will never approve")
/// response codes only for a Visa card, and Stripe's `advice_code` words for any card.
pub const ADVICE_CODES: &[DeclineRow] = &[
    // Mastercard Merchant Advice Codes. 01: the card was replaced; the stored details will not
    // work again, and autopay cannot fetch the new ones, so the member must add them.
    row(
        "01",
        DisableCard,
        NEW_DETAILS,
        "Mastercard advice 01: new account information; the member must add the card again",
    ),
    row(
        "02",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 02: cannot approve now, try again later",
    ),
    row(
        "03",
        DisableCard,
        "your bank asked us not to try the card again",
        "Mastercard advice 03: do not try again",
    ),
    row(
        "21",
        DisableCard,
        STOPPED,
        "Mastercard advice 21: payment cancellation, cardholder stopped recurring payments",
    ),
    // Mastercard 24 to 30: try again, but not before the wait each names ([`mastercard_wait`]).
    row(
        "24",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 24: retry after 1 hour",
    ),
    row(
        "25",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 25: retry after 24 hours",
    ),
    row(
        "26",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 26: retry after 2 days",
    ),
    row(
        "27",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 27: retry after 4 days",
    ),
    row(
        "28",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 28: retry after 6 days",
    ),
    row(
        "29",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 29: retry after 8 days",
    ),
    row(
        "30",
        RetryLater,
        NOT_NOW,
        "Mastercard advice 30: retry after 10 days",
    ),
    // Visa category 1 response codes: the card is lost, stolen, closed or its authorization
    // revoked (disable), or this transaction, card number or issuer is invalid (fail: a person
    // looks, and the card is not known to be gone).
    row(
        "04",
        DisableCard,
        NOT_AGAIN,
        "Visa 04: pick up card; never tell the member the reason",
    ),
    row(
        "07",
        DisableCard,
        NOT_AGAIN,
        "Visa 07: pick up card, special condition; never tell the member the reason",
    ),
    row(
        "12",
        FailPayment,
        "your bank did not accept this payment",
        "Visa 12: invalid transaction",
    ),
    row(
        "14",
        FailPayment,
        NUMBER_REFUSED,
        "Visa 14: invalid account number",
    ),
    row(
        "15",
        FailPayment,
        "the card's bank could not be identified",
        "Visa 15: no such issuer",
    ),
    row(
        "41",
        DisableCard,
        NOT_AGAIN,
        "Visa 41: lost card; never tell the member the reason",
    ),
    row(
        "43",
        DisableCard,
        NOT_AGAIN,
        "Visa 43: stolen card; never tell the member the reason",
    ),
    row("46", DisableCard, ACCOUNT_CLOSED, "Visa 46: closed account"),
    row(
        "57",
        FailPayment,
        NOT_THIS_KIND,
        "Visa 57: transaction not permitted to cardholder",
    ),
    row(
        "R0",
        DisableCard,
        STOPPED_ONE,
        "Visa R0: stop payment order",
    ),
    row(
        "R1",
        DisableCard,
        STOPPED,
        "Visa R1: revocation of authorization order",
    ),
    row(
        "R3",
        DisableCard,
        STOPPED_ALL,
        "Visa R3: revocation of all authorizations order",
    ),
    // Stripe's `advice_code`.
    row(
        "confirm_card_data",
        FailPayment,
        "your bank asked that the card's details be confirmed",
        "Stripe advice confirm_card_data: the member should add the card again",
    ),
    row(
        "do_not_try_again",
        DisableCard,
        "your bank asked us not to try the card again",
        "Stripe advice do_not_try_again",
    ),
    row(
        "try_again_later",
        RetryLater,
        NOT_NOW,
        "Stripe advice try_again_later",
    ),
];

/// Said when the code is in no table.
const UNKNOWN: DeclineRow = row(
    "",
    FailPayment,
    "your bank declined the payment",
    "decline code not in autopay's table; a person should look before any retry",
);

/// Decline codes come from outside; this bounds what is stored and logged.
const MAX_CODE_CHARS: usize = 64;

/// Everything a processor said about one decline: its own decline code, its advice word, and
/// the card network's advice and response codes, with the brand of the card that was charged
/// (the network codes mean something only for their own network).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclineSignal {
    /// The processor's decline code (Stripe's `decline_code`, or its error `code`).
    pub code: String,
    /// The processor's own advice (Stripe's `advice_code`): read for every brand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advice_code: Option<String>,
    /// The network's advice (Stripe's `network_advice_code`): read only for a Mastercard, as
    /// Mastercard's Merchant Advice Code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_advice_code: Option<String>,
    /// The network's response code (Stripe's `network_decline_code`): read only for a Visa
    /// card, and only when it is one of Visa's category 1 codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_decline_code: Option<String>,
    /// The brand of the card charged, when the processor or the stored card says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<CardBrand>,
}

impl DeclineSignal {
    /// A decline with nothing but the processor's code.
    pub fn code(code: impl Into<String>) -> DeclineSignal {
        DeclineSignal {
            code: code.into(),
            ..DeclineSignal::default()
        }
    }

    /// The same signal, with `brand` filled in when the processor did not say.
    pub fn or_brand(mut self, brand: CardBrand) -> DeclineSignal {
        self.brand.get_or_insert(brand);
        self
    }
}

/// A classified decline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decline {
    /// The decline code as the processor gave it (trimmed, without control characters, at most
    /// 64 characters), for the payment's `decline_code`.
    pub code: String,
    pub action: DeclineAction,
    /// Plain words for the member's email; see [`DeclineRow::member_reason`].
    pub member_reason: &'static str,
    /// What happened, for operators.
    pub operator_reason: &'static str,
    /// The earliest a retry may be made, when the network named one (Mastercard 24 to 30).
    pub wait_at_least: Option<Duration>,
}

fn find(table: &'static [DeclineRow], code: &str) -> Option<&'static DeclineRow> {
    let code = code.trim();
    table.iter().find(|r| r.code.eq_ignore_ascii_case(code))
}

/// Mastercard's Merchant Advice Codes autopay reads.
const MASTERCARD_ADVICE: &[&str] = &[
    "01", "02", "03", "21", "24", "25", "26", "27", "28", "29", "30",
];
/// Visa's category 1 response codes: the issuer will never approve.
const VISA_CATEGORY_1: &[&str] = &[
    "04", "07", "12", "14", "15", "41", "43", "46", "57", "R0", "R1", "R3",
];
/// Stripe's `advice_code` words.
const PROCESSOR_ADVICE: &[&str] = &["confirm_card_data", "do_not_try_again", "try_again_later"];

/// The wait Mastercard's advice 24 to 30 asks for before a retry.
pub fn mastercard_wait(advice: &str) -> Option<Duration> {
    const HOUR: u64 = 3600;
    let hours = match advice.trim() {
        "24" => 1,
        "25" => 24,
        "26" => 2 * 24,
        "27" => 4 * 24,
        "28" => 6 * 24,
        "29" => 8 * 24,
        "30" => 10 * 24,
        _ => return None,
    };
    Some(Duration::from_secs(hours * HOUR))
}

fn advice_in(
    value: Option<&str>,
    spellings: &[&str],
    applies: bool,
) -> Option<&'static DeclineRow> {
    let value = value?.trim();
    let known = spellings.iter().any(|s| s.eq_ignore_ascii_case(value));
    (applies && known)
        .then(|| find(ADVICE_CODES, value))
        .flatten()
}

fn severity(action: DeclineAction) -> u8 {
    match action {
        RetryLater => 0,
        FailPayment => 1,
        DisableCard => 2,
    }
}

/// Classifies a decline by its code and the advice that applies to the card's brand. An
/// unknown code fails the payment, unless known advice says otherwise; advice that is unknown
/// or meant for another network is ignored. When several advice codes apply, the strictest
/// speaks. Advice decides the action when it differs from the code's, and then its reasons are
/// the ones given (they explain that action), except that nothing softens a code that disables
/// the card.
pub fn classify(signal: &DeclineSignal) -> Decline {
    let brand = signal.brand;
    let mastercard = advice_in(
        signal.network_advice_code.as_deref(),
        MASTERCARD_ADVICE,
        brand == Some(CardBrand::MasterCard),
    );
    let visa = advice_in(
        signal.network_decline_code.as_deref(),
        VISA_CATEGORY_1,
        brand == Some(CardBrand::Visa),
    );
    let processor = advice_in(signal.advice_code.as_deref(), PROCESSOR_ADVICE, true);
    let by_advice = [mastercard, visa, processor]
        .into_iter()
        .flatten()
        .reduce(|a, b| {
            if severity(b.action) > severity(a.action) {
                b
            } else {
                a
            }
        });
    let by_code = find(DECLINE_CODES, &signal.code);
    let chosen = match (by_code, by_advice) {
        // Nothing softens a card that must not be tried again; and advice that agrees with the
        // code adds nothing, while the code's words are the more precise.
        (Some(c), Some(a)) if c.action != DisableCard && a.action != c.action => a,
        // Except an expired card whose bank also says never again (revoked, closed, stolen):
        // the bank's words stand, so that renewed details never bring the card back.
        (Some(c), Some(a)) if c.code == "expired_card" && a.action == DisableCard => a,
        (Some(c), _) => c,
        // An unknown code with known advice: the advice is all we understand.
        (None, Some(a)) => a,
        (None, None) => &UNKNOWN,
    };
    let wait_at_least = match (chosen.action, mastercard) {
        (RetryLater, Some(_)) => signal
            .network_advice_code
            .as_deref()
            .and_then(mastercard_wait),
        _ => None,
    };
    Decline {
        code: signal
            .code
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_CODE_CHARS)
            .collect(),
        action: chosen.action,
        member_reason: chosen.member_reason,
        operator_reason: chosen.operator_reason,
        wait_at_least,
    }
}

/// Classifies a decline of which only the processor's code is known.
pub fn classify_code(code: &str) -> Decline {
    classify(&DeclineSignal::code(code))
}

/// The card networks allow at most this many attempts on one card in [`NETWORK_WINDOW`].
pub const NETWORK_MAX_ATTEMPTS_PER_CARD: u32 = 15;
/// The window of the networks' attempt limit: 30 days.
pub const NETWORK_WINDOW: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// A retry is never sooner than this, so that it is always strictly after the decline and a
/// worker does not claim it again in the same instant ("0s" is a valid duration in settings).
const MIN_DELAY: Duration = Duration::from_secs(1);

/// When a soft-declined payment is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `payments.retry_delays`: the wait after the 1st, 2nd, ... declined attempt.
    delays: Vec<Duration>,
    /// 15: the networks' limit of attempts on one card in `window`.
    pub max_attempts_per_card: u32,
    /// 30 days: the window the store counts a card's attempts in.
    pub window: Duration,
}

impl RetryPolicy {
    /// A policy waiting `delays` between attempts (`payments.retry_delays`), within the networks'
    /// 15 attempts per card in 30 days. A delay under one second counts as one second.
    pub fn new(delays: Vec<Duration>) -> RetryPolicy {
        RetryPolicy {
            delays: delays.into_iter().map(|d| d.max(MIN_DELAY)).collect(),
            max_attempts_per_card: NETWORK_MAX_ATTEMPTS_PER_CARD,
            window: NETWORK_WINDOW,
        }
    }

    /// The waits between attempts, in order (each at least one second).
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// When to try a payment again after its attempt `failed_attempt` (1-based) soft-declined,
    /// or `None` when it must fail instead: its delays are used up, or its card has had
    /// `max_attempts_per_card` attempts in the last `window` (`attempts_on_card_in_window`
    /// counts every payment's attempts on the card, the one that just failed included). Counting
    /// back from now rather than from the retry is stricter, never looser, than the rule.
    pub fn next_attempt_at(
        &self,
        failed_attempt: u32,
        attempts_on_card_in_window: u32,
        now: Timestamp,
    ) -> Option<Timestamp> {
        if attempts_on_card_in_window >= self.max_attempts_per_card {
            return None;
        }
        // Attempt 0 does not exist; answering None fails the payment rather than guessing.
        let index = usize::try_from(failed_attempt.checked_sub(1)?).ok()?;
        let delay = self.delays.get(index)?;
        now.checked_add(*delay).ok()
    }
}

/// Whether a schedule whose last `consecutive_failures` payments failed is suspended under
/// `payments.suspend_after`. A `suspend_after` of 0 (which settings refuse) counts as 1, so a
/// schedule that has not failed is never suspended.
pub fn suspends(consecutive_failures: u32, suspend_after: u32) -> bool {
    consecutive_failures >= suspend_after.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const DOC: &str = include_str!("../../docs/declines.md");

    /// A decline carrying `advice` where a processor would put it: Mastercard's codes as a
    /// Mastercard's network advice, Visa's as a Visa card's response code, words as Stripe's
    /// advice.
    fn signal(code: &str, advice: Option<&str>) -> DeclineSignal {
        let mut s = DeclineSignal::code(code);
        let Some(a) = advice else { return s };
        let t = a.trim();
        if MASTERCARD_ADVICE.contains(&t) {
            s.brand = Some(CardBrand::MasterCard);
            s.network_advice_code = Some(a.into());
        } else if VISA_CATEGORY_1.iter().any(|v| v.eq_ignore_ascii_case(t)) {
            s.brand = Some(CardBrand::Visa);
            s.network_decline_code = Some(a.into());
        } else {
            s.advice_code = Some(a.into());
        }
        s
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    #[test]
    fn every_action_spelling_round_trips() {
        for a in DeclineAction::ALL {
            assert_eq!(a.as_str().parse::<DeclineAction>().unwrap(), *a);
        }
        assert_eq!(RetryLater.as_str(), "retry");
        assert_eq!(FailPayment.as_str(), "fail");
        assert_eq!(DisableCard.as_str(), "disable_card");
        let err = "soft".parse::<DeclineAction>().unwrap_err().to_string();
        assert!(err.contains("disable_card"), "{err}");
    }

    #[test]
    fn every_row_classifies_to_its_action_and_reasons() {
        for r in DECLINE_CODES {
            let d = classify_code(r.code);
            assert_eq!(d.action, r.action, "{}", r.code);
            assert_eq!(d.code, r.code);
            assert_eq!(d.member_reason, r.member_reason, "{}", r.code);
            assert_eq!(d.operator_reason, r.operator_reason, "{}", r.code);
        }
    }

    #[test]
    fn member_reasons_are_plain_words_without_numbers_or_secrets() {
        for r in DECLINE_CODES.iter().chain(ADVICE_CODES).chain([&UNKNOWN]) {
            let m = r.member_reason;
            assert!(!m.trim().is_empty(), "{}", r.code);
            assert!(!m.chars().any(|c| c.is_ascii_digit()), "{}: {m}", r.code);
            assert!(!m.contains('_'), "{}: a code, not words: {m}", r.code);
            for word in ["lost", "stolen", "fraud", "pick up", "security violation"] {
                assert!(!m.contains(word), "{}: tells the member '{word}'", r.code);
            }
            assert!(!r.operator_reason.trim().is_empty(), "{}", r.code);
        }
    }

    #[test]
    fn codes_are_unique_in_each_table() {
        for table in [DECLINE_CODES, ADVICE_CODES] {
            let mut seen = HashSet::new();
            for r in table {
                assert!(seen.insert(r.code.to_ascii_lowercase()), "{} twice", r.code);
            }
        }
    }

    #[test]
    fn the_issue_s_codes_are_all_in_the_table() {
        let stripe = [
            "generic_decline",
            "insufficient_funds",
            "lost_card",
            "stolen_card",
            "expired_card",
            "incorrect_cvc",
            "incorrect_number",
            "invalid_cvc",
            "invalid_expiry_month",
            "invalid_expiry_year",
            "processing_error",
            "card_velocity_exceeded",
            "do_not_honor",
            "do_not_try_again",
            "pickup_card",
            "restricted_card",
            "security_violation",
            "service_not_allowed",
            "transaction_not_allowed",
            "try_again_later",
            "withdrawal_count_limit_exceeded",
            "invalid_account",
            "account_closed",
            "new_account_information_available",
            "card_not_supported",
            "currency_not_supported",
            "fraudulent",
            "merchant_blacklist",
            "revocation_of_authorization",
            "revocation_of_all_authorizations",
            "stop_payment_order",
            "call_issuer",
            "issuer_not_available",
            "reenter_transaction",
            "approve_with_id",
            "duplicate_transaction",
            "authentication_required",
            "invalid_amount",
            "not_permitted",
            "no_action_taken",
            "offline_pin_required",
            "online_or_offline_pin_required",
            "pin_try_exceeded",
            "testmode_decline",
            "invalid_token",
        ];
        for code in stripe {
            assert!(find(DECLINE_CODES, code).is_some(), "{code} missing");
        }
    }

    #[test]
    fn the_simulated_processor_s_codes_are_all_in_the_table() {
        use crate::processor::simulated::Outcome;
        for code in Outcome::ALL.iter().filter_map(|o| o.decline_code()) {
            assert!(find(DECLINE_CODES, code).is_some(), "{code} missing");
        }
    }

    #[test]
    fn the_issue_s_actions_hold() {
        for code in [
            "insufficient_funds",
            "processing_error",
            "try_again_later",
            "issuer_not_available",
            "reenter_transaction",
            "card_velocity_exceeded",
            "withdrawal_count_limit_exceeded",
            "do_not_honor",
            "generic_decline",
            "approve_with_id",
        ] {
            assert_eq!(classify_code(code).action, RetryLater, "{code}");
        }
        for code in [
            "incorrect_cvc",
            "invalid_amount",
            "currency_not_supported",
            "duplicate_transaction",
            "authentication_required",
            "card_not_supported",
            "transaction_not_allowed",
        ] {
            assert_eq!(classify_code(code).action, FailPayment, "{code}");
        }
        for code in [
            "lost_card",
            "stolen_card",
            "pickup_card",
            "account_closed",
            "invalid_account",
            "expired_card",
            "revocation_of_authorization",
            "revocation_of_all_authorizations",
            "stop_payment_order",
            "do_not_try_again",
            "fraudulent",
            "security_violation",
            "restricted_card",
            "new_account_information_available",
        ] {
            assert_eq!(classify_code(code).action, DisableCard, "{code}");
        }
    }

    #[test]
    fn lost_and_stolen_cards_are_told_as_a_plain_decline() {
        for code in ["lost_card", "stolen_card", "fraudulent", "pickup_card"] {
            assert_eq!(classify_code(code).member_reason, NOT_AGAIN, "{code}");
        }
    }

    #[test]
    fn unknown_codes_fail_the_payment_for_a_person_to_look() {
        for code in ["", "   ", "card_declined", "something_new", "05"] {
            let d = classify_code(code);
            assert_eq!(d.action, FailPayment, "{code:?}");
            assert_eq!(d.member_reason, UNKNOWN.member_reason);
        }
        assert_eq!(classify_code("something_new").code, "something_new");
    }

    #[test]
    fn codes_match_ignoring_case_and_surrounding_space() {
        let d = classify_code("  Lost_Card\n");
        assert_eq!(d.action, DisableCard);
        assert_eq!(d.code, "Lost_Card");
        assert_eq!(
            classify(&signal("generic_decline", Some(" r0 "))).action,
            DisableCard
        );
    }

    #[test]
    fn a_stored_code_is_bounded_and_free_of_control_characters() {
        let long = format!("x\u{1b}[31m{}", "y".repeat(200));
        let d = classify_code(&long);
        assert_eq!(d.code.chars().count(), MAX_CODE_CHARS);
        assert!(!d.code.chars().any(char::is_control));
    }

    #[test]
    fn each_advice_code_decides_the_action_of_a_soft_or_hard_decline() {
        let expected = [
            ("01", DisableCard),
            ("02", RetryLater),
            ("03", DisableCard),
            ("21", DisableCard),
            ("24", RetryLater),
            ("25", RetryLater),
            ("26", RetryLater),
            ("27", RetryLater),
            ("28", RetryLater),
            ("29", RetryLater),
            ("30", RetryLater),
            ("04", DisableCard),
            ("07", DisableCard),
            ("12", FailPayment),
            ("14", FailPayment),
            ("15", FailPayment),
            ("41", DisableCard),
            ("43", DisableCard),
            ("46", DisableCard),
            ("57", FailPayment),
            ("R0", DisableCard),
            ("R1", DisableCard),
            ("R3", DisableCard),
            ("confirm_card_data", FailPayment),
            ("do_not_try_again", DisableCard),
            ("try_again_later", RetryLater),
        ];
        assert_eq!(expected.len(), ADVICE_CODES.len());
        for (advice, action) in expected {
            // A soft, a hard and an unknown code: the advice decides all three.
            for code in ["generic_decline", "incorrect_cvc", "never_heard_of_it"] {
                let d = classify(&signal(code, Some(advice)));
                assert_eq!(d.action, action, "{code} + {advice}");
                assert_eq!(d.code, code);
                if d.action != classify_code(code).action || code == "never_heard_of_it" {
                    let row = find(ADVICE_CODES, advice).unwrap();
                    assert_eq!(d.member_reason, row.member_reason, "{code} + {advice}");
                    assert_eq!(d.operator_reason, row.operator_reason, "{code} + {advice}");
                }
            }
        }
    }

    #[test]
    fn network_codes_are_read_only_for_their_own_brand() {
        let on = |brand, advice: &str, response: &str| {
            classify(&DeclineSignal {
                code: "generic_decline".into(),
                network_advice_code: Some(advice.into()),
                network_decline_code: Some(response.into()),
                brand,
                ..DeclineSignal::default()
            })
            .action
        };
        // Mastercard's 21 (stop recurring) and Visa's R1 (revoked) disable only their own cards.
        assert_eq!(on(Some(CardBrand::MasterCard), "21", ""), DisableCard);
        assert_eq!(on(Some(CardBrand::Visa), "21", ""), RetryLater);
        assert_eq!(on(Some(CardBrand::Discover), "21", ""), RetryLater);
        assert_eq!(on(None, "21", ""), RetryLater);
        assert_eq!(on(Some(CardBrand::Visa), "", "R1"), DisableCard);
        assert_eq!(on(Some(CardBrand::MasterCard), "", "R1"), RetryLater);
        // A Visa response code outside category 1 is not advice, even on a Visa card; and a
        // category 1 code given as network advice is not read as one.
        assert_eq!(on(Some(CardBrand::Visa), "", "05"), RetryLater);
        assert_eq!(on(Some(CardBrand::Visa), "41", ""), RetryLater);
        // Stripe's own advice applies to every brand.
        let words = classify(&DeclineSignal {
            advice_code: Some("do_not_try_again".into()),
            brand: Some(CardBrand::Discover),
            ..DeclineSignal::code("generic_decline")
        });
        assert_eq!(words.action, DisableCard);
    }

    #[test]
    fn the_strictest_applicable_advice_speaks() {
        let d = classify(&DeclineSignal {
            code: "generic_decline".into(),
            advice_code: Some("try_again_later".into()),
            network_advice_code: Some("03".into()),
            brand: Some(CardBrand::MasterCard),
            ..DeclineSignal::default()
        });
        assert_eq!(d.action, DisableCard);
        assert_eq!(
            d.operator_reason,
            find(ADVICE_CODES, "03").unwrap().operator_reason
        );
    }

    #[test]
    fn mastercard_24_to_30_set_the_earliest_retry() {
        let hours = |n: u64| Some(Duration::from_secs(n * 3600));
        for (advice, wait) in [
            ("24", hours(1)),
            ("25", hours(24)),
            ("26", hours(48)),
            ("27", hours(96)),
            ("28", hours(144)),
            ("29", hours(192)),
            ("30", hours(240)),
        ] {
            let d = classify(&signal("insufficient_funds", Some(advice)));
            assert_eq!(d.action, RetryLater, "{advice}");
            assert_eq!(d.wait_at_least, wait, "{advice}");
            // The same code on a Visa card is not Mastercard's advice.
            let visa = classify(&DeclineSignal {
                brand: Some(CardBrand::Visa),
                ..signal("insufficient_funds", Some(advice))
            });
            assert_eq!(visa.wait_at_least, None, "{advice}");
        }
        // A card that must be disabled waits for nothing.
        assert_eq!(
            classify(&signal("lost_card", Some("30"))).wait_at_least,
            None
        );
        assert_eq!(
            classify(&signal("insufficient_funds", Some("02"))).wait_at_least,
            None
        );
    }

    #[test]
    fn advice_agreeing_with_the_code_keeps_the_code_s_own_words() {
        let d = classify(&signal("insufficient_funds", Some("02")));
        assert_eq!(d.action, RetryLater);
        assert_eq!(
            d.member_reason,
            find(DECLINE_CODES, "insufficient_funds")
                .unwrap()
                .member_reason
        );
    }

    #[test]
    fn advice_never_softens_a_card_that_must_be_disabled() {
        for r in DECLINE_CODES.iter().filter(|r| r.action == DisableCard) {
            for a in ADVICE_CODES {
                let d = classify(&signal(r.code, Some(a.code)));
                assert_eq!(d.action, DisableCard, "{} + {}", r.code, a.code);
                // An expired card the bank also stopped for good wears the bank's words.
                let words = if r.code == "expired_card" && a.action == DisableCard {
                    a.member_reason
                } else {
                    r.member_reason
                };
                assert_eq!(d.member_reason, words, "{} + {}", r.code, a.code);
            }
        }
    }

    #[test]
    fn unknown_or_empty_advice_is_ignored() {
        for advice in ["", "99", "retry_please", "\u{0}"] {
            for r in DECLINE_CODES {
                assert_eq!(
                    classify(&signal(r.code, Some(advice))),
                    classify_code(r.code)
                );
            }
        }
    }

    #[test]
    fn the_documentation_prints_the_tables() {
        for r in DECLINE_CODES.iter().chain(ADVICE_CODES) {
            let line = format!(
                "| `{}` | {} | {} | {} |",
                r.code, r.action, r.member_reason, r.operator_reason
            );
            assert!(
                DOC.contains(&line),
                "docs/declines.md lacks the row:\n{line}"
            );
        }
        let code_rows = DOC.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(
            code_rows,
            DECLINE_CODES.len() + ADVICE_CODES.len(),
            "stale rows in the docs"
        );
    }

    #[test]
    fn retries_follow_the_delays_then_stop() {
        let p = RetryPolicy::new(vec![days(1), days(3), days(5)]);
        let now = at("2026-03-01T09:00:00Z");
        assert_eq!(
            p.next_attempt_at(1, 1, now),
            Some(at("2026-03-02T09:00:00Z"))
        );
        assert_eq!(
            p.next_attempt_at(2, 2, now),
            Some(at("2026-03-04T09:00:00Z"))
        );
        assert_eq!(
            p.next_attempt_at(3, 3, now),
            Some(at("2026-03-06T09:00:00Z"))
        );
        assert_eq!(p.next_attempt_at(4, 4, now), None);
        assert_eq!(p.next_attempt_at(0, 1, now), None);
        assert_eq!(RetryPolicy::new(vec![]).next_attempt_at(1, 1, now), None);
    }

    #[test]
    fn a_card_is_never_tried_a_sixteenth_time_in_thirty_days() {
        let p = RetryPolicy::new(vec![days(1); 3]);
        assert_eq!(p.max_attempts_per_card, 15);
        assert_eq!(p.window, days(30));
        let now = at("2026-03-01T09:00:00Z");
        assert!(p.next_attempt_at(1, 14, now).is_some());
        assert_eq!(p.next_attempt_at(1, 15, now), None);
        assert_eq!(p.next_attempt_at(1, 40, now), None);
    }

    #[test]
    fn a_zero_delay_still_retries_strictly_later() {
        let p = RetryPolicy::new(vec![Duration::ZERO]);
        assert_eq!(p.delays(), &[Duration::from_secs(1)]);
        let now = at("2026-03-01T09:00:00Z");
        assert_eq!(
            p.next_attempt_at(1, 1, now),
            Some(at("2026-03-01T09:00:01Z"))
        );
    }

    #[test]
    fn a_retry_past_the_end_of_time_is_none_not_a_panic() {
        let p = RetryPolicy::new(vec![Duration::from_secs(u64::MAX)]);
        assert_eq!(p.next_attempt_at(1, 1, Timestamp::MAX), None);
    }

    #[test]
    fn schedules_are_suspended_after_enough_failures_in_a_row() {
        assert!(!suspends(0, 3));
        assert!(!suspends(2, 3));
        assert!(suspends(3, 3));
        assert!(suspends(4, 3));
        assert!(suspends(1, 1));
        assert!(!suspends(0, 0));
        assert!(suspends(1, 0));
    }

    proptest! {
        #[test]
        fn retry_times_obey_the_limits(
            delays in prop::collection::vec(0u64..=60 * 86_400, 0..=14),
            failed_attempt in 0u32..=20,
            on_card in 0u32..=40,
            now_secs in 0i64..=4_000_000_000,
        ) {
            let p = RetryPolicy::new(delays.iter().map(|s| Duration::from_secs(*s)).collect());
            let now = Timestamp::from_second(now_secs).unwrap();
            let next = p.next_attempt_at(failed_attempt, on_card, now);
            if on_card >= 15 {
                prop_assert_eq!(next, None);
            }
            if failed_attempt == 0 || failed_attempt as usize > delays.len() {
                prop_assert_eq!(next, None);
            }
            if let Some(t) = next {
                prop_assert!(t > now);
                let waited = delays[failed_attempt as usize - 1].max(1);
                prop_assert_eq!(t, now.checked_add(Duration::from_secs(waited)).unwrap());
            } else {
                prop_assert!(on_card >= 15 || failed_attempt == 0 || failed_attempt as usize > delays.len());
            }
        }

        #[test]
        fn any_code_gets_an_action_and_words(code in "\\PC{0,80}", advice in proptest::option::of("\\PC{0,8}")) {
            let d = classify(&signal(&code, advice.as_deref()));
            prop_assert!(!d.member_reason.is_empty());
            prop_assert!(d.code.chars().count() <= MAX_CODE_CHARS);
        }
    }
}
