//! Email templates: each notification kind has a subject, a plain-text body and an HTML body,
//! rendered with minijinja when the message is sent, from the outbox row's payload and the
//! organisation's branding.
//!
//! The built-in templates live in `templates/` at the repository root and are compiled into the
//! binary. `email.templates` may name a folder whose files replace any of them, one file at a
//! time: `{kind}.subject`, `{kind}.txt`, `{kind}.html`, or the shared `_base.*` and `_help.*`
//! that the kinds extend and include. Every kind is rendered once at load with a sample payload,
//! so a broken override stops start-up instead of a receipt.
//!
//! What a template sees: every field of the payload at the top level (fields a payload lacks
//! read as null), `org.name`, `org.support_phone`, `org.portal_url`, `greeting` ("Dear Ana
//! Díaz," or "Dear benefits administrator of Acme Manufacturing,") and `kind`; the filters (and
//! functions) `local(instant, time_zone)`, `date(instant, time_zone)` and `money(amount,
//! currency)`; and the test `positive` for amounts. HTML templates escape every value; data is
//! never evaluated as a template.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json, json};

use crate::config::Settings;
use crate::domain::member::AccountType;
use crate::domain::money::{Currency, Money};

/// Every kind of notification the outbox holds, each with its three templates.
pub const KINDS: &[&str] = &[
    "receipt",
    "declined",
    "failed",
    "card_disabled",
    "schedule_suspended",
    "reminder",
    "card_expiring",
    "setup",
    "changed",
    "paused",
    "cancelled",
];

/// The parts of a message, by the extension of their template file.
const PARTS: [&str; 3] = ["subject", "txt", "html"];

/// Files the kinds extend (`_base`) and include (`_help`); overridable like the rest.
const SHARED: [&str; 4] = ["_base.txt", "_base.html", "_help.txt", "_help.html"];

/// The longest subject sent; longer ones are cut with an ellipsis.
const MAX_SUBJECT_CHARS: usize = 200;

/// Lists every shipped template file as (name, source), compiled in from `templates/`.
macro_rules! shipped {
    (kinds: $($kind:literal),+; shared: $($shared:literal),+) => {
        &[
            $(
                (concat!($kind, ".subject"), include_str!(concat!("../../templates/", $kind, ".subject"))),
                (concat!($kind, ".txt"), include_str!(concat!("../../templates/", $kind, ".txt"))),
                (concat!($kind, ".html"), include_str!(concat!("../../templates/", $kind, ".html"))),
            )+
            $( ($shared, include_str!(concat!("../../templates/", $shared))), )+
        ]
    };
}

const BUILTIN: &[(&str, &str)] = shipped!(
    kinds: "receipt", "declined", "failed", "card_disabled", "schedule_suspended", "reminder",
        "card_expiring", "setup", "changed", "paused", "cancelled";
    shared: "_base.txt", "_base.html", "_help.txt", "_help.html"
);

/// Who the mail comes from and how members reach the organisation; the same in every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branding {
    /// `org.name`: the header and footer of every message.
    pub org_name: String,
    /// `org.support_phone`: every message says whom to call.
    pub support_phone: String,
    /// `org.portal_url`: where members change cards and pay online.
    pub portal_url: String,
    /// `email.from`: the From header, also the domain of the Message-ID.
    pub from: String,
    /// `email.reply_to`: the Reply-To header; empty for none.
    pub reply_to: String,
}

impl Branding {
    pub fn from_settings(s: &Settings) -> Branding {
        Branding {
            org_name: s.org.name.clone(),
            support_phone: s.org.support_phone.clone(),
            portal_url: s.org.portal_url.clone(),
            from: s.email.from.clone(),
            reply_to: s.email.reply_to.clone(),
        }
    }

    /// What load's self-check renders with; the settings are not needed to check templates.
    fn sample() -> Branding {
        Branding {
            org_name: "Example Health Plan".into(),
            support_phone: "1-800-555-0100".into(),
            portal_url: "https://members.example.org/billing".into(),
            from: "Member Billing <billing@example.org>".into(),
            reply_to: String::new(),
        }
    }
}

/// One message, ready for `MultiPart::alternative_plain_html`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// One line: no CR, LF or other control characters, at most 200 characters.
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Why a message could not be rendered, or the templates not loaded.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "cannot read the email template folder {path} (email.templates): {reason}; check that it exists and autopay may read it, or set email.templates to \"\" to use the built-in templates"
    )]
    Folder { path: PathBuf, reason: String },
    #[error(
        "cannot read the email template {path}: {reason}; check its permissions, or remove it to use the built-in template"
    )]
    File { path: PathBuf, reason: String },
    #[error(
        "{path} is not an email template autopay knows; in the email.templates folder name each override KIND.subject, KIND.txt or KIND.html, where KIND is one of {kinds}, or one of {shared}; rename the file or move it out of the folder",
        kinds = KINDS.join(", "),
        shared = SHARED.join(", ")
    )]
    UnknownFile { path: PathBuf },
    #[error(
        "the {kind} template {file} does not parse: {detail}; fix its syntax, or remove it to use the built-in template"
    )]
    Syntax {
        kind: String,
        file: String,
        detail: String,
    },
    #[error(
        "the {kind} email cannot be rendered: {file} failed: {detail}; fix {file}, or remove it to use the built-in template"
    )]
    Render {
        kind: String,
        file: String,
        detail: String,
    },
    #[error(
        "the {kind} email's {part} came out empty from {file}; the template must always produce text, or be removed to use the built-in template"
    )]
    Empty {
        kind: String,
        part: &'static str,
        file: String,
    },
    #[error(
        "there is no email template for the kind '{kind}' (the kinds are {kinds}); the notification row was written by another version of autopay, so run the version that wrote it or mark the row failed",
        kinds = KINDS.join(", ")
    )]
    UnknownKind { kind: String },
    #[error(
        "the {kind} notification's payload is not a JSON object, so no email can be made from it; the row is damaged: look at it with the notification's id and mark it failed"
    )]
    Payload { kind: String },
}

/// The compiled templates, built-in or overridden, ready to render any kind.
pub struct Templates {
    env: Environment<'static>,
    /// Where each template came from, by name, so an error points at the file to fix.
    origins: BTreeMap<String, String>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("origins", &self.origins)
            .finish_non_exhaustive()
    }
}

impl Templates {
    /// The shipped templates only.
    pub fn builtin() -> Templates {
        let mut env = environment();
        let mut origins = BTreeMap::new();
        for (name, source) in BUILTIN {
            // Infallible: the shipped templates are compiled in, and a unit test parses and
            // renders every one of them.
            if let Err(e) = env.add_template(name, source) {
                panic!("the built-in template templates/{name} does not parse: {e}");
            }
            origins.insert((*name).to_string(), format!("templates/{name} (built-in)"));
        }
        Templates { env, origins }
    }

    /// Built-ins overridden by files in `dir` named {kind}.subject, {kind}.txt, {kind}.html
    /// (any subset); every kind is test-rendered with a sample payload at load so a broken
    /// override fails at start-up.
    ///
    /// The shared `_base.txt`, `_base.html`, `_help.txt` and `_help.html` may be overridden too.
    /// Hidden files (a leading '.') are skipped; any other file is refused, so that a misspelt
    /// override is not silently ignored.
    pub fn load(dir: Option<&Path>) -> Result<Templates, TemplateError> {
        let mut templates = Templates::builtin();
        if let Some(dir) = dir {
            templates.override_from(dir)?;
        }
        templates.self_check()?;
        Ok(templates)
    }

    fn override_from(&mut self, dir: &Path) -> Result<(), TemplateError> {
        let folder_err = |e: std::io::Error| TemplateError::Folder {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(folder_err)? {
            paths.push(entry.map_err(folder_err)?.path());
        }
        // Sorted, so that with several bad files the same one is reported every time.
        paths.sort();
        for path in paths {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                return Err(TemplateError::UnknownFile { path });
            };
            if name.starts_with('.') {
                continue;
            }
            if !is_template_name(name) || !path.is_file() {
                return Err(TemplateError::UnknownFile { path });
            }
            let name = name.to_string();
            let source = std::fs::read_to_string(&path).map_err(|e| TemplateError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let file = path.display().to_string();
            self.env
                .add_template_owned(name.clone(), source)
                .map_err(|e| TemplateError::Syntax {
                    kind: kind_of(&name).to_string(),
                    file: file.clone(),
                    detail: e.to_string(),
                })?;
            self.origins.insert(name, file);
        }
        Ok(())
    }

    /// Renders every kind with its sample payload, and with the leanest payload the engine
    /// writes (null instants and amounts, empty lists), so a template that cannot cope with
    /// either fails now rather than when a member's mail is due.
    fn self_check(&self) -> Result<(), TemplateError> {
        let branding = Branding::sample();
        for kind in KINDS {
            self.render(kind, &Templates::sample_payload(kind), &branding)?;
            self.render(kind, &lean_payload(kind), &branding)?;
        }
        Ok(())
    }

    /// Renders one message. The payload's fields are the template's variables; a field the
    /// payload lacks reads as null.
    pub fn render(
        &self,
        kind: &str,
        payload: &Json,
        branding: &Branding,
    ) -> Result<Rendered, TemplateError> {
        if !KINDS.contains(&kind) {
            return Err(TemplateError::UnknownKind {
                kind: kind.to_string(),
            });
        }
        let Json::Object(fields) = payload else {
            return Err(TemplateError::Payload {
                kind: kind.to_string(),
            });
        };
        let ctx = context(kind, fields, branding);
        let subject = one_line(&self.part(kind, "subject", &ctx)?);
        let text = format!("{}\n", self.part(kind, "txt", &ctx)?.trim_end());
        let html = format!("{}\n", self.part(kind, "html", &ctx)?.trim_end());
        for (part, value) in [("subject", &subject), ("txt", &text), ("html", &html)] {
            if value.trim().is_empty() {
                return Err(TemplateError::Empty {
                    kind: kind.to_string(),
                    part,
                    file: self.origin(&format!("{kind}.{part}")),
                });
            }
        }
        Ok(Rendered {
            subject,
            text,
            html,
        })
    }

    fn part(&self, kind: &str, part: &str, ctx: &Value) -> Result<String, TemplateError> {
        let name = format!("{kind}.{part}");
        let fail = |e: minijinja::Error| TemplateError::Render {
            kind: kind.to_string(),
            // The error names the template it happened in, which may be a shared one.
            file: self.origin(e.name().unwrap_or(&name)),
            detail: e.to_string(),
        };
        self.env
            .get_template(&name)
            .map_err(fail)?
            .render(ctx)
            .map_err(fail)
    }

    fn origin(&self, name: &str) -> String {
        self.origins
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    }

    /// A realistic payload of each kind, with every field the engine writes; `Null` for an
    /// unknown kind.
    pub fn sample_payload(kind: &str) -> Json {
        match kind {
            "receipt" => json!({
                "payment_id": "01938a1c-7f00-7a10-8b2c-3d5e6f708192",
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "amount": "125.00",
                "currency": "USD",
                "credit_used": "0.00",
                "charged_at": "2026-12-01T17:00:00Z",
                "card": "Visa ending 4242",
                "confirmation": "pi_3QxR7u2eZvKYlo2C1aBcDeF0",
                "bills": [
                    {"bill_id": "01938a10-aa00-7b11-8c22-d3e4f5a6b7c8", "reference": "INV-1001", "amount": "100.00"},
                    {"bill_id": "01938a10-bb00-7b11-8c22-d3e4f5a6b7c8", "reference": "INV-1002", "amount": "25.00"},
                ],
                "next_payment_at": "2027-01-01T17:00:00Z",
                "time_zone": "America/Los_Angeles",
            }),
            "declined" | "failed" => json!({
                "payment_id": "01938a1c-7f00-7a10-8b2c-3d5e6f708192",
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "amount": "125.00",
                "currency": "USD",
                "card": "Visa ending 4242",
                "decline_code": if kind == "declined" { "insufficient_funds" } else { "generic_decline" },
                "reason": if kind == "declined" {
                    "the card did not have enough funds or available credit"
                } else {
                    "your bank declined the payment without giving a reason"
                },
                "attempt": if kind == "declined" { 1 } else { 4 },
                "next_try_at": if kind == "declined" { json!("2026-12-04T14:00:00Z") } else { Json::Null },
                "time_zone": "America/New_York",
            }),
            "card_disabled" => json!({
                "card_id": "01938a05-c000-7d12-8e34-f5a6b7c8d9e0",
                "card": "Visa ending 4242",
                "member_name": "Acme Manufacturing",
                "account_type": "employer-group",
                "reason": "your bank declined the card and asked us not to use it again",
                "suspended_schedules": [
                    "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                    "01938a1b-2f00-7c3d-9e8f-a0b1c2d3e4f5",
                ],
            }),
            "schedule_suspended" => json!({
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "reason": "3 payments failed in a row",
            }),
            "reminder" => json!({
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "due_at": "2026-12-01T14:00:00Z",
                "amount": "125.00",
                "currency": "USD",
                "card": "Visa ending 4242",
                "time_zone": "America/New_York",
            }),
            "card_expiring" => json!({
                "card_id": "01938a05-c000-7d12-8e34-f5a6b7c8d9e0",
                "card": "Visa ending 4242",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "expiry": "04/2028",
            }),
            "setup" => json!({
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "rule": "monthly on day 1 at 09:00",
                "amount": "125.00 USD",
                "card": "Visa ending 4242",
                "first_payment_at": "2026-12-01T14:00:00Z",
                "time_zone": "America/New_York",
                "authorized_at": "2026-11-20T15:30:00Z",
            }),
            "changed" => json!({
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "version": 2,
                "changes": "the card is now Visa ending 4242 (was MasterCard ending 4444)",
                "rule": "monthly on day 1 at 09:00",
                "amount": "125.00 USD",
                "card": "Visa ending 4242",
                "next_payment_at": "2026-12-01T14:00:00Z",
                "time_zone": "America/New_York",
            }),
            "paused" | "cancelled" => json!({
                "schedule_id": "01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5",
                "member_name": "Ana Díaz",
                "account_type": "individual-family",
                "rule": "monthly on day 1 at 09:00",
                "at": "2026-11-20T15:30:00Z",
                "time_zone": "America/New_York",
            }),
            _ => Json::Null,
        }
    }
}

/// The sample with everything the engine may leave out set to nothing: instants null, the
/// amounts that may be unknown null, lists empty.
fn lean_payload(kind: &str) -> Json {
    let mut payload = Templates::sample_payload(kind);
    if let Json::Object(fields) = &mut payload {
        for (key, value) in fields.iter_mut() {
            let nullable_amount =
                key == "amount" && matches!(kind, "declined" | "failed" | "reminder");
            if key == "at" || key.ends_with("_at") || nullable_amount {
                *value = Json::Null;
            } else if value.is_array() {
                *value = json!([]);
            }
        }
    }
    payload
}

/// A name an override may have: a kind's part, or a shared file.
fn is_template_name(name: &str) -> bool {
    SHARED.contains(&name)
        || name
            .split_once('.')
            .is_some_and(|(kind, part)| KINDS.contains(&kind) && PARTS.contains(&part))
}

/// The kind a template file belongs to, for error messages.
fn kind_of(name: &str) -> &str {
    if name.starts_with('_') {
        return "shared";
    }
    name.split('.').next().unwrap_or(name)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // A variable no payload has (a typo in an override) fails the self-check at load; a known
    // field a row lacks is filled with null by `context`, so `{% if field %}` stays safe.
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Debug info would copy payload values (names) into errors, and errors reach the logs.
    env.set_debug(false);
    // Explicit rather than minijinja's default, so that only `.html` escapes and a `.subject`
    // or `.txt` never shows "&amp;".
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.add_filter("local", local);
    env.add_function("local", local);
    env.add_filter("date", date);
    env.add_function("date", date);
    env.add_filter("money", money);
    env.add_function("money", money);
    env.add_test("positive", positive);
    env
}

/// The template's variables: the payload, known fields it lacks as null, and what every
/// message shares.
fn context(kind: &str, fields: &Map<String, Json>, branding: &Branding) -> Value {
    let mut ctx = Map::new();
    if let Json::Object(sample) = Templates::sample_payload(kind) {
        for key in sample.keys() {
            ctx.insert(key.clone(), Json::Null);
        }
    }
    for (key, value) in fields {
        ctx.insert(key.clone(), value.clone());
    }
    ctx.insert("greeting".into(), Json::String(greeting(fields)));
    ctx.insert(
        "org".into(),
        json!({
            "name": branding.org_name,
            "support_phone": branding.support_phone,
            "portal_url": branding.portal_url,
        }),
    );
    ctx.insert("kind".into(), Json::String(kind.to_string()));
    Value::from_serialize(&ctx)
}

/// An employer group's mail goes to its benefits administrator, who is addressed by the
/// group's name; a person is addressed by their own.
fn greeting(fields: &Map<String, Json>) -> String {
    let name = fields
        .get("member_name")
        .and_then(Json::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let group = fields
        .get("account_type")
        .and_then(Json::as_str)
        .and_then(|t| t.parse::<AccountType>().ok())
        == Some(AccountType::EmployerGroup);
    match (group, name) {
        (true, Some(name)) => format!("Dear benefits administrator of {name},"),
        (true, None) => "Dear benefits administrator,".to_string(),
        (false, Some(name)) => format!("Dear {name},"),
        (false, None) => "Dear member,".to_string(),
    }
}

/// "Tuesday, December 1, 2026 at 9:00 AM EST", in the named zone (UTC when unknown).
fn local(instant: Value, time_zone: Option<Value>) -> String {
    in_zone(
        &instant,
        time_zone.as_ref(),
        "%A, %B %-d, %Y at %-I:%M %p %Z",
    )
}

/// "December 1, 2026", the day in the named zone (UTC when unknown).
fn date(instant: Value, time_zone: Option<Value>) -> String {
    in_zone(&instant, time_zone.as_ref(), "%B %-d, %Y")
}

/// Formats an RFC 3339 instant. Anything else is shown as given rather than failing the
/// message: a receipt with an odd date beats no receipt.
fn in_zone(instant: &Value, time_zone: Option<&Value>, format: &str) -> String {
    let Some(text) = instant.as_str() else {
        return shown(instant);
    };
    let Ok(at) = text.trim().parse::<Timestamp>() else {
        return text.to_string();
    };
    let zone = time_zone
        .and_then(Value::as_str)
        .and_then(|name| TimeZone::get(name.trim()).ok())
        .unwrap_or(TimeZone::UTC);
    jiff::fmt::strtime::format(format, &at.to_zoned_datetime(zone))
        .unwrap_or_else(|_| text.to_string())
}

/// "125.00 USD": the amount in its currency's decimals, then its code. An amount that does not
/// parse is shown as given, next to the currency.
fn money(amount: Value, currency: Option<Value>) -> String {
    let amount = match amount.as_str() {
        Some(s) => s.trim().to_string(),
        None => shown(&amount),
    };
    let code = currency
        .as_ref()
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if let Ok(currency) = Currency::parse(code)
        && let Ok(money) = Money::parse(&amount, currency)
    {
        return money.display_with_code();
    }
    match (amount.is_empty(), code.is_empty()) {
        (true, _) => String::new(),
        (false, true) => amount,
        (false, false) => format!("{amount} {code}"),
    }
}

/// Whether an amount such as "0.00" or "12.50" is above zero (`{% if x is positive %}`).
fn positive(amount: Value) -> bool {
    let text = match amount.as_str() {
        Some(s) => s.trim().to_string(),
        None => amount.to_string(),
    };
    !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
        && text.bytes().any(|b| matches!(b, b'1'..=b'9'))
}

/// A value for people: nothing for null, its text otherwise.
fn shown(value: &Value) -> String {
    if value.is_none() || value.is_undefined() {
        String::new()
    } else {
        value.to_string()
    }
}

/// A subject a mail header can carry: control characters (CR and LF among them) become spaces,
/// direction overrides and invisible characters go (they can disguise a subject), runs of
/// space collapse, and anything past 200 characters is cut.
fn one_line(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .filter(|&c| !is_invisible(c))
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let line = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= MAX_SUBJECT_CHARS {
        return line;
    }
    let mut cut: String = line.chars().take(MAX_SUBJECT_CHARS - 1).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// Direction marks, overrides and isolates, the zero-width space and word joiner, and the
/// byte-order mark. Joiners (U+200C, U+200D) stay: some scripts and emoji need them.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branding() -> Branding {
        let settings = Settings::load(None, std::iter::empty()).unwrap();
        Branding::from_settings(&settings)
    }

    fn render(kind: &str, payload: &Json) -> Rendered {
        Templates::builtin()
            .render(kind, payload, &branding())
            .unwrap_or_else(|e| panic!("{kind}: {e}"))
    }

    fn sample(kind: &str) -> Rendered {
        render(kind, &Templates::sample_payload(kind))
    }

    /// The HTML as a reader sees it: the entities the escaper writes turned back into text.
    fn readable(html: &str) -> String {
        html.replace("&#x2f;", "/")
            .replace("&#x27;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }

    fn with(kind: &str, changes: Json) -> Json {
        let mut payload = Templates::sample_payload(kind);
        for (k, v) in changes.as_object().unwrap() {
            payload[k] = v.clone();
        }
        payload
    }

    fn override_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, source) in files {
            std::fs::write(dir.path().join(name), source).unwrap();
        }
        dir
    }

    #[test]
    fn every_kind_renders_from_its_sample_and_names_the_org_its_phone_and_portal() {
        let b = branding();
        for kind in KINDS {
            let r = sample(kind);
            assert!(!r.subject.is_empty(), "{kind}");
            assert!(r.html.starts_with("<!DOCTYPE html>"), "{kind}: {}", r.html);
            let html = readable(&r.html);
            for part in [&r.text, &html] {
                assert!(part.contains(&b.org_name), "{kind}: {part}");
                assert!(part.contains(&b.support_phone), "{kind}: {part}");
                assert!(part.contains(&b.portal_url), "{kind}: {part}");
            }
        }
    }

    #[test]
    fn the_built_in_templates_pass_the_load_check_with_full_and_lean_payloads() {
        let loaded = Templates::load(None).unwrap();
        for kind in KINDS {
            let lean = loaded
                .render(kind, &lean_payload(kind), &branding())
                .unwrap();
            assert!(lean.text.contains("Dear Ana Díaz,") || lean.text.contains("Acme"));
        }
    }

    #[test]
    fn amounts_are_shown_with_their_currency() {
        for kind in [
            "receipt", "declined", "failed", "reminder", "setup", "changed",
        ] {
            let r = sample(kind);
            assert!(r.text.contains("125.00 USD"), "{kind}: {}", r.text);
            assert!(r.html.contains("125.00 USD"), "{kind}: {}", r.html);
        }
        assert_eq!(
            sample("receipt").subject,
            "Receipt: your payment of 125.00 USD was received"
        );
        let receipt = sample("receipt");
        assert!(
            receipt.text.contains("INV-1001: 100.00 USD"),
            "{}",
            receipt.text
        );
        assert!(receipt.html.contains(
            "<td style=\"padding:6px 8px;border-bottom:1px solid #e4e7eb;\">INV-1002</td>"
        ));
        assert!(!receipt.text.contains("Credit used"));

        let with_credit = render("receipt", &with("receipt", json!({"credit_used": "10.00"})));
        assert!(
            with_credit.text.contains("Credit used:   10.00 USD"),
            "{}",
            with_credit.text
        );
    }

    #[test]
    fn a_reminder_without_an_amount_names_the_statement_balance() {
        let r = render("reminder", &with("reminder", json!({"amount": null})));
        assert!(
            r.subject.contains("your statement balance"),
            "{}",
            r.subject
        );
        assert!(
            r.text.contains("Amount:  your statement balance"),
            "{}",
            r.text
        );
        assert!(r.html.contains("your statement balance"));
    }

    #[test]
    fn dates_are_shown_in_the_schedule_s_time_zone() {
        let receipt = sample("receipt");
        assert!(
            receipt
                .text
                .contains("Tuesday, December 1, 2026 at 9:00 AM PST"),
            "{}",
            receipt.text
        );
        assert!(
            receipt
                .html
                .contains("Tuesday, December 1, 2026 at 9:00 AM PST")
        );
        assert!(receipt.text.contains("scheduled for January 1, 2027."));

        let summer = render(
            "receipt",
            &with("receipt", json!({"charged_at": "2026-07-01T16:00:00Z"})),
        );
        assert!(
            summer
                .text
                .contains("Wednesday, July 1, 2026 at 9:00 AM PDT"),
            "{}",
            summer.text
        );

        for (kind, shown) in [
            ("declined", "Friday, December 4, 2026 at 9:00 AM EST"),
            ("reminder", "Tuesday, December 1, 2026 at 9:00 AM EST"),
            ("setup", "Tuesday, December 1, 2026 at 9:00 AM EST"),
            ("setup", "Friday, November 20, 2026 at 10:30 AM EST"),
            ("changed", "Tuesday, December 1, 2026 at 9:00 AM EST"),
            ("paused", "Friday, November 20, 2026 at 10:30 AM EST"),
            ("cancelled", "Friday, November 20, 2026 at 10:30 AM EST"),
        ] {
            let r = sample(kind);
            assert!(r.text.contains(shown), "{kind}: {}", r.text);
            assert!(r.html.contains(shown), "{kind}: {}", r.html);
        }
        assert_eq!(
            sample("reminder").subject,
            "Reminder: automatic payment of 125.00 USD on December 1, 2026"
        );
    }

    #[test]
    fn an_unknown_time_zone_falls_back_to_utc() {
        let r = render(
            "receipt",
            &with("receipt", json!({"time_zone": "Mars/Olympus_Mons"})),
        );
        assert!(
            r.text.contains("Tuesday, December 1, 2026 at 5:00 PM UTC"),
            "{}",
            r.text
        );
    }

    #[test]
    fn a_decline_says_why_when_it_is_tried_again_and_what_to_do() {
        let r = sample("declined");
        assert!(r.text.contains(
            "from your Visa ending 4242 because the card did not have enough funds or available credit."
        ), "{}", r.text);
        assert!(r.text.contains("We will try the card again on"));
        assert!(r.text.contains("choose another card"));
        assert!(
            r.text
                .contains("Pay online now at https://members.example.org/billing")
        );
        assert!(r.text.contains("Pay by phone at 1-800-555-0100"));
        assert!(r.subject.contains("December 4, 2026"), "{}", r.subject);

        let failed = sample("failed");
        assert!(failed.text.contains("final attempt"));
        assert!(failed.text.contains("choose another card"));
        assert!(!failed.text.contains("try the card again"));
    }

    #[test]
    fn an_employer_group_is_addressed_through_its_benefits_administrator() {
        for kind in KINDS {
            let group = render(
                kind,
                &with(
                    kind,
                    json!({"member_name": "Acme Manufacturing", "account_type": "employer-group"}),
                ),
            );
            assert!(
                group
                    .text
                    .starts_with("Dear benefits administrator of Acme Manufacturing,\n"),
                "{kind}: {}",
                group.text
            );
            assert!(
                group
                    .html
                    .contains("Dear benefits administrator of Acme Manufacturing,")
            );

            let person = render(
                kind,
                &with(
                    kind,
                    json!({"member_name": "Ana Díaz", "account_type": "individual-family"}),
                ),
            );
            assert!(
                person.text.starts_with("Dear Ana Díaz,\n"),
                "{kind}: {}",
                person.text
            );
            assert!(!person.text.contains("administrator"));
        }
    }

    #[test]
    fn a_card_disabled_notice_counts_the_suspended_schedules() {
        let two = sample("card_disabled");
        assert!(
            two.text
                .contains("The 2 automatic payments that used this card are suspended."),
            "{}",
            two.text
        );
        let one = render(
            "card_disabled",
            &with(
                "card_disabled",
                json!({"suspended_schedules": ["01938a1a-1e00-7c3d-9e8f-a0b1c2d3e4f5"]}),
            ),
        );
        assert!(
            one.text
                .contains("The automatic payment that used this card is suspended.")
        );
        assert!(
            !one.text.contains("01938a1a"),
            "internal ids are not for members"
        );
    }

    /// Replaces every string in the payload, however deep, with `hostile`.
    fn poison(value: &mut Json, hostile: &str) {
        match value {
            Json::String(s) => *s = hostile.to_string(),
            Json::Array(items) => items.iter_mut().for_each(|v| poison(v, hostile)),
            Json::Object(fields) => fields.values_mut().for_each(|v| poison(v, hostile)),
            _ => {}
        }
    }

    #[test]
    fn hostile_values_are_escaped_kept_off_the_subject_line_and_never_evaluated() {
        let long = format!("{}<b>end</b>", "Ω long ".repeat(2_000));
        let hostile = [
            "<script>alert(1)</script>",
            "\r\nBcc: evil@example.com",
            "{{ 7*7 }}",
            "{% for x in range(3) %}loop{% endfor %}",
            long.as_str(),
            "\u{202E}moc.elpmaxe\u{202C} مرحبا بكم \u{2067}עברית\u{2069}",
            "\" onmouseover=\"alert(1)",
        ];
        let templates = Templates::builtin();
        for kind in KINDS {
            for bad in hostile {
                let mut payload = Templates::sample_payload(kind);
                poison(&mut payload, bad);
                let r = templates
                    .render(kind, &payload, &branding())
                    .unwrap_or_else(|e| panic!("{kind} with {bad:?}: {e}"));
                assert!(
                    !r.html.to_lowercase().contains("<script"),
                    "{kind}: {}",
                    r.html
                );
                assert!(!r.html.contains("<b>end"), "{kind}");
                assert!(!r.html.contains("\" onmouseover"), "{kind}");
                assert!(!r.subject.contains(['\r', '\n']), "{kind}: {:?}", r.subject);
                assert!(!r.subject.chars().any(|c| c.is_control() || is_invisible(c)));
                assert!(r.subject.chars().count() <= MAX_SUBJECT_CHARS, "{kind}");
                for part in [&r.subject, &r.text, &r.html] {
                    assert!(!part.contains("49"), "{kind} evaluated data: {part}");
                    assert!(!part.contains("looploop"), "{kind} evaluated data");
                }
                if bad == "{{ 7*7 }}" {
                    assert!(r.text.contains("{{ 7*7 }}"), "{kind}: {}", r.text);
                    assert!(r.html.contains("{{ 7*7 }}"), "{kind}");
                }
            }
        }
    }

    #[test]
    fn a_subject_is_one_clean_line_of_at_most_200_characters() {
        assert_eq!(
            one_line("  Paid\r\nBcc: x@y\t now \u{202E}! "),
            "Paid Bcc: x@y now !"
        );
        let long = one_line(&"é".repeat(500));
        assert_eq!(long.chars().count(), MAX_SUBJECT_CHARS);
        assert!(long.ends_with('…'));
        assert_eq!(one_line("Hello"), "Hello");
    }

    #[test]
    fn money_shows_the_currency_s_decimals_and_keeps_what_it_cannot_read() {
        let m = |a: Value, c: &str| money(a, Some(Value::from(c)));
        assert_eq!(m(Value::from("125"), "USD"), "125.00 USD");
        assert_eq!(m(Value::from("1500"), "JPY"), "1500 JPY");
        assert_eq!(m(Value::from("about ten"), "USD"), "about ten USD");
        assert_eq!(m(Value::from(()), "USD"), "");
        assert!(positive(Value::from("0.01")));
        assert!(!positive(Value::from("0.00")));
        assert!(!positive(Value::from("-5.00")));
        assert!(!positive(Value::from(())));
    }

    #[test]
    fn a_row_missing_a_field_still_renders() {
        // The over-limit failure is written without an attempt number.
        let mut payload = Templates::sample_payload("failed");
        payload.as_object_mut().unwrap().remove("attempt");
        payload.as_object_mut().unwrap().remove("next_try_at");
        let r = render("failed", &payload);
        assert!(r.text.contains("final attempt"));
    }

    #[test]
    fn an_unknown_kind_or_a_payload_that_is_not_an_object_is_refused() {
        let t = Templates::builtin();
        let err = t.render("birthday", &json!({}), &branding()).unwrap_err();
        assert!(matches!(err, TemplateError::UnknownKind { .. }));
        assert!(err.to_string().contains("birthday"), "{err}");
        let err = t
            .render("receipt", &json!([1, 2]), &branding())
            .unwrap_err();
        assert!(matches!(err, TemplateError::Payload { .. }));
        assert_eq!(Templates::sample_payload("birthday"), Json::Null);
    }

    #[test]
    fn an_override_replaces_only_its_own_file() {
        let dir = override_dir(&[(
            "receipt.subject",
            "{{ org.name }} received {{ amount | money(currency) }}\n",
        )]);
        let custom = Templates::load(Some(dir.path())).unwrap();
        let builtin = Templates::builtin();
        let b = branding();
        let payload = Templates::sample_payload("receipt");
        let mine = custom.render("receipt", &payload, &b).unwrap();
        let theirs = builtin.render("receipt", &payload, &b).unwrap();
        assert_eq!(mine.subject, "Example Health Plan received 125.00 USD");
        assert_eq!(mine.text, theirs.text);
        assert_eq!(mine.html, theirs.html);
        for kind in KINDS.iter().filter(|k| **k != "receipt") {
            let payload = Templates::sample_payload(kind);
            assert_eq!(
                custom.render(kind, &payload, &b).unwrap(),
                builtin.render(kind, &payload, &b).unwrap(),
                "{kind}"
            );
        }
    }

    #[test]
    fn an_override_of_a_shared_file_reaches_every_kind() {
        let dir = override_dir(&[(
            "_base.txt",
            "{{ greeting }}\n\n{% block body %}{% endblock %}\n\nCall {{ org.support_phone }}, 8am to 8pm.\n",
        )]);
        let t = Templates::load(Some(dir.path())).unwrap();
        for kind in KINDS {
            let r = t
                .render(kind, &Templates::sample_payload(kind), &branding())
                .unwrap();
            assert!(
                r.text.ends_with("Call 1-800-555-0100, 8am to 8pm.\n"),
                "{kind}: {}",
                r.text
            );
        }
    }

    #[test]
    fn an_override_that_does_not_parse_fails_load_naming_the_file() {
        let dir = override_dir(&[("declined.html", "<p>{% if amount %}unclosed</p>")]);
        let err = Templates::load(Some(dir.path())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TemplateError::Syntax { .. }), "{msg}");
        assert!(
            msg.contains(&dir.path().join("declined.html").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("the declined template"), "{msg}");
        assert!(
            msg.contains("remove it to use the built-in template"),
            "{msg}"
        );
    }

    #[test]
    fn an_override_that_fails_to_render_fails_load_naming_the_file() {
        let dir = override_dir(&[("reminder.txt", "Due {{ due_on }}\n")]);
        let err = Templates::load(Some(dir.path())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TemplateError::Render { .. }), "{msg}");
        assert!(
            msg.contains(&dir.path().join("reminder.txt").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("the reminder email"), "{msg}");

        // Lean rows (no amount, no dates) are checked too.
        let dir = override_dir(&[(
            "declined.txt",
            "{{ amount | upper }} {{ next_try_at.year }}\n",
        )]);
        assert!(Templates::load(Some(dir.path())).is_err());

        let dir = override_dir(&[("paused.subject", "   \n")]);
        let err = Templates::load(Some(dir.path())).unwrap_err();
        assert!(matches!(err, TemplateError::Empty { .. }), "{err}");
    }

    #[test]
    fn a_misnamed_file_or_a_missing_folder_fails_load() {
        let dir = override_dir(&[("reciept.txt", "Thanks\n"), (".reminder.txt.swp", "")]);
        let err = Templates::load(Some(dir.path())).unwrap_err();
        assert!(matches!(err, TemplateError::UnknownFile { .. }), "{err}");
        assert!(err.to_string().contains("reciept.txt"), "{err}");

        let missing = dir.path().join("nowhere");
        let err = Templates::load(Some(&missing)).unwrap_err();
        assert!(matches!(err, TemplateError::Folder { .. }), "{err}");
        assert!(err.to_string().contains("email.templates"), "{err}");
    }

    #[test]
    fn the_shipped_folder_holds_exactly_the_compiled_in_templates() {
        let mut expected: Vec<String> = KINDS
            .iter()
            .flat_map(|k| PARTS.iter().map(move |p| format!("{k}.{p}")))
            .chain(SHARED.iter().map(|s| s.to_string()))
            .collect();
        expected.sort();
        let mut compiled: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
        compiled.sort();
        assert_eq!(compiled, expected);
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let mut on_disk: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, expected);
    }

    #[test]
    fn the_shipped_folder_loads_as_an_override_of_itself() {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let t = Templates::load(Some(&folder)).unwrap();
        assert_eq!(
            t.render(
                "receipt",
                &Templates::sample_payload("receipt"),
                &branding()
            )
            .unwrap(),
            sample("receipt")
        );
    }
}
