//! The merged layers before parsing: strings and lists, so that only parsing reports problems.
//! Each section's raw struct lives beside its typed settings; this module holds what they
//! share ([`List`], the `section!` macro) and the whole file, [`Settings`].

use serde::Deserialize;

pub use super::daemon::Daemon;
pub use super::database::Database;
pub use super::email::{Email, Smtp};
pub use super::http::Http;
pub use super::log::Log;
pub use super::org::Org;
pub use super::payments::Payments;
pub use super::processor::{Processor, Simulated, Stripe};
pub use super::reminders::Reminders;

/// A list given as a TOML array or as one comma-separated string (environment variables).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum List {
    Items(Vec<String>),
    Joined(String),
}

impl List {
    pub fn items(&self) -> Vec<String> {
        match self {
            List::Items(v) => v.iter().map(|s| s.trim().to_string()).collect(),
            List::Joined(s) => s
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    pub fn shown(&self) -> String {
        self.items().join(",")
    }
}

/// A raw section: every field public and every unknown key refused, so a misspelt key is an
/// error rather than a setting silently left at its default. The struct's name appears in the
/// `config` crate's errors ("expected struct Database"), so it is the section's name.
macro_rules! section {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, ::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name { $(pub $field: $ty),* }
    };
}
pub(super) use section;

section!(Settings {
    database: Database,
    log: Log,
    payments: Payments,
    processor: Processor,
    email: Email,
    org: Org,
    reminders: Reminders,
    daemon: Daemon,
    http: Http,
});
