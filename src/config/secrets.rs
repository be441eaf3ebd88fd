//! Keeping secrets out of what autopay shows: which keys name secrets, the redaction run on
//! every error text, and how a secret setting is serialized for `check-config`.

use secrecy::SecretString;

use super::REDACTED;
use super::url::redact_url;

/// Whether a settings key (`email.smtp.password`, `AUTOPAY__PROCESSOR__STRIPE__SECRET_KEY`,
/// `api_token`) names a secret: its last part holds "password", "passwd", "secret" or "token",
/// or ends in "key". A `..._file` key names a file, not a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.trim_matches(|c: char| c == '"' || c == '\'' || c == '`');
    let last = key
        .rsplit(['.', ' '])
        .next()
        .unwrap_or(key)
        .rsplit("__")
        .next()
        .unwrap_or(key)
        .to_ascii_lowercase();
    !last.ends_with("_file")
        && (["password", "passwd", "secret", "token"]
            .iter()
            .any(|w| last.contains(w))
            || last.ends_with("key"))
}

/// Text about to be shown in an error, with what must never be shown taken out: the value of
/// any `KEY = value` whose key names a secret ([`is_secret_key`]: the rest of that line), the
/// password inside any URL ([`redact_url`]), and anything that could be a card number. Run on
/// every error the command line prints.
pub fn redact_secrets(text: &str) -> String {
    let lines: Vec<String> = text.split('\n').map(redact_assignment).collect();
    let joined = lines.join("\n");
    let urls: String = joined
        .split_inclusive(char::is_whitespace)
        .map(|word| {
            if word.contains("://") {
                redact_url(word)
            } else {
                word.to_string()
            }
        })
        .collect();
    crate::domain::card::redact_card_numbers(&urls)
}

/// One line with the value of a secret's `KEY = value` (or `KEY=value`) replaced, up to the end
/// of the line.
fn redact_assignment(line: &str) -> String {
    let mut search = 0;
    while let Some(eq) = line[search..].find('=').map(|i| search + i) {
        let before = line[..eq].trim_end();
        let key_start = before
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || "_.-\"'`".contains(*c)))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let key = &before[key_start..];
        if !key.is_empty() && is_secret_key(key) {
            return format!("{} {REDACTED}", &line[..=eq]);
        }
        search = eq + 1;
    }
    line.to_string()
}

/// Shows a secret setting only as whether it is set.
pub(super) fn ser_secret<S: serde::Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_str(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_urls_and_card_numbers_are_taken_out_of_any_error_text() {
        for (text, secret) in [
            ("2 | password = \"hunter2", "hunter2"),
            ("AUTOPAY__EMAIL__SMTP__PASSWORD=hunter2 is wrong", "hunter2"),
            ("smtp = { password = 'hunter2', host = 'h' }", "hunter2"),
            ("processor.stripe.secret_key = sk_live_hunter2", "hunter2"),
            ("api_token=hunter2", "hunter2"),
            (
                "cannot reach postgres://app:hunter2@db/autopay: refused",
                "hunter2",
            ),
            ("a path 4242424242424242 or ref4242-4242-4242-4242", "4242"),
        ] {
            let shown = redact_secrets(text);
            assert!(!shown.contains(secret), "{text} -> {shown}");
        }
        for kept in [
            "processor.key_retention = 24h",
            "database.password_file = /run/credentials/db",
            "--token: this is not a processor token",
            "payment 0193a5b2-7c1e-7d3f-9a41-212345678900 is failed",
        ] {
            assert_eq!(redact_secrets(kept), kept);
        }
    }
}
