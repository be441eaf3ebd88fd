//! `[processor.stripe]`: the Stripe account and how autopay talks to its API.

use secrecy::SecretString;
use serde::Serialize;

use super::super::checker::Checker;
use super::super::raw::section;
use super::ProcessorKind;

section!(Stripe {
    api_base: String,
    api_version: String,
    secret_key: String,
    secret_key_file: String,
    statement_descriptor_suffix: String,
    list_filters: String,
});

#[derive(Debug, Clone, Serialize)]
pub struct StripeSettings {
    pub api_base: String,
    pub api_version: String,
    #[serde(serialize_with = "super::super::secrets::ser_secret")]
    pub secret_key: Option<SecretString>,
    pub statement_descriptor_suffix: String,
    pub list_filters: bool,
}

/// `kind` is the chosen processor: a secret key is required only when it is Stripe.
pub(super) fn parse(st: &Stripe, c: &mut Checker, kind: ProcessorKind) -> StripeSettings {
    let secret_key = c.secret(
        &st.secret_key,
        "processor.stripe.secret_key_file",
        &st.secret_key_file,
    );
    if kind == ProcessorKind::Stripe {
        // The Stripe adapter is not in this release: accepting the setting would leave
        // autopay unable to charge. Its processor.stripe.* keys are read and checked so a
        // settings file written for the next release needs no change.
        c.problem(
            "processor.kind",
            "stripe",
            "simulated: the Stripe adapter is not in this release of autopay",
        );
    }
    if kind == ProcessorKind::Stripe && secret_key.is_none() {
        c.problem(
            "processor.stripe.secret_key",
            "",
            "a Stripe secret key (set processor.stripe.secret_key_file or AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY) when processor.kind = \"stripe\"",
        );
    }
    if !(st.api_base.starts_with("https://")
        || st.api_base.starts_with("http://127.0.0.1")
        || st.api_base.starts_with("http://localhost"))
    {
        c.problem(
            "processor.stripe.api_base",
            &st.api_base,
            "an https:// URL (plain http only to 127.0.0.1 or localhost, for tests)",
        );
    }
    let suffix = st.statement_descriptor_suffix.trim().to_string();
    if suffix.len() > 22
        || !suffix
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == ' ')
    {
        c.problem(
            "processor.stripe.statement_descriptor_suffix",
            &suffix,
            "up to 22 letters, digits and spaces",
        );
    }
    let list_filters = c.boolean("processor.stripe.list_filters", &st.list_filters);
    StripeSettings {
        api_base: st.api_base.trim_end_matches('/').to_string(),
        api_version: st.api_version.clone(),
        secret_key,
        statement_descriptor_suffix: suffix,
        list_filters,
    }
}
