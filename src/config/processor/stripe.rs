//! `[processor.stripe]`: the Stripe account and how autopay talks to its API.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::super::checker::Checker;
use super::super::duration::Dur;
use super::super::raw::{List, section};
use super::ProcessorKind;

section!(Stripe {
    api_base: String,
    api_version: String,
    secret_key: String,
    secret_key_file: String,
    publishable_key: String,
    statement_descriptor_suffix: String,
    list_filters: String,
    webhook_secret: List,
    webhook_secret_file: String,
    webhook_tolerance: String,
});

/// The oldest API version autopay accepts: from it on, Stripe reports the card network's
/// advice and decline codes with a decline, which the decline rules read.
pub const MIN_API_VERSION: &str = "2024-12-18";

/// Whether a Stripe key charges real cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StripeMode {
    Test,
    Live,
}

impl StripeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StripeMode::Test => "test",
            StripeMode::Live => "live",
        }
    }

    /// The mode a secret (`sk_`, restricted `rk_`) or publishable (`pk_`) key is for.
    pub fn of_key(key: &str, prefixes: &[&str]) -> Option<StripeMode> {
        prefixes.iter().find_map(|p| {
            if key.starts_with(&format!("{p}_test_")) {
                Some(StripeMode::Test)
            } else if key.starts_with(&format!("{p}_live_")) {
                Some(StripeMode::Live)
            } else {
                None
            }
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StripeSettings {
    pub api_base: String,
    pub api_version: String,
    #[serde(serialize_with = "super::super::secrets::ser_secret")]
    pub secret_key: Option<SecretString>,
    /// The mode of the secret key, when one is set.
    pub mode: Option<StripeMode>,
    pub publishable_key: String,
    pub statement_descriptor_suffix: String,
    pub list_filters: bool,
    /// Every webhook signing secret in use: during a rotation, the old and the new.
    #[serde(serialize_with = "ser_secrets")]
    pub webhook_secrets: Vec<SecretString>,
    pub webhook_tolerance: Dur,
}

fn ser_secrets<S: serde::Serializer>(v: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{} set", v.len()))
}

/// Whether `base` is an https URL, or plain http to this machine (a test peer).
fn api_base_ok(base: &str) -> bool {
    if base.starts_with("https://") && base.len() > "https://".len() {
        return true;
    }
    let Some(rest) = base.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix("[::1]") {
        Some(port) => return port.is_empty() || port.starts_with(':'),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "127.0.0.1" || host == "localhost"
}

/// Whether `version` names an API version of Stripe's form (`2024-12-18.acacia`) on or after
/// [`MIN_API_VERSION`].
fn api_version_ok(version: &str) -> bool {
    let date = version.split('.').next().unwrap_or_default();
    let form = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    form && date >= MIN_API_VERSION
}

/// Stripe's rules for a statement descriptor suffix: up to 22 characters, at least one letter,
/// none of `< > \ ' " *`. autopay keeps to letters, digits, spaces and `.-&#` on top.
fn suffix_ok(suffix: &str) -> bool {
    suffix.len() <= 22
        && suffix
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || " .-&#".contains(ch))
        && (suffix.is_empty() || suffix.chars().any(|c| c.is_ascii_alphabetic()))
}

/// `kind` is the chosen processor: a secret key is required only when it is Stripe.
pub(super) fn parse(st: &Stripe, c: &mut Checker, kind: ProcessorKind) -> StripeSettings {
    let secret_key = c.secret(
        &st.secret_key,
        "processor.stripe.secret_key_file",
        &st.secret_key_file,
    );
    let mode = secret_key
        .as_ref()
        .and_then(|k| StripeMode::of_key(k.expose_secret(), &["sk", "rk"]));
    if secret_key.is_some() && mode.is_none() {
        c.problem(
            "processor.stripe.secret_key",
            "",
            "a Stripe secret key (sk_test_..., sk_live_...) or restricted key (rk_test_..., rk_live_...); a publishable key (pk_...) cannot charge",
        );
    }
    if kind == ProcessorKind::Stripe && secret_key.is_none() {
        c.problem(
            "processor.stripe.secret_key",
            "",
            "a Stripe secret key (set processor.stripe.secret_key_file or AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY) when processor.kind = \"stripe\"",
        );
    }
    let api_base = st.api_base.trim().trim_end_matches('/').to_string();
    if !api_base_ok(&api_base) {
        c.problem(
            "processor.stripe.api_base",
            &st.api_base,
            "an https:// URL (plain http only to 127.0.0.1, localhost or [::1], for a test peer)",
        );
    }
    let api_version = st.api_version.trim().to_string();
    if !api_version_ok(&api_version) {
        c.problem(
            "processor.stripe.api_version",
            &api_version,
            format!(
                "a Stripe API version on or after {MIN_API_VERSION} (such as 2024-12-18.acacia): older versions do not report the card network's advice with a decline"
            ),
        );
    }
    let publishable_key = st.publishable_key.trim().to_string();
    if !publishable_key.is_empty() {
        match StripeMode::of_key(&publishable_key, &["pk"]) {
            None => c.problem(
                "processor.stripe.publishable_key",
                &publishable_key,
                "a publishable key (pk_test_... or pk_live_...), or empty",
            ),
            Some(m) if mode.is_some_and(|k| k != m) => c.problem(
                "processor.stripe.publishable_key",
                &publishable_key,
                "a publishable key of the same mode (test or live) as the secret key",
            ),
            Some(_) => {}
        }
    }
    let suffix = st.statement_descriptor_suffix.trim().to_string();
    if !suffix_ok(&suffix) {
        c.problem(
            "processor.stripe.statement_descriptor_suffix",
            &suffix,
            "up to 22 letters, digits, spaces and . - & #, with at least one letter (or empty)",
        );
    }
    let list_filters = c.boolean("processor.stripe.list_filters", &st.list_filters);
    let webhook_secrets = webhook_secrets(st, c);
    let webhook_tolerance = c.dur("processor.stripe.webhook_tolerance", &st.webhook_tolerance);
    if webhook_tolerance.0.is_zero() || webhook_tolerance.0.as_secs() > 3600 {
        c.problem(
            "processor.stripe.webhook_tolerance",
            &webhook_tolerance.to_string(),
            "a duration from 1s to 1h (Stripe's own libraries use 5m)",
        );
    }
    StripeSettings {
        api_base,
        api_version,
        secret_key,
        mode,
        publishable_key,
        statement_descriptor_suffix: suffix,
        list_filters,
        webhook_secrets,
        webhook_tolerance,
    }
}

/// The webhook signing secrets: every non-empty line of `webhook_secret_file` when it is set
/// (for systemd credentials), else the `webhook_secret` list. Each is a `whsec_...` secret.
fn webhook_secrets(st: &Stripe, c: &mut Checker) -> Vec<SecretString> {
    let key = "processor.stripe.webhook_secret";
    let items: Vec<String> = if st.webhook_secret_file.trim().is_empty() {
        st.webhook_secret.items()
    } else {
        match c.read_credential(
            "processor.stripe.webhook_secret_file",
            &st.webhook_secret_file,
        ) {
            Some(text) => text
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
            None => Vec::new(),
        }
    };
    let mut out = Vec::new();
    for item in items.into_iter().filter(|s| !s.is_empty()) {
        if item.starts_with("whsec_") && item.len() > "whsec_".len() {
            out.push(SecretString::from(item));
        } else {
            c.problem(
                key,
                "",
                "webhook signing secrets as Stripe shows them (whsec_...), one per line in webhook_secret_file",
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_base_is_https_or_plain_http_to_this_machine_only() {
        for ok in [
            "https://api.stripe.com",
            "http://127.0.0.1:12111",
            "http://localhost:8420/",
            "http://[::1]:8420",
            "http://127.0.0.1",
        ] {
            assert!(api_base_ok(ok.trim_end_matches('/')), "{ok}");
        }
        for bad in [
            "http://api.stripe.com",
            "http://127.0.0.1.example.com",
            "http://localhost.example.com:80",
            "http://10.0.0.1",
            "ftp://127.0.0.1",
            "https://",
            "",
        ] {
            assert!(!api_base_ok(bad), "{bad}");
        }
    }

    #[test]
    fn api_versions_before_network_advice_are_refused() {
        for ok in ["2024-12-18.acacia", "2025-03-31.basil", "2024-12-18"] {
            assert!(api_version_ok(ok), "{ok}");
        }
        for bad in [
            "2024-06-20",
            "2024-11-20.acacia",
            "latest",
            "",
            "2024-1-18",
            "20241218",
        ] {
            assert!(!api_version_ok(bad), "{bad}");
        }
    }

    #[test]
    fn key_modes_are_read_from_their_prefix() {
        assert_eq!(
            StripeMode::of_key("sk_test_abc", &["sk", "rk"]),
            Some(StripeMode::Test)
        );
        assert_eq!(
            StripeMode::of_key("rk_live_abc", &["sk", "rk"]),
            Some(StripeMode::Live)
        );
        assert_eq!(StripeMode::of_key("pk_live_abc", &["sk", "rk"]), None);
        assert_eq!(StripeMode::of_key("sk_abc", &["sk", "rk"]), None);
    }

    #[test]
    fn statement_descriptor_suffixes_follow_stripe_s_rules() {
        for ok in ["", "PLAN 2027", "Member Billing", "A-1 & Co."] {
            assert!(suffix_ok(ok), "{ok}");
        }
        for bad in [
            "12345",
            "x".repeat(23).as_str(),
            "Bill*Pay",
            "it's",
            "<b>",
            "café",
        ] {
            assert!(!suffix_ok(bad), "{bad}");
        }
    }
}
