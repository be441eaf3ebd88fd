//! Money: ISO 4217 currencies, exact amounts in minor units, and the
//! positive, capped amount that a charge may be made for.
//!
//! Amounts are integers of the currency's minor unit (cents for USD, yen for
//! JPY, fils for BHD). Nothing here ever touches a float, because a float
//! cannot hold 0.10 exactly and a billing system must add up to the cent.
//!
//! Text input is parsed strictly: surrounding whitespace is trimmed (form
//! fields and config files often carry a stray space), but inside the amount
//! only an optional leading `-`, digits, and an optional `.` followed by 1 to
//! `exponent` digits are accepted. Anything else is an error that says how to
//! write the amount, because guessing what "1,000" or "1.000" means is how
//! members get charged a thousand times too much.
//!
//! Two caps keep every amount far from the integer's limits, so that sums of them can be checked
//! and never wrap: an amount autopay stores (a bill, a balance, a credit) is at most 99,999,999
//! whole units and its minor units ([`Currency::max_stored`], 99,999,999.99 for USD), and one
//! charge is at most eight digits of minor units ([`MAX_CHARGE_MINOR`], 999,999.99 for USD),
//! the most a card processor takes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Everything that can go wrong turning text or arithmetic into money.
///
/// Messages echo the offending text only when it is short, printable and
/// could not be a card number (see [`describe_amount`]), so a card number
/// pasted into an amount field never reaches a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error(
        "{shown} is not a currency we support; use one of {}",
        supported_codes()
    )]
    UnknownCurrency { shown: String },

    #[error("the amount is empty; write it like {example}")]
    EmptyAmount { example: String },

    #[error(
        "{subject} contains a comma; write it without thousands separators and with '.' for decimals, like {example}"
    )]
    ThousandsSeparator { subject: String, example: String },

    #[error(
        "{subject} contains a currency symbol; write only the number, like {example}, and give the currency separately"
    )]
    CurrencySymbol { subject: String, example: String },

    #[error(
        "{subject} has more decimals than {currency} allows ({exponent}); write it like {example}"
    )]
    TooManyDecimals {
        subject: String,
        currency: Currency,
        exponent: u32,
        example: String,
    },

    #[error(
        "{subject} is not a plain decimal number; write it like {example} ({})",
        number_shape(*exponent)
    )]
    NotANumber {
        subject: String,
        example: String,
        exponent: u32,
    },

    #[error("{subject} is too large; {currency} amounts must be between {min} and {max}")]
    TooLarge {
        subject: String,
        currency: Currency,
        min: String,
        max: String,
    },

    #[error(
        "cannot combine a {left} amount with a {right} amount; convert one of them so both are in the same currency"
    )]
    CurrencyMismatch { left: Currency, right: Currency },

    #[error(
        "{operation} {left} and {right} overflows what an amount can hold; check the inputs, as no real balance is that large"
    )]
    Overflow {
        operation: &'static str,
        left: String,
        right: String,
    },

    #[error("a charge amount must be more than {zero}; enter a positive amount, like {example}")]
    NotPositive { zero: String, example: String },

    #[error(
        "the charge amount {amount} is over {max}, the account type's maximum (payments.max_amount_*); charge at most {max} or raise that setting"
    )]
    OverLimit { amount: String, max: String },

    #[error(
        "the charge amount {amount} is over {max}, the most one card charge can be (eight digits); charge at most {max}"
    )]
    AboveChargeCap { amount: String, max: String },
}

/// The most one charge can be, in minor units of any currency: eight digits, what card
/// processors accept (999,999.99 USD).
pub const MAX_CHARGE_MINOR: i64 = 99_999_999;

/// Whole units an amount autopay stores may reach (exclusive): 100,000,000.
const STORED_WHOLE_UNITS: i64 = 100_000_000;

/// An ISO 4217 currency from the built-in table, with its minor-unit
/// exponent.
///
/// Only table entries can exist, so `exponent()` is always the real one and
/// two `Currency` values are equal exactly when their codes are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: &'static str,
    exponent: u32,
}

impl Currency {
    pub const USD: Currency = Currency::entry("USD", 2);
    pub const CAD: Currency = Currency::entry("CAD", 2);
    pub const EUR: Currency = Currency::entry("EUR", 2);
    pub const GBP: Currency = Currency::entry("GBP", 2);
    pub const AUD: Currency = Currency::entry("AUD", 2);
    pub const NZD: Currency = Currency::entry("NZD", 2);
    pub const CHF: Currency = Currency::entry("CHF", 2);
    pub const MXN: Currency = Currency::entry("MXN", 2);
    pub const JPY: Currency = Currency::entry("JPY", 0);
    pub const KRW: Currency = Currency::entry("KRW", 0);
    pub const BHD: Currency = Currency::entry("BHD", 3);
    pub const KWD: Currency = Currency::entry("KWD", 3);

    // Private so that the table below is the only source of currencies.
    const fn entry(code: &'static str, exponent: u32) -> Currency {
        Currency { code, exponent }
    }

    /// Every supported currency, in a stable order.
    pub fn all() -> &'static [Currency] {
        &TABLE
    }

    /// Looks a code up case-insensitively ("usd" and "USD" are both USD);
    /// surrounding whitespace is ignored.
    pub fn parse(s: &str) -> Result<Currency, MoneyError> {
        let wanted = s.trim();
        TABLE
            .iter()
            .copied()
            .find(|c| c.code.eq_ignore_ascii_case(wanted))
            .ok_or_else(|| MoneyError::UnknownCurrency {
                shown: if is_safe_to_echo(wanted, 8) {
                    format!("currency '{wanted}'")
                } else {
                    "the currency".to_owned()
                },
            })
    }

    /// The uppercase ISO 4217 code, e.g. "USD".
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// How many decimal digits the minor unit has: 2 for USD, 0 for JPY,
    /// 3 for BHD.
    pub fn exponent(&self) -> u32 {
        self.exponent
    }

    fn scale(&self) -> u64 {
        10u64.pow(self.exponent)
    }

    /// The largest amount autopay stores in this currency, in either direction: 99,999,999 whole
    /// units and its minor units (99,999,999.99 USD, 99,999,999 JPY).
    pub fn max_stored(self) -> Money {
        // 10^8 * 10^3 at most: far inside i64.
        let minor = STORED_WHOLE_UNITS * self.scale() as i64 - 1;
        Money::from_minor(minor, self)
    }

    /// The most one charge can be in this currency ([`MAX_CHARGE_MINOR`]).
    pub fn max_charge(self) -> Money {
        Money::from_minor(MAX_CHARGE_MINOR, self)
    }
}

const TABLE: [Currency; 12] = [
    Currency::USD,
    Currency::CAD,
    Currency::EUR,
    Currency::GBP,
    Currency::AUD,
    Currency::NZD,
    Currency::CHF,
    Currency::MXN,
    Currency::JPY,
    Currency::KRW,
    Currency::BHD,
    Currency::KWD,
];

fn number_shape(exponent: u32) -> String {
    match exponent {
        0 => "digits and an optional leading '-'; this currency has no decimals".to_owned(),
        n => format!("digits, an optional leading '-', and at most {n} decimals after a '.'"),
    }
}

fn supported_codes() -> String {
    TABLE.iter().map(|c| c.code).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl std::str::FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::parse(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Currency::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An exact amount of one currency, of any sign (balances go negative).
///
/// Serialized as `{"amount":"125.00","currency":"USD"}`: in JSON, amounts
/// are strings next to their currency, so no JSON reader turns them into
/// floats and no amount is read without knowing what it counts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "MoneyRepr", try_from = "MoneyRepr")]
pub struct Money {
    minor: i64,
    currency: Currency,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoneyRepr {
    amount: String,
    currency: Currency,
}

impl From<Money> for MoneyRepr {
    fn from(m: Money) -> Self {
        MoneyRepr {
            amount: m.amount_string(),
            currency: m.currency,
        }
    }
}

impl TryFrom<MoneyRepr> for Money {
    type Error = MoneyError;
    fn try_from(r: MoneyRepr) -> Result<Self, Self::Error> {
        Money::parse(&r.amount, r.currency)
    }
}

impl Money {
    /// An amount given directly in minor units (cents for USD).
    pub fn from_minor(minor: i64, currency: Currency) -> Money {
        Money { minor, currency }
    }

    /// Nothing, in `currency`.
    pub fn zero(currency: Currency) -> Money {
        Money { minor: 0, currency }
    }

    /// Parses a plain decimal amount such as "125", "125.00", "-5.25" or
    /// "0.5" (surrounding whitespace is trimmed). See the module docs for
    /// what is rejected and why.
    pub fn parse(s: &str, currency: Currency) -> Result<Money, MoneyError> {
        let example = example_amount(currency);
        let input = s.trim();
        if input.is_empty() {
            return Err(MoneyError::EmptyAmount { example });
        }
        let subject = describe_amount(input);
        if input.contains(',') {
            return Err(MoneyError::ThousandsSeparator { subject, example });
        }
        if input.chars().any(is_currency_symbol) {
            return Err(MoneyError::CurrencySymbol { subject, example });
        }
        let not_a_number = || MoneyError::NotANumber {
            subject: subject.clone(),
            example: example.clone(),
            exponent: currency.exponent,
        };

        let (negative, unsigned) = match input.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, input),
        };
        let (whole, fraction) = match unsigned.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (unsigned, None),
        };
        // Both halves must be plain digits; this also rejects "+1", "--1",
        // "1e5", ".5" and "5." since each leaves an empty or non-digit half.
        let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) || fraction.is_some_and(|f| !all_digits(f)) {
            return Err(not_a_number());
        }
        let fraction = fraction.unwrap_or("");
        if fraction.len() > currency.exponent as usize {
            return Err(MoneyError::TooManyDecimals {
                subject,
                currency,
                exponent: currency.exponent,
                example,
            });
        }

        let max = currency.max_stored();
        let too_large = || MoneyError::TooLarge {
            subject: subject.clone(),
            currency,
            min: Money::from_minor(-max.minor, currency).to_string(),
            max: max.to_string(),
        };
        let whole_value = digits_value(whole).ok_or_else(too_large)?;
        let padded_fraction = digits_value(fraction)
            .and_then(|f| f.checked_mul(10u64.pow(currency.exponent - fraction.len() as u32)))
            .ok_or_else(too_large)?;
        let magnitude = whole_value
            .checked_mul(currency.scale())
            .and_then(|w| w.checked_add(padded_fraction))
            .ok_or_else(too_large)?;
        let magnitude = i64::try_from(magnitude)
            .ok()
            .filter(|m| *m <= max.minor)
            .ok_or_else(too_large)?;
        let minor = if negative { -magnitude } else { magnitude };
        Ok(Money { minor, currency })
    }

    /// The amount in minor units.
    pub fn minor(&self) -> i64 {
        self.minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn is_positive(&self) -> bool {
        self.minor > 0
    }

    pub fn is_zero(&self) -> bool {
        self.minor == 0
    }

    /// Adds two amounts of the same currency; a different currency or an
    /// overflow is an error, never a panic or a wrapped value.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        self.minor
            .checked_add(other.minor)
            .map(|minor| Money { minor, ..self })
            .ok_or_else(|| self.overflow("adding", other))
    }

    /// Adds up amounts of one currency, checking every step.
    pub fn checked_sum(
        currency: Currency,
        amounts: impl IntoIterator<Item = Money>,
    ) -> Result<Money, MoneyError> {
        amounts
            .into_iter()
            .try_fold(Money::zero(currency), Money::checked_add)
    }

    /// The smaller of two amounts of one currency.
    pub fn min(self, other: Money) -> Money {
        if other.minor < self.minor {
            other
        } else {
            self
        }
    }

    /// Zero when this amount is below zero.
    pub fn at_least_zero(self) -> Money {
        Money {
            minor: self.minor.max(0),
            ..self
        }
    }

    /// Subtracts `other` from `self`; the same rules as [`Money::checked_add`].
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        self.minor
            .checked_sub(other.minor)
            .map(|minor| Money { minor, ..self })
            .ok_or_else(|| self.overflow("subtracting", other))
    }

    /// The amount as text without its currency, e.g. "125.00"; the form
    /// used in JSON next to a separate currency field.
    pub fn amount_string(&self) -> String {
        self.to_string()
    }

    /// The amount with its currency, e.g. "125.00 USD", for people to read.
    pub fn display_with_code(&self) -> String {
        format!("{self} {}", self.currency)
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }

    fn overflow(self, operation: &'static str, other: Money) -> MoneyError {
        MoneyError::Overflow {
            operation,
            left: self.display_with_code(),
            right: other.display_with_code(),
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minor < 0 { "-" } else { "" };
        // unsigned_abs keeps i64::MIN printable.
        let magnitude = self.minor.unsigned_abs();
        let scale = self.currency.scale();
        let whole = magnitude / scale;
        if self.currency.exponent == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let fraction = magnitude % scale;
            let width = self.currency.exponent as usize;
            write!(f, "{sign}{whole}.{fraction:0width$}")
        }
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Money({self} {})", self.currency)
    }
}

/// A strictly positive amount that a member may be charged.
///
/// Usually built with [`ChargeAmount::new`], which also applies the account
/// type's cap; [`ChargeAmount::new_unbounded`] exists for the places where
/// the cap is only known later, which then call [`ChargeAmount::check_within`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ChargeAmount(Money);

impl ChargeAmount {
    /// `money` must be more than zero and no more than `max`, in the same
    /// currency as `max`.
    pub fn new(money: Money, max: Money) -> Result<ChargeAmount, MoneyError> {
        let charge = ChargeAmount::new_unbounded(money)?;
        charge.check_within(max)?;
        Ok(charge)
    }

    /// Checks positivity and the eight-digit cap of one charge only; the caller must apply the
    /// account type's limit later.
    pub fn new_unbounded(money: Money) -> Result<ChargeAmount, MoneyError> {
        if !money.is_positive() {
            return Err(MoneyError::NotPositive {
                zero: Money::zero(money.currency).to_string(),
                example: example_amount(money.currency),
            });
        }
        if money.minor > MAX_CHARGE_MINOR {
            return Err(MoneyError::AboveChargeCap {
                amount: money.display_with_code(),
                max: money.currency.max_charge().display_with_code(),
            });
        }
        Ok(ChargeAmount(money))
    }

    /// [`Money::parse`] followed by [`ChargeAmount::new`].
    pub fn parse(s: &str, currency: Currency, max: Money) -> Result<ChargeAmount, MoneyError> {
        ChargeAmount::new(Money::parse(s, currency)?, max)
    }

    /// Whether this charge fits under `max` (same currency, not above it).
    pub fn check_within(&self, max: Money) -> Result<(), MoneyError> {
        self.0.same_currency(max)?;
        if self.0.minor > max.minor {
            return Err(MoneyError::OverLimit {
                amount: self.0.display_with_code(),
                max: max.display_with_code(),
            });
        }
        Ok(())
    }

    pub fn money(&self) -> Money {
        self.0
    }
}

impl fmt::Display for ChargeAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ChargeAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChargeAmount({} {})", self.0, self.0.currency)
    }
}

/// "125.00" written with the currency's own number of decimals, so the hint
/// in an error is something the parser would accept for that currency.
fn example_amount(currency: Currency) -> String {
    Money::from_minor(125 * currency.scale() as i64, currency).to_string()
}

/// Sums ASCII digits into a u64, or None on overflow; "" is 0.
fn digits_value(digits: &str) -> Option<u64> {
    digits.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn is_currency_symbol(c: char) -> bool {
    matches!(
        c,
        '$' | '€' | '£' | '¥' | '₩' | '¢' | '₹' | '₣' | '₱' | '₪' | '₽' | '₺' | '₫' | '฿'
    )
}

/// How an error names the amount it rejects: the text itself when that is
/// harmless, otherwise just "the amount". Text with more than 6 digits is
/// withheld because it might be a card number typed into the wrong field
/// (6 is the most of a card number that may be shown anywhere, per PCI
/// DSS); control and non-printing characters are withheld so that errors
/// cannot forge log lines.
fn describe_amount(input: &str) -> String {
    if is_safe_to_echo(input, 24) {
        format!("amount '{input}'")
    } else {
        "the amount".to_owned()
    }
}

fn is_safe_to_echo(text: &str, max_chars: usize) -> bool {
    text.chars().count() <= max_chars
        && text.bytes().filter(u8::is_ascii_digit).count() <= 6
        && text
            .chars()
            .all(|c| c.is_ascii_graphic() || c == ' ' || is_currency_symbol(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd(s: &str) -> Result<Money, MoneyError> {
        Money::parse(s, Currency::USD)
    }

    #[test]
    fn currency_codes_parse_case_insensitively_and_are_stored_uppercase() {
        assert_eq!(Currency::parse("usd"), Ok(Currency::USD));
        assert_eq!(Currency::parse("UsD"), Ok(Currency::USD));
        assert_eq!(Currency::parse(" jpy ").map(|c| c.code()), Ok("JPY"));
        assert_eq!(
            Currency::parse("usd").map(|c| c.to_string()),
            Ok("USD".into())
        );
    }

    #[test]
    fn currency_exponents_match_iso_4217() {
        for c in ["USD", "CAD", "EUR", "GBP", "AUD", "NZD", "CHF", "MXN"] {
            assert_eq!(Currency::parse(c).map(|c| c.exponent()), Ok(2), "{c}");
        }
        for c in ["JPY", "KRW"] {
            assert_eq!(Currency::parse(c).map(|c| c.exponent()), Ok(0), "{c}");
        }
        for c in ["BHD", "KWD"] {
            assert_eq!(Currency::parse(c).map(|c| c.exponent()), Ok(3), "{c}");
        }
    }

    #[test]
    fn an_unknown_currency_is_rejected_with_the_supported_list() {
        let err = Currency::parse("XYZ").unwrap_err().to_string();
        assert!(err.contains("'XYZ'"), "{err}");
        assert!(err.contains("USD, CAD"), "{err}");
    }

    #[test]
    fn currency_serializes_as_its_code_and_deserializing_validates() {
        assert_eq!(serde_json::to_string(&Currency::EUR).unwrap(), "\"EUR\"");
        assert_eq!(
            serde_json::from_str::<Currency>("\"eur\"").unwrap(),
            Currency::EUR
        );
        assert!(serde_json::from_str::<Currency>("\"EURO\"").is_err());
    }

    #[test]
    fn plain_amounts_parse_to_exact_minor_units() {
        assert_eq!(usd("125").unwrap().minor(), 12500);
        assert_eq!(usd("125.0").unwrap().minor(), 12500);
        assert_eq!(usd("125.00").unwrap().minor(), 12500);
        assert_eq!(usd("-5.25").unwrap().minor(), -525);
        assert_eq!(usd("0.5").unwrap().minor(), 50);
        assert_eq!(usd("  7.10\n").unwrap().minor(), 710);
        assert_eq!(Money::parse("500", Currency::JPY).unwrap().minor(), 500);
        assert_eq!(Money::parse("1.234", Currency::BHD).unwrap().minor(), 1234);
    }

    #[test]
    fn more_decimals_than_the_currency_has_are_rejected_with_an_example() {
        let err = usd("12.345").unwrap_err().to_string();
        assert_eq!(
            err,
            "amount '12.345' has more decimals than USD allows (2); write it like 125.00"
        );
        let err = Money::parse("12.5", Currency::JPY).unwrap_err().to_string();
        assert!(err.contains("JPY allows (0); write it like 125"), "{err}");
    }

    #[test]
    fn a_malformed_amount_explains_the_shape_for_its_currency() {
        assert_eq!(
            usd("abc").unwrap_err().to_string(),
            "amount 'abc' is not a plain decimal number; write it like 125.00 \
             (digits, an optional leading '-', and at most 2 decimals after a '.')"
        );
        let err = Money::parse("1e3", Currency::JPY).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "like 125 (digits and an optional leading '-'; this currency has no decimals)"
            ),
            "{err}"
        );
    }

    #[test]
    fn thousands_separators_are_rejected_with_an_explanation() {
        let err = usd("1,000.00").unwrap_err().to_string();
        assert!(err.contains("without thousands separators"), "{err}");
    }

    #[test]
    fn currency_symbols_are_rejected_with_an_explanation() {
        let err = usd("$5").unwrap_err();
        assert!(matches!(err, MoneyError::CurrencySymbol { .. }), "{err}");
        assert!(err.to_string().contains("give the currency separately"));
    }

    #[test]
    fn malformed_amounts_are_rejected() {
        for bad in [
            "abc", "+-1", "+1", "--1", "1.2.3", ".5", "5.", "1e5", "1 000", "- 5", "0x10", "NaN",
        ] {
            assert!(
                matches!(usd(bad), Err(MoneyError::NotANumber { .. })),
                "{bad:?} gave {:?}",
                usd(bad)
            );
        }
        assert!(matches!(usd(""), Err(MoneyError::EmptyAmount { .. })));
        assert!(matches!(usd("   "), Err(MoneyError::EmptyAmount { .. })));
    }

    #[test]
    fn amounts_beyond_the_stored_cap_are_rejected_not_wrapped() {
        for too_large in [
            "100000000.00",
            "-100000000",
            "50000000000000000.00",
            "92233720368547758.08",
            "99999999999999999999999",
        ] {
            let err = usd(too_large).unwrap_err();
            assert!(matches!(err, MoneyError::TooLarge { .. }), "{too_large}");
            assert!(
                err.to_string()
                    .contains("between -99999999.99 and 99999999.99"),
                "{err}"
            );
        }
        assert_eq!(usd("99999999.99").unwrap().minor(), 9_999_999_999);
        assert_eq!(usd("-99999999.99").unwrap().minor(), -9_999_999_999);
        assert_eq!(
            Money::parse("99999999", Currency::JPY).unwrap().minor(),
            99_999_999
        );
        assert!(Money::parse("100000000", Currency::JPY).is_err());
    }

    #[test]
    fn one_charge_is_at_most_eight_digits_of_minor_units() {
        let cap = Currency::USD.max_charge();
        assert_eq!(cap.to_string(), "999999.99");
        assert!(ChargeAmount::new_unbounded(cap).is_ok());
        let err = ChargeAmount::new_unbounded(usd("1000000.00").unwrap()).unwrap_err();
        assert!(matches!(err, MoneyError::AboveChargeCap { .. }));
        assert!(err.to_string().contains("999999.99 USD"), "{err}");
        let huge = Money::from_minor(i64::MAX, Currency::USD);
        assert!(ChargeAmount::new(huge, huge).is_err());
    }

    #[test]
    fn sums_are_checked_at_every_step() {
        let big = Money::from_minor(i64::MAX - 1, Currency::USD);
        let one = Money::from_minor(1, Currency::USD);
        assert_eq!(
            Money::checked_sum(Currency::USD, [big, one]),
            Ok(Money::from_minor(i64::MAX, Currency::USD))
        );
        assert!(matches!(
            Money::checked_sum(Currency::USD, [big, one, one]),
            Err(MoneyError::Overflow { .. })
        ));
        assert!(Money::checked_sum(Currency::USD, [Money::zero(Currency::CAD)]).is_err());
    }

    #[test]
    fn errors_do_not_echo_a_card_number_typed_into_an_amount_field() {
        let err = usd("4242 4242 4242 4242").unwrap_err();
        assert!(!err.to_string().contains("4242"), "{err}");
        assert!(!format!("{err:?}").contains("4242"));
    }

    #[test]
    fn display_uses_the_currency_decimals_and_a_sign() {
        assert_eq!(
            Money::from_minor(12500, Currency::USD).to_string(),
            "125.00"
        );
        assert_eq!(Money::from_minor(-5, Currency::USD).to_string(), "-0.05");
        assert_eq!(Money::from_minor(500, Currency::JPY).to_string(), "500");
        assert_eq!(Money::from_minor(-1, Currency::KWD).to_string(), "-0.001");
        assert_eq!(
            Money::from_minor(12500, Currency::USD).display_with_code(),
            "125.00 USD"
        );
        assert_eq!(
            format!("{:?}", Money::from_minor(12500, Currency::USD)),
            "Money(125.00 USD)"
        );
    }

    #[test]
    fn money_serializes_as_an_amount_string_next_to_its_currency() {
        let m = Money::from_minor(12500, Currency::USD);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"amount":"125.00","currency":"USD"}"#);
        assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
    }

    #[test]
    fn deserializing_money_validates_the_amount_against_its_currency() {
        let err = serde_json::from_str::<Money>(r#"{"amount":"1.5","currency":"JPY"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more decimals than JPY"), "{err}");
        assert!(serde_json::from_str::<Money>(r#"{"amount":125,"currency":"USD"}"#).is_err());
    }

    #[test]
    fn adding_different_currencies_is_an_error() {
        let a = Money::from_minor(1, Currency::USD);
        let b = Money::from_minor(1, Currency::CAD);
        assert_eq!(
            a.checked_add(b),
            Err(MoneyError::CurrencyMismatch {
                left: Currency::USD,
                right: Currency::CAD
            })
        );
        assert!(a.checked_sub(b).is_err());
    }

    #[test]
    fn arithmetic_overflow_is_an_error() {
        let max = Money::from_minor(i64::MAX, Currency::USD);
        let one = Money::from_minor(1, Currency::USD);
        assert!(matches!(
            max.checked_add(one),
            Err(MoneyError::Overflow { .. })
        ));
        assert_eq!(
            max.checked_sub(one),
            Ok(Money::from_minor(i64::MAX - 1, Currency::USD))
        );
    }

    #[test]
    fn zero_and_sign_predicates_agree_with_the_minor_amount() {
        let zero = Money::zero(Currency::EUR);
        assert!(zero.is_zero() && !zero.is_positive());
        assert!(usd("0.01").unwrap().is_positive());
        assert!(!usd("-0.01").unwrap().is_positive());
        assert!(usd("-0").unwrap().is_zero());
    }

    #[test]
    fn a_charge_must_be_positive() {
        let max = usd("500").unwrap();
        let err = ChargeAmount::new(Money::zero(Currency::USD), max).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("a charge amount must be more than 0.00"),
            "{err}"
        );
        assert!(ChargeAmount::new(usd("-1").unwrap(), max).is_err());
        assert!(ChargeAmount::new_unbounded(usd("-1").unwrap()).is_err());
    }

    #[test]
    fn a_charge_over_the_limit_names_the_limit_and_the_setting() {
        let max = usd("500").unwrap();
        let err = ChargeAmount::parse("500.01", Currency::USD, max)
            .unwrap_err()
            .to_string();
        assert!(err.contains("500.00 USD"), "{err}");
        assert!(err.contains("account type's maximum"), "{err}");
        assert!(err.contains("payments.max_amount_*"), "{err}");
    }

    #[test]
    fn a_charge_at_exactly_the_limit_is_allowed() {
        let max = usd("500").unwrap();
        let charge = ChargeAmount::parse("500.00", Currency::USD, max).unwrap();
        assert_eq!(charge.money(), max);
        assert_eq!(charge.to_string(), "500.00");
    }

    #[test]
    fn a_charge_limit_in_another_currency_is_an_error() {
        let max = Money::parse("500", Currency::CAD).unwrap();
        assert!(matches!(
            ChargeAmount::new(usd("1").unwrap(), max),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
    }

    #[test]
    fn an_unbounded_charge_can_be_checked_against_a_limit_later() {
        let charge = ChargeAmount::new_unbounded(usd("600").unwrap()).unwrap();
        assert!(charge.check_within(usd("600").unwrap()).is_ok());
        assert!(charge.check_within(usd("599.99").unwrap()).is_err());
    }

    #[test]
    fn a_charge_serializes_like_its_money() {
        let charge = ChargeAmount::new_unbounded(usd("1.50").unwrap()).unwrap();
        assert_eq!(
            serde_json::to_string(&charge).unwrap(),
            r#"{"amount":"1.50","currency":"USD"}"#
        );
    }

    fn any_currency() -> impl Strategy<Value = Currency> {
        proptest::sample::select(Currency::all())
    }

    proptest! {
        #[test]
        fn parsing_the_display_of_any_storable_amount_gives_it_back(minor in any::<i64>(), c in any_currency()) {
            let minor = minor % (c.max_stored().minor() + 1);
            let m = Money::from_minor(minor, c);
            prop_assert_eq!(Money::parse(&m.to_string(), c), Ok(m));
            prop_assert_eq!(Money::parse(&m.amount_string(), c), Ok(m));
        }

        #[test]
        fn money_survives_a_json_round_trip(minor in any::<i64>(), c in any_currency()) {
            let m = Money::from_minor(minor % (c.max_stored().minor() + 1), c);
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        }

        #[test]
        fn checked_arithmetic_never_panics_and_matches_i128(
            a in any::<i64>(), b in any::<i64>(), ca in any_currency(), cb in any_currency()
        ) {
            let x = Money::from_minor(a, ca);
            let y = Money::from_minor(b, cb);
            let sum = x.checked_add(y);
            let diff = x.checked_sub(y);
            if ca != cb {
                prop_assert!(sum.is_err() && diff.is_err());
            } else {
                let exact_sum = i128::from(a) + i128::from(b);
                let exact_diff = i128::from(a) - i128::from(b);
                prop_assert_eq!(sum.ok().map(|m| i128::from(m.minor())), i64::try_from(exact_sum).ok().map(i128::from));
                prop_assert_eq!(diff.ok().map(|m| i128::from(m.minor())), i64::try_from(exact_diff).ok().map(i128::from));
            }
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,40}", c in any_currency()) {
            let _ = Money::parse(&s, c);
        }

        #[test]
        fn a_charge_exists_only_between_zero_and_the_limit(minor in any::<i64>(), max in any::<i64>()) {
            let result = ChargeAmount::new(
                Money::from_minor(minor, Currency::USD),
                Money::from_minor(max, Currency::USD),
            );
            prop_assert_eq!(result.is_ok(), minor > 0 && minor <= max && minor <= MAX_CHARGE_MINOR);
        }
    }
}
