//! The command-line tool: parses arguments, calls the layers below, prints tables or JSON, and
//! maps every error to a sysexits code with a message that says what to do.

pub mod args;
mod bench;
mod billing;
mod bulkload;
mod ceiling;
mod counted;
mod demo;
mod idle;
mod mailbench;
mod members;
mod operate;
pub mod output;
mod restore;
mod schedules;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use jiff::Timestamp;

use crate::clock::{Clock, SystemClock};
use crate::config::{ConfigError, Settings};
use crate::processor::Processor;
use crate::store::{self, Audit, Store, StoreError};
use args::{Cli, Command};
use output::say;

/// sysexits(3) codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATA: u8 = 65;
    pub const NO_INPUT: u8 = 66;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const CANT_CREATE: u8 = 73;
    pub const CONFIG: u8 = 78;
}

/// An error for the person at the terminal: what went wrong and how to fix it, with its exit
/// code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new(exit::USAGE, message)
    }
    pub fn data(message: impl Into<String>) -> CliError {
        CliError::new(exit::DATA, message)
    }
    pub fn internal(message: impl Into<String>) -> CliError {
        CliError::new(exit::SOFTWARE, message)
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        let code = match &e {
            StoreError::NotFound(_) => exit::NO_INPUT,
            StoreError::Conflict(_) => exit::DATA,
            StoreError::Unavailable(_) | StoreError::Contention(_) => exit::UNAVAILABLE,
            StoreError::Schema(_) | StoreError::Config(_) => exit::CONFIG,
            StoreError::Internal(_) => exit::SOFTWARE,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> CliError {
        CliError::new(
            exit::CONFIG,
            format!(
                "{e}\nFix these settings (see config/default.toml for every key), then run `autopay check-config`."
            ),
        )
    }
}

/// The card-number redactor (it lives with the detector in `domain::card`): clap echoes
/// unexpected arguments, and a card number typed in the wrong place must not reach the
/// terminal's scrollback or a log.
pub use crate::domain::card::redact_card_numbers;

/// What every command may need: settings, "now", who is acting.
pub struct Context {
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub json: bool,
}

impl Context {
    pub fn audit(&self) -> Audit {
        Audit {
            actor: operator(),
            at: self.clock.now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Opens the database and refuses one whose schema this binary does not match.
    pub async fn store(&self) -> Result<Arc<dyn Store>, CliError> {
        let store = store::open(
            &self.settings.database.url,
            self.settings.database.max_connections,
        )
        .await?;
        store::require_current_schema(store.as_ref()).await?;
        Ok(store)
    }

    pub async fn processor(&self) -> Result<Arc<dyn Processor>, CliError> {
        let installation = self.store().await?.control().await?.installation_id;
        crate::processor::open(
            &self.settings.processor,
            &self.settings.database.url,
            self.clock.clone(),
            installation,
        )
        .await
        .map_err(CliError::from)
    }
}

impl From<crate::processor::ProcessorError> for CliError {
    fn from(e: crate::processor::ProcessorError) -> CliError {
        use crate::processor::ProcessorError as E;
        let code = match &e {
            E::Rejected(_) => exit::DATA,
            E::Unavailable(_) => exit::UNAVAILABLE,
            E::Config(_) => exit::CONFIG,
        };
        CliError::new(code, e.to_string())
    }
}

/// The operating-system user behind a command-line action, for the audit trail: `cli:` and the
/// name of the effective user id, plus the login user when it differs (an operator running
/// `sudo -u autopay` stays named: `cli:autopay (login alice)`). Never `$USER` or `$LOGNAME`,
/// which any caller sets to anything.
pub fn operator() -> String {
    let euid = crate::users::effective();
    let login = login_uid()
        .filter(|uid| *uid != euid)
        .map(crate::users::name);
    operator_label(&crate::users::name(euid), login.as_deref())
}

/// `cli:NAME` or `cli:NAME (login LOGIN)`, each name escaped ([`output::escape`]) so that an
/// odd account name cannot put a control or direction character into the audit trail.
pub fn operator_label(user: &str, login: Option<&str>) -> String {
    match login {
        Some(login) => format!(
            "cli:{} (login {})",
            output::escape(user),
            output::escape(login)
        ),
        None => format!("cli:{}", output::escape(user)),
    }
}

/// The login user id the kernel keeps for this session (`/proc/self/loginuid`, set at login
/// and kept through `sudo` and `su`); none when unset (4294967295) or unreadable.
fn login_uid() -> Option<libc::uid_t> {
    let text = std::fs::read_to_string("/proc/self/loginuid").ok()?;
    let uid: libc::uid_t = text.trim().parse().ok()?;
    (uid != libc::uid_t::MAX).then_some(uid)
}

/// Parses an id argument (a UUID, or one of the typed ids of [`crate::domain::ids`]), naming
/// what it should be.
pub fn parse_id<T: std::str::FromStr>(value: &str, what: &str) -> Result<T, CliError> {
    value.trim().parse::<T>().map_err(|_| {
        CliError::usage(format!(
            "'{}' is not a {what} id; ids look like 0193a5b2-7c1e-7d3f-9a41-2b6c8d0e1f23 (see the list command)",
            output::escape(&redact_card_numbers(value))
        ))
    })
}

/// An error message as the terminal may see it: whatever path produced it, every secret's value
/// (`password = ...`), every password inside a URL and every card number is taken out
/// ([`crate::config::redact_secrets`]), and control and direction characters are shown escaped
/// ([`output::escape_lines`]). The safety net behind each message's own care.
fn shown_error(message: &str) -> String {
    output::escape_lines(&crate::config::redact_secrets(message))
}

/// Makes every file and folder this process creates private to its user (0600 and 0700),
/// whatever umask it was started with: the databases, the simulated processor's ledger, SQLite's
/// -wal and -shm files and the `.eml` files hold names, emails, account numbers and tokens.
fn private_files() {
    // SAFETY: umask only swaps this process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Runs the command line and returns the process's exit code.
pub fn main_with(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    private_files();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => exit::OK,
                _ => exit::USAGE,
            };
            let text = shown_error(&e.render().to_string());
            if code == exit::OK {
                say(text.trim_end());
            } else {
                eprintln!("{}", text.trim_end());
            }
            return ExitCode::from(code);
        }
    };
    let settings = match Settings::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            if matches!(cli.command, Command::CheckConfig)
                && cli.json
                && let ConfigError::Invalid(problems) = &e
            {
                let _ = output::json(&serde_json::json!({ "ok": false, "problems": problems }));
            }
            let err = CliError::from(e);
            eprintln!("error: {}", shown_error(&err.message));
            return ExitCode::from(err.code);
        }
    };
    // The benchmark logs warnings and errors only: two info lines per payment would flood the
    // terminal and weigh in the figures.
    let level = match cli.command {
        Command::Bench(_) => "warn",
        _ => settings.log.level.as_str(),
    };
    crate::telemetry::init(level, settings.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let ctx = Context {
        settings,
        clock: Arc::new(SystemClock),
        json: cli.json,
    };
    match runtime.block_on(dispatch(&ctx, cli.command)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {}", shown_error(&e.message));
            ExitCode::from(e.code)
        }
    }
}

async fn dispatch(ctx: &Context, command: Command) -> Result<(), CliError> {
    match command {
        Command::Run(args) => operate::run(ctx, args).await,
        Command::Charging(c) => operate::charging(ctx, c).await,
        Command::Migrate => migrate(ctx).await,
        Command::CheckConfig => check_config(ctx),
        Command::Status => status(ctx).await,
        Command::Backup { file } => restore::backup(ctx, &file).await,
        Command::RestoreMark => restore::restore_mark(ctx).await,
        Command::Reconcile(args) => restore::reconcile(ctx, args).await,
        Command::Member(c) => members::member(ctx, c).await,
        Command::Card(c) => members::card(ctx, c).await,
        Command::Bill(c) => billing::bill(ctx, c).await,
        Command::Schedule(c) => schedules::schedule(ctx, c).await,
        Command::Payment(c) => schedules::payment(ctx, c).await,
        Command::Bench(args) => bench::bench(ctx, args).await,
    }
}

async fn migrate(ctx: &Context) -> Result<(), CliError> {
    let store = store::open(
        &ctx.settings.database.url,
        ctx.settings.database.max_connections,
    )
    .await?;
    let report = store.migrate(ctx.now()).await?;
    tracing::info!(
        applied = report.applied.len(),
        schema_version = report.schema_version,
        "migrated"
    );
    if ctx.json {
        return output::json(&report);
    }
    if report.applied.is_empty() {
        say(format!(
            "schema is up to date (version {})",
            report.schema_version
        ));
    } else {
        for m in &report.applied {
            say(format!("applied {m}"));
        }
    }
    say(format!("installation {}", report.installation_id));
    Ok(())
}

/// Prints the effective settings: secrets are redacted by the settings themselves, and a card
/// number typed into any other value (a host, a name) is taken out here.
fn check_config(ctx: &Context) -> Result<(), CliError> {
    if ctx.json {
        let mut settings = ctx.settings.redacted_json();
        redact_strings(&mut settings);
        return output::json(&serde_json::json!({ "ok": true, "settings": settings }));
    }
    for line in ctx.settings.redacted_lines() {
        say(redact_card_numbers(&line));
    }
    say("settings are valid");
    Ok(())
}

/// Runs every string inside a JSON value through [`redact_card_numbers`].
fn redact_strings(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => *s = redact_card_numbers(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_strings),
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_strings),
        _ => {}
    }
}

async fn status(ctx: &Context) -> Result<(), CliError> {
    let store = ctx.store().await?;
    let report = store.status().await?;
    let now = ctx.now();
    let day_ago = now
        .checked_sub(jiff::SignedDuration::from_hours(24))
        .unwrap_or(now);
    let activity = store.activity(now, day_ago).await?;
    if ctx.json {
        // The report's fields as before, with the activity beside them.
        #[derive(serde::Serialize)]
        struct Full<'a> {
            #[serde(flatten)]
            report: &'a store::StatusReport,
            activity: &'a store::Activity,
        }
        return output::json(&Full {
            report: &report,
            activity: &activity,
        });
    }
    let mut lines = vec![
        (
            "database",
            format!(
                "{} (schema version {})",
                report.backend, report.schema_version
            ),
        ),
        ("installation", report.control.installation_id.to_string()),
        (
            "charging",
            match &report.control.charging_paused {
                Some(p) => format!(
                    "PAUSED since {} by {}: {}",
                    p.since,
                    p.by.as_deref().unwrap_or("?"),
                    p.reason
                ),
                None => "running".into(),
            },
        ),
        (
            "mail",
            match &report.control.mail_paused {
                Some(p) => format!("PAUSED since {}: {}", p.since, p.reason),
                None => "running".into(),
            },
        ),
    ];
    let counts = |m: &std::collections::BTreeMap<String, i64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    lines.push(("members", counts(&report.members)));
    lines.push(("schedules", counts(&report.schedules)));
    lines.push(("payments", counts(&report.payments)));
    lines.push(("bills", counts(&report.bills)));
    lines.push(("notifications", counts(&report.notifications)));
    lines.push((
        "bouncing emails",
        match report.members_bouncing {
            0 => "0".into(),
            n => format!("{n} (autopay member list --bouncing)"),
        },
    ));
    lines.push((
        "due now",
        match activity.oldest_due {
            Some(t) => format!("{} payment(s), the oldest due since {t}", activity.due_now),
            None => "nothing".into(),
        },
    ));
    lines.push((
        "next due",
        activity
            .next_due
            .map_or("nothing scheduled".into(), |t| t.to_string()),
    ));
    lines.push((
        "last 24 hours",
        format!(
            "{} failed, {} unknown, {} need review",
            activity.failed, activity.unknown, activity.needs_review
        ),
    ));
    lines.push((
        "periodic jobs",
        if activity.jobs.is_empty() {
            "none has run yet (they run inside `autopay run`)".into()
        } else {
            activity
                .jobs
                .iter()
                .map(|(job, at)| format!("{job} last ran {at}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
    ));
    if let Some(since) = report.control.reconcile_required_since {
        lines.push((
            "restore",
            format!(
                "RECONCILE REQUIRED: this database is complete only up to {since}; `autopay run` refuses it until `autopay reconcile` has run"
            ),
        ));
    }
    if report.findings_open > 0 {
        lines.push((
            "findings",
            format!(
                "{} charge(s) the processor made that reconcile could not place: `autopay reconcile --findings`, then `autopay reconcile --acknowledge ID --note TEXT` each",
                report.findings_open
            ),
        ));
    }
    let refunds = report
        .processor_events
        .get("charge.refunded")
        .copied()
        .unwrap_or(0);
    let disputes = report
        .processor_events
        .get("charge.dispute.created")
        .copied()
        .unwrap_or(0);
    if refunds + disputes > 0 {
        lines.push((
            "disputes",
            format!(
                "the processor reported {refunds} refund(s) and {disputes} dispute(s) of autopay's charges; no balance was changed: see each payment's events (`autopay payment show`) and correct bills with `autopay bill adjust`"
            ),
        ));
    }
    if let Some(n) = report.payments.get("needs_review").filter(|n| **n > 0) {
        lines.push((
            "review",
            format!(
                "{n} payment(s) need an operator: `autopay payment list --state needs_review`, then `autopay payment retry` or `resolve` each (docs/engine.md)"
            ),
        ));
    }
    say(output::fields(&lines));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_is_named_by_user_id_and_login_never_by_the_environment() {
        assert_eq!(operator_label("autopay", None), "cli:autopay");
        assert_eq!(
            operator_label("autopay", Some("alice")),
            "cli:autopay (login alice)"
        );
        assert_eq!(
            operator_label("x\u{1b}[2J", Some("a\u{202e}b")),
            "cli:x\\u{1b}[2J (login a\\u{202e}b)"
        );
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        let me = crate::users::name(euid);
        assert!(!me.is_empty());
        assert!(operator().starts_with(&format!("cli:{me}")));
        assert_eq!(
            crate::users::name(libc::uid_t::MAX - 1),
            format!("uid {}", libc::uid_t::MAX - 1)
        );
    }
}
