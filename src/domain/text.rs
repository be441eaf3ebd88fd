//! Free text that autopay stores in clear and shows to people: member names, bill references,
//! reasons (bill void and adjust, charging pause, payment resolve), external payment references
//! and terms versions. One rule for all of them, so that no field is laxer than another:
//!
//! - 1 to `MAX` characters after trimming surrounding whitespace;
//! - no control character (C0, DEL, C1: a CR or LF forges log lines and headers, ESC drives the
//!   terminal), checked before trimming so that a stray line break is refused, not hidden;
//! - no line or paragraph separator (U+2028, U+2029) and no invisible formatting character
//!   (Unicode Cf): bidirectional overrides and isolates (U+202A–U+202E, U+2066–U+2069) reorder
//!   what a reader sees, zero-width characters hide differences. ZERO WIDTH NON-JOINER and
//!   ZERO WIDTH JOINER stay allowed: Persian, Hindi and other scripts need them to spell words;
//! - nothing that could be a card number (12 to 19 digits passing the Luhn check), because it
//!   would be stored in clear.
//!
//! Errors never repeat the text: it may be the card number it refuses.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a piece of free text was refused. No variant holds the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("the text is empty; write 1 to {max} characters")]
    Empty { max: usize },
    #[error("the text has {len} characters; shorten it to {max} or fewer")]
    TooLong { len: usize, max: usize },
    #[error(
        "the text contains a control character ({found}); write it on one line, without tabs or escape sequences"
    )]
    Control { found: String },
    #[error("the text contains a line or paragraph separator ({found}); write it on one line")]
    LineSeparator { found: String },
    #[error(
        "the text contains an invisible formatting character ({found}), such as a direction override or a zero-width space, that could disguise what it says; remove it"
    )]
    Invisible { found: String },
    #[error("the text looks like it holds a card number, which is never stored; remove it")]
    CardNumber,
}

/// Checks `value` against the rule and returns it trimmed. The one place the rule lives; the
/// [`Text`] type and [`super::member::MemberName`] are built on it.
pub fn check(value: &str, max: usize) -> Result<&str, TextError> {
    if let Some(c) = value.chars().find(|c| is_control_or_invisible(*c)) {
        let found = code_point(c);
        return Err(if c.is_control() {
            TextError::Control { found }
        } else if matches!(c, '\u{2028}' | '\u{2029}') {
            TextError::LineSeparator { found }
        } else {
            TextError::Invisible { found }
        });
    }
    let text = value.trim();
    let len = text.chars().count();
    if len == 0 {
        return Err(TextError::Empty { max });
    }
    if len > max {
        return Err(TextError::TooLong { len, max });
    }
    if super::card::contains_card_number(text) {
        return Err(TextError::CardNumber);
    }
    Ok(text)
}

/// Free text of at most `MAX` characters that passed [`check`]: a value that exists is safe to
/// store and to show. Stored and shown exactly as written (after trimming).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text<const MAX: usize>(String);

/// What the billing system calls a bill, or the reference of a payment made outside autopay.
pub type Reference = Text<64>;
/// Why an operator did something: void or adjust a bill, pause charging, resolve a payment.
pub type Reason = Text<200>;
/// The processor's (or a ticket's) reference given when an operator resolves a payment.
pub type ResolveReference = Text<100>;
/// The version of the terms a member agreed to.
pub type TermsVersion = Text<40>;

impl<const MAX: usize> Text<MAX> {
    /// The most characters this kind of text may have.
    pub const MAX: usize = MAX;

    pub fn parse(value: &str) -> Result<Text<MAX>, TextError> {
        check(value, MAX).map(|t| Text(t.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Display for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: usize> fmt::Debug for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<const MAX: usize> AsRef<str> for Text<MAX> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> std::str::FromStr for Text<MAX> {
    type Err = TextError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Text::parse(s)
    }
}

impl<const MAX: usize> TryFrom<String> for Text<MAX> {
    type Error = TextError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Text::parse(&s)
    }
}

impl<const MAX: usize> From<Text<MAX>> for String {
    fn from(t: Text<MAX>) -> String {
        t.0
    }
}

impl<const MAX: usize> Serialize for Text<MAX> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Text<MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Text::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Control characters (Unicode Cc: C0, DEL, C1), the line and paragraph separators
/// U+2028/U+2029, and the invisible format characters (Unicode Cf) that can break or disguise a
/// line, such as bidi overrides and isolates and zero-width spaces.
///
/// ZERO WIDTH NON-JOINER and ZERO WIDTH JOINER (U+200C, U+200D) are Cf but allowed: Persian,
/// Hindi and other scripts need them to spell names correctly, and they neither end a line nor
/// reorder text.
pub fn is_control_or_invisible(c: char) -> bool {
    if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
        return true;
    }
    if matches!(c, '\u{200C}' | '\u{200D}') {
        return false;
    }
    // General_Category=Cf as of Unicode 15.
    matches!(
        u32::from(c),
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Text made safe to show on one line, in an error or on a terminal: every character
/// [`is_control_or_invisible`] (LF included) is written as `\u{1b}`, visible and inert. Card
/// numbers are not touched here; `card::redact_card_numbers` takes them out.
pub fn escape(text: &str) -> String {
    escape_except(text, None)
}

/// Like [`escape`], but `keep` (a line break between lines of a message) stays as it is.
pub fn escape_except(text: &str, keep: Option<char>) -> String {
    let hide = |c: char| is_control_or_invisible(c) && Some(c) != keep;
    if !text.chars().any(hide) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if hide(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// "U+202E": how an error names a character it will not print.
pub fn code_point(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_text_in_any_script_is_kept_as_written_after_trimming() {
        for t in [
            "INV-1001",
            "paid by phone, ticket #4411",
            "Zoë Ångström",
            "李小龍",
            "می\u{200C}خواهم",
            "2026-01",
        ] {
            assert_eq!(Reason::parse(&format!("  {t} ")).unwrap().as_str(), t);
        }
    }

    #[test]
    fn direction_overrides_isolates_and_separators_are_refused_without_echoing_the_text() {
        for (bad, found) in [
            ("INV\u{202E}1001", "U+202E"),
            ("INV\u{202A}1001", "U+202A"),
            ("a\u{2066}b", "U+2066"),
            ("a\u{2069}", "U+2069"),
            ("a\u{2028}b", "U+2028"),
            ("a\u{2029}b", "U+2029"),
            ("\u{200B}INV", "U+200B"),
            ("\u{FEFF}INV", "U+FEFF"),
            ("INV\n", "U+000A"),
            ("IN\rV", "U+000D"),
            ("INV\u{1B}[2J", "U+001B"),
            ("INV\u{85}", "U+0085"),
            ("INV\t1", "U+0009"),
        ] {
            let err = Reference::parse(bad).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(found), "{bad:?}: {shown}");
            assert!(!shown.contains("INV"), "{shown}");
        }
    }

    #[test]
    fn length_is_counted_in_characters_and_emptiness_after_trimming() {
        assert_eq!(
            Reference::parse(" \u{3000} "),
            Err(TextError::Empty { max: 64 })
        );
        assert!(Reference::parse(&"é".repeat(64)).is_ok());
        assert_eq!(
            Reference::parse(&"é".repeat(65)),
            Err(TextError::TooLong { len: 65, max: 64 })
        );
        assert_eq!(TermsVersion::MAX, 40);
    }

    #[test]
    fn card_numbers_are_refused_in_every_spelling() {
        for bad in [
            "4242424242424242",
            "paid 4242 4242 4242 4242",
            "ref-4242-4242-4242-4242",
            "x4242424242424242y",
        ] {
            assert_eq!(Reason::parse(bad), Err(TextError::CardNumber), "{bad}");
        }
        assert!(Reason::parse("INV-2026-0001").is_ok());
    }

    #[test]
    fn text_serializes_as_a_string_and_deserializing_applies_the_rule() {
        let r = Reference::parse("INV-1").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"INV-1\"");
        assert_eq!(serde_json::from_str::<Reference>("\"INV-1\"").unwrap(), r);
        assert!(serde_json::from_str::<Reference>("\"INV\\u202e1\"").is_err());
    }

    fn forbidden() -> impl Strategy<Value = char> {
        prop_oneof![
            prop::char::range('\u{0}', '\u{1F}'),
            Just('\u{7F}'),
            prop::char::range('\u{80}', '\u{9F}'),
            prop::char::range('\u{202A}', '\u{202E}'),
            prop::char::range('\u{2066}', '\u{2069}'),
            Just('\u{2028}'),
            Just('\u{2029}'),
            Just('\u{200B}'),
            Just('\u{FEFF}'),
        ]
    }

    /// A Luhn-valid number of 12 to 19 digits.
    fn card_number() -> impl Strategy<Value = String> {
        "[1-9][0-9]{10,17}".prop_map(|partial| {
            let check = crate::domain::card::luhn_check_digit(&partial);
            format!("{partial}{check}")
        })
    }

    proptest! {
        #[test]
        fn any_text_with_a_forbidden_character_is_refused(
            a in "\\PC{0,30}", c in forbidden(), b in "\\PC{0,30}"
        ) {
            let s = format!("{a}{c}{b}");
            let refused = matches!(
                Reason::parse(&s),
                Err(TextError::Control { .. } | TextError::LineSeparator { .. } | TextError::Invisible { .. })
            );
            prop_assert!(refused, "{:?}", s);
        }

        #[test]
        fn text_holding_a_card_number_is_refused_and_never_echoed(
            before in "[A-Za-z #:]{0,10}", n in card_number(), after in "[A-Za-z #:]{0,10}"
        ) {
            let s = format!("{before}{n}{after}");
            let err = Reason::parse(&s).unwrap_err();
            prop_assert_eq!(&err, &TextError::CardNumber);
            prop_assert!(!err.to_string().contains(&n));
        }

        #[test]
        fn accepted_text_round_trips_and_has_nothing_forbidden(s in "\\PC{0,80}") {
            if let Ok(t) = Reason::parse(&s) {
                prop_assert_eq!(t.as_str(), s.trim());
                prop_assert!(!t.as_str().chars().any(is_control_or_invisible));
                prop_assert!(!crate::domain::card::contains_card_number(t.as_str()));
                prop_assert_eq!(Reason::parse(t.as_str()), Ok(t.clone()));
                let json = serde_json::to_string(&t).unwrap();
                prop_assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), t);
            }
        }

        #[test]
        fn errors_never_repeat_the_text(s in "\\PC{0,80}") {
            if let Err(e) = Reference::parse(&s) {
                let shown = e.to_string();
                let t = s.trim();
                prop_assert!(t.chars().count() < 4 || !shown.contains(t), "{}", shown);
            }
        }
    }
}
