//! Who is paying: the health plan billing account number, the account type,
//! and the member's email address and name.
//!
//! Account numbers identify a member's coverage, so anything meant for logs
//! (`Debug`, `masked()`, error messages) shows at most the last four
//! characters. Email addresses and names are checked for control
//! characters before anything else because they end up in email headers
//! and log lines, where a CR or LF is an injection.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::text::{self, TextError, code_point, is_control_or_invisible};

const ACCOUNT_MIN_LEN: usize = 6;
const ACCOUNT_MAX_LEN: usize = 20;
const EMAIL_MAX_LEN: usize = 254;
const EMAIL_LOCAL_MAX_LEN: usize = 64;
const EMAIL_DOMAIN_MAX_LEN: usize = 253;
const EMAIL_LABEL_MAX_LEN: usize = 63;
const NAME_MAX_CHARS: usize = 200;

/// Everything that can go wrong reading member data. Account numbers and
/// names are never echoed; email addresses are echoed only when they are
/// entirely printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error(
        "the account number is empty; enter the billing account number from the member's statement"
    )]
    AccountEmpty,

    #[error(
        "the account number has {len} characters; it must have 6 to 20 (letters, digits and single hyphens)"
    )]
    AccountLength { len: usize },

    #[error(
        "the account number contains {found}; use only letters, digits and single hyphens between groups"
    )]
    AccountCharacter { found: String },

    #[error(
        "the account number starts or ends with a hyphen; remove it, hyphens only go between groups"
    )]
    AccountEdgeHyphen,

    #[error("the account number has two hyphens in a row; use a single hyphen between groups")]
    AccountDoubleHyphen,

    #[error(
        "the account number looks like a card number; enter the billing account number (card numbers are never stored)"
    )]
    AccountLooksLikeCard,

    #[error(
        "account type '{shown}' is not one we know; use 'individual-family' or 'employer-group'"
    )]
    UnknownAccountType { shown: String },

    #[error("the account type is not one we know; use 'individual-family' or 'employer-group'")]
    UnknownAccountTypeUnprintable,

    #[error("the email address contains a control character (CR, LF, NUL…); remove it")]
    EmailControlCharacter,

    #[error("the email address contains what looks like a card number; enter the member's address")]
    EmailLooksLikeCard,

    #[error(
        "the email address contains a non-ASCII character; we accept ASCII-only addresses, so use an ASCII form of it"
    )]
    EmailNonAscii,

    #[error("the email address is empty; write it like name@example.com")]
    EmailEmpty,

    #[error("the email address is {len} characters long; the most an address can have is 254")]
    EmailTooLong { len: usize },

    #[error("email address '{email}' contains a space; remove it")]
    EmailWhitespace { email: String },

    #[error("email address '{email}' has no '@'; write it like name@example.com")]
    EmailNoAt { email: String },

    #[error("email address '{email}' has more than one '@'; keep only the one before the domain")]
    EmailManyAt { email: String },

    #[error("email address '{email}' has nothing before the '@'; write it like name@example.com")]
    EmailLocalEmpty { email: String },

    #[error(
        "email address '{email}' has more than 64 characters before the '@'; check it for a typo"
    )]
    EmailLocalTooLong { email: String },

    #[error(
        "email address '{email}' has '{found}' before the '@'; use letters, digits and !#$%&'*+/=?^_`{{|}}~.- only"
    )]
    EmailLocalCharacter { email: String, found: char },

    #[error(
        "email address '{email}' has a dot at the start or end of the part before the '@', or two in a row; remove the extra dot"
    )]
    EmailLocalDots { email: String },

    #[error("email address '{email}' has no domain after the '@'; write it like name@example.com")]
    EmailDomainEmpty { email: String },

    #[error("email address '{email}' has a domain longer than 253 characters; check it for a typo")]
    EmailDomainTooLong { email: String },

    #[error(
        "email address '{email}' has a domain without a dot; write the full domain, like example.com"
    )]
    EmailDomainNoDot { email: String },

    #[error(
        "email address '{email}' has an empty part in its domain (a dot at the start or end, or two in a row); remove the extra dot"
    )]
    EmailDomainEmptyLabel { email: String },

    #[error(
        "email address '{email}' has a domain part longer than 63 characters; check it for a typo"
    )]
    EmailDomainLabelTooLong { email: String },

    #[error(
        "email address '{email}' has '{found}' in its domain; domains use only letters, digits, hyphens and dots"
    )]
    EmailDomainCharacter { email: String, found: char },

    #[error(
        "email address '{email}' has a domain part that starts or ends with a hyphen; check it for a typo"
    )]
    EmailDomainHyphen { email: String },

    #[error(
        "the member name contains a control or invisible formatting character (CR, LF, NUL, tab, U+2028…); remove it"
    )]
    NameControlCharacter,

    #[error("the member name is empty; enter the member's name")]
    NameEmpty,

    #[error("the member name is {len} characters long; shorten it to 200 or fewer")]
    NameTooLong { len: usize },

    #[error(
        "the member name contains what looks like a card number; card numbers are never stored"
    )]
    NameLooksLikeCard,
}

/// A health plan billing account number: 6 to 20 characters (hyphens
/// included) of ASCII letters and digits, with single hyphens allowed
/// between groups. Stored uppercase so that "ab-123456" and "AB-123456"
/// are the same account.
///
/// `Display` and `as_str` give the full number (for the processor and the
/// database); `Debug` and `masked` give only the last four characters, as
/// logs must never carry a full account number.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountNumber(String);

impl AccountNumber {
    /// Trims surrounding whitespace, validates, and uppercases.
    pub fn parse(s: &str) -> Result<AccountNumber, MemberError> {
        let input = s.trim();
        if input.is_empty() {
            return Err(MemberError::AccountEmpty);
        }
        if let Some(bad) = input
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(MemberError::AccountCharacter {
                found: describe_char(bad),
            });
        }
        // All ASCII from here on, so bytes are characters.
        let len = input.len();
        if !(ACCOUNT_MIN_LEN..=ACCOUNT_MAX_LEN).contains(&len) {
            return Err(MemberError::AccountLength { len });
        }
        if input.starts_with('-') || input.ends_with('-') {
            return Err(MemberError::AccountEdgeHyphen);
        }
        if input.contains("--") {
            return Err(MemberError::AccountDoubleHyphen);
        }
        if super::card::contains_card_number(input) {
            return Err(MemberError::AccountLooksLikeCard);
        }
        Ok(AccountNumber(input.to_ascii_uppercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// "****" and the last four letters or digits (hyphens skipped), e.g.
    /// "****7890": the only form of the number that may go into logs.
    pub fn masked(&self) -> String {
        format!("****{}", self.last4())
    }

    /// The last four letters or digits (hyphens skipped): all of the number a processor may
    /// hold.
    pub fn last4(&self) -> String {
        let tail: Vec<char> = self.0.chars().rev().filter(|c| *c != '-').take(4).collect();
        tail.into_iter().rev().collect()
    }
}

impl fmt::Display for AccountNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountNumber({})", self.masked())
    }
}

impl FromStr for AccountNumber {
    type Err = MemberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AccountNumber::parse(s)
    }
}

impl TryFrom<String> for AccountNumber {
    type Error = MemberError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        AccountNumber::parse(&s)
    }
}

impl From<AccountNumber> for String {
    fn from(a: AccountNumber) -> String {
        a.0
    }
}

/// The kind of billing account. Each has exactly one spelling, used in
/// config keys, the database, JSON and messages alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum AccountType {
    IndividualFamily,
    EmployerGroup,
}

impl AccountType {
    pub fn as_str(&self) -> &'static str {
        match self {
            AccountType::IndividualFamily => "individual-family",
            AccountType::EmployerGroup => "employer-group",
        }
    }
}

impl fmt::Display for AccountType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccountType {
    type Err = MemberError;

    /// Exact spelling only: accepting variants here would let a second
    /// spelling creep into config and storage.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "individual-family" => Ok(AccountType::IndividualFamily),
            "employer-group" => Ok(AccountType::EmployerGroup),
            _ if s.len() <= 40 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => {
                Err(MemberError::UnknownAccountType {
                    shown: s.to_owned(),
                })
            }
            _ => Err(MemberError::UnknownAccountTypeUnprintable),
        }
    }
}

impl TryFrom<String> for AccountType {
    type Error = MemberError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<AccountType> for &'static str {
    fn from(t: AccountType) -> &'static str {
        t.as_str()
    }
}

/// An email address in the dot-atom form that mail libraries (lettre's
/// `Address`) accept: `local@domain`, ASCII only. Quoted local parts,
/// comments, IP-literal domains and internationalized (non-ASCII)
/// addresses are rejected rather than half-supported.
///
/// The domain is lowercased (domains are case-insensitive); the local part
/// is kept as given, since a mail server may treat its case as meaningful.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    /// Surrounding spaces are trimmed; control characters anywhere,
    /// including at the ends, are rejected first.
    pub fn parse(s: &str) -> Result<EmailAddress, MemberError> {
        if s.chars().any(is_control_or_invisible) {
            return Err(MemberError::EmailControlCharacter);
        }
        if !s.is_ascii() {
            return Err(MemberError::EmailNonAscii);
        }
        if super::card::contains_card_number(s) {
            return Err(MemberError::EmailLooksLikeCard);
        }
        let input = s.trim_matches(' ');
        if input.is_empty() {
            return Err(MemberError::EmailEmpty);
        }
        if input.len() > EMAIL_MAX_LEN {
            return Err(MemberError::EmailTooLong { len: input.len() });
        }
        // From here the address is short printable ASCII, so it is safe to
        // quote back in messages.
        let email = || input.to_owned();
        if input.contains(' ') {
            return Err(MemberError::EmailWhitespace { email: email() });
        }
        let (local, domain) = input
            .split_once('@')
            .ok_or_else(|| MemberError::EmailNoAt { email: email() })?;
        if domain.contains('@') {
            return Err(MemberError::EmailManyAt { email: email() });
        }

        if local.is_empty() {
            return Err(MemberError::EmailLocalEmpty { email: email() });
        }
        if local.len() > EMAIL_LOCAL_MAX_LEN {
            return Err(MemberError::EmailLocalTooLong { email: email() });
        }
        if let Some(found) = local.chars().find(|c| !is_atext(*c) && *c != '.') {
            return Err(MemberError::EmailLocalCharacter {
                email: email(),
                found,
            });
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(MemberError::EmailLocalDots { email: email() });
        }

        if domain.is_empty() {
            return Err(MemberError::EmailDomainEmpty { email: email() });
        }
        if domain.len() > EMAIL_DOMAIN_MAX_LEN {
            return Err(MemberError::EmailDomainTooLong { email: email() });
        }
        if let Some(found) = domain
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
        {
            return Err(MemberError::EmailDomainCharacter {
                email: email(),
                found,
            });
        }
        if !domain.contains('.') {
            return Err(MemberError::EmailDomainNoDot { email: email() });
        }
        for label in domain.split('.') {
            if label.is_empty() {
                return Err(MemberError::EmailDomainEmptyLabel { email: email() });
            }
            if label.len() > EMAIL_LABEL_MAX_LEN {
                return Err(MemberError::EmailDomainLabelTooLong { email: email() });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(MemberError::EmailDomainHyphen { email: email() });
            }
        }
        Ok(EmailAddress(format!(
            "{local}@{}",
            domain.to_ascii_lowercase()
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// RFC 5322 `atext`: what a dot-atom may hold besides its dots.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c)
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for EmailAddress {
    type Err = MemberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EmailAddress::parse(s)
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = MemberError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        EmailAddress::parse(&s)
    }
}

impl From<EmailAddress> for String {
    fn from(e: EmailAddress) -> String {
        e.0
    }
}

/// A member's name as they write it: free text under the one rule of
/// [`super::text`] (1 to 200 characters after trimming, any script, no
/// control or invisible formatting characters, no card number), with the
/// member-specific errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MemberName(String);

impl MemberName {
    /// Rejects control characters before trimming, so a trailing CR or LF
    /// is an error rather than silently removed: it means the input came
    /// from somewhere that should be looked at.
    pub fn parse(s: &str) -> Result<MemberName, MemberError> {
        match text::check(s, NAME_MAX_CHARS) {
            Ok(name) => Ok(MemberName(name.to_owned())),
            Err(TextError::Empty { .. }) => Err(MemberError::NameEmpty),
            Err(TextError::TooLong { len, .. }) => Err(MemberError::NameTooLong { len }),
            Err(TextError::CardNumber) => Err(MemberError::NameLooksLikeCard),
            Err(
                TextError::Control { .. }
                | TextError::LineSeparator { .. }
                | TextError::Invisible { .. },
            ) => Err(MemberError::NameControlCharacter),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MemberName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for MemberName {
    type Err = MemberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MemberName::parse(s)
    }
}

impl TryFrom<String> for MemberName {
    type Error = MemberError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        MemberName::parse(&s)
    }
}

impl From<MemberName> for String {
    fn from(n: MemberName) -> String {
        n.0
    }
}

/// Names a rejected character without writing anything that could break a
/// log line.
fn describe_char(c: char) -> String {
    if is_control_or_invisible(c) || c.is_whitespace() {
        format!("the character {}", code_point(c))
    } else {
        format!("'{c}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn account_numbers_are_trimmed_and_uppercased() {
        let a = AccountNumber::parse("  ab-123-4567890 ").unwrap();
        assert_eq!(a.as_str(), "AB-123-4567890");
        assert_eq!(a.to_string(), "AB-123-4567890");
        assert_eq!(a, AccountNumber::parse("AB-123-4567890").unwrap());
    }

    #[test]
    fn account_numbers_must_have_six_to_twenty_characters() {
        assert!(AccountNumber::parse("ABC123").is_ok());
        assert!(AccountNumber::parse(&"A".repeat(20)).is_ok());
        assert_eq!(
            AccountNumber::parse("ABC12"),
            Err(MemberError::AccountLength { len: 5 })
        );
        assert_eq!(
            AccountNumber::parse(&"A".repeat(21)),
            Err(MemberError::AccountLength { len: 21 })
        );
        assert_eq!(AccountNumber::parse("  "), Err(MemberError::AccountEmpty));
    }

    #[test]
    fn account_number_hyphens_only_go_singly_between_groups() {
        assert!(AccountNumber::parse("AB-12-CD").is_ok());
        assert_eq!(
            AccountNumber::parse("-AB1234"),
            Err(MemberError::AccountEdgeHyphen)
        );
        assert_eq!(
            AccountNumber::parse("AB1234-"),
            Err(MemberError::AccountEdgeHyphen)
        );
        assert_eq!(
            AccountNumber::parse("AB--1234"),
            Err(MemberError::AccountDoubleHyphen)
        );
    }

    #[test]
    fn account_numbers_reject_other_characters_without_echoing_the_number() {
        let err = AccountNumber::parse("AB_123456789").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the account number contains '_'; use only letters, digits and single hyphens between groups"
        );
        let err = AccountNumber::parse("AB 123456789")
            .unwrap_err()
            .to_string();
        assert!(err.contains("U+0020"), "{err}");
        assert!(!err.contains("123456789"), "{err}");
        assert!(AccountNumber::parse("ÅB123456").is_err());
    }

    #[test]
    fn account_numbers_mask_to_their_last_four_for_logs() {
        let a = AccountNumber::parse("HP-123-4567890").unwrap();
        assert_eq!(a.masked(), "****7890");
        assert_eq!(format!("{a:?}"), "AccountNumber(****7890)");
        let short = AccountNumber::parse("AB-C-12").unwrap();
        assert_eq!(short.masked(), "****BC12");
    }

    #[test]
    fn account_numbers_serialize_as_strings_and_deserializing_validates() {
        let a = AccountNumber::parse("hp-1234567").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"HP-1234567\"");
        assert_eq!(
            serde_json::from_str::<AccountNumber>("\"hp-1234567\"").unwrap(),
            a
        );
        assert!(serde_json::from_str::<AccountNumber>("\"hp--1234567\"").is_err());
    }

    #[test]
    fn account_types_have_exactly_one_spelling_everywhere() {
        for t in [AccountType::IndividualFamily, AccountType::EmployerGroup] {
            assert_eq!(t.to_string(), t.as_str());
            assert_eq!(t.as_str().parse::<AccountType>(), Ok(t));
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<AccountType>(&json).unwrap(), t);
        }
        for other in [
            "Individual-Family",
            "individual_family",
            "individual",
            "employer group",
        ] {
            let err = other.parse::<AccountType>().unwrap_err().to_string();
            assert!(
                err.contains("'individual-family' or 'employer-group'"),
                "{err}"
            );
        }
        assert!(serde_json::from_str::<AccountType>("\"EmployerGroup\"").is_err());
        assert_eq!(
            "a\nb".parse::<AccountType>(),
            Err(MemberError::UnknownAccountTypeUnprintable)
        );
    }

    #[test]
    fn ordinary_email_addresses_are_accepted_with_the_domain_lowercased() {
        let e = EmailAddress::parse("Jane.O'Neil+billing@Example.COM").unwrap();
        assert_eq!(e.as_str(), "Jane.O'Neil+billing@example.com");
        assert_eq!(e.to_string(), e.as_str());
        assert!(EmailAddress::parse("a@b.co").is_ok());
        assert!(EmailAddress::parse(" x@mail.example.org ").is_ok());
        assert!(EmailAddress::parse("!#$%&'*+/=?^_`{|}~-@x-y.example").is_ok());
    }

    #[test]
    fn malformed_email_addresses_are_rejected_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "is empty"),
            ("jane.example.com", "has no '@'"),
            ("a@b@example.com", "more than one '@'"),
            ("@example.com", "nothing before the '@'"),
            ("jane@", "no domain"),
            ("jane@localhost", "without a dot"),
            (".jane@example.com", "a dot at the start or end"),
            ("jane.@example.com", "a dot at the start or end"),
            ("ja..ne@example.com", "two in a row"),
            ("jane@example..com", "empty part"),
            ("jane@.example.com", "empty part"),
            ("jane@example.com.", "empty part"),
            ("jane@-example.com", "starts or ends with a hyphen"),
            ("jane@example-.com", "starts or ends with a hyphen"),
            ("jane@exa_mple.com", "'_' in its domain"),
            ("ja(ne@example.com", "'(' before the '@'"),
            ("\"jane\"@example.com", "'\"' before the '@'"),
            ("jane doe@example.com", "contains a space"),
            ("jane@[127.0.0.1]", "'[' in its domain"),
            ("jané@example.com", "non-ASCII"),
        ];
        for (input, reason) in cases {
            let err = EmailAddress::parse(input).unwrap_err().to_string();
            assert!(err.contains(reason), "{input:?}: {err}");
        }
    }

    #[test]
    fn email_length_limits_are_enforced() {
        let local64 = "a".repeat(64);
        assert!(EmailAddress::parse(&format!("{local64}@example.com")).is_ok());
        assert!(EmailAddress::parse(&format!("a{local64}@example.com")).is_err());
        let label63 = "b".repeat(63);
        assert!(EmailAddress::parse(&format!("a@{label63}.com")).is_ok());
        assert!(EmailAddress::parse(&format!("a@b{label63}.com")).is_err());
        // 4 labels of 63 plus 3 dots: 255 characters of domain.
        let long_domain = [label63.as_str(); 4].join(".");
        assert!(EmailAddress::parse(&format!("a@{long_domain}")).is_err());
        let domain_ok = format!("{}.{}.{}.{}", label63, label63, label63, "c".repeat(60));
        let total_255 = format!("ab@{domain_ok}");
        assert_eq!(total_255.len(), 255);
        assert_eq!(
            EmailAddress::parse(&total_255),
            Err(MemberError::EmailTooLong { len: 255 })
        );
        assert!(EmailAddress::parse(&format!("a@{domain_ok}")).is_ok());
    }

    #[test]
    fn an_email_with_a_control_character_is_rejected_without_echoing_it() {
        for input in [
            "jane@example.com\r\nBcc: x@evil.test",
            "jane\0@example.com",
            "\tjane@example.com",
        ] {
            let err = EmailAddress::parse(input).unwrap_err();
            assert_eq!(err, MemberError::EmailControlCharacter);
            assert_eq!(
                err.to_string(),
                "the email address contains a control character (CR, LF, NUL…); remove it"
            );
        }
    }

    #[test]
    fn emails_serialize_as_strings_and_deserializing_validates() {
        let e = EmailAddress::parse("jane@example.com").unwrap();
        assert_eq!(serde_json::to_string(&e).unwrap(), "\"jane@example.com\"");
        assert_eq!(
            serde_json::from_str::<EmailAddress>("\"jane@EXAMPLE.com\"").unwrap(),
            e
        );
        assert!(serde_json::from_str::<EmailAddress>("\"jane\"").is_err());
    }

    #[test]
    fn member_names_accept_any_script_and_are_trimmed() {
        for name in [
            "Zoë Ångström",
            "O'Brien-Smith Jr.",
            "李小龍",
            "محمدرضا",
            "मिश्र",
        ] {
            assert_eq!(
                MemberName::parse(&format!("  {name} ")).unwrap().as_str(),
                name
            );
        }
        // ZWNJ is part of correct Persian spelling.
        assert!(MemberName::parse("می\u{200C}خواهم").is_ok());
        assert!(MemberName::parse(&"é".repeat(200)).is_ok());
    }

    #[test]
    fn member_names_must_be_one_to_two_hundred_characters() {
        assert_eq!(MemberName::parse("   "), Err(MemberError::NameEmpty));
        assert_eq!(
            MemberName::parse(&"é".repeat(201)),
            Err(MemberError::NameTooLong { len: 201 })
        );
    }

    #[test]
    fn member_names_reject_control_and_invisible_characters() {
        for bad in [
            "Jane\nDoe",
            "Jane Doe\r",
            "Jane\0",
            "Jane\tDoe",
            "Jane\u{2028}Doe",
            "Jane\u{2029}",
            "Jane\u{202E}eoD",
            "Jane\u{200B}Doe",
            "\u{FEFF}Jane",
            "Jane\u{7F}",
            "Jane\u{85}",
        ] {
            assert_eq!(
                MemberName::parse(bad),
                Err(MemberError::NameControlCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn member_names_serialize_as_strings_and_deserializing_validates() {
        let n = MemberName::parse("Zoë").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"Zoë\"");
        assert_eq!(serde_json::from_str::<MemberName>("\" Zoë \"").unwrap(), n);
        assert!(serde_json::from_str::<MemberName>("\"Zo\\u0000ë\"").is_err());
    }

    fn email_strategy() -> impl Strategy<Value = String> {
        let atext = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}";
        let local = prop::collection::vec(atext, 1..4).prop_map(|parts| parts.join("."));
        let label = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?";
        let domain = prop::collection::vec(label, 2..4).prop_map(|labels| labels.join("."));
        (local, domain).prop_map(|(l, d)| format!("{l}@{d}"))
    }

    fn with_control_char() -> impl Strategy<Value = String> {
        let control = prop_oneof![
            prop::char::range('\u{0}', '\u{1F}'),
            Just('\u{7F}'),
            prop::char::range('\u{80}', '\u{9F}'),
        ];
        ("\\PC{0,20}", control, "\\PC{0,20}").prop_map(|(a, c, b)| format!("{a}{c}{b}"))
    }

    proptest! {
        #[test]
        fn any_string_with_a_control_character_is_not_an_email(s in with_control_char()) {
            prop_assert_eq!(EmailAddress::parse(&s), Err(MemberError::EmailControlCharacter));
        }

        #[test]
        fn any_string_with_a_control_character_is_not_a_member_name(s in with_control_char()) {
            prop_assert_eq!(MemberName::parse(&s), Err(MemberError::NameControlCharacter));
        }

        #[test]
        fn valid_generated_emails_round_trip(email in email_strategy()) {
            let parsed = EmailAddress::parse(&email).unwrap();
            prop_assert_eq!(parsed.as_str(), email.as_str());
            prop_assert_eq!(EmailAddress::parse(&parsed.to_string()), Ok(parsed.clone()));
            let json = serde_json::to_string(&parsed).unwrap();
            prop_assert_eq!(serde_json::from_str::<EmailAddress>(&json).unwrap(), parsed);
        }

        #[test]
        fn account_numbers_round_trip_through_display(
            groups in prop::collection::vec("[A-Za-z0-9]{1,6}", 1..4)
                .prop_filter("6 to 20 characters", |g| (6..=20).contains(&g.join("-").len()))
        ) {
            let input = groups.join("-");
            let parsed = AccountNumber::parse(&input).unwrap();
            prop_assert_eq!(parsed.as_str(), input.to_ascii_uppercase());
            prop_assert_eq!(AccountNumber::parse(&parsed.to_string()), Ok(parsed.clone()));
            let debug = format!("{parsed:?}");
            prop_assert!(!debug.contains(parsed.as_str()), "{}", debug);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,300}") {
            let _ = AccountNumber::parse(&s);
            let _ = EmailAddress::parse(&s);
            let _ = MemberName::parse(&s);
            let _ = s.parse::<AccountType>();
        }
    }
}
