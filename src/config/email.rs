//! `[email]`: how members' emails are sent, from whom, and how long they are retried and kept.
//! The SMTP server's own table is a module beside it.

use std::path::PathBuf;

use serde::Serialize;

use super::checker::Checker;
use super::duration::Dur;
use super::raw::{List, section};

mod smtp;

pub use smtp::{Smtp, SmtpSettings, SmtpTls};

section!(Email {
    transport: String,
    folder: String,
    from: String,
    reply_to: String,
    max_age: String,
    retry_delays: List,
    max_per_second: String,
    templates: String,
    keep_sent: String,
    smtp: Smtp,
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTransport {
    File,
    Smtp,
    Log,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmailSettings {
    pub transport: EmailTransport,
    pub folder: PathBuf,
    pub from: String,
    pub reply_to: String,
    pub max_age: Dur,
    pub retry_delays: Vec<Dur>,
    pub max_per_second: u32,
    pub templates: String,
    pub keep_sent: Dur,
    pub smtp: SmtpSettings,
}

pub(super) fn parse(e: &Email, c: &mut Checker) -> EmailSettings {
    let transport = c.choice(
        "email.transport",
        &e.transport,
        &[
            ("file", EmailTransport::File),
            ("smtp", EmailTransport::Smtp),
            ("log", EmailTransport::Log),
        ],
    );
    if transport == EmailTransport::File && e.folder.trim().is_empty() {
        c.problem(
            "email.folder",
            "",
            "a folder for .eml files when email.transport = \"file\"",
        );
    }
    if !e.from.contains('@') || e.from.chars().any(char::is_control) {
        c.problem(
            "email.from",
            &e.from,
            "a mailbox such as \"Member Billing <billing@example.org>\"",
        );
    }
    if !e.reply_to.is_empty()
        && (!e.reply_to.contains('@') || e.reply_to.chars().any(char::is_control))
    {
        c.problem(
            "email.reply_to",
            &e.reply_to,
            "empty, or a mailbox such as \"help@example.org\"",
        );
    }
    let max_age = c.dur("email.max_age", &e.max_age);
    let email_retry = c.durs("email.retry_delays", &e.retry_delays);
    if email_retry.is_empty() {
        c.problem(
            "email.retry_delays",
            "[]",
            "at least one wait, such as [\"1m\", \"5m\", \"30m\"]: a message that fails for a while is tried again after each, the last one repeating".to_string(),
        );
    }
    let max_per_second = c.int("email.max_per_second", &e.max_per_second, 1, 10_000);
    let keep_sent = c.dur("email.keep_sent", &e.keep_sent);
    let smtp = smtp::parse(&e.smtp, c, transport);
    EmailSettings {
        transport,
        folder: PathBuf::from(e.folder.trim()),
        from: e.from.trim().to_string(),
        reply_to: e.reply_to.trim().to_string(),
        max_age,
        retry_delays: email_retry,
        max_per_second,
        templates: e.templates.trim().to_string(),
        keep_sent,
        smtp,
    }
}
