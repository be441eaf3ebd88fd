//! Pure rules, no I/O and no async: money, cards, members, schedules (recurrence and time
//! zones), payments (states and transitions), and the one rule for free text. Every type here
//! parses: a value that exists is valid, so the layers above never check again.

pub mod attempt;
pub mod bill;
pub mod card;
pub mod charge;
pub mod cron;
pub mod decline;
pub mod dispute;
pub mod ids;
pub mod member;
pub mod money;
pub mod notice;
pub mod payment;
pub mod reconcile;
pub mod schedule;
pub mod status;
pub mod text;

/// Declares an enum stored and shown by one fixed spelling: `as_str`, `Display`, `FromStr`
/// (whose error lists every spelling) and serde as that string.
macro_rules! spelled_enum {
    ($(#[$meta:meta])* pub enum $name:ident ($human:literal) { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The one spelling used in the database, in output and on the command line.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::domain::UnknownSpelling;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim() {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::domain::UnknownSpelling {
                        what: $human,
                        given: other.chars().filter(|c| !c.is_control()).take(40).collect(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use spelled_enum;

/// A word that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{given}' is not a {what}; use one of: {}", expected.join(", "))]
pub struct UnknownSpelling {
    pub what: &'static str,
    pub given: String,
    pub expected: &'static [&'static str],
}
