//! Payment cards: brands and which of them we accept, the card number and
//! security code (both secret), the last four digits, the expiry date, and
//! the Luhn check.
//!
//! The secret types are built so that a mistake cannot leak them: they have
//! no `Display`, their `Debug` is masked, their buffers are zeroed when
//! dropped, the only way to read them is a method whose name says so, and no
//! error in this module ever carries a digit of the input.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use jiff::civil::Date;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Card numbers have 12 to 19 digits (ISO/IEC 7812).
const MIN_CARD_DIGITS: usize = 12;
const MAX_CARD_DIGITS: usize = 19;

/// Card years are printed with two digits, so only this century can be
/// meant; anything outside it is a typo, not a card.
const MIN_EXPIRY_YEAR: u16 = 2000;
const MAX_EXPIRY_YEAR: u16 = 2099;

/// Everything that can go wrong with card data. No variant holds a digit of
/// a card number or security code, so these are safe to log and to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("the card number is empty; enter the 12 to 19 digits on the front of the card")]
    NumberEmpty,

    #[error(
        "the card number contains a character other than digits, spaces and dashes; enter only the digits"
    )]
    NumberInvalidCharacter,

    #[error("the card number has {digits} digits; a card number has 12 to 19")]
    NumberWrongLength { digits: usize },

    #[error("the card number fails its check digit; check it for a typo")]
    NumberCheckDigit,

    #[error(
        "the security code must be digits only; enter the {expected} digits printed on the card"
    )]
    SecurityCodeInvalidCharacter { expected: usize },

    #[error(
        "the security code has {digits} digits; a {brand} card's security code has {expected}, re-enter it from the card"
    )]
    SecurityCodeWrongLength {
        digits: usize,
        expected: usize,
        brand: CardBrand,
    },

    #[error("the last four digits must be exactly 4 digits (0-9); re-enter them")]
    Last4Invalid,

    #[error("{shown} is not in MM/YYYY form; write it like 04/2028")]
    ExpiryFormat { shown: String },

    #[error("{shown} is not a month; write MM/YYYY, e.g. 04/2028")]
    ExpiryMonth { shown: String },

    #[error(
        "expiry year {year} is out of range; write MM/YYYY with a year from 2000 to 2099, e.g. 04/2028"
    )]
    ExpiryYear { year: u16 },

    #[error("the card expired at the end of {expiry}; use a card that has not expired")]
    Expired { expiry: Expiry },

    #[error("{shown} is not a card brand we know; use visa, mastercard, discover, amex or other")]
    UnknownBrand { shown: String },

    #[error(
        "the accepted card brands list is empty; list at least one of visa, mastercard, discover, amex or other"
    )]
    NoAcceptedBrands,

    #[error("we accept {accepted}; this card is {}", brand_phrase(*brand))]
    BrandNotAccepted { accepted: String, brand: CardBrand },
}

fn brand_phrase(brand: CardBrand) -> String {
    match brand {
        CardBrand::Other => "of another brand".to_owned(),
        known => known.to_string(),
    }
}

/// A card network. `Other` stands for any number whose prefix is not one of
/// the four we recognize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CardBrand {
    Visa,
    MasterCard,
    Discover,
    Amex,
    Other,
}

impl CardBrand {
    const ALL: [CardBrand; 5] = [
        CardBrand::Visa,
        CardBrand::MasterCard,
        CardBrand::Discover,
        CardBrand::Amex,
        CardBrand::Other,
    ];

    /// The spelling stored in the database and config: "visa",
    /// "mastercard", "discover", "amex", "other".
    pub fn as_str(&self) -> &'static str {
        match self {
            CardBrand::Visa => "visa",
            CardBrand::MasterCard => "mastercard",
            CardBrand::Discover => "discover",
            CardBrand::Amex => "amex",
            CardBrand::Other => "other",
        }
    }

    /// Detects the brand from the leading digits of a card number. Works on
    /// a prefix as short as the longest range needs (6 digits); anything not
    /// matching is `Other`.
    pub fn from_prefix(digits: &str) -> CardBrand {
        let lead = |n: usize| -> Option<u32> {
            let head = digits.as_bytes().get(..n)?;
            head.iter().try_fold(0u32, |acc, &b| {
                b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
            })
        };
        let within = |n, lo, hi| lead(n).is_some_and(|p| (lo..=hi).contains(&p));
        if within(1, 4, 4) {
            CardBrand::Visa
        } else if within(2, 51, 55) || within(4, 2221, 2720) {
            CardBrand::MasterCard
        } else if within(2, 34, 34) || within(2, 37, 37) {
            CardBrand::Amex
        } else if within(4, 6011, 6011)
            || within(3, 644, 649)
            || within(2, 65, 65)
            || within(6, 622126, 622925)
        {
            CardBrand::Discover
        } else {
            CardBrand::Other
        }
    }

    /// How many digits this brand's security code has.
    pub fn security_code_len(&self) -> usize {
        match self {
            CardBrand::Amex => 4,
            _ => 3,
        }
    }
}

impl fmt::Display for CardBrand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CardBrand::Visa => "Visa",
            CardBrand::MasterCard => "MasterCard",
            CardBrand::Discover => "Discover",
            CardBrand::Amex => "American Express",
            CardBrand::Other => "other",
        })
    }
}

impl FromStr for CardBrand {
    type Err = CardError;

    /// Accepts the stored spelling in any case, plus the spellings people
    /// write ("Master Card", "master-card", "American Express"), so that
    /// config files are forgiving while storage stays canonical.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        let brand = match wanted.to_ascii_lowercase().as_str() {
            "visa" => CardBrand::Visa,
            "mastercard" | "master-card" | "master card" => CardBrand::MasterCard,
            "discover" => CardBrand::Discover,
            "amex" | "american express" | "american-express" => CardBrand::Amex,
            "other" => CardBrand::Other,
            _ => {
                return Err(CardError::UnknownBrand {
                    shown: echo_or(wanted, "card brand", "that card brand"),
                });
            }
        };
        Ok(brand)
    }
}

impl Serialize for CardBrand {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CardBrand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The set of brands this deployment takes. Never empty: a payments daemon
/// that accepts no card is a misconfiguration, caught when config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedBrands(BTreeSet<CardBrand>);

impl Default for AcceptedBrands {
    fn default() -> Self {
        AcceptedBrands(BTreeSet::from([
            CardBrand::Visa,
            CardBrand::MasterCard,
            CardBrand::Discover,
        ]))
    }
}

impl AcceptedBrands {
    /// Builds the set from config entries such as `["visa", "amex"]`;
    /// duplicates are harmless, an unknown entry or an empty list is not.
    pub fn parse_list(entries: &[String]) -> Result<AcceptedBrands, CardError> {
        let brands = entries
            .iter()
            .map(|e| e.parse::<CardBrand>())
            .collect::<Result<BTreeSet<_>, _>>()?;
        if brands.is_empty() {
            return Err(CardError::NoAcceptedBrands);
        }
        Ok(AcceptedBrands(brands))
    }

    pub fn contains(&self, brand: CardBrand) -> bool {
        self.0.contains(&brand)
    }

    /// The brands in a fixed order (Visa, MasterCard, Discover, Amex, Other).
    pub fn iter(&self) -> impl Iterator<Item = CardBrand> + '_ {
        self.0.iter().copied()
    }

    /// The brands as people say them: "Visa, MasterCard and Discover".
    pub fn describe(&self) -> String {
        let names: Vec<String> = CardBrand::ALL
            .iter()
            .filter(|b| self.contains(**b))
            .map(|b| match b {
                CardBrand::Other => "other brands".to_owned(),
                known => known.to_string(),
            })
            .collect();
        match names.split_last() {
            None => String::new(),
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        }
    }

    pub fn check(&self, brand: CardBrand) -> Result<(), CardError> {
        if self.contains(brand) {
            Ok(())
        } else {
            Err(CardError::BrandNotAccepted {
                accepted: self.describe(),
                brand,
            })
        }
    }
}

/// ASCII digits that are zeroed when dropped. Shared by the two secret
/// types so that every path, including a parse that fails halfway, wipes
/// what it copied.
struct SecretDigits(String);

impl SecretDigits {
    /// Reserves the full capacity up front: a `String` that grows moves its
    /// bytes and leaves the old copy behind in freed memory, unzeroed.
    fn with_capacity(max: usize) -> SecretDigits {
        SecretDigits(String::with_capacity(max))
    }

    fn as_str(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretDigits {
    fn drop(&mut self) {
        // SAFETY: 0 is a valid one-byte UTF-8 character, so writing it over
        // every byte leaves the String valid UTF-8.
        let bytes = unsafe { self.0.as_bytes_mut() };
        for byte in bytes.iter_mut() {
            // SAFETY: `byte` is a valid, aligned, exclusive reference.
            // Volatile so that the compiler cannot drop the writes as dead
            // stores to memory about to be freed.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// A validated card number (the PAN). Secret: no `Display`, `Debug` shows
/// only the last four digits, not `Clone`, zeroed on drop.
pub struct CardNumber {
    digits: SecretDigits,
    brand: CardBrand,
}

impl CardNumber {
    /// Strips spaces and dashes (and surrounding whitespace), then requires
    /// 12 to 19 digits whose Luhn check digit is right.
    pub fn parse(s: &str) -> Result<CardNumber, CardError> {
        let mut digits = SecretDigits::with_capacity(MAX_CARD_DIGITS);
        let mut count = 0usize;
        for c in s.trim().chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => {
                    count += 1;
                    // Past the maximum we only count, so the buffer never
                    // reallocates (see SecretDigits::with_capacity).
                    if count <= MAX_CARD_DIGITS {
                        digits.0.push(c);
                    }
                }
                _ => return Err(CardError::NumberInvalidCharacter),
            }
        }
        if count == 0 {
            return Err(CardError::NumberEmpty);
        }
        if !(MIN_CARD_DIGITS..=MAX_CARD_DIGITS).contains(&count) {
            return Err(CardError::NumberWrongLength { digits: count });
        }
        if !luhn_valid(digits.as_str()) {
            return Err(CardError::NumberCheckDigit);
        }
        let brand = CardBrand::from_prefix(digits.as_str());
        Ok(CardNumber { digits, brand })
    }

    pub fn brand(&self) -> CardBrand {
        self.brand
    }

    pub fn last4(&self) -> Last4 {
        let d = self.digits.as_str();
        // A parsed number has at least 12 ASCII digits, so this slice is
        // always the last four; `get` just keeps the method panic-free.
        Last4(d.get(d.len().saturating_sub(4)..).unwrap_or("").to_owned())
    }

    /// The full number. Only for handing to the processor adapter; never
    /// log, store or format it.
    pub fn expose_digits(&self) -> &str {
        self.digits.as_str()
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardNumber(****{})", self.last4())
    }
}

/// A card security code (CVV/CVC/CID). Secret: no `Display`, `Debug` shows
/// no digit, not `Clone`, zeroed on drop.
pub struct SecurityCode(SecretDigits);

impl SecurityCode {
    /// 4 digits for American Express (printed on the front), 3 for every
    /// other brand. Surrounding whitespace is ignored.
    pub fn parse(s: &str, brand: CardBrand) -> Result<SecurityCode, CardError> {
        let expected = brand.security_code_len();
        let mut code = SecretDigits::with_capacity(4);
        let mut count = 0usize;
        for c in s.trim().chars() {
            if !c.is_ascii_digit() {
                return Err(CardError::SecurityCodeInvalidCharacter { expected });
            }
            count += 1;
            if count <= 4 {
                code.0.push(c);
            }
        }
        if count != expected {
            return Err(CardError::SecurityCodeWrongLength {
                digits: count,
                expected,
                brand,
            });
        }
        Ok(SecurityCode(code))
    }

    /// The code itself. Only for handing to the processor adapter.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for SecurityCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecurityCode(***)")
    }
}

/// The last four digits of a card number: not secret, and the only part of
/// the number we keep or show.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Last4(String);

impl Last4 {
    /// Exactly 4 ASCII digits, nothing else (no trimming: this comes from
    /// our own storage or the processor, not from people).
    pub fn parse(s: &str) -> Result<Last4, CardError> {
        if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Last4(s.to_owned()))
        } else {
            Err(CardError::Last4Invalid)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Last4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Last4 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Last4 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Last4::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A card's expiry month. The card is good through the last day of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Expiry {
    // Field order gives the derived Ord chronological order.
    year: u16,
    month: u8,
    // Computed once in `new`, where a bad date can still be an error, so
    // that `last_day` never needs to fail or panic.
    last_day: Date,
}

impl Expiry {
    /// Month 1-12 and a year from 2000 to 2099.
    pub fn new(month: u8, year: u16) -> Result<Expiry, CardError> {
        if !(1..=12).contains(&month) {
            return Err(CardError::ExpiryMonth {
                shown: format!("expiry '{month:02}/{year:04}'"),
            });
        }
        if !(MIN_EXPIRY_YEAR..=MAX_EXPIRY_YEAR).contains(&year) {
            return Err(CardError::ExpiryYear { year });
        }
        let first =
            Date::new(year as i16, month as i8, 1).map_err(|_| CardError::ExpiryYear { year })?;
        Ok(Expiry {
            year,
            month,
            last_day: first.last_of_month(),
        })
    }

    /// "MM/YYYY", or "MM/YY" meaning 20YY; a one-digit month ("4/2028") is
    /// also fine. Surrounding whitespace is ignored.
    pub fn parse(s: &str) -> Result<Expiry, CardError> {
        let input = s.trim();
        let shown = echo_or(input, "expiry", "the expiry");
        let format_error = || CardError::ExpiryFormat {
            shown: shown.clone(),
        };
        let (m, y) = input.split_once('/').ok_or_else(format_error)?;
        let digits = |t: &str, lens: &[usize]| -> Option<u16> {
            if !lens.contains(&t.len()) || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse().ok()
        };
        let month = digits(m, &[1, 2]).ok_or_else(format_error)?;
        let year = match y.len() {
            2 => digits(y, &[2]).map(|yy| 2000 + yy),
            _ => digits(y, &[4]),
        }
        .ok_or_else(format_error)?;
        if !(1..=12).contains(&month) {
            return Err(CardError::ExpiryMonth { shown });
        }
        // Month is 1..=12 here, so the cast is lossless.
        Expiry::new(month as u8, year)
    }

    pub fn month(&self) -> u8 {
        self.month
    }

    pub fn year(&self) -> u16 {
        self.year
    }

    /// The last day the card can be used.
    pub fn last_day(&self) -> Date {
        self.last_day
    }

    pub fn is_expired_on(&self, today: Date) -> bool {
        today > self.last_day
    }

    pub fn check_not_expired(&self, today: Date) -> Result<(), CardError> {
        if self.is_expired_on(today) {
            Err(CardError::Expired { expiry: *self })
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}/{:04}", self.month, self.year)
    }
}

impl FromStr for Expiry {
    type Err = CardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Expiry::parse(s)
    }
}

impl Serialize for Expiry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Expiry::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether free text holds something that could be a card number: 12 to 19
/// digits in a row (spaces or dashes between them allowed) that pass the Luhn
/// check. Fields that are stored in clear (account numbers, names, references,
/// reasons) refuse such text, so a number pasted into the wrong field is never
/// kept.
pub fn contains_card_number(text: &str) -> bool {
    !card_number_spans(text, false).is_empty()
}

/// Where `text` holds what could be a card number, as ranges of character positions: runs of
/// 12 to 19 digits (single spaces or dashes between them allowed) that pass the Luhn check.
/// With `standalone_only`, a run must not touch a letter or digit on either side, so the
/// digit groups inside a UUID or a reference are left alone.
pub fn card_number_spans(text: &str, standalone_only: bool) -> Vec<std::ops::Range<usize>> {
    let chars: Vec<char> = text.chars().collect();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            && (!standalone_only || i == 0 || !chars[i - 1].is_alphanumeric());
        if !starts {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        let mut j = i + 1;
        while j < chars.len() {
            if chars[j].is_ascii_digit() {
                end = j + 1;
                j += 1;
            } else if (chars[j] == ' ' || chars[j] == '-')
                && chars.get(j + 1).is_some_and(char::is_ascii_digit)
            {
                j += 1;
            } else {
                break;
            }
        }
        let digits: String = chars[i..end]
            .iter()
            .filter(|c| c.is_ascii_digit())
            .collect();
        let ends_alone = !standalone_only || chars.get(end).is_none_or(|c| !c.is_alphanumeric());
        if ends_alone && (12..=19).contains(&digits.len()) && luhn_valid(&digits) {
            spans.push(i..end);
        }
        i = end;
    }
    spans
}

/// Replaces anything that could be a card number with a placeholder, for text about to be
/// shown: error messages, clap's echo of an unexpected argument, a settings problem. It finds
/// what [`contains_card_number`] finds (12 to 19 digits passing the Luhn check, single spaces or
/// dashes allowed between them, also when letters touch them: `ref4242424242424242`), except
/// inside a UUID (`0193a5b2-7c1e-7d3f-9a41-212345678901`), whose digit groups are ids, not cards.
pub fn redact_card_numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let uuids = uuid_spans(&chars);
    let spans: Vec<std::ops::Range<usize>> = card_number_spans(text, false)
        .into_iter()
        .filter(|s| !uuids.iter().any(|u| u.start <= s.start && s.end <= u.end))
        .collect();
    if spans.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut next = 0;
    for (i, c) in chars.iter().enumerate() {
        match spans.get(next) {
            Some(span) if span.start == i => out.push_str("[card number removed]"),
            Some(span) if span.contains(&i) => {}
            _ => out.push(*c),
        }
        if spans.get(next).is_some_and(|span| i + 1 == span.end) {
            next += 1;
        }
    }
    out
}

/// Where `chars` holds a hyphenated UUID (8-4-4-4-12 hex digits), as character ranges.
fn uuid_spans(chars: &[char]) -> Vec<std::ops::Range<usize>> {
    const SHAPE: &[u8] = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
    let mut out = Vec::new();
    let mut i = 0;
    while i + SHAPE.len() <= chars.len() {
        let fits = SHAPE.iter().zip(&chars[i..]).all(|(s, c)| match s {
            b'-' => *c == '-',
            _ => c.is_ascii_hexdigit(),
        });
        if fits {
            out.push(i..i + SHAPE.len());
            i += SHAPE.len();
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `digits` (ASCII digits only, at least one) passes the Luhn
/// check. Anything else is simply not valid.
pub fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    luhn_sum(digits.bytes().rev(), false).is_multiple_of(10)
}

/// The digit that, appended to `partial`, makes it pass the Luhn check.
/// Characters other than ASCII digits are skipped.
pub fn luhn_check_digit(partial: &str) -> u8 {
    let digits = partial.bytes().rev().filter(u8::is_ascii_digit);
    // The check digit will take the rightmost place, so the rightmost
    // partial digit is the first one doubled.
    let sum = luhn_sum(digits, true);
    ((10 - sum % 10) % 10) as u8
}

/// Luhn sum, modulo 10, of ASCII digits given right to left;
/// `double_first` says whether the first of them is in a doubled position.
/// Reduced as it goes so that no input length can overflow it.
fn luhn_sum(rev_digits: impl Iterator<Item = u8>, double_first: bool) -> u32 {
    rev_digits
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if (i % 2 == 0) == double_first {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .fold(0, |acc, v| (acc + v) % 10)
}

/// Quotes `text` after `label` when it is harmless to repeat in an error;
/// otherwise falls back to `fallback`. More than 6 digits could be part of
/// a card number in the wrong field (6 is the most PCI DSS lets us show,
/// and "MM/YYYY" needs all 6), and control or non-ASCII characters could
/// forge log lines, so neither is ever echoed.
fn echo_or(text: &str, label: &str, fallback: &str) -> String {
    let harmless = text.len() <= 32
        && text.bytes().filter(u8::is_ascii_digit).count() <= 6
        && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if harmless {
        format!("{label} '{text}'")
    } else {
        fallback.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use proptest::prelude::*;

    /// A number with the given prefix, padded to `len` digits, that passes
    /// the Luhn check.
    fn valid_number(prefix: &str, len: usize) -> String {
        let mut partial = prefix.to_owned();
        while partial.len() < len - 1 {
            partial.push('0');
        }
        let check = luhn_check_digit(&partial);
        format!("{partial}{check}")
    }

    fn brand_of(prefix: &str) -> CardBrand {
        CardNumber::parse(&valid_number(prefix, 16))
            .map(|n| n.brand())
            .unwrap()
    }

    /// The longest run of consecutive ASCII digits in `s`.
    fn longest_digit_run(s: &str) -> usize {
        s.split(|c: char| !c.is_ascii_digit())
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn public_test_numbers_are_detected_as_their_brands() {
        for (number, brand) in [
            ("4242424242424242", CardBrand::Visa),
            ("5555555555554444", CardBrand::MasterCard),
            ("2223003122003222", CardBrand::MasterCard),
            ("6011111111111117", CardBrand::Discover),
            ("378282246310005", CardBrand::Amex),
        ] {
            let parsed = CardNumber::parse(number).unwrap();
            assert_eq!(parsed.brand(), brand, "{number}");
            assert_eq!(parsed.expose_digits(), number);
        }
    }

    #[test]
    fn mastercard_two_series_boundaries_are_exact() {
        assert_eq!(brand_of("2220"), CardBrand::Other);
        assert_eq!(brand_of("2221"), CardBrand::MasterCard);
        assert_eq!(brand_of("2720"), CardBrand::MasterCard);
        assert_eq!(brand_of("2721"), CardBrand::Other);
        assert_eq!(brand_of("50"), CardBrand::Other);
        assert_eq!(brand_of("51"), CardBrand::MasterCard);
        assert_eq!(brand_of("55"), CardBrand::MasterCard);
        assert_eq!(brand_of("56"), CardBrand::Other);
    }

    #[test]
    fn discover_range_boundaries_are_exact() {
        assert_eq!(brand_of("622125"), CardBrand::Other);
        assert_eq!(brand_of("622126"), CardBrand::Discover);
        assert_eq!(brand_of("622925"), CardBrand::Discover);
        assert_eq!(brand_of("622926"), CardBrand::Other);
        assert_eq!(brand_of("643"), CardBrand::Other);
        assert_eq!(brand_of("644"), CardBrand::Discover);
        assert_eq!(brand_of("649"), CardBrand::Discover);
        assert_eq!(brand_of("650"), CardBrand::Discover);
        assert_eq!(brand_of("66"), CardBrand::Other);
        assert_eq!(brand_of("6011"), CardBrand::Discover);
        assert_eq!(brand_of("6012"), CardBrand::Other);
    }

    #[test]
    fn amex_and_visa_prefixes_are_detected() {
        assert_eq!(brand_of("34"), CardBrand::Amex);
        assert_eq!(brand_of("37"), CardBrand::Amex);
        assert_eq!(brand_of("35"), CardBrand::Other);
        assert_eq!(brand_of("4"), CardBrand::Visa);
        assert_eq!(CardBrand::from_prefix(""), CardBrand::Other);
        assert_eq!(CardBrand::from_prefix("62212"), CardBrand::Other);
    }

    #[test]
    fn spaces_and_dashes_in_a_card_number_are_ignored() {
        let n = CardNumber::parse(" 4242 4242-4242 4242 ").unwrap();
        assert_eq!(n.expose_digits(), "4242424242424242");
    }

    #[test]
    fn a_card_number_of_the_wrong_length_says_how_many_digits_it_has() {
        let err = CardNumber::parse("42424242424").err().unwrap();
        assert_eq!(
            err.to_string(),
            "the card number has 11 digits; a card number has 12 to 19"
        );
        let err = CardNumber::parse(&"4".repeat(25)).err().unwrap();
        assert_eq!(err, CardError::NumberWrongLength { digits: 25 });
    }

    #[test]
    fn a_card_number_with_a_typo_fails_its_check_digit() {
        let err = CardNumber::parse("4242424242424241").err().unwrap();
        assert_eq!(
            err.to_string(),
            "the card number fails its check digit; check it for a typo"
        );
    }

    #[test]
    fn a_card_number_with_letters_or_nothing_is_rejected() {
        assert_eq!(
            CardNumber::parse("4242x42424242424").err(),
            Some(CardError::NumberInvalidCharacter)
        );
        assert_eq!(CardNumber::parse(" - ").err(), Some(CardError::NumberEmpty));
    }

    #[test]
    fn card_number_debug_shows_only_the_last_four() {
        let n = CardNumber::parse("4242424242424242").unwrap();
        assert_eq!(format!("{n:?}"), "CardNumber(****4242)");
        assert_eq!(n.last4().as_str(), "4242");
    }

    #[test]
    fn security_codes_are_three_digits_or_four_for_amex() {
        assert_eq!(
            SecurityCode::parse("123", CardBrand::Visa)
                .unwrap()
                .expose(),
            "123"
        );
        assert_eq!(
            SecurityCode::parse("1234", CardBrand::Amex)
                .unwrap()
                .expose(),
            "1234"
        );
        let err = SecurityCode::parse("1234", CardBrand::Visa).err().unwrap();
        assert!(!err.to_string().contains("1234"), "{err}");
        assert!(err.to_string().contains("has 3"), "{err}");
        assert!(SecurityCode::parse("123", CardBrand::Amex).is_err());
        assert!(SecurityCode::parse("12a", CardBrand::Visa).is_err());
        assert!(SecurityCode::parse("", CardBrand::Visa).is_err());
    }

    #[test]
    fn security_code_debug_shows_no_digit() {
        let code = SecurityCode::parse("987", CardBrand::Visa).unwrap();
        assert_eq!(format!("{code:?}"), "SecurityCode(***)");
    }

    #[test]
    fn brand_names_have_a_display_spelling_and_a_stored_spelling() {
        assert_eq!(CardBrand::Amex.to_string(), "American Express");
        assert_eq!(CardBrand::MasterCard.as_str(), "mastercard");
        for brand in CardBrand::ALL {
            assert_eq!(brand.as_str().parse::<CardBrand>(), Ok(brand));
            assert_eq!(brand.to_string().parse::<CardBrand>(), Ok(brand));
        }
        for s in ["MASTERCARD", "master-card", "Master Card"] {
            assert_eq!(s.parse::<CardBrand>(), Ok(CardBrand::MasterCard), "{s}");
        }
        let err = "diners".parse::<CardBrand>().unwrap_err().to_string();
        assert!(err.contains("'diners'"), "{err}");
    }

    #[test]
    fn brands_serialize_as_their_stored_spelling() {
        assert_eq!(
            serde_json::to_string(&CardBrand::MasterCard).unwrap(),
            "\"mastercard\""
        );
        assert_eq!(
            serde_json::from_str::<CardBrand>("\"amex\"").unwrap(),
            CardBrand::Amex
        );
    }

    #[test]
    fn accepted_brands_default_to_visa_mastercard_and_discover() {
        let accepted = AcceptedBrands::default();
        assert_eq!(accepted.describe(), "Visa, MasterCard and Discover");
        assert!(accepted.check(CardBrand::Visa).is_ok());
        assert_eq!(
            accepted.check(CardBrand::Amex).unwrap_err().to_string(),
            "we accept Visa, MasterCard and Discover; this card is American Express"
        );
    }

    #[test]
    fn accepted_brands_describe_short_lists_naturally() {
        let one = AcceptedBrands::parse_list(&["amex".into()]).unwrap();
        assert_eq!(one.describe(), "American Express");
        let two = AcceptedBrands::parse_list(&["mastercard".into(), "visa".into()]).unwrap();
        assert_eq!(two.describe(), "Visa and MasterCard");
        assert_eq!(
            two.check(CardBrand::Other).unwrap_err().to_string(),
            "we accept Visa and MasterCard; this card is of another brand"
        );
    }

    #[test]
    fn an_unknown_accepted_brand_entry_is_named_in_the_error() {
        let err = AcceptedBrands::parse_list(&["visa".into(), "diners".into()]).unwrap_err();
        assert!(err.to_string().contains("'diners'"), "{err}");
        assert_eq!(
            AcceptedBrands::parse_list(&[]),
            Err(CardError::NoAcceptedBrands)
        );
    }

    #[test]
    fn last4_is_exactly_four_digits() {
        assert_eq!(Last4::parse("0042").unwrap().to_string(), "0042");
        for bad in ["042", "00421", "12a4", " 123", "4242424242424242"] {
            let err = Last4::parse(bad).unwrap_err();
            assert!(!err.to_string().contains(bad), "{err}");
        }
        let json = serde_json::to_string(&Last4::parse("4242").unwrap()).unwrap();
        assert_eq!(json, "\"4242\"");
        assert!(serde_json::from_str::<Last4>("\"42\"").is_err());
    }

    #[test]
    fn expiry_parses_four_and_two_digit_years() {
        let e = Expiry::parse("04/2028").unwrap();
        assert_eq!((e.month(), e.year()), (4, 2028));
        assert_eq!(e.to_string(), "04/2028");
        assert_eq!(Expiry::parse("04/28").unwrap(), e);
        assert_eq!(Expiry::parse("4/2028").unwrap(), e);
        assert_eq!(Expiry::new(4, 2028).unwrap(), e);
    }

    #[test]
    fn an_expiry_month_outside_one_to_twelve_is_rejected() {
        assert_eq!(
            Expiry::parse("13/2027").unwrap_err().to_string(),
            "expiry '13/2027' is not a month; write MM/YYYY, e.g. 04/2028"
        );
        assert!(matches!(
            Expiry::parse("00/2027"),
            Err(CardError::ExpiryMonth { .. })
        ));
        assert!(Expiry::new(0, 2027).is_err());
        assert!(Expiry::new(13, 2027).is_err());
    }

    #[test]
    fn a_malformed_expiry_is_rejected_with_the_expected_format() {
        for bad in [
            "",
            "0428",
            "04-2028",
            "04/202",
            "04/20280",
            "a/2028",
            "04/2028/1",
            "123/2028",
        ] {
            let err = Expiry::parse(bad).unwrap_err();
            assert!(err.to_string().contains("MM/YYYY"), "{bad:?}: {err}");
        }
        assert!(matches!(
            Expiry::parse("04/1999"),
            Err(CardError::ExpiryYear { year: 1999 })
        ));
    }

    #[test]
    fn a_card_is_valid_through_the_last_day_of_its_expiry_month() {
        let e = Expiry::parse("02/2028").unwrap();
        assert_eq!(e.last_day(), date(2028, 2, 29));
        assert!(!e.is_expired_on(date(2028, 2, 29)));
        assert!(e.is_expired_on(date(2028, 3, 1)));
        assert!(e.check_not_expired(date(2028, 2, 29)).is_ok());
        assert_eq!(
            e.check_not_expired(date(2028, 3, 1))
                .unwrap_err()
                .to_string(),
            "the card expired at the end of 02/2028; use a card that has not expired"
        );
        let december = Expiry::new(12, 2099).unwrap();
        assert_eq!(december.last_day(), date(2099, 12, 31));
    }

    #[test]
    fn expiry_serializes_as_mm_yyyy() {
        let e = Expiry::new(4, 2028).unwrap();
        assert_eq!(serde_json::to_string(&e).unwrap(), "\"04/2028\"");
        assert_eq!(serde_json::from_str::<Expiry>("\"04/2028\"").unwrap(), e);
        assert!(serde_json::from_str::<Expiry>("\"13/2028\"").is_err());
    }

    #[test]
    fn luhn_check_digits_match_known_numbers() {
        assert_eq!(luhn_check_digit("424242424242424"), 2);
        assert_eq!(luhn_check_digit("37828224631000"), 5);
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid(""));
        assert!(!luhn_valid("4242 4242"));
    }

    proptest! {
        #[test]
        fn appending_the_check_digit_makes_any_digits_luhn_valid(partial in "[0-9]{1,30}") {
            let full = format!("{partial}{}", luhn_check_digit(&partial));
            prop_assert!(luhn_valid(&full));
        }

        #[test]
        fn changing_any_one_digit_breaks_the_luhn_check(
            partial in "[0-9]{1,30}", pos in any::<prop::sample::Index>(), bump in 1u8..10
        ) {
            let mut full = format!("{partial}{}", luhn_check_digit(&partial)).into_bytes();
            let i = pos.index(full.len());
            full[i] = b'0' + (full[i] - b'0' + bump) % 10;
            prop_assert!(!luhn_valid(std::str::from_utf8(&full).unwrap()));
        }

        #[test]
        fn card_number_debug_never_shows_more_than_the_last_four(partial in "[0-9]{11,18}") {
            let number = format!("{partial}{}", luhn_check_digit(&partial));
            let parsed = CardNumber::parse(&number).unwrap();
            let debug = format!("{parsed:?}");
            prop_assert_eq!(debug.chars().filter(char::is_ascii_digit).count(), 4);
            prop_assert_eq!(debug, format!("CardNumber(****{})", &number[number.len() - 4..]));
        }

        #[test]
        fn security_code_debug_never_shows_the_code(code in "[0-9]{3}") {
            let parsed = SecurityCode::parse(&code, CardBrand::Visa).unwrap();
            let debug = format!("{parsed:?}");
            prop_assert!(!debug.chars().any(|c| c.is_ascii_digit()));
        }

        #[test]
        fn card_errors_never_carry_digits_of_the_input(input in "[0-9 x-]{0,40}") {
            if let Err(err) = CardNumber::parse(&input) {
                prop_assert!(longest_digit_run(&err.to_string()) <= 2, "{}", err);
                prop_assert!(longest_digit_run(&format!("{err:?}")) <= 2, "{:?}", err);
            }
            for brand in CardBrand::ALL {
                if let Err(err) = SecurityCode::parse(&input, brand) {
                    prop_assert!(longest_digit_run(&err.to_string()) <= 2, "{}", err);
                    prop_assert!(longest_digit_run(&format!("{err:?}")) <= 2, "{:?}", err);
                }
            }
            if let Err(err) = Last4::parse(&input) {
                let shown = format!("{err} {err:?}");
                prop_assert!(longest_digit_run(&shown) <= 2, "{}", shown);
            }
            if let Err(err) = input.parse::<CardBrand>() {
                for shown in [err.to_string(), format!("{err:?}")] {
                    prop_assert!(shown.chars().filter(char::is_ascii_digit).count() <= 6, "{}", shown);
                }
            }
        }

        #[test]
        fn expiry_round_trips_through_its_display(month in 1u8..=12, year in 2000u16..=2099) {
            let e = Expiry::new(month, year).unwrap();
            prop_assert_eq!(Expiry::parse(&e.to_string()), Ok(e));
        }

        #[test]
        fn an_expiry_ends_on_its_month_last_day(month in 1u8..=12, year in 2000u16..=2099) {
            let e = Expiry::new(month, year).unwrap();
            let last = e.last_day();
            prop_assert!(!e.is_expired_on(last));
            prop_assert!(e.is_expired_on(last.tomorrow().unwrap()));
            prop_assert_eq!(last.tomorrow().unwrap().day(), 1);
        }
    }

    #[test]
    fn card_numbers_are_redacted_wherever_they_stand_but_uuids_are_left_alone() {
        assert_eq!(
            redact_card_numbers("unexpected argument '4242424242424242' found"),
            "unexpected argument '[card number removed]' found"
        );
        assert_eq!(
            redact_card_numbers("x 4242 4242 4242 4242 y"),
            "x [card number removed] y"
        );
        assert_eq!(
            redact_card_numbers("'ab4242-4242-4242-4242cd' is not an id"),
            "'ab[card number removed]cd' is not an id"
        );
        assert_eq!(
            redact_card_numbers("4242-4242-4242-4242"),
            "[card number removed]"
        );
        let id = "0193a5b2-7c1e-7d3f-9a41-212345678900";
        assert!(contains_card_number(id));
        assert_eq!(
            redact_card_numbers(&format!("payment {id}")),
            format!("payment {id}")
        );
        assert_eq!(
            redact_card_numbers("bill 2026-12-01 for 125.00, exit 64, code 123"),
            "bill 2026-12-01 for 125.00, exit 64, code 123"
        );
    }

    #[test]
    fn card_numbers_are_found_inside_free_text() {
        assert!(contains_card_number("4242424242424242"));
        assert!(contains_card_number("paid with 4242 4242 4242 4242 today"));
        assert!(contains_card_number("ref-6011-1111-1111-1117"));
        assert!(!contains_card_number("INV-2026-12-001"));
        assert!(!contains_card_number("4242424242424241"));
        assert!(!contains_card_number("A-100200"));
    }
}
